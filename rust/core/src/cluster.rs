//! Scale-out over Redis. Several brokers ("nodes") behind one load balancer form a cluster: a
//! client connected to any node receives the room, private and broadcast messages sent by a
//! backend connected to any node. This module is the only place that talks to Redis, and it
//! exists so that a lone broker never does (no `cluster_url`: nothing here runs).
//!
//! The rule it keeps: **no Redis I/O on the per-message hot path.**
//!
//! * **Publishing.** A backend's send is delivered to this node's members synchronously by the
//!   hub, exactly as on a lone broker. Then one *record* (kind, target, message) is handed to a
//!   bounded queue with `try_send` (never waits). One publisher task drains the queue, packs the
//!   records into payloads and PUBLISHes them, pipelined, on the one channel
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
//! * **Presence.** Every [`PRESENCE_EVERY`] a node writes its client count and room sizes to Redis
//!   with a [`PRESENCE_TTL`] expiry and reads the other live nodes' reports (one Lua script, one
//!   round trip, Redis' clock). `stats()` reads that cache and never calls Redis. A node that dies
//!   drops out within `PRESENCE_TTL`.
//! * **Faults.** The publisher (whose connection presence shares) and the subscriber each notice a
//!   lost connection (an error, a closed socket, an unanswered PING) and reconnect with capped
//!   exponential backoff with jitter.

use crate::config::Config;
use crate::hub::{ClientSlot, Hub};
use crate::shutdown::{Signal, TaskGuard};
use crate::stats::{add, incr, ClusterStats, Counters};
use crate::Shared;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Records that may wait for the publisher; beyond it they are dropped and counted.
const PUBLISH_QUEUE: usize = 65_536;
/// Payloads from Redis that may wait for this node's subscriber task. A node that cannot keep
/// up drops beyond it (the records show up in `cluster_missed`) instead of buffering without
/// bound: the pub/sub connection is RESP3 with a push handler feeding this bounded queue.
const RECEIVE_QUEUE: usize = 4096;
/// Records are packed into payloads of about this size (a larger record goes alone).
const MAX_PAYLOAD: usize = 64 * 1024;
/// Most payloads sent in one pipelined round trip.
const MAX_PIPELINE: usize = 64;
/// Time allowed to connect and subscribe to Redis.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed for one command's answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections are pinged this often, so a Redis that went away is noticed without traffic.
const PING_EVERY: Duration = Duration::from_secs(1);
/// How often each node reports its presence.
pub const PRESENCE_EVERY: Duration = Duration::from_secs(1);
/// How long a presence report lives: a node silent for this long is considered gone.
pub const PRESENCE_TTL: Duration = Duration::from_secs(3);
/// Reconnect delays: doubling from the first to the cap, with jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// Repeated warnings (drops, failed reconnects) are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Sequence state of an origin not heard from for this long is forgotten.
const FORGET_ORIGIN: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------------------------
// Envelope: what goes over Redis.
//
// payload := version:u8  origin_len:u8 origin  first_seq:u64be  count:u32be  record*count
// record  := kind:u8  target_len:u32be target  body_len:u32be body
//
// Binary and length-prefixed: a message is copied, never escaped, and room ids or messages can
// hold any byte. `kind` is one of R (room), P (private), B (broadcast; empty target), C (claim:
// target is the client_id, body the registration time in ms since the epoch, u64be).
// ---------------------------------------------------------------------------------------------

/// Version byte of the envelope; a node refuses payloads of another version (counted).
pub const ENVELOPE_VERSION: u8 = 1;

/// What a record asks the receiving node to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Room,
    Private,
    Broadcast,
    Claim,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Room => b'R',
            Kind::Private => b'P',
            Kind::Broadcast => b'B',
            Kind::Claim => b'C',
        }
    }

    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            b'R' => Some(Kind::Room),
            b'P' => Some(Kind::Private),
            b'B' => Some(Kind::Broadcast),
            b'C' => Some(Kind::Claim),
            _ => None,
        }
    }
}

/// Encodes one record (done by the sending task: one copy of the message).
pub fn encode_record(kind: Kind, target: &str, body: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(9 + target.len() + body.len());
    v.push(kind.byte());
    v.extend_from_slice(&(target.len() as u32).to_be_bytes());
    v.extend_from_slice(target.as_bytes());
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(body);
    Bytes::from(v)
}

/// Packs encoded records behind a header naming the origin node and the first sequence number.
pub fn encode_payload(origin: &str, first_seq: u64, records: &[Bytes]) -> Vec<u8> {
    debug_assert!(origin.len() <= 255, "node ids are validated to at most 64 bytes");
    let size: usize = records.iter().map(|r| r.len()).sum();
    let mut v = Vec::with_capacity(14 + origin.len() + size);
    v.push(ENVELOPE_VERSION);
    v.push(origin.len() as u8);
    v.extend_from_slice(origin.as_bytes());
    v.extend_from_slice(&first_seq.to_be_bytes());
    v.extend_from_slice(&(records.len() as u32).to_be_bytes());
    for r in records {
        v.extend_from_slice(r);
    }
    v
}

/// One decoded record, borrowing from the payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: Kind,
    pub target: &'a str,
    pub body: &'a [u8],
}

/// A payload whose header is decoded; its records are decoded on demand (a node skips its own
/// payloads after reading the header only).
#[derive(Debug)]
pub struct Payload<'a> {
    pub origin: &'a str,
    pub first_seq: u64,
    pub count: u32,
    rest: &'a [u8],
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("truncated payload");
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn str(&mut self, n: usize) -> Result<&'a str, &'static str> {
        std::str::from_utf8(self.take(n)?).map_err(|_| "a name is not UTF-8")
    }
}

/// Decodes a payload's header.
pub fn decode_payload(p: &[u8]) -> Result<Payload<'_>, &'static str> {
    let mut c = Cursor(p);
    if c.u8()? != ENVELOPE_VERSION {
        return Err("unknown envelope version");
    }
    let origin_len = c.u8()? as usize;
    let origin = c.str(origin_len)?;
    let first_seq = c.u64()?;
    let count = c.u32()?;
    Ok(Payload { origin, first_seq, count, rest: c.0 })
}

impl<'a> Payload<'a> {
    /// Every record; an error when the payload is malformed (nothing of it should be used).
    pub fn records(&self) -> Result<Vec<Record<'a>>, &'static str> {
        let mut c = Cursor(self.rest);
        let mut out = Vec::with_capacity(self.count.min(4096) as usize);
        for _ in 0..self.count {
            let kind = Kind::from_byte(c.u8()?).ok_or("unknown record kind")?;
            let target_len = c.u32()? as usize;
            let target = c.str(target_len)?;
            let body_len = c.u32()? as usize;
            let body = c.take(body_len)?;
            out.push(Record { kind, target, body });
        }
        if !c.0.is_empty() {
            return Err("trailing bytes after the last record");
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Small pure helpers: backoff, rate-limited logging, sequence tracking.
// ---------------------------------------------------------------------------------------------

/// Capped exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling from
/// `first` to `cap`; [`reset`](Self::reset) after a success.
pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
    rng: u64,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration, seed: u64) -> Self {
        Backoff { first, cap, next: first, rng: seed | 1 }
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.cap);
        // xorshift64: jitter only, so nodes that lost Redis together do not retry in lockstep.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = d / 2;
        let span = (d - half).as_micros() as u64;
        half + Duration::from_micros(if span == 0 { 0 } else { self.rng % (span + 1) })
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    t ^ ((std::process::id() as u64) << 32)
}

/// Lets a repeated warning through at most once per [`LOG_EVERY`], counting what it held back.
#[derive(Default)]
struct LogLimit {
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimit {
    /// `Some(suppressed since the last one)` when this occurrence should be logged.
    fn allow(&self, n: u64) -> Option<u64> {
        let mut st = self.state.lock();
        let now = Instant::now();
        match st.0 {
            Some(last) if now.duration_since(last) < LOG_EVERY => {
                st.1 += n;
                None
            }
            _ => {
                st.0 = Some(now);
                Some(std::mem::take(&mut st.1))
            }
        }
    }
}

/// Next expected sequence number per origin node: tells how many records this node missed.
#[derive(Default)]
pub struct SeqTracker {
    next: HashMap<Box<str>, (u64, Instant)>,
}

impl SeqTracker {
    /// Records a payload of `count` records from `origin` starting at `first_seq`; returns how
    /// many records before it never arrived. An origin seen for the first time, or one whose
    /// numbering went back (it restarted), starts afresh and reports no gap.
    pub fn observe(&mut self, origin: &str, first_seq: u64, count: u32) -> u64 {
        let now = Instant::now();
        let end = first_seq.saturating_add(count as u64);
        match self.next.get_mut(origin) {
            Some((next, seen)) => {
                let missed = first_seq.saturating_sub(*next);
                *next = end;
                *seen = now;
                missed
            }
            None => {
                self.next.insert(origin.into(), (end, now));
                0
            }
        }
    }

    /// Forgets origins not heard from for `age`.
    pub fn forget_older_than(&mut self, age: Duration) {
        let now = Instant::now();
        self.next.retain(|_, (_, seen)| now.duration_since(*seen) < age);
    }
}

// ---------------------------------------------------------------------------------------------
// The handle the rest of the broker uses.
// ---------------------------------------------------------------------------------------------

/// What this node knows of the other live nodes (from the last presence round trip).
#[derive(Default)]
struct View {
    at: Option<Instant>,
    nodes: usize,
    clients: usize,
    rooms: HashMap<String, usize>,
}

#[derive(Default)]
struct State {
    publisher_up: AtomicBool,
    subscriber_up: AtomicBool,
    /// Payloads Redis pushed that did not fit in the receive queue.
    overflow: Arc<AtomicU64>,
    view: RwLock<View>,
}

/// This node's membership in a cluster: held in [`Shared`] when `cluster_url` is set.
pub struct Cluster {
    pub node_id: Arc<str>,
    tx: mpsc::Sender<Bytes>,
    state: Arc<State>,
    counters: Arc<Counters>,
    full_log: LogLimit,
}

impl Cluster {
    /// Hands a record to the publisher without waiting; a full queue drops it (counted).
    fn publish(&self, record: Bytes) {
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

    /// Announces a new connection so an older one with the same `client_id` elsewhere closes.
    pub fn claim(&self, slot: &ClientSlot) {
        self.publish(encode_record(Kind::Claim, &slot.client_id, &slot.since_ms.to_be_bytes()));
    }

    /// Both connections to Redis are up.
    pub fn connected(&self) -> bool {
        self.state.publisher_up.load(Ordering::Acquire) && self.state.subscriber_up.load(Ordering::Acquire)
    }

    /// Cluster figures: this node's live counts plus the other nodes' last reports (dropped
    /// once older than [`PRESENCE_TTL`], e.g. while Redis is unreachable).
    pub fn stats(&self, hub: &Hub) -> ClusterStats {
        let (local_clients, local_rooms) = hub.room_sizes();
        let view = self.state.view.read();
        let fresh = view.at.is_some_and(|t| t.elapsed() < PRESENCE_TTL);
        let (nodes, clients, rooms) = if fresh {
            let only_here = local_rooms.iter().filter(|(r, _)| !view.rooms.contains_key(&**r)).count();
            (1 + view.nodes, local_clients + view.clients, view.rooms.len() + only_here)
        } else {
            (1, local_clients, local_rooms.len())
        };
        ClusterStats { node_id: self.node_id.to_string(), connected: self.connected(), nodes, clients, rooms }
    }

    /// Room → members on every live node (same freshness as [`stats`](Self::stats)).
    pub fn room_members(&self, hub: &Hub) -> HashMap<String, usize> {
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

/// A backend's `message_to_room`: local members now, other nodes through Redis.
pub fn send_room(shared: &Shared, room_id: &str, message: String) -> usize {
    let record = shared.cluster.as_ref().map(|_| encode_record(Kind::Room, room_id, message.as_bytes()));
    let n = shared.hub.send_room(room_id, message);
    if let (Some(c), Some(r)) = (&shared.cluster, record) {
        c.publish(r);
    }
    n
}

/// A backend's `broadcast`: every local client now, other nodes through Redis.
pub fn broadcast(shared: &Shared, message: String) -> usize {
    let record = shared.cluster.as_ref().map(|_| encode_record(Kind::Broadcast, "", message.as_bytes()));
    let n = shared.hub.broadcast(message);
    if let (Some(c), Some(r)) = (&shared.cluster, record) {
        c.publish(r);
    }
    n
}

/// A backend's `message_to_connection`: delivered here when the client is here, else published
/// for the node that holds it. False only when it went nowhere (alone, unknown client:
/// `no_route`; or the client's queue was full).
pub fn send_private(shared: &Shared, client_id: &str, message: String) -> bool {
    match shared.hub.try_send_to(client_id, message) {
        Ok(queued) => queued,
        Err(message) => match &shared.cluster {
            Some(c) => {
                c.publish(encode_record(Kind::Private, client_id, message.as_bytes()));
                true
            }
            None => {
                incr(&shared.counters.no_route);
                false
            }
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Start-up and the three tasks.
// ---------------------------------------------------------------------------------------------

/// Everything the tasks need, created before the broker's shared state exists.
pub struct Starter {
    client: redis::Client,
    url_shown: String,
    node_id: Arc<str>,
    channel: String,
    name: String,
    rx: mpsc::Receiver<Bytes>,
    state: Arc<State>,
    conn: Option<MultiplexedConnection>,
    pubsub: Option<Subscription>,
}

/// A subscribed RESP3 connection and the bounded queue its pushed messages arrive in.
type Subscription = (MultiplexedConnection, mpsc::Receiver<redis::PushInfo>);

/// Builds the cluster handle and its starter (no I/O yet). `cfg.cluster_url` must be set.
pub fn build(cfg: &Config, counters: Arc<Counters>) -> Result<(Cluster, Starter), String> {
    let url = cfg.cluster_url.as_deref().ok_or("cluster_url is not set")?;
    let url_shown = crate::config::redact_url(url);
    let client = redis::Client::open(url).map_err(|e| format!("invalid setting cluster_url={url_shown}: {e}"))?;
    let node_id: Arc<str> = match &cfg.cluster_node_id {
        Some(id) => id.as_str().into(),
        None => format!("n-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]).into(),
    };
    let (tx, rx) = mpsc::channel(PUBLISH_QUEUE);
    let state = Arc::new(State::default());
    let cluster =
        Cluster { node_id: node_id.clone(), tx, state: state.clone(), counters, full_log: LogLimit::default() };
    let starter = Starter {
        client,
        url_shown,
        node_id,
        channel: format!("{}:bus", cfg.cluster_name),
        name: cfg.cluster_name.clone(),
        rx,
        state,
        conn: None,
        pubsub: None,
    };
    Ok((cluster, starter))
}

async fn open_publisher(client: &redis::Client) -> Result<MultiplexedConnection, String> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    let mut conn = client.get_multiplexed_async_connection_with_config(&config).await.map_err(|e| e.to_string())?;
    redis::cmd("PING").query_async::<()>(&mut conn).await.map_err(|e| e.to_string())?;
    Ok(conn)
}

/// The same server as `client`, spoken in RESP3: pushed pub/sub messages can then be handed to
/// a bounded queue (RESP2's pub/sub connection buffers without bound). Needs Redis >= 6.
fn resp3(client: &redis::Client) -> Result<redis::Client, String> {
    let info = client.get_connection_info().clone();
    let settings = info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
    redis::Client::open(info.set_redis_settings(settings)).map_err(|e| e.to_string())
}

/// Opens the dedicated subscriber connection and subscribes to `channel`. Pushed messages go to
/// a bounded queue; those that do not fit are dropped and counted in `overflow`.
async fn open_subscriber(
    client: &redis::Client,
    channel: &str,
    overflow: Arc<AtomicU64>,
) -> Result<Subscription, String> {
    let (tx, rx) = mpsc::channel(RECEIVE_QUEUE);
    let push = move |info: redis::PushInfo| -> Result<(), ()> {
        tx.try_send(info).map_err(|e| {
            if matches!(e, mpsc::error::TrySendError::Full(_)) {
                overflow.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_push_sender(push);
    let subscribe = async {
        let mut conn = client.get_multiplexed_async_connection_with_config(&config).await.map_err(|e| e.to_string())?;
        conn.subscribe(channel).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((conn, rx))
    };
    tokio::time::timeout(CONNECT_TIMEOUT * 2, subscribe)
        .await
        .map_err(|_| format!("no answer within {} s", CONNECT_TIMEOUT.as_secs() * 2))?
}

impl Starter {
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Connects the publisher and subscribes, so that once the broker serves, messages from
    /// other nodes already arrive. The error names `cluster_url` (password masked).
    pub async fn connect(&mut self) -> Result<(), String> {
        let conn = open_publisher(&self.client).await;
        let pubsub = match &conn {
            Ok(_) => match resp3(&self.client) {
                Ok(sub_client) => open_subscriber(&sub_client, &self.channel, self.state.overflow.clone()).await,
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

    /// Starts the publisher, subscriber and presence tasks (on the current runtime).
    pub fn spawn(self, shared: Arc<Shared>, stop: Signal, guard: TaskGuard) {
        let Starter { client, url_shown, node_id, channel, name, rx, state, conn, pubsub } = self;
        // The URL was accepted by `redis::Client::open`, so the RESP3 variant of it is too.
        let sub_client = resp3(&client).unwrap_or_else(|_| client.clone());
        let (conn_tx, conn_rx) = watch::channel(conn.clone());
        let ever = conn.is_some();
        let publisher = Publisher {
            client: client.clone(),
            url_shown: url_shown.clone(),
            channel: channel.clone(),
            node_id: node_id.clone(),
            conn,
            conn_tx,
            rx,
            shared: shared.clone(),
            state: state.clone(),
            stop: stop.clone(),
            next_seq: 1,
            backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_CAP, seed()),
            ever_connected: ever,
            down_log: LogLimit::default(),
        };
        let subscriber = Subscriber {
            client: sub_client,
            url_shown,
            channel,
            node_id: node_id.clone(),
            pubsub,
            shared: shared.clone(),
            state: state.clone(),
            stop: stop.clone(),
            backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_CAP, seed().rotate_left(17)),
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

/// Publishes records, pipelined; owns the (multiplexed) connection that presence also uses.
struct Publisher {
    client: redis::Client,
    url_shown: String,
    channel: String,
    node_id: Arc<str>,
    conn: Option<MultiplexedConnection>,
    conn_tx: watch::Sender<Option<MultiplexedConnection>>,
    rx: mpsc::Receiver<Bytes>,
    shared: Arc<Shared>,
    state: Arc<State>,
    stop: Signal,
    next_seq: u64,
    backoff: Backoff,
    ever_connected: bool,
    down_log: LogLimit,
}

impl Publisher {
    async fn run(mut self) {
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.conn.is_none() {
                if !self.reconnect().await {
                    break;
                }
                continue;
            }
            tokio::select! {
                biased;
                _ = self.stop.fired() => {
                    // Backends are finished: publish what they left, once, then leave.
                    if let Ok(first) = self.rx.try_recv() {
                        self.publish_batch(first).await;
                    }
                    break;
                }
                rec = self.rx.recv() => match rec {
                    Some(first) => self.publish_batch(first).await,
                    None => break,
                },
                _ = ping.tick() => {
                    let Some(conn) = self.conn.as_mut() else { continue };
                    if let Err(e) = redis::cmd("PING").query_async::<()>(conn).await {
                        self.lost(&e.to_string());
                    }
                }
            }
        }
        self.state.publisher_up.store(false, Ordering::Release);
        self.conn_tx.send_replace(None);
        self.rx.close();
        let mut left = 0;
        while self.rx.try_recv().is_ok() {
            left += 1;
        }
        if left > 0 {
            self.dropped(left);
        }
    }

    /// Packs what is queued into payloads and publishes them in one pipelined round trip.
    async fn publish_batch(&mut self, first: Bytes) {
        let first_seq = self.next_seq;
        let mut seq = first_seq;
        let mut payloads: Vec<Vec<u8>> = Vec::new();
        let mut size = first.len();
        let mut records = vec![first];
        while payloads.len() < MAX_PIPELINE {
            let Ok(r) = self.rx.try_recv() else { break };
            if size + r.len() > MAX_PAYLOAD {
                payloads.push(encode_payload(&self.node_id, seq, &records));
                seq += records.len() as u64;
                records.clear();
                size = 0;
            }
            size += r.len();
            records.push(r);
        }
        if !records.is_empty() {
            payloads.push(encode_payload(&self.node_id, seq, &records));
            seq += records.len() as u64;
        }
        let total = seq - first_seq;
        let Some(conn) = self.conn.as_mut() else {
            self.dropped(total);
            return;
        };
        let mut pipe = redis::pipe();
        for p in &payloads {
            pipe.cmd("PUBLISH").arg(&self.channel).arg(p.as_slice()).ignore();
        }
        match pipe.query_async::<()>(conn).await {
            Ok(()) => {
                self.next_seq = seq;
                add(&self.shared.counters.cluster_published, total);
            }
            Err(e) => {
                // Whether some got through is unknown: count them all as not published, and
                // reuse the numbers so receivers do not also count a gap for them.
                self.next_seq = first_seq;
                self.dropped(total);
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error() {
                    self.lost(&e.to_string());
                } else {
                    // Redis answered, but refused (e.g. a payload over its proto-max-bulk-len):
                    // the connection is fine.
                    tracing::error!(error = %e, "Redis refused a publish; those messages did not reach other nodes");
                }
            }
        }
    }

    fn dropped(&self, n: u64) {
        add(&self.shared.counters.cluster_publish_dropped, n);
        if let Some(suppressed) = self.down_log.allow(n) {
            tracing::warn!(messages = n + suppressed, "Redis unreachable: messages for other nodes were not published (counted in cluster_publish_dropped); local delivery continues");
        }
    }

    fn lost(&mut self, why: &str) {
        if self.conn.take().is_some() {
            tracing::warn!(redis = %self.url_shown, error = why, "lost the connection to Redis (publisher); reconnecting with backoff");
        }
        self.state.publisher_up.store(false, Ordering::Release);
        self.conn_tx.send_replace(None);
        self.backoff.reset();
    }

    /// Waits one backoff delay (dropping and counting records meanwhile), then tries once.
    /// Returns false when the broker is stopping.
    async fn reconnect(&mut self) -> bool {
        let sleep = tokio::time::sleep(self.backoff.next_delay());
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = self.stop.fired() => return false,
                rec = self.rx.recv() => match rec {
                    Some(_) => {
                        let mut n = 1;
                        while self.rx.try_recv().is_ok() {
                            n += 1;
                        }
                        self.dropped(n);
                    }
                    None => return false,
                },
                _ = &mut sleep => break,
            }
        }
        match open_publisher(&self.client).await {
            Ok(conn) => {
                self.conn = Some(conn.clone());
                self.conn_tx.send_replace(Some(conn));
                self.state.publisher_up.store(true, Ordering::Release);
                self.backoff.reset();
                if self.ever_connected {
                    incr(&self.shared.counters.cluster_reconnects);
                }
                self.ever_connected = true;
                tracing::info!(redis = %self.url_shown, "connected to Redis (publisher)");
            }
            Err(e) => {
                if let Some(suppressed) = self.down_log.allow(0) {
                    tracing::warn!(redis = %self.url_shown, error = %e, suppressed, "cannot reach Redis (publisher); retrying");
                }
            }
        }
        true
    }
}

/// Receives other nodes' records on a dedicated pub/sub connection and delivers them here.
struct Subscriber {
    client: redis::Client,
    url_shown: String,
    channel: String,
    node_id: Arc<str>,
    pubsub: Option<Subscription>,
    shared: Arc<Shared>,
    state: Arc<State>,
    stop: Signal,
    backoff: Backoff,
    seqs: SeqTracker,
    ever_connected: bool,
    bad_log: LogLimit,
    gap_log: LogLimit,
    down_log: LogLimit,
    overflow_seen: u64,
}

impl Subscriber {
    async fn run(mut self) {
        loop {
            let (mut conn, mut pushed) = match self.pubsub.take() {
                Some(p) => p,
                None => match self.reconnect().await {
                    Some(Some(p)) => p,
                    Some(None) => continue,
                    None => break,
                },
            };
            self.state.subscriber_up.store(true, Ordering::Release);
            let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let why = loop {
                tokio::select! {
                    _ = self.stop.fired() => {
                        self.state.subscriber_up.store(false, Ordering::Release);
                        return;
                    }
                    info = pushed.recv() => match info {
                        Some(info) => match info.kind {
                            redis::PushKind::Message => match info.data.get(1) {
                                Some(redis::Value::BulkString(payload)) => self.handle(payload),
                                _ => self.bad("pushed message without a payload"),
                            },
                            redis::PushKind::Disconnection => break "connection closed".to_string(),
                            _ => {} // subscribe confirmations
                        },
                        None => break "connection closed".to_string(),
                    },
                    _ = ping.tick() => {
                        self.seqs.forget_older_than(FORGET_ORIGIN);
                        self.report_overflow();
                        if let Err(e) = redis::cmd("PING").query_async::<()>(&mut conn).await {
                            break e.to_string();
                        }
                    }
                }
            };
            self.state.subscriber_up.store(false, Ordering::Release);
            tracing::warn!(redis = %self.url_shown, error = %why, "lost the Redis subscription; messages from other nodes are missed until it is back (counted in cluster_missed)");
            self.backoff.reset();
        }
    }

    fn report_overflow(&mut self) {
        let total = self.state.overflow.load(Ordering::Relaxed);
        if total > self.overflow_seen {
            let n = total - self.overflow_seen;
            self.overflow_seen = total;
            tracing::warn!(payloads = n, "this node falls behind the cluster channel: payloads from Redis were dropped (their messages are counted in cluster_missed)");
        }
    }

    /// `None`: stopping. `Some(None)`: this attempt failed. `Some(Some(s))`: subscribed.
    async fn reconnect(&mut self) -> Option<Option<Subscription>> {
        tokio::select! {
            _ = self.stop.fired() => return None,
            _ = tokio::time::sleep(self.backoff.next_delay()) => {}
        }
        match open_subscriber(&self.client, &self.channel, self.state.overflow.clone()).await {
            Ok(p) => {
                self.backoff.reset();
                if self.ever_connected {
                    incr(&self.shared.counters.cluster_reconnects);
                }
                self.ever_connected = true;
                tracing::info!(redis = %self.url_shown, channel = %self.channel, "subscribed to the cluster channel");
                Some(Some(p))
            }
            Err(e) => {
                if let Some(suppressed) = self.down_log.allow(0) {
                    tracing::warn!(redis = %self.url_shown, error = %e, suppressed, "cannot reach Redis (subscriber); retrying");
                }
                Some(None)
            }
        }
    }

    fn bad(&self, why: &str) {
        incr(&self.shared.counters.cluster_decode_errors);
        if let Some(suppressed) = self.bad_log.allow(1) {
            tracing::error!(
                error = why,
                suppressed,
                "undecodable payload on the cluster channel (another version or another program?); skipped"
            );
        }
    }

    fn handle(&mut self, bytes: &[u8]) {
        let payload = match decode_payload(bytes) {
            Ok(p) => p,
            Err(e) => return self.bad(e),
        };
        if payload.origin == &*self.node_id {
            return; // delivered locally when it was sent
        }
        let records = match payload.records() {
            Ok(r) => r,
            Err(e) => return self.bad(e),
        };
        let missed = self.seqs.observe(payload.origin, payload.first_seq, payload.count);
        if missed > 0 {
            add(&self.shared.counters.cluster_missed, missed);
            if let Some(suppressed) = self.gap_log.allow(missed) {
                tracing::warn!(
                    origin = payload.origin,
                    missed = missed + suppressed,
                    "messages from another node never arrived here (Redis pub/sub is at-most-once)"
                );
            }
        }
        add(&self.shared.counters.cluster_received, records.len() as u64);
        let hub = &self.shared.hub;
        for r in records {
            match r.kind {
                Kind::Claim => {
                    let Ok(ms) = <[u8; 8]>::try_from(r.body) else { return self.bad("claim without a timestamp") };
                    hub.replaced_elsewhere(r.target, u64::from_be_bytes(ms), payload.origin > &*self.node_id);
                }
                Kind::Room if hub.room_size(r.target) == 0 => {}
                Kind::Room | Kind::Broadcast | Kind::Private => {
                    let Ok(text) = std::str::from_utf8(r.body) else { return self.bad("message is not UTF-8") };
                    let text = text.to_owned();
                    match r.kind {
                        Kind::Room => {
                            hub.send_room(r.target, text);
                        }
                        Kind::Broadcast => {
                            hub.broadcast(text);
                        }
                        // Not here: another node holds the client (or nobody does).
                        _ => {
                            let _ = hub.try_send_to(r.target, text);
                        }
                    }
                }
            }
        }
    }
}

/// One node's presence report, as stored in Redis.
#[derive(Serialize, Deserialize)]
struct NodeReport {
    node: String,
    clients: usize,
    rooms: HashMap<String, usize>,
}

/// Writes this node's report (when membership changed; otherwise only refreshes its expiry),
/// registers the node in a sorted set scored by expiry, removes expired nodes, and returns the
/// other live nodes' reports. Uses Redis' clock, so nodes' clocks do not matter.
/// KEYS: nodes set, own report. ARGV: node id, report or '' (refresh), ttl ms, report prefix.
const PRESENCE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
elseif redis.call('PEXPIRE', KEYS[2], ttl) == 0 then
  return {'missing'}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {'ok'}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if id ~= ARGV[1] then
    local v = redis.call('GET', ARGV[4] .. id)
    if v then out[#out + 1] = v end
  end
end
return out
";

struct Presence {
    conn_rx: watch::Receiver<Option<MultiplexedConnection>>,
    nodes_key: String,
    node_prefix: String,
    node_id: Arc<str>,
    shared: Arc<Shared>,
    state: Arc<State>,
    stop: Signal,
    /// Membership version of the report last written (None: write a full report next).
    written: Option<u64>,
}

impl Presence {
    async fn run(mut self) {
        let script = redis::Script::new(PRESENCE_SCRIPT);
        let own_key = format!("{}{}", self.node_prefix, self.node_id);
        let mut tick = tokio::time::interval(PRESENCE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.stop.fired() => break,
            }
            let conn = self.conn_rx.borrow().clone();
            let Some(mut conn) = conn else {
                self.written = None;
                continue;
            };
            for _ in 0..2 {
                let version = self.shared.hub.membership_version();
                let report = if self.written == Some(version) { String::new() } else { self.report() };
                let mut invocation = script.key(&self.nodes_key);
                invocation
                    .key(&own_key)
                    .arg(&*self.node_id)
                    .arg(&report)
                    .arg(PRESENCE_TTL.as_millis() as u64)
                    .arg(&self.node_prefix);
                let call = invocation.invoke_async::<Vec<Vec<u8>>>(&mut conn);
                match tokio::time::timeout(RESPONSE_TIMEOUT, call).await {
                    Ok(Ok(reply)) if reply.first().map(Vec::as_slice) == Some(b"ok") => {
                        self.written = Some(version);
                        self.update_view(&reply[1..]);
                        break;
                    }
                    Ok(Ok(_)) => self.written = None, // our report vanished (Redis restarted): write it again now
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "presence report failed");
                        self.written = None;
                        break;
                    }
                    Err(_) => {
                        tracing::debug!("presence report timed out");
                        self.written = None;
                        break;
                    }
                }
            }
        }
        // Leave at once rather than when the report expires (best effort).
        let conn = self.conn_rx.borrow().clone();
        if let Some(mut conn) = conn {
            let mut pipe = redis::pipe();
            pipe.cmd("ZREM").arg(&self.nodes_key).arg(&*self.node_id).ignore().cmd("DEL").arg(&own_key).ignore();
            let _ = tokio::time::timeout(Duration::from_secs(1), pipe.query_async::<()>(&mut conn)).await;
        }
    }

    fn report(&self) -> String {
        let (clients, rooms) = self.shared.hub.room_sizes();
        let report = NodeReport {
            node: self.node_id.to_string(),
            clients,
            rooms: rooms.into_iter().map(|(r, n)| (r.to_string(), n)).collect(),
        };
        serde_json::to_string(&report).unwrap_or_default()
    }

    fn update_view(&self, reports: &[Vec<u8>]) {
        let mut view = View { at: Some(Instant::now()), ..View::default() };
        for raw in reports {
            match serde_json::from_slice::<NodeReport>(raw) {
                Ok(r) => {
                    view.nodes += 1;
                    view.clients += r.clients;
                    for (room, n) in r.rooms {
                        *view.rooms.entry(room).or_default() += n;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "unreadable presence report of another node; ignored"),
            }
        }
        *self.state.view.write() = view;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip_keeps_origin_sequence_and_every_byte() {
        let recs = vec![
            encode_record(Kind::Room, "chat\u{0}room ü", b"hello \"world\"\n"),
            encode_record(Kind::Private, "alice", b""),
            encode_record(Kind::Broadcast, "", "ß∂ƒ".as_bytes()),
            encode_record(Kind::Claim, "bob", &42u64.to_be_bytes()),
        ];
        let p = encode_payload("node-a", 7, &recs);
        let d = decode_payload(&p).unwrap();
        assert_eq!(d.origin, "node-a");
        assert_eq!(d.first_seq, 7);
        assert_eq!(d.count, 4);
        let r = d.records().unwrap();
        assert_eq!(r[0], Record { kind: Kind::Room, target: "chat\u{0}room ü", body: b"hello \"world\"\n" });
        assert_eq!(r[1], Record { kind: Kind::Private, target: "alice", body: b"" });
        assert_eq!(r[2], Record { kind: Kind::Broadcast, target: "", body: "ß∂ƒ".as_bytes() });
        assert_eq!(r[3].kind, Kind::Claim);
        assert_eq!(u64::from_be_bytes(r[3].body.try_into().unwrap()), 42);
    }

    #[test]
    fn malformed_payloads_are_refused_not_panicked_on() {
        let p = encode_payload("n", 1, &[encode_record(Kind::Room, "r", b"msg")]);
        // Every truncation is an error, never a panic or a partial record list.
        for cut in 0..p.len() {
            let ok = decode_payload(&p[..cut]).and_then(|d| d.records());
            assert!(ok.is_err(), "cut at {cut} decoded");
        }
        let mut wrong_version = p.clone();
        wrong_version[0] = 99;
        assert!(decode_payload(&wrong_version).is_err());
        let mut trailing = p.clone();
        trailing.push(0);
        assert!(decode_payload(&trailing).unwrap().records().is_err());
        let mut bad_kind = p.clone();
        let kind_at = 2 + 1 + 8 + 4;
        bad_kind[kind_at] = b'Z';
        assert_eq!(decode_payload(&bad_kind).unwrap().records().unwrap_err(), "unknown record kind");
        // A huge declared length does not allocate or read out of bounds.
        let mut huge = encode_payload("n", 1, &[]);
        huge[2 + 1 + 8..2 + 1 + 8 + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        huge.extend_from_slice(&[b'R', 0xff, 0xff, 0xff, 0xff]);
        assert!(decode_payload(&huge).unwrap().records().is_err());
        assert!(decode_payload(b"").is_err());
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter_and_resets() {
        let first = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        let mut b = Backoff::new(first, cap, 12345);
        let mut nominal = first;
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d >= nominal / 2 && d <= nominal, "{d:?} outside [{:?}, {nominal:?}]", nominal / 2);
            nominal = (nominal * 2).min(cap);
        }
        assert!(b.next_delay() >= cap / 2);
        b.reset();
        assert!(b.next_delay() <= first);
        // Different seeds do not retry in lockstep.
        let mut other = Backoff::new(first, cap, 999);
        let mut b = Backoff::new(first, cap, 12345);
        let same = (0..8).filter(|_| b.next_delay() == other.next_delay()).count();
        assert!(same < 8);
    }

    #[test]
    fn sequence_gaps_are_counted_and_restarts_are_not() {
        let mut t = SeqTracker::default();
        assert_eq!(t.observe("a", 1, 3), 0, "first sight: nothing known to be missed");
        assert_eq!(t.observe("a", 4, 1), 0);
        assert_eq!(t.observe("a", 10, 2), 5, "records 5..=9 never came");
        assert_eq!(t.observe("b", 100, 1), 0, "origins are independent");
        assert_eq!(t.observe("a", 1, 1), 0, "numbering went back: the origin restarted");
        assert_eq!(t.observe("a", 2, 1), 0);
        t.forget_older_than(Duration::ZERO);
        assert_eq!(t.observe("a", 50, 1), 0, "forgotten origin starts afresh");
    }

    #[test]
    fn log_limit_lets_one_through_and_counts_the_rest() {
        let l = LogLimit::default();
        assert_eq!(l.allow(1), Some(0));
        assert_eq!(l.allow(5), None);
        assert_eq!(l.allow(1), None);
        l.state.lock().0 = Some(Instant::now() - LOG_EVERY);
        assert_eq!(l.allow(1), Some(6));
    }
}
