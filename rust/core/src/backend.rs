//! The backend side: a TCP listener for Python backends, the `hello` that decides a connection's
//! protocol version (and checks `backend_secret`), and one session per backend made of a reader
//! task (lines → `crate::delivery` sends, router answers, acks) and a writer task (its
//! [`Outbox`] + heartbeats → socket, batched, one flush per batch).
//!
//! A backend is declared dead when its connection ends, a write fails or cannot complete within
//! the write deadline (it stopped reading), its outbox overflows (it fell too far behind), or —
//! for v2 backends, which answer heartbeats — it says nothing for 3 heartbeat intervals. The
//! router then moves its clients elsewhere.
//!
//! With `backend_tls_cert` every backend connection is TLS (and with `backend_tls_client_ca` it
//! must present a client certificate signed by that CA) before its first line is read. Every bad line is counted and logged with a per-cause
//! rate limit, and the session carries on with the next line.

use crate::delivery;
use crate::history::{RoomOverrides, MAX_HISTORY_SIZE};
use crate::outbox::{self, Outbox, Take};
use crate::protocol::{self, BackendCommand, Hello, Line, LineReader};
use crate::router::{BackendId, RouterEvent};
use crate::shutdown::{Signal, TaskGuard};
use crate::stats::incr;
use crate::throttle::ErrorLog;
use crate::Shared;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Most lines written between two flushes.
const WRITE_BATCH: usize = 512;
/// How long a backend without a secret to present has to open with `hello` before it is taken
/// for a v1 backend.
const HELLO_WAIT: Duration = Duration::from_millis(200);

/// A backend connection's two halves, plain TCP or TLS.
type Rd = Box<dyn AsyncRead + Send + Unpin>;
type Wr = Box<dyn AsyncWrite + Send + Unpin>;

pub(crate) static NEXT_BACKEND: AtomicU64 = AtomicU64::new(1);

/// Accepts backends until `stop` fires.
pub(crate) async fn listen(listener: TcpListener, shared: Arc<Shared>, stop: Signal, guard: TaskGuard) {
    crate::accept_loop(listener, "backend", stop, guard, |stream, addr| {
        session(stream, addr.to_string(), shared.clone())
    })
    .await;
}

fn set_keepalive(stream: &TcpStream) {
    let sock = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new().with_time(Duration::from_secs(30)).with_interval(Duration::from_secs(10));
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "could not enable TCP keepalive on a backend connection");
    }
}

/// The outcome of the opening exchange.
enum Opening {
    /// Serve the connection; `first` is a v1 backend's first line, to be handled normally.
    Serve { v2: bool, first: Option<Line> },
    /// Refused (already logged and answered) or gone.
    Stop,
}

/// Decides the protocol version from the backend's first line (see docs/protocol.md, "Hello"),
/// checking the secret when the broker has one, and answers a `hello`.
async fn opening(reader: &mut LineReader<Rd>, wr: &mut Wr, addr: &str, shared: &Shared) -> Opening {
    let secret = shared.cfg.backend_secret.as_deref();
    let wait = if secret.is_some() { shared.cfg.handshake_timeout } else { HELLO_WAIT };
    let first = match tokio::time::timeout(wait, reader.next_line()).await {
        Ok(Ok(Some(line))) => line,
        Ok(Ok(None)) | Ok(Err(_)) => return Opening::Stop,
        Err(_) if secret.is_some() => {
            return refuse(
                wr,
                addr,
                shared,
                "no hello with the backend secret within handshake_timeout (a v1 backend cannot present one)",
            )
            .await;
        }
        Err(_) => return Opening::Serve { v2: false, first: None },
    };
    let hello = match &first {
        Line::Data(data) => match protocol::decode_backend_line(data) {
            Ok(BackendCommand::Hello(h)) => Some(h),
            _ => None,
        },
        Line::TooLong(_) => None,
    };
    let Some(Hello { version, secret: given, .. }) = hello else {
        if secret.is_some() {
            return refuse(
                wr,
                addr,
                shared,
                "the first line was not a hello with the backend secret (a v1 backend cannot present one)",
            )
            .await;
        }
        return Opening::Serve { v2: false, first: Some(first) };
    };
    if version < protocol::PROTOCOL_VERSION {
        return refuse(
            wr,
            addr,
            shared,
            &format!(
                "unsupported protocol version {version} in hello (this broker speaks {})",
                protocol::PROTOCOL_VERSION
            ),
        )
        .await;
    }
    if let Some(expected) = secret {
        match given {
            None => {
                return refuse(wr, addr, shared, "hello without a secret; this broker requires backend_secret").await
            }
            Some(g) if !protocol::secrets_equal(g.as_bytes(), expected.as_bytes()) => {
                return refuse(wr, addr, shared, "wrong backend secret").await;
            }
            Some(_) => {}
        }
    }
    let reply = protocol::encode_hello_reply(Ok((shared.cfg.heartbeat_interval.as_secs_f64(), limits(shared))));
    match tokio::time::timeout(Duration::from_secs(5), wr.write_all(&reply)).await {
        Ok(Ok(())) => Opening::Serve { v2: true, first: None },
        _ => Opening::Stop,
    }
}

async fn refuse(wr: &mut Wr, addr: &str, shared: &Shared, reason: &str) -> Opening {
    incr(&shared.counters.backends_refused);
    tracing::warn!(%addr, "backend refused: {reason}");
    let line = protocol::encode_hello_reply(Err(reason));
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = wr.write_all(&line).await;
        let _ = wr.shutdown().await;
    })
    .await;
    Opening::Stop
}

/// The connection's halves: after a TLS handshake (within `handshake_timeout`) when the listener
/// has a certificate; `None` (counted, logged) when that handshake fails.
async fn secure(stream: TcpStream, addr: &str, shared: &Shared) -> Option<(Rd, Wr)> {
    let Some(tls) = &shared.backend_tls else {
        let (rd, wr) = stream.into_split();
        return Some((Box::new(rd), Box::new(wr)));
    };
    let why = match tokio::time::timeout(shared.cfg.handshake_timeout, tls.acceptor().accept(stream)).await {
        Ok(Ok(s)) => {
            let (rd, wr) = tokio::io::split(s);
            return Some((Box::new(rd), Box::new(wr)));
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no TLS handshake within handshake_timeout".to_string(),
    };
    incr(&shared.counters.tls_handshakes_failed);
    incr(&shared.counters.backends_refused);
    tracing::warn!(%addr, "backend refused: TLS handshake failed: {why}");
    None
}

/// Runs one backend connection to its end.
async fn session(stream: TcpStream, addr: String, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    set_keepalive(&stream);
    let Some((rd, mut wr)) = secure(stream, &addr, &shared).await else { return };
    let id: BackendId = NEXT_BACKEND.fetch_add(1, Ordering::Relaxed);
    let mut reader = LineReader::new(rd, shared.cfg.max_line_size);
    let (v2, first) = match opening(&mut reader, &mut wr, &addr, &shared).await {
        Opening::Serve { v2, first } => (v2, first),
        Opening::Stop => return,
    };
    let outbox = Arc::new(Outbox::new(
        (!v2).then(|| shared.counters.clone()),
        outbox::max_lines(&shared.cfg),
        outbox::MAX_BYTES,
    ));
    let dead = Arc::new(Dead::default());
    if shared.router.handle(RouterEvent::BackendUp { id, addr: addr.clone(), outbox: outbox.clone(), v2 }).is_err() {
        return; // broker is stopping
    }
    let write_deadline = (shared.cfg.heartbeat_interval * 2).max(Duration::from_secs(5));
    let writer = tokio::spawn(write_loop(
        wr,
        outbox.clone(),
        shared.cfg.heartbeat_interval,
        write_deadline,
        dead.clone(),
        id,
        shared.clone(),
    ));

    let mut errors = ErrorLog::new(id);
    let silence_limit = shared.cfg.backend_silence_limit();
    let mut silence_check = tokio::time::interval(shared.cfg.heartbeat_interval);
    silence_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut next = first;
    loop {
        let line = match next.take() {
            Some(l) => Ok(Some(l)),
            None => tokio::select! {
                l = reader.next_line() => l,
                _ = dead.wait() => break,
                _ = silence_check.tick(), if v2 => {
                    if last_heard.elapsed() > silence_limit {
                        tracing::warn!(backend = id, secs = silence_limit.as_secs_f64(), "v2 backend silent (no heartbeat reply); declaring it dead");
                        if dead.set() {
                            incr(&shared.counters.backends_lost);
                        }
                        break;
                    }
                    continue;
                }
            },
        };
        if v2 {
            last_heard = Instant::now();
        }
        match line {
            Ok(Some(Line::Data(line))) => {
                if !line.iter().all(u8::is_ascii_whitespace) {
                    handle_line(id, v2, &line, &shared, &outbox, &mut errors);
                }
            }
            Ok(Some(Line::TooLong(n))) => report_too_long(&shared, &mut errors, n),
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(backend = id, error = %e, "backend read failed");
                break;
            }
        }
    }
    errors.flush();
    if !dead.is_set() {
        tracing::info!(backend = id, %addr, "backend connection closed");
    }
    dead.set();
    outbox.close();
    let _ = shared.router.handle(RouterEvent::BackendDown { id });
    let _ = writer.await;
}

/// A line over `max_line_size` was discarded: counted and logged (rate-limited).
pub(crate) fn report_too_long(shared: &Shared, errors: &mut ErrorLog, n: usize) {
    incr(&shared.counters.backend_errors);
    errors.report(
        "line too long",
        &format!("discarded a line of {n} bytes (max_line_size={})", shared.cfg.max_line_size),
    );
}

/// The limits announced in the `hello` answer.
pub(crate) fn limits(shared: &Shared) -> protocol::Limits {
    protocol::Limits { max_rooms_per_client: shared.cfg.max_rooms_per_client, max_id_length: shared.cfg.max_id_length }
}

/// Carries out one line a backend sent (TCP or in-process); bad lines are counted and logged.
/// `outbox` is that backend's: answers to its queries and refusals of its commands go there.
pub(crate) fn handle_line(
    id: BackendId,
    v2: bool,
    line: &[u8],
    shared: &Arc<Shared>,
    outbox: &Arc<Outbox>,
    errors: &mut ErrorLog,
) {
    let refuse = |errors: &mut ErrorLog, request_id: &str, command: &str, error: String| {
        incr(&shared.counters.commands_refused);
        errors.report("command refused", &error);
        let _ = outbox.push(protocol::encode_command_error(request_id, command, &error), false);
    };
    match protocol::decode_backend_line(line) {
        Ok(BackendCommand::MessageToRoom { room_id, message, exclude }) => {
            delivery::to_room(shared, &room_id, message, &exclude);
        }
        Ok(BackendCommand::MessageToConnection { conn_id, message }) => {
            if !delivery::to_client(shared, &conn_id, message) {
                tracing::debug!(backend = id, client_id = %conn_id, "private message for a client that is not connected");
            }
        }
        Ok(BackendCommand::Broadcast { message }) => {
            delivery::to_all(shared, message);
        }
        Ok(BackendCommand::MessageToUser { request_id, user_id, message }) => {
            match check_id(shared, "message_to_user", "user_id", &user_id) {
                Ok(()) => delivery::to_user(shared, &user_id, message),
                Err(e) => refuse(errors, &request_id, "message_to_user", e),
            }
        }
        Ok(BackendCommand::Membership { request_id, join, client_id, room_id }) => {
            let command = if join { "join_room" } else { "leave_room" };
            if let Err(e) =
                check_client_id(command, &client_id).and_then(|()| check_id(shared, command, "room_id", &room_id))
            {
                return refuse(errors, &request_id, command, e);
            }
            if delivery::membership(shared, &client_id, &room_id, join) == delivery::Applied::Full {
                let max = shared.cfg.max_rooms_per_client;
                let e =
                    format!("join_room: client {client_id:?} is already in {max} rooms (max_rooms_per_client={max})");
                refuse(errors, &request_id, command, e);
            }
        }
        Ok(BackendCommand::Disconnect { request_id, client_id, code, reason }) => {
            let checked =
                check_id(shared, "disconnect", "client_id", &client_id).and_then(|()| check_close(code, &reason));
            match checked {
                Ok(code) => {
                    delivery::disconnect(shared, &client_id, code, &reason);
                }
                Err(e) => refuse(errors, &request_id, "disconnect", e),
            }
        }
        Ok(BackendCommand::RoomQuery { request_id, room_id, count_only, timeout }) => {
            let command = if count_only { "room_count" } else { "room_members" };
            if let Err(e) = check_id(shared, command, "room_id", &room_id) {
                incr(&shared.counters.commands_refused);
                let _ = outbox.push(protocol::encode_error_reply(&request_id, &e), false);
                return;
            }
            answer_query(shared, outbox, request_id, room_id, count_only, timeout);
        }
        Ok(BackendCommand::RoomConfig { request_id, room_id, history_size, history_ttl, presence }) => {
            match check_room_config(shared, &room_id, history_size, history_ttl, presence) {
                Ok(o) => {
                    shared.rooms.configure(&room_id, o);
                    if let Some(c) = &shared.cluster {
                        c.publish_room_config(&room_id, o);
                    }
                }
                Err(e) => refuse(errors, &request_id, "room_config", e),
            }
        }
        Ok(BackendCommand::RoomHistory { request_id, room_id, since, limit }) => {
            let checked = check_id(shared, "room_history", "room_id", &room_id).and_then(|()| match limit {
                Some(n) if n == 0 || n > MAX_HISTORY_SIZE as u64 => {
                    Err(format!("room_history: limit must be between 1 and {MAX_HISTORY_SIZE}, got {n}"))
                }
                _ => Ok(limit.map_or(MAX_HISTORY_SIZE, |n| n as usize)),
            });
            match checked {
                Ok(limit) => answer_history(shared, outbox, request_id, room_id, since, limit),
                Err(e) => {
                    incr(&shared.counters.commands_refused);
                    let _ = outbox.push(protocol::encode_error_reply(&request_id, &e), false);
                }
            }
        }
        Ok(BackendCommand::Response(resp)) => {
            let _ = shared.router.handle(RouterEvent::Response { backend: id, resp });
        }
        Ok(BackendCommand::Heartbeat) => {}
        Ok(BackendCommand::Ack { seq }) if v2 => {
            let _ = shared.router.handle(RouterEvent::Ack { backend: id, seq });
        }
        Ok(BackendCommand::Ack { .. }) => {
            incr(&shared.counters.backend_errors);
            errors.report("ack without v2", "ack from a backend that did not negotiate protocol v2 with a hello");
        }
        Ok(BackendCommand::Hello(_)) => {
            incr(&shared.counters.backend_errors);
            errors.report("late hello", "hello is only valid as the first line of a connection");
        }
        Err(e) => {
            incr(&shared.counters.backend_errors);
            errors.report(e.cause, &e.detail);
        }
    }
}

/// A client id a backend named: not empty (client ids have no length limit of their own, as in
/// v1; a line is bounded by `max_line_size`).
fn check_client_id(command: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        Err(format!("{command}: client_id is empty"))
    } else {
        Ok(())
    }
}

/// A room or user id a backend named: not empty, at most `max_id_length` bytes.
pub(crate) fn check_id(shared: &Shared, command: &str, field: &str, id: &str) -> Result<(), String> {
    let max = shared.cfg.max_id_length;
    if id.is_empty() {
        Err(format!("{command}: {field} is empty"))
    } else if id.len() > max {
        Err(format!("{command}: {field} is {} bytes long (max_id_length={max})", id.len()))
    } else {
        Ok(())
    }
}

/// A close code and reason a backend may use: 1000 or 4000–4999, at most 123 bytes of reason.
fn check_close(code: u64, reason: &str) -> Result<u16, String> {
    if !(code == 1000 || (4000..=4999).contains(&code)) {
        return Err(format!("disconnect: close code {code} is not allowed (use 1000 or 4000-4999)"));
    }
    if reason.len() > protocol::MAX_CLOSE_REASON {
        return Err(format!(
            "disconnect: reason is {} bytes of UTF-8, at most {} fit in a close frame",
            reason.len(),
            protocol::MAX_CLOSE_REASON
        ));
    }
    Ok(code as u16)
}

/// A `room_config`'s arguments: an id within `max_id_length`, a size within 0–100,000, a TTL
/// over 0 and under ~31 years, and at least one of them.
fn check_room_config(
    shared: &Shared,
    room_id: &str,
    history_size: Option<u64>,
    history_ttl: Option<f64>,
    presence: Option<bool>,
) -> Result<RoomOverrides, String> {
    check_id(shared, "room_config", "room_id", room_id)?;
    if history_size.is_none() && history_ttl.is_none() && presence.is_none() {
        return Err("room_config: give at least one of history_size, history_ttl, presence".into());
    }
    if let Some(n) = history_size.filter(|n| *n > MAX_HISTORY_SIZE as u64) {
        return Err(format!("room_config: history_size must be between 0 and {MAX_HISTORY_SIZE}, got {n}"));
    }
    if let Some(t) = history_ttl.filter(|t| !(t.is_finite() && *t > 0.0 && *t < 1e9)) {
        return Err(format!("room_config: history_ttl must be a number of seconds > 0, got {t}"));
    }
    Ok(RoomOverrides {
        history_size: history_size.map(|n| n as usize),
        history_ttl: history_ttl.map(Duration::from_secs_f64),
        presence,
    })
}

/// Answers `room_history`: from memory alone, from the room's Redis Stream in a cluster (a
/// task, so this backend's next lines are not held up).
fn answer_history(
    shared: &Arc<Shared>,
    outbox: &Arc<Outbox>,
    request_id: String,
    room: String,
    since: u64,
    limit: usize,
) {
    fn reply(request_id: &str, r: &crate::history::Read) -> Bytes {
        let entries: Vec<(u64, &str)> = r.entries.iter().map(|(o, d)| (*o, d.as_str())).collect();
        protocol::encode_history_reply(request_id, &r.epoch, r.offset, &entries, r.complete)
    }
    if shared.cluster.is_none() {
        let _ = outbox.push(reply(&request_id, &shared.rooms.read(&room, since, limit)), false);
        return;
    }
    let (shared, outbox) = (shared.clone(), outbox.clone());
    shared.runtime.clone().spawn(async move {
        let Some(cluster) = &shared.cluster else { return };
        let line = match cluster.read_history(&room, since, limit).await {
            Ok(r) => reply(&request_id, &r),
            Err(e) => protocol::encode_error_reply(&request_id, &format!("room_history: {e}")),
        };
        let _ = outbox.push(line, false);
    });
}

/// Default and longest time a `room_members` query may take.
const QUERY_TIMEOUT: f64 = 5.0;
const QUERY_TIMEOUT_MAX: f64 = 60.0;

/// Answers `room_count` at once (presence cache) and `room_members` at once when alone, or once
/// the other live nodes answered (a task, so this backend's next lines are not held up).
fn answer_query(
    shared: &Arc<Shared>,
    outbox: &Arc<Outbox>,
    request_id: String,
    room_id: String,
    count_only: bool,
    timeout: Option<f64>,
) {
    if count_only {
        let n = match &shared.cluster {
            Some(c) => c.room_count(&shared.hub, &room_id),
            None => shared.hub.room_size(&room_id),
        };
        let _ = outbox.push(protocol::encode_count_reply(&request_id, n), false);
        return;
    }
    if shared.cluster.is_none() {
        let members = shared.hub.members(&room_id);
        let _ = outbox.push(protocol::encode_members_reply(&request_id, &members, &[]), false);
        return;
    }
    // Answer a little before the backend's own deadline, so a slow node costs completeness,
    // not the whole answer.
    let wait = Duration::from_secs_f64(timeout.unwrap_or(QUERY_TIMEOUT).min(QUERY_TIMEOUT_MAX) * 0.8);
    let (shared, outbox) = (shared.clone(), outbox.clone());
    shared.runtime.clone().spawn(async move {
        let Some(cluster) = &shared.cluster else { return };
        let (pieces, missing) = cluster.members(&shared.hub, &room_id, wait).await;
        let pieces: Vec<&str> = pieces.iter().filter_map(|p| std::str::from_utf8(p).ok()).collect();
        let _ = outbox.push(protocol::encode_members_reply(&request_id, &pieces, &missing), false);
    });
}

/// Writes the outbox and heartbeats; sets `dead` when the backend cannot be written to.
async fn write_loop(
    wr: Wr,
    outbox: Arc<Outbox>,
    heartbeat: Duration,
    deadline: Duration,
    dead: Arc<Dead>,
    id: BackendId,
    shared: Arc<Shared>,
) {
    let mut out = BufWriter::with_capacity(64 * 1024, wr);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_beat = Instant::now();
    let mut batch: Vec<Bytes> = Vec::with_capacity(WRITE_BATCH);
    loop {
        batch.clear();
        match outbox.take(&mut batch, WRITE_BATCH) {
            Take::Lines { .. } => {
                if last_beat.elapsed() >= heartbeat {
                    batch.push(protocol::heartbeat_line());
                    last_beat = Instant::now();
                }
            }
            Take::Done | Take::Closed => break,
            Take::Empty => {
                tokio::select! {
                    _ = outbox.wait() => {
                        // Let the tasks that are ready now (other clients' events) queue theirs
                        // first: one write then carries many lines instead of one each.
                        tokio::task::yield_now().await;
                        continue;
                    }
                    _ = ticker.tick() => {
                        batch.push(protocol::heartbeat_line());
                        last_beat = Instant::now();
                    }
                    _ = dead.wait() => break,
                }
            }
        }
        let write = async {
            for line in &batch {
                out.write_all(line).await?;
            }
            out.flush().await
        };
        let failure = tokio::select! {
            r = tokio::time::timeout(deadline, write) => match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("writing to backend failed ({e})")),
                Err(_) => Some(format!("backend stopped reading for {:.1} s", deadline.as_secs_f64())),
            },
            _ = dead.wait() => break,
        };
        if let Some(why) = failure {
            tracing::warn!(backend = id, "{why}; declaring it dead");
            break;
        }
    }
    if outbox.overflowed() {
        let (max_lines, max_bytes) = outbox.limits();
        tracing::warn!(
            backend = id,
            max_lines,
            max_bytes,
            "backend fell too far behind (outbox full); declaring it dead"
        );
    }
    if dead.set() && !shared.stopping() {
        incr(&shared.counters.backends_lost);
    }
    outbox.close();
    let _ = out.shutdown().await;
}

/// A one-way "this backend is finished" flag both tasks of a session can wait on.
#[derive(Default)]
struct Dead {
    flag: AtomicBool,
    notify: Notify,
}

impl Dead {
    /// Sets the flag; true if this call set it.
    fn set(&self) -> bool {
        let first = !self.flag.swap(true, Ordering::AcqRel);
        self.notify.notify_waiters();
        first
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}
