//! Load generator for the benchmarks: opens N WebSocket connections to a URL and runs a workload
//! for a fixed time, recording throughput and an HdrHistogram of latencies; prints one JSON
//! object. Cheap per message so that the server, not the generator, is what gets measured.
//!
//! Workloads:
//! * `echo`: every client sends a message and waits for the next message it receives (its echo)
//!   before sending again (ping-pong); latency = round trip.
//!
//! * `fanout`: room fan-out through one broker or a cluster (see [`fanout`]).
//!
//! Usage: `pystrands-loadgen echo --url ws://127.0.0.1:8080/bench --clients 100 --seconds 10 --size 64`

mod fanout;

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

struct Args {
    workload: String,
    url: String,
    clients: usize,
    seconds: f64,
    warmup: f64,
    size: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let workload = it.next().ok_or("usage: pystrands-loadgen echo --url URL [--clients N] [--seconds S] [--warmup S] [--size BYTES]")?;
    let mut a = Args { workload, url: String::new(), clients: 100, seconds: 10.0, warmup: 1.0, size: 64 };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = format!("bad value for {flag}: {value}");
        match flag.as_str() {
            "--url" => a.url = value.clone(),
            "--clients" => a.clients = value.parse().map_err(|_| bad.clone())?,
            "--seconds" => a.seconds = value.parse().map_err(|_| bad.clone())?,
            "--warmup" => a.warmup = value.parse().map_err(|_| bad.clone())?,
            "--size" => a.size = value.parse().map_err(|_| bad.clone())?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.url.is_empty() {
        return Err("--url is required".into());
    }
    Ok(a)
}

async fn connect(url: &str) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, String> {
    let rest = url.strip_prefix("ws://").ok_or("only ws:// URLs")?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let stream = tokio::net::TcpStream::connect(hostport).await.map_err(|e| format!("connect {hostport}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await.map_err(|e| format!("handshake: {e}"))?;
    Ok(ws)
}

/// One ping-pong client; returns (round trips counted, latency histogram in microseconds).
async fn echo_client(url: String, payload: String, warmup_end: Instant, end: Instant) -> Result<(u64, Histogram<u64>), String> {
    let mut ws = connect(&url).await?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let mut count = 0u64;
    loop {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        ws.send(Message::text(payload.clone())).await.map_err(|e| format!("send: {e}"))?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Text(_)))) | Ok(Some(Ok(Message::Binary(_)))) => break,
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => return Err(format!("recv: {e}")),
                Ok(None) => return Err("server closed the connection".into()),
                Err(_) => return Err("no echo within 10 s".into()),
            }
        }
        let now = Instant::now();
        if sent >= warmup_end {
            count += 1;
            let _ = hist.record((now - sent).as_micros().max(1) as u64);
        }
    }
    let _ = ws.close(None).await;
    Ok((count, hist))
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("fanout") {
        return fanout::main();
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let result = rt.block_on(async {
        match args.workload.as_str() {
            "echo" => {
                let start = Instant::now();
                let warmup_end = start + Duration::from_secs_f64(args.warmup);
                let end = warmup_end + Duration::from_secs_f64(args.seconds);
                let payload: String = "x".repeat(args.size);
                let mut tasks = Vec::new();
                for _ in 0..args.clients {
                    tasks.push(tokio::spawn(echo_client(args.url.clone(), payload.clone(), warmup_end, end)));
                }
                let mut total = 0u64;
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
                let mut errors = Vec::new();
                for t in tasks {
                    match t.await {
                        Ok(Ok((n, h))) => {
                            total += n;
                            let _ = hist.add(&h);
                        }
                        Ok(Err(e)) => errors.push(e),
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                errors.truncate(5);
                serde_json::json!({
                    "workload": "echo",
                    "clients": args.clients,
                    "size": args.size,
                    "seconds": args.seconds,
                    "messages": total,
                    "msgs_per_sec": total as f64 / args.seconds,
                    "latency_us": {
                        "p50": hist.value_at_quantile(0.5),
                        "p99": hist.value_at_quantile(0.99),
                        "p999": hist.value_at_quantile(0.999),
                        "max": hist.max(),
                    },
                    "errors": errors,
                })
            }
            other => serde_json::json!({"error": format!("unknown workload {other}")}),
        }
    });
    println!("{result}");
}
