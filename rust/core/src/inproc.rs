//! The in-process backend transport: a backend that lives in the broker's own process (Python
//! handlers in the interpreter that embeds the broker) and talks to the router with no socket.
//!
//! It speaks the same lines as a TCP backend (so the router, acknowledgements, redelivery and
//! the clients' sans-I/O session are the same code), but nothing crosses the kernel per message:
//!
//! * Broker → backend: the router pushes lines into the link's [`Outbox`] as for any backend.
//!   The outbox calls the link's [`Wake`] on its empty→non-empty edge only; the wake sets a flag,
//!   notifies a condition variable (threading backends block on it with the GIL released) and
//!   writes one byte to a socket pair an event loop watches (`add_reader`). The backend drains a
//!   whole batch with one [`InprocLink::take`] on its own thread.
//! * Backend → broker: [`InprocLink::write`] hands a batch of lines (one drain's sends, answers
//!   and acks) to the link's task in the broker's runtime with one channel send, and returns.
//!   The task carries them out in order (`crate::backend::handle_line`), like a TCP backend's
//!   reader: the clients' tasks it wakes are woken from a runtime thread (no cross-thread wake per
//!   message), and the backend's thread does no parsing.
//! * Backpressure: the outbox has a high-water mark (`inproc_queue_size`); above it the router
//!   tells the WebSocket tasks feeding it to stop reading their clients until it drains.
//!
//! One tokio task per link carries out what the backend writes; no Python object is involved
//! here (the binding owns the GIL side).

use crate::backend::{self, handle_line, NEXT_BACKEND};
use crate::outbox::{Outbox, Take};
use crate::protocol::{self, BackendCommand, Hello, Line, LineSplitter};
use crate::router::{BackendId, RouterEvent};
use crate::shutdown::TaskGuard;
use crate::stats::incr;
use crate::throttle::ErrorLog;
use crate::Shared;
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What the backend hands to its link's task.
enum Work {
    Lines(Vec<u8>),
    /// The backend closed the link: finish what came before, then leave the router.
    Close,
}

/// What [`InprocLink::take`] found.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Status {
    /// Lines were moved into the caller's buffer.
    Lines,
    /// Nothing now; wait for the wake-up.
    Empty,
    /// The link is over (closed by the backend, or the broker is gone): end of stream.
    End,
}

/// The broker → backend wake-up: raised on the outbox's empty→non-empty edge, cleared by the
/// reader just before it takes lines, so a push after the take always raises it again.
struct Wake {
    pending: Mutex<bool>,
    cv: Condvar,
    rx: UnixStream,
    tx: UnixStream,
    /// The reader asked for end of stream (`shutdown`) or the link closed.
    ended: AtomicBool,
}

impl Wake {
    fn new() -> std::io::Result<Wake> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(Wake { pending: Mutex::new(false), cv: Condvar::new(), rx, tx, ended: AtomicBool::new(false) })
    }

    fn raise(&self) {
        let mut pending = self.pending.lock();
        if !*pending {
            *pending = true;
            // One byte per edge: the pair never holds more than one, so this cannot block.
            let _ = (&self.tx).write(&[1]);
            self.cv.notify_all();
        }
    }

    fn clear(&self) {
        let mut pending = self.pending.lock();
        if *pending {
            *pending = false;
            let mut buf = [0u8; 16];
            let _ = (&self.rx).read(&mut buf);
        }
    }

    /// Blocks until raised, or `timeout` passed; true if raised.
    fn wait(&self, timeout: Option<Duration>) -> bool {
        let mut pending = self.pending.lock();
        match timeout {
            None => {
                while !*pending {
                    self.cv.wait(&mut pending);
                }
            }
            Some(t) => {
                let deadline = Instant::now() + t;
                while !*pending {
                    if self.cv.wait_until(&mut pending, deadline).timed_out() {
                        break;
                    }
                }
            }
        }
        *pending
    }
}

struct LinkState {
    /// `None` until the backend's first line decided the protocol: `Some(v2)`.
    opened: Option<bool>,
    /// Splits what the backend writes into lines (a line may span writes).
    split: LineSplitter,
    /// The hello was refused: later lines are ignored until the backend closes the link.
    refused: bool,
    closed: bool,
    errors: ErrorLog,
    /// Held while the link is open, so the broker's shutdown waits for it.
    guard: Option<TaskGuard>,
}

pub(crate) struct Inner {
    /// To the link's task; `None` once closed.
    work: Mutex<Option<mpsc::UnboundedSender<Work>>>,
    shared: Arc<Shared>,
    id: BackendId,
    outbox: Arc<Outbox>,
    wake: Arc<Wake>,
    state: Mutex<LinkState>,
    /// Notified when a take finds the outbox finished and empty (see [`InprocLink::wait_drained`]).
    drained: Condvar,
    /// The first line registered the backend (read without the state lock, which the link's
    /// task holds while it carries out a batch).
    opened: AtomicBool,
    closed: AtomicBool,
    /// Bytes written by the backend and not yet carried out by the link's task.
    backlog: AtomicUsize,
    /// Notified (with `backlog_lock`) when the backlog falls to half of [`MAX_BACKLOG`].
    backlog_lock: Mutex<()>,
    backlog_cv: Condvar,
}

/// Bytes the backend may have written and the broker not yet carried out before its writes wait
/// (the backend → broker direction is bounded too).
pub const MAX_BACKLOG: usize = 64 * 1024 * 1024;

/// One in-process backend's link to the broker. Dropping it closes it.
pub struct InprocLink {
    inner: Arc<Inner>,
    /// The backend's own handle (closes the link when dropped), as opposed to the broker's
    /// temporary views of it.
    owner: bool,
}

/// The broker's side of its in-process links: closed when the broker has stopped, so a backend
/// never waits on a broker that is gone.
#[derive(Default)]
pub(crate) struct Links(Mutex<Vec<Weak<Inner>>>);

impl Links {
    pub(crate) fn snapshot(&self) -> Vec<InprocLink> {
        self.0.lock().iter().filter_map(Weak::upgrade).map(|inner| InprocLink { inner, owner: false }).collect()
    }

    pub(crate) fn close_all(&self) {
        for link in self.0.lock().drain(..) {
            if let Some(inner) = link.upgrade() {
                InprocLink { inner: inner.clone(), owner: false }.close();
                inner.finish(); // the runtime is about to go: do not wait for the link's task
            }
        }
    }
}

impl InprocLink {
    /// A new link, not yet known to the router (its first line, normally `hello`, registers it).
    pub(crate) fn open(
        shared: Arc<Shared>,
        guard: TaskGuard,
        links: &Links,
        runtime: &tokio::runtime::Handle,
    ) -> std::io::Result<InprocLink> {
        let wake = Arc::new(Wake::new()?);
        let hook_wake = wake.clone();
        let high_water = shared.cfg.inproc_queue_size;
        // Limits far above the high-water mark: every WebSocket task stops at the mark, so the
        // lines beyond it are bounded by the number of clients, redeliveries and requests.
        let outbox = Arc::new(
            Outbox::new(None, usize::MAX, usize::MAX).with_hook(Arc::new(move || hook_wake.raise()), high_water),
        );
        let id = NEXT_BACKEND.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            work: Mutex::new(Some(tx)),
            id,
            outbox,
            wake,
            state: Mutex::new(LinkState {
                opened: None,
                split: LineSplitter::new(shared.cfg.max_line_size),
                refused: false,
                closed: false,
                errors: ErrorLog::new(id),
                guard: Some(guard),
            }),
            drained: Condvar::new(),
            opened: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            backlog: AtomicUsize::new(0),
            backlog_lock: Mutex::new(()),
            backlog_cv: Condvar::new(),
            shared,
        });
        let mut all = links.0.lock();
        all.retain(|l| l.strong_count() > 0);
        all.push(Arc::downgrade(&inner));
        drop(all);
        runtime.spawn(work_loop(inner.clone(), rx));
        Ok(InprocLink { inner, owner: true })
    }

    /// The backend id the router and the logs know this link by.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The file descriptor that becomes readable when [`take`](Self::take) has something (for
    /// an event loop's `add_reader`). Never read it directly.
    pub fn wake_fd(&self) -> i32 {
        self.inner.wake.rx.as_raw_fd()
    }

    /// Moves up to `max` waiting lines into `out`, without blocking.
    pub fn take(&self, out: &mut Vec<Bytes>, max: usize) -> Status {
        let inner = &*self.inner;
        if inner.wake.ended.load(Ordering::Acquire) {
            return Status::End;
        }
        inner.wake.clear();
        match inner.outbox.take(out, max) {
            Take::Lines { more: true, .. } => {
                inner.wake.raise(); // more than one batch: come back at once
                Status::Lines
            }
            Take::Lines { finishing, .. } => {
                if finishing {
                    // That was the last batch of a finishing outbox. Its `finish` may have found
                    // the wake already raised (no new edge), so an event-loop reader is not
                    // woken again to see `Done`: tell `wait_drained` now.
                    inner.notify_drained();
                }
                Status::Lines
            }
            Take::Empty => Status::Empty,
            Take::Closed => Status::End,
            Take::Done => {
                // The broker is stopping and everything was handed over: the backend ends the
                // link itself once its handlers are done (see `wait_drained`).
                inner.notify_drained();
                Status::Empty
            }
        }
    }

    /// Blocks until [`take`](Self::take) may have something (or `timeout` passed).
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        self.inner.wake.wait(timeout)
    }

    /// Waits until the broker stopped routing to this link and the backend took every line
    /// (true), or `timeout` passed (false).
    pub fn wait_drained(&self, timeout: Duration) -> bool {
        let inner = &*self.inner;
        let deadline = Instant::now() + timeout;
        let mut st = inner.state.lock();
        loop {
            if st.closed || inner.outbox.drained() {
                return true;
            }
            if inner.drained.wait_until(&mut st, deadline).timed_out() {
                return inner.outbox.drained();
            }
        }
    }

    /// Hands `data` (the backend's lines; a partial last line waits for the rest) to the link's
    /// task, which carries them out in order. Never blocks.
    pub fn write(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let work = self.inner.work.lock();
        if let Some(tx) = work.as_ref() {
            if !self.inner.opened.load(Ordering::Acquire) {
                // The first line (our clients' hello) registers the backend with the router:
                // carry it out here, so the backend is routable once its connect() returns (a
                // connection request right after `Broker.start(backend=...)` got 503). Other
                // writers wait on `work` meanwhile, so the order of lines holds.
                self.inner.lines(data);
                return;
            }
            self.inner.backlog.fetch_add(data.len(), Ordering::AcqRel);
            if let Err(mpsc::error::SendError(Work::Lines(lines))) = tx.send(Work::Lines(data.to_vec())) {
                // The broker's runtime is gone: carry them out here (delivery never waits).
                self.inner.lines(&lines);
                self.inner.carried_out(lines.len());
            }
        }
    }

    /// Whether the backend wrote more than [`MAX_BACKLOG`] bytes the broker has not carried out
    /// yet: the caller should [`wait_backlog`](Self::wait_backlog) (without the GIL) first.
    pub fn backlogged(&self) -> bool {
        self.inner.backlog.load(Ordering::Acquire) > MAX_BACKLOG
    }

    /// Blocks until the backlog fell to half of [`MAX_BACKLOG`] (or the link closed).
    pub fn wait_backlog(&self) {
        let inner = &*self.inner;
        let mut guard = inner.backlog_lock.lock();
        while inner.backlog.load(Ordering::Acquire) > MAX_BACKLOG / 2 && !inner.closed.load(Ordering::Acquire) {
            inner.backlog_cv.wait_for(&mut guard, Duration::from_millis(100));
        }
    }

    /// Ends the stream for the reader ([`take`](Self::take) answers `End`); writes still work.
    pub fn shutdown(&self) {
        self.inner.wake.ended.store(true, Ordering::Release);
        self.inner.wake.raise();
    }

    /// Closes the link (idempotent): after the lines already written are carried out, the router
    /// forgets the backend and redelivers what it had not acknowledged to the others, and the
    /// broker's shutdown stops waiting for it.
    pub fn close(&self) {
        self.shutdown();
        let Some(tx) = self.inner.work.lock().take() else { return };
        if tx.send(Work::Close).is_err() {
            self.inner.finish(); // the runtime is gone: nothing else will
        }
    }

    /// True once the link is over (its task carried out the close, or the broker stopped).
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }
}

impl Drop for InprocLink {
    fn drop(&mut self) {
        if self.owner {
            self.close();
        }
    }
}

/// The link's task: carries out what the backend writes, in order, until it closes.
async fn work_loop(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Work>) {
    while let Some(work) = rx.recv().await {
        match work {
            Work::Lines(data) => {
                inner.lines(&data);
                inner.carried_out(data.len());
            }
            Work::Close => break,
        }
    }
    inner.finish();
}

impl Inner {
    fn notify_drained(&self) {
        let _st = self.state.lock();
        self.drained.notify_all();
    }

    /// Carries out the complete lines in `data`, keeping a partial last line for the next call.
    fn lines(&self, data: &[u8]) {
        let mut st = self.state.lock();
        if st.closed {
            return;
        }
        st.split.extend(data);
        while let Some(line) = st.split.next_line() {
            match line {
                Line::Data(line) => self.line(&mut st, &line),
                Line::TooLong(n) => {
                    let st = &mut *st;
                    backend::report_too_long(&self.shared, &mut st.errors, n);
                }
            }
        }
    }

    /// `n` bytes of the backlog were carried out.
    fn carried_out(&self, n: usize) {
        let before = self.backlog.fetch_sub(n, Ordering::AcqRel);
        if before > MAX_BACKLOG / 2 && before - n <= MAX_BACKLOG / 2 {
            let _g = self.backlog_lock.lock();
            self.backlog_cv.notify_all();
        }
    }

    /// The link is over: it leaves the router (which redelivers its unacknowledged events) and
    /// the broker's shutdown stops waiting for it. Idempotent.
    fn finish(&self) {
        let mut st = self.state.lock();
        if st.closed {
            return;
        }
        st.closed = true;
        self.closed.store(true, Ordering::Release);
        let registered = st.opened.is_some();
        st.errors.flush();
        let guard = st.guard.take();
        self.drained.notify_all();
        drop(st);
        self.outbox.close();
        if registered {
            let _ = self.shared.router.handle(RouterEvent::BackendDown { id: self.id });
            tracing::info!(backend = self.id, "in-process backend detached");
        }
        drop(guard);
        self.wake.ended.store(true, Ordering::Release);
        self.wake.raise();
    }

    fn line(&self, st: &mut LinkState, line: &[u8]) {
        if st.refused || line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let v2 = match st.opened {
            Some(v2) => v2,
            None => match self.open(st, line) {
                Some(true) => return, // it was the hello
                Some(false) => false,
                None => return, // refused
            },
        };
        handle_line(self.id, v2, line, &self.shared, &self.outbox, &mut st.errors);
    }

    /// The backend's first line: a `hello` negotiates v2 (answered with heartbeats off: a
    /// backend in this process cannot go silent without the link closing); anything else makes
    /// it a v1 backend. Returns whether the line was the hello, `None` when refused.
    fn open(&self, st: &mut LinkState, line: &[u8]) -> Option<bool> {
        let hello = match protocol::decode_backend_line(line) {
            Ok(BackendCommand::Hello(h)) => Some(h),
            _ => None,
        };
        let v2 = match hello {
            Some(Hello { version, .. }) if version < protocol::PROTOCOL_VERSION => {
                let reason = format!(
                    "unsupported protocol version {version} in hello (this broker speaks {})",
                    protocol::PROTOCOL_VERSION
                );
                tracing::warn!(backend = self.id, "in-process backend refused: {reason}");
                incr(&self.shared.counters.backends_refused);
                let _ = self.outbox.push(protocol::encode_hello_reply(Err(&reason)), false);
                self.outbox.finish();
                st.refused = true;
                return None;
            }
            Some(_) => {
                let _ = self.outbox.push(protocol::encode_hello_reply(Ok((0.0, backend::limits(&self.shared)))), false);
                true
            }
            None => false,
        };
        st.opened = Some(v2);
        self.opened.store(true, Ordering::Release);
        let up =
            RouterEvent::BackendUp { id: self.id, addr: "in-process".to_string(), outbox: self.outbox.clone(), v2 };
        if self.shared.router.handle(up).is_err() {
            self.outbox.finish(); // the broker is stopping: nothing will come
        }
        Some(v2)
    }
}
