//! The ceiling of the benchmarks: a bare tokio + tungstenite WebSocket server with no rooms
//! protocol, no backend and no Python, doing what the systems under test do for the load
//! generator's message convention: `e…` echoed to the sender, `r…` sent to every client
//! connected on a path other than `/pub` (the one room), `b…` sent to every client.
//! Every connection is accepted at once.
//!
//! One task owns each socket and is fed by a bounded channel (a full channel drops the message
//! and counts it, like a broker's drop policy); fan-out clones the message (shared bytes).
//!
//! Usage: `bench-ceiling --port PORT [--host 127.0.0.1] [--threads N]` — prints `listening
//! HOST:PORT` and runs until killed.

use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

#[derive(Default)]
struct Hub {
    next_id: AtomicU64,
    /// id -> (in the room?, sender)
    clients: Mutex<HashMap<u64, (bool, mpsc::Sender<Message>)>>,
    dropped: AtomicU64,
}

impl Hub {
    fn send_all(&self, msg: &Message, room_only: bool) {
        let clients = self.clients.lock().unwrap();
        for (in_room, tx) in clients.values() {
            if (!room_only || *in_room) && tx.try_send(msg.clone()).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[allow(clippy::result_large_err)] // the handshake callback's signature is tungstenite's
async fn serve(stream: TcpStream, hub: Arc<Hub>) {
    let _ = stream.set_nodelay(true);
    let mut path = String::new();
    // small read buffer (idle memory); an 8 KiB write buffer so a fed batch goes out in few writes
    let cfg = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(8 * 1024);
    let callback = |req: &Request, resp: Response| {
        path = req.uri().path().to_string();
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(cfg)).await else {
        return;
    };
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Message>(1024);
    hub.clients.lock().unwrap().insert(id, (path != "/pub", tx));
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(msg @ Message::Text(_))) => {
                    let kind = msg.to_text().ok().and_then(|t| t.bytes().next());
                    match kind {
                        Some(b'r') => hub.send_all(&msg, true),
                        Some(b'b') => hub.send_all(&msg, false),
                        _ => {
                            if ws.send(msg).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            out = rx.recv() => {
                let Some(out) = out else { break };
                // feed everything queued, flush once
                if ws.feed(out).await.is_err() {
                    break;
                }
                let mut ok = true;
                while let Ok(more) = rx.try_recv() {
                    if ws.feed(more).await.is_err() {
                        ok = false;
                        break;
                    }
                }
                if !ok || ws.flush().await.is_err() {
                    break;
                }
            }
        }
    }
    hub.clients.lock().unwrap().remove(&id);
}

fn main() {
    let mut host = "127.0.0.1".to_string();
    let mut port: u16 = 0;
    let mut threads: usize = 0;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_default();
        match flag.as_str() {
            "--host" => host = v,
            "--port" => port = v.parse().expect("--port"),
            "--threads" => threads = v.parse().expect("--threads"),
            _ => {
                eprintln!("usage: bench-ceiling --port PORT [--host H] [--threads N]");
                std::process::exit(2);
            }
        }
    }
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        b.worker_threads(threads);
    }
    let rt = b.enable_all().build().expect("runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind((host.as_str(), port)).await.expect("bind");
        println!("listening {}", listener.local_addr().unwrap());
        let hub = Arc::new(Hub::default());
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream, hub.clone()));
                }
                Err(e) => {
                    // e.g. out of file descriptors: wait a little instead of spinning
                    eprintln!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    });
}
