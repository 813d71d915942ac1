//! One backend's outbox: the bounded queue of lines waiting for that backend's writer task.
//!
//! It exists as a module of its own because both sides meet here: the router pushes lines into
//! it (never waiting, under its lock) and the backend session's writer drains it onto the socket.
//! Neither needs to know the other: router → outbox ← backend, and no cycle between them.
//!
//! The in-process backend (`crate::inproc`) drains an outbox from a Python thread instead of a
//! writer task, so an outbox can also call a hook on the empty→non-empty edge (the in-process
//! wake-up), and can carry a high-water mark: above it the router reports pressure and the
//! WebSocket tasks that fed it stop reading until [`Outbox::relieved`] (backpressure, not loss).

use crate::stats::{add, Counters};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::Notify;

/// Fewest lines one backend's outbox holds before the backend counts as too slow (and is
/// dropped). It is raised to fit a full redelivery plus a full queue (see [`max_lines`]), so
/// a healthy backend taking over a dead one's clients is never mistaken for a slow one.
const MIN_LINES: usize = 65_536;
/// Most bytes one backend's outbox holds (a single larger line is still accepted when it is
/// empty). A backend that stops reading is caught earlier by the write deadline; this bounds the
/// memory it can pin until then.
pub(crate) const MAX_BYTES: usize = 256 * 1024 * 1024;

/// The line bound of a backend's outbox: room for a whole redelivery and a whole no-backend
/// queue arriving at once, with a floor.
pub(crate) fn max_lines(cfg: &crate::Config) -> usize {
    (cfg.max_unacked * 2 + cfg.queue_size).max(MIN_LINES)
}

/// The lines waiting for one backend's writer. The router pushes without ever waiting; the
/// writer takes everything queued in one go. Bounded: a push beyond the bound closes the outbox,
/// which makes the backend count as dead.
pub(crate) struct Outbox {
    max_lines: usize,
    max_bytes: usize,
    state: Mutex<OutboxState>,
    wake: Notify,
    /// Set for v1 backends: events discarded on close are lost for good and counted.
    lost: Option<Arc<Counters>>,
    /// Called (besides `wake`) whenever the writer should look again: the in-process wake-up.
    hook: Option<Hook>,
    /// Lines above which pushes report pressure (0: never).
    high_water: usize,
    /// Woken when the lines fall to half the high-water mark, or the outbox ends.
    relief: Notify,
}

/// A wake-up the outbox calls on the empty→non-empty edge and when it finishes or closes.
pub(crate) type Hook = Arc<dyn Fn() + Send + Sync>;

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
pub(crate) enum Take {
    /// Lines were taken; `more` are still queued; `finishing`: no more pushes will come.
    Lines {
        more: bool,
        finishing: bool,
    },
    Empty,
    /// Finishing, and everything was taken.
    Done,
    /// Closed (what was queued was discarded).
    Closed,
}

impl Outbox {
    /// An outbox; `lost` counts the events a close discards (v1 backends, which cannot get them
    /// redelivered).
    pub(crate) fn new(lost: Option<Arc<Counters>>, max_lines: usize, max_bytes: usize) -> Self {
        Outbox {
            max_lines,
            max_bytes,
            state: Mutex::new(OutboxState { lines: VecDeque::new(), bytes: 0, mode: Mode::Open, overflowed: false }),
            wake: Notify::new(),
            lost,
            hook: None,
            high_water: 0,
            relief: Notify::new(),
        }
    }

    /// This outbox with a wake-up `hook` and a high-water mark for backpressure.
    pub(crate) fn with_hook(mut self, hook: Hook, high_water: usize) -> Self {
        self.hook = Some(hook);
        self.high_water = high_water;
        self
    }

    fn notify(&self) {
        self.wake.notify_one();
        if let Some(hook) = &self.hook {
            hook();
        }
    }

    /// Whether the lines reached the high-water mark (always false without one).
    pub(crate) fn pressured(&self) -> bool {
        self.high_water > 0 && self.state.lock().lines.len() >= self.high_water
    }

    /// Waits until the lines are down to half the high-water mark (or the outbox ended).
    pub(crate) async fn relieved(&self) {
        loop {
            let notified = self.relief.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.state.lock();
                if s.mode != Mode::Open || s.lines.len() <= self.high_water / 2 {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Queues a line; `Err` when the outbox is closed or just overflowed (and closed).
    pub(crate) fn push(&self, line: Bytes, is_event: bool) -> Result<(), ()> {
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
            self.notify();
        }
        Ok(())
    }

    /// Moves up to `max` queued lines into `out`.
    pub(crate) fn take(&self, out: &mut Vec<Bytes>, max: usize) -> Take {
        let mut s = self.state.lock();
        if s.mode == Mode::Closed {
            return Take::Closed;
        }
        if s.lines.is_empty() {
            return if s.mode == Mode::Finishing { Take::Done } else { Take::Empty };
        }
        let before = s.lines.len();
        let n = before.min(max);
        let mut taken = 0;
        for (line, _) in s.lines.drain(..n) {
            taken += line.len();
            out.push(line);
        }
        s.bytes -= taken;
        let low = self.high_water / 2;
        let relieved = self.high_water > 0 && before > low && s.lines.len() <= low;
        let taken = Take::Lines { more: !s.lines.is_empty(), finishing: s.mode == Mode::Finishing };
        drop(s);
        if relieved {
            self.relief.notify_waiters();
        }
        taken
    }

    /// Waits until something was pushed (or the outbox finished or closed) since the last take.
    pub(crate) async fn wait(&self) {
        self.wake.notified().await;
    }

    /// No more pushes; what is queued is still written.
    pub(crate) fn finish(&self) {
        let mut s = self.state.lock();
        if s.mode == Mode::Open {
            s.mode = Mode::Finishing;
        }
        drop(s);
        self.notify();
        self.relief.notify_waiters();
    }

    /// Discards what is queued and refuses further pushes (idempotent). For a v1 backend the
    /// discarded events are counted as lost.
    pub(crate) fn close(&self) {
        let mut s = self.state.lock();
        s.mode = Mode::Closed;
        let events = s.lines.iter().filter(|(_, ev)| *ev).count() as u64;
        s.lines.clear();
        s.bytes = 0;
        drop(s);
        self.notify();
        self.relief.notify_waiters();
        if let (Some(counters), true) = (&self.lost, events > 0) {
            add(&counters.events_lost, events);
            tracing::warn!(events, "events could not be written to a lost v1 backend (v1 has no redelivery)");
        }
    }

    /// Whether it takes no more pushes and holds nothing: finished and drained, or closed.
    pub(crate) fn drained(&self) -> bool {
        let s = self.state.lock();
        s.mode != Mode::Open && s.lines.is_empty()
    }

    /// Whether it closed because a push found it full.
    pub(crate) fn overflowed(&self) -> bool {
        self.state.lock().overflowed
    }

    /// Its bounds: (lines, bytes).
    pub(crate) fn limits(&self) -> (usize, usize) {
        (self.max_lines, self.max_bytes)
    }

    #[cfg(test)]
    pub(crate) fn pop(&self) -> Option<Bytes> {
        let mut s = self.state.lock();
        let (line, _) = s.lines.pop_front()?;
        s.bytes -= line.len();
        Some(line)
    }
}
