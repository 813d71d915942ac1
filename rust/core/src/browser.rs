//! The browser protocol `pystrands.1`: the opt-in structured protocol a WebSocket client asks
//! for with `Sec-WebSocket-Protocol` (or `?proto=`). A client that does not ask keeps v1's raw
//! text frames byte for byte; one that asks gets JSON envelopes carrying the room, the message and
//! its stream position, presence events, pings, and recovery after a reconnect.
//!
//! This file is the protocol's codec and nothing else: negotiation, the frames both ways, and the
//! signed session token that lets a reconnecting client get its rooms back. The connection task
//! (`crate::ws`) runs the protocol; the spec is `docs/protocol.md`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::Sha256;
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The subprotocol name.
pub(crate) const SUBPROTOCOL: &str = "pystrands.1";
/// A malformed, out-of-order or lying frame (terminal: the client stops).
pub(crate) const CLOSE_BAD_FRAME: u16 = 4400;
/// No `connect` within `handshake_timeout` (the client reconnects).
pub(crate) const CLOSE_NO_CONNECT: u16 = 4408;
/// The frame a structured client gets every ping interval.
pub(crate) const PING: &str = r#"{"t":"ping"}"#;

/// What a handshake asked for: raw v1 frames, or `pystrands.1` (and whether to echo the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Raw,
    Structured { echo: bool },
}

/// Reads the negotiation from the request's headers and query; `Err` (HTTP 400) for a `proto=`
/// value that is not ours.
pub(crate) fn negotiate(headers: &[(String, String)], query: &str) -> Result<Mode, String> {
    let offered = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-protocol"))
        .flat_map(|(_, v)| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL);
    if offered {
        return Ok(Mode::Structured { echo: true });
    }
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("proto=") {
            return if v == SUBPROTOCOL {
                Ok(Mode::Structured { echo: false })
            } else {
                Err(format!("unknown proto (this broker speaks {SUBPROTOCOL})"))
            };
        }
    }
    Ok(Mode::Raw)
}

fn push_str(buf: &mut String, s: &str) {
    // serde_json escapes exactly as JSON needs; writing into a String cannot fail.
    buf.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// Where a `msg` frame came from.
pub(crate) enum Origin<'a> {
    /// A room, with its stream position when the room has history.
    Room(&'a str, Option<(u64, &'a str)>),
    User(&'a str),
    All,
    Direct,
}

/// A `msg` frame.
pub(crate) fn msg(origin: Origin<'_>, data: &str) -> String {
    let mut f = String::with_capacity(data.len() + 64);
    f.push_str(r#"{"t":"msg","#);
    match origin {
        Origin::Room(room, pos) => {
            f.push_str(r#""room":"#);
            push_str(&mut f, room);
            if let Some((offset, epoch)) = pos {
                f.push_str(&format!(r#","offset":{offset},"epoch":"#));
                push_str(&mut f, epoch);
            }
            f.push(',');
        }
        Origin::User(user) => {
            f.push_str(r#""user":"#);
            push_str(&mut f, user);
            f.push(',');
        }
        Origin::All => f.push_str(r#""all":true,"#),
        Origin::Direct => {}
    }
    f.push_str(r#""data":"#);
    push_str(&mut f, data);
    f.push('}');
    f
}

/// One room's entry in `welcome`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RoomState {
    pub(crate) room: String,
    /// Offset and epoch, for a room with history.
    pub(crate) position: Option<(u64, String)>,
    /// Set for a room the client gave a position for.
    pub(crate) recovered: Option<bool>,
}

/// The `welcome` frame.
pub(crate) fn welcome(
    client: &str,
    user: Option<&str>,
    ping: Duration,
    session: &str,
    rooms: &[RoomState],
    recovered: Option<bool>,
    session_error: Option<&str>,
) -> String {
    let mut f = String::from(r#"{"t":"welcome","client":"#);
    push_str(&mut f, client);
    f.push_str(r#","user":"#);
    match user {
        Some(u) => push_str(&mut f, u),
        None => f.push_str("null"),
    }
    f.push_str(&format!(r#","ping":{},"session":"#, ping.as_secs_f64()));
    push_str(&mut f, session);
    f.push_str(r#","rooms":{"#);
    for (i, r) in rooms.iter().enumerate() {
        if i > 0 {
            f.push(',');
        }
        push_str(&mut f, &r.room);
        f.push_str(":{");
        let mut fields = Vec::new();
        if let Some((offset, epoch)) = &r.position {
            fields.push(format!(r#""offset":{offset},"epoch":{}"#, serde_json::to_string(epoch).unwrap_or_default()));
        }
        if let Some(ok) = r.recovered {
            fields.push(format!(r#""recovered":{ok}"#));
        }
        f.push_str(&fields.join(","));
        f.push('}');
    }
    f.push('}');
    if let Some(ok) = recovered {
        f.push_str(&format!(r#","recovered":{ok}"#));
    }
    if let Some(e) = session_error {
        f.push_str(r#","session_error":"#);
        push_str(&mut f, e);
    }
    f.push('}');
    f
}

/// A `join` (`joined`) or `leave` frame for the connection itself.
pub(crate) fn membership(joined: bool, room: &str, position: Option<(u64, &str)>, session: &str) -> String {
    let mut f = String::from(if joined { r#"{"t":"join","room":"# } else { r#"{"t":"leave","room":"# });
    push_str(&mut f, room);
    if let Some((offset, epoch)) = position {
        f.push_str(&format!(r#","offset":{offset},"epoch":"#));
        push_str(&mut f, epoch);
    }
    f.push_str(r#","session":"#);
    push_str(&mut f, session);
    f.push('}');
    f
}

/// A `presence` frame about another connection.
pub(crate) fn presence(room: &str, joined: bool, client: &str, user: Option<&str>, user_edge: bool) -> String {
    let mut f = String::from(r#"{"t":"presence","room":"#);
    push_str(&mut f, room);
    f.push_str(if joined { r#","event":"join","client":"# } else { r#","event":"leave","client":"# });
    push_str(&mut f, client);
    if let Some(u) = user {
        f.push_str(r#","user":"#);
        push_str(&mut f, u);
        f.push_str(if joined { r#","user_first":"# } else { r#","user_last":"# });
        f.push_str(if user_edge { "true" } else { "false" });
    }
    f.push('}');
    f
}

/// A stream position a reconnecting client names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) room: String,
    pub(crate) offset: u64,
    pub(crate) epoch: String,
}

/// A frame from a structured client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ClientFrame {
    Connect { session: Option<String>, positions: Vec<Position> },
    Msg(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WirePosition {
    offset: u64,
    epoch: String,
}

#[derive(Deserialize)]
struct WireFrame<'a> {
    #[serde(borrow)]
    t: &'a RawValue,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    positions: Option<HashMap<String, WirePosition>>,
}

/// Decodes a client frame; `Err` is the close reason (code [`CLOSE_BAD_FRAME`]).
pub(crate) fn decode(text: &str, max_positions: usize) -> Result<ClientFrame, String> {
    let frame: WireFrame<'_> = serde_json::from_str(text).map_err(|e| format!("bad frame: {e}"))?;
    match frame.t.get() {
        r#""msg""# => match frame.data {
            Some(data) => Ok(ClientFrame::Msg(data)),
            None => Err("bad frame: msg needs a string data".into()),
        },
        r#""connect""# => {
            let positions = frame.positions.unwrap_or_default();
            if positions.len() > max_positions {
                return Err(format!("too many positions (at most max_rooms_per_client={max_positions})"));
            }
            let mut positions: Vec<Position> =
                positions.into_iter().map(|(room, p)| Position { room, offset: p.offset, epoch: p.epoch }).collect();
            positions.sort_by(|a, b| a.room.cmp(&b.room));
            Ok(ClientFrame::Connect { session: frame.session, positions })
        }
        other => Err(format!("bad frame: unknown t {}", truncate(other, 40))),
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// What a session token holds: the connection it was given to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub(crate) struct Session {
    #[serde(rename = "c")]
    pub(crate) client: String,
    #[serde(rename = "u")]
    pub(crate) user: Option<String>,
    #[serde(rename = "r")]
    pub(crate) rooms: Vec<String>,
    /// Issued at, ms since the Unix epoch.
    #[serde(rename = "t")]
    pub(crate) issued_ms: u64,
}

/// Why a session token was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionError {
    Invalid,
    Expired,
}

impl SessionError {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SessionError::Invalid => "invalid",
            SessionError::Expired => "expired",
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

type HmacSha256 = Hmac<Sha256>;

/// Signs and checks session tokens (`base64url(json) "." base64url(hmac-sha256)`).
pub(crate) struct SessionKey {
    key: Vec<u8>,
}

impl SessionKey {
    pub(crate) fn new(key: &[u8]) -> Self {
        SessionKey { key: key.to_vec() }
    }

    /// A random key (a lone broker without `session_secret`).
    pub(crate) fn random() -> Self {
        let k: Vec<u8> = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()].iter().flat_map(|u| *u.as_bytes()).collect();
        SessionKey { key: k }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes a key of any length.
        HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length")
    }

    pub(crate) fn sign(&self, session: &Session) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(session).unwrap_or_default());
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{body}.{tag}")
    }

    /// The session in `token` if it is ours and younger than `max_age`.
    pub(crate) fn verify(&self, token: &str, max_age: Duration) -> Result<Session, SessionError> {
        let (body, tag) = token.split_once('.').ok_or(SessionError::Invalid)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| SessionError::Invalid)?;
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        // `verify_slice` compares in constant time.
        mac.verify_slice(&tag).map_err(|_| SessionError::Invalid)?;
        let json = URL_SAFE_NO_PAD.decode(body).map_err(|_| SessionError::Invalid)?;
        let session: Session = serde_json::from_slice(&json).map_err(|_| SessionError::Invalid)?;
        if now_ms().saturating_sub(session.issued_ms) > max_age.as_millis() as u64 {
            return Err(SessionError::Expired);
        }
        Ok(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &str) -> Vec<(String, String)> {
        vec![("Sec-WebSocket-Protocol".into(), v.into())]
    }

    #[test]
    fn negotiation_by_header_or_query_and_a_foreign_proto_is_refused() {
        assert_eq!(negotiate(&[], ""), Ok(Mode::Raw));
        assert_eq!(negotiate(&h("chat, pystrands.1"), ""), Ok(Mode::Structured { echo: true }));
        assert_eq!(negotiate(&h("chat"), ""), Ok(Mode::Raw));
        assert_eq!(negotiate(&[], "a=1&proto=pystrands.1"), Ok(Mode::Structured { echo: false }));
        assert!(negotiate(&[], "proto=socket.io").is_err());
    }

    #[test]
    fn frames_are_json_with_every_string_escaped() {
        let f = msg(Origin::Room("r\"1", Some((7, "ab"))), "hi\n\"x\"");
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v, serde_json::json!({"t":"msg","room":"r\"1","offset":7,"epoch":"ab","data":"hi\n\"x\""}));
        let v: serde_json::Value = serde_json::from_str(&msg(Origin::All, "x")).unwrap();
        assert_eq!(v, serde_json::json!({"t":"msg","all":true,"data":"x"}));
        let v: serde_json::Value = serde_json::from_str(&msg(Origin::Direct, "x")).unwrap();
        assert_eq!(v, serde_json::json!({"t":"msg","data":"x"}));
        let rooms = [
            RoomState { room: "a".into(), position: Some((3, "e".into())), recovered: Some(true) },
            RoomState { room: "b".into(), position: None, recovered: None },
        ];
        let w = welcome("c", None, Duration::from_secs(25), "s", &rooms, Some(true), Some("expired"));
        let v: serde_json::Value = serde_json::from_str(&w).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"t":"welcome","client":"c","user":null,"ping":25,"session":"s",
                "rooms":{"a":{"offset":3,"epoch":"e","recovered":true},"b":{}},"recovered":true,"session_error":"expired"})
        );
        let v: serde_json::Value = serde_json::from_str(&presence("r", false, "c", Some("u"), true)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"t":"presence","room":"r","event":"leave","client":"c","user":"u","user_last":true})
        );
    }

    #[test]
    fn client_frames_decode_and_bad_ones_are_refused_with_a_reason() {
        assert_eq!(decode(r#"{"t":"msg","data":"x"}"#, 10), Ok(ClientFrame::Msg("x".into())));
        let c = decode(
            r#"{"t":"connect","session":"s","positions":{"b":{"offset":2,"epoch":"e"},"a":{"offset":0,"epoch":""}}}"#,
            10,
        )
        .unwrap();
        assert_eq!(
            c,
            ClientFrame::Connect {
                session: Some("s".into()),
                positions: vec![
                    Position { room: "a".into(), offset: 0, epoch: "".into() },
                    Position { room: "b".into(), offset: 2, epoch: "e".into() }
                ]
            }
        );
        for bad in [
            "not json",
            "[]",
            r#"{"t":"msg"}"#,
            r#"{"t":"msg","data":3}"#,
            r#"{"t":"nope"}"#,
            r#"{"t":5}"#,
            r#"{"t":"connect","positions":{"a":{"offset":-1,"epoch":"e"}}}"#,
            r#"{"t":"connect","positions":{"a":{"offset":1}}}"#,
            r#"{"t":"connect","positions":[1]}"#,
            r#"{"t":"connect","session":7}"#,
        ] {
            assert!(decode(bad, 10).is_err(), "{bad}");
        }
        let many: String =
            (0..11).map(|i| format!(r#""r{i}":{{"offset":1,"epoch":"e"}}"#)).collect::<Vec<_>>().join(",");
        let e = decode(&format!(r#"{{"t":"connect","positions":{{{many}}}}}"#), 10).unwrap_err();
        assert!(e.contains("too many positions"), "{e}");
    }

    #[test]
    fn session_tokens_verify_only_when_ours_and_fresh() {
        let key = SessionKey::new(b"k");
        let s = Session { client: "c".into(), user: Some("u".into()), rooms: vec!["a".into()], issued_ms: now_ms() };
        let t = key.sign(&s);
        assert_eq!(key.verify(&t, Duration::from_secs(60)), Ok(s.clone()));
        assert_eq!(SessionKey::new(b"other").verify(&t, Duration::from_secs(60)), Err(SessionError::Invalid));
        let mut forged = t.clone();
        forged.insert(3, 'x');
        assert_eq!(key.verify(&forged, Duration::from_secs(60)), Err(SessionError::Invalid));
        assert_eq!(key.verify("garbage", Duration::from_secs(60)), Err(SessionError::Invalid));
        let old = Session { issued_ms: now_ms() - 120_000, ..s };
        assert_eq!(key.verify(&key.sign(&old), Duration::from_secs(60)), Err(SessionError::Expired));
    }
}
