//! The backend side: a TCP listener for Python backends, the `hello` that decides a connection's
//! protocol version (and checks `backend_secret`), and one session per backend made of a reader
//! task (lines → hub deliveries, router answers, acks) and a writer task (its [`Outbox`] +
//! heartbeats → socket, batched, one flush per batch).
//!
//! A backend is declared dead when its connection ends, a write fails or cannot complete within
//! the write deadline (it stopped reading), its outbox overflows (it fell too far behind), or —
//! for v2 backends, which answer heartbeats — it says nothing for 3 heartbeat intervals. The
//! router then moves its clients elsewhere. Every bad line is counted and logged with a per-cause
//! rate limit, and the session carries on with the next line.

use crate::protocol::{self, BackendCommand, Hello, Line, LineReader};
use crate::router::{BackendId, RouterMsg};
use crate::shutdown::{Signal, TaskGuard};
use crate::stats::{add, incr, Counters};
use crate::Shared;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Fewest lines one backend's outbox holds before the backend counts as too slow (and is
/// dropped). It is raised to fit a full redelivery plus a full queue (see [`outbox_lines`]), so
/// a healthy backend taking over a dead one's clients is never mistaken for a slow one.
const OUTBOX_MIN_LINES: usize = 65_536;
/// Most bytes one backend's outbox holds (a single larger line is still accepted when it is
/// empty). A backend that stops reading is caught earlier by the write deadline; this bounds the
/// memory it can pin until then.
const OUTBOX_MAX_BYTES: usize = 256 * 1024 * 1024;
/// Most lines written between two flushes.
const WRITE_BATCH: usize = 512;
/// How long a backend without a secret to present has to open with `hello` before it is taken
/// for a v1 backend.
const HELLO_WAIT: Duration = Duration::from_millis(200);

static NEXT_BACKEND: AtomicU64 = AtomicU64::new(1);

/// Accepts backends until `stop` fires.
pub async fn listen(listener: TcpListener, shared: Arc<Shared>, stop: Signal, guard: TaskGuard) {
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

/// The lines waiting for one backend's writer. The router pushes without ever waiting; the
/// writer takes everything queued in one go. Bounded: a push beyond the bound closes the outbox,
/// which makes the backend count as dead.
pub struct Outbox {
    max_lines: usize,
    max_bytes: usize,
    state: Mutex<OutboxState>,
    wake: Notify,
    /// Set for v1 backends: events discarded on close are lost for good and counted.
    lost: Option<Arc<Counters>>,
}

struct OutboxState {
    /// Lines, each flagged when it is a client event (as opposed to a connection request).
    lines: VecDeque<(Bytes, bool)>,
    bytes: usize,
    mode: Mode,
    overflowed: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Open,
    /// No more pushes; the writer drains what is queued and ends.
    Finishing,
    Closed,
}

/// What [`Outbox::take`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Take {
    Lines,
    Empty,
    /// Finishing and drained, or closed.
    Done,
}

impl Outbox {
    /// An outbox; `lost` counts the events a close discards (v1 backends, which cannot get them
    /// redelivered).
    pub fn new(lost: Option<Arc<Counters>>, max_lines: usize, max_bytes: usize) -> Self {
        Outbox {
            max_lines,
            max_bytes,
            state: Mutex::new(OutboxState { lines: VecDeque::new(), bytes: 0, mode: Mode::Open, overflowed: false }),
            wake: Notify::new(),
            lost,
        }
    }

    /// Queues a line; `Err` when the outbox is closed or just overflowed (and closed).
    pub fn push(&self, line: Bytes, is_event: bool) -> Result<(), ()> {
        let mut s = self.state.lock();
        if s.mode != Mode::Open {
            return Err(());
        }
        if s.lines.len() >= self.max_lines || (!s.lines.is_empty() && s.bytes + line.len() > self.max_bytes) {
            s.overflowed = true;
            drop(s);
            self.close();
            return Err(());
        }
        let was_empty = s.lines.is_empty();
        s.bytes += line.len();
        s.lines.push_back((line, is_event));
        drop(s);
        if was_empty {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Moves up to `max` queued lines into `out`.
    pub fn take(&self, out: &mut Vec<Bytes>, max: usize) -> Take {
        let mut s = self.state.lock();
        if s.mode == Mode::Closed {
            return Take::Done;
        }
        if s.lines.is_empty() {
            return if s.mode == Mode::Finishing { Take::Done } else { Take::Empty };
        }
        let n = s.lines.len().min(max);
        let mut taken = 0;
        for (line, _) in s.lines.drain(..n) {
            taken += line.len();
            out.push(line);
        }
        s.bytes -= taken;
        Take::Lines
    }

    /// Waits until something was pushed (or the outbox finished or closed) since the last take.
    pub async fn wait(&self) {
        self.wake.notified().await;
    }

    /// No more pushes; what is queued is still written.
    pub fn finish(&self) {
        let mut s = self.state.lock();
        if s.mode == Mode::Open {
            s.mode = Mode::Finishing;
        }
        drop(s);
        self.wake.notify_one();
    }

    /// Discards what is queued and refuses further pushes (idempotent). For a v1 backend the
    /// discarded events are counted as lost.
    pub fn close(&self) {
        let mut s = self.state.lock();
        s.mode = Mode::Closed;
        let events = s.lines.iter().filter(|(_, ev)| *ev).count() as u64;
        s.lines.clear();
        s.bytes = 0;
        drop(s);
        self.wake.notify_one();
        if let (Some(counters), true) = (&self.lost, events > 0) {
            add(&counters.events_lost, events);
            tracing::warn!(events, "events could not be written to a lost v1 backend (v1 has no redelivery)");
        }
    }

    fn overflowed(&self) -> bool {
        self.state.lock().overflowed
    }

    #[cfg(test)]
    pub fn pop(&self) -> Option<Bytes> {
        let mut s = self.state.lock();
        let (line, _) = s.lines.pop_front()?;
        s.bytes -= line.len();
        Some(line)
    }
}

/// The line bound of a backend's outbox: room for a whole redelivery and a whole no-backend
/// queue arriving at once, with a floor.
pub fn outbox_lines(cfg: &crate::Config) -> usize {
    (cfg.max_unacked * 2 + cfg.queue_size).max(OUTBOX_MIN_LINES)
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
async fn opening(
    reader: &mut LineReader<OwnedReadHalf>,
    wr: &mut OwnedWriteHalf,
    addr: &str,
    shared: &Shared,
) -> Opening {
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
    let reply = protocol::encode_hello_reply(Ok(shared.cfg.heartbeat_interval.as_secs_f64()));
    match tokio::time::timeout(Duration::from_secs(5), wr.write_all(&reply)).await {
        Ok(Ok(())) => Opening::Serve { v2: true, first: None },
        _ => Opening::Stop,
    }
}

async fn refuse(wr: &mut OwnedWriteHalf, addr: &str, shared: &Shared, reason: &str) -> Opening {
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

/// Runs one backend connection to its end.
async fn session(stream: TcpStream, addr: String, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    set_keepalive(&stream);
    let id: BackendId = NEXT_BACKEND.fetch_add(1, Ordering::Relaxed);
    let (rd, mut wr) = stream.into_split();
    let mut reader = LineReader::new(rd, shared.cfg.max_line_size);
    let (v2, first) = match opening(&mut reader, &mut wr, &addr, &shared).await {
        Opening::Serve { v2, first } => (v2, first),
        Opening::Stop => return,
    };
    let outbox =
        Arc::new(Outbox::new((!v2).then(|| shared.counters.clone()), outbox_lines(&shared.cfg), OUTBOX_MAX_BYTES));
    let dead = Arc::new(Dead::default());
    if shared.router.send(RouterMsg::BackendUp { id, addr: addr.clone(), outbox: outbox.clone(), v2 }).is_err() {
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
                    handle_line(id, v2, &line, &shared, &mut errors).await;
                }
            }
            Ok(Some(Line::TooLong(n))) => {
                incr(&shared.counters.backend_errors);
                errors.report(
                    "line too long",
                    &format!("discarded a line of {n} bytes (max_line_size={})", shared.cfg.max_line_size),
                );
            }
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
    let _ = shared.router.send(RouterMsg::BackendDown { id });
    let _ = writer.await;
}

async fn handle_line(id: BackendId, v2: bool, line: &[u8], shared: &Shared, errors: &mut ErrorLog) {
    match protocol::decode_backend_line(line) {
        Ok(BackendCommand::MessageToRoom { room_id, message }) => {
            crate::cluster::send_room(shared, &room_id, message);
        }
        Ok(BackendCommand::MessageToConnection { conn_id, message }) => {
            if !crate::cluster::send_private(shared, &conn_id, message) {
                tracing::debug!(backend = id, client_id = %conn_id, "private message for a client that is not connected");
            }
        }
        Ok(BackendCommand::Broadcast { message }) => {
            crate::cluster::broadcast(shared, message);
        }
        Ok(BackendCommand::Response(resp)) => {
            let _ = shared.router.send(RouterMsg::Response { backend: id, resp });
        }
        Ok(BackendCommand::Heartbeat) => {}
        Ok(BackendCommand::Ack { seq }) if v2 => {
            let _ = shared.router.send(RouterMsg::Ack { backend: id, seq });
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

/// Writes the outbox and heartbeats; sets `dead` when the backend cannot be written to.
async fn write_loop(
    wr: OwnedWriteHalf,
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
            Take::Lines => {
                if last_beat.elapsed() >= heartbeat {
                    batch.push(protocol::heartbeat_line());
                    last_beat = Instant::now();
                }
            }
            Take::Done => break,
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
        tracing::warn!(
            backend = id,
            max_lines = outbox.max_lines,
            max_bytes = outbox.max_bytes,
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

/// Logs bad backend input at most once per cause per 10 seconds, with a count of what was
/// suppressed, so a flood of garbage cannot flood the log.
struct ErrorLog {
    backend: BackendId,
    causes: HashMap<&'static str, (Instant, u64)>,
}

const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

impl ErrorLog {
    fn new(backend: BackendId) -> Self {
        ErrorLog { backend, causes: HashMap::new() }
    }

    fn report(&mut self, cause: &'static str, detail: &str) {
        let now = Instant::now();
        match self.causes.get_mut(cause) {
            Some((last, suppressed)) if now.duration_since(*last) < ERROR_LOG_EVERY => *suppressed += 1,
            Some((last, suppressed)) => {
                tracing::error!(
                    backend = self.backend,
                    cause,
                    suppressed = *suppressed,
                    "bad line from backend: {detail}"
                );
                *last = now;
                *suppressed = 0;
            }
            None => {
                tracing::error!(backend = self.backend, cause, "bad line from backend: {detail}");
                self.causes.insert(cause, (now, 0));
            }
        }
    }

    fn flush(&self) {
        for (cause, (_, suppressed)) in &self.causes {
            if *suppressed > 0 {
                tracing::error!(
                    backend = self.backend,
                    cause,
                    suppressed,
                    "more bad lines from backend were not logged"
                );
            }
        }
    }
}
