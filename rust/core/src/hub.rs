//! The hub: which WebSocket clients are connected and which room each is in. It is the only
//! state shared between the WebSocket side and the backend side, and it does the fan-out.
//!
//! Each connected client is a [`ClientSlot`]: the sending half of its bounded outbound queue plus
//! a "kick" signal. Delivery never waits: a message goes into the queue with `try_send`; a full
//! queue applies the slow-client policy (close that client, or drop the message and count it),
//! so one client that stops reading cannot slow down anyone else. A room message is built once
//! and every member gets a clone of the same reference-counted bytes.

use crate::config::SlowClientPolicy;
use crate::protocol::{CLOSE_REPLACED, CLOSE_SLOW_CONSUMER};
use crate::stats::{incr, Counters};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Everything the hub and the backends need to know about one accepted connection.
pub(crate) struct ClientSlot {
    /// Unique per connection (a reconnect with the same `client_id` gets a new one).
    pub(crate) conn_id: u64,
    pub(crate) client_id: Arc<str>,
    pub(crate) room_id: Arc<str>,
    /// The `context` object sent to backends with every event of this client, encoded once.
    pub(crate) context_json: Arc<str>,
    /// Wall-clock time of registration (ms since the Unix epoch); in a cluster it decides which
    /// of two connections with the same `client_id` on different nodes is the newer one.
    pub(crate) since_ms: u64,
    tx: mpsc::Sender<Utf8Bytes>,
    kick: Notify,
    kick_code: AtomicU16,
}

impl ClientSlot {
    pub(crate) fn new(
        conn_id: u64,
        client_id: Arc<str>,
        room_id: Arc<str>,
        context_json: Arc<str>,
        tx: mpsc::Sender<Utf8Bytes>,
    ) -> Self {
        let since_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        ClientSlot {
            conn_id,
            client_id,
            room_id,
            context_json,
            since_ms,
            tx,
            kick: Notify::new(),
            kick_code: AtomicU16::new(0),
        }
    }

    /// Asks the connection task to close the socket with `code` (the first code asked wins).
    pub(crate) fn kick(&self, code: u16) {
        if self.kick_code.compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.kick.notify_one();
        }
    }

    /// Resolves when [`kick`](Self::kick) was called; returns the close code.
    pub(crate) async fn kicked(&self) -> u16 {
        loop {
            let code = self.kick_code.load(Ordering::Acquire);
            if code != 0 {
                return code;
            }
            self.kick.notified().await;
        }
    }
}

#[derive(Default)]
struct State {
    clients: HashMap<Arc<str>, Arc<ClientSlot>>,
    rooms: HashMap<Arc<str>, HashMap<u64, Arc<ClientSlot>>>,
}

/// Shared registry of clients and rooms.
pub(crate) struct Hub {
    state: RwLock<State>,
    /// Bumped on every register/unregister, so a reader can tell cheaply whether membership changed.
    version: AtomicU64,
    policy: SlowClientPolicy,
    pub(crate) counters: Arc<Counters>,
}

/// Result of a delivery to one client.
enum Delivery {
    Queued,
    Dropped,
}

impl Hub {
    pub(crate) fn new(policy: SlowClientPolicy, counters: Arc<Counters>) -> Self {
        Hub { state: RwLock::new(State::default()), version: AtomicU64::new(0), policy, counters }
    }

    /// Registers an accepted client. If its `client_id` was already connected, the older
    /// connection is replaced: it leaves routing at once, is closed with
    /// [`CLOSE_REPLACED`](crate::protocol::CLOSE_REPLACED), and is returned so the caller can
    /// tell the backend it disconnected before announcing the new one.
    pub(crate) fn register(&self, slot: Arc<ClientSlot>) -> Option<Arc<ClientSlot>> {
        let mut st = self.state.write();
        let old = st.clients.insert(slot.client_id.clone(), slot.clone());
        if let Some(old) = &old {
            remove_from_room(&mut st, old);
        }
        st.rooms.entry(slot.room_id.clone()).or_default().insert(slot.conn_id, slot.clone());
        self.version.fetch_add(1, Ordering::Release);
        drop(st);
        if let Some(old) = &old {
            incr(&self.counters.connections_replaced);
            old.kick(CLOSE_REPLACED);
        }
        old
    }

    /// Removes a client when its connection ends. Returns false when that connection had
    /// already been replaced (then nobody else may be told it left).
    pub(crate) fn unregister(&self, slot: &ClientSlot) -> bool {
        let mut st = self.state.write();
        match st.clients.get(&slot.client_id) {
            Some(current) if current.conn_id == slot.conn_id => {
                st.clients.remove(&slot.client_id);
                remove_from_room(&mut st, slot);
                self.version.fetch_add(1, Ordering::Release);
                true
            }
            _ => false,
        }
    }

    fn deliver(&self, slot: &ClientSlot, msg: Utf8Bytes) -> Delivery {
        match slot.tx.try_send(msg) {
            Ok(()) => Delivery::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                match self.policy {
                    SlowClientPolicy::Drop => incr(&self.counters.slow_client_drops),
                    SlowClientPolicy::Close => {
                        if slot.kick_code.load(Ordering::Acquire) == 0 {
                            incr(&self.counters.slow_clients_closed);
                            tracing::warn!(client_id = %slot.client_id, "client is not reading; closing it (slow consumer)");
                        }
                        slot.kick(CLOSE_SLOW_CONSUMER);
                    }
                }
                Delivery::Dropped
            }
            // The connection is ending; its disconnect event is on its way.
            Err(mpsc::error::TrySendError::Closed(_)) => Delivery::Dropped,
        }
    }

    fn deliver_all<'a>(&self, slots: impl Iterator<Item = &'a Arc<ClientSlot>>, msg: &Utf8Bytes) -> usize {
        let mut n = 0;
        for slot in slots {
            if let Delivery::Queued = self.deliver(slot, msg.clone()) {
                n += 1;
            }
        }
        crate::stats::add(&self.counters.deliveries, n as u64);
        n
    }

    /// Sends to every member of a room; returns how many got it.
    pub(crate) fn send_room(&self, room_id: &str, text: String) -> usize {
        let msg = Utf8Bytes::from(text);
        let st = self.state.read();
        match st.rooms.get(room_id) {
            Some(members) => self.deliver_all(members.values(), &msg),
            None => 0,
        }
    }

    /// Sends to every connected client; returns how many got it.
    pub(crate) fn broadcast(&self, text: String) -> usize {
        let msg = Utf8Bytes::from(text);
        let st = self.state.read();
        self.deliver_all(st.clients.values(), &msg)
    }

    /// Sends to one client if it is connected here: `Ok(queued)`; otherwise the text comes back
    /// unsent (and uncounted) so the caller can route it elsewhere (the cluster).
    pub(crate) fn try_send_to(&self, client_id: &str, text: String) -> Result<bool, String> {
        let st = self.state.read();
        match st.clients.get(client_id) {
            Some(slot) => {
                let queued = matches!(self.deliver(slot, Utf8Bytes::from(text)), Delivery::Queued);
                if queued {
                    incr(&self.counters.deliveries);
                }
                Ok(queued)
            }
            None => Err(text),
        }
    }

    /// Another node registered `client_id` at `claim_ms`: closes the connection here with
    /// [`CLOSE_REPLACED`] if it is older (ties go to `remote_wins_tie`), so the newest
    /// connection wins cluster-wide as it does on one node. Returns whether one was closed.
    pub(crate) fn replaced_elsewhere(&self, client_id: &str, claim_ms: u64, remote_wins_tie: bool) -> bool {
        let st = self.state.read();
        let Some(slot) = st.clients.get(client_id) else { return false };
        if slot.since_ms < claim_ms || (slot.since_ms == claim_ms && remote_wins_tie) {
            if slot.kick_code.load(Ordering::Acquire) == 0 {
                incr(&self.counters.connections_replaced);
                tracing::info!(client_id, "client_id connected on another node; closing the older connection here");
            }
            slot.kick(CLOSE_REPLACED);
            true
        } else {
            false
        }
    }

    /// Closes every client with `code` (used at shutdown).
    pub(crate) fn kick_all(&self, code: u16) {
        for slot in self.state.read().clients.values() {
            slot.kick(code);
        }
    }

    pub(crate) fn client_count(&self) -> usize {
        self.state.read().clients.len()
    }

    pub(crate) fn room_count(&self) -> usize {
        self.state.read().rooms.len()
    }

    /// Changes whenever a client registers or unregisters.
    pub(crate) fn membership_version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Every room with its number of members, and the number of clients.
    pub(crate) fn room_sizes(&self) -> (usize, Vec<(Arc<str>, usize)>) {
        let st = self.state.read();
        (st.clients.len(), st.rooms.iter().map(|(r, m)| (r.clone(), m.len())).collect())
    }

    /// Members of a room (for tests and stats).
    pub(crate) fn room_size(&self, room_id: &str) -> usize {
        self.state.read().rooms.get(room_id).map_or(0, |m| m.len())
    }
}

fn remove_from_room(st: &mut State, slot: &ClientSlot) {
    if let Some(members) = st.rooms.get_mut(&slot.room_id) {
        members.remove(&slot.conn_id);
        if members.is_empty() {
            st.rooms.remove(&slot.room_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(conn: u64, id: &str, room: &str, cap: usize) -> (Arc<ClientSlot>, mpsc::Receiver<Utf8Bytes>) {
        let (tx, rx) = mpsc::channel(cap);
        (Arc::new(ClientSlot::new(conn, id.into(), room.into(), "{}".into(), tx)), rx)
    }

    #[tokio::test]
    async fn rooms_private_and_broadcast_reach_exactly_the_right_clients() {
        let hub = Hub::new(SlowClientPolicy::Close, Arc::default());
        let (a, mut ra) = slot(1, "a", "r1", 8);
        let (b, mut rb) = slot(2, "b", "r1", 8);
        let (c, mut rc) = slot(3, "c", "r2", 8);
        for s in [&a, &b, &c] {
            assert!(hub.register(s.clone()).is_none());
        }
        assert_eq!(hub.send_room("r1", "room".into()), 2);
        assert_eq!(hub.try_send_to("c", "private".into()), Ok(true));
        assert_eq!(hub.try_send_to("nobody", "x".into()), Err("x".to_string()));
        assert_eq!(hub.broadcast("all".into()), 3);
        assert_eq!(ra.recv().await.unwrap(), Utf8Bytes::from_static("room"));
        assert_eq!(rb.recv().await.unwrap(), Utf8Bytes::from_static("room"));
        assert_eq!(rc.recv().await.unwrap(), Utf8Bytes::from_static("private"));
        for r in [&mut ra, &mut rb, &mut rc] {
            assert_eq!(r.recv().await.unwrap(), Utf8Bytes::from_static("all"));
        }
        assert!(hub.unregister(&a));
        assert_eq!(hub.room_size("r1"), 1);
        assert!(hub.unregister(&b));
        assert_eq!(hub.room_count(), 1);
    }

    #[tokio::test]
    async fn a_full_queue_kicks_only_that_client() {
        let hub = Hub::new(SlowClientPolicy::Close, Arc::default());
        let (slow, _rs) = slot(1, "slow", "r", 1);
        let (fast, mut rf) = slot(2, "fast", "r", 8);
        hub.register(slow.clone());
        hub.register(fast.clone());
        hub.send_room("r", "1".into());
        hub.send_room("r", "2".into());
        assert_eq!(slow.kicked().await, CLOSE_SLOW_CONSUMER);
        assert_eq!(rf.recv().await.unwrap(), Utf8Bytes::from_static("1"));
        assert_eq!(rf.recv().await.unwrap(), Utf8Bytes::from_static("2"));
        assert_eq!(hub.counters.slow_clients_closed.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn drop_policy_counts_and_keeps_the_client() {
        let hub = Hub::new(SlowClientPolicy::Drop, Arc::default());
        let (s, _r) = slot(1, "s", "r", 1);
        hub.register(s.clone());
        hub.send_room("r", "1".into());
        hub.send_room("r", "2".into());
        assert_eq!(hub.counters.slow_client_drops.load(Ordering::Relaxed), 1);
        assert_eq!(s.kick_code.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_newer_connection_on_another_node_closes_the_older_one_here() {
        let hub = Hub::new(SlowClientPolicy::Close, Arc::default());
        let (s, _r) = slot(1, "x", "r", 4);
        hub.register(s.clone());
        let v = hub.membership_version();
        assert!(!hub.replaced_elsewhere("x", s.since_ms - 1, true), "an older claim elsewhere loses");
        assert!(!hub.replaced_elsewhere("x", s.since_ms, false), "tie: only the side told it loses closes");
        assert!(!hub.replaced_elsewhere("nobody", u64::MAX, true));
        assert_eq!(s.kick_code.load(Ordering::Relaxed), 0);
        assert!(hub.replaced_elsewhere("x", s.since_ms + 1, false));
        assert_eq!(s.kicked().await, CLOSE_REPLACED);
        assert_eq!(hub.counters.connections_replaced.load(Ordering::Relaxed), 1);
        assert_eq!(hub.try_send_to("y", "m".into()), Err("m".to_string()), "unknown client: text handed back");
        assert_eq!(hub.counters.no_route.load(Ordering::Relaxed), 0, "try_send_to does not count no_route");
        assert!(hub.unregister(&s));
        assert_ne!(hub.membership_version(), v);
        assert_eq!(hub.room_sizes().0, 0);
    }

    #[tokio::test]
    async fn same_client_id_replaces_the_old_connection() {
        let hub = Hub::new(SlowClientPolicy::Close, Arc::default());
        let (old, _r1) = slot(1, "dup", "r", 4);
        let (new, mut r2) = slot(2, "dup", "r", 4);
        hub.register(old.clone());
        let replaced = hub.register(new.clone()).expect("old one returned");
        assert_eq!(replaced.conn_id, 1);
        assert_eq!(old.kicked().await, CLOSE_REPLACED);
        assert!(!hub.unregister(&old), "the replaced connection must not unregister the new one");
        assert_eq!(hub.room_size("r"), 1);
        assert_eq!(hub.try_send_to("dup", "hi".into()), Ok(true));
        assert_eq!(r2.recv().await.unwrap(), Utf8Bytes::from_static("hi"));
    }
}
