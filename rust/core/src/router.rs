//! The router: the one owner of everything about backends — which are live, which backend each
//! client is pinned to, the events a v2 backend has not acknowledged yet, the queue of events
//! waiting for a backend, and the connection requests waiting for an answer.
//!
//! It is a state machine behind one lock, not an actor: there is no router task and no channel to
//! it. Whoever has news for it (a client's connection task, a backend's reader) calls
//! [`Router::handle`] with a [`RouterEvent`], which updates the state in place, under the lock,
//! on the caller's task. No handling ever waits on I/O (lines go into outboxes without waiting),
//! so the lock is held for microseconds, and an event costs no hop through another task. The
//! lock gives a strict order: the events of one client reach one backend in the order the client
//! produced them, and redelivered events go ahead of anything newer.
//!
//! * Sticky routing: a client is pinned to the backend that accepted it; if that backend goes
//!   away, the client's next event pins it to another live backend (round robin).
//! * Never blocking: lines go into each backend's [`Outbox`] without waiting. A backend that
//!   falls too far behind overflows its outbox and is dropped like a dead one, so one stalled
//!   backend cannot hold up routing for the others.
//! * v2 backends: each event carries a per-connection `seq` and stays in the backend's unacked
//!   buffer until a cumulative `ack` covers it. When the backend is lost, those events are
//!   redelivered in order (marked `redelivered`) to the backends that take over their clients.
//! * No backend: events wait in a bounded queue (`queue_size`, drop-oldest, counted) and are
//!   flushed in order to the first backend that connects. Connection requests are answered 503.
//! * A connection request whose backend dies is re-sent to another live backend.

use crate::outbox::Outbox;
use crate::protocol::{self, AcceptResponse};
use crate::stats::{add, incr, Counters};
use bytes::Bytes;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::oneshot;

pub(crate) type BackendId = u64;

/// What a waiting WebSocket handshake is told.
#[derive(Debug)]
pub(crate) enum Decision {
    Accept { client_id: String, room_id: String, metadata: Value, user_id: Option<String> },
    Reject { reason: Option<String> },
    Unavailable(&'static str),
}

/// Something the router must react to, handed to [`Router::handle`].
pub(crate) enum RouterEvent {
    /// An event of a client, already encoded as a v1 line. `last` ends the client's pinning.
    ClientEvent {
        client_id: Arc<str>,
        line: Bytes,
        last: bool,
    },
    /// Ask a backend whether to accept a connection.
    ConnRequest {
        request_id: String,
        url: String,
        line: Bytes,
        reply: oneshot::Sender<Decision>,
    },
    /// The handshake gave up waiting (deadline passed).
    CancelRequest {
        request_id: String,
    },
    /// A backend answered a connection request.
    Response {
        backend: BackendId,
        resp: AcceptResponse,
    },
    /// A backend connected; `v2` when it negotiated acknowledgements.
    BackendUp {
        id: BackendId,
        addr: String,
        outbox: Arc<Outbox>,
        v2: bool,
    },
    /// A v2 backend handled every event up to `seq`.
    Ack {
        backend: BackendId,
        seq: u64,
    },
    BackendDown {
        id: BackendId,
    },
}

/// Figures the router publishes for `stats()`.
#[derive(Default, Debug)]
pub(crate) struct Gauges {
    pub(crate) backends: AtomicUsize,
    pub(crate) queued_events: AtomicUsize,
    pub(crate) pending_requests: AtomicUsize,
    pub(crate) unacked_events: AtomicUsize,
}

/// Router settings.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Events kept while no backend is up.
    pub(crate) queue_size: usize,
    /// Unacknowledged events kept per v2 backend.
    pub(crate) max_unacked: usize,
    /// Longest client, room or user id a backend may set on accept (bytes).
    pub(crate) max_id_length: usize,
}

struct Pending {
    backend: BackendId,
    url: String,
    line: Bytes,
    reply: oneshot::Sender<Decision>,
}

/// An event a v2 backend has not acknowledged yet.
struct Unacked {
    seq: u64,
    event: Queued,
}

/// An event on its way to a backend: the v1 line plus what routing needs to know.
struct Queued {
    client_id: Arc<str>,
    line: Bytes,
    last: bool,
    redelivered: bool,
}

struct Backend {
    id: BackendId,
    outbox: Arc<Outbox>,
    v2: bool,
    next_seq: u64,
    unacked: VecDeque<Unacked>,
    overflow_warned: bool,
}

/// Everything the router knows; only ever touched under [`Router`]'s lock.
struct State {
    backends: Vec<Backend>,
    next: usize,
    pinned: HashMap<Arc<str>, BackendId>,
    queue: VecDeque<Queued>,
    limits: Limits,
    pending: HashMap<String, Pending>,
    unacked_total: usize,
    counters: Arc<Counters>,
    gauges: Arc<Gauges>,
}

/// The router is stopped: the broker is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stopped;

/// The router: its state behind one lock, shared by every task of the broker. Calling
/// [`handle`](Router::handle) updates it at once, on the caller's task.
pub(crate) struct Router {
    state: Mutex<Option<State>>,
}

impl Router {
    pub(crate) fn new(limits: Limits, counters: Arc<Counters>, gauges: Arc<Gauges>) -> Self {
        let state = State {
            backends: Vec::new(),
            next: 0,
            pinned: HashMap::new(),
            queue: VecDeque::new(),
            limits,
            pending: HashMap::new(),
            unacked_total: 0,
            counters,
            gauges,
        };
        Router { state: Mutex::new(Some(state)) }
    }

    /// Handles `event` now; after [`stop`](Router::stop) it is refused (a connection
    /// request's reply channel is dropped with it, which its waiter sees as "stopping").
    pub(crate) fn handle(&self, event: RouterEvent) -> Result<(), Stopped> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match state.as_mut() {
            Some(state) => {
                state.handle(event);
                Ok(())
            }
            None => Err(Stopped),
        }
    }

    /// A client's event, like [`RouterEvent::ClientEvent`]; returns the outbox it went to when
    /// that outbox is above its high-water mark, so the caller can wait for
    /// [`Outbox::relieved`] before reading more from the client.
    pub(crate) fn client_event(&self, client_id: Arc<str>, line: Bytes, last: bool) -> Option<Arc<Outbox>> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let state = state.as_mut()?;
        let pressure = state.route(Queued { client_id, line, last, redelivered: false });
        state.publish_gauges();
        pressure
    }

    /// Stops routing (idempotent): every backend's writer is told to flush what it has and
    /// finish, and events still waiting for a backend are discarded and counted.
    pub(crate) fn stop(&self) {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some(r) = state else { return };
        for b in &r.backends {
            b.outbox.finish();
        }
        if !r.queue.is_empty() {
            tracing::warn!(
                events = r.queue.len(),
                "broker stopped with events still waiting for a backend; they are discarded"
            );
            add(&r.counters.queue_dropped, r.queue.len() as u64);
        }
    }
}

impl State {
    fn handle(&mut self, event: RouterEvent) {
        match event {
            RouterEvent::ClientEvent { client_id, line, last } => {
                self.route(Queued { client_id, line, last, redelivered: false });
            }
            RouterEvent::ConnRequest { request_id, url, line, reply } => self.ask(request_id, url, line, reply),
            RouterEvent::CancelRequest { request_id } => {
                self.pending.remove(&request_id);
            }
            RouterEvent::Response { backend, resp } => self.answer(backend, resp),
            RouterEvent::BackendUp { id, addr, outbox, v2 } => {
                tracing::info!(backend = id, %addr, protocol = if v2 { 2 } else { 1 }, "backend connected");
                self.backends.push(Backend {
                    id,
                    outbox,
                    v2,
                    next_seq: 1,
                    unacked: VecDeque::new(),
                    overflow_warned: false,
                });
                self.flush_queue();
            }
            RouterEvent::Ack { backend, seq } => self.ack(backend, seq),
            RouterEvent::BackendDown { id } => self.drop_backend(id),
        }
        self.publish_gauges();
    }

    fn publish_gauges(&self) {
        self.gauges.backends.store(self.backends.len(), Relaxed);
        self.gauges.queued_events.store(self.queue.len(), Relaxed);
        self.gauges.pending_requests.store(self.pending.len(), Relaxed);
        self.gauges.unacked_events.store(self.unacked_total, Relaxed);
    }

    fn position(&self, id: BackendId) -> Option<usize> {
        self.backends.iter().position(|b| b.id == id)
    }

    /// The next backend in round-robin order, as a position in `backends`.
    fn pick(&mut self) -> Option<usize> {
        if self.backends.is_empty() {
            return None;
        }
        self.next = (self.next + 1) % self.backends.len();
        Some(self.next)
    }

    fn enqueue(&mut self, ev: Queued) {
        if self.limits.queue_size == 0 {
            incr(&self.counters.queue_dropped);
            return;
        }
        if self.queue.len() >= self.limits.queue_size {
            self.queue.pop_front();
            incr(&self.counters.queue_dropped);
        }
        self.queue.push_back(ev);
    }

    /// Sends one client event to the client's backend (pinning it on first use), or queues it.
    /// Returns the backend's outbox when it is above its high-water mark (in-process backends:
    /// the client should stop sending until it drains).
    fn route(&mut self, ev: Queued) -> Option<Arc<Outbox>> {
        loop {
            let pinned = self.pinned.get(&ev.client_id).and_then(|&b| self.position(b));
            let Some(pos) = pinned.or_else(|| self.pick()) else {
                self.enqueue(ev);
                return None;
            };
            let b = &mut self.backends[pos];
            let id = b.id;
            if b.v2 {
                // The event is kept until acknowledged; if the outbox refuses it, dropping the
                // backend redelivers it together with the rest of the unacknowledged ones.
                let seq = b.next_seq;
                b.next_seq += 1;
                let wire = protocol::with_seq(&ev.line, seq, ev.redelivered);
                let (client_id, last) = (ev.client_id.clone(), ev.last);
                if b.unacked.len() >= self.limits.max_unacked {
                    b.unacked.pop_front();
                    self.unacked_total -= 1;
                    incr(&self.counters.unacked_overflow);
                    if !b.overflow_warned {
                        b.overflow_warned = true;
                        tracing::warn!(backend = id, max_unacked = self.limits.max_unacked, "backend is not acknowledging events fast enough; the oldest are no longer kept for redelivery");
                    }
                }
                b.unacked.push_back(Unacked { seq, event: ev });
                self.unacked_total += 1;
                if b.outbox.push(wire, true).is_err() {
                    self.drop_backend(id);
                    return None;
                }
                let pressure = b.outbox.pressured().then(|| b.outbox.clone());
                incr(&self.counters.events_to_backends);
                self.pin(client_id, id, last);
                return pressure;
            }
            match b.outbox.push(ev.line.clone(), true) {
                Ok(()) => {
                    let pressure = b.outbox.pressured().then(|| b.outbox.clone());
                    incr(&self.counters.events_to_backends);
                    self.pin(ev.client_id, id, ev.last);
                    return pressure;
                }
                Err(()) => self.drop_backend(id),
            }
        }
    }

    fn pin(&mut self, client_id: Arc<str>, backend: BackendId, last: bool) {
        if last {
            self.pinned.remove(&client_id);
        } else {
            self.pinned.insert(client_id, backend);
        }
    }

    fn flush_queue(&mut self) {
        while !self.backends.is_empty() {
            let Some(ev) = self.queue.pop_front() else { return };
            let _ = self.route(ev);
        }
    }

    fn ack(&mut self, id: BackendId, seq: u64) {
        let Some(pos) = self.position(id) else { return };
        let b = &mut self.backends[pos];
        if seq >= b.next_seq {
            tracing::warn!(backend = id, seq, sent = b.next_seq - 1, "backend acknowledged events it was never sent");
        }
        while b.unacked.front().is_some_and(|u| u.seq <= seq) {
            b.unacked.pop_front();
            self.unacked_total -= 1;
        }
    }

    fn ask(&mut self, request_id: String, url: String, line: Bytes, reply: oneshot::Sender<Decision>) {
        loop {
            let Some(pos) = self.pick() else {
                let _ = reply.send(Decision::Unavailable("no backend connected"));
                return;
            };
            let id = self.backends[pos].id;
            match self.backends[pos].outbox.push(line.clone(), false) {
                Ok(()) => {
                    self.pending.insert(request_id, Pending { backend: id, url, line, reply });
                    return;
                }
                Err(()) => self.drop_backend(id),
            }
        }
    }

    fn answer(&mut self, backend: BackendId, resp: AcceptResponse) {
        let Some(p) = self.pending.remove(&resp.request_id) else {
            tracing::debug!(request_id = %resp.request_id, "response to an unknown or expired connection request");
            return;
        };
        let decision = if resp.accepted {
            let client_id =
                resp.client_id.filter(|c| !c.is_empty()).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            // A room or user id the backend chose is bounded by `max_id_length` (the room from
            // the URL and the client id are not: v1 backends may rely on long ones).
            let max = self.limits.max_id_length;
            let user_id = resp.user_id.filter(|u| !u.is_empty());
            let too_long = |id: &Option<String>| id.as_ref().is_some_and(|i| i.len() > max);
            if too_long(&resp.room_id) || too_long(&user_id) {
                self.counters.backend_errors.fetch_add(1, Relaxed);
                tracing::warn!(
                    "a backend accepted a connection with a room_id or user_id over {max} bytes (max_id_length); answered 503"
                );
                let _ = p.reply.send(Decision::Unavailable("backend answered with an id over max_id_length"));
                return;
            }
            let room_id = resp.room_id.unwrap_or(p.url);
            if self.position(backend).is_some() {
                self.pinned.insert(Arc::from(client_id.as_str()), backend);
            }
            Decision::Accept { client_id, room_id, metadata: resp.metadata, user_id }
        } else {
            Decision::Reject { reason: resp.reason }
        };
        let _ = p.reply.send(decision);
    }

    /// Forgets a backend (idempotent): its outbox is closed, its unacknowledged events are
    /// redelivered in order, and its unanswered connection requests go to another backend.
    fn drop_backend(&mut self, id: BackendId) {
        let Some(pos) = self.position(id) else { return };
        let b = self.backends.remove(pos);
        if self.next >= self.backends.len() {
            self.next = 0;
        }
        b.outbox.close();
        tracing::warn!(
            backend = id,
            remaining = self.backends.len(),
            unacked = b.unacked.len(),
            "backend gone; its clients move to the remaining backends"
        );
        self.unacked_total -= b.unacked.len();
        if !b.unacked.is_empty() {
            add(&self.counters.events_redelivered, b.unacked.len() as u64);
        }
        for u in b.unacked {
            let _ = self.route(Queued { redelivered: true, ..u.event });
        }
        let orphaned: Vec<String> =
            self.pending.iter().filter(|(_, p)| p.backend == id).map(|(k, _)| k.clone()).collect();
        for request_id in orphaned {
            if let Some(p) = self.pending.remove(&request_id) {
                self.ask(request_id, p.url, p.line, p.reply);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(queue_size: usize) -> (Router, Arc<Counters>) {
        start_with(Limits { queue_size, max_unacked: 1000, max_id_length: 256 })
    }

    fn start_with(limits: Limits) -> (Router, Arc<Counters>) {
        let counters = Arc::new(Counters::default());
        (Router::new(limits, counters.clone(), Arc::default()), counters)
    }

    fn ev(c: &str, n: u32, last: bool) -> RouterEvent {
        RouterEvent::ClientEvent { client_id: c.into(), line: Bytes::from(format!("{c}{n}")), last }
    }

    /// A backend as the router sees it, plus a way to read what it was sent.
    async fn backend(router: &Router, id: BackendId, v2: bool) -> Arc<Outbox> {
        backend_with(router, id, v2, 1_000_000).await
    }

    async fn backend_with(router: &Router, id: BackendId, v2: bool, max_lines: usize) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox::new(None, max_lines, usize::MAX));
        router.handle(RouterEvent::BackendUp { id, addr: id.to_string(), outbox: outbox.clone(), v2 }).unwrap();
        outbox
    }

    /// The next line in an outbox, waiting (on the outbox's own wake-up) for the router to put
    /// it there.
    async fn next(outbox: &Outbox) -> Bytes {
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                if let Some(l) = outbox.pop() {
                    return l;
                }
                outbox.wait().await;
            }
        })
        .await
        .expect("a line within 5 s")
    }

    #[tokio::test]
    async fn queue_flushes_in_order_and_drops_oldest() {
        let (router, counters) = start(3);
        for n in 0..5 {
            router.handle(ev("a", n, false)).unwrap();
        }
        let b = backend(&router, 1, false).await;
        for want in ["a2", "a3", "a4"] {
            assert_eq!(next(&b).await, Bytes::from(want));
        }
        assert_eq!(counters.queue_dropped.load(Relaxed), 2);
        router.stop();
    }

    #[tokio::test]
    async fn clients_stick_to_one_backend_and_move_when_it_dies() {
        let (router, _c) = start(10);
        let b1 = backend(&router, 1, false).await;
        let b2 = backend(&router, 2, false).await;
        for n in 0..10 {
            router.handle(ev("a", n, false)).unwrap();
            router.handle(ev("b", n, false)).unwrap();
        }
        let mut got1 = Vec::new();
        let mut got2 = Vec::new();
        for _ in 0..10 {
            got1.push(next(&b1).await);
            got2.push(next(&b2).await);
        }
        let first1 = got1[0][0];
        assert!(got1.iter().all(|l| l[0] == first1), "one client per backend");
        assert!(got2.iter().all(|l| l[0] != first1));
        let expect: Vec<Bytes> = (0..10).map(|n| Bytes::from(format!("{}{n}", first1 as char))).collect();
        assert_eq!(got1, expect, "in order");
        // Backend 1 dies: its client continues on backend 2.
        router.handle(RouterEvent::BackendDown { id: 1 }).unwrap();
        router.handle(ev(&(first1 as char).to_string(), 99, false)).unwrap();
        assert_eq!(next(&b2).await, Bytes::from(format!("{}99", first1 as char)));
        router.stop();
    }

    #[tokio::test]
    async fn connection_requests_are_answered_or_refused() {
        let (router, _c) = start(10);
        let (otx, orx) = oneshot::channel();
        router
            .handle(RouterEvent::ConnRequest {
                request_id: "r1".into(),
                url: "/a".into(),
                line: Bytes::from("q"),
                reply: otx,
            })
            .unwrap();
        assert!(matches!(orx.await.unwrap(), Decision::Unavailable(_)));

        let b1 = backend(&router, 1, false).await;
        let (otx, orx) = oneshot::channel();
        router
            .handle(RouterEvent::ConnRequest {
                request_id: "r2".into(),
                url: "/room".into(),
                line: Bytes::from("q2"),
                reply: otx,
            })
            .unwrap();
        assert_eq!(next(&b1).await, Bytes::from("q2"));
        let resp = AcceptResponse {
            request_id: "r2".into(),
            accepted: true,
            client_id: None,
            room_id: None,
            metadata: Value::Null,
            reason: None,
            user_id: None,
        };
        router.handle(RouterEvent::Response { backend: 1, resp }).unwrap();
        match orx.await.unwrap() {
            Decision::Accept { client_id, room_id, .. } => {
                assert_eq!(client_id.len(), 36, "a fresh uuid when the backend gave none");
                assert_eq!(room_id, "/room");
            }
            other => panic!("{other:?}"),
        }
        router.stop();
    }

    #[tokio::test]
    async fn a_request_whose_backend_dies_goes_to_another() {
        let (router, _c) = start(10);
        let b1 = backend(&router, 1, false).await;
        let b2 = backend(&router, 2, false).await;
        let (otx, _orx) = oneshot::channel();
        router
            .handle(RouterEvent::ConnRequest {
                request_id: "r".into(),
                url: "/".into(),
                line: Bytes::from("q"),
                reply: otx,
            })
            .unwrap();
        let first = tokio::select! {
            l = next(&b1) => { assert_eq!(l, Bytes::from("q")); 1 }
            l = next(&b2) => { assert_eq!(l, Bytes::from("q")); 2 }
        };
        let other = if first == 1 { &b2 } else { &b1 };
        router.handle(RouterEvent::BackendDown { id: first }).unwrap();
        assert_eq!(next(other).await, Bytes::from("q"));
        router.stop();
    }

    fn parse(line: &Bytes) -> Value {
        serde_json::from_slice(line).unwrap()
    }

    fn v2_ev(c: &str, n: u32) -> RouterEvent {
        let line =
            protocol::encode_new_message(&n.to_string(), &format!("{c}{n}"), &format!(r#"{{"client_id":"{c}"}}"#));
        RouterEvent::ClientEvent { client_id: c.into(), line, last: false }
    }

    #[tokio::test]
    async fn unacknowledged_events_are_redelivered_in_order_ahead_of_newer_ones() {
        let (router, counters) = start(10);
        let b1 = backend(&router, 1, true).await;
        for n in 0..5 {
            router.handle(v2_ev("a", n)).unwrap();
        }
        for n in 0..5u64 {
            let v = parse(&next(&b1).await);
            assert_eq!(v["seq"].as_u64(), Some(n + 1));
            assert_eq!(v["request_id"].as_str(), Some(n.to_string().as_str()));
        }
        router.handle(RouterEvent::Ack { backend: 1, seq: 2 }).unwrap();
        let b2 = backend(&router, 2, true).await;
        router.handle(RouterEvent::BackendDown { id: 1 }).unwrap();
        router.handle(v2_ev("a", 5)).unwrap();
        // Events 2, 3, 4 (seq 3..5 on backend 1) come again, marked, with backend 2's seqs, then 5.
        for (i, n) in [2u64, 3, 4, 5].iter().enumerate() {
            let v = parse(&next(&b2).await);
            assert_eq!(v["seq"].as_u64(), Some(i as u64 + 1));
            assert_eq!(v["request_id"].as_str(), Some(n.to_string().as_str()), "same event id on redelivery");
            assert_eq!(v.get("redelivered").is_some(), *n < 5);
        }
        assert_eq!(counters.events_redelivered.load(Relaxed), 3);
        router.stop();
    }

    #[tokio::test]
    async fn redelivery_waits_in_the_queue_when_no_backend_is_up() {
        let (router, counters) = start(2);
        let b1 = backend(&router, 1, true).await;
        for n in 0..3 {
            router.handle(v2_ev("a", n)).unwrap();
        }
        for _ in 0..3 {
            next(&b1).await;
        }
        router.handle(RouterEvent::BackendDown { id: 1 }).unwrap();
        let b2 = backend(&router, 2, true).await;
        // Queue of 2: the oldest of the three redelivered events was dropped and counted.
        for n in [1u64, 2] {
            let v = parse(&next(&b2).await);
            assert_eq!(v["request_id"].as_str(), Some(n.to_string().as_str()));
            assert_eq!(v["redelivered"], Value::Bool(true));
        }
        assert_eq!(counters.queue_dropped.load(Relaxed), 1);
        router.stop();
    }

    #[tokio::test]
    async fn an_overflowing_backend_is_dropped_without_stalling_the_router() {
        let (router, counters) = start_with(Limits { queue_size: 100_000, max_unacked: 100_000, max_id_length: 256 });
        let _stuck = backend_with(&router, 1, true, OUTBOX_LIMIT_FOR_TESTS).await; // never read: overflows
        let n = OUTBOX_LIMIT_FOR_TESTS + 10;
        for i in 0..n {
            router.handle(v2_ev("a", i as u32)).unwrap();
        }
        let b2 = backend(&router, 2, true).await;
        // Everything the stuck backend had, and what came after, reaches backend 2 in order.
        for i in 0..n {
            let v = parse(&next(&b2).await);
            assert_eq!(v["request_id"].as_str(), Some(i.to_string().as_str()));
        }
        assert_eq!(counters.events_redelivered.load(Relaxed), OUTBOX_LIMIT_FOR_TESTS as u64 + 1);
        router.stop();
    }

    const OUTBOX_LIMIT_FOR_TESTS: usize = 100;

    #[tokio::test]
    async fn max_unacked_releases_the_oldest_and_counts() {
        let (router, counters) = start_with(Limits { queue_size: 10, max_unacked: 2, max_id_length: 256 });
        let b1 = backend(&router, 1, true).await;
        for n in 0..5 {
            router.handle(v2_ev("a", n)).unwrap();
        }
        for _ in 0..5 {
            next(&b1).await;
        }
        assert_eq!(counters.unacked_overflow.load(Relaxed), 3);
        let b2 = backend(&router, 2, true).await;
        router.handle(RouterEvent::BackendDown { id: 1 }).unwrap();
        for n in [3u64, 4] {
            assert_eq!(parse(&next(&b2).await)["request_id"].as_str(), Some(n.to_string().as_str()));
        }
        router.stop();
    }
}
