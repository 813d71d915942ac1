//! Scale-out over Redis. Several brokers ("nodes") behind one load balancer form a cluster: a
//! client connected to any node receives the room, private and broadcast messages sent by a
//! backend connected to any node. This module is the only place that talks to Redis, and it
//! exists so that a lone broker never does (no `cluster_url`: nothing here runs).
//!
//! The rule it keeps: **no Redis I/O on the per-message hot path.**
//!
//! * **Publishing.** A backend's send is delivered to this node's members synchronously by the
//!   hub, exactly as on a lone broker (`crate::delivery`, the one entry point for backend sends,
//!   calls in here only when there is a cluster). Then one *record* (kind, target, message) is
//!   handed to a bounded queue with `try_send` (never waits). One publisher task drains the
//!   queue, packs the records into payloads and PUBLISHes them, pipelined, on the one channel
//!   `<cluster_name>:bus`. A full queue or an unreachable Redis drops the record — counted in
//!   `cluster_publish_dropped`, logged rate-limited — and local delivery is unaffected.
//! * **Receiving.** One subscriber task per node holds a dedicated pub/sub connection (RESP3,
//!   so Redis' pushed messages land in a bounded queue: a node that falls behind drops and
//!   counts instead of buffering without bound) and delivers every record of another node to
//!   local members. Each payload names its origin node (a node
//!   skips its own payloads: no double delivery where the message was sent) and carries the
//!   sequence number of its first record, so a gap shows that this node missed records
//!   (`cluster_missed`). Redis pub/sub is at-most-once; the counters say what was lost.
//! * **Private messages.** Delivered locally when the client is connected here; otherwise
//!   published on the same channel, and the node holding the client delivers it (the others
//!   ignore it). There is no client → node registry to look up per message and nothing to keep
//!   consistent when a client moves; the cost is that every node receives every private message
//!   for a client that is not on the sender's node. A *claim* record announces every new
//!   connection, so an older connection with the same `client_id` on another node is closed
//!   (4001): the newest connection wins cluster-wide, as it does on one node.
//! * **Presence.** Every [`PRESENCE_EVERY`](presence::PRESENCE_EVERY) a node writes its client
//!   count and room sizes to Redis with a [`PRESENCE_TTL`](presence::PRESENCE_TTL) expiry and
//!   reads the other live nodes' reports (one Lua script, one round trip, Redis' clock).
//!   `stats()` reads that cache and never calls Redis. A node that dies drops out within
//!   `PRESENCE_TTL`.
//! * **Rooms, users, moderation.** A client's rooms and user live in its node's hub only.
//!   `message_to_room` with `exclude` and `message_to_user` are published like room messages and
//!   every node delivers to its own members; `join_room`, `leave_room` and `disconnect` for a
//!   client that is not here are published like private messages and the node holding the
//!   client applies them. No Redis call on any per-message path, and nothing to keep consistent
//!   when a client moves.
//! * **`room_members`** is a scatter-gather on the same channel: the asking node publishes a
//!   query, every other node answers with its members' contexts, and the asker waits for the
//!   nodes its presence view lists as live (until the query's deadline; a node that did not
//!   answer is named as missing). A dead node is not asked once its presence report expired
//!   ([`PRESENCE_TTL`](presence::PRESENCE_TTL)), and its members are never listed after it died,
//!   since they come from live answers only. Cost: one message per node per query.
//!   `room_count` is answered from the presence cache (at most one report period old).
//! * **Faults.** The publisher (whose connection presence shares) and the subscriber each notice a
//!   lost connection (an error, a closed socket, an unanswered PING) and reconnect with capped
//!   exponential backoff with jitter.
//!
//! * **Rooms with history** are the exception to "no Redis on the hot path": their messages
//!   are appended to a Redis Stream per room by a script that also gives the offset and
//!   publishes the message (on `<cluster_name>:streams`), and every node, the sending one too,
//!   delivers it from there, so the offsets, the Streams and every node's delivery order agree
//!   and a reconnecting browser can be given exactly what it missed from any node
//!   ([`streams`]). A backend's `room_config` is spread to every node and kept in Redis.
//!
//! One job per file: [`envelope`] (the bytes on the channel), [`streams`] (room history in
//! Redis), [`publisher`], [`subscriber`] and [`presence`] (the three tasks); this file holds the [`Cluster`] handle the rest of the broker
//! uses and the start-up that creates the tasks.

pub(crate) mod envelope;
mod presence;
mod publisher;
mod streams;
mod subscriber;

pub(crate) use envelope::{encode_except_body, encode_kick_body, encode_record, Kind};

use crate::config::Config;
use crate::hub::{ClientSlot, Hub};
use crate::shutdown::{Signal, TaskGuard};
use crate::stats::{incr, ClusterStats, Counters};
use crate::throttle::{self, Backoff, LogLimit};
use crate::Shared;
use bytes::Bytes;
use parking_lot::RwLock;
use presence::{Presence, PRESENCE_TTL};
use publisher::{open_publisher, Publisher};
use redis::aio::MultiplexedConnection;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use subscriber::{open_subscriber, resp3, SeqTracker, Subscriber, Subscription};
use tokio::sync::{mpsc, watch};

/// Records that may wait for the publisher; beyond it they are dropped and counted.
const PUBLISH_QUEUE: usize = 65_536;
/// Time allowed to connect and subscribe to Redis.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed for one command's answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections are pinged this often, so a Redis that went away is noticed without traffic.
const PING_EVERY: Duration = Duration::from_secs(1);
/// Reconnect delays: doubling from the first to the cap, with jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// The handle the rest of the broker uses.
// ---------------------------------------------------------------------------------------------

/// What this node knows of the other live nodes (from the last presence round trip).
#[derive(Default)]
pub(super) struct View {
    at: Option<Instant>,
    nodes: usize,
    node_ids: Vec<String>,
    clients: usize,
    rooms: HashMap<String, usize>,
}

/// What `room_members` names as missing when this node does not know the live nodes.
pub(crate) const UNKNOWN_NODES: &str = "unknown (no presence view: Redis unreachable or this node just started)";

/// A `room_members` query waiting for other nodes' answers.
struct Query {
    waiting: Vec<String>,
    /// Comma-joined member contexts of each answer (empty answers are left out).
    answers: Vec<Bytes>,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

#[derive(Default)]
pub(super) struct State {
    publisher_up: AtomicBool,
    subscriber_up: AtomicBool,
    /// Payloads Redis pushed that did not fit in the receive queue.
    overflow: Arc<AtomicU64>,
    view: RwLock<View>,
}

/// This node's membership in a cluster: held in [`Shared`] when `cluster_url` is set.
pub(crate) struct Cluster {
    pub(crate) node_id: Arc<str>,
    /// `cluster_name`: the prefix of every key.
    name: String,
    /// The publisher's command connection while it is up (history reads borrow it).
    conn_rx: watch::Receiver<Option<MultiplexedConnection>>,
    tx: mpsc::Sender<Bytes>,
    state: Arc<State>,
    counters: Arc<Counters>,
    full_log: LogLimit,
    queries: parking_lot::Mutex<HashMap<u64, Query>>,
    next_query: AtomicU64,
}

impl Cluster {
    /// Hands a record to the publisher without waiting; a full queue drops it (counted).
    pub(crate) fn publish(&self, record: Bytes) {
        match self.tx.try_send(record) {
            Ok(()) => {}
            Err(_) => {
                incr(&self.counters.cluster_publish_dropped);
                if let Some(suppressed) = self.full_log.allow(1) {
                    tracing::warn!(suppressed, "cluster publish queue full (Redis slow or unreachable): a message was not sent to other nodes; local delivery is unaffected");
                }
            }
        }
    }

    /// A message to a room with history: queued for the publisher, which appends it to the
    /// room's Stream; every node (this one too) delivers it when Redis publishes it.
    pub(crate) fn publish_to_stream(
        &self,
        room_id: &str,
        message: &str,
        exclude: &[String],
        settings: crate::history::RoomSettings,
    ) {
        let deliver = streams::deliver_record(room_id, message, exclude);
        let body = streams::encode_stream_body(settings.history_size, settings.history_ttl, message, &deliver);
        self.publish(encode_record(Kind::Stream, room_id, &body));
    }

    /// A backend's `room_config`, for every other node (and kept in Redis for later ones).
    pub(crate) fn publish_room_config(&self, room_id: &str, o: crate::history::RoomOverrides) {
        self.publish(encode_record(Kind::RoomConfig, room_id, o.to_json().as_bytes()));
    }

    /// Reads a room's history from its Redis Stream.
    pub(crate) async fn read_history(
        &self,
        room_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<crate::history::Read, String> {
        let conn = self.conn_rx.borrow().clone();
        let Some(mut conn) = conn else { return Err("Redis is unreachable".into()) };
        streams::read(&mut conn, &self.name, room_id, after, limit).await
    }

    /// Announces a new connection so an older one with the same `client_id` elsewhere closes.
    pub(crate) fn claim(&self, slot: &ClientSlot) {
        self.publish(encode_record(Kind::Claim, &slot.client_id, &slot.since_ms.to_be_bytes()));
    }

    /// Every member of a room on every live node: this node's now, the others' as they answer,
    /// until `deadline`. Returns the contexts (each piece is one or several comma-joined context
    /// objects) and the nodes that did not answer in time.
    pub(crate) async fn members(&self, hub: &Hub, room_id: &str, deadline: Duration) -> (Vec<Bytes>, Vec<String>) {
        let local = hub.members(room_id);
        let mut pieces: Vec<Bytes> = Vec::with_capacity(1);
        if !local.is_empty() {
            pieces.push(join_contexts(&local));
        }
        let waiting: Vec<String> = {
            let view = self.state.view.read();
            if view.at.is_none_or(|t| t.elapsed() >= PRESENCE_TTL) {
                // Redis unreachable, or no presence round yet: which nodes are live is not known.
                incr(&self.counters.cluster_query_timeouts);
                return (pieces, vec![UNKNOWN_NODES.to_string()]);
            }
            view.node_ids.iter().filter(|n| **n != *self.node_id).cloned().collect()
        };
        if waiting.is_empty() {
            return (pieces, Vec::new());
        }
        let id = self.next_query.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.queries.lock().insert(id, Query { waiting, answers: Vec::new(), done: Some(tx) });
        self.publish(encode_record(Kind::Query, room_id, &envelope::encode_query_body(id, b"")));
        let _ = tokio::time::timeout(deadline, rx).await;
        let q = self.queries.lock().remove(&id);
        if let Some(q) = q {
            if !q.waiting.is_empty() {
                incr(&self.counters.cluster_query_timeouts);
            }
            pieces.extend(q.answers);
            return (pieces, q.waiting);
        }
        (pieces, Vec::new())
    }

    /// Another node answered query `id` (pieces of comma-joined contexts).
    pub(super) fn answered(&self, node: &str, id: u64, contexts: &[u8]) {
        let mut queries = self.queries.lock();
        let Some(q) = queries.get_mut(&id) else { return }; // too late, or not ours
        let Some(i) = q.waiting.iter().position(|n| n == node) else { return };
        q.waiting.swap_remove(i);
        if !contexts.is_empty() {
            q.answers.push(Bytes::copy_from_slice(contexts));
        }
        if q.waiting.is_empty() {
            if let Some(done) = q.done.take() {
                let _ = done.send(());
            }
        }
    }

    /// Members on every live node, from the presence cache (no Redis call).
    pub(crate) fn room_count(&self, hub: &Hub, room_id: &str) -> usize {
        let view = self.state.view.read();
        let others = if view.at.is_some_and(|t| t.elapsed() < PRESENCE_TTL) {
            view.rooms.get(room_id).copied().unwrap_or(0)
        } else {
            0
        };
        others + hub.room_size(room_id)
    }

    /// Both connections to Redis are up.
    pub(crate) fn connected(&self) -> bool {
        self.state.publisher_up.load(Ordering::Acquire) && self.state.subscriber_up.load(Ordering::Acquire)
    }

    /// Cluster figures: this node's live counts plus the other nodes' last reports (dropped
    /// once older than [`PRESENCE_TTL`], e.g. while Redis is unreachable).
    pub(crate) fn stats(&self, hub: &Hub) -> ClusterStats {
        // Counted in place (no copy of the room list): every scrape and `stats()` call runs this.
        let local_clients = hub.client_count();
        let view = self.state.view.read();
        let fresh = view.at.is_some_and(|t| t.elapsed() < PRESENCE_TTL);
        let (nodes, clients, rooms) = if fresh {
            let only_here = hub.count_rooms(|r| !view.rooms.contains_key(r));
            (1 + view.nodes, local_clients + view.clients, view.rooms.len() + only_here)
        } else {
            (1, local_clients, hub.room_count())
        };
        ClusterStats { node_id: self.node_id.to_string(), connected: self.connected(), nodes, clients, rooms }
    }

    /// Room → members on every live node (same freshness as [`stats`](Self::stats)).
    pub(crate) fn room_members(&self, hub: &Hub) -> HashMap<String, usize> {
        let (_, local) = hub.room_sizes();
        let view = self.state.view.read();
        let mut out =
            if view.at.is_some_and(|t| t.elapsed() < PRESENCE_TTL) { view.rooms.clone() } else { HashMap::new() };
        for (room, n) in local {
            *out.entry(room.to_string()).or_default() += n;
        }
        out
    }
}

/// Contexts joined by commas: a piece of a JSON array.
pub(crate) fn join_contexts(contexts: &[Arc<str>]) -> Bytes {
    let mut v = Vec::with_capacity(contexts.iter().map(|c| c.len() + 1).sum());
    for (i, c) in contexts.iter().enumerate() {
        if i > 0 {
            v.push(b',');
        }
        v.extend_from_slice(c.as_bytes());
    }
    Bytes::from(v)
}

// ---------------------------------------------------------------------------------------------
// Start-up: the handle, then the three tasks.
// ---------------------------------------------------------------------------------------------

/// Everything the tasks need, created before the broker's shared state exists.
pub(crate) struct Starter {
    client: redis::Client,
    url_shown: String,
    node_id: Arc<str>,
    channel: String,
    name: String,
    rx: mpsc::Receiver<Bytes>,
    state: Arc<State>,
    conn: Option<MultiplexedConnection>,
    conn_tx: watch::Sender<Option<MultiplexedConnection>>,
    pubsub: Option<Subscription>,
    /// The cluster's session-token key, shared through Redis (read at `connect`).
    session_key: Option<Vec<u8>>,
}

/// The Redis client of `url`; a `rediss://` URL trusts `ca` (a PEM file) instead of the system's
/// CAs when given. `Err` names the setting at fault.
fn open_client(url: &str, ca: Option<&str>) -> Result<redis::Client, String> {
    let url_shown = crate::config::redact_url(url);
    let Some(ca) = ca else {
        return redis::Client::open(url).map_err(|e| format!("cluster_url={url_shown}: {e}"));
    };
    let root = std::fs::read(ca).map_err(|e| format!("redis_tls_ca={ca}: cannot read the PEM file: {e}"))?;
    let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(root) };
    redis::Client::build_with_tls(url, certs).map_err(|e| format!("redis_tls_ca={ca}: {e}"))
}

/// Builds the cluster handle and its starter (no I/O yet). `cfg.cluster_url` must be set.
pub(crate) fn build(cfg: &Config, counters: Arc<Counters>) -> Result<(Cluster, Starter), String> {
    let url = cfg.cluster_url.as_deref().ok_or("cluster_url is not set")?;
    let url_shown = crate::config::redact_url(url);
    let client = open_client(url, cfg.redis_tls_ca.as_deref()).map_err(|e| format!("invalid setting {e}"))?;
    let node_id: Arc<str> = match &cfg.cluster_node_id {
        Some(id) => id.as_str().into(),
        None => format!("n-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]).into(),
    };
    let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
    let state = Arc::new(State::default());
    let (conn_tx, conn_rx) = watch::channel(None);
    let cluster = Cluster {
        node_id: node_id.clone(),
        name: cfg.cluster_name.clone(),
        conn_rx,
        tx,
        state: state.clone(),
        counters,
        full_log: LogLimit::default(),
        queries: parking_lot::Mutex::new(HashMap::new()),
        next_query: AtomicU64::new(1),
    };
    let starter = Starter {
        client,
        url_shown,
        node_id,
        channel: format!("{}:bus", cfg.cluster_name),
        name: cfg.cluster_name.clone(),
        rx,
        state,
        conn: None,
        conn_tx,
        pubsub: None,
        session_key: None,
    };
    Ok((cluster, starter))
}

impl Starter {
    pub(crate) fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Connects the publisher and subscribes, so that once the broker serves, messages from
    /// other nodes already arrive. The error names `cluster_url` (password masked).
    pub(crate) async fn connect(&mut self) -> Result<(), String> {
        let mut conn = open_publisher(&self.client).await;
        if let Ok(c) = &mut conn {
            self.session_key = shared_session_key(c, &self.name).await.ok();
        }
        let pubsub = match &conn {
            Ok(_) => match resp3(&self.client) {
                Ok(sub_client) => open_subscriber(&sub_client, &self.channels(), self.state.overflow.clone()).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e.clone()),
        };
        match (conn, pubsub) {
            (Ok(c), Ok(p)) => {
                self.conn = Some(c);
                self.pubsub = Some(p);
                self.state.publisher_up.store(true, Ordering::Release);
                self.state.subscriber_up.store(true, Ordering::Release);
                Ok(())
            }
            (Err(e), _) | (_, Err(e)) => Err(format!("cannot reach Redis at cluster_url={}: {e}", self.url_shown)),
        }
    }

    /// The channels a node subscribes to: the bus and the rooms-with-history channel.
    fn channels(&self) -> Vec<String> {
        vec![self.channel.clone(), format!("{}:streams", self.name)]
    }

    /// The session-token key every node of the cluster shares (`None`: Redis was unreachable).
    pub(crate) fn session_key(&self) -> Option<&[u8]> {
        self.session_key.as_deref()
    }

    /// Starts the publisher, subscriber and presence tasks (on the current runtime).
    pub(crate) fn spawn(self, shared: Arc<Shared>, stop: Signal, guard: TaskGuard) {
        let channels = self.channels();
        let Starter { client, url_shown, node_id, channel, name, rx, state, conn, conn_tx, pubsub, .. } = self;
        // The URL was accepted by `redis::Client::open`, so the RESP3 variant of it is too.
        let sub_client = resp3(&client).unwrap_or_else(|_| client.clone());
        conn_tx.send_replace(conn.clone());
        let conn_rx = conn_tx.subscribe();
        if let Some(c) = conn.clone() {
            tokio::spawn(load_room_configs(c, name.clone(), shared.clone()));
        }
        let ever = conn.is_some();
        let publisher = Publisher {
            client: client.clone(),
            url_shown: url_shown.clone(),
            name: name.clone(),
            channel: channel.clone(),
            node_id: node_id.clone(),
            conn,
            conn_tx,
            rx,
            shared: shared.clone(),
            state: state.clone(),
            stop: stop.clone(),
            next_seq: 1,
            backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_CAP, throttle::seed()),
            ever_connected: ever,
            down_log: LogLimit::default(),
        };
        let subscriber = Subscriber {
            client: sub_client,
            url_shown,
            channels,
            node_id: node_id.clone(),
            pubsub,
            shared: shared.clone(),
            state: state.clone(),
            stop: stop.clone(),
            backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_CAP, throttle::seed().rotate_left(17)),
            seqs: SeqTracker::default(),
            ever_connected: ever,
            bad_log: LogLimit::default(),
            gap_log: LogLimit::default(),
            down_log: LogLimit::default(),
            overflow_seen: 0,
        };
        let presence = Presence {
            conn_rx,
            nodes_key: format!("{name}:nodes"),
            node_prefix: format!("{name}:node:"),
            node_id,
            shared,
            state,
            stop,
            written: None,
        };
        let (g1, g2, g3) = (guard.clone(), guard.clone(), guard);
        tokio::spawn(async move {
            publisher.run().await;
            drop(g1);
        });
        tokio::spawn(async move {
            subscriber.run().await;
            drop(g2);
        });
        tokio::spawn(async move {
            presence.run().await;
            drop(g3);
        });
    }
}

/// The cluster's session-token key: the first node to start sets it, every other reads it.
async fn shared_session_key(conn: &mut MultiplexedConnection, name: &str) -> Result<Vec<u8>, String> {
    let key = format!("{name}:session-key");
    let candidate = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let _: Option<String> =
        redis::cmd("SET").arg(&key).arg(&candidate).arg("NX").query_async(conn).await.map_err(|e| e.to_string())?;
    let value: String = redis::cmd("GET").arg(&key).query_async(conn).await.map_err(|e| e.to_string())?;
    Ok(value.into_bytes())
}

/// Applies every room's `room_config` kept in Redis (a node that starts after they were sent).
async fn load_room_configs(mut conn: MultiplexedConnection, name: String, shared: Arc<Shared>) {
    let all: Result<HashMap<String, Vec<u8>>, _> =
        redis::cmd("HGETALL").arg(format!("{name}:roomcfg")).query_async(&mut conn).await;
    match all {
        Ok(all) => {
            for (room, json) in all {
                if let Ok(o) = crate::history::RoomOverrides::from_json(&json) {
                    shared.rooms.configure(&room, o);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read the rooms' room_config from Redis"),
    }
}
