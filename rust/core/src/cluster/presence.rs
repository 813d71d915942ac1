//! The presence task: every [`PRESENCE_EVERY`] this node writes its client count and room sizes
//! to Redis with a [`PRESENCE_TTL`] expiry and reads the other live nodes' reports (one Lua
//! script, one round trip, Redis' clock), so `stats()` and `room_members()` can answer for the
//! whole cluster from a cache without ever calling Redis themselves.

use super::{State, View, RESPONSE_TIMEOUT};
use crate::shutdown::Signal;
use crate::Shared;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often each node reports its presence.
pub(crate) const PRESENCE_EVERY: Duration = Duration::from_secs(1);
/// How long a presence report lives: a node silent for this long is considered gone.
pub(crate) const PRESENCE_TTL: Duration = Duration::from_secs(3);

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

pub(super) struct Presence {
    pub(super) conn_rx: watch::Receiver<Option<MultiplexedConnection>>,
    pub(super) nodes_key: String,
    pub(super) node_prefix: String,
    pub(super) node_id: Arc<str>,
    pub(super) shared: Arc<Shared>,
    pub(super) state: Arc<State>,
    pub(super) stop: Signal,
    /// Membership version of the report last written (None: write a full report next).
    pub(super) written: Option<u64>,
}

impl Presence {
    pub(super) async fn run(mut self) {
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
                    view.node_ids.push(r.node);
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
