//! The publisher task: drains the records this node's backends sent (queued without waiting by
//! [`Cluster::publish`](super::Cluster::publish)), packs them into envelopes and PUBLISHes them,
//! pipelined, on the cluster channel. Messages to rooms with history go through the append
//! script instead (`super::streams`), in the same pipeline and so in the same order. It owns the node's command connection to Redis, which the
//! presence task borrows, and reconnects it with backoff when it is lost.

use super::envelope::{decode_record, encode_payload};
use super::streams;
use super::{State, CONNECT_TIMEOUT, PING_EVERY, RESPONSE_TIMEOUT};
use crate::shutdown::Signal;
use crate::stats::{add, incr};
use crate::throttle::{Backoff, LogLimit};
use crate::Shared;
use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// Records are packed into payloads of about this size (a larger record goes alone).
const MAX_PAYLOAD: usize = 64 * 1024;
/// Most payloads sent in one pipelined round trip.
const MAX_PIPELINE: usize = 64;

/// Opens the command connection (publishing, presence) and checks it with a PING.
pub(super) async fn open_publisher(client: &redis::Client) -> Result<MultiplexedConnection, String> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    let mut conn = client.get_multiplexed_async_connection_with_config(&config).await.map_err(|e| e.to_string())?;
    redis::cmd("PING").query_async::<()>(&mut conn).await.map_err(|e| e.to_string())?;
    Ok(conn)
}

/// Publishes records, pipelined; owns the (multiplexed) connection that presence also uses.
pub(super) struct Publisher {
    pub(super) client: redis::Client,
    pub(super) url_shown: String,
    /// `cluster_name`: the prefix of every key.
    pub(super) name: String,
    pub(super) channel: String,
    pub(super) node_id: Arc<str>,
    pub(super) conn: Option<MultiplexedConnection>,
    pub(super) conn_tx: watch::Sender<Option<MultiplexedConnection>>,
    pub(super) rx: mpsc::Receiver<Bytes>,
    pub(super) shared: Arc<Shared>,
    pub(super) state: Arc<State>,
    pub(super) stop: Signal,
    pub(super) next_seq: u64,
    pub(super) backoff: Backoff,
    pub(super) ever_connected: bool,
    pub(super) down_log: LogLimit,
}

impl Publisher {
    pub(super) async fn run(mut self) {
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

    /// Packs what is queued into payloads and publishes them in one pipelined round trip; a
    /// message to a room with history becomes an append script call at its place in the order.
    async fn publish_batch(&mut self, first: Bytes) {
        let first_seq = self.next_seq;
        let mut seq = first_seq;
        let mut pipe = redis::pipe();
        let mut calls = 0;
        let mut appends = 0u64;
        let script = redis::Script::new(streams::APPEND);
        let streams_channel = format!("{}:streams", self.name);
        let mut records: Vec<Bytes> = Vec::new();
        let mut size = 0;
        let mut next = Some(first);
        while let Some(r) = next.take() {
            match r.first().copied() {
                Some(b'S') | Some(b'G') => {
                    if !records.is_empty() {
                        pipe.cmd("PUBLISH")
                            .arg(&self.channel)
                            .arg(encode_payload(&self.node_id, seq, &records))
                            .ignore();
                        seq += records.len() as u64;
                        records.clear();
                        size = 0;
                    }
                    if r[0] == b'G' {
                        // Spread like any record, and kept for nodes that start later.
                        if let Ok(rec) = decode_record(&r) {
                            pipe.cmd("HSET")
                                .arg(format!("{}:roomcfg", self.name))
                                .arg(rec.target)
                                .arg(rec.body)
                                .ignore();
                        }
                        pipe.cmd("PUBLISH").arg(&self.channel).arg(encode_payload(&self.node_id, seq, &[r])).ignore();
                        seq += 1;
                    } else {
                        match decode_record(&r).and_then(|rec| streams::decode_stream_record(&rec)) {
                            Ok(a) => {
                                if appends == 0 {
                                    pipe.load_script(&script).ignore();
                                }
                                let epoch = streams::epoch();
                                let mut inv = script.key(streams::meta_key(&self.name, &a.room));
                                inv.key(streams::stream_key(&self.name, &a.room))
                                    .arg(&streams_channel)
                                    .arg(&*epoch)
                                    .arg(a.size)
                                    .arg(a.ttl.as_millis() as u64)
                                    .arg(self.shared.rooms.meta_ttl().as_millis() as u64)
                                    .arg(a.payload)
                                    .arg(a.message);
                                pipe.invoke_script(&inv).ignore();
                                appends += 1;
                            }
                            Err(e) => tracing::error!(error = e, "bad stream record (a bug); dropped"),
                        }
                    }
                    calls += 1;
                }
                _ => {
                    if size + r.len() > MAX_PAYLOAD && !records.is_empty() {
                        pipe.cmd("PUBLISH")
                            .arg(&self.channel)
                            .arg(encode_payload(&self.node_id, seq, &records))
                            .ignore();
                        seq += records.len() as u64;
                        calls += 1;
                        records.clear();
                        size = 0;
                    }
                    size += r.len();
                    records.push(r);
                }
            }
            if calls < MAX_PIPELINE {
                next = self.rx.try_recv().ok();
            }
        }
        if !records.is_empty() {
            pipe.cmd("PUBLISH").arg(&self.channel).arg(encode_payload(&self.node_id, seq, &records)).ignore();
            seq += records.len() as u64;
        }
        let total = seq - first_seq + appends;
        let Some(conn) = self.conn.as_mut() else {
            self.dropped(total);
            return;
        };
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
