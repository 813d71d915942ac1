//! The subscriber task: holds this node's dedicated pub/sub connection to the cluster channel,
//! decodes every payload another node published, counts what never arrived (sequence gaps,
//! overflow of the bounded receive queue) and delivers the records to this node's hub. It is
//! the receiving half of the cluster; it reconnects with backoff when the subscription is lost.

use super::envelope::{self, decode_payload, Kind, Record};
use super::{State, CONNECT_TIMEOUT, PING_EVERY, RESPONSE_TIMEOUT};
use crate::hub::{Join, Leave};
use crate::shutdown::Signal;
use crate::stats::{add, incr};
use crate::throttle::{Backoff, LogLimit};
use crate::Shared;
use redis::aio::MultiplexedConnection;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Payloads from Redis that may wait for this node's subscriber task. A node that cannot keep
/// up drops beyond it (the records show up in `cluster_missed`) instead of buffering without
/// bound: the pub/sub connection is RESP3 with a push handler feeding this bounded queue.
const RECEIVE_QUEUE: usize = 4096;
/// Sequence state of an origin not heard from for this long is forgotten.
const FORGET_ORIGIN: Duration = Duration::from_secs(600);

/// A subscribed RESP3 connection and the bounded queue its pushed messages arrive in.
pub(super) type Subscription = (MultiplexedConnection, mpsc::Receiver<redis::PushInfo>);

/// The same server as `client`, spoken in RESP3: pushed pub/sub messages can then be handed to
/// a bounded queue (RESP2's pub/sub connection buffers without bound). Needs Redis >= 6.
pub(super) fn resp3(client: &redis::Client) -> Result<redis::Client, String> {
    let info = client.get_connection_info().clone();
    let settings = info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
    redis::Client::open(info.set_redis_settings(settings)).map_err(|e| e.to_string())
}

/// Opens the dedicated subscriber connection and subscribes to `channel`. Pushed messages go to
/// a bounded queue; those that do not fit are dropped and counted in `overflow`.
pub(super) async fn open_subscriber(
    client: &redis::Client,
    channels: &[String],
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
        conn.subscribe(channels).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((conn, rx))
    };
    tokio::time::timeout(CONNECT_TIMEOUT * 2, subscribe)
        .await
        .map_err(|_| format!("no answer within {} s", CONNECT_TIMEOUT.as_secs() * 2))?
}

/// Next expected sequence number per origin node: tells how many records this node missed.
#[derive(Default)]
pub(super) struct SeqTracker {
    next: HashMap<Box<str>, (u64, Instant)>,
}

impl SeqTracker {
    /// Records a payload of `count` records from `origin` starting at `first_seq`; returns how
    /// many records before it never arrived. An origin seen for the first time, or one whose
    /// numbering went back (it restarted), starts afresh and reports no gap.
    fn observe(&mut self, origin: &str, first_seq: u64, count: u32) -> u64 {
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
    fn forget_older_than(&mut self, age: Duration) {
        let now = Instant::now();
        self.next.retain(|_, (_, seen)| now.duration_since(*seen) < age);
    }
}

/// Receives other nodes' records on a dedicated pub/sub connection and delivers them here.
pub(super) struct Subscriber {
    pub(super) client: redis::Client,
    pub(super) url_shown: String,
    /// The bus, then the rooms-with-history channel.
    pub(super) channels: Vec<String>,
    pub(super) node_id: Arc<str>,
    pub(super) pubsub: Option<Subscription>,
    pub(super) shared: Arc<Shared>,
    pub(super) state: Arc<State>,
    pub(super) stop: Signal,
    pub(super) backoff: Backoff,
    pub(super) seqs: SeqTracker,
    pub(super) ever_connected: bool,
    pub(super) bad_log: LogLimit,
    pub(super) gap_log: LogLimit,
    pub(super) down_log: LogLimit,
    pub(super) overflow_seen: u64,
}

impl Subscriber {
    pub(super) async fn run(mut self) {
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
                            redis::PushKind::Message => match (info.data.first(), info.data.get(1)) {
                                (Some(redis::Value::BulkString(ch)), Some(redis::Value::BulkString(payload)))
                                    if ch.as_slice() != self.channels[0].as_bytes() => self.handle_stream(payload),
                                (_, Some(redis::Value::BulkString(payload))) => self.handle(payload),
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
        match open_subscriber(&self.client, &self.channels, self.state.overflow.clone()).await {
            Ok(p) => {
                self.backoff.reset();
                if self.ever_connected {
                    incr(&self.shared.counters.cluster_reconnects);
                }
                self.ever_connected = true;
                tracing::info!(redis = %self.url_shown, channel = %self.channels[0], "subscribed to the cluster channel");
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
        for r in records {
            if let Err(why) = self.apply(payload.origin, &r) {
                return self.bad(why);
            }
        }
    }

    /// A message of a room with history, with the offset Redis gave it: delivered to this
    /// node's members (whichever node sent it, this one too).
    fn handle_stream(&mut self, bytes: &[u8]) {
        let (offset, epoch, r) = match super::streams::decode_published(bytes) {
            Ok(m) => m,
            Err(e) => return self.bad(e),
        };
        incr(&self.shared.counters.cluster_received);
        incr(&self.shared.counters.history_appended);
        let hub = &self.shared.hub;
        let epoch: Arc<str> = epoch.into();
        let delivered = match r.kind {
            Kind::Room => std::str::from_utf8(r.body)
                .map(|m| {
                    hub.send_room_except(r.target, m.to_owned(), &[], Some((offset, epoch.clone())));
                })
                .map_err(|_| "message is not UTF-8"),
            Kind::RoomExcept => envelope::decode_except_body(r.body).map(|(exclude, m)| {
                hub.send_room_except(r.target, m.to_owned(), &exclude, Some((offset, epoch.clone())));
            }),
            _ => Err("a stream message must be a room record"),
        };
        if let Err(e) = delivered {
            self.bad(e);
        }
    }

    /// Carries out one record of another node on this node's clients.
    fn apply(&self, origin: &str, r: &Record<'_>) -> Result<(), &'static str> {
        let shared = &*self.shared;
        let hub = &shared.hub;
        let text = |body: &[u8]| std::str::from_utf8(body).map(str::to_owned).map_err(|_| "message is not UTF-8");
        match r.kind {
            Kind::Claim => {
                let ms = <[u8; 8]>::try_from(r.body).map_err(|_| "claim without a timestamp")?;
                hub.replaced_elsewhere(r.target, u64::from_be_bytes(ms), origin > &*self.node_id);
            }
            Kind::Room if hub.room_size(r.target) == 0 => {}
            Kind::Room => {
                hub.send_room(r.target, text(r.body)?);
            }
            Kind::RoomExcept if hub.room_size(r.target) == 0 => {}
            Kind::RoomExcept => {
                let (exclude, message) = envelope::decode_except_body(r.body)?;
                hub.send_room_except(r.target, message.to_owned(), &exclude, None);
            }
            Kind::Broadcast => {
                hub.broadcast(text(r.body)?);
            }
            // Not here: another node holds the client (or nobody does).
            Kind::Private => {
                let _ = hub.try_send_to(r.target, text(r.body)?);
            }
            Kind::User => {
                hub.send_user(r.target, text(r.body)?);
            }
            Kind::Join | Kind::Leave => {
                let room = std::str::from_utf8(r.body).map_err(|_| "room id is not UTF-8")?;
                let applied = if r.kind == Kind::Join {
                    match crate::delivery::join_here(shared, r.target, room) {
                        Join::Added => Some(&shared.counters.rooms_joined),
                        Join::Full => {
                            incr(&shared.counters.commands_refused);
                            tracing::warn!(
                                client_id = r.target,
                                room,
                                "join_room from another node refused: max_rooms_per_client reached"
                            );
                            None
                        }
                        _ => None,
                    }
                } else {
                    (crate::delivery::leave_here(shared, r.target, room) == Leave::Removed)
                        .then_some(&shared.counters.rooms_left)
                };
                if let Some(counter) = applied {
                    incr(counter);
                }
            }
            Kind::Kick => {
                let (code, reason) = envelope::decode_kick_body(r.body)?;
                if hub.disconnect(r.target, code, reason.to_owned()) == Some(true) {
                    incr(&shared.counters.clients_disconnected);
                }
            }
            Kind::Query => {
                let (id, _) = envelope::decode_query_body(r.body)?;
                if let Some(cluster) = &shared.cluster {
                    let members = super::join_contexts(&hub.members(r.target));
                    // The answer goes to the asking node only (its id is the target).
                    cluster.publish(super::encode_record(
                        Kind::Answer,
                        origin,
                        &envelope::encode_query_body(id, &members),
                    ));
                }
            }
            Kind::Presence => {
                hub.presence_from_elsewhere(
                    r.target,
                    std::str::from_utf8(r.body).map_err(|_| "presence is not UTF-8")?,
                );
            }
            Kind::RoomConfig => shared.rooms.configure(r.target, crate::history::RoomOverrides::from_json(r.body)?),
            Kind::Stream => return Err("a stream record on the bus"),
            Kind::Answer => {
                if r.target == &*self.node_id {
                    let (id, contexts) = envelope::decode_query_body(r.body)?;
                    if let Some(cluster) = &shared.cluster {
                        cluster.answered(origin, id, contexts);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
