//! Room history in a cluster: one Redis Stream per room, entry id = the message's offset, plus a
//! small hash with the room's epoch and last offset. A message to a room with history is
//! appended and published by one script, so the offset Redis gives it, the Stream and what every
//! node delivers always agree, and a client that reconnects to any node can be given exactly
//! what it missed.
//!
//! Keys (`<cluster_name>` prefix): `<name>:hist:<room>` (the Stream), `<name>:hmeta:<room>`
//! (`epoch`, `offset`), `<name>:roomcfg` (every room's `room_config`, for nodes that start
//! later). Channel: `<name>:streams`, carrying `offset "\n" epoch "\n" payload`, where payload
//! is an ordinary envelope payload holding the room record (R or X) to deliver.

use super::envelope::{decode_payload, encode_payload, encode_record, Kind, Record};
use crate::history::{new_epoch, Read};
use redis::aio::MultiplexedConnection;
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Appends a message to a room's Stream and publishes it with its offset, atomically.
/// KEYS: meta, stream. ARGV: channel, a fresh epoch (used when the room has none), size,
/// ttl (ms), meta ttl (ms), payload to publish, message to keep.
pub(super) const APPEND: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[2]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], offset .. '-0', 'd', ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PUBLISH', ARGV[1], offset .. '\n' .. epoch .. '\n' .. ARGV[6])
return offset
";

/// Reads a room's position and its entries after an offset (the newest `limit`).
/// KEYS: meta, stream. ARGV: after, limit.
const READ: &str = r"
local m = redis.call('HMGET', KEYS[1], 'epoch', 'offset')
if not m[1] then return {'', 0, {}} end
local entries = redis.call('XREVRANGE', KEYS[2], '+', '(' .. ARGV[1] .. '-0', 'COUNT', ARGV[2])
local flat = {}
for i = #entries, 1, -1 do
  local e = entries[i]
  flat[#flat + 1] = e[1]
  flat[#flat + 1] = e[2][2]
end
return {m[1], tonumber(m[2]), flat}
";

pub(super) fn stream_key(name: &str, room: &str) -> String {
    format!("{name}:hist:{room}")
}

pub(super) fn meta_key(name: &str, room: &str) -> String {
    format!("{name}:hmeta:{room}")
}

/// What the publisher needs to append one message: the room's settings, the message, and the
/// record every node delivers.
pub(super) struct Append {
    pub(super) room: String,
    pub(super) size: usize,
    pub(super) ttl: Duration,
    pub(super) message: String,
    pub(super) payload: Vec<u8>,
}

/// Encodes the body of an S record (queued for the publisher like any record, so a node's
/// sends keep their order): `size:u32be ttl_ms:u64be msg_len:u32be message` then the room
/// record to deliver.
pub(crate) fn encode_stream_body(size: usize, ttl: Duration, message: &str, deliver: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + message.len() + deliver.len());
    v.extend_from_slice(&(size as u32).to_be_bytes());
    v.extend_from_slice(&(ttl.as_millis() as u64).to_be_bytes());
    v.extend_from_slice(&(message.len() as u32).to_be_bytes());
    v.extend_from_slice(message.as_bytes());
    v.extend_from_slice(deliver);
    v
}

/// Decodes an S record for the publisher.
pub(super) fn decode_stream_record(r: &Record<'_>) -> Result<Append, &'static str> {
    let b = r.body;
    if b.len() < 16 {
        return Err("short stream record");
    }
    let size = u32::from_be_bytes(b[0..4].try_into().map_err(|_| "size")?) as usize;
    let ttl = Duration::from_millis(u64::from_be_bytes(b[4..12].try_into().map_err(|_| "ttl")?));
    let n = u32::from_be_bytes(b[12..16].try_into().map_err(|_| "len")?) as usize;
    let message = b.get(16..16 + n).ok_or("short stream record")?;
    let message = std::str::from_utf8(message).map_err(|_| "message is not UTF-8")?.to_owned();
    let deliver = bytes::Bytes::copy_from_slice(&b[16 + n..]);
    Ok(Append { room: r.target.to_owned(), size, ttl, message, payload: encode_payload("", 0, &[deliver]) })
}

/// The room record inside an S record: what every node delivers once Redis gave it an offset.
pub(crate) fn deliver_record(room: &str, message: &str, exclude: &[String]) -> bytes::Bytes {
    if exclude.is_empty() {
        encode_record(Kind::Room, room, message.as_bytes())
    } else {
        encode_record(Kind::RoomExcept, room, &super::envelope::encode_except_body(exclude, message))
    }
}

/// A message of the streams channel: its offset, epoch and the room record to deliver.
pub(super) fn decode_published(bytes: &[u8]) -> Result<(u64, &str, Record<'_>), &'static str> {
    let mut parts = bytes.splitn(3, |b| *b == b'\n');
    let offset = parts.next().and_then(|o| std::str::from_utf8(o).ok()).and_then(|o| o.parse().ok());
    let offset = offset.ok_or("stream message without an offset")?;
    let epoch = parts.next().and_then(|e| std::str::from_utf8(e).ok()).ok_or("stream message without an epoch")?;
    let payload = decode_payload(parts.next().ok_or("stream message without a payload")?)?;
    let mut records = payload.records()?;
    if records.len() != 1 {
        return Err("stream message must hold one record");
    }
    Ok((offset, epoch, records.remove(0)))
}

/// A fresh epoch for the script (used only if the room has none).
pub(super) fn epoch() -> Arc<str> {
    new_epoch()
}

/// Reads a room's history from Redis (see [`Read`]).
pub(crate) async fn read(
    conn: &mut MultiplexedConnection,
    name: &str,
    room: &str,
    after: u64,
    limit: usize,
) -> Result<Read, String> {
    let script = redis::Script::new(READ);
    let (epoch, offset, flat): (String, u64, Vec<String>) = script
        .key(meta_key(name, room))
        .key(stream_key(name, room))
        .arg(after)
        .arg(limit.max(1))
        .invoke_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    let mut entries = Vec::with_capacity(flat.len() / 2);
    for pair in flat.chunks_exact(2) {
        let id =
            pair[0].split('-').next().and_then(|o| o.parse::<u64>().ok()).ok_or("bad entry id in a room Stream")?;
        entries.push((id, Utf8Bytes::from(pair[1].clone())));
    }
    let complete = entries.len() as u64 == offset.saturating_sub(after);
    Ok(Read { epoch: epoch.into(), offset, entries, complete })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_records_and_published_messages_round_trip() {
        let deliver = deliver_record("r", "hello\nworld", &["x".into()]);
        let body = encode_stream_body(50, Duration::from_secs(300), "hello\nworld", &deliver);
        let rec = encode_record(Kind::Stream, "r", &body);
        let payload = encode_payload("n", 1, &[rec]);
        let p = decode_payload(&payload).unwrap();
        let records = p.records().unwrap();
        let a = decode_stream_record(&records[0]).unwrap();
        assert_eq!(
            (a.room.as_str(), a.size, a.ttl, a.message.as_str()),
            ("r", 50, Duration::from_secs(300), "hello\nworld")
        );
        let mut published = b"17\nabc\n".to_vec();
        published.extend_from_slice(&a.payload);
        let (offset, epoch, r) = decode_published(&published).unwrap();
        assert_eq!((offset, epoch, r.kind, r.target), (17, "abc", Kind::RoomExcept, "r"));
        assert!(decode_published(b"x\ny\nz").is_err());
        assert!(decode_published(b"").is_err());
    }
}
