//! History per room on a lone broker, and every room's own settings (history size and TTL,
//! presence) on any broker.
//!
//! It exists so that a browser that drops for a few seconds can get back exactly what its rooms
//! were sent meanwhile. Every message to a room with history gets the room's next *offset*; a
//! stream also has an *epoch*, a random name given when the stream starts, so a position from
//! a stream that was lost (broker restart, room quiet beyond `history_meta_ttl`) is never taken
//! for one of the current stream. Offsets are given under the stream's lock, and the fan-out of
//! that message happens under the same lock (`crate::delivery`), so every member sees a room's
//! messages in offset order and a reader of the history sees every offset a live frame can
//! carry, up to its read.
//!
//! In a cluster the streams live in Redis (`crate::cluster::streams`); the room settings stay
//! here on every node.

use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Largest `history_size` (setting or per room).
pub(crate) const MAX_HISTORY_SIZE: usize = 100_000;

/// One room's effective settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RoomSettings {
    pub(crate) history_size: usize,
    pub(crate) history_ttl: Duration,
    pub(crate) presence: bool,
}

/// What a backend's `room_config` set for one room (unset fields use the broker's settings).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct RoomOverrides {
    pub(crate) history_size: Option<usize>,
    pub(crate) history_ttl: Option<Duration>,
    pub(crate) presence: Option<bool>,
}

impl RoomOverrides {
    /// The JSON a cluster spreads and keeps (`{"history_size","history_ttl","presence"}`).
    pub(crate) fn to_json(self) -> String {
        serde_json::json!({
            "history_size": self.history_size,
            "history_ttl": self.history_ttl.map(|d| d.as_secs_f64()),
            "presence": self.presence,
        })
        .to_string()
    }

    pub(crate) fn from_json(bytes: &[u8]) -> Result<Self, &'static str> {
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|_| "room config is not JSON")?;
        let size = v.get("history_size").and_then(|n| n.as_u64()).map(|n| (n as usize).min(MAX_HISTORY_SIZE));
        let ttl = v.get("history_ttl").and_then(|n| n.as_f64()).filter(|t| t.is_finite() && *t > 0.0);
        Ok(RoomOverrides {
            history_size: size,
            history_ttl: ttl.map(|t| Duration::from_secs_f64(t.min(1e9))),
            presence: v.get("presence").and_then(|b| b.as_bool()),
        })
    }

    /// `other`'s set fields over these.
    pub(crate) fn merge(&mut self, other: RoomOverrides) {
        self.history_size = other.history_size.or(self.history_size);
        self.history_ttl = other.history_ttl.or(self.history_ttl);
        self.presence = other.presence.or(self.presence);
    }
}

/// A room's stream on this node.
pub(crate) struct Stream {
    pub(crate) epoch: Arc<str>,
    /// The last offset given (0: none yet).
    pub(crate) offset: u64,
    entries: VecDeque<(u64, Utf8Bytes)>,
    last: Instant,
}

/// A read of a room's history.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Read {
    /// `""` when the room has no stream.
    pub(crate) epoch: Arc<str>,
    pub(crate) offset: u64,
    /// Entries after the asked offset, oldest first.
    pub(crate) entries: Vec<(u64, Utf8Bytes)>,
    /// Whether `entries` holds every offset after the asked one (nothing was evicted).
    pub(crate) complete: bool,
}

impl Stream {
    fn new() -> Self {
        Stream { epoch: new_epoch(), offset: 0, entries: VecDeque::new(), last: Instant::now() }
    }

    fn expire(&mut self, ttl: Duration, now: Instant) {
        if now.duration_since(self.last) > ttl {
            self.entries.clear();
        }
    }

    /// Gives `data` the next offset and keeps it (at most `size` entries).
    pub(crate) fn append(&mut self, data: Utf8Bytes, size: usize, ttl: Duration) -> u64 {
        let now = Instant::now();
        self.expire(ttl, now);
        self.offset += 1;
        self.entries.push_back((self.offset, data));
        while self.entries.len() > size {
            self.entries.pop_front();
        }
        self.last = now;
        self.offset
    }

    /// The entries after `after`, the newest `limit` of them at most.
    fn read(&mut self, after: u64, limit: usize, ttl: Duration) -> Read {
        self.expire(ttl, Instant::now());
        let newer: Vec<_> = self.entries.iter().filter(|(o, _)| *o > after).cloned().collect();
        let complete = after >= self.offset || self.entries.front().is_some_and(|(o, _)| *o <= after + 1);
        let skip = newer.len().saturating_sub(limit);
        Read {
            epoch: self.epoch.clone(),
            offset: self.offset,
            entries: newer.into_iter().skip(skip).collect(),
            complete: complete && skip == 0,
        }
    }
}

/// A fresh epoch name (random; 12 hex digits).
pub(crate) fn new_epoch() -> Arc<str> {
    uuid::Uuid::new_v4().simple().to_string()[..12].into()
}

/// Room settings and (on a lone broker) room streams.
pub(crate) struct Rooms {
    defaults: RoomSettings,
    meta_ttl: Duration,
    overrides: RwLock<HashMap<Arc<str>, RoomOverrides>>,
    /// Set once any room has presence on: lets joins and leaves skip the lookup otherwise.
    any_presence: AtomicBool,
    /// Set once any room may have history (the setting, or a room's own size).
    any_history: AtomicBool,
    streams: Mutex<HashMap<Arc<str>, Arc<Mutex<Stream>>>>,
}

impl Rooms {
    pub(crate) fn new(cfg: &crate::Config) -> Self {
        Rooms {
            defaults: RoomSettings { history_size: cfg.history_size, history_ttl: cfg.history_ttl, presence: false },
            meta_ttl: cfg.history_meta_ttl,
            overrides: RwLock::new(HashMap::new()),
            any_presence: AtomicBool::new(false),
            any_history: AtomicBool::new(cfg.history_size > 0),
            streams: Mutex::new(HashMap::new()),
        }
    }

    /// How long a stream's position, and a session token, are kept.
    pub(crate) fn meta_ttl(&self) -> Duration {
        self.meta_ttl
    }

    /// A room's effective settings.
    pub(crate) fn settings(&self, room: &str) -> RoomSettings {
        let mut s = self.defaults;
        if self.any_history.load(Ordering::Relaxed) || self.any_presence.load(Ordering::Relaxed) {
            if let Some(o) = self.overrides.read().get(room) {
                s.history_size = o.history_size.unwrap_or(s.history_size);
                s.history_ttl = o.history_ttl.unwrap_or(s.history_ttl);
                s.presence = o.presence.unwrap_or(s.presence);
            }
        }
        s
    }

    /// Whether `room` has presence events on (cheap when no room has).
    pub(crate) fn presence(&self, room: &str) -> bool {
        self.any_presence.load(Ordering::Relaxed) && self.settings(room).presence
    }

    /// A backend's `room_config` (on this node; the cluster spreads it).
    pub(crate) fn configure(&self, room: &str, o: RoomOverrides) {
        if o.presence == Some(true) {
            self.any_presence.store(true, Ordering::Relaxed);
        }
        if o.history_size.is_some_and(|n| n > 0) {
            self.any_history.store(true, Ordering::Relaxed);
        }
        self.overrides.write().entry(room.into()).or_default().merge(o);
    }

    /// The room's stream here, started (new epoch) when it has none.
    pub(crate) fn stream(&self, room: &str) -> Arc<Mutex<Stream>> {
        let mut streams = self.streams.lock();
        if let Some(s) = streams.get(room) {
            return s.clone();
        }
        let s = Arc::new(Mutex::new(Stream::new()));
        streams.insert(room.into(), s.clone());
        s
    }

    /// Reads a room's history after `after` (at most `limit` entries, the newest).
    pub(crate) fn read(&self, room: &str, after: u64, limit: usize) -> Read {
        let stream = self.streams.lock().get(room).cloned();
        match stream {
            Some(s) => s.lock().read(after, limit, self.settings(room).history_ttl),
            None => Read { epoch: "".into(), offset: 0, entries: Vec::new(), complete: after == 0 },
        }
    }

    /// Drops expired entries and forgets streams quiet for longer than `history_meta_ttl`.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let streams: Vec<_> = self.streams.lock().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut gone = Vec::new();
        for (room, stream) in streams {
            let ttl = self.settings(&room).history_ttl;
            let mut s = stream.lock();
            s.expire(ttl, now);
            if now.duration_since(s.last) > self.meta_ttl {
                gone.push(room);
            }
        }
        if !gone.is_empty() {
            let mut streams = self.streams.lock();
            for room in gone {
                // Only when still quiet (a message may have come since).
                if streams.get(&room).is_some_and(|s| now.duration_since(s.lock().last) > self.meta_ttl) {
                    streams.remove(&room);
                }
            }
        }
    }

    /// Rooms with a stream here and the entries they hold (the `history_*` gauges).
    pub(crate) fn counts(&self) -> (usize, usize) {
        let streams = self.streams.lock();
        (streams.len(), streams.values().map(|s| s.lock().entries.len()).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Utf8Bytes {
        Utf8Bytes::from(s.to_string())
    }

    #[test]
    fn offsets_count_up_and_a_read_returns_what_came_after() {
        let mut s = Stream::new();
        for i in 1..=5 {
            assert_eq!(s.append(text(&format!("m{i}")), 3, Duration::from_secs(60)), i);
        }
        let r = s.read(2, usize::MAX, Duration::from_secs(60));
        assert_eq!(r.offset, 5);
        assert_eq!(r.entries.iter().map(|e| e.0).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(r.complete);
        // 1 and 2 were evicted by size: after 1 is no longer complete.
        let r = s.read(1, usize::MAX, Duration::from_secs(60));
        assert!(!r.complete);
        assert!(s.read(5, usize::MAX, Duration::from_secs(60)).complete);
        // A limit keeps the newest.
        let r = s.read(0, 2, Duration::from_secs(60));
        assert_eq!(r.entries.iter().map(|e| e.0).collect::<Vec<_>>(), vec![4, 5]);
        assert!(!r.complete);
    }

    #[test]
    fn a_quiet_room_loses_its_entries_but_keeps_its_position() {
        let mut s = Stream::new();
        s.append(text("a"), 10, Duration::from_secs(60));
        s.last -= Duration::from_secs(120);
        let r = s.read(0, usize::MAX, Duration::from_secs(60));
        assert_eq!((r.offset, r.entries.len(), r.complete), (1, 0, false));
        assert_eq!(s.append(text("b"), 10, Duration::from_secs(60)), 2);
    }

    #[test]
    fn room_overrides_merge_over_the_settings() {
        let cfg = crate::Config::default();
        let rooms = Rooms::new(&cfg);
        assert_eq!(rooms.settings("r").history_size, 0);
        assert!(!rooms.presence("r"));
        rooms.configure("r", RoomOverrides { history_size: Some(7), ..Default::default() });
        rooms.configure("r", RoomOverrides { presence: Some(true), ..Default::default() });
        let s = rooms.settings("r");
        assert_eq!((s.history_size, s.presence, s.history_ttl), (7, true, cfg.history_ttl));
        assert_eq!(rooms.settings("other").history_size, 0);
        assert!(new_epoch() != new_epoch());
    }
}
