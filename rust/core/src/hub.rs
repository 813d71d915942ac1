//! The hub: which WebSocket clients are connected, which rooms each is in and which user each
//! belongs to. It is the only state shared between the WebSocket side and the backend side, and
//! it does the fan-out.
//!
//! A connection is in the room it was accepted into (its context's `room_id`) and in every room a
//! backend joined it to, up to `max_rooms_per_client`. Rooms and users are indexes of the same
//! slots (room → members, user → connections), kept under one lock so a join, a leave or a close
//! is seen whole; sending to a room walks that room's members only, so a client that is in
//! several rooms costs nothing on another room's fan-out.
//!
//! Each connected client is a [`ClientSlot`]: the sending half of its bounded outbound queue plus
//! a "kick" signal. Delivery never waits: a message goes into the queue with `try_send`; a full
//! queue applies the slow-client policy (close that client, or drop the message and count it),
//! so one client that stops reading cannot slow down anyone else. A room message is built once
//! and every member gets a clone of the same reference-counted bytes.

use crate::browser::{self, Origin};
use crate::config::SlowClientPolicy;
use crate::protocol::{CLOSE_REPLACED, CLOSE_SLOW_CONSUMER};
use crate::stats::{incr, Counters};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// One frame for a client's socket. A room message to a structured (`pystrands.1`) client in a
/// room with history also names the room and the offset, so the connection task can hold a
/// recovering room's live frames back and skip what it already replayed.
#[derive(Debug, Clone)]
pub(crate) struct Out {
    pub(crate) text: Utf8Bytes,
    /// Room, offset, epoch.
    pub(crate) pos: Option<(Arc<str>, u64, Arc<str>)>,
}

impl Out {
    pub(crate) fn text(text: Utf8Bytes) -> Self {
        Out { text, pos: None }
    }
}

/// Everything the hub and the backends need to know about one accepted connection.
pub(crate) struct ClientSlot {
    /// Unique per connection (a reconnect with the same `client_id` gets a new one).
    pub(crate) conn_id: u64,
    pub(crate) client_id: Arc<str>,
    pub(crate) room_id: Arc<str>,
    /// The `context` object sent to backends with every event of this client, encoded once.
    pub(crate) context_json: Arc<str>,
    /// The user this connection belongs to, if the backend named one on accept.
    pub(crate) user_id: Option<Arc<str>>,
    /// Wall-clock time of registration (ms since the Unix epoch); in a cluster it decides which
    /// of two connections with the same `client_id` on different nodes is the newer one.
    pub(crate) since_ms: u64,
    /// Speaks the browser protocol `pystrands.1` (JSON envelopes) instead of raw text frames.
    pub(crate) structured: bool,
    tx: mpsc::Sender<Out>,
    kick: Notify,
    kick_code: AtomicU16,
    /// Set when a backend asked for the close (`disconnect`): the reason it gave.
    kick_reason: Mutex<Option<String>>,
}

impl ClientSlot {
    pub(crate) fn new(
        conn_id: u64,
        client_id: Arc<str>,
        room_id: Arc<str>,
        user_id: Option<Arc<str>>,
        context_json: Arc<str>,
        tx: mpsc::Sender<Out>,
    ) -> Self {
        let since_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        ClientSlot {
            conn_id,
            client_id,
            room_id,
            context_json,
            user_id,
            since_ms,
            structured: false,
            tx,
            kick: Notify::new(),
            kick_code: AtomicU16::new(0),
            kick_reason: Mutex::new(None),
        }
    }

    /// This slot speaking `pystrands.1` (set before it is shared).
    pub(crate) fn structured(mut self, on: bool) -> Self {
        self.structured = on;
        self
    }

    /// Queues a frame for this client alone (its own `join`/`leave`), as any delivery.
    pub(crate) fn push(&self, hub: &Hub, text: String) -> bool {
        matches!(hub.deliver(self, Out::text(Utf8Bytes::from(text))), Delivery::Queued)
    }

    /// Asks the connection task to close the socket with `code` (the first code asked wins).
    pub(crate) fn kick(&self, code: u16) {
        if self.kick_code.compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.kick.notify_one();
        }
    }

    /// A backend's `disconnect`: closes with its code and reason (unless a close is already on
    /// its way). Returns whether this request decided the close.
    pub(crate) fn kick_by_backend(&self, code: u16, reason: String) -> bool {
        let mut r = self.kick_reason.lock();
        if self.kick_code.compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            *r = Some(reason);
            drop(r);
            self.kick.notify_one();
            true
        } else {
            false
        }
    }

    /// A close is on its way (the connection is ending).
    pub(crate) fn closing(&self) -> bool {
        self.kick_code.load(Ordering::Acquire) != 0
    }

    /// The reason a backend gave for closing this client, if a backend closed it.
    pub(crate) fn backend_close_reason(&self) -> Option<String> {
        self.kick_reason.lock().clone()
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

type Members = HashMap<u64, Arc<ClientSlot>>;

#[derive(Default)]
struct State {
    clients: HashMap<Arc<str>, Arc<ClientSlot>>,
    rooms: HashMap<Arc<str>, Members>,
    users: HashMap<Arc<str>, Members>,
    /// Connection → the rooms it is in (first: the room it was accepted into, while it stays).
    joined: HashMap<u64, Vec<Arc<str>>>,
    memberships: usize,
}

impl State {
    /// The connection of `client_id` here unless it is closing: a command for a connection that
    /// is being replaced (say by a newer one on another node) is handed on instead.
    fn live(&self, client_id: &str) -> Option<&Arc<ClientSlot>> {
        self.clients.get(client_id).filter(|s| !s.closing())
    }

    fn add(&mut self, slot: &Arc<ClientSlot>) {
        self.rooms.entry(slot.room_id.clone()).or_default().insert(slot.conn_id, slot.clone());
        self.joined.insert(slot.conn_id, vec![slot.room_id.clone()]);
        self.memberships += 1;
        if let Some(user) = &slot.user_id {
            self.users.entry(user.clone()).or_default().insert(slot.conn_id, slot.clone());
        }
    }

    /// Takes a connection out of every room and its user.
    fn remove(&mut self, slot: &ClientSlot) {
        for room in self.joined.remove(&slot.conn_id).unwrap_or_default() {
            self.memberships -= 1;
            remove_member(&mut self.rooms, &room, slot.conn_id);
        }
        if let Some(user) = &slot.user_id {
            remove_member(&mut self.users, user, slot.conn_id);
        }
    }
}

fn remove_member(index: &mut HashMap<Arc<str>, Members>, key: &str, conn_id: u64) {
    if let Some(members) = index.get_mut(key) {
        members.remove(&conn_id);
        if members.is_empty() {
            index.remove(key);
        }
    }
}

/// What a `join_room` did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Join {
    Added,
    /// It already was a member: nothing changed.
    Already,
    /// The client is in `max_rooms_per_client` rooms already: refused.
    Full,
    /// No such client on this node.
    NotHere,
}

/// What a `leave_room` did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Leave {
    Removed,
    NotMember,
    NotHere,
}

/// Shared registry of clients and rooms.
pub(crate) struct Hub {
    state: RwLock<State>,
    /// Bumped on every register, unregister, join and leave, so a reader can tell cheaply whether
    /// membership changed.
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
            st.remove(old);
        }
        st.add(&slot);
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
    #[cfg(test)]
    pub(crate) fn unregister(&self, slot: &ClientSlot) -> bool {
        self.unregister_from_rooms(slot).is_some()
    }

    /// [`unregister`](Self::unregister), returning the rooms the connection was in.
    pub(crate) fn unregister_from_rooms(&self, slot: &ClientSlot) -> Option<Vec<Arc<str>>> {
        let mut st = self.state.write();
        match st.clients.get(&slot.client_id) {
            Some(current) if current.conn_id == slot.conn_id => {
                st.clients.remove(&slot.client_id);
                let rooms = st.joined.get(&slot.conn_id).cloned().unwrap_or_default();
                st.remove(slot);
                self.version.fetch_add(1, Ordering::Release);
                Some(rooms)
            }
            _ => None,
        }
    }

    fn deliver(&self, slot: &ClientSlot, msg: Out) -> Delivery {
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

    /// Delivers `raw` to raw clients and the envelope `make` builds (once, on the first
    /// structured member) to structured ones.
    fn deliver_all<'a>(
        &self,
        slots: impl Iterator<Item = &'a Arc<ClientSlot>>,
        raw: &Utf8Bytes,
        make: &dyn Fn() -> Out,
    ) -> usize {
        let mut n = 0;
        let mut structured: Option<Out> = None;
        for slot in slots {
            let out =
                if slot.structured { structured.get_or_insert_with(make).clone() } else { Out::text(raw.clone()) };
            if let Delivery::Queued = self.deliver(slot, out) {
                n += 1;
            }
        }
        crate::stats::add(&self.counters.deliveries, n as u64);
        n
    }

    /// Sends to every member of a room; returns how many got it.
    pub(crate) fn send_room(&self, room_id: &str, text: String) -> usize {
        self.send_room_except(room_id, text, &[], None)
    }

    /// Sends to every member of a room but the excluded client ids; `pos` is the message's
    /// offset and epoch when the room has history. Returns how many got it.
    pub(crate) fn send_room_except(
        &self,
        room_id: &str,
        text: impl Into<Utf8Bytes>,
        exclude: &[String],
        pos: Option<(u64, Arc<str>)>,
    ) -> usize {
        let msg: Utf8Bytes = text.into();
        let st = self.state.read();
        let Some((room, members)) = st.rooms.get_key_value(room_id) else { return 0 };
        let make = || Out {
            text: browser::msg(Origin::Room(room_id, pos.as_ref().map(|(o, e)| (*o, &**e))), msg.as_str()).into(),
            pos: pos.as_ref().map(|(offset, epoch)| (room.clone(), *offset, epoch.clone())),
        };
        if exclude.is_empty() {
            self.deliver_all(members.values(), &msg, &make)
        } else if exclude.len() <= 8 {
            self.deliver_all(members.values().filter(|s| !exclude.iter().any(|e| **e == *s.client_id)), &msg, &make)
        } else {
            let skip: std::collections::HashSet<&str> = exclude.iter().map(String::as_str).collect();
            self.deliver_all(members.values().filter(|s| !skip.contains(&*s.client_id)), &msg, &make)
        }
    }

    /// Sends to every connection of a user here; returns how many got it.
    pub(crate) fn send_user(&self, user_id: &str, text: String) -> usize {
        let msg = Utf8Bytes::from(text);
        let st = self.state.read();
        let make = || Out::text(browser::msg(Origin::User(user_id), msg.as_str()).into());
        match st.users.get(user_id) {
            Some(conns) => self.deliver_all(conns.values(), &msg, &make),
            None => 0,
        }
    }

    /// Tells the structured members of `room` but `subject` that `subject` entered (`joined`)
    /// or left it. Returns the frame (for the other nodes), or `None` when the room has more than
    /// `max_members` members here (suppressed and counted).
    pub(crate) fn announce(
        &self,
        room: &str,
        subject: &ClientSlot,
        joined: bool,
        max_members: usize,
    ) -> Option<String> {
        let st = self.state.read();
        let members = st.rooms.get(room);
        let count = members.map_or(0, |m| m.len());
        if count > max_members {
            incr(&self.counters.presence_suppressed);
            return None;
        }
        let others = members.into_iter().flat_map(|m| m.values()).filter(|s| s.conn_id != subject.conn_id);
        // The user's first connection in (or last one out of) the room, on this node.
        let edge = subject.user_id.as_ref().is_some_and(|u| {
            !members
                .into_iter()
                .flat_map(|m| m.values())
                .any(|s| s.conn_id != subject.conn_id && s.user_id.as_ref() == Some(u))
        });
        let frame = browser::presence(room, joined, &subject.client_id, subject.user_id.as_deref(), edge);
        let text = Utf8Bytes::from(frame.clone());
        let mut n = 0;
        for slot in others.filter(|s| s.structured) {
            if let Delivery::Queued = self.deliver(slot, Out::text(text.clone())) {
                n += 1;
            }
        }
        crate::stats::add(&self.counters.presence_events, n as u64);
        Some(frame)
    }

    /// Delivers a presence frame another node built to the structured members of `room` here.
    pub(crate) fn presence_from_elsewhere(&self, room: &str, frame: &str) {
        let text = Utf8Bytes::from(frame.to_string());
        let st = self.state.read();
        let mut n = 0;
        for slot in st.rooms.get(room).into_iter().flat_map(|m| m.values()).filter(|s| s.structured) {
            if let Delivery::Queued = self.deliver(slot, Out::text(text.clone())) {
                n += 1;
            }
        }
        crate::stats::add(&self.counters.presence_events, n as u64);
    }

    /// The live connection of `client_id` here.
    pub(crate) fn slot(&self, client_id: &str) -> Option<Arc<ClientSlot>> {
        self.state.read().live(client_id).cloned()
    }

    /// The rooms a connection is in, in the order it entered them.
    pub(crate) fn rooms_of_conn(&self, conn_id: u64) -> Vec<Arc<str>> {
        self.state.read().joined.get(&conn_id).cloned().unwrap_or_default()
    }

    /// Adds a connected client to a room (at most `max_rooms` rooms per client).
    pub(crate) fn join(&self, client_id: &str, room_id: &str, max_rooms: usize) -> Join {
        let mut st = self.state.write();
        let Some(slot) = st.live(client_id).cloned() else { return Join::NotHere };
        let rooms = st.joined.entry(slot.conn_id).or_default();
        if rooms.iter().any(|r| **r == *room_id) {
            return Join::Already;
        }
        if rooms.len() >= max_rooms {
            return Join::Full;
        }
        // One allocation per room name: the member map and the client's list share it.
        let room: Arc<str> = match st.rooms.get_key_value(room_id) {
            Some((k, _)) => k.clone(),
            None => room_id.into(),
        };
        st.joined.entry(slot.conn_id).or_default().push(room.clone());
        st.rooms.entry(room).or_default().insert(slot.conn_id, slot);
        st.memberships += 1;
        self.version.fetch_add(1, Ordering::Release);
        Join::Added
    }

    /// Removes a connected client from a room (its first room too).
    pub(crate) fn leave(&self, client_id: &str, room_id: &str) -> Leave {
        let mut st = self.state.write();
        let Some(conn_id) = st.live(client_id).map(|s| s.conn_id) else { return Leave::NotHere };
        let Some(rooms) = st.joined.get_mut(&conn_id) else { return Leave::NotMember };
        let Some(i) = rooms.iter().position(|r| **r == *room_id) else { return Leave::NotMember };
        rooms.remove(i);
        st.memberships -= 1;
        remove_member(&mut st.rooms, room_id, conn_id);
        self.version.fetch_add(1, Ordering::Release);
        Leave::Removed
    }

    /// A backend's `disconnect` for a client here: `None` when it is not connected here (or
    /// already closing), otherwise whether this request decided the close.
    pub(crate) fn disconnect(&self, client_id: &str, code: u16, reason: String) -> Option<bool> {
        let st = self.state.read();
        st.live(client_id).map(|slot| slot.kick_by_backend(code, reason))
    }

    /// The contexts of a room's members here (encoded JSON, shared).
    pub(crate) fn members(&self, room_id: &str) -> Vec<Arc<str>> {
        let st = self.state.read();
        st.rooms.get(room_id).map_or_else(Vec::new, |m| m.values().map(|s| s.context_json.clone()).collect())
    }

    #[cfg(test)]
    /// Rooms a client here is in, in the order it entered them (`None`: not connected here).
    pub(crate) fn rooms_of(&self, client_id: &str) -> Option<Vec<Arc<str>>> {
        let st = self.state.read();
        let slot = st.clients.get(client_id)?;
        Some(st.joined.get(&slot.conn_id).cloned().unwrap_or_default())
    }

    /// Distinct users with at least one connection here.
    pub(crate) fn user_count(&self) -> usize {
        self.state.read().users.len()
    }

    /// Room memberships here (a client in three rooms counts three).
    pub(crate) fn membership_count(&self) -> usize {
        self.state.read().memberships
    }

    /// Sends to every connected client; returns how many got it.
    pub(crate) fn broadcast(&self, text: String) -> usize {
        let msg = Utf8Bytes::from(text);
        let st = self.state.read();
        let make = || Out::text(browser::msg(Origin::All, msg.as_str()).into());
        self.deliver_all(st.clients.values(), &msg, &make)
    }

    /// Sends to one client if it is connected here: `Ok(queued)`; otherwise the text comes back
    /// unsent (and uncounted) so the caller can route it elsewhere (the cluster).
    pub(crate) fn try_send_to(&self, client_id: &str, text: String) -> Result<bool, String> {
        let st = self.state.read();
        match st.clients.get(client_id) {
            Some(slot) => {
                let out = if slot.structured { browser::msg(Origin::Direct, &text) } else { text };
                let queued = matches!(self.deliver(slot, Out::text(Utf8Bytes::from(out))), Delivery::Queued);
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

    /// Changes whenever a client registers, unregisters, joins or leaves a room.
    pub(crate) fn membership_version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Every room with its number of members, and the number of clients.
    pub(crate) fn room_sizes(&self) -> (usize, Vec<(Arc<str>, usize)>) {
        let st = self.state.read();
        (st.clients.len(), st.rooms.iter().map(|(r, m)| (r.clone(), m.len())).collect())
    }

    /// Rooms here whose name passes `keep`, counted under the read lock without copying them.
    pub(crate) fn count_rooms(&self, keep: impl Fn(&str) -> bool) -> usize {
        self.state.read().rooms.keys().filter(|r| keep(r)).count()
    }

    /// Members of a room (for tests and stats).
    pub(crate) fn room_size(&self, room_id: &str) -> usize {
        self.state.read().rooms.get(room_id).map_or(0, |m| m.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(conn: u64, id: &str, room: &str, cap: usize) -> (Arc<ClientSlot>, mpsc::Receiver<Out>) {
        let (tx, rx) = mpsc::channel(cap);
        (Arc::new(ClientSlot::new(conn, id.into(), room.into(), None, "{}".into(), tx)), rx)
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
        assert_eq!(ra.recv().await.unwrap().text, Utf8Bytes::from_static("room"));
        assert_eq!(rb.recv().await.unwrap().text, Utf8Bytes::from_static("room"));
        assert_eq!(rc.recv().await.unwrap().text, Utf8Bytes::from_static("private"));
        for r in [&mut ra, &mut rb, &mut rc] {
            assert_eq!(r.recv().await.unwrap().text, Utf8Bytes::from_static("all"));
        }
        assert!(hub.unregister(&a));
        assert_eq!(hub.room_size("r1"), 1);
        assert!(hub.unregister(&b));
        assert_eq!(hub.room_count(), 1);
    }

    fn user_slot(conn: u64, id: &str, room: &str, user: &str) -> (Arc<ClientSlot>, mpsc::Receiver<Out>) {
        let (tx, rx) = mpsc::channel(8);
        let ctx: Arc<str> = format!("{{\"client_id\":\"{id}\"}}").into();
        (Arc::new(ClientSlot::new(conn, id.into(), room.into(), Some(user.into()), ctx, tx)), rx)
    }

    fn drain(rx: &mut mpsc::Receiver<Out>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push(m.text.to_string());
        }
        out
    }

    #[tokio::test]
    async fn many_rooms_users_exclusions_and_leaving() {
        let hub = Hub::new(SlowClientPolicy::Close, Arc::default());
        let (a, mut ra) = user_slot(1, "a", "lobby", "ann");
        let (a2, mut ra2) = user_slot(2, "a2", "lobby", "ann");
        let (b, mut rb) = user_slot(3, "b", "lobby", "bob");
        for s in [&a, &a2, &b] {
            hub.register(s.clone());
        }
        assert_eq!((hub.user_count(), hub.membership_count()), (2, 3));
        assert_eq!(hub.join("a", "game", 3), Join::Added);
        assert_eq!(hub.join("a", "game", 3), Join::Already);
        assert_eq!(hub.join("a", "third", 3), Join::Added);
        assert_eq!(hub.join("a", "fourth", 3), Join::Full, "lobby + game + third = 3");
        assert_eq!(hub.join("nobody", "game", 3), Join::NotHere);
        assert_eq!(
            hub.rooms_of("a").unwrap().iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            ["lobby", "game", "third"]
        );
        assert_eq!(hub.membership_count(), 5);

        assert_eq!(hub.send_room("game", "g".into()), 1);
        assert_eq!(hub.send_room_except("lobby", "l", &["a".into()], None), 2);
        let many: Vec<String> = (0..20).map(|i| format!("x{i}")).chain(["b".to_string()]).collect();
        assert_eq!(hub.send_room_except("lobby", "l2", &many, None), 2, "a long exclude list works the same");
        assert_eq!(hub.send_user("ann", "u".into()), 2, "both of ann's connections");
        assert_eq!(hub.send_user("nobody", "u".into()), 0);
        assert_eq!(drain(&mut ra), ["g", "l2", "u"]);
        assert_eq!(drain(&mut ra2), ["l", "l2", "u"]);
        assert_eq!(drain(&mut rb), ["l"]);

        let mut members: Vec<String> = hub.members("lobby").iter().map(|m| m.to_string()).collect();
        members.sort();
        assert_eq!(members, [r#"{"client_id":"a"}"#, r#"{"client_id":"a2"}"#, r#"{"client_id":"b"}"#]);

        assert_eq!(hub.leave("a", "lobby"), Leave::Removed, "the first room can be left too");
        assert_eq!(hub.leave("a", "lobby"), Leave::NotMember);
        assert_eq!(hub.leave("nobody", "lobby"), Leave::NotHere);
        assert_eq!(hub.send_room("lobby", "l3".into()), 2);
        assert!(drain(&mut ra).is_empty());
        assert_eq!(hub.join("a", "fourth", 3), Join::Added, "leaving made room");

        assert!(hub.unregister(&a));
        assert_eq!(hub.room_count(), 1, "game, third and fourth went with their only member");
        assert_eq!((hub.user_count(), hub.membership_count()), (2, 2));
        assert!(hub.unregister(&a2));
        assert_eq!(hub.user_count(), 1);
        assert_eq!(hub.send_user("ann", "u".into()), 0);
    }

    #[tokio::test]
    async fn a_backend_disconnect_carries_its_code_and_reason_once() {
        let hub = Hub::new(SlowClientPolicy::Close, Arc::default());
        let (a, _ra) = user_slot(1, "a", "r", "u");
        hub.register(a.clone());
        assert_eq!(hub.disconnect("nobody", 4000, "x".into()), None);
        assert_eq!(hub.disconnect("a", 4321, "bye".into()), Some(true));
        assert_eq!(hub.disconnect("a", 4000, "again".into()), None, "closing: counts as gone, the first close wins");
        assert_eq!(a.kicked().await, 4321);
        assert_eq!(a.backend_close_reason().as_deref(), Some("bye"));
        let (b, _rb) = user_slot(2, "b", "r", "u");
        hub.register(b.clone());
        b.kick(CLOSE_SLOW_CONSUMER);
        assert_eq!(hub.disconnect("b", 4000, "late".into()), None);
        assert_eq!(hub.join("b", "x", 10), Join::NotHere, "a closing connection is not joined");
        assert!(!b.kick_by_backend(4000, "late".into()), "the broker's close came first");
        assert_eq!(b.backend_close_reason(), None, "a broker close keeps its own reason");
    }

    #[tokio::test]
    async fn a_replaced_connection_leaves_every_room_and_its_user() {
        let hub = Hub::new(SlowClientPolicy::Close, Arc::default());
        let (old, _r1) = user_slot(1, "dup", "r", "u1");
        hub.register(old.clone());
        hub.join("dup", "extra", 10);
        let (new, _r2) = user_slot(2, "dup", "r", "u2");
        hub.register(new.clone());
        assert_eq!(hub.room_size("extra"), 0);
        assert_eq!(hub.send_user("u1", "x".into()), 0);
        assert_eq!((hub.user_count(), hub.membership_count()), (1, 1));
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
        assert_eq!(rf.recv().await.unwrap().text, Utf8Bytes::from_static("1"));
        assert_eq!(rf.recv().await.unwrap().text, Utf8Bytes::from_static("2"));
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
        assert_eq!(r2.recv().await.unwrap().text, Utf8Bytes::from_static("hi"));
    }
}
