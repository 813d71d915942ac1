//! Load generator for the benchmarks: opens N WebSocket connections and runs one workload for a
//! fixed time, recording throughput and HdrHistograms of latencies; prints one JSON object (the
//! last line of stdout). Cheap per message (pre-built frames, a few KiB of buffer per
//! connection) so that the system under test, not the generator, is what gets measured.
//!
//! Message convention every system under test implements (see benches/peers/):
//! a client message starting with `e` is echoed to its sender, `r` is sent to the room `bench`,
//! `b` is broadcast to every connected client. Receivers join room `bench` with `--url`; the
//! publisher of `fanout`/`broadcast` connects with `--pub-url` (a room other than `bench`).
//!
//! Workloads:
//! * `echo`: every client sends a message and waits for its echo before sending again
//!   (ping-pong); latency = round trip.
//! * `fanout`: N receivers in room `bench`; one publisher sends `r<seq> <t_ns> …` at `--rate`
//!   messages/s (0 = as fast as the system delivers, at most `--window` messages in flight);
//!   latency = receive time − send time stamped in the payload, at every receiver.
//! * `broadcast`: N receivers; the publisher sends `--triggers` broadcast messages one after the
//!   other; for each, the time until the last receiver got it.
//! * `idle`: open N connections (`--concurrency` at a time), print a `ready` line, hold them for
//!   `--hold` seconds (answering pings), close.
//! * `connect`: storm of N connections, `--concurrency` connectors; connections/s including the
//!   WebSocket handshake (and the Socket.IO connect round trip with `--protocol socketio`).
//!
//! `--protocol pystrands1` (`fanout` and `broadcast` only): the receivers speak our browser
//! protocol `pystrands.1` (`Sec-WebSocket-Protocol: pystrands.1`, `{"t":"connect"}`, wait for the
//! `welcome`); a message's payload is its envelope's `data`; `ping` frames are skipped. The
//! publisher stays a plain client.
//! `--protocol socketio` speaks Engine.IO v4 / Socket.IO v5 over a websocket (`--url` must be
//! `ws://…/socket.io/?EIO=4&transport=websocket…`): waits for the `0{…}` open packet, sends
//! `40`, waits for `40…`, sends events as `42["m","…"]`, answers ping `2` with `3`.
//! `--sources K` binds connection i to source address 127.0.0.(1 + i mod K) (needed past ~28k
//! connections to one port: one source address has ~28k ephemeral ports).
//!
//! * `cluster-fanout`: room fan-out through one broker or a cluster, the tool acting as every
//!   node's backend (see [`fanout`]; used by `benches/cluster_fanout.py`).
//! * `storm`: a reconnect storm with recovery, `pystrands.1` clients (or Centrifuge's) that
//!   missed messages coming back at once (see [`storm`]; used by `benches/recovery.py`).
//!
//! TLS: a `wss://` URL connects over TLS (rustls, ring provider), trusting only the CA
//! certificates of the PEM file `--ca` (the server name checked is the URL's IP address). The
//! TLS handshake is part of a connection's setup (in `connect`: of the measured time). A URL may
//! carry a query string, e.g. a signed connection token: `ws://127.0.0.1:8080/bench?token=…`.
//!
//! Usage: `pystrands-loadgen WORKLOAD --url ws://127.0.0.1:8080/bench [--clients N] [--seconds S] …`

mod fanout;
mod storm;

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tokio_util::either::Either;

type Ws = WebSocketStream<Stream>;

const USAGE: &str = "usage: pystrands-loadgen echo|fanout|broadcast|idle|connect --url URL [--pub-url URL] [--protocol plain|socketio|pystrands1] \
[--ca PEM (trusted CA of wss:// URLs)] [--clients N] [--seconds S] [--warmup S] [--size BYTES] [--rate MSGS_PER_S (0 = max)] [--window N] [--triggers N] [--gap-ms MS] \
[--concurrency N] [--hold S] [--sources K] [--threads N] [--drain S]";

#[derive(Clone)]
struct Args {
    workload: String,
    url: String,
    pub_url: String,
    socketio: bool,
    /// Receivers speak `pystrands.1` (fanout, broadcast).
    structured: bool,
    clients: usize,
    seconds: f64,
    warmup: f64,
    size: usize,
    rate: f64,
    window: u64,
    triggers: usize,
    gap_ms: u64,
    concurrency: usize,
    hold: f64,
    sources: usize,
    threads: usize,
    drain: f64,
    /// From `--ca`: the TLS client of `wss://` URLs.
    tls: Option<TlsConnector>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let workload = it.next().ok_or(USAGE)?;
    let mut a = Args {
        workload,
        url: String::new(),
        pub_url: String::new(),
        socketio: false,
        structured: false,
        clients: 100,
        seconds: 10.0,
        warmup: 1.0,
        size: 64,
        rate: 0.0,
        window: 16,
        triggers: 20,
        gap_ms: 50,
        concurrency: 100,
        hold: 5.0,
        sources: 1,
        threads: 1,
        drain: 10.0,
        tls: None,
    };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = || format!("bad value for {flag}: {value}");
        match flag.as_str() {
            "--url" => a.url = value.clone(),
            "--pub-url" => a.pub_url = value.clone(),
            "--protocol" => {
                (a.socketio, a.structured) = match value.as_str() {
                    "plain" => (false, false),
                    "socketio" => (true, false),
                    "pystrands1" => (false, true),
                    _ => return Err(bad()),
                }
            }
            "--clients" => a.clients = value.parse().map_err(|_| bad())?,
            "--seconds" => a.seconds = value.parse().map_err(|_| bad())?,
            "--warmup" => a.warmup = value.parse().map_err(|_| bad())?,
            "--size" => a.size = value.parse().map_err(|_| bad())?,
            "--rate" => a.rate = value.parse().map_err(|_| bad())?,
            "--window" => a.window = value.parse().map_err(|_| bad())?,
            "--triggers" => a.triggers = value.parse().map_err(|_| bad())?,
            "--gap-ms" => a.gap_ms = value.parse().map_err(|_| bad())?,
            "--concurrency" => a.concurrency = value.parse().map_err(|_| bad())?,
            "--hold" => a.hold = value.parse().map_err(|_| bad())?,
            "--sources" => a.sources = value.parse().map_err(|_| bad())?,
            "--threads" => a.threads = value.parse().map_err(|_| bad())?,
            "--drain" => a.drain = value.parse().map_err(|_| bad())?,
            "--ca" => a.tls = Some(tls_connector(&value)?),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    if a.url.is_empty() {
        return Err(format!("--url is required\n{USAGE}"));
    }
    if a.pub_url.is_empty() {
        a.pub_url = a.url.clone();
    }
    if a.structured && !matches!(a.workload.as_str(), "fanout" | "broadcast") {
        return Err("--protocol pystrands1 is for fanout and broadcast (its receivers)".into());
    }
    if a.sources == 0 || a.sources > 254 || a.concurrency == 0 || a.window == 0 || a.threads == 0 {
        return Err("--sources must be 1..254, --concurrency, --window and --threads at least 1".into());
    }
    Ok(a)
}

fn new_hist() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("histogram")
}

/// Percentiles of a histogram of microseconds, plus the curve the plots draw.
fn hist_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    let curve: Vec<Value> = [0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0]
        .iter()
        .map(|q| json!([q, if *q >= 1.0 { h.max() } else { h.value_at_quantile(*q) }]))
        .collect();
    json!({
        "count": h.len(),
        "min": h.min(),
        "mean": (h.mean() * 10.0).round() / 10.0,
        "p50": h.value_at_quantile(0.5),
        "p90": h.value_at_quantile(0.9),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
        "curve": curve,
    })
}

/// A TLS client trusting only the CA certificates of the PEM file `ca` (rustls, ring provider,
/// TLS 1.3 or 1.2).
fn tls_connector(ca: &str) -> Result<TlsConnector, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("--ca {ca}: {e}"))? {
        let cert = cert.map_err(|e| format!("--ca {ca}: {e}"))?;
        roots.add(cert).map_err(|e| format!("--ca {ca}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("--ca {ca}: no certificate in the file"));
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The stream a connection runs on: TCP (`ws://`, `Left`) or TLS over TCP (`wss://`, `Right`).
type Stream = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// Where to connect and how: parsed once, shared by every connection.
struct Target {
    url: String,
    addr: SocketAddr,
    socketio: bool,
    /// Speaks `pystrands.1` (receivers of fanout and broadcast).
    structured: bool,
    sources: usize,
    /// `wss://`: the TLS client and the server name it checks (the URL's IP address).
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Target {
    fn new(url: &str, a: &Args) -> Result<Target, String> {
        let (rest, secure) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
            (Some(rest), _) => (rest, false),
            (_, Some(rest)) => (rest, true),
            _ => return Err("only ws:// and wss:// URLs".into()),
        };
        let hostport = rest.split(['/', '?']).next().unwrap_or(rest);
        let addr: SocketAddr =
            hostport.parse().map_err(|_| format!("need a numeric ip:port in the URL, got {hostport}"))?;
        let tls = match (secure, &a.tls) {
            (false, _) => None,
            (true, Some(c)) => Some((c.clone(), ServerName::IpAddress(addr.ip().into()))),
            (true, None) => return Err("a wss:// URL needs --ca (the PEM file of the CA to trust)".into()),
        };
        Ok(Target { url: url.to_string(), addr, socketio: a.socketio, structured: false, sources: a.sources, tls })
    }
}

fn ws_config() -> WebSocketConfig {
    // Small buffers: 20k connections x the 128 KiB defaults would be 2.5 GiB in this process.
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0)
}

/// Opens connection number `idx`: TCP (from source address 127.0.0.(1 + idx mod sources)),
/// WebSocket handshake, and with Socket.IO the open packet and the namespace connect.
async fn open(t: &Target, idx: usize) -> Result<Ws, String> {
    let sock = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    if t.sources > 1 {
        let src = Ipv4Addr::new(127, 0, 0, 1 + (idx % t.sources) as u8);
        sock.bind(SocketAddr::new(IpAddr::V4(src), 0)).map_err(|e| format!("bind {src}: {e}"))?;
    }
    let stream = sock.connect(t.addr).await.map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let stream = match &t.tls {
        Some((connector, name)) => Either::Right(Box::new(
            connector.connect(name.clone(), stream).await.map_err(|e| format!("TLS handshake: {e}"))?,
        )),
        None => Either::Left(stream),
    };
    let mut req = t.url.as_str().into_client_request().map_err(|e| format!("request: {e}"))?;
    if t.structured {
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("pystrands.1"));
    }
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config()))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    if t.structured {
        ws.send(Message::text(r#"{"t":"connect"}"#)).await.map_err(|e| format!("send: {e}"))?;
        let welcome = next_text(&mut ws).await?;
        if !welcome.starts_with(r#"{"t":"welcome""#) {
            return Err(format!("pystrands.1: expected welcome, got {:.60}", welcome.as_str()));
        }
    }
    if t.socketio {
        // Engine.IO open packet `0{...}`, then Socket.IO connect `40` -> `40{"sid":...}`.
        let first = next_text(&mut ws).await?;
        if !first.starts_with('0') {
            return Err(format!("socket.io: expected open packet, got {first:.40}"));
        }
        ws.send(Message::text("40")).await.map_err(|e| format!("send: {e}"))?;
        loop {
            let m = next_text(&mut ws).await?;
            if m.starts_with("40") {
                break;
            }
            if m.starts_with("44") {
                return Err(format!("socket.io connect refused: {m:.80}"));
            }
            if m == "2" {
                ws.send(Message::text("3")).await.map_err(|e| format!("send: {e}"))?;
            }
        }
    }
    Ok(ws)
}

async fn open_timed(t: &Target, idx: usize) -> Result<Ws, String> {
    match tokio::time::timeout(Duration::from_secs(30), open(t, idx)).await {
        Ok(r) => r,
        Err(_) => Err("connect: no handshake within 30 s".into()),
    }
}

async fn next_text(ws: &mut Ws) -> Result<Utf8Bytes, String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Ok(t),
            Ok(Some(Ok(Message::Close(c)))) => return Err(format!("server closed the connection: {c:?}")),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(format!("recv: {e}")),
            Ok(None) => return Err("server closed the connection".into()),
            Err(_) => return Err("nothing received within 15 s".into()),
        }
    }
}

/// The payload of a received frame: with Socket.IO, the data of a `42["m","…"]` event; with
/// `pystrands.1`, the `data` of a `msg` envelope (our payloads need no JSON escaping, and `data`
/// is its last field); `None` for anything else (answers ping `2` first).
async fn payload<'a>(ws: &mut Ws, t: &Target, text: &'a str) -> Result<Option<&'a str>, String> {
    if t.structured {
        return Ok(text.find(r#""data":""#).and_then(|i| text[i + 8..].strip_suffix("\"}")));
    }
    if !t.socketio {
        return Ok(Some(text));
    }
    if text == "2" {
        ws.send(Message::text("3")).await.map_err(|e| format!("send: {e}"))?;
        return Ok(None);
    }
    Ok(text.strip_prefix("42[\"m\",\"").and_then(|s| s.strip_suffix("\"]")))
}

/// Builds the frame text carrying `body`, once.
fn frame(socketio: bool, body: &str) -> Utf8Bytes {
    if socketio {
        Utf8Bytes::from(format!("42[\"m\",\"{body}\"]"))
    } else {
        Utf8Bytes::from(body.to_string())
    }
}

/// `prefix` padded with `x` to `size` bytes.
fn padded(prefix: String, size: usize) -> String {
    let mut s = prefix;
    while s.len() < size {
        s.push('x');
    }
    s
}

/// Parses `<kind><seq> <t_ns> …` → (seq, t_ns).
fn parse_stamp(p: &str) -> Option<(u64, u64)> {
    let mut parts = p.get(1..)?.split(' ');
    let seq = parts.next()?.parse().ok()?;
    let t = parts.next()?.parse().ok()?;
    Some((seq, t))
}

struct ErrorLog {
    count: AtomicUsize,
    samples: std::sync::Mutex<Vec<String>>,
}

impl ErrorLog {
    fn new() -> Arc<ErrorLog> {
        Arc::new(ErrorLog { count: AtomicUsize::new(0), samples: std::sync::Mutex::new(Vec::new()) })
    }
    fn push(&self, e: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut s = self.samples.lock().unwrap();
        if s.len() < 5 {
            s.push(e);
        }
    }
    fn json(&self) -> Value {
        json!({"count": self.count.load(Ordering::Relaxed), "samples": *self.samples.lock().unwrap()})
    }
}

// ---------------------------------------------------------------- echo

async fn echo_client(
    t: Arc<Target>,
    idx: usize,
    msg: Utf8Bytes,
    warmup_end: Instant,
    end: Instant,
) -> Result<(u64, Histogram<u64>), String> {
    let mut ws = open_timed(&t, idx).await?;
    let mut hist = new_hist();
    let mut count = 0u64;
    loop {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        ws.send(Message::Text(msg.clone())).await.map_err(|e| format!("send: {e}"))?;
        loop {
            let text = next_text(&mut ws).await.map_err(|e| format!("waiting for the echo: {e}"))?;
            if payload(&mut ws, &t, &text).await?.is_some() {
                break;
            }
        }
        if sent >= warmup_end {
            count += 1;
            let _ = hist.record((sent.elapsed().as_micros() as u64).max(1));
        }
    }
    let _ = ws.close(None).await;
    Ok((count, hist))
}

async fn run_echo(a: Args) -> Value {
    let t = match Target::new(&a.url, &a) {
        Ok(t) => Arc::new(t),
        Err(e) => return json!({"error": e}),
    };
    let start = Instant::now();
    let warmup_end = start + Duration::from_secs_f64(a.warmup);
    let end = warmup_end + Duration::from_secs_f64(a.seconds);
    let msg = frame(a.socketio, &padded("e".into(), a.size));
    let tasks: Vec<_> =
        (0..a.clients).map(|i| tokio::spawn(echo_client(t.clone(), i, msg.clone(), warmup_end, end))).collect();
    let mut total = 0u64;
    let mut hist = new_hist();
    let errors = ErrorLog::new();
    for task in tasks {
        match task.await {
            Ok(Ok((n, h))) => {
                total += n;
                let _ = hist.add(&h);
            }
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(e.to_string()),
        }
    }
    json!({
        "workload": "echo", "clients": a.clients, "size": a.size, "seconds": a.seconds,
        "messages": total, "msgs_per_sec": total as f64 / a.seconds,
        "latency_us": hist_json(&hist), "errors": errors.json(),
    })
}

// ---------------------------------------------------------------- fanout / broadcast receivers

/// Shared counters of the receivers of `fanout` and `broadcast`.
struct Board {
    delivered: AtomicU64,
    /// broadcast: per trigger, receivers that got it and the largest latency (µs)
    got: Vec<AtomicU64>,
    max_lat: Vec<AtomicU64>,
    connected: AtomicUsize,
    stop: AtomicBool,
    stop_notify: tokio::sync::Notify,
}

struct Window {
    base: Instant,
    from_ns: u64,
    to_ns: u64,
}

/// One receiver: connects, then records the latency of every stamped message until told to stop.
/// Returns (deliveries counted in the window, histogram, last delivery time in ns since base).
async fn receiver(
    t: Arc<Target>,
    idx: usize,
    board: Arc<Board>,
    win: Arc<std::sync::Mutex<Option<Window>>>,
    errors: Arc<ErrorLog>,
) -> (u64, Histogram<u64>, u64) {
    let mut hist = new_hist();
    let mut ws = match open_timed(&t, idx).await {
        Ok(ws) => ws,
        Err(e) => {
            errors.push(e);
            board.connected.fetch_add(1, Ordering::SeqCst);
            return (0, hist, 0);
        }
    };
    board.connected.fetch_add(1, Ordering::SeqCst);
    let mut count = 0u64;
    let mut last = 0u64;
    let mut window: Option<(Instant, u64, u64)> = None;
    loop {
        // created before the flag is checked, so a stop between the two is not missed
        let stopped = board.stop_notify.notified();
        if board.stop.load(Ordering::SeqCst) {
            break;
        }
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = stopped => break,
        };
        let text = match msg {
            Some(Ok(Message::Text(txt))) => txt,
            Some(Ok(Message::Close(c))) => {
                errors.push(format!("server closed a receiver: {c:?}"));
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                errors.push(format!("recv: {e}"));
                break;
            }
            None => {
                errors.push("server closed a receiver".into());
                break;
            }
        };
        let p = match payload(&mut ws, &t, &text).await {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(e) => {
                errors.push(e);
                break;
            }
        };
        let Some((seq, sent_ns)) = parse_stamp(p) else { continue };
        if window.is_none() {
            window = win.lock().unwrap().as_ref().map(|w| (w.base, w.from_ns, w.to_ns));
        }
        let Some((base, from_ns, to_ns)) = window else { continue };
        let now_ns = base.elapsed().as_nanos() as u64;
        let lat_us = (now_ns.saturating_sub(sent_ns) / 1000).max(1);
        board.delivered.fetch_add(1, Ordering::Relaxed);
        if let Some(g) = board.got.get(seq as usize) {
            g.fetch_add(1, Ordering::Relaxed);
            board.max_lat[seq as usize].fetch_max(lat_us, Ordering::Relaxed);
        }
        if sent_ns >= from_ns && sent_ns < to_ns {
            count += 1;
            last = now_ns;
            let _ = hist.record(lat_us);
        }
    }
    drop(ws);
    (count, hist, last)
}

/// Connects the publisher and spawns a task that reads (and discards) what it receives.
async fn publisher(t: &Target) -> Result<futures_util::stream::SplitSink<Ws, Message>, String> {
    let ws = open_timed(t, usize::MAX / 2).await.map_err(|e| format!("publisher: {e}"))?;
    let (sink, mut stream) = ws.split();
    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    Ok(sink)
}

async fn connect_receivers(
    a: &Args,
    t: &Arc<Target>,
    board: &Arc<Board>,
    win: &Arc<std::sync::Mutex<Option<Window>>>,
    errors: &Arc<ErrorLog>,
) -> (Vec<tokio::task::JoinHandle<(u64, Histogram<u64>, u64)>>, f64) {
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(a.clients);
    for i in 0..a.clients {
        tasks.push(tokio::spawn(receiver(t.clone(), i, board.clone(), win.clone(), errors.clone())));
        // at most `concurrency` handshakes in flight
        while i + 1 - board.connected.load(Ordering::SeqCst) >= a.concurrency {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    while board.connected.load(Ordering::SeqCst) < a.clients {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (tasks, t0.elapsed().as_secs_f64())
}

fn new_board(slots: usize) -> Arc<Board> {
    Arc::new(Board {
        delivered: AtomicU64::new(0),
        got: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        max_lat: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        connected: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        stop_notify: tokio::sync::Notify::new(),
    })
}

async fn stop_receivers(
    board: &Board,
    tasks: Vec<tokio::task::JoinHandle<(u64, Histogram<u64>, u64)>>,
) -> (u64, Histogram<u64>, u64) {
    board.stop.store(true, Ordering::SeqCst);
    board.stop_notify.notify_waiters();
    let mut total = 0;
    let mut hist = new_hist();
    let mut last = 0;
    for task in tasks {
        if let Ok((n, h, l)) = task.await {
            total += n;
            let _ = hist.add(&h);
            last = last.max(l);
        }
    }
    (total, hist, last)
}

// ---------------------------------------------------------------- fanout

async fn run_fanout(a: Args) -> Value {
    let (t, tp) = match (Target::new(&a.url, &a), Target::new(&a.pub_url, &a)) {
        (Ok(t), Ok(tp)) => (Arc::new(Target { structured: a.structured, ..t }), tp),
        (Err(e), _) | (_, Err(e)) => return json!({"error": e}),
    };
    let board = new_board(0);
    let errors = ErrorLog::new();
    let win = Arc::new(std::sync::Mutex::new(None));
    let (tasks, connect_s) = connect_receivers(&a, &t, &board, &win, &errors).await;
    let mut sink = match publisher(&tp).await {
        Ok(s) => s,
        Err(e) => {
            stop_receivers(&board, tasks).await;
            return json!({"error": e, "errors": errors.json()});
        }
    };
    let base = Instant::now();
    let from_ns = (a.warmup * 1e9) as u64;
    let to_ns = from_ns + (a.seconds * 1e9) as u64;
    *win.lock().unwrap() = Some(Window { base, from_ns, to_ns });
    let receivers = (a.clients - errors.count.load(Ordering::Relaxed).min(a.clients)) as u64;
    let mut sent = 0u64;
    let mut sent_in_window = 0u64;
    let mut stalled = Duration::ZERO;
    let mut err = None;
    let mut text = String::with_capacity(a.size + 32);
    loop {
        let now_ns = base.elapsed().as_nanos() as u64;
        if now_ns >= to_ns {
            break;
        }
        if a.rate > 0.0 {
            // fixed rate: catch up with the schedule, then wait a tick
            let due = (now_ns as f64 / 1e9 * a.rate) as u64;
            if sent >= due {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        } else if receivers > 0 && sent.saturating_sub(board.delivered.load(Ordering::Relaxed) / receivers) >= a.window
        {
            // max rate: at most `window` messages not yet delivered to everyone
            let s = Instant::now();
            tokio::time::sleep(Duration::from_millis(1)).await;
            stalled += s.elapsed();
            continue;
        }
        let stamp = base.elapsed().as_nanos() as u64;
        text.clear();
        use std::fmt::Write;
        let _ = write!(text, "r{sent} {stamp} ");
        while text.len() < a.size {
            text.push('x');
        }
        if let Err(e) = sink.send(Message::Text(frame(a.socketio, &text))).await {
            err = Some(format!("publisher send: {e}"));
            break;
        }
        if stamp >= from_ns {
            sent_in_window += 1;
        }
        sent += 1;
    }
    // drain: wait until everything sent arrived, at most `--drain` seconds (the rest is `missing`)
    let expected = sent_in_window * receivers;
    let drain_start = Instant::now();
    let mut last_seen = board.delivered.load(Ordering::Relaxed);
    let mut quiet = Instant::now();
    while board.delivered.load(Ordering::Relaxed) < sent * receivers
        && drain_start.elapsed() < Duration::from_secs_f64(a.drain)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let d = board.delivered.load(Ordering::Relaxed);
        if d != last_seen {
            last_seen = d;
            quiet = Instant::now();
        } else if quiet.elapsed() > Duration::from_secs(2) {
            break; // nothing arrives any more
        }
    }
    let (total, hist, last_ns) = stop_receivers(&board, tasks).await;
    let _ = sink.close().await;
    let span_s = (last_ns.max(to_ns) - from_ns) as f64 / 1e9;
    if let Some(e) = err {
        errors.push(e);
    }
    json!({
        "workload": "fanout", "clients": a.clients, "receivers": receivers, "size": a.size, "seconds": a.seconds,
        "rate": a.rate, "window": a.window, "published": sent, "published_in_window": sent_in_window,
        "publish_rate": sent_in_window as f64 / a.seconds,
        "deliveries": total, "expected_deliveries": expected, "missing": expected.saturating_sub(total), "drain_seconds": a.drain,
        "deliveries_per_sec": total as f64 / span_s, "span_seconds": span_s,
        "publisher_stalled_seconds": stalled.as_secs_f64(), "connect_seconds": connect_s,
        "latency_us": hist_json(&hist), "errors": errors.json(),
    })
}

// ---------------------------------------------------------------- broadcast

async fn run_broadcast(a: Args) -> Value {
    let (t, tp) = match (Target::new(&a.url, &a), Target::new(&a.pub_url, &a)) {
        (Ok(t), Ok(tp)) => (Arc::new(Target { structured: a.structured, ..t }), tp),
        (Err(e), _) | (_, Err(e)) => return json!({"error": e}),
    };
    let board = new_board(a.triggers);
    let errors = ErrorLog::new();
    let win = Arc::new(std::sync::Mutex::new(None));
    let (tasks, connect_s) = connect_receivers(&a, &t, &board, &win, &errors).await;
    let mut sink = match publisher(&tp).await {
        Ok(s) => s,
        Err(e) => {
            stop_receivers(&board, tasks).await;
            return json!({"error": e, "errors": errors.json()});
        }
    };
    let receivers = (a.clients - errors.count.load(Ordering::Relaxed).min(a.clients)) as u64;
    let base = Instant::now();
    *win.lock().unwrap() = Some(Window { base, from_ns: 0, to_ns: u64::MAX });
    tokio::time::sleep(Duration::from_secs_f64(a.warmup)).await;
    let mut last_hist = new_hist();
    let mut incomplete = 0u64;
    let mut text = String::with_capacity(a.size + 32);
    for seq in 0..a.triggers {
        let stamp = base.elapsed().as_nanos() as u64;
        text.clear();
        use std::fmt::Write;
        let _ = write!(text, "b{seq} {stamp} ");
        while text.len() < a.size {
            text.push('x');
        }
        if let Err(e) = sink.send(Message::Text(frame(a.socketio, &text))).await {
            errors.push(format!("publisher send: {e}"));
            break;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while board.got[seq].load(Ordering::Relaxed) < receivers && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        if board.got[seq].load(Ordering::Relaxed) < receivers {
            incomplete += 1;
        } else {
            let _ = last_hist.record(board.max_lat[seq].load(Ordering::Relaxed).max(1));
        }
        tokio::time::sleep(Duration::from_millis(a.gap_ms)).await;
    }
    let (total, hist, _) = stop_receivers(&board, tasks).await;
    let _ = sink.close().await;
    json!({
        "workload": "broadcast", "clients": a.clients, "receivers": receivers, "size": a.size,
        "triggers": a.triggers, "incomplete_triggers": incomplete,
        "deliveries": total, "expected_deliveries": receivers * a.triggers as u64,
        "last_delivery_us": hist_json(&last_hist), "latency_us": hist_json(&hist),
        "connect_seconds": connect_s, "errors": errors.json(),
    })
}

// ---------------------------------------------------------------- idle

async fn hold(mut ws: Ws, socketio: bool, stop: Arc<tokio::sync::Notify>) {
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = stop.notified() => break,
        };
        match msg {
            Some(Ok(Message::Text(t))) if socketio && t.as_str() == "2" => {
                if ws.send(Message::text("3")).await.is_err() {
                    break;
                }
            }
            Some(Ok(_)) => {}
            _ => break,
        }
    }
}

async fn run_idle(a: Args) -> Value {
    let t = match Target::new(&a.url, &a) {
        Ok(t) => Arc::new(t),
        Err(e) => return json!({"error": e}),
    };
    let errors = ErrorLog::new();
    let stop = Arc::new(tokio::sync::Notify::new());
    let next = Arc::new(AtomicUsize::new(0));
    let open_count = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..a.concurrency.min(a.clients.max(1)) {
        let (t, next, errors, stop, open_count, n) =
            (t.clone(), next.clone(), errors.clone(), stop.clone(), open_count.clone(), a.clients);
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                match open_timed(&t, i).await {
                    Ok(ws) => {
                        open_count.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(hold(ws, t.socketio, stop.clone()));
                    }
                    Err(e) => errors.push(e),
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let connect_s = t0.elapsed().as_secs_f64();
    let opened = open_count.load(Ordering::Relaxed);
    println!("{}", json!({"event": "ready", "open": opened, "connect_seconds": connect_s}));
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
    stop.notify_waiters();
    json!({
        "workload": "idle", "clients": a.clients, "open": opened, "sources": a.sources,
        "connect_seconds": connect_s, "hold_seconds": a.hold, "errors": errors.json(),
    })
}

// ---------------------------------------------------------------- connect storm

async fn run_connect(a: Args) -> Value {
    let t = match Target::new(&a.url, &a) {
        Ok(t) => Arc::new(t),
        Err(e) => return json!({"error": e}),
    };
    let errors = ErrorLog::new();
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..a.concurrency.min(a.clients.max(1)) {
        let (t, next, errors, n) = (t.clone(), next.clone(), errors.clone(), a.clients);
        workers.push(tokio::spawn(async move {
            let mut kept = Vec::new();
            let mut hist = new_hist();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let s = Instant::now();
                match open_timed(&t, i).await {
                    Ok(ws) => {
                        let _ = hist.record((s.elapsed().as_micros() as u64).max(1));
                        kept.push(ws); // held until the storm is over
                    }
                    Err(e) => errors.push(e),
                }
            }
            (kept, hist)
        }));
    }
    let mut hist = new_hist();
    let mut all = Vec::new();
    for w in workers {
        if let Ok((kept, h)) = w.await {
            let _ = hist.add(&h);
            all.push(kept);
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let ok = hist.len();
    drop(all);
    json!({
        "workload": "connect", "clients": a.clients, "concurrency": a.concurrency, "connected": ok,
        "seconds": elapsed, "connects_per_sec": ok as f64 / elapsed,
        "latency_us": hist_json(&hist), "errors": errors.json(),
    })
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("cluster-fanout") {
        return fanout::main();
    }
    if std::env::args().nth(1).as_deref() == Some("storm") {
        return storm::main();
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = if args.threads > 1 {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    }
    .expect("runtime");
    let a = args.clone();
    let mut result = rt.block_on(async move {
        match a.workload.as_str() {
            "echo" => run_echo(a).await,
            "fanout" => run_fanout(a).await,
            "broadcast" => run_broadcast(a).await,
            "idle" => run_idle(a).await,
            "connect" => run_connect(a).await,
            other => json!({"error": format!("unknown workload {other}\n{USAGE}")}),
        }
    });
    result["protocol"] = json!(if args.socketio {
        "socketio"
    } else if args.structured {
        "pystrands1"
    } else {
        "plain"
    });
    result["threads"] = json!(args.threads);
    println!("{result}");
    // Don't wait for the runtime to close thousands of sockets one by one.
    std::process::exit(0);
}
