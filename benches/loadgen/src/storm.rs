//! `storm` workload: a reconnect storm with recovery (issue 17), against our broker
//! (`pystrands.1`, one node or a cluster) or Centrifuge (its JSON protocol, channel history and
//! recovery on; benches/peers/centrifuge).
//!
//! 1. Our broker: the tool is also the backend. It connects one v2 backend (hello with feature
//!    `history`, acks, heartbeat replies) to every broker in `--backends`, accepts every
//!    connection request into room `--room` with the client id the URL's `cid=` names, and
//!    publishes with `message_to_room`. Centrifuge: a control connection to the first URL
//!    publishes through the peer's `publish` RPC (into the channel's history).
//! 2. Setup: a first message (so the room's stream exists, also in Redis), then `--clients`
//!    structured clients, spread round-robin over `--urls` (`--concurrency` handshakes at a
//!    time). Ours: `Sec-WebSocket-Protocol: pystrands.1`, `{"t":"connect"}`, `welcome` (its
//!    session is kept). Centrifuge: connect + subscribe to the channel in one frame. Once every
//!    client is in, a probe message is published; each client records the probe's offset and
//!    epoch (its position), and closes. The tool waits until the backends saw every
//!    `disconnected` (Centrifuge: 2 s).
//! 3. `--missed` messages (`m0`, `m1`, …) are published while nobody is connected; the tool
//!    waits until the history holds them (`room_history`; Centrifuge: the publish RPC answers
//!    after the history write), prints `{"event":"published",…}` and, with `--wait-go`, waits for
//!    a line on stdin (the driver samples CPU and Redis counters meanwhile).
//! 4. The storm: every client reconnects at once (at most `--concurrency` TCP + WebSocket
//!    handshakes in flight; with `--shift K` client i goes to URL (i + K) mod n, i.e. another
//!    node), with its session and, with `--recover true`, its position (Centrifuge: subscribe with
//!    `recover`, `offset`, `epoch`). A client is done when it has its `welcome` and, recovering,
//!    `recovered: true` and all `--missed` messages with exactly the offsets after its position,
//!    in order, the same epoch and the right data (Centrifuge: the subscribe reply with
//!    `recovered` and its publications); without `--recover`, when the welcome (subscribe reply)
//!    names the room's current offset. Anything else is an error, counted and sampled.
//!
//! The checks cost the tool little (it shares the machine with the server): our replayed frames
//! are compared with the exact expected bytes (decoded and checked field by field only when they
//! differ), Centrifuge's replies are decoded into borrowed, typed fields.
//!
//! Source addresses: the setup's clients connect from 127.0.0.(B + i mod K), the storm's from
//! 127.0.0.(B + K + i mod K) (`--source-base B`, `--sources K`), so no reconnect lands on a
//! 4-tuple the setup's closes left in TIME_WAIT (which costs a 1 s SYN retransmit); a driver that
//! runs storms back to back moves B on.
//!
//! Prints one JSON object (the last line): the storm's duration (until the last client is done),
//! per-client welcome and done times (µs after the storm's start), and the checks' counts.
//!
//! Usage: `pystrands-loadgen storm --system pystrands --urls ws://h:p/storm,... --backends h:p,...
//! --clients 10000 --missed 50 --recover true [--concurrency 500] [--sources 1] [--source-base 1]
//! [--shift 1] [--wait-go] [--room storm] [--timeout 120]`; Centrifuge: `--system centrifuge
//! --urls ws://h:p/connection/websocket,...` (no `--backends`).

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

/// The broker's ping frame (a structured client gets one every ping interval).
const PING: &str = r#"{"t":"ping"}"#;

/// How long one client waits for its next frame before it counts as an error.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq)]
enum System {
    Pystrands,
    Centrifuge,
}

struct Args {
    system: System,
    urls: Vec<String>,
    backends: Vec<String>,
    clients: usize,
    missed: u64,
    recover: bool,
    concurrency: usize,
    sources: usize,
    source_base: usize,
    shift: usize,
    room: String,
    wait_go: bool,
    timeout: f64,
}

impl Args {
    /// The last byte of client `i`'s source address: the setup and the storm use disjoint
    /// addresses, so no reconnect lands on a 4-tuple the setup's closes left in TIME_WAIT.
    fn source(&self, storm: bool, i: usize) -> u8 {
        (self.source_base + if storm { self.sources } else { 0 } + i % self.sources) as u8
    }
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(2);
    let mut a = Args {
        system: System::Pystrands,
        urls: vec![],
        backends: vec![],
        clients: 1000,
        missed: 50,
        recover: true,
        concurrency: 500,
        sources: 1,
        source_base: 1,
        shift: 0,
        room: "storm".into(),
        wait_go: false,
        timeout: 120.0,
    };
    while let Some(flag) = it.next() {
        if flag == "--wait-go" {
            a.wait_go = true;
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = || format!("bad value for {flag}: {value}");
        match flag.as_str() {
            "--system" => {
                a.system = match value.as_str() {
                    "pystrands" => System::Pystrands,
                    "centrifuge" => System::Centrifuge,
                    _ => return Err(bad()),
                }
            }
            "--urls" => a.urls = value.split(',').map(str::to_string).collect(),
            "--backends" => a.backends = value.split(',').map(str::to_string).collect(),
            "--clients" => a.clients = value.parse().map_err(|_| bad())?,
            "--missed" => a.missed = value.parse().map_err(|_| bad())?,
            "--recover" => a.recover = value.parse().map_err(|_| bad())?,
            "--concurrency" => a.concurrency = value.parse().map_err(|_| bad())?,
            "--sources" => a.sources = value.parse().map_err(|_| bad())?,
            "--source-base" => a.source_base = value.parse().map_err(|_| bad())?,
            "--shift" => a.shift = value.parse().map_err(|_| bad())?,
            "--room" => a.room = value.clone(),
            "--timeout" => a.timeout = value.parse().map_err(|_| bad())?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.urls.is_empty() {
        return Err("--urls is required".into());
    }
    if a.system == System::Pystrands && a.backends.len() != a.urls.len() {
        return Err("--system pystrands needs one --backends address per --urls entry".into());
    }
    if a.clients == 0
        || a.concurrency == 0
        || a.sources == 0
        || a.source_base == 0
        || a.source_base + 2 * a.sources > 255
    {
        return Err(
            "--clients, --concurrency, --sources and --source-base must be >= 1, --source-base + 2 x --sources <= 255"
                .into(),
        );
    }
    Ok(a)
}

pub fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let result = rt.block_on(run(args));
    println!("{result}");
    // Don't wait for the runtime to close thousands of sockets one by one.
    std::process::exit(0);
}

// ---------------------------------------------------------------- connections

/// Opens a WebSocket to `url` from source address 127.0.0.`src` (any when `None`); with
/// `subprotocol`, asks for it (and tungstenite checks the answer names it).
async fn open(url: &str, src: Option<u8>, subprotocol: Option<&str>) -> Result<Ws, String> {
    let rest = url.strip_prefix("ws://").ok_or("only ws:// URLs")?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let addr: SocketAddr =
        hostport.parse().map_err(|_| format!("need a numeric ip:port in the URL, got {hostport}"))?;
    let sock = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    if let Some(src) = src {
        let src = Ipv4Addr::new(127, 0, 0, src);
        sock.bind(SocketAddr::new(IpAddr::V4(src), 0)).map_err(|e| format!("bind {src}: {e}"))?;
    }
    let stream = sock.connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut req = url.into_client_request().map_err(|e| format!("request: {e}"))?;
    if let Some(p) = subprotocol {
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).map_err(|e| e.to_string())?);
    }
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(super::ws_config()))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    Ok(ws)
}

async fn open_timed(url: &str, src: Option<u8>, subprotocol: Option<&str>) -> Result<Ws, String> {
    match tokio::time::timeout(FRAME_TIMEOUT, open(url, src, subprotocol)).await {
        Ok(r) => r,
        Err(_) => Err("no handshake within 30 s".into()),
    }
}

/// The next text frame.
async fn next_text(ws: &mut Ws) -> Result<Utf8Bytes, String> {
    loop {
        match tokio::time::timeout(FRAME_TIMEOUT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Ok(t),
            Ok(Some(Ok(Message::Close(c)))) => return Err(format!("server closed: {c:?}")),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(format!("recv: {e}")),
            Ok(None) => return Err("server closed the connection".into()),
            Err(_) => return Err("nothing received within 30 s".into()),
        }
    }
}

/// Our next frame that is not a `ping`, as text.
async fn next_frame_text(ws: &mut Ws) -> Result<Utf8Bytes, String> {
    loop {
        let text = next_text(ws).await?;
        if text.as_str() != PING {
            return Ok(text);
        }
    }
}

/// Our next frame that is not a `ping`, decoded.
async fn next_frame(ws: &mut Ws) -> Result<Value, String> {
    loop {
        let text = next_text(ws).await?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("not JSON ({e}): {:.80}", text.as_str()))?;
        if v["t"] != "ping" {
            return Ok(v);
        }
    }
}

/// Centrifuge's next reply or push (one frame may hold several, one per line).
struct Lines {
    pending: std::collections::VecDeque<Value>,
}

impl Lines {
    fn new() -> Self {
        Lines { pending: Default::default() }
    }

    async fn next(&mut self, ws: &mut Ws) -> Result<Value, String> {
        loop {
            if let Some(v) = self.pending.pop_front() {
                return Ok(v);
            }
            let text = next_text(ws).await?;
            for line in text.as_str().split('\n').filter(|l| !l.trim().is_empty()) {
                let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e}): {line:.80}"))?;
                self.pending.push_back(v);
            }
        }
    }

    /// The reply with this id (skipping pushes and other replies).
    async fn reply(&mut self, ws: &mut Ws, id: u64) -> Result<Value, String> {
        loop {
            let v = self.next(ws).await?;
            if v["id"].as_u64() == Some(id) {
                if !v["error"].is_null() {
                    return Err(format!("centrifuge error: {}", v["error"]));
                }
                return Ok(v["result"].clone());
            }
        }
    }
}

// ---------------------------------------------------------------- our backend

/// One v2 backend connection: accepts connection requests, counts events, acks, answers
/// heartbeats and routes query replies.
struct Backend {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>,
    next_query: AtomicU64,
}

struct Events {
    connected: AtomicUsize,
    disconnected: AtomicUsize,
    progress: Notify,
}

fn line(request_id: &str, action: &str, params: Value) -> Vec<u8> {
    let mut l = json!({"request_id": request_id, "action": action, "params": params}).to_string().into_bytes();
    l.push(b'\n');
    l
}

impl Backend {
    async fn connect(addr: &str, room: &str, events: Arc<Events>) -> Result<Backend, String> {
        let stream = TcpStream::connect(addr).await.map_err(|e| format!("backend connect {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (rd, wr) = stream.into_split();
        let mut lines = BufReader::with_capacity(256 * 1024, rd).lines();
        let mut wr = BufWriter::with_capacity(64 * 1024, wr);
        let hello = json!({"version": 2, "features": ["ack", "heartbeat", "history"], "client": "pystrands-loadgen"});
        wr.write_all(&line("hello", "hello", hello)).await.map_err(|e| e.to_string())?;
        wr.flush().await.map_err(|e| e.to_string())?;
        let answer = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .map_err(|_| "no hello answer within 10 s".to_string())?
            .map_err(|e| e.to_string())?
            .ok_or("broker closed the backend connection")?;
        let v: Value = serde_json::from_str(&answer).map_err(|e| e.to_string())?;
        let p = &v["params"];
        if p["ok"] != true || !p["features"].as_array().is_some_and(|f| f.iter().any(|x| x == "history")) {
            return Err(format!("hello refused or no feature 'history': {answer:.200}"));
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            while let Some(l) = rx.recv().await {
                if wr.write_all(&l).await.is_err() {
                    return;
                }
                while let Ok(more) = rx.try_recv() {
                    if wr.write_all(&more).await.is_err() {
                        return;
                    }
                }
                if wr.flush().await.is_err() {
                    return;
                }
            }
        });
        let pending: Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>> = Arc::default();
        let (answers, replies, room) = (tx.clone(), pending.clone(), room.to_string());
        tokio::spawn(async move {
            let (mut seen, mut acked) = (0u64, 0u64);
            while let Ok(Some(l)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<Value>(&l) else { continue };
                if let Some(seq) = v["seq"].as_u64() {
                    seen = seen.max(seq);
                }
                let rid = v["request_id"].as_str().unwrap_or_default();
                match v["action"].as_str().unwrap_or_default() {
                    "connection_request" => {
                        let query = v["params"]["query"].as_str().unwrap_or_default();
                        let cid = query.split('&').find_map(|kv| kv.strip_prefix("cid=")).unwrap_or_default();
                        let params = json!({"accepted": true, "client_id": cid, "room_id": room});
                        let _ = answers.send(line(rid, "response", params));
                    }
                    "new_connection" => {
                        events.connected.fetch_add(1, Relaxed);
                    }
                    "disconnected" => {
                        events.disconnected.fetch_add(1, Relaxed);
                        events.progress.notify_waiters();
                    }
                    "heartbeat" => {
                        let _ = answers.send(line("heartbeat", "heartbeat", json!({})));
                    }
                    "reply" => {
                        if let Some(w) = replies.lock().unwrap().remove(rid) {
                            let _ = w.send(v["params"].clone());
                        }
                    }
                    _ => {}
                }
                // One cumulative ack per batch of lines read.
                if seen > acked && lines.get_ref().buffer().is_empty() {
                    acked = seen;
                    let _ = answers.send(line("ack", "ack", json!({"seq": seen})));
                }
            }
        });
        Ok(Backend { tx, pending, next_query: AtomicU64::new(0) })
    }

    fn to_room(&self, room: &str, message: &str) {
        let _ = self.tx.send(line("p", "message_to_room", json!({"room_id": room, "message": message})));
    }

    /// The room's last offset and epoch (`room_history` with `limit` 1).
    async fn position(&self, room: &str) -> Result<(u64, String), String> {
        let rid = format!("q{}", self.next_query.fetch_add(1, Relaxed));
        let (w, r) = oneshot::channel();
        self.pending.lock().unwrap().insert(rid.clone(), w);
        let _ = self.tx.send(line(&rid, "room_history", json!({"room_id": room, "since": u64::MAX >> 12, "limit": 1})));
        let p = tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .map_err(|_| "no room_history reply within 10 s".to_string())?
            .map_err(|_| "backend connection lost".to_string())?;
        if let Some(e) = p["error"].as_str() {
            return Err(format!("room_history: {e}"));
        }
        Ok((p["offset"].as_u64().unwrap_or(0), p["epoch"].as_str().unwrap_or_default().to_string()))
    }

    /// Waits until the room's last offset is at least `want`.
    async fn wait_offset(&self, room: &str, want: u64) -> Result<(u64, String), String> {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let (o, e) = self.position(room).await?;
            if o >= want {
                return Ok((o, e));
            }
            if Instant::now() > end {
                return Err(format!("the room's history reached offset {o}, not {want}, within 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

// ---------------------------------------------------------------- Centrifuge control

struct Control {
    ws: Ws,
    lines: Lines,
    next_id: u64,
}

impl Control {
    async fn connect(url: &str) -> Result<Control, String> {
        let mut ws = open_timed(url, None, None).await.map_err(|e| format!("control: {e}"))?;
        ws.send(Message::text(r#"{"id":1,"params":{}}"#)).await.map_err(|e| e.to_string())?;
        let mut lines = Lines::new();
        lines.reply(&mut ws, 1).await?;
        Ok(Control { ws, lines, next_id: 1 })
    }

    /// Publishes `data` (a JSON string) into the channel; returns once the server answered (it
    /// answers after the history write).
    async fn publish(&mut self, channel: &str, data: &str) -> Result<(), String> {
        self.next_id += 1;
        let id = self.next_id;
        let cmd = json!({"id": id, "method": 9, "params": {"method": "publish", "data": {"ch": channel, "d": data}}});
        self.ws.send(Message::text(cmd.to_string())).await.map_err(|e| e.to_string())?;
        self.lines.reply(&mut self.ws, id).await.map(|_| ())
    }
}

// ---------------------------------------------------------------- clients

/// What a client keeps between its two connections.
#[derive(Clone, Default)]
struct Kept {
    session: String,
    offset: u64,
    epoch: String,
}

struct Setup {
    welcomed: AtomicUsize,
    failed: AtomicUsize,
}

fn cid_url(base: &str, i: usize) -> String {
    format!("{base}{}cid=c{i}", if base.contains('?') { '&' } else { '?' })
}

/// Setup of one client: in, position from the probe, out.
async fn setup_client(a: Arc<Args>, i: usize, sem: Arc<Semaphore>, st: Arc<Setup>) -> Result<Kept, String> {
    let url = &a.urls[i % a.urls.len()];
    let permit = sem.acquire().await.map_err(|e| e.to_string())?;
    let src = Some(a.source(false, i));
    let opened = match a.system {
        System::Pystrands => open_timed(&cid_url(url, i), src, Some("pystrands.1")).await,
        System::Centrifuge => open_timed(url, src, None).await,
    };
    let mut ws = match opened {
        Ok(ws) => ws,
        Err(e) => {
            st.failed.fetch_add(1, Relaxed);
            return Err(e);
        }
    };
    let mut kept = Kept::default();
    let mut lines = Lines::new();
    let welcomed: Result<(), String> = async {
        match a.system {
            System::Pystrands => {
                ws.send(Message::text(r#"{"t":"connect"}"#)).await.map_err(|e| e.to_string())?;
                let w = next_frame(&mut ws).await?;
                if w["t"] != "welcome" {
                    return Err(format!("expected welcome, got {w:.120}"));
                }
                kept.session = w["session"].as_str().unwrap_or_default().to_string();
            }
            System::Centrifuge => {
                let sub = json!({"id": 2, "method": 1, "params": {"channel": a.room}});
                ws.send(Message::text(format!("{}\n{sub}", r#"{"id":1,"params":{}}"#)))
                    .await
                    .map_err(|e| e.to_string())?;
                lines.reply(&mut ws, 1).await?;
                let r = lines.reply(&mut ws, 2).await?;
                if r["recoverable"] != true {
                    return Err(format!("subscription is not recoverable: {r:.160}"));
                }
                kept.epoch = r["epoch"].as_str().unwrap_or_default().to_string();
            }
        }
        Ok(())
    }
    .await;
    drop(permit);
    if let Err(e) = welcomed {
        st.failed.fetch_add(1, Relaxed);
        return Err(e);
    }
    st.welcomed.fetch_add(1, Relaxed);
    // The probe: the client's position.
    loop {
        match a.system {
            System::Pystrands => {
                let f = next_frame(&mut ws).await?;
                if f["t"] == "msg" && f["data"] == "probe" {
                    kept.offset = f["offset"].as_u64().ok_or("probe without an offset")?;
                    kept.epoch = f["epoch"].as_str().ok_or("probe without an epoch")?.to_string();
                    break;
                }
            }
            System::Centrifuge => {
                let v = lines.next(&mut ws).await?;
                let p = &v["result"]["data"];
                if v["id"].is_null() && p["data"] == "probe" {
                    kept.offset = p["offset"].as_u64().ok_or("probe without an offset")?;
                    break;
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(None)).await;
    Ok(kept)
}

/// One client of the storm: returns (µs to its welcome, µs until done, replayed frames).
async fn storm_client(
    a: Arc<Args>,
    i: usize,
    kept: Kept,
    last: (u64, String),
    sem: Arc<Semaphore>,
    t0: Instant,
) -> Result<(u64, u64, u64, Ws), String> {
    let url = &a.urls[(i + a.shift) % a.urls.len()];
    let permit = sem.acquire().await.map_err(|e| e.to_string())?;
    let src = Some(a.source(true, i));
    let mut ws = match a.system {
        System::Pystrands => open_timed(&cid_url(url, i), src, Some("pystrands.1")).await?,
        System::Centrifuge => open_timed(url, src, None).await?,
    };
    drop(permit);
    let (last_offset, last_epoch) = last;
    let us = || t0.elapsed().as_micros() as u64;
    match a.system {
        System::Pystrands => {
            let mut connect = json!({"t": "connect", "session": kept.session});
            if a.recover {
                connect["positions"] = json!({&a.room: {"offset": kept.offset, "epoch": kept.epoch}});
            }
            ws.send(Message::text(connect.to_string())).await.map_err(|e| format!("send: {e}"))?;
            let w = next_frame(&mut ws).await?;
            let welcome_us = us();
            let room = &w["rooms"][&a.room];
            if w["t"] != "welcome" || room["offset"] != last_offset || room["epoch"] != last_epoch.as_str() {
                return Err(format!("bad welcome: {w:.300}"));
            }
            if !a.recover {
                if !w["recovered"].is_null() {
                    return Err(format!("welcome says recovered without positions: {w:.200}"));
                }
                return Ok((welcome_us, welcome_us, 0, ws));
            }
            if w["recovered"] != true || room["recovered"] != true {
                return Err(format!("not recovered: {w:.300}"));
            }
            // Each replayed frame is compared with the exact frame expected (cheap: the load
            // generator shares 2 cores with the broker); one that differs in bytes is decoded and
            // checked field by field (key order and spacing are not part of the protocol).
            let room_json = serde_json::to_string(&a.room).unwrap_or_default();
            let epoch_json = serde_json::to_string(&kept.epoch).unwrap_or_default();
            let mut expected = String::with_capacity(128);
            for k in 0..a.missed {
                let text = next_frame_text(&mut ws).await?;
                let want = kept.offset + 1 + k;
                expected.clear();
                use std::fmt::Write;
                let _ = write!(
                    expected,
                    r#"{{"t":"msg","room":{room_json},"offset":{want},"epoch":{epoch_json},"data":"m{k}"}}"#
                );
                if text.as_str() == expected {
                    continue;
                }
                let f: Value =
                    serde_json::from_str(&text).map_err(|e| format!("not JSON ({e}): {:.80}", text.as_str()))?;
                if f["t"] != "msg"
                    || f["room"] != a.room.as_str()
                    || f["offset"] != want
                    || f["epoch"] != kept.epoch.as_str()
                    || f["data"] != format!("m{k}").as_str()
                {
                    return Err(format!("replayed frame {k}: expected offset {want} data m{k}, got {f:.200}"));
                }
            }
            Ok((welcome_us, us(), a.missed, ws))
        }
        System::Centrifuge => {
            let mut params = json!({"channel": a.room});
            if a.recover {
                params["recover"] = json!(true);
                params["offset"] = json!(kept.offset);
                params["epoch"] = json!(kept.epoch);
            }
            let sub = json!({"id": 2, "method": 1, "params": params});
            ws.send(Message::text(format!("{}\n{sub}", r#"{"id":1,"params":{}}"#)))
                .await
                .map_err(|e| format!("send: {e}"))?;
            // The replies are decoded into borrowed, typed fields (cheap: the load generator
            // shares 2 cores with the server), as our frames are compared as bytes.
            let (mut welcome_us, mut reply) = (None, None);
            while reply.is_none() {
                let text = next_text(&mut ws).await?;
                for line in text.as_str().split('\n').filter(|l| !l.trim().is_empty()) {
                    let r: CfReply<'_> =
                        serde_json::from_str(line).map_err(|e| format!("bad reply ({e}): {line:.120}"))?;
                    if let Some(e) = r.error {
                        return Err(format!("centrifuge error: {}", e.get()));
                    }
                    match r.id {
                        Some(1) => welcome_us = Some(us()),
                        Some(2) => {
                            let res = r.result.ok_or("subscribe reply without a result")?;
                            reply = Some(check_centrifuge(&a, &kept, last_offset, &last_epoch, res)?);
                        }
                        _ => {}
                    }
                }
            }
            let done_us = us();
            let welcome_us = welcome_us.ok_or("no connect reply before the subscribe reply")?;
            let checked = reply.unwrap_or(0);
            Ok((welcome_us, done_us, checked, ws))
        }
    }
}

/// A Centrifuge reply, decoded with borrowed fields.
#[derive(Deserialize)]
struct CfReply<'a> {
    #[serde(default)]
    id: Option<u64>,
    #[serde(borrow, default)]
    result: Option<CfSubscribed<'a>>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

/// The subscribe result (any other result decodes to this too, with the defaults).
#[derive(Deserialize)]
struct CfSubscribed<'a> {
    #[serde(default)]
    recovered: bool,
    #[serde(default)]
    offset: u64,
    #[serde(borrow, default)]
    epoch: Option<&'a str>,
    #[serde(borrow, default)]
    publications: Vec<CfPublication<'a>>,
}

#[derive(Deserialize)]
struct CfPublication<'a> {
    #[serde(default)]
    offset: u64,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// Checks a storm client's subscribe reply; returns how many missed publications it checked.
fn check_centrifuge(
    a: &Args,
    kept: &Kept,
    last_offset: u64,
    last_epoch: &str,
    r: CfSubscribed<'_>,
) -> Result<u64, String> {
    if r.offset != last_offset || r.epoch != Some(last_epoch) {
        return Err(format!("bad subscribe reply: offset {} epoch {:?}", r.offset, r.epoch));
    }
    if !a.recover {
        return Ok(0);
    }
    if !r.recovered {
        return Err("not recovered".into());
    }
    if r.publications.len() as u64 != a.missed {
        return Err(format!("{} publications recovered, not {}", r.publications.len(), a.missed));
    }
    let mut want_data = String::with_capacity(16);
    for (k, p) in r.publications.iter().enumerate() {
        let want = kept.offset + 1 + k as u64;
        want_data.clear();
        use std::fmt::Write;
        let _ = write!(want_data, "\"m{k}\"");
        if p.offset != want || p.data.get() != want_data {
            return Err(format!(
                "recovered publication {k}: expected offset {want} data m{k}, got {} {}",
                p.offset,
                p.data.get()
            ));
        }
    }
    Ok(a.missed)
}

// ---------------------------------------------------------------- the run

/// Publishes `data` to the room: through our first backend, or Centrifuge's control connection.
async fn publish(backends: &[Backend], control: &mut Option<Control>, room: &str, data: &str) -> Result<(), String> {
    match (backends.first(), control.as_mut()) {
        (Some(be), _) => {
            be.to_room(room, data);
            Ok(())
        }
        (None, Some(c)) => c.publish(room, data).await,
        (None, None) => Err("nothing to publish with".to_string()),
    }
}

fn errors_json(errors: &[String]) -> Value {
    let mut samples: Vec<&String> = errors.iter().collect();
    samples.sort();
    samples.dedup();
    samples.truncate(5);
    json!({"count": errors.len(), "samples": samples})
}

async fn run(a: Args) -> Value {
    let a = Arc::new(a);
    let events =
        Arc::new(Events { connected: AtomicUsize::new(0), disconnected: AtomicUsize::new(0), progress: Notify::new() });
    // Publishing: our backend(s), or Centrifuge's control connection.
    let mut backends = Vec::new();
    let mut control = None;
    match a.system {
        System::Pystrands => {
            for b in &a.backends {
                match Backend::connect(b, &a.room, events.clone()).await {
                    Ok(be) => backends.push(be),
                    Err(e) => return json!({"error": e}),
                }
            }
            // Brokers register a backend asynchronously.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        System::Centrifuge => match Control::connect(&a.urls[0]).await {
            Ok(c) => control = Some(c),
            Err(e) => return json!({"error": e}),
        },
    }
    // A first message: the room's stream exists before anyone is in it.
    if let Err(e) = publish(&backends, &mut control, &a.room, "w").await {
        return json!({"error": e});
    }
    if let Some(be) = backends.first() {
        if let Err(e) = be.wait_offset(&a.room, 1).await {
            return json!({"error": e});
        }
    }

    // Setup: every client in, its position from the probe, out.
    let setup_t0 = Instant::now();
    let st = Arc::new(Setup { welcomed: AtomicUsize::new(0), failed: AtomicUsize::new(0) });
    let sem = Arc::new(Semaphore::new(a.concurrency));
    let tasks: Vec<_> =
        (0..a.clients).map(|i| tokio::spawn(setup_client(a.clone(), i, sem.clone(), st.clone()))).collect();
    let deadline = Instant::now() + Duration::from_secs_f64(a.timeout);
    while st.welcomed.load(Relaxed) + st.failed.load(Relaxed) < a.clients {
        if Instant::now() > deadline {
            return json!({"error": format!("setup: {} of {} clients in after {} s", st.welcomed.load(Relaxed), a.clients, a.timeout)});
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if st.failed.load(Relaxed) > 0 {
        let mut errors = Vec::new();
        for t in tasks {
            if let Ok(Err(e)) = t.await {
                errors.push(e);
            }
        }
        return json!({"error": "setup: clients failed", "errors": errors_json(&errors)});
    }
    // Every client is in (for a cluster: registered on its node; the probe reaches them through Redis).
    if let Err(e) = publish(&backends, &mut control, &a.room, "probe").await {
        return json!({"error": e});
    }
    let mut kept = Vec::with_capacity(a.clients);
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(k)) => kept.push(k),
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        return json!({"error": "setup: clients failed after the welcome", "errors": errors_json(&errors)});
    }
    // Everyone gone for the broker too: its backends saw every `disconnected`.
    match a.system {
        System::Pystrands => {
            let end = Instant::now() + Duration::from_secs(60);
            while events.disconnected.load(Relaxed) < a.clients {
                if Instant::now() > end {
                    return json!({"error": format!("only {} of {} disconnects reported", events.disconnected.load(Relaxed), a.clients)});
                }
                let _ = tokio::time::timeout(Duration::from_millis(50), events.progress.notified()).await;
            }
        }
        System::Centrifuge => tokio::time::sleep(Duration::from_secs(2)).await,
    }
    let setup_seconds = setup_t0.elapsed().as_secs_f64();

    // The messages everybody misses.
    let probe_offset = kept[0].offset;
    if kept.iter().any(|k| k.offset != probe_offset || k.epoch != kept[0].epoch) {
        return json!({"error": "clients saw the probe at different positions"});
    }
    for k in 0..a.missed {
        if let Err(e) = publish(&backends, &mut control, &a.room, &format!("m{k}")).await {
            return json!({"error": e});
        }
    }
    let last = match backends.first() {
        Some(be) => match be.wait_offset(&a.room, probe_offset + a.missed).await {
            Ok(p) => p,
            Err(e) => return json!({"error": e}),
        },
        None => (probe_offset + a.missed, kept[0].epoch.clone()),
    };
    if last.0 != probe_offset + a.missed {
        return json!({"error": format!("the room is at offset {}, expected {}", last.0, probe_offset + a.missed)});
    }
    println!("{}", json!({"event": "published", "offset": last.0, "epoch": last.1, "setup_seconds": setup_seconds}));
    use std::io::Write;
    let _ = std::io::stdout().flush();
    if a.wait_go {
        let _ = tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        })
        .await;
    }

    // The storm.
    let connected_before = events.connected.load(Relaxed);
    let t0 = Instant::now();
    let tasks: Vec<_> = kept
        .into_iter()
        .enumerate()
        .map(|(i, k)| tokio::spawn(storm_client(a.clone(), i, k, last.clone(), sem.clone(), t0)))
        .collect();
    let mut welcome = super::new_hist();
    let mut done = super::new_hist();
    let mut replayed = 0u64;
    let mut errors = Vec::new();
    let mut held = Vec::with_capacity(a.clients);
    for t in tasks {
        match t.await {
            Ok(Ok((w, d, r, ws))) => {
                let _ = welcome.record(w.max(1));
                let _ = done.record(d.max(1));
                replayed += r;
                held.push(ws);
            }
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let storm_seconds = if done.is_empty() { 0.0 } else { done.max() as f64 / 1e6 };
    let completed = done.len();
    json!({
        "workload": "storm",
        "system": match a.system { System::Pystrands => "pystrands", System::Centrifuge => "centrifuge" },
        "recover": a.recover,
        "nodes": a.urls.len(),
        "clients": a.clients,
        "missed": a.missed,
        "concurrency": a.concurrency,
        "shift": a.shift,
        "setup_seconds": setup_seconds,
        "position": {"offset": probe_offset, "last": last.0, "epoch": last.1},
        "storm_seconds": storm_seconds,
        "completed": completed,
        "replayed_messages_checked": replayed,
        "backend_new_connections": events.connected.load(Relaxed) - connected_before,
        "welcome_us": super::hist_json(&welcome),
        "done_us": super::hist_json(&done),
        "errors": errors_json(&errors),
    })
}
