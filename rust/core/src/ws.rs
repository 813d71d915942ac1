//! The WebSocket side: the listener, the handshake (ask a backend, then upgrade or refuse with an
//! HTTP status) and one task per connection that owns its socket.
//!
//! Owning the socket in one task (instead of split reader/writer halves, which lock on every
//! operation) the loop waits on: a frame from the client, the client's bounded outbound queue,
//! a kick (slow consumer, replaced, shutdown) and the ping timer. Outbound messages are fed in a
//! batch and flushed once; a flush that cannot complete (client stopped reading) can still be
//! interrupted by a kick, so a stalled client never holds anything but itself.
//!
//! With `tls_cert` the port speaks TLS only (`crate::tls`); a plain request there is answered 400.
//! A request with a signed token (`crate::token`) is accepted or refused (401) by the broker
//! itself; the connection is then closed with 4401 when its token expires.
//!
//! A client that asked for the browser protocol `pystrands.1` (`crate::browser`) gets JSON
//! envelopes: its first frame must be `connect`, answered by `welcome` and any replay
//! (`crate::resume`) before its queue is read; then its frames are `msg` envelopes, and it also
//! gets a `ping` frame every ping interval.

use crate::browser::{self, ClientFrame, Mode};
use crate::config::LimitPolicy;
use crate::delivery;
use crate::http::{self, Head, UpgradeRequest};
use crate::hub::{ClientSlot, Out};
use crate::metrics;
use crate::outbox::Outbox;
use crate::protocol::{self, CLOSE_IDLE};
use crate::resume::{self, JoinedAt, Seen};
use crate::router::{Decision, RouterEvent};
use crate::shutdown::{Signal, TaskGuard};
use crate::stats::incr;
use crate::throttle::TokenBucket;
use crate::tls::Conn;
use crate::token;
use crate::Shared;
use futures_util::{SinkExt, StreamExt};
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::either::Either;

/// Per-connection read buffer (tungstenite allocates it eagerly; its default is 128 KiB).
const READ_BUFFER: usize = 2 * 1024;
/// Outbound messages written per flush at most.
const WRITE_BATCH: usize = 256;
/// How long a closing handshake may take before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Accepts WebSocket connections until `stop` fires.
pub(crate) async fn listen(listener: TcpListener, shared: Arc<Shared>, stop: Signal, guard: TaskGuard) {
    crate::accept_loop(listener, "WebSocket", stop, guard, |stream, addr| connection(stream, addr, shared.clone()))
        .await;
}

fn ws_config(shared: &Shared) -> WebSocketConfig {
    let max = shared.cfg.max_message_size;
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(max.saturating_mul(2).saturating_add(64 * 1024))
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

async fn refuse<S: AsyncWrite + Unpin>(mut stream: S, status: u16, body: &str) {
    if status != 0 {
        let resp = http::error_response(status, body);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = stream.write_all(&resp).await;
            let _ = stream.shutdown().await;
        })
        .await;
    }
}

/// One connection from TCP accept to close.
async fn connection(stream: TcpStream, addr: SocketAddr, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let Some(stream) = secure(stream, addr, &shared).await else { return };
    // Everything only the handshake needs (request headers, buffers) is freed before serving.
    let Some(Accepted { ws, slot, rx, joined_at, expires }) = handshake(stream, addr, &shared).await else { return };
    let outcome = run(ws, &slot, rx, joined_at, expires, &shared).await;
    if let Some(rooms) = shared.hub.unregister_from_rooms(&slot) {
        for room in rooms.iter().filter(|r| shared.rooms.presence(r)) {
            delivery::presence(&shared, room, &slot, false);
        }
        if let Some(error) = outcome {
            let line = protocol::encode_error(&shared.next_id().to_string(), &error, &slot.context_json);
            let _ =
                shared.router.handle(RouterEvent::ClientEvent { client_id: slot.client_id.clone(), line, last: false });
        }
        send_event(&shared, &slot.client_id, "disconnected", &slot.context_json, true);
    }
}

/// The connection's stream: TLS after its handshake when the port has a certificate (a plain
/// request gets a 400 that says so), else the TCP stream itself.
async fn secure(stream: TcpStream, addr: SocketAddr, shared: &Shared) -> Option<Conn> {
    let Some(tls) = &shared.tls else { return Some(Either::Left(stream)) };
    let deadline = shared.cfg.handshake_timeout;
    match tokio::time::timeout(deadline, crate::tls::starts_with_tls(&stream)).await {
        Ok(Some(true)) => {}
        Ok(Some(false)) => {
            incr(&shared.counters.tls_handshakes_failed);
            tracing::debug!(%addr, "plain request on the TLS WebSocket port");
            // Read the request first: closing with unread bytes would reset the connection and
            // could lose the answer before the client reads it.
            let mut stream = stream;
            let _ = http::read_request(&mut stream, Duration::from_secs(1)).await;
            refuse(stream, 400, "this port speaks TLS only: use wss://").await;
            return None;
        }
        Ok(None) => return None,
        Err(_) => {
            incr(&shared.counters.tls_handshakes_failed);
            return None;
        }
    }
    match tokio::time::timeout(deadline, tls.acceptor().accept(stream)).await {
        Ok(Ok(s)) => Some(Either::Right(Box::new(s))),
        failed => {
            incr(&shared.counters.tls_handshakes_failed);
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "no TLS handshake within handshake_timeout".to_string(),
            };
            tracing::debug!(%addr, "TLS handshake failed: {why}");
            None
        }
    }
}

/// An upgraded, registered connection.
struct Accepted {
    ws: WebSocketStream<Conn>,
    slot: Arc<ClientSlot>,
    rx: mpsc::Receiver<Out>,
    /// Structured clients: where the first room's stream was at the join.
    joined_at: JoinedAt,
    /// When its signed token expires (leeway included).
    expires: Option<Instant>,
}

/// Reads the upgrade request, asks a backend, and either refuses with an HTTP status or upgrades
/// and registers the client (announcing it to its backend).
async fn handshake(mut stream: Conn, addr: SocketAddr, shared: &Arc<Shared>) -> Option<Accepted> {
    let (req, leftover) = match http::read_request(&mut stream, shared.cfg.handshake_timeout).await {
        Ok((Head::Upgrade(req), leftover)) => (req, leftover),
        Ok((Head::Get(get), _)) => {
            // The browser client, always here; the operator routes unless they live on
            // `metrics_bind`; else the 426 of old.
            let routed = crate::client_js::route(&get.path).or_else(|| {
                if shared.cfg.metrics_bind.is_none() {
                    metrics::route(&get, shared)
                } else {
                    None
                }
            });
            match routed {
                Some(answer) => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        let _ = stream.write_all(&answer).await;
                        let _ = stream.shutdown().await;
                    })
                    .await;
                }
                None => {
                    let refusal = http::not_an_upgrade();
                    incr(&shared.counters.handshakes_failed);
                    refuse(stream, refusal.status, &refusal.reason).await;
                }
            }
            return None;
        }
        Err(refusal) => {
            incr(&shared.counters.handshakes_failed);
            tracing::debug!(%addr, status = refusal.status, reason = %refusal.reason, "handshake refused");
            refuse(stream, refusal.status, &refusal.reason).await;
            return None;
        }
    };
    if !shared.cfg.origin_allowed(req.origin.as_deref()) {
        incr(&shared.counters.handshakes_failed);
        tracing::info!(%addr, origin = ?req.origin, "origin not allowed");
        refuse(stream, 403, "origin not allowed").await;
        return None;
    }
    let mode = match browser::negotiate(&req.headers, &req.query) {
        Ok(mode) => mode,
        Err(why) => {
            incr(&shared.counters.handshakes_failed);
            refuse(stream, 400, &why).await;
            return None;
        }
    };
    if shared.cfg.max_connections > 0 && shared.hub.client_count() >= shared.cfg.max_connections {
        incr(&shared.counters.connections_unavailable);
        refuse(stream, 503, "too many connections").await;
        return None;
    }
    let token = shared.tokens.as_ref().and_then(|v| Some((v, token::from_request(&req.query, &req.headers)?)));
    let (decision, expires) = match token {
        Some((verifier, token)) => match decide_by_token(verifier, token, &req.path) {
            Ok(decided) => {
                incr(&shared.counters.token_connections);
                decided
            }
            Err(why) => {
                incr(&shared.counters.tokens_refused);
                tracing::debug!(%addr, "token refused: {why}");
                refuse(stream, 401, &why).await;
                return None;
            }
        },
        None => (ask_backend(&req, addr, shared).await, None),
    };
    let (client_id, room_id, metadata, user_id) = match decision {
        Decision::Accept { client_id, room_id, metadata, user_id } => (client_id, room_id, metadata, user_id),
        Decision::Reject { reason } => {
            incr(&shared.counters.connections_rejected);
            refuse(stream, 403, reason.as_deref().unwrap_or("connection rejected")).await;
            return None;
        }
        Decision::Unavailable(why) => {
            incr(&shared.counters.connections_unavailable);
            tracing::info!(%addr, path = %req.path, "connection refused with 503: {why}");
            refuse(stream, 503, why).await;
            return None;
        }
    };
    let context_json: Arc<str> = protocol::encode_context(&client_id, &room_id, &metadata, user_id.as_deref()).into();
    let echo = matches!(mode, Mode::Structured { echo: true }).then_some(browser::SUBPROTOCOL);
    if stream.write_all(&http::switching_protocols(&req.key, echo)).await.is_err() {
        // The client left while we were asking: tell the backend it came and went.
        send_event(shared, &client_id, "disconnected", &context_json, true);
        return None;
    }
    drop(req);
    let ws = WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(ws_config(shared))).await;

    let (tx, rx) = mpsc::channel(shared.cfg.client_queue_size);
    let structured = mode != Mode::Raw;
    let slot = Arc::new(
        ClientSlot::new(
            shared.next_id(),
            client_id.as_str().into(),
            room_id.as_str().into(),
            user_id.map(|u| u.as_str().into()),
            context_json.clone(),
            tx,
        )
        .structured(structured),
    );
    incr(&shared.counters.connections_accepted);
    // A structured client's first room: where its stream is at the join (see `resume`).
    let mut joined_at = JoinedAt::new();
    let replaced = if structured && shared.rooms.settings(&room_id).history_size > 0 {
        if shared.cluster.is_none() {
            let stream = shared.rooms.stream(&room_id);
            let s = stream.lock();
            joined_at.insert(slot.room_id.clone(), (s.offset, s.epoch.clone()));
            shared.hub.register(slot.clone())
        } else {
            if let Some(at) = resume::position_before_join(shared, &room_id).await {
                joined_at.insert(slot.room_id.clone(), at);
            }
            shared.hub.register(slot.clone())
        }
    } else {
        shared.hub.register(slot.clone())
    };
    if shared.rooms.presence(&room_id) {
        delivery::presence(shared, &room_id, &slot, true);
    }
    if let Some(cluster) = &shared.cluster {
        cluster.claim(&slot);
    }
    if let Some(old) = replaced {
        tracing::info!(client_id = %client_id, "client_id reconnected; the older connection is replaced");
        send_event(shared, &client_id, "disconnected", &old.context_json, false);
    }
    send_event(shared, &client_id, "new_connection", &context_json, false);
    if shared.stopping() {
        slot.kick(protocol::CLOSE_GOING_AWAY);
    }
    Some(Accepted { ws, slot, rx, joined_at, expires })
}

fn send_event(shared: &Shared, client_id: &str, action: &str, context_json: &str, last: bool) {
    let line = protocol::encode_context_event(&shared.next_id().to_string(), action, context_json);
    let _ = shared.router.handle(RouterEvent::ClientEvent { client_id: client_id.into(), line, last });
}

/// The broker's own decision on a signed token: the accept its claims make (the room defaults to
/// the request path, the client id to a fresh UUID) and when the connection must close; `Err`
/// says why the token is refused (the 401 body).
fn decide_by_token(verifier: &token::Verifier, token: &str, path: &str) -> Result<(Decision, Option<Instant>), String> {
    let grant = verifier.verify(token)?;
    let expires = grant.remaining(verifier.leeway()).map(|d| Instant::now() + d);
    let accept = Decision::Accept {
        client_id: grant.client_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        room_id: grant.room_id.unwrap_or_else(|| path.to_string()),
        metadata: grant.metadata,
        user_id: grant.user_id,
    };
    Ok((accept, expires))
}

/// Sends the `connection_request` and waits for the decision within `request_timeout`.
async fn ask_backend(req: &UpgradeRequest, addr: SocketAddr, shared: &Shared) -> Decision {
    let request_id = format!("c{}", shared.next_id());
    let line = protocol::encode_connection_request(&request_id, &req.headers, &req.path, &req.query, &addr.to_string());
    let (reply, answer) = oneshot::channel();
    let request = RouterEvent::ConnRequest { request_id: request_id.clone(), url: req.path.clone(), line, reply };
    if shared.router.handle(request).is_err() {
        return Decision::Unavailable("broker is stopping");
    }
    match tokio::time::timeout(shared.cfg.request_timeout, answer).await {
        Ok(Ok(decision)) => decision,
        Ok(Err(_)) => Decision::Unavailable("broker is stopping"),
        Err(_) => {
            let _ = shared.router.handle(RouterEvent::CancelRequest { request_id });
            Decision::Unavailable("no answer from a backend within request_timeout")
        }
    }
}

/// Why the loop ended.
enum End {
    /// The client closed or vanished.
    Gone,
    /// We close with this code and reason; `report` goes to the backend as an `error` event.
    Close(u16, Cow<'static, str>, Option<String>),
}

fn read_error(e: &WsError, max: usize) -> End {
    match e {
        WsError::Capacity(_) => {
            End::Close(1009, "message too big".into(), Some(format!("message too big (max_message_size={max})")))
        }
        WsError::Utf8(_) => End::Close(1007, "invalid UTF-8".into(), Some("invalid UTF-8 in a text message".into())),
        // A client that vanished without a close frame (tab killed, network lost) just left.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Gone,
        WsError::Protocol(p) => {
            End::Close(1002, "protocol error".into(), Some(format!("WebSocket protocol error: {p}")))
        }
        _ => End::Gone,
    }
}

/// Serves an upgraded connection; returns an error text for the backend if the broker closed it
/// because of something the client did.
async fn run(
    mut ws: WebSocketStream<Conn>,
    slot: &ClientSlot,
    mut rx: mpsc::Receiver<Out>,
    joined_at: JoinedAt,
    expires: Option<Instant>,
    shared: &Shared,
) -> Option<String> {
    // A structured client: its `connect` first, then the welcome and the replay, before any
    // queued frame.
    let mut seen = Seen::default();
    if slot.structured {
        match start_structured(&mut ws, slot, joined_at, shared).await {
            Ok(s) => seen = s,
            Err(End::Gone) => return None,
            Err(End::Close(code, reason, report)) => {
                close(&mut ws, code, reason).await;
                return report;
            }
        }
    }
    let max = shared.cfg.max_message_size;
    let ping_every = shared.cfg.ping_interval;
    let mut ping = tokio::time::interval_at(
        Instant::now() + ping_every.max(Duration::from_millis(1)),
        ping_every.max(Duration::from_millis(1)),
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut bucket = TokenBucket::new(shared.cfg.client_rate_limit, shared.cfg.rate_burst());
    // One wait for a kick for the whole connection: registering a fresh waiter on every turn
    // of the loop cost two locked list operations per message.
    let kick = slot.kicked();
    tokio::pin!(kick);
    // One timer for the whole connection (never polled without a token expiry).
    let expiry = tokio::time::sleep_until(expires.unwrap_or_else(Instant::now));
    tokio::pin!(expiry);
    // Set while the in-process backend this client feeds is above its high-water mark: the
    // client is not read (TCP backpressure reaches the browser) until the backend catches up.
    let mut paused: Option<Arc<Outbox>> = None;

    let end = loop {
        tokio::select! {
            _ = async { if let Some(o) = &paused { o.relieved().await } }, if paused.is_some() => {
                paused = None;
                last_heard = Instant::now(); // its pongs were not read meanwhile
            }
            frame = ws.next(), if paused.is_none() => {
                last_heard = Instant::now();
                let is_data = matches!(frame, Some(Ok(Message::Text(_) | Message::Binary(_))));
                if is_data && bucket.as_mut().is_some_and(|b| !b.allow()) {
                    incr(&shared.counters.rate_limited);
                    match shared.cfg.rate_limit_policy {
                        LimitPolicy::Drop => continue,
                        LimitPolicy::Close => {
                            let why = format!("message rate limit exceeded (client_rate_limit={})", shared.cfg.client_rate_limit);
                            break End::Close(protocol::CLOSE_POLICY, "rate limit exceeded".into(), Some(why));
                        }
                    }
                }
                match frame {
                    Some(Ok(Message::Text(text))) if slot.structured => match structured_message(shared, text.as_str()) {
                        Ok(data) => paused = forward(shared, slot, &data),
                        Err(end) => break end,
                    },
                    Some(Ok(Message::Text(text))) => paused = forward(shared, slot, text.as_str()),
                    Some(Ok(Message::Binary(_))) if slot.structured => {
                        incr(&shared.counters.browser_protocol_errors);
                        break End::Close(browser::CLOSE_BAD_FRAME, "binary frame".into(), Some("pystrands.1: binary frame".into()));
                    }
                    Some(Ok(Message::Binary(data))) => match std::str::from_utf8(&data) {
                        Ok(text) => paused = forward(shared, slot, text),
                        Err(_) => break End::Close(1003, "binary data must be UTF-8".into(), Some("binary message that is not UTF-8".into())),
                    },
                    Some(Ok(Message::Close(_))) => {
                        // tungstenite queued the answering close frame: send it, completing the
                        // closing handshake (dropped unsent, the client sees 1006, abnormal).
                        let _ = tokio::time::timeout(CLOSE_GRACE, ws.flush()).await;
                        break End::Gone;
                    }
                    None => break End::Gone,
                    Some(Ok(_)) => {} // ping/pong: answered by tungstenite
                    Some(Err(e)) => {
                        let end = read_error(&e, max);
                        if !matches!(end, End::Gone) {
                            incr(&shared.counters.client_protocol_errors);
                        }
                        break end;
                    }
                }
            }
            msg = rx.recv() => {
                let Some(msg) = msg else { break End::Gone };
                // The write is polled first, so a message taken from the queue is at least in the
                // socket's write buffer before a pending close can win (a backend's last words
                // before its `disconnect` go out ahead of the close frame).
                tokio::select! {
                    biased;
                    r = write_batch(&mut ws, msg, &mut rx, &mut seen) => if r.is_err() { break End::Gone },
                    code = &mut kick => break kicked(code, slot),
                }
            }
            code = &mut kick => break kicked(code, slot),
            _ = &mut expiry, if expires.is_some() => {
                incr(&shared.counters.tokens_expired);
                break End::Close(protocol::CLOSE_TOKEN_EXPIRED, "token expired".into(), None);
            }
            _ = ping.tick(), if !ping_every.is_zero() => {
                if paused.is_none() && last_heard.elapsed() > ping_every * 2 {
                    break End::Close(CLOSE_IDLE, "no pong".into(), Some("client stopped answering pings".into()));
                }
                let sent = tokio::time::timeout(ping_every, async {
                    if slot.structured {
                        // Browsers cannot see WebSocket pings: this one tells the page the link is alive.
                        ws.feed(Message::Text(browser::PING.into())).await?;
                    }
                    ws.send(Message::Ping(Default::default())).await
                }).await;
                if !matches!(sent, Ok(Ok(()))) { break End::Gone }
            }
        }
    };
    match end {
        End::Gone => None,
        End::Close(code, reason, report) => {
            if code == protocol::CLOSE_GOING_AWAY || slot.backend_close_reason().is_some() {
                // Shutting down, or a backend's `disconnect`: what was already queued for this
                // client (a backend's last words) goes out before the close frame instead of
                // being dropped uncounted.
                let _ = tokio::time::timeout(CLOSE_GRACE, async {
                    while let Ok(m) = rx.try_recv() {
                        if seen.pass(&m) {
                            ws.feed(Message::Text(m.text)).await?;
                        }
                    }
                    ws.flush().await
                })
                .await;
            }
            close(&mut ws, code, reason).await;
            report
        }
    }
}

fn kicked(code: u16, slot: &ClientSlot) -> End {
    if let Some(reason) = slot.backend_close_reason() {
        return End::Close(code, reason.into(), None);
    }
    let reason = match code {
        protocol::CLOSE_GOING_AWAY => "broker shutting down",
        protocol::CLOSE_SLOW_CONSUMER => "slow consumer: outbound queue full",
        protocol::CLOSE_REPLACED => "replaced by a newer connection with the same client_id",
        _ => "closed by broker",
    };
    let report = (code == protocol::CLOSE_SLOW_CONSUMER).then(|| reason.to_string());
    End::Close(code, reason.into(), report)
}

/// Hands a client message to the router; returns the outbox to wait for when it is full.
fn forward(shared: &Shared, slot: &ClientSlot, text: &str) -> Option<Arc<Outbox>> {
    incr(&shared.counters.messages_in);
    let line = protocol::encode_new_message(&shared.next_id().to_string(), text, &slot.context_json);
    shared.router.client_event(slot.client_id.clone(), line, false)
}

async fn write_batch(
    ws: &mut WebSocketStream<Conn>,
    first: Out,
    rx: &mut mpsc::Receiver<Out>,
    seen: &mut Seen,
) -> Result<(), WsError> {
    if seen.pass(&first) {
        ws.feed(Message::Text(first.text)).await?;
    }
    for _ in 1..WRITE_BATCH {
        match rx.try_recv() {
            Ok(m) if seen.pass(&m) => ws.feed(Message::Text(m.text)).await?,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    ws.flush().await
}

/// A structured client's frame after `connect`: the data of its `msg`, or the close it earned.
fn structured_message(shared: &Shared, text: &str) -> Result<String, End> {
    let bad = |why: String| {
        incr(&shared.counters.browser_protocol_errors);
        End::Close(browser::CLOSE_BAD_FRAME, "bad frame".into(), Some(format!("pystrands.1: {why}")))
    };
    match browser::decode(text, shared.cfg.max_rooms_per_client) {
        Ok(ClientFrame::Msg(data)) => Ok(data),
        Ok(ClientFrame::Connect { .. }) => Err(bad("connect sent twice".into())),
        Err(why) => Err(bad(why)),
    }
}

/// A structured client's start: waits for its `connect` (within `handshake_timeout`), then
/// sends the welcome and the replay. Returns what the replay covered.
async fn start_structured(
    ws: &mut WebSocketStream<Conn>,
    slot: &ClientSlot,
    joined_at: JoinedAt,
    shared: &Shared,
) -> Result<Seen, End> {
    let bad = |why: String| {
        incr(&shared.counters.browser_protocol_errors);
        End::Close(browser::CLOSE_BAD_FRAME, "bad frame".into(), Some(format!("pystrands.1: {why}")))
    };
    let deadline = tokio::time::sleep(shared.cfg.handshake_timeout);
    tokio::pin!(deadline);
    let first = loop {
        tokio::select! {
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => break text,
                Some(Ok(Message::Binary(_))) => return Err(bad("binary frame".into())),
                Some(Ok(Message::Close(_))) | None => return Err(End::Gone),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(read_error(&e, shared.cfg.max_message_size)),
            },
            code = slot.kicked() => return Err(kicked(code, slot)),
            _ = &mut deadline => {
                incr(&shared.counters.browser_protocol_errors);
                return Err(End::Close(browser::CLOSE_NO_CONNECT, "no connect frame".into(), Some("pystrands.1: no connect frame within handshake_timeout".into())));
            }
        }
    };
    let (session, positions) = match browser::decode(first.as_str(), shared.cfg.max_rooms_per_client) {
        Ok(ClientFrame::Connect { session, positions }) => (session, positions),
        Ok(ClientFrame::Msg(_)) => return Err(bad("the first frame must be connect".into())),
        Err(why) => return Err(bad(why)),
    };
    let resuming = resume::connect(shared, slot, session, positions, joined_at);
    let resumed = match tokio::time::timeout(shared.cfg.handshake_timeout, resuming).await {
        Ok(Ok(r)) => r,
        Ok(Err((code, why))) => {
            if code == browser::CLOSE_BAD_FRAME {
                incr(&shared.counters.browser_protocol_errors);
            }
            return Err(End::Close(code, "recovery refused".into(), Some(format!("pystrands.1: {why}"))));
        }
        Err(_) => {
            let why = "pystrands.1: room history not read within handshake_timeout";
            return Err(End::Close(1011, "history unavailable".into(), Some(why.into())));
        }
    };
    for frame in resumed.frames {
        if ws.feed(Message::Text(frame.into())).await.is_err() {
            return Err(End::Gone);
        }
    }
    if ws.flush().await.is_err() {
        return Err(End::Gone);
    }
    Ok(resumed.seen)
}

/// Sends a close frame and waits briefly for the client's answer so the close code arrives.
async fn close(ws: &mut WebSocketStream<Conn>, code: u16, reason: Cow<'static, str>) {
    let frame = CloseFrame { code: CloseCode::from(code), reason: reason.as_ref().into() };
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}
