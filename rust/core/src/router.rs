//! The router: one task that owns everything about backends — which are live, which backend each
//! client is pinned to, the queue of events waiting for a backend, and the connection requests
//! waiting for an answer. Being a single task, it needs no locks and keeps a strict order: the
//! events of one client reach one backend in the order the client produced them.
//!
//! * Sticky routing: a client is pinned to the backend that accepted it; if that backend goes
//!   away, the client's next event pins it to another live backend (round robin).
//! * No backend: events wait in a bounded queue (`queue_size`, drop-oldest, counted) and are
//!   flushed in order to the first backend that connects. Connection requests are answered 503.
//! * A connection request whose backend dies is re-sent to another live backend.

use crate::protocol::AcceptResponse;
use crate::shutdown::Signal;
use crate::stats::{incr, Counters};
use bytes::Bytes;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

pub type BackendId = u64;

/// What a waiting WebSocket handshake is told.
#[derive(Debug)]
pub enum Decision {
    Accept { client_id: String, room_id: String, metadata: Value, backend: BackendId },
    Reject { reason: Option<String> },
    Unavailable(&'static str),
}

/// Messages to the router task.
pub enum RouterMsg {
    /// An event of a client, already encoded as a v1 line. `last` ends the client's pinning.
    Event { client_id: Arc<str>, line: Bytes, last: bool },
    /// Ask a backend whether to accept a connection.
    ConnRequest { request_id: String, url: String, line: Bytes, reply: oneshot::Sender<Decision> },
    /// The handshake gave up waiting (deadline passed).
    CancelRequest { request_id: String },
    /// A backend answered a connection request.
    Response { backend: BackendId, resp: AcceptResponse },
    BackendUp { id: BackendId, addr: String, tx: mpsc::Sender<Bytes> },
    BackendDown { id: BackendId },
}

/// Figures the router publishes for `stats()`.
#[derive(Default, Debug)]
pub struct Gauges {
    pub backends: AtomicUsize,
    pub queued_events: AtomicUsize,
    pub pending_requests: AtomicUsize,
}

struct Pending {
    backend: BackendId,
    url: String,
    line: Bytes,
    reply: oneshot::Sender<Decision>,
}

struct Router {
    backends: Vec<(BackendId, String, mpsc::Sender<Bytes>)>,
    next: usize,
    pinned: HashMap<Arc<str>, BackendId>,
    queue: VecDeque<(Arc<str>, Bytes, bool)>,
    queue_size: usize,
    pending: HashMap<String, Pending>,
    counters: Arc<Counters>,
    gauges: Arc<Gauges>,
}

/// Runs the router until `stop` fires, then handles what is already in its inbox and returns,
/// dropping the backends' queues so their writers flush and finish.
pub async fn run(mut rx: mpsc::Receiver<RouterMsg>, queue_size: usize, counters: Arc<Counters>, gauges: Arc<Gauges>, mut stop: Signal) {
    let mut r = Router {
        backends: Vec::new(),
        next: 0,
        pinned: HashMap::new(),
        queue: VecDeque::new(),
        queue_size,
        pending: HashMap::new(),
        counters,
        gauges,
    };
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(m) => r.handle(m).await,
                None => break,
            },
            _ = stop.fired() => {
                rx.close();
                while let Some(m) = rx.recv().await {
                    r.handle(m).await;
                }
                break;
            }
        }
    }
    if !r.queue.is_empty() {
        tracing::warn!(events = r.queue.len(), "broker stopped with events still waiting for a backend; they are discarded");
        crate::stats::add(&r.counters.queue_dropped, r.queue.len() as u64);
    }
}

impl Router {
    async fn handle(&mut self, msg: RouterMsg) {
        match msg {
            RouterMsg::Event { client_id, line, last } => self.route(client_id, line, last).await,
            RouterMsg::ConnRequest { request_id, url, line, reply } => self.ask(request_id, url, line, reply).await,
            RouterMsg::CancelRequest { request_id } => {
                self.pending.remove(&request_id);
            }
            RouterMsg::Response { backend, resp } => self.answer(backend, resp),
            RouterMsg::BackendUp { id, addr, tx } => {
                tracing::info!(backend = id, %addr, "backend connected");
                self.backends.push((id, addr, tx));
                self.flush_queue().await;
            }
            RouterMsg::BackendDown { id } => self.backend_down(id).await,
        }
        self.gauges.backends.store(self.backends.len(), Relaxed);
        self.gauges.queued_events.store(self.queue.len(), Relaxed);
        self.gauges.pending_requests.store(self.pending.len(), Relaxed);
    }

    fn is_live(&self, id: BackendId) -> bool {
        self.backends.iter().any(|(b, _, _)| *b == id)
    }

    fn pick(&mut self) -> Option<BackendId> {
        if self.backends.is_empty() {
            return None;
        }
        self.next = (self.next + 1) % self.backends.len();
        Some(self.backends[self.next].0)
    }

    /// Sends a line to a backend; on failure the backend is treated as gone.
    async fn send_to(&mut self, id: BackendId, line: Bytes) -> Result<(), Bytes> {
        let Some(tx) = self.backends.iter().find(|(b, _, _)| *b == id).map(|(_, _, tx)| tx.clone()) else {
            return Err(line);
        };
        match tx.send(line).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(line)) => {
                self.forget_backend(id);
                Err(line)
            }
        }
    }

    fn enqueue(&mut self, client_id: Arc<str>, line: Bytes, last: bool) {
        if self.queue_size == 0 {
            incr(&self.counters.queue_dropped);
            return;
        }
        if self.queue.len() >= self.queue_size {
            self.queue.pop_front();
            incr(&self.counters.queue_dropped);
        }
        self.queue.push_back((client_id, line, last));
    }

    async fn route(&mut self, client_id: Arc<str>, mut line: Bytes, last: bool) {
        loop {
            let target = match self.pinned.get(&client_id) {
                Some(&b) if self.is_live(b) => Some(b),
                _ => self.pick(),
            };
            let Some(backend) = target else {
                self.enqueue(client_id, line, last);
                return;
            };
            match self.send_to(backend, line).await {
                Ok(()) => {
                    incr(&self.counters.events_to_backends);
                    if last {
                        self.pinned.remove(&client_id);
                    } else {
                        self.pinned.insert(client_id, backend);
                    }
                    return;
                }
                Err(back) => line = back,
            }
        }
    }

    async fn flush_queue(&mut self) {
        while let Some((client_id, line, last)) = self.queue.pop_front() {
            if self.backends.is_empty() {
                self.queue.push_front((client_id, line, last));
                return;
            }
            self.route(client_id, line, last).await;
        }
    }

    async fn ask(&mut self, request_id: String, url: String, mut line: Bytes, reply: oneshot::Sender<Decision>) {
        loop {
            let Some(backend) = self.pick() else {
                let _ = reply.send(Decision::Unavailable("no backend connected"));
                return;
            };
            match self.send_to(backend, line.clone()).await {
                Ok(()) => {
                    self.pending.insert(request_id, Pending { backend, url, line, reply });
                    return;
                }
                Err(back) => line = back,
            }
        }
    }

    fn answer(&mut self, backend: BackendId, resp: AcceptResponse) {
        let Some(p) = self.pending.remove(&resp.request_id) else {
            tracing::debug!(request_id = %resp.request_id, "response to an unknown or expired connection request");
            return;
        };
        let decision = if resp.accepted {
            let client_id = resp.client_id.filter(|c| !c.is_empty()).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let room_id = resp.room_id.unwrap_or(p.url);
            self.pinned.insert(Arc::from(client_id.as_str()), backend);
            Decision::Accept { client_id, room_id, metadata: resp.metadata, backend }
        } else {
            Decision::Reject { reason: resp.reason }
        };
        let _ = p.reply.send(decision);
    }

    fn forget_backend(&mut self, id: BackendId) -> bool {
        let before = self.backends.len();
        self.backends.retain(|(b, _, _)| *b != id);
        if self.next >= self.backends.len() {
            self.next = 0;
        }
        before != self.backends.len()
    }

    async fn backend_down(&mut self, id: BackendId) {
        if self.forget_backend(id) {
            tracing::warn!(backend = id, remaining = self.backends.len(), "backend disconnected; its clients move to the remaining backends");
        }
        let orphaned: Vec<String> = self.pending.iter().filter(|(_, p)| p.backend == id).map(|(k, _)| k.clone()).collect();
        for request_id in orphaned {
            if let Some(p) = self.pending.remove(&request_id) {
                self.ask(request_id, p.url, p.line, p.reply).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shutdown;

    fn start(queue_size: usize) -> (mpsc::Sender<RouterMsg>, Arc<Counters>, shutdown::Trigger, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(64);
        let counters = Arc::new(Counters::default());
        let (trigger, sig) = shutdown::signal();
        let h = tokio::spawn(run(rx, queue_size, counters.clone(), Arc::default(), sig));
        (tx, counters, trigger, h)
    }

    fn ev(c: &str, n: u32, last: bool) -> RouterMsg {
        RouterMsg::Event { client_id: c.into(), line: Bytes::from(format!("{c}{n}")), last }
    }

    #[tokio::test]
    async fn queue_flushes_in_order_and_drops_oldest() {
        let (tx, counters, trigger, h) = start(3);
        for n in 0..5 {
            tx.send(ev("a", n, false)).await.unwrap();
        }
        let (btx, mut brx) = mpsc::channel(16);
        tx.send(RouterMsg::BackendUp { id: 1, addr: "x".into(), tx: btx }).await.unwrap();
        for want in ["a2", "a3", "a4"] {
            assert_eq!(brx.recv().await.unwrap(), Bytes::from(want));
        }
        assert_eq!(counters.queue_dropped.load(Relaxed), 2);
        trigger.fire();
        h.await.unwrap();
    }

    #[tokio::test]
    async fn clients_stick_to_one_backend_and_move_when_it_dies() {
        let (tx, _c, trigger, h) = start(10);
        let (b1, mut r1) = mpsc::channel(64);
        let (b2, mut r2) = mpsc::channel(64);
        tx.send(RouterMsg::BackendUp { id: 1, addr: "1".into(), tx: b1 }).await.unwrap();
        tx.send(RouterMsg::BackendUp { id: 2, addr: "2".into(), tx: b2 }).await.unwrap();
        for n in 0..10 {
            tx.send(ev("a", n, false)).await.unwrap();
            tx.send(ev("b", n, false)).await.unwrap();
        }
        let mut got1 = Vec::new();
        let mut got2 = Vec::new();
        for _ in 0..10 {
            got1.push(r1.recv().await.unwrap());
            got2.push(r2.recv().await.unwrap());
        }
        let first1 = got1[0][0];
        assert!(got1.iter().all(|l| l[0] == first1), "one client per backend");
        assert!(got2.iter().all(|l| l[0] != first1));
        let expect: Vec<Bytes> = (0..10).map(|n| Bytes::from(format!("{}{n}", first1 as char))).collect();
        assert_eq!(got1, expect, "in order");
        // Backend 1 dies: its client continues on backend 2.
        drop(r1);
        tx.send(RouterMsg::BackendDown { id: 1 }).await.unwrap();
        tx.send(ev(&(first1 as char).to_string(), 99, false)).await.unwrap();
        assert_eq!(r2.recv().await.unwrap(), Bytes::from(format!("{}99", first1 as char)));
        trigger.fire();
        h.await.unwrap();
    }

    #[tokio::test]
    async fn connection_requests_are_answered_or_refused() {
        let (tx, _c, trigger, h) = start(10);
        let (otx, orx) = oneshot::channel();
        tx.send(RouterMsg::ConnRequest { request_id: "r1".into(), url: "/a".into(), line: Bytes::from("q"), reply: otx }).await.unwrap();
        assert!(matches!(orx.await.unwrap(), Decision::Unavailable(_)));

        let (b1, mut r1) = mpsc::channel(64);
        tx.send(RouterMsg::BackendUp { id: 1, addr: "1".into(), tx: b1 }).await.unwrap();
        let (otx, orx) = oneshot::channel();
        tx.send(RouterMsg::ConnRequest { request_id: "r2".into(), url: "/room".into(), line: Bytes::from("q2"), reply: otx }).await.unwrap();
        assert_eq!(r1.recv().await.unwrap(), Bytes::from("q2"));
        let resp = AcceptResponse { request_id: "r2".into(), accepted: true, client_id: None, room_id: None, metadata: Value::Null, reason: None };
        tx.send(RouterMsg::Response { backend: 1, resp }).await.unwrap();
        match orx.await.unwrap() {
            Decision::Accept { client_id, room_id, .. } => {
                assert_eq!(client_id.len(), 36, "a fresh uuid when the backend gave none");
                assert_eq!(room_id, "/room");
            }
            other => panic!("{other:?}"),
        }
        trigger.fire();
        h.await.unwrap();
    }

    #[tokio::test]
    async fn a_request_whose_backend_dies_goes_to_another() {
        let (tx, _c, trigger, h) = start(10);
        let (b1, mut r1) = mpsc::channel(64);
        let (b2, mut r2) = mpsc::channel(64);
        tx.send(RouterMsg::BackendUp { id: 1, addr: "1".into(), tx: b1 }).await.unwrap();
        tx.send(RouterMsg::BackendUp { id: 2, addr: "2".into(), tx: b2 }).await.unwrap();
        let (otx, _orx) = oneshot::channel();
        tx.send(RouterMsg::ConnRequest { request_id: "r".into(), url: "/".into(), line: Bytes::from("q"), reply: otx }).await.unwrap();
        let first = tokio::select! {
            l = r1.recv() => { assert_eq!(l.unwrap(), Bytes::from("q")); 1 }
            l = r2.recv() => { assert_eq!(l.unwrap(), Bytes::from("q")); 2 }
        };
        let other_rx = if first == 1 { &mut r2 } else { &mut r1 };
        tx.send(RouterMsg::BackendDown { id: first }).await.unwrap();
        assert_eq!(other_rx.recv().await.unwrap(), Bytes::from("q"));
        trigger.fire();
        h.await.unwrap();
    }
}
