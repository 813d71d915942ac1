//! What a structured (`pystrands.1`) connection does between its upgrade and its first live
//! frame: take the client's `connect`, restore the rooms its session names, read the history of
//! every room it gave a position for, and build the `welcome` and the replay.
//!
//! The connection task does not read its outbound queue meanwhile, so live room messages wait
//! there; the replay goes out first, then the queue, skipping every frame the replay already
//! covered ([`Seen`]). Since the rooms are joined before their history is read, every message is
//! either in the history read or in the queue (or both): no gap, no duplicate.

use crate::browser::{self, Position, RoomState, Session};
use crate::delivery;
use crate::history::{Read, MAX_HISTORY_SIZE};
use crate::hub::{ClientSlot, Join, Out};
use crate::stats::{add, incr};
use crate::Shared;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Longest wait for a room's history in Redis while a client recovers.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Most messages one reconnect replays over all its rooms; a room that would go beyond is not
/// recovered (the application reloads it), so one client cannot make the broker copy more.
const MAX_REPLAY: usize = MAX_HISTORY_SIZE;
/// An offset after every entry: a read that only wants the room's position.
const POSITION_ONLY: u64 = u64::MAX >> 1;

/// The last offset (and its epoch) each room's replay or welcome covered: live frames at or
/// below it are skipped until one beyond it passes.
#[derive(Default)]
pub(crate) struct Seen(HashMap<Arc<str>, (u64, Arc<str>)>);

impl Seen {
    /// Whether a live frame must go out (and forgets the room once frames are past the replay).
    pub(crate) fn pass(&mut self, out: &Out) -> bool {
        let Some((room, offset, epoch)) = &out.pos else { return true };
        match self.0.get(room) {
            Some((last, e)) if e == epoch && offset <= last => false,
            Some(_) => {
                self.0.remove(room);
                true
            }
            None => true,
        }
    }
}

/// The welcome, the replay, and what the replay covered.
pub(crate) struct Resumed {
    pub(crate) frames: Vec<String>,
    pub(crate) seen: Seen,
}

/// Where each room's stream was when the connection entered it (offset, epoch): read before
/// the join (alone: under the stream's lock, so exactly at the join). Frames after it are in the
/// connection's queue; a replay from it fills any gap.
pub(crate) type JoinedAt = HashMap<Arc<str>, (u64, Arc<str>)>;

/// The stream position of a room with history, for a join about to happen (`None`: the room
/// has no history, or Redis did not answer). Alone, call it with the room's stream locked.
pub(crate) async fn position_before_join(shared: &Shared, room: &str) -> Option<(u64, Arc<str>)> {
    if shared.rooms.settings(room).history_size == 0 {
        return None;
    }
    let r = read(shared, room, POSITION_ONLY).await.ok()?;
    Some((r.offset, r.epoch))
}

/// Runs the `connect` frame; `Err` is a close (code, reason).
pub(crate) async fn connect(
    shared: &Shared,
    slot: &ClientSlot,
    session: Option<String>,
    positions: Vec<Position>,
    mut joined_at: JoinedAt,
) -> Result<Resumed, (u16, String)> {
    let mut session_error = None;
    if let Some(token) = session {
        let key = shared.session_key.read().clone();
        match key.verify(&token, shared.rooms.meta_ttl()) {
            Ok(s) => {
                if let Err(e) = restore(shared, slot, &s, &mut joined_at).await {
                    session_error = Some(e);
                }
            }
            Err(e) => session_error = Some(e.as_str()),
        }
    }
    let rooms = shared.hub.rooms_of_conn(slot.conn_id);
    let wanted: HashMap<&str, &Position> = positions.iter().map(|p| (p.room.as_str(), p)).collect();
    let mut states = Vec::with_capacity(rooms.len());
    let mut replay = Vec::new();
    let mut seen = Seen::default();
    for room in &rooms {
        let asked = wanted.get(&**room).copied();
        let mut state = RoomState { room: room.to_string(), position: None, recovered: asked.map(|_| false) };
        let from = match asked {
            Some(p) => Some((p.offset, Arc::<str>::from(p.epoch.as_str()))),
            None => joined_at.remove(room),
        };
        if let (Some((offset, epoch)), true) = (from, shared.rooms.settings(room).history_size > 0) {
            let read = read(shared, room, offset).await.map_err(|e| (1011, format!("history unavailable: {e}")))?;
            if asked.is_some() && *epoch == *read.epoch && offset > read.offset {
                return Err((browser::CLOSE_BAD_FRAME, format!("offset {offset} is beyond room {room:?}'s last")));
            }
            let same_epoch = *epoch == *read.epoch || (epoch.is_empty() && offset == 0);
            if same_epoch && read.complete && replay.len() + read.entries.len() <= MAX_REPLAY {
                if asked.is_some() {
                    state.recovered = Some(true);
                }
                add(&shared.counters.messages_replayed, read.entries.len() as u64);
                for (o, data) in &read.entries {
                    replay.push(browser::msg(browser::Origin::Room(room, Some((*o, &read.epoch))), data.as_str()));
                }
            }
            if !read.epoch.is_empty() {
                seen.0.insert(room.clone(), (read.offset, read.epoch.clone()));
                state.position = Some((read.offset, read.epoch.to_string()));
            }
        }
        match state.recovered {
            Some(true) => incr(&shared.counters.recoveries),
            Some(false) => incr(&shared.counters.recoveries_failed),
            None => {}
        }
        states.push(state);
    }
    // Positions for rooms the connection is not in are not recovered.
    for p in positions.iter().filter(|p| !rooms.iter().any(|r| **r == *p.room)) {
        incr(&shared.counters.recoveries_failed);
        states.push(RoomState { room: p.room.clone(), position: None, recovered: Some(false) });
    }
    let recovered = (!positions.is_empty()).then(|| states.iter().all(|s| s.recovered != Some(false)));
    let mut frames = Vec::with_capacity(1 + replay.len());
    frames.push(browser::welcome(
        &slot.client_id,
        slot.user_id.as_deref(),
        shared.cfg.ping_interval,
        &delivery::session_token(shared, slot),
        &states,
        recovered,
        session_error,
    ));
    frames.extend(replay);
    Ok(Resumed { frames, seen })
}

/// Joins the rooms a valid session names (unless its user is not this connection's), noting
/// where each room's stream was at the join.
async fn restore(
    shared: &Shared,
    slot: &ClientSlot,
    s: &Session,
    joined_at: &mut JoinedAt,
) -> Result<(), &'static str> {
    if s.user.as_deref() != slot.user_id.as_deref() {
        return Err("user mismatch");
    }
    let max = shared.cfg.max_rooms_per_client;
    let already = shared.hub.rooms_of_conn(slot.conn_id);
    for room in &s.rooms {
        // Rooms it is in already (its first room) cost no history read.
        if room.is_empty() || room.len() > shared.cfg.max_id_length || already.iter().any(|r| **r == **room) {
            continue;
        }
        let settings = shared.rooms.settings(room);
        let (joined, at) = if settings.history_size > 0 && shared.cluster.is_none() {
            let stream = shared.rooms.stream(room);
            let st = stream.lock();
            (shared.hub.join(&slot.client_id, room, max), Some((st.offset, st.epoch.clone())))
        } else {
            let at = position_before_join(shared, room).await;
            (shared.hub.join(&slot.client_id, room, max), at)
        };
        if joined == Join::Added {
            if let Some(at) = at {
                joined_at.insert(room.as_str().into(), at);
            }
            if settings.presence {
                delivery::presence(shared, room, slot, true);
            }
        }
    }
    Ok(())
}

async fn read(shared: &Shared, room: &str, after: u64) -> Result<Read, String> {
    match &shared.cluster {
        None => Ok(match after {
            POSITION_ONLY => {
                // Alone, a room with history always has a position: its stream starts here.
                let stream = shared.rooms.stream(room);
                let s = stream.lock();
                Read { epoch: s.epoch.clone(), offset: s.offset, entries: Vec::new(), complete: true }
            }
            _ => shared.rooms.read(room, after, MAX_HISTORY_SIZE),
        }),
        Some(c) => tokio::time::timeout(READ_TIMEOUT, c.read_history(room, after, MAX_HISTORY_SIZE))
            .await
            .map_err(|_| "Redis did not answer in time".to_string())?,
    }
}
