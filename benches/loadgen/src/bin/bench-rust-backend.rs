//! A PyStrands backend written in Rust (wire protocol v1), for the benchmarks: it isolates the
//! broker from Python. Accepts every connection (room = the request path without `/`), and
//! handles the load generator's message convention: `e…` → `message_to_connection` back to the
//! sender, `r…` → `message_to_room` `bench`, `b…` → `broadcast`. Writes are batched: one flush
//! per burst of lines read.
//!
//! Usage: `bench-rust-backend --port TCP_PORT [--host 127.0.0.1]` — runs until the broker closes
//! the connection or it is killed.

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;

fn main() {
    let mut host = "127.0.0.1".to_string();
    let mut port: u16 = 8081;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_default();
        match flag.as_str() {
            "--host" => host = v,
            "--port" => port = v.parse().expect("--port"),
            _ => {
                eprintln!("usage: bench-rust-backend --port TCP_PORT [--host H]");
                std::process::exit(2);
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let stream = TcpStream::connect((host.as_str(), port)).await.expect("connect to the broker");
        stream.set_nodelay(true).ok();
        let (r, w) = stream.into_split();
        let mut reader = BufReader::with_capacity(256 * 1024, r);
        let mut writer = BufWriter::with_capacity(256 * 1024, w);
        let mut line = String::new();
        let mut accepted = 0u64;
        loop {
            line.clear();
            match reader.read_line(&mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
            let params = &v["params"];
            let out = match v["action"].as_str() {
                Some("connection_request") => {
                    accepted += 1;
                    let url = params["url"].as_str().unwrap_or("/");
                    let room = url.split('?').next().unwrap_or("").trim_matches('/');
                    Some(json!({"request_id": v["request_id"], "action": "response",
                        "params": {"accepted": true, "client_id": format!("c{accepted}"), "room_id": room, "metadata": {}}}))
                }
                Some("new_message") => {
                    let msg = &params["message"];
                    match msg.as_str().and_then(|m| m.bytes().next()) {
                        Some(b'r') => Some(json!({"request_id": "", "action": "message_to_room", "params": {"room_id": "bench", "message": msg}})),
                        Some(b'b') => Some(json!({"request_id": "", "action": "broadcast", "params": {"message": msg}})),
                        _ => Some(json!({"request_id": "", "action": "message_to_connection",
                            "params": {"conn_id": params["context"]["client_id"], "message": msg}})),
                    }
                }
                _ => None,
            };
            if let Some(out) = out {
                let mut bytes = serde_json::to_vec(&out).expect("json");
                bytes.push(b'\n');
                if writer.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            if reader.buffer().is_empty() && writer.flush().await.is_err() {
                break;
            }
        }
    });
}
