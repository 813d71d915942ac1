//! The envelope: what goes over Redis, and the only code that knows its bytes. Kept apart from
//! the tasks that move it so it can be tested without a Redis.
//!
//! payload := version:u8  origin_len:u8 origin  first_seq:u64be  count:u32be  record*count
//! record  := kind:u8  target_len:u32be target  body_len:u32be body
//!
//! Binary and length-prefixed: a message is copied, never escaped, and room ids or messages can
//! hold any byte. `kind` (target; body) is one of
//!
//! * R room (room; message), X room with exclusions (room; `count:u32be (len:u32be id)*count`
//!   then the message), P private (client; message), U user (user; message), B broadcast (empty;
//!   message);
//! * C claim (client; its registration time in ms since the epoch, u64be);
//! * J join / L leave (client; room), K kick (client; `code:u16be` then the reason);
//! * Q members query (room; query id u64be), A answer (asking node; query id u64be then a JSON
//!   array of the members' contexts);
//! * S room message with history (room; see `streams::encode_stream_body`): never published as
//!   is — the publisher hands it to the append script, which publishes on the streams channel;
//! * E presence (room; the `presence` frame of the browser protocol), G room config (room; the
//!   JSON of a backend's `room_config`).

use bytes::Bytes;

/// Version byte of the envelope; a node refuses payloads of another version (counted).
pub(crate) const ENVELOPE_VERSION: u8 = 1;

/// What a record asks the receiving node to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Room,
    RoomExcept,
    Private,
    User,
    Broadcast,
    Claim,
    Join,
    Leave,
    Kick,
    Query,
    Answer,
    Stream,
    Presence,
    RoomConfig,
}

const KINDS: [(Kind, u8); 14] = [
    (Kind::Room, b'R'),
    (Kind::RoomExcept, b'X'),
    (Kind::Private, b'P'),
    (Kind::User, b'U'),
    (Kind::Broadcast, b'B'),
    (Kind::Claim, b'C'),
    (Kind::Join, b'J'),
    (Kind::Leave, b'L'),
    (Kind::Kick, b'K'),
    (Kind::Query, b'Q'),
    (Kind::Answer, b'A'),
    (Kind::Stream, b'S'),
    (Kind::Presence, b'E'),
    (Kind::RoomConfig, b'G'),
];

impl Kind {
    fn byte(self) -> u8 {
        KINDS.iter().find(|(k, _)| *k == self).map_or(0, |(_, b)| *b)
    }

    fn from_byte(b: u8) -> Option<Kind> {
        KINDS.iter().find(|(_, kb)| *kb == b).map(|(k, _)| *k)
    }
}

/// Encodes one record (done by the sending task: one copy of the message).
pub(crate) fn encode_record(kind: Kind, target: &str, body: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(9 + target.len() + body.len());
    v.push(kind.byte());
    v.extend_from_slice(&(target.len() as u32).to_be_bytes());
    v.extend_from_slice(target.as_bytes());
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(body);
    Bytes::from(v)
}

/// The body of an X record: the excluded client ids, then the message.
pub(crate) fn encode_except_body(exclude: &[String], message: &str) -> Vec<u8> {
    let ids: usize = exclude.iter().map(|e| e.len() + 4).sum();
    let mut v = Vec::with_capacity(4 + ids + message.len());
    v.extend_from_slice(&(exclude.len() as u32).to_be_bytes());
    for e in exclude {
        v.extend_from_slice(&(e.len() as u32).to_be_bytes());
        v.extend_from_slice(e.as_bytes());
    }
    v.extend_from_slice(message.as_bytes());
    v
}

/// Splits an X record's body into the excluded ids and the message.
pub(crate) fn decode_except_body(body: &[u8]) -> Result<(Vec<String>, &str), &'static str> {
    let mut c = Cursor(body);
    let n = c.u32()? as usize;
    let mut ids = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let len = c.u32()? as usize;
        ids.push(c.str(len)?.to_owned());
    }
    let message = std::str::from_utf8(c.0).map_err(|_| "message is not UTF-8")?;
    Ok((ids, message))
}

/// The body of a K record: the close code, then the reason.
pub(crate) fn encode_kick_body(code: u16, reason: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + reason.len());
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(reason.as_bytes());
    v
}

pub(crate) fn decode_kick_body(body: &[u8]) -> Result<(u16, &str), &'static str> {
    let mut c = Cursor(body);
    let code = c.take(2)?;
    let reason = std::str::from_utf8(c.0).map_err(|_| "close reason is not UTF-8")?;
    Ok((u16::from_be_bytes([code[0], code[1]]), reason))
}

/// The body of a Q or A record: the query id, then (A) the answer.
pub(crate) fn encode_query_body(query: u64, rest: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + rest.len());
    v.extend_from_slice(&query.to_be_bytes());
    v.extend_from_slice(rest);
    v
}

pub(crate) fn decode_query_body(body: &[u8]) -> Result<(u64, &[u8]), &'static str> {
    let mut c = Cursor(body);
    let q = c.u64()?;
    Ok((q, c.0))
}

/// Packs encoded records behind a header naming the origin node and the first sequence number.
pub(crate) fn encode_payload(origin: &str, first_seq: u64, records: &[Bytes]) -> Vec<u8> {
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
pub(crate) struct Record<'a> {
    pub(crate) kind: Kind,
    pub(crate) target: &'a str,
    pub(crate) body: &'a [u8],
}

/// A payload whose header is decoded; its records are decoded on demand (a node skips its own
/// payloads after reading the header only).
#[derive(Debug)]
pub(crate) struct Payload<'a> {
    pub(crate) origin: &'a str,
    pub(crate) first_seq: u64,
    pub(crate) count: u32,
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
pub(crate) fn decode_payload(p: &[u8]) -> Result<Payload<'_>, &'static str> {
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

fn next_record<'a>(c: &mut Cursor<'a>) -> Result<Record<'a>, &'static str> {
    let kind = Kind::from_byte(c.u8()?).ok_or("unknown record kind")?;
    let target_len = c.u32()? as usize;
    let target = c.str(target_len)?;
    let body_len = c.u32()? as usize;
    let body = c.take(body_len)?;
    Ok(Record { kind, target, body })
}

/// Decodes one encoded record (as [`encode_record`] made it).
pub(crate) fn decode_record(bytes: &[u8]) -> Result<Record<'_>, &'static str> {
    let mut c = Cursor(bytes);
    let r = next_record(&mut c)?;
    if !c.0.is_empty() {
        return Err("trailing bytes after the record");
    }
    Ok(r)
}

impl<'a> Payload<'a> {
    /// Every record; an error when the payload is malformed (nothing of it should be used).
    pub(crate) fn records(&self) -> Result<Vec<Record<'a>>, &'static str> {
        let mut c = Cursor(self.rest);
        let mut out = Vec::with_capacity(self.count.min(4096) as usize);
        for _ in 0..self.count {
            out.push(next_record(&mut c)?);
        }
        if !c.0.is_empty() {
            return Err("trailing bytes after the last record");
        }
        Ok(out)
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
    fn every_kind_and_body_round_trips() {
        for (kind, _) in KINDS {
            let p = encode_payload("n", 1, &[encode_record(kind, "t", b"b")]);
            assert_eq!(decode_payload(&p).unwrap().records().unwrap()[0].kind, kind);
        }
        let ex = vec!["a".to_string(), "b\u{0}ü".to_string()];
        let body = encode_except_body(&ex, "hi \"there\"");
        assert_eq!(decode_except_body(&body).unwrap(), (ex, "hi \"there\""));
        assert_eq!(decode_except_body(&encode_except_body(&[], "m")).unwrap(), (vec![], "m"));
        assert_eq!(decode_kick_body(&encode_kick_body(4321, "bye ü")).unwrap(), (4321, "bye ü"));
        assert_eq!(decode_query_body(&encode_query_body(77, b"[1]")).unwrap(), (77, &b"[1]"[..]));
        // Truncated bodies are errors, never panics.
        let body = encode_except_body(&["abc".to_string()], "m");
        for cut in 0..8 {
            assert!(decode_except_body(&body[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_kick_body(b"x").is_err());
        assert!(decode_query_body(b"1234567").is_err());
        let mut huge = 5u32.to_be_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_except_body(&huge).is_err());
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
}
