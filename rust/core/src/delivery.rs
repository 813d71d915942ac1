//! Delivery of what backends send to clients — to one client, a room (but some), a user's
//! connections, everyone — and of the commands that act on a client wherever it is (join, leave,
//! disconnect). It is the single entry point for those, so "where does it go" has one answer: this node's
//! hub first (synchronously, never waiting), then — only when this broker is a cluster node —
//! the other nodes, by handing one record to the cluster's publisher without waiting either.
//! A lone broker never touches `crate::cluster` from here.
//!
//! Rooms with history are the one exception to "local first": alone, a message to such a room
//! gets its offset and is fanned out under the room stream's lock (so offsets and delivery order
//! agree); in a cluster it goes to Redis first, which gives the offset, keeps it in the room's
//! Stream and publishes it, and every node — this one too — delivers it from there.

use crate::browser::{self, Session};
use crate::cluster::{self, Kind};
use crate::hub::{ClientSlot, Join, Leave};
use crate::stats::incr;
use crate::Shared;
use std::sync::Arc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// A backend's `message_to_room`: local members now (but the excluded), other nodes through Redis.
pub(crate) fn to_room(shared: &Shared, room_id: &str, message: String, exclude: &[String]) -> usize {
    let settings = shared.rooms.settings(room_id);
    if settings.history_size > 0 {
        if let Some(c) = &shared.cluster {
            c.publish_to_stream(room_id, &message, exclude, settings);
            return 0;
        }
        let text = Utf8Bytes::from(message);
        let stream = shared.rooms.stream(room_id);
        let mut s = stream.lock();
        let offset = s.append(text.clone(), settings.history_size, settings.history_ttl);
        incr(&shared.counters.history_appended);
        let epoch = s.epoch.clone();
        return shared.hub.send_room_except(room_id, text, exclude, Some((offset, epoch)));
    }
    let record = shared.cluster.as_ref().map(|_| {
        if exclude.is_empty() {
            cluster::encode_record(Kind::Room, room_id, message.as_bytes())
        } else {
            cluster::encode_record(Kind::RoomExcept, room_id, &cluster::encode_except_body(exclude, &message))
        }
    });
    let n = shared.hub.send_room_except(room_id, message, exclude, None);
    if let (Some(c), Some(r)) = (&shared.cluster, record) {
        c.publish(r);
    }
    n
}

/// A backend's `broadcast`: every local client now, other nodes through Redis.
pub(crate) fn to_all(shared: &Shared, message: String) -> usize {
    let record = shared.cluster.as_ref().map(|_| cluster::encode_record(Kind::Broadcast, "", message.as_bytes()));
    let n = shared.hub.broadcast(message);
    if let (Some(c), Some(r)) = (&shared.cluster, record) {
        c.publish(r);
    }
    n
}

/// A backend's `message_to_connection`: delivered here when the client is here, else published
/// for the node that holds it. False only when it went nowhere (alone, unknown client:
/// `no_route`; or the client's queue was full).
pub(crate) fn to_client(shared: &Shared, client_id: &str, message: String) -> bool {
    match shared.hub.try_send_to(client_id, message) {
        Ok(queued) => queued,
        Err(message) => match &shared.cluster {
            Some(c) => {
                c.publish(cluster::encode_record(Kind::Private, client_id, message.as_bytes()));
                true
            }
            None => {
                incr(&shared.counters.no_route);
                false
            }
        },
    }
}

/// A backend's `message_to_user`: this node's connections of the user now, other nodes through
/// Redis. Alone, a user with no connection is counted (`commands_unmatched`).
pub(crate) fn to_user(shared: &Shared, user_id: &str, message: String) {
    let record = shared.cluster.as_ref().map(|_| cluster::encode_record(Kind::User, user_id, message.as_bytes()));
    let n = shared.hub.send_user(user_id, message);
    match (&shared.cluster, record) {
        (Some(c), Some(r)) => c.publish(r),
        _ if n == 0 => incr(&shared.counters.commands_unmatched),
        _ => {}
    }
}

/// What a command for one client came to on this node.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Applied {
    Done,
    /// Nothing to do (already a member, not a member, already closing).
    Unchanged,
    /// Refused: the client is in `max_rooms_per_client` rooms.
    Full,
    /// The client is not here: handed to the other nodes (or counted, alone).
    Elsewhere,
}

/// A backend's `join_room` / `leave_room`, applied here when the client is here, else by the
/// node that holds it.
pub(crate) fn membership(shared: &Shared, client_id: &str, room_id: &str, join: bool) -> Applied {
    let applied = if join {
        match join_here(shared, client_id, room_id) {
            Join::Added => Applied::Done,
            Join::Already => Applied::Unchanged,
            Join::Full => Applied::Full,
            Join::NotHere => Applied::Elsewhere,
        }
    } else {
        match leave_here(shared, client_id, room_id) {
            Leave::Removed => Applied::Done,
            Leave::NotMember => Applied::Unchanged,
            Leave::NotHere => Applied::Elsewhere,
        }
    };
    match applied {
        Applied::Done => incr(if join { &shared.counters.rooms_joined } else { &shared.counters.rooms_left }),
        Applied::Elsewhere => match &shared.cluster {
            Some(c) => c.publish(cluster::encode_record(
                if join { Kind::Join } else { Kind::Leave },
                client_id,
                room_id.as_bytes(),
            )),
            None => incr(&shared.counters.commands_unmatched),
        },
        Applied::Unchanged | Applied::Full => {}
    }
    applied
}

/// A backend's `disconnect` (code and reason already checked), applied where the client is.
pub(crate) fn disconnect(shared: &Shared, client_id: &str, code: u16, reason: &str) -> Applied {
    match shared.hub.disconnect(client_id, code, reason.to_owned()) {
        Some(true) => {
            incr(&shared.counters.clients_disconnected);
            Applied::Done
        }
        Some(false) => Applied::Unchanged,
        None => {
            match &shared.cluster {
                Some(c) => {
                    c.publish(cluster::encode_record(Kind::Kick, client_id, &cluster::encode_kick_body(code, reason)))
                }
                None => incr(&shared.counters.commands_unmatched),
            }
            Applied::Elsewhere
        }
    }
}

/// Joins a client here to a room. A structured client is told (`join`, with the room's position
/// when it has history here: taken under the stream's lock, so no message falls between the
/// position and the live frames), and the room's structured members get a presence event.
pub(crate) fn join_here(shared: &Shared, client_id: &str, room_id: &str) -> Join {
    let max = shared.cfg.max_rooms_per_client;
    let Some(slot) = shared.hub.slot(client_id).filter(|s| s.structured) else {
        let joined = shared.hub.join(client_id, room_id, max);
        if joined == Join::Added && shared.rooms.presence(room_id) {
            if let Some(slot) = shared.hub.slot(client_id) {
                presence(shared, room_id, &slot, true);
            }
        }
        return joined;
    };
    let settings = shared.rooms.settings(room_id);
    let joined = if settings.history_size > 0 && shared.cluster.is_none() {
        let stream = shared.rooms.stream(room_id);
        let s = stream.lock();
        let joined = shared.hub.join(client_id, room_id, max);
        if joined == Join::Added {
            let frame = browser::membership(true, room_id, Some((s.offset, &s.epoch)), &session_token(shared, &slot));
            slot.push(&shared.hub, frame);
        }
        joined
    } else {
        let joined = shared.hub.join(client_id, room_id, max);
        if joined == Join::Added {
            slot.push(&shared.hub, browser::membership(true, room_id, None, &session_token(shared, &slot)));
        }
        joined
    };
    if joined == Join::Added && settings.presence {
        presence(shared, room_id, &slot, true);
    }
    joined
}

/// Takes a client here out of a room, telling it (structured) and the room (presence).
pub(crate) fn leave_here(shared: &Shared, client_id: &str, room_id: &str) -> Leave {
    let slot = shared.hub.slot(client_id);
    let left = shared.hub.leave(client_id, room_id);
    if let (Leave::Removed, Some(slot)) = (&left, slot) {
        if slot.structured {
            slot.push(&shared.hub, browser::membership(false, room_id, None, &session_token(shared, &slot)));
        }
        if shared.rooms.presence(room_id) {
            presence(shared, room_id, &slot, false);
        }
    }
    left
}

/// Tells a room's structured members (here and on the other nodes) that `slot` came or went.
pub(crate) fn presence(shared: &Shared, room_id: &str, slot: &ClientSlot, joined: bool) {
    if let Some(frame) = shared.hub.announce(room_id, slot, joined, shared.cfg.presence_max_members) {
        if let Some(c) = &shared.cluster {
            c.publish(cluster::encode_record(Kind::Presence, room_id, frame.as_bytes()));
        }
    }
}

/// A fresh session token naming the connection's client id, user and current rooms.
pub(crate) fn session_token(shared: &Shared, slot: &ClientSlot) -> String {
    let session = Session {
        client: slot.client_id.to_string(),
        user: slot.user_id.as_deref().map(str::to_owned),
        rooms: shared.hub.rooms_of_conn(slot.conn_id).iter().map(|r| r.to_string()).collect(),
        issued_ms: browser::now_ms(),
    };
    let key: Arc<browser::SessionKey> = shared.session_key.read().clone();
    key.sign(&session)
}
