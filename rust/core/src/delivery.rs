//! Delivery of what backends send to clients — to one client, a room (but some), a user's
//! connections, everyone — and of the commands that act on a client wherever it is (join, leave,
//! disconnect). It is the single entry point for those, so "where does it go" has one answer: this node's
//! hub first (synchronously, never waiting), then — only when this broker is a cluster node —
//! the other nodes, by handing one record to the cluster's publisher without waiting either.
//! A lone broker never touches `crate::cluster` from here.

use crate::cluster::{self, Kind};
use crate::hub::{Join, Leave};
use crate::stats::incr;
use crate::Shared;

/// A backend's `message_to_room`: local members now (but the excluded), other nodes through Redis.
pub(crate) fn to_room(shared: &Shared, room_id: &str, message: String, exclude: &[String]) -> usize {
    let record = shared.cluster.as_ref().map(|_| {
        if exclude.is_empty() {
            cluster::encode_record(Kind::Room, room_id, message.as_bytes())
        } else {
            cluster::encode_record(Kind::RoomExcept, room_id, &cluster::encode_except_body(exclude, &message))
        }
    });
    let n = shared.hub.send_room_except(room_id, message, exclude);
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
        match shared.hub.join(client_id, room_id, shared.cfg.max_rooms_per_client) {
            Join::Added => Applied::Done,
            Join::Already => Applied::Unchanged,
            Join::Full => Applied::Full,
            Join::NotHere => Applied::Elsewhere,
        }
    } else {
        match shared.hub.leave(client_id, room_id) {
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
