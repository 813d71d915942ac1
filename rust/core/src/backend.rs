//! The backend side: a TCP listener for Python backends speaking protocol v1, and one session
//! per backend made of a reader task (lines → hub deliveries or router answers) and a writer task
//! (router lines + heartbeats → socket, batched, one flush per batch).
//!
//! A backend is declared dead when its connection ends, a write fails, or a write cannot complete
//! within the write deadline (it stopped reading); the router then moves its clients elsewhere.
//! Every bad line is counted and logged with a per-cause rate limit, and the session carries on
//! with the next line.

use crate::protocol::{self, BackendCommand, Line, LineReader};
use crate::router::{BackendId, RouterMsg};
use crate::shutdown::{Signal, TaskGuard};
use crate::stats::incr;
use crate::Shared;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

/// Lines that may wait for one backend's writer.
const BACKEND_QUEUE: usize = 8192;
/// Most lines written between two flushes.
const WRITE_BATCH: usize = 512;

static NEXT_BACKEND: AtomicU64 = AtomicU64::new(1);

/// Accepts backends until `stop` fires.
pub async fn listen(listener: TcpListener, shared: Arc<Shared>, stop: Signal, guard: TaskGuard) {
    crate::accept_loop(listener, "backend", stop, guard, |stream, addr| session(stream, addr.to_string(), shared.clone())).await;
}

fn set_keepalive(stream: &TcpStream) {
    let sock = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new().with_time(Duration::from_secs(30)).with_interval(Duration::from_secs(10));
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "could not enable TCP keepalive on a backend connection");
    }
}

/// Runs one backend connection to its end.
async fn session(stream: TcpStream, addr: String, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    set_keepalive(&stream);
    let id: BackendId = NEXT_BACKEND.fetch_add(1, Ordering::Relaxed);
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel(BACKEND_QUEUE);
    let dead = Arc::new(Dead::default());
    if shared.router.send(RouterMsg::BackendUp { id, addr: addr.clone(), tx }).await.is_err() {
        return; // broker is stopping
    }
    let write_deadline = (shared.cfg.heartbeat_interval * 2).max(Duration::from_secs(5));
    let writer = tokio::spawn(write_loop(wr, rx, shared.cfg.heartbeat_interval, write_deadline, dead.clone(), id, shared.clone()));

    let mut reader = LineReader::new(rd, shared.cfg.max_line_size);
    let mut errors = ErrorLog::new(id);
    loop {
        let line = tokio::select! {
            l = reader.next_line() => l,
            _ = dead.wait() => break,
        };
        match line {
            Ok(Some(Line::Data(line))) => {
                if !line.iter().all(u8::is_ascii_whitespace) {
                    handle_line(id, &line, &shared, &mut errors).await;
                }
            }
            Ok(Some(Line::TooLong(n))) => {
                incr(&shared.counters.backend_errors);
                errors.report("line too long", &format!("discarded a line of {n} bytes (max_line_size={})", shared.cfg.max_line_size));
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
    let _ = shared.router.send(RouterMsg::BackendDown { id }).await;
    let _ = writer.await;
}

async fn handle_line(id: BackendId, line: &[u8], shared: &Shared, errors: &mut ErrorLog) {
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
            let _ = shared.router.send(RouterMsg::Response { backend: id, resp }).await;
        }
        Ok(BackendCommand::Heartbeat) => {}
        Err(e) => {
            incr(&shared.counters.backend_errors);
            errors.report(e.cause, &e.detail);
        }
    }
}

/// Writes lines and heartbeats; sets `dead` when the backend cannot be written to.
async fn write_loop(
    wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Bytes>,
    heartbeat: Duration,
    deadline: Duration,
    dead: Arc<Dead>,
    id: BackendId,
    shared: Arc<Shared>,
) {
    let mut out = BufWriter::with_capacity(64 * 1024, wr);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unsent: u64 = 0;
    loop {
        let first = tokio::select! {
            line = rx.recv() => match line {
                Some(l) => l,
                None => break, // router let go: broker stopping or backend gone
            },
            _ = ticker.tick() => protocol::heartbeat_line(),
            _ = dead.wait() => break,
        };
        let mut batch = vec![first];
        while batch.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(l) => batch.push(l),
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let write = async {
            for line in &batch {
                out.write_all(line).await?;
            }
            out.flush().await
        };
        match tokio::time::timeout(deadline, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(backend = id, error = %e, "writing to backend failed; declaring it dead");
                unsent += n;
                break;
            }
            Err(_) => {
                tracing::warn!(backend = id, secs = deadline.as_secs_f64(), "backend stopped reading; declaring it dead");
                unsent += n;
                break;
            }
        }
    }
    if dead.set() {
        incr(&shared.counters.backends_lost);
    }
    rx.close();
    while rx.try_recv().is_ok() {
        unsent += 1;
    }
    if unsent > 0 {
        // Events this backend was handed but never got (v1 has no acknowledgements).
        crate::stats::add(&shared.counters.events_lost, unsent);
        tracing::warn!(backend = id, events = unsent, "events could not be written to a lost backend");
    }
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
                tracing::error!(backend = self.backend, cause, suppressed = *suppressed, "bad line from backend: {detail}");
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
                tracing::error!(backend = self.backend, cause, suppressed, "more bad lines from backend were not logged");
            }
        }
    }
}
