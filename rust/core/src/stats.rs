//! Counters for everything the broker does and every place a message can be dropped or delayed,
//! so nothing is lost silently. Plain relaxed atomics: cheap on the hot path, read by `stats()`.

use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($(#[doc = $doc:expr])* $name:ident),* $(,)?) => {
        /// Live counters shared by every task of one broker.
        #[derive(Default, Debug)]
        pub(crate) struct Counters { $($(#[doc = $doc])* pub(crate) $name: AtomicU64,)* }

        impl Counters {
            /// A named snapshot of every counter.
            pub(crate) fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Relaxed)),)*]
            }
        }

        /// Every counter's name and its doc comment (the help text of `/metrics`).
        pub(crate) const COUNTER_HELP: &[(&str, &str)] = &[$((stringify!($name), concat!($($doc),*)),)*];
    };
}

counters! {
    /// WebSocket connections accepted (after the backend said yes).
    connections_accepted,
    /// Connection requests a backend rejected (HTTP 403).
    connections_rejected,
    /// Connection requests answered 503: no backend, deadline passed, or `max_connections` reached.
    connections_unavailable,
    /// Upgrade requests refused before asking a backend (bad HTTP, bad origin, timeout).
    handshakes_failed,
    /// Connections accepted on a valid signed token (`jwt_secret`/`jwt_public_key`), with no backend asked.
    token_connections,
    /// Upgrade requests refused with 401 for a bad token (forged, expired, malformed, wrong algorithm).
    tokens_refused,
    /// Open connections closed (code 4401) because their token expired.
    tokens_expired,
    /// TLS handshakes that failed (plain requests on a TLS port included), on either listener.
    tls_handshakes_failed,
    /// Times a listener's TLS certificate was reloaded (SIGHUP or a changed file).
    tls_reloads,
    /// Certificate reloads that failed (unreadable or broken files); the previous certificate stays in use.
    tls_reload_failures,
    /// Connections closed because a newer one took their `client_id`.
    connections_replaced,
    /// Messages received from WebSocket clients.
    messages_in,
    /// Messages handed to WebSocket clients' outbound queues (one per recipient).
    deliveries,
    /// Events delivered to backends.
    events_to_backends,
    /// Events dropped because the no-backend queue was full (drop-oldest) or disabled.
    queue_dropped,
    /// Messages dropped for a client whose outbound queue was full (policy `drop`).
    slow_client_drops,
    /// Clients closed because their outbound queue was full (policy `close`).
    slow_clients_closed,
    /// Private messages for a `client_id` that is not connected.
    no_route,
    /// Backend lines that could not be used (malformed, wrong types, unknown action, too long).
    backend_errors,
    /// Client connections closed for a protocol error, an oversized or invalid message.
    client_protocol_errors,
    /// Backends declared dead because they could not be written to (stopped reading, write failed).
    backends_lost,
    /// Events handed to a v1 backend that was lost before they could be written (not redelivered).
    events_lost,
    /// Events redelivered after their v2 backend was lost before acknowledging them.
    events_redelivered,
    /// Events released from a v2 backend's redelivery buffer unacknowledged (`max_unacked`).
    unacked_overflow,
    /// Backend connections refused: missing or wrong `backend_secret`, unsupported `hello`.
    backends_refused,
    /// Messages from WebSocket clients over `client_rate_limit` (dropped, or the client closed).
    rate_limited,
    /// Cluster: room, private, broadcast and claim records published to Redis for other nodes.
    cluster_published,
    /// Cluster: records that could not be published (Redis unreachable, publish failed, or the
    /// publisher's queue was full). Local delivery of those messages was not affected.
    cluster_publish_dropped,
    /// Cluster: records received from other nodes.
    cluster_received,
    /// Cluster: records other nodes published that this node never received (sequence gaps,
    /// e.g. while its subscription was down).
    cluster_missed,
    /// Cluster: payloads from Redis that could not be decoded (skipped).
    cluster_decode_errors,
    /// Cluster: connections to Redis re-established after a loss.
    cluster_reconnects,
    /// Cluster: `room_members` queries answered without every live node (one did not answer in
    /// time, or the live nodes were not known: Redis unreachable or no presence round yet).
    cluster_query_timeouts,
    /// `join_room` commands that added a membership.
    rooms_joined,
    /// `leave_room` commands that removed a membership.
    rooms_left,
    /// Clients closed by a backend's `disconnect`.
    clients_disconnected,
    /// Commands that named a client, room or user this broker does not have (they did nothing;
    /// in a cluster a command for a client elsewhere is handed on, not counted here).
    commands_unmatched,
    /// Commands refused for bad arguments (an over-long id, an invalid close code, a join beyond
    /// `max_rooms_per_client`); each also reported to the backend as a `command_error`.
    commands_refused,
    /// Browser protocol: presence frames handed to clients (one per recipient).
    presence_events,
    /// Browser protocol: presence events not sent because the room had more than
    /// `presence_max_members` members.
    presence_suppressed,
    /// Messages given a stream offset (rooms with history).
    history_appended,
    /// Browser protocol: rooms a reconnecting client recovered (every missed message replayed).
    recoveries,
    /// Browser protocol: rooms a reconnecting client could not recover (epoch changed, history
    /// too short, or no history); the client was told `recovered: false`.
    recoveries_failed,
    /// Browser protocol: messages replayed from history to recovering clients.
    messages_replayed,
    /// Browser protocol: connections closed for a malformed or lying frame (4400) or no
    /// `connect` in time (4408).
    browser_protocol_errors,
}

/// Adds one to a counter.
#[inline]
pub(crate) fn incr(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// Adds `n` to a counter.
#[inline]
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

/// A point-in-time view of one broker, returned by `BrokerHandle::stats`.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub clients: usize,
    pub rooms: usize,
    /// Distinct users with a connection here.
    pub users: usize,
    /// Room memberships here (a client in three rooms counts three).
    pub memberships: usize,
    pub backends: usize,
    pub queued_events: usize,
    pub pending_requests: usize,
    /// Events sent to v2 backends and not yet acknowledged (kept for redelivery).
    pub unacked_events: usize,
    /// Rooms with a history stream in this node's memory (a lone broker; a cluster keeps them in Redis).
    pub history_rooms: usize,
    /// Messages kept in those streams.
    pub history_messages: usize,
    pub counters: Vec<(&'static str, u64)>,
    /// Cluster figures; `None` when the broker runs alone.
    pub cluster: Option<ClusterStats>,
}

/// What one node knows about its cluster (when it runs with `cluster_url`).
#[derive(Debug, Clone, Default)]
pub struct ClusterStats {
    pub node_id: String,
    /// Both the publishing and the subscribing connection to Redis are up.
    pub connected: bool,
    /// Live nodes, this one included (as of the last presence report, at most ~1 s old).
    pub nodes: usize,
    /// Clients on every live node (this node's count is live, the others' are cached).
    pub clients: usize,
    /// Distinct rooms with members on any live node.
    pub rooms: usize,
}

impl Stats {
    /// Every figure by name: the keys of `Broker.stats()` and of `GET /stats`.
    pub fn to_json(&self) -> Map<String, Value> {
        let s = self;
        let mut m = Map::new();
        for (k, v) in [
            ("clients", s.clients),
            ("rooms", s.rooms),
            ("users", s.users),
            ("memberships", s.memberships),
            ("backends", s.backends),
            ("queued_events", s.queued_events),
            ("pending_requests", s.pending_requests),
            ("unacked_events", s.unacked_events),
            ("history_rooms", s.history_rooms),
            ("history_messages", s.history_messages),
        ] {
            m.insert(k.into(), json!(v));
        }
        for (k, v) in &s.counters {
            m.insert((*k).into(), json!(v));
        }
        if let Some(c) = &s.cluster {
            m.insert("cluster_node_id".into(), json!(c.node_id));
            m.insert("cluster_connected".into(), json!(c.connected));
            m.insert("cluster_nodes".into(), json!(c.nodes));
            m.insert("cluster_clients".into(), json!(c.clients));
            m.insert("cluster_rooms".into(), json!(c.rooms));
        }
        m
    }

    /// A counter by name (0 when unknown), for tests and tools.
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).unwrap_or(0)
    }
}
