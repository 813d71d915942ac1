//! `fanout` workload: room fan-out through one broker or a cluster of brokers.
//!
//! The generator is also the backend: it connects one backend (protocol v1 over TCP) to every
//! broker given with `--backends`, accepts every connection request into room `bench`, and
//! opens `--clients` WebSocket clients spread round-robin over `--urls`. Once every client has
//! received a probe message (so all are registered, cluster-wide), the backend on the first
//! broker publishes `message_to_room` messages that carry their send time:
//!
//! * `--rate 0` (closed loop): at most `--window` messages are in flight — a new message is sent
//!   once all clients together have received all but `window` of the earlier ones. Measures the
//!   deliveries per second the system sustains.
//! * `--rate R`: R messages per second regardless (open loop); measures delivery latency at a
//!   load the system carries.
//!
//! Latency = receive time − send time (one process, one clock). At the end it waits for the last
//! messages and reports how many deliveries never arrived (`missing`; 0 unless something was lost).
//!
//! Usage: `pystrands-loadgen fanout --urls ws://h:p/bench,... --backends h:p,... --clients 3000
//! --seconds 5 --warmup 1 --size 64 --window 16 --rate 0`

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Message;

struct Args {
    urls: Vec<String>,
    backends: Vec<String>,
    clients: usize,
    seconds: f64,
    warmup: f64,
    size: usize,
    window: u64,
    rate: f64,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(2);
    let mut a = Args {
        urls: vec![],
        backends: vec![],
        clients: 1000,
        seconds: 5.0,
        warmup: 1.0,
        size: 64,
        window: 16,
        rate: 0.0,
    };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = || format!("bad value for {flag}: {value}");
        match flag.as_str() {
            "--urls" => a.urls = value.split(',').map(str::to_string).collect(),
            "--backends" => a.backends = value.split(',').map(str::to_string).collect(),
            "--clients" => a.clients = value.parse().map_err(|_| bad())?,
            "--seconds" => a.seconds = value.parse().map_err(|_| bad())?,
            "--warmup" => a.warmup = value.parse().map_err(|_| bad())?,
            "--size" => a.size = value.parse().map_err(|_| bad())?,
            "--window" => a.window = value.parse().map_err(|_| bad())?,
            "--rate" => a.rate = value.parse().map_err(|_| bad())?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.urls.is_empty() || a.backends.is_empty() {
        return Err("--urls and --backends are required".into());
    }
    if a.window == 0 || a.clients == 0 {
        return Err("--window and --clients must be >= 1".into());
    }
    Ok(a)
}

/// State shared by the publisher and every receiving client.
struct State {
    start: Instant,
    /// Clients that received a probe (registered and reachable).
    ready: AtomicU64,
    /// Bench messages received by all clients together.
    delivered: AtomicU64,
    /// The publisher waits until `delivered` reaches this.
    wanted: AtomicU64,
    progress: Notify,
    stop: AtomicBool,
}

impl State {
    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }
}

/// One backend connection: accepts every connection request into room `bench`. Returns a
/// sender of lines to write on it (the publisher uses the first backend's).
async fn backend(addr: String) -> Result<mpsc::UnboundedSender<Vec<u8>>, String> {
    let stream = TcpStream::connect(&addr).await.map_err(|e| format!("backend connect {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (rd, wr) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        let mut out = BufWriter::with_capacity(64 * 1024, wr);
        while let Some(line) = rx.recv().await {
            if out.write_all(&line).await.is_err() {
                return;
            }
            while let Ok(more) = rx.try_recv() {
                if out.write_all(&more).await.is_err() {
                    return;
                }
            }
            if out.flush().await.is_err() {
                return;
            }
        }
    });
    let answers = tx.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(rd).lines();
        let mut n = 0u64;
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            if v.get("action").and_then(|a| a.as_str()) != Some("connection_request") {
                continue;
            }
            let id = v.get("request_id").and_then(|r| r.as_str()).unwrap_or_default();
            n += 1;
            let resp = serde_json::json!({"request_id": id, "action": "response", "params": {"accepted": true, "client_id": format!("{addr}/{n}"), "room_id": "bench"}});
            let mut bytes = resp.to_string().into_bytes();
            bytes.push(b'\n');
            if answers.send(bytes).is_err() {
                break;
            }
        }
    });
    Ok(tx)
}

fn room_line(message: &str) -> Vec<u8> {
    let mut line = serde_json::json!({"request_id": "b", "action": "message_to_room", "params": {"room_id": "bench", "message": message}}).to_string().into_bytes();
    line.push(b'\n');
    line
}

/// One receiving client; returns its latency histogram (µs) of measured messages.
async fn client(
    url: String,
    st: Arc<State>,
    measure: Arc<OnceLock<(u64, u64)>>,
) -> Result<(Histogram<u64>, u64), String> {
    let rest = url.strip_prefix("ws://").ok_or("only ws:// URLs")?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let stream = TcpStream::connect(hostport).await.map_err(|e| format!("connect {hostport}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut ws, _) =
        tokio_tungstenite::client_async(url.as_str(), stream).await.map_err(|e| format!("handshake: {e}"))?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let mut ready = false;
    let mut got = 0u64;
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if st.stop.load(Relaxed) { break } else { continue }
            }
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("recv: {e}")),
            None => return Err("server closed the connection".into()),
        };
        if text.starts_with("probe") {
            if !ready {
                ready = true;
                st.ready.fetch_add(1, Relaxed);
                st.progress.notify_one();
            }
            continue;
        }
        // "m <seq> <sent_us> <padding>"
        let mut parts = text.split(' ');
        let sent: u64 = parts.nth(2).and_then(|s| s.parse().ok()).ok_or("bad bench message")?;
        got += 1;
        if measure.get().is_some_and(|&(from, to)| sent >= from && sent < to) {
            let _ = hist.record(st.now_us().saturating_sub(sent).max(1));
        }
        if st.delivered.fetch_add(1, Relaxed) + 1 >= st.wanted.load(Relaxed) {
            st.progress.notify_one();
        }
    }
    let _ = ws.close(None).await;
    Ok((hist, got))
}

pub fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let result = rt.block_on(run(args));
    println!("{result}");
}

async fn run(a: Args) -> serde_json::Value {
    let st = Arc::new(State {
        start: Instant::now(),
        ready: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        wanted: AtomicU64::new(u64::MAX),
        progress: Notify::new(),
        stop: AtomicBool::new(false),
    });
    let mut senders = Vec::new();
    for b in &a.backends {
        match backend(b.clone()).await {
            Ok(tx) => senders.push(tx),
            Err(e) => return serde_json::json!({"error": e}),
        }
    }
    // Brokers register a backend asynchronously: give them a moment before clients connect.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let publisher = senders[0].clone();

    // The measured interval is fixed once everybody is ready; clients read it from here.
    let measure = Arc::new(OnceLock::<(u64, u64)>::new());
    let n = a.clients as u64;
    let mut tasks = Vec::new();
    let connect_started = Instant::now();
    for i in 0..a.clients {
        let url = a.urls[i % a.urls.len()].clone();
        let st = st.clone();
        let measure = measure.clone();
        tasks.push(tokio::spawn(client(url, st, measure)));
        if i % 200 == 199 {
            tokio::task::yield_now().await;
        }
    }
    // Probe until every client got one (registered on its node and reachable from node A).
    let ready_deadline = Instant::now() + Duration::from_secs(60);
    while st.ready.load(Relaxed) < n {
        if Instant::now() > ready_deadline {
            st.stop.store(true, Relaxed);
            return serde_json::json!({"error": format!("only {} of {n} clients became ready", st.ready.load(Relaxed))});
        }
        let _ = publisher.send(room_line("probe"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    // Let the last probes drain, so they do not count as in-flight bench messages.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let t0 = st.now_us();
    let from = t0 + (a.warmup * 1e6) as u64;
    let to = from + (a.seconds * 1e6) as u64;
    let _ = measure.set((from, to));
    let pad = "x".repeat(a.size.saturating_sub(24));
    let mut seq = 0u64;
    let mut delivered_from = None;
    let mut sent_in_window = 0u64;
    let interval = if a.rate > 0.0 { Some(Duration::from_secs_f64(1.0 / a.rate)) } else { None };
    let mut next_send = Instant::now();
    let delivered_to = loop {
        let now = st.now_us();
        if delivered_from.is_none() && now >= from {
            delivered_from = Some(st.delivered.load(Relaxed));
        }
        if now >= to {
            break st.delivered.load(Relaxed);
        }
        match interval {
            Some(iv) => {
                let wait = next_send.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                next_send += iv;
            }
            None => {
                // Closed loop: all but `window` earlier messages fully delivered.
                let need = seq.saturating_sub(a.window) * n;
                st.wanted.store(need, Relaxed);
                while st.delivered.load(Relaxed) < need {
                    if tokio::time::timeout(Duration::from_secs(10), st.progress.notified()).await.is_err() {
                        st.stop.store(true, Relaxed);
                        return serde_json::json!({"error": "fan-out stalled for 10 s (messages lost?)", "sent": seq, "delivered": st.delivered.load(Relaxed)});
                    }
                }
            }
        }
        let sent_us = st.now_us();
        if sent_us >= from && sent_us < to {
            sent_in_window += 1;
        }
        let _ = publisher.send(room_line(&format!("m {seq} {sent_us} {pad}")));
        seq += 1;
    };
    // Wait (bounded) for what is in flight, then stop the clients.
    let expected = seq * n;
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    while st.delivered.load(Relaxed) < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    st.stop.store(true, Relaxed);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut errors = Vec::new();
    let mut received = 0u64;
    for t in tasks {
        match t.await {
            Ok(Ok((h, got))) => {
                let _ = hist.add(&h);
                received += got;
            }
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(e.to_string()),
        }
    }
    errors.sort();
    errors.dedup();
    errors.truncate(5);
    let delivered = delivered_to - delivered_from.unwrap_or(delivered_to);
    serde_json::json!({
        "workload": "cluster-fanout",
        "mode": if a.rate > 0.0 { format!("open loop, {} msg/s", a.rate) } else { format!("closed loop, window {}", a.window) },
        "nodes": a.urls.len(),
        "clients": a.clients,
        "size": a.size,
        "seconds": a.seconds,
        "connect_seconds": connect_secs,
        "messages_sent": seq,
        "messages_per_sec": sent_in_window as f64 / a.seconds,
        "deliveries_per_sec": delivered as f64 / a.seconds,
        "missing": expected.saturating_sub(received),
        "latency_us": {
            "p50": hist.value_at_quantile(0.5),
            "p99": hist.value_at_quantile(0.99),
            "p999": hist.value_at_quantile(0.999),
            "max": hist.max(),
            "samples": hist.len(),
        },
        "errors": errors,
    })
}
