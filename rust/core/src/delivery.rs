//! Delivery of what backends send to clients: to one client, to a room, to everyone. It is the
//! single entry point for those sends, so "where does a message go" has one answer: this node's
//! hub first (synchronously, never waiting), then — only when this broker is a cluster node —
//! the other nodes, by handing one record to the cluster's publisher without waiting either.
//! A lone broker never touches `crate::cluster` from here.

use crate::cluster::{self, Kind};
use crate::stats::incr;
use crate::Shared;

/// A backend's `message_to_room`: local members now, other nodes through Redis.
pub(crate) fn to_room(shared: &Shared, room_id: &str, message: String) -> usize {
    let record = shared.cluster.as_ref().map(|_| cluster::encode_record(Kind::Room, room_id, message.as_bytes()));
    let n = shared.hub.send_room(room_id, message);
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
