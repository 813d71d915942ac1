//! Wire protocol between the broker and backends: newline-delimited JSON objects
//! `{"request_id", "action", "params"}` (v1), the v2 additions negotiated with a `hello`
//! (event sequence numbers, cumulative `ack`s, heartbeat replies, the backend secret), and the
//! WebSocket close codes the broker uses. `docs/protocol.md` is the specification.
//!
//! Encoding writes each line straight into a byte buffer (no intermediate tree); decoding checks
//! every field's type and returns a [`DecodeError`] that says exactly what was wrong, because
//! backend input is untrusted: nothing here may panic on bad data.

use bytes::{Bytes, BytesMut};
use serde_json::Value;
use std::fmt;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Close code sent to clients when the broker shuts down.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for a client whose outbound queue overflowed (policy `close`).
pub const CLOSE_SLOW_CONSUMER: u16 = 1013;
/// Close code for a connection replaced by a newer one with the same `client_id`.
pub const CLOSE_REPLACED: u16 = 4001;
/// Close code for a client that stopped answering pings.
pub const CLOSE_IDLE: u16 = 4002;
/// Close code for a client over its message rate limit (policy `close`).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code: the connection's signed token expired; reconnect with a fresh one.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4401;

/// The protocol version this broker speaks beyond v1.
pub const PROTOCOL_VERSION: u64 = 2;
/// Features of v2 this broker implements, announced in its `hello`.
pub const FEATURES: [&str; 4] = ["ack", "heartbeat", "rooms", "history"];
/// Longest close reason a WebSocket close frame can carry (125 bytes minus the code).
pub const MAX_CLOSE_REASON: usize = 123;

/// Limits a backend may check before it sends (announced in the `hello` answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_rooms_per_client: usize,
    pub max_id_length: usize,
}

/// Go's `textproto.CanonicalMIMEHeaderKey`: `x-token` → `X-Token`. Names with characters outside
/// the token set are returned unchanged, as Go does.
pub fn canonical_header_name(name: &str) -> String {
    let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !valid {
        return name.to_string();
    }
    let mut out = String::with_capacity(name.len());
    let mut upper = true;
    for c in name.chars() {
        out.push(if upper { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() });
        upper = c == '-';
    }
    out
}

fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, s);
}

fn line_start(request_id: &str, action: &str, capacity: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(capacity + 64);
    buf.extend_from_slice(b"{\"request_id\":");
    push_json_str(&mut buf, request_id);
    buf.extend_from_slice(b",\"action\":\"");
    buf.extend_from_slice(action.as_bytes());
    buf.extend_from_slice(b"\",\"params\":{");
    buf
}

fn line_end(mut buf: Vec<u8>) -> Bytes {
    buf.extend_from_slice(b"}}\n");
    Bytes::from(buf)
}

/// The JSON object a backend sees as `context`: `{"client_id", "room_id", "metadata"}`, plus
/// `"user_id"` only when the connection has one (so v1 contexts stay byte-for-byte as they were).
pub fn encode_context(client_id: &str, room_id: &str, metadata: &Value, user_id: Option<&str>) -> String {
    let mut buf = Vec::with_capacity(64 + client_id.len() + room_id.len());
    buf.extend_from_slice(b"{\"client_id\":");
    push_json_str(&mut buf, client_id);
    buf.extend_from_slice(b",\"room_id\":");
    push_json_str(&mut buf, room_id);
    buf.extend_from_slice(b",\"metadata\":");
    let _ = serde_json::to_writer(&mut buf, metadata);
    if let Some(user_id) = user_id {
        buf.extend_from_slice(b",\"user_id\":");
        push_json_str(&mut buf, user_id);
    }
    buf.push(b'}');
    // Only JSON text was written, which is UTF-8.
    String::from_utf8(buf).unwrap_or_default()
}

/// The answer to a `room_members` query: every member's context (already JSON).
pub fn encode_members_reply<S: AsRef<str>>(request_id: &str, members: &[S], missing: &[String]) -> Bytes {
    let size: usize = members.iter().map(|m| m.as_ref().len() + 1).sum();
    let mut buf = line_start(request_id, "reply", size + 32);
    buf.extend_from_slice(b"\"members\":[");
    for (i, m) in members.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        buf.extend_from_slice(m.as_ref().as_bytes());
    }
    buf.extend_from_slice(b"],\"complete\":");
    buf.extend_from_slice(if missing.is_empty() { b"true" } else { b"false" });
    if !missing.is_empty() {
        buf.extend_from_slice(b",\"missing\":");
        let _ = serde_json::to_writer(&mut buf, missing);
    }
    line_end(buf)
}

/// The answer to a `room_history` query.
pub fn encode_history_reply(
    request_id: &str,
    epoch: &str,
    offset: u64,
    entries: &[(u64, &str)],
    complete: bool,
) -> Bytes {
    let size: usize = entries.iter().map(|(_, d)| d.len() + 32).sum();
    let mut buf = line_start(request_id, "reply", size + 64);
    buf.extend_from_slice(b"\"epoch\":");
    push_json_str(&mut buf, epoch);
    buf.extend_from_slice(format!(",\"offset\":{offset},\"messages\":[").as_bytes());
    for (i, (o, d)) in entries.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        buf.extend_from_slice(format!("{{\"offset\":{o},\"data\":").as_bytes());
        push_json_str(&mut buf, d);
        buf.push(b'}');
    }
    buf.extend_from_slice(format!("],\"complete\":{complete}").as_bytes());
    line_end(buf)
}

/// The answer to a `room_count` query.
pub fn encode_count_reply(request_id: &str, count: usize) -> Bytes {
    let mut buf = line_start(request_id, "reply", 16);
    buf.extend_from_slice(format!("\"count\":{count}").as_bytes());
    line_end(buf)
}

/// The answer to a query the broker cannot answer.
pub fn encode_error_reply(request_id: &str, error: &str) -> Bytes {
    let mut buf = line_start(request_id, "reply", error.len() + 16);
    buf.extend_from_slice(b"\"error\":");
    push_json_str(&mut buf, error);
    line_end(buf)
}

/// Tells a backend that one of its commands was refused, and why.
pub fn encode_command_error(request_id: &str, command: &str, error: &str) -> Bytes {
    let mut buf = line_start(request_id, "command_error", error.len() + 32);
    buf.extend_from_slice(b"\"command\":");
    push_json_str(&mut buf, command);
    buf.extend_from_slice(b",\"error\":");
    push_json_str(&mut buf, error);
    line_end(buf)
}

/// `connection_request`: headers as `{Canonical-Name: [values]}`, the path as `url`, the query
/// string as `query` (an addition to v1; v1 backends ignore it).
pub fn encode_connection_request(
    request_id: &str,
    headers: &[(String, String)],
    url: &str,
    query: &str,
    remote_addr: &str,
) -> Bytes {
    let mut buf = line_start(request_id, "connection_request", 256);
    buf.extend_from_slice(b"\"headers\":{");
    // Group values by canonical name, keeping the order of first appearance.
    let mut grouped: Vec<(String, Vec<&str>)> = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        let canon = canonical_header_name(name);
        match grouped.iter_mut().find(|(n, _)| *n == canon) {
            Some((_, values)) => values.push(value),
            None => grouped.push((canon, vec![value])),
        }
    }
    for (i, (name, values)) in grouped.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        push_json_str(&mut buf, name);
        buf.extend_from_slice(b":[");
        for (j, v) in values.iter().enumerate() {
            if j > 0 {
                buf.push(b',');
            }
            push_json_str(&mut buf, v);
        }
        buf.push(b']');
    }
    buf.extend_from_slice(b"},\"url\":");
    push_json_str(&mut buf, url);
    buf.extend_from_slice(b",\"query\":");
    push_json_str(&mut buf, query);
    buf.extend_from_slice(b",\"remote_addr\":");
    push_json_str(&mut buf, remote_addr);
    line_end(buf)
}

/// `new_connection` or `disconnected`: only a context.
pub fn encode_context_event(request_id: &str, action: &str, context_json: &str) -> Bytes {
    let mut buf = line_start(request_id, action, context_json.len());
    buf.extend_from_slice(b"\"context\":");
    buf.extend_from_slice(context_json.as_bytes());
    line_end(buf)
}

/// `new_message`: a client's text and its context.
pub fn encode_new_message(request_id: &str, message: &str, context_json: &str) -> Bytes {
    let mut buf = line_start(request_id, "new_message", message.len() + context_json.len() + 16);
    buf.extend_from_slice(b"\"message\":");
    push_json_str(&mut buf, message);
    buf.extend_from_slice(b",\"context\":");
    buf.extend_from_slice(context_json.as_bytes());
    line_end(buf)
}

/// `error`: something went wrong with a client (e.g. it was closed for a policy reason).
pub fn encode_error(request_id: &str, error: &str, context_json: &str) -> Bytes {
    let mut buf = line_start(request_id, "error", error.len() + context_json.len() + 16);
    buf.extend_from_slice(b"\"error\":");
    push_json_str(&mut buf, error);
    buf.extend_from_slice(b",\"context\":");
    buf.extend_from_slice(context_json.as_bytes());
    line_end(buf)
}

/// The periodic `heartbeat` line.
pub fn heartbeat_line() -> Bytes {
    Bytes::from_static(b"{\"request_id\":\"heartbeat\",\"action\":\"heartbeat\",\"params\":{}}\n")
}

/// The broker's answer to a backend's `hello`: accepted (the connection is v2 from now on), or
/// refused with the reason, after which the broker closes the connection.
pub fn encode_hello_reply(result: Result<(f64, Limits), &str>) -> Bytes {
    let mut buf = line_start("hello", "hello", 160);
    match result {
        Ok((heartbeat_secs, limits)) => {
            buf.extend_from_slice(format!("\"ok\":true,\"version\":{PROTOCOL_VERSION},\"features\":[").as_bytes());
            for (i, f) in FEATURES.iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                push_json_str(&mut buf, f);
            }
            buf.extend_from_slice(format!("],\"heartbeat_interval\":{heartbeat_secs:?}").as_bytes());
            buf.extend_from_slice(
                format!(
                    ",\"limits\":{{\"max_rooms_per_client\":{},\"max_id_length\":{}}}",
                    limits.max_rooms_per_client, limits.max_id_length
                )
                .as_bytes(),
            );
        }
        Err(reason) => {
            buf.extend_from_slice(b"\"ok\":false,\"error\":");
            push_json_str(&mut buf, reason);
        }
    }
    line_end(buf)
}

/// An event line (as encoded for v1) for a v2 backend: the same object with `"seq"` (and
/// `"redelivered":true`) in front. `line` must start with `{`, as every encoder here makes it.
pub fn with_seq(line: &[u8], seq: u64, redelivered: bool) -> Bytes {
    let rest = line.strip_prefix(b"{").unwrap_or(line);
    let mut buf = Vec::with_capacity(line.len() + 40);
    buf.extend_from_slice(b"{\"seq\":");
    buf.extend_from_slice(seq.to_string().as_bytes());
    buf.push(b',');
    if redelivered {
        buf.extend_from_slice(b"\"redelivered\":true,");
    }
    buf.extend_from_slice(rest);
    Bytes::from(buf)
}

/// Compares two secrets in constant time (`subtle`), over their SHA-256 digests so neither
/// where they differ nor whether their lengths match shows in the time taken.
pub fn secrets_equal(given: &[u8], expected: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    Sha256::digest(given).ct_eq(&Sha256::digest(expected)).into()
}

/// A backend's `hello`: the version and features it speaks, and the secret if it has one.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    pub version: u64,
    pub features: Vec<String>,
    pub secret: Option<String>,
}

/// A backend's answer to a connection request.
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptResponse {
    pub request_id: String,
    pub accepted: bool,
    pub client_id: Option<String>,
    pub room_id: Option<String>,
    pub metadata: Value,
    /// Optional human-readable reason for a rejection (sent in the 403 body).
    pub reason: Option<String>,
    /// v2 `rooms`: the user this connection belongs to.
    pub user_id: Option<String>,
}

/// One parsed backend line.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendCommand {
    Response(AcceptResponse),
    MessageToRoom {
        room_id: String,
        message: String,
        /// v2 `rooms`: client ids that must not get it.
        exclude: Vec<String>,
    },
    MessageToConnection {
        conn_id: String,
        message: String,
    },
    Broadcast {
        message: String,
    },
    /// A heartbeat echoed by a backend: nothing to do.
    Heartbeat,
    /// v2: the opening line of a backend that speaks v2.
    Hello(Hello),
    /// v2: every event with `seq` up to this one has been handled.
    Ack {
        seq: u64,
    },
    /// v2 `rooms`: every connection of a user.
    MessageToUser {
        request_id: String,
        user_id: String,
        message: String,
    },
    /// v2 `rooms`: add a connection to a room, or remove it.
    Membership {
        request_id: String,
        join: bool,
        client_id: String,
        room_id: String,
    },
    /// v2 `rooms`: close a client's WebSocket with this code and reason.
    Disconnect {
        request_id: String,
        client_id: String,
        code: u64,
        reason: String,
    },
    /// v2 `rooms`: who is in a room (`count_only`: how many), answered with a `reply`.
    RoomQuery {
        request_id: String,
        room_id: String,
        count_only: bool,
        timeout: Option<f64>,
    },
    /// v2 `history`: a room's own history size and TTL, and presence events.
    RoomConfig {
        request_id: String,
        room_id: String,
        history_size: Option<u64>,
        history_ttl: Option<f64>,
        presence: Option<bool>,
    },
    /// v2 `history`: a room's messages after `since` (the newest `limit`), answered with a `reply`.
    RoomHistory {
        request_id: String,
        room_id: String,
        since: u64,
        limit: Option<u64>,
    },
}

/// Why a backend line could not be used. `cause` is a short stable label (for rate-limited
/// logging: one line per cause), `detail` says what exactly was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub cause: &'static str,
    pub detail: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.cause, self.detail)
    }
}

fn err(cause: &'static str, detail: impl Into<String>) -> DecodeError {
    DecodeError { cause, detail: detail.into() }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn take_string(params: &mut serde_json::Map<String, Value>, action: &str, key: &str) -> Result<String, DecodeError> {
    match params.get_mut(key).map(Value::take) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(err("missing field", format!("{action}: params.{key} is missing"))),
        Some(other) => {
            Err(err("wrong type", format!("{action}: params.{key} must be a string, got {}", type_name(&other))))
        }
    }
}

/// A message body: a string as it is; any other JSON value (object, array, number, bool) as its
/// compact JSON text, so a backend that sends a dict delivers that dict's JSON to clients.
fn take_message(params: &mut serde_json::Map<String, Value>, action: &str) -> Result<String, DecodeError> {
    match params.get_mut("message").map(Value::take) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(err("missing field", format!("{action}: params.message is missing"))),
        Some(other) => Ok(other.to_string()),
    }
}

fn optional_string(
    params: &mut serde_json::Map<String, Value>,
    action: &str,
    key: &str,
) -> Result<Option<String>, DecodeError> {
    match params.get_mut(key).map(Value::take) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => {
            Err(err("wrong type", format!("{action}: params.{key} must be a string, got {}", type_name(&other))))
        }
    }
}

/// `message_to_room`'s optional `exclude`: an array of client ids (a single string is accepted too).
fn optional_u64(params: &serde_json::Map<String, Value>, action: &str, key: &str) -> Result<Option<u64>, DecodeError> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            err("wrong type", format!("{action}: params.{key} must be a non-negative integer, got {n}"))
        }),
        Some(other) => {
            Err(err("wrong type", format!("{action}: params.{key} must be an integer, got {}", type_name(other))))
        }
    }
}

fn take_exclude(params: &mut serde_json::Map<String, Value>) -> Result<Vec<String>, DecodeError> {
    match params.get_mut("exclude").map(Value::take) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s]),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(err(
                    "wrong type",
                    format!(
                        "message_to_room: params.exclude must hold client ids (strings), got a {}",
                        type_name(&other)
                    ),
                )),
            })
            .collect(),
        Some(other) => Err(err(
            "wrong type",
            format!("message_to_room: params.exclude must be an array of client ids, got {}", type_name(&other)),
        )),
    }
}

/// Parses one backend line (without its `\n`).
pub fn decode_backend_line(line: &[u8]) -> Result<BackendCommand, DecodeError> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        if std::str::from_utf8(line).is_err() {
            err("invalid utf-8", "line is not valid UTF-8")
        } else {
            err("malformed json", e.to_string())
        }
    })?;
    let mut obj = match value {
        Value::Object(o) => o,
        other => return Err(err("not an object", format!("line is a JSON {}, expected an object", type_name(&other)))),
    };
    let action = match obj.remove("action") {
        Some(Value::String(a)) => a,
        None | Some(Value::Null) => return Err(err("missing field", "action is missing")),
        Some(other) => return Err(err("wrong type", format!("action must be a string, got {}", type_name(&other)))),
    };
    let request_id = match obj.remove("request_id") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(err("wrong type", format!("request_id must be a string, got {}", type_name(&other))))
        }
    };
    let mut params = match obj.remove("params") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(p)) => p,
        Some(other) => {
            return Err(err("wrong type", format!("{action}: params must be an object, got {}", type_name(&other))))
        }
    };
    let p = &mut params;
    match action.as_str() {
        "response" => {
            if request_id.is_empty() {
                return Err(err("missing field", "response: request_id is missing"));
            }
            let accepted = match p.get("accepted") {
                Some(Value::Bool(b)) => *b,
                None | Some(Value::Null) => false,
                Some(other) => {
                    return Err(err(
                        "wrong type",
                        format!("response: params.accepted must be a bool, got {}", type_name(other)),
                    ))
                }
            };
            let client_id = optional_string(p, "response", "client_id")?;
            let room_id = optional_string(p, "response", "room_id")?;
            let reason = optional_string(p, "response", "reason")?;
            let user_id = optional_string(p, "response", "user_id")?;
            let metadata = match p.get_mut("metadata").map(Value::take) {
                None | Some(Value::Null) => Value::Object(Default::default()),
                Some(v @ Value::Object(_)) => v,
                Some(other) => {
                    return Err(err(
                        "wrong type",
                        format!("response: params.metadata must be an object, got {}", type_name(&other)),
                    ))
                }
            };
            Ok(BackendCommand::Response(AcceptResponse {
                request_id,
                accepted,
                client_id,
                room_id,
                metadata,
                reason,
                user_id,
            }))
        }
        "message_to_room" => Ok(BackendCommand::MessageToRoom {
            room_id: take_string(p, "message_to_room", "room_id")?,
            message: take_message(p, "message_to_room")?,
            exclude: take_exclude(p)?,
        }),
        "message_to_user" => Ok(BackendCommand::MessageToUser {
            user_id: take_string(p, "message_to_user", "user_id")?,
            message: take_message(p, "message_to_user")?,
            request_id,
        }),
        "join_room" | "leave_room" => {
            let join = action == "join_room";
            Ok(BackendCommand::Membership {
                client_id: take_string(p, &action, "client_id")?,
                room_id: take_string(p, &action, "room_id")?,
                request_id,
                join,
            })
        }
        "disconnect" => {
            let code = match p.get("code") {
                None | Some(Value::Null) => 1000,
                Some(Value::Number(n)) => n.as_u64().ok_or_else(|| {
                    err(
                        "wrong type",
                        format!("disconnect: params.code must be a close code (1000 or 4000-4999), got {n}"),
                    )
                })?,
                Some(other) => {
                    return Err(err(
                        "wrong type",
                        format!("disconnect: params.code must be an integer, got {}", type_name(other)),
                    ))
                }
            };
            Ok(BackendCommand::Disconnect {
                client_id: take_string(p, "disconnect", "client_id")?,
                reason: optional_string(p, "disconnect", "reason")?.unwrap_or_default(),
                request_id,
                code,
            })
        }
        "room_members" | "room_count" => {
            let count_only = action == "room_count";
            let timeout = match p.get("timeout") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => match n.as_f64() {
                    Some(t) if t.is_finite() && t > 0.0 => Some(t),
                    _ => {
                        return Err(err(
                            "wrong type",
                            format!("{action}: params.timeout must be a positive number, got {n}"),
                        ))
                    }
                },
                Some(other) => {
                    return Err(err(
                        "wrong type",
                        format!("{action}: params.timeout must be a number, got {}", type_name(other)),
                    ))
                }
            };
            if request_id.is_empty() {
                return Err(err("missing field", format!("{action}: request_id is missing")));
            }
            Ok(BackendCommand::RoomQuery {
                room_id: take_string(p, &action, "room_id")?,
                request_id,
                count_only,
                timeout,
            })
        }
        "room_config" => {
            let history_size = optional_u64(p, "room_config", "history_size")?;
            let history_ttl = match p.get("history_ttl") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => Some(n.as_f64().unwrap_or(f64::NAN)),
                Some(other) => {
                    return Err(err(
                        "wrong type",
                        format!("room_config: params.history_ttl must be a number, got {}", type_name(other)),
                    ))
                }
            };
            let presence = match p.get("presence") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(other) => {
                    return Err(err(
                        "wrong type",
                        format!("room_config: params.presence must be a boolean, got {}", type_name(other)),
                    ))
                }
            };
            Ok(BackendCommand::RoomConfig {
                room_id: take_string(p, "room_config", "room_id")?,
                request_id,
                history_size,
                history_ttl,
                presence,
            })
        }
        "room_history" => {
            if request_id.is_empty() {
                return Err(err("missing field", "room_history: request_id is missing"));
            }
            Ok(BackendCommand::RoomHistory {
                since: optional_u64(p, "room_history", "since")?.unwrap_or(0),
                limit: optional_u64(p, "room_history", "limit")?,
                room_id: take_string(p, "room_history", "room_id")?,
                request_id,
            })
        }
        "message_to_connection" => Ok(BackendCommand::MessageToConnection {
            conn_id: take_string(p, "message_to_connection", "conn_id")?,
            message: take_message(p, "message_to_connection")?,
        }),
        "broadcast" => Ok(BackendCommand::Broadcast { message: take_message(p, "broadcast")? }),
        "heartbeat" => Ok(BackendCommand::Heartbeat),
        "ack" => match p.get("seq") {
            Some(Value::Number(n)) => match n.as_u64() {
                Some(seq) => Ok(BackendCommand::Ack { seq }),
                None => Err(err("wrong type", format!("ack: params.seq must be a non-negative integer, got {n}"))),
            },
            None | Some(Value::Null) => Err(err("missing field", "ack: params.seq is missing")),
            Some(other) => {
                Err(err("wrong type", format!("ack: params.seq must be an integer, got {}", type_name(other))))
            }
        },
        "hello" => {
            let version = match p.get("version") {
                Some(Value::Number(n)) => n.as_u64().ok_or_else(|| {
                    err("wrong type", format!("hello: params.version must be a positive integer, got {n}"))
                })?,
                None | Some(Value::Null) => return Err(err("missing field", "hello: params.version is missing")),
                Some(other) => {
                    return Err(err(
                        "wrong type",
                        format!("hello: params.version must be an integer, got {}", type_name(other)),
                    ))
                }
            };
            let features = match p.get_mut("features").map(Value::take) {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => {
                    items.into_iter().filter_map(|f| if let Value::String(s) = f { Some(s) } else { None }).collect()
                }
                Some(other) => {
                    return Err(err(
                        "wrong type",
                        format!("hello: params.features must be an array, got {}", type_name(&other)),
                    ))
                }
            };
            let secret = optional_string(p, "hello", "secret")?;
            Ok(BackendCommand::Hello(Hello { version, features, secret }))
        }
        other => {
            let mut shown: String = other.chars().take(64).collect();
            if shown.len() < other.len() {
                shown.push('…');
            }
            Err(err("unknown action", format!("unknown action {shown:?}")))
        }
    }
}

/// One item produced by [`LineReader`].
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line without its `\n` (a trailing `\r` is removed too).
    Data(Bytes),
    /// A line longer than the limit was skipped; the value is how many bytes were discarded.
    TooLong(usize),
}

/// Splits bytes into lines in linear time, with a size limit, without doing any I/O: a line over
/// the limit is discarded up to its `\n` and reported, after which splitting carries on with the
/// next line. [`LineReader`] feeds it from a socket; the in-process backend link from the
/// batches its backend writes.
pub struct LineSplitter {
    buf: BytesMut,
    scanned: usize,
    max_line: usize,
    discarding: Option<usize>,
}

impl LineSplitter {
    pub fn new(max_line: usize) -> Self {
        LineSplitter { buf: BytesMut::new(), scanned: 0, max_line, discarding: None }
    }

    /// Appends bytes to split.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete line, or `None` until more bytes come.
    pub fn next_line(&mut self) -> Option<Line> {
        if let Some(pos) = memchr::memchr(b'\n', &self.buf[self.scanned..]) {
            let end = self.scanned + pos;
            let mut line = self.buf.split_to(end + 1);
            self.scanned = 0;
            if let Some(dropped) = self.discarding.take() {
                return Some(Line::TooLong(dropped + line.len()));
            }
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            if line.len() > self.max_line {
                return Some(Line::TooLong(line.len()));
            }
            return Some(Line::Data(line.freeze()));
        }
        self.scanned = self.buf.len();
        // A line of exactly `max_line` bytes may wait here for its `\n` with its `\r` already
        // read: that one byte more is not over the limit yet (found by fuzz/ `backend_line`).
        let pending_cr = self.scanned == self.max_line.saturating_add(1) && self.buf.last() == Some(&b'\r');
        if self.scanned > self.max_line && !pending_cr {
            let dropped = self.buf.len();
            self.buf.clear();
            self.scanned = 0;
            *self.discarding.get_or_insert(0) += dropped;
        }
        None
    }

    /// At the end of the stream: what is left of an unterminated last line, if anything.
    pub fn finish(&mut self) -> Option<Line> {
        self.scanned = 0;
        if let Some(dropped) = self.discarding.take() {
            let n = dropped + self.buf.len();
            self.buf.clear();
            return Some(Line::TooLong(n));
        }
        if self.buf.is_empty() {
            return None;
        }
        if self.buf.len() > self.max_line {
            let n = self.buf.len();
            self.buf.clear();
            return Some(Line::TooLong(n));
        }
        Some(Line::Data(self.buf.split().freeze()))
    }
}

/// A [`LineSplitter`] reading from an async byte stream.
pub struct LineReader<R> {
    inner: R,
    split: LineSplitter,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R, max_line: usize) -> Self {
        let mut split = LineSplitter::new(max_line);
        split.buf.reserve(16 * 1024);
        LineReader { inner, split }
    }

    /// The next line, or `None` at end of stream (a final unterminated line is returned first).
    pub async fn next_line(&mut self) -> io::Result<Option<Line>> {
        loop {
            if let Some(line) = self.split.next_line() {
                return Ok(Some(line));
            }
            let buf = &mut self.split.buf;
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(16 * 1024);
            }
            if self.inner.read_buf(buf).await? == 0 {
                return Ok(self.split.finish());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn v2_lines() {
        let line = encode_new_message("17", "hi", r#"{"client_id":"a","room_id":"r","metadata":{}}"#);
        let v: Value = serde_json::from_slice(&with_seq(&line, 5, false)).unwrap();
        assert_eq!(
            (v["seq"].as_u64(), v["request_id"].as_str(), v["params"]["message"].as_str()),
            (Some(5), Some("17"), Some("hi"))
        );
        assert!(v.get("redelivered").is_none());
        let v: Value = serde_json::from_slice(&with_seq(&line, 6, true)).unwrap();
        assert_eq!(v["redelivered"], json!(true));
        assert!(with_seq(&line, 1, false).ends_with(b"\n"));

        let limits = Limits { max_rooms_per_client: 7, max_id_length: 99 };
        let v: Value = serde_json::from_slice(&encode_hello_reply(Ok((15.0, limits)))).unwrap();
        assert_eq!(v["params"]["ok"], json!(true));
        assert_eq!(v["params"]["features"], json!(["ack", "heartbeat", "rooms", "history"]));
        assert_eq!(v["params"]["limits"], json!({"max_rooms_per_client": 7, "max_id_length": 99}));
        assert_eq!(v["params"]["version"], json!(2));
        assert_eq!(v["params"]["heartbeat_interval"], json!(15.0));
        let v: Value = serde_json::from_slice(&encode_hello_reply(Err("wrong \"secret\""))).unwrap();
        assert_eq!(v["params"], json!({"ok": false, "error": "wrong \"secret\""}));
    }

    #[test]
    fn rooms_commands_and_replies() {
        let d = |l: &str| decode_backend_line(l.as_bytes());
        assert_eq!(
            d(r#"{"action":"message_to_room","params":{"room_id":"r","message":"m","exclude":["a","b"]}}"#).unwrap(),
            BackendCommand::MessageToRoom {
                room_id: "r".into(),
                message: "m".into(),
                exclude: vec!["a".into(), "b".into()]
            }
        );
        assert_eq!(
            d(r#"{"action":"message_to_room","params":{"room_id":"r","message":"m","exclude":"a"}}"#).unwrap(),
            BackendCommand::MessageToRoom { room_id: "r".into(), message: "m".into(), exclude: vec!["a".into()] }
        );
        assert_eq!(
            d(r#"{"action":"message_to_user","params":{"user_id":"u","message":{"x":1}}}"#).unwrap(),
            BackendCommand::MessageToUser { request_id: "".into(), user_id: "u".into(), message: r#"{"x":1}"#.into() }
        );
        assert_eq!(
            d(r#"{"request_id":"j","action":"join_room","params":{"client_id":"c","room_id":"r"}}"#).unwrap(),
            BackendCommand::Membership {
                request_id: "j".into(),
                join: true,
                client_id: "c".into(),
                room_id: "r".into()
            }
        );
        assert_eq!(
            d(r#"{"action":"leave_room","params":{"client_id":"c","room_id":"r"}}"#).unwrap(),
            BackendCommand::Membership {
                request_id: "".into(),
                join: false,
                client_id: "c".into(),
                room_id: "r".into()
            }
        );
        assert_eq!(
            d(r#"{"action":"disconnect","params":{"client_id":"c","code":4100,"reason":"bye"}}"#).unwrap(),
            BackendCommand::Disconnect {
                request_id: "".into(),
                client_id: "c".into(),
                code: 4100,
                reason: "bye".into()
            }
        );
        assert_eq!(
            d(r#"{"action":"disconnect","params":{"client_id":"c"}}"#).unwrap(),
            BackendCommand::Disconnect { request_id: "".into(), client_id: "c".into(), code: 1000, reason: "".into() }
        );
        assert_eq!(
            d(r#"{"request_id":"q","action":"room_members","params":{"room_id":"r","timeout":2.5}}"#).unwrap(),
            BackendCommand::RoomQuery {
                request_id: "q".into(),
                room_id: "r".into(),
                count_only: false,
                timeout: Some(2.5)
            }
        );
        assert_eq!(
            d(r#"{"request_id":"q","action":"room_count","params":{"room_id":"r"}}"#).unwrap(),
            BackendCommand::RoomQuery { request_id: "q".into(), room_id: "r".into(), count_only: true, timeout: None }
        );
        match d(r#"{"request_id":"c","action":"response","params":{"accepted":true,"user_id":"u1"}}"#).unwrap() {
            BackendCommand::Response(a) => assert_eq!(a.user_id.as_deref(), Some("u1")),
            other => panic!("{other:?}"),
        }
        for (bad, says) in [
            (
                r#"{"action":"message_to_room","params":{"room_id":"r","message":"m","exclude":[1]}}"#,
                "exclude must hold client ids",
            ),
            (
                r#"{"action":"message_to_room","params":{"room_id":"r","message":"m","exclude":{}}}"#,
                "exclude must be an array",
            ),
            (r#"{"action":"join_room","params":{"client_id":"c"}}"#, "join_room: params.room_id is missing"),
            (
                r#"{"action":"leave_room","params":{"client_id":5,"room_id":"r"}}"#,
                "leave_room: params.client_id must be a string",
            ),
            (
                r#"{"action":"disconnect","params":{"client_id":"c","code":-1}}"#,
                "disconnect: params.code must be a close code",
            ),
            (r#"{"action":"disconnect","params":{"client_id":"c","code":"1000"}}"#, "params.code must be an integer"),
            (r#"{"action":"message_to_user","params":{"message":"m"}}"#, "message_to_user: params.user_id is missing"),
            (r#"{"action":"room_members","params":{"room_id":"r"}}"#, "room_members: request_id is missing"),
            (
                r#"{"request_id":"q","action":"room_members","params":{"room_id":"r","timeout":0}}"#,
                "timeout must be a positive number",
            ),
            (
                r#"{"request_id":"q","action":"room_count","params":{"room_id":"r","timeout":"1"}}"#,
                "timeout must be a number",
            ),
        ] {
            let e = d(bad).unwrap_err();
            assert!(e.detail.contains(says), "{bad}: {e}");
        }

        let v: Value = serde_json::from_slice(&encode_members_reply(
            "q1",
            &["{\"client_id\":\"a\"}", "{\"client_id\":\"b\"}"],
            &[],
        ))
        .unwrap();
        assert_eq!(
            v,
            json!({"request_id":"q1","action":"reply","params":{"members":[{"client_id":"a"},{"client_id":"b"}],"complete":true}})
        );
        let none: [&str; 0] = [];
        let v: Value = serde_json::from_slice(&encode_members_reply("q2", &none, &["n2".to_string()])).unwrap();
        assert_eq!(v["params"], json!({"members":[],"complete":false,"missing":["n2"]}));
        let v: Value = serde_json::from_slice(&encode_count_reply("q3", 42)).unwrap();
        assert_eq!(v["params"], json!({"count": 42}));
        let v: Value = serde_json::from_slice(&encode_error_reply("q4", "bad \"room\"")).unwrap();
        assert_eq!(v["params"], json!({"error": "bad \"room\""}));
        let v: Value = serde_json::from_slice(&encode_command_error("j", "join_room", "full")).unwrap();
        assert_eq!(
            v,
            json!({"request_id":"j","action":"command_error","params":{"command":"join_room","error":"full"}})
        );
    }

    #[test]
    fn v2_commands() {
        assert_eq!(
            decode_backend_line(br#"{"action":"ack","params":{"seq":12}}"#).unwrap(),
            BackendCommand::Ack { seq: 12 }
        );
        for bad in [
            &br#"{"action":"ack","params":{"seq":-1}}"#[..],
            br#"{"action":"ack","params":{"seq":"1"}}"#,
            br#"{"action":"ack","params":{}}"#,
            br#"{"action":"ack","params":{"seq":1.5}}"#,
        ] {
            assert!(decode_backend_line(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let h = decode_backend_line(
            br#"{"request_id":"hello","action":"hello","params":{"version":2,"features":["ack",3],"secret":"s3"}}"#,
        )
        .unwrap();
        assert_eq!(
            h,
            BackendCommand::Hello(Hello { version: 2, features: vec!["ack".into()], secret: Some("s3".into()) })
        );
        assert!(decode_backend_line(br#"{"action":"hello","params":{"version":"2"}}"#).is_err());
        assert!(decode_backend_line(br#"{"action":"hello","params":{"version":2,"secret":7}}"#).is_err());
    }

    #[test]
    fn secret_comparison() {
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abd", b"abc"));
        assert!(!secrets_equal(b"ab", b"abc"));
        assert!(!secrets_equal(b"abcd", b"abc"));
        assert!(!secrets_equal(b"", b"abc"));
    }

    #[test]
    fn canonical_names_match_go() {
        assert_eq!(canonical_header_name("x-token"), "X-Token");
        assert_eq!(canonical_header_name("AUTHORIZATION"), "Authorization");
        assert_eq!(canonical_header_name("sec-websocket-key"), "Sec-Websocket-Key");
        assert_eq!(canonical_header_name("bad name"), "bad name");
    }

    #[test]
    fn connection_request_groups_headers() {
        let headers = vec![
            ("x-token".to_string(), "a".to_string()),
            ("Host".to_string(), "h".to_string()),
            ("X-TOKEN".to_string(), "b".to_string()),
        ];
        let line = encode_connection_request("c1", &headers, "/ws/chat", "a=1", "127.0.0.1:5");
        assert_eq!(line.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["action"], "connection_request");
        assert_eq!(v["request_id"], "c1");
        assert_eq!(v["params"]["headers"]["X-Token"], json!(["a", "b"]));
        assert_eq!(v["params"]["url"], "/ws/chat");
        assert_eq!(v["params"]["query"], "a=1");
        assert_eq!(v["params"]["remote_addr"], "127.0.0.1:5");
    }

    #[test]
    fn events_are_valid_json_with_escapes() {
        let ctx = encode_context("c\"1", "room\n", &json!({"user": "ü"}), None);
        assert_eq!(
            encode_context("a", "r", &json!({}), None),
            r#"{"client_id":"a","room_id":"r","metadata":{}}"#,
            "without a user id: the v1 context, byte for byte"
        );
        assert_eq!(
            encode_context("a", "r", &json!({}), Some("u\"1")),
            r#"{"client_id":"a","room_id":"r","metadata":{},"user_id":"u\"1"}"#
        );
        let line = encode_new_message("7", "hi \"there\"\n\u{0}", &ctx);
        let v: Value = serde_json::from_slice(&line[..line.len() - 1]).unwrap();
        assert_eq!(v["params"]["message"], "hi \"there\"\n\u{0}");
        assert_eq!(v["params"]["context"]["client_id"], "c\"1");
        assert_eq!(v["params"]["context"]["metadata"]["user"], "ü");
        let v: Value = serde_json::from_slice(&encode_error("8", "boom", &ctx)).unwrap();
        assert_eq!(v["params"]["error"], "boom");
        let v: Value = serde_json::from_slice(&encode_context_event("9", "disconnected", &ctx)).unwrap();
        assert_eq!(v["action"], "disconnected");
        let v: Value = serde_json::from_slice(&heartbeat_line()).unwrap();
        assert_eq!(v["action"], "heartbeat");
    }

    #[test]
    fn decodes_every_backend_action() {
        let r = decode_backend_line(br#"{"request_id":"c1","action":"response","params":{"accepted":true,"client_id":"u","room_id":"r","metadata":{"k":1}}}"#).unwrap();
        match r {
            BackendCommand::Response(a) => {
                assert!(a.accepted);
                assert_eq!(a.client_id.as_deref(), Some("u"));
                assert_eq!(a.metadata, json!({"k": 1}));
            }
            other => panic!("{other:?}"),
        }
        // The v1 client's rejection after an exception carries only `accepted`.
        let r = decode_backend_line(br#"{"request_id":"c2","action":"response","params":{"accepted":false}}"#).unwrap();
        assert!(matches!(r, BackendCommand::Response(AcceptResponse { accepted: false, .. })));
        assert_eq!(
            decode_backend_line(br#"{"action":"message_to_room","params":{"room_id":"r","message":"m"}}"#).unwrap(),
            BackendCommand::MessageToRoom { room_id: "r".into(), message: "m".into(), exclude: vec![] }
        );
        assert_eq!(
            decode_backend_line(br#"{"action":"message_to_connection","params":{"conn_id":"c","message":"m"}}"#)
                .unwrap(),
            BackendCommand::MessageToConnection { conn_id: "c".into(), message: "m".into() }
        );
        assert_eq!(
            decode_backend_line(br#"{"action":"broadcast","params":{"message":{"a":[1]}}}"#).unwrap(),
            BackendCommand::Broadcast { message: r#"{"a":[1]}"#.into() }
        );
    }

    #[test]
    fn bad_lines_get_precise_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"{not json", "malformed json"),
            (b"[1,2]", "not an object"),
            (b"{\"params\":{}}", "missing field"),
            (b"{\"action\":5}", "wrong type"),
            (b"{\"action\":\"message_to_room\",\"params\":{\"room_id\":5,\"message\":\"m\"}}", "wrong type"),
            (b"{\"action\":\"message_to_room\",\"params\":{\"message\":\"m\"}}", "missing field"),
            (b"{\"action\":\"broadcast\",\"params\":[]}", "wrong type"),
            (b"{\"action\":\"broadcast\"}", "missing field"),
            (b"{\"action\":\"launch\",\"params\":{}}", "unknown action"),
            (b"{\"action\":\"response\",\"params\":{\"accepted\":true}}", "missing field"),
            (b"{\"request_id\":\"x\",\"action\":\"response\",\"params\":{\"accepted\":\"yes\"}}", "wrong type"),
            (
                b"{\"request_id\":\"x\",\"action\":\"response\",\"params\":{\"accepted\":true,\"metadata\":3}}",
                "wrong type",
            ),
            (b"{\"action\":\"broadcast\",\"params\":{\"message\":\"\xff\"}}", "invalid utf-8"),
        ];
        for (line, cause) in cases {
            let e = decode_backend_line(line).unwrap_err();
            assert_eq!(e.cause, *cause, "{}: {e}", String::from_utf8_lossy(line));
        }
    }

    async fn collect(input: Vec<u8>, max: usize) -> Vec<Line> {
        let mut r = LineReader::new(&input[..], max);
        let mut out = Vec::new();
        while let Some(l) = r.next_line().await.unwrap() {
            out.push(l);
        }
        out
    }

    #[test]
    fn line_splitter_joins_pieces_and_skips_overlong_lines() {
        let mut s = LineSplitter::new(8);
        s.extend(b"ab");
        assert_eq!(s.next_line(), None);
        s.extend(b"c\r\nde");
        assert_eq!(s.next_line(), Some(Line::Data(Bytes::from_static(b"abc"))));
        assert_eq!(s.next_line(), None);
        s.extend(b"fghijklmnop"); // over the limit before its newline: discarded as it comes
        assert_eq!(s.next_line(), None);
        s.extend(b"q\nok\n");
        assert_eq!(s.next_line(), Some(Line::TooLong(15))); // "de" + 11 + "q\n"
        assert_eq!(s.next_line(), Some(Line::Data(Bytes::from_static(b"ok"))));
        s.extend(b"123456789\n"); // complete but over the limit
        assert_eq!(s.next_line(), Some(Line::TooLong(9)));
        s.extend(b"tail");
        assert_eq!(s.next_line(), None);
        assert_eq!(s.finish(), Some(Line::Data(Bytes::from_static(b"tail"))));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn a_line_at_the_limit_survives_its_crlf_arriving_apart() {
        // Found by fuzz/ `backend_line`: a line of exactly `max_line` bytes ending in CRLF was
        // dropped as too long when a read ended between its `\r` and its `\n`.
        let mut s = LineSplitter::new(4);
        s.extend(b"abcd\r");
        assert_eq!(s.next_line(), None);
        s.extend(b"\nok\n");
        assert_eq!(s.next_line(), Some(Line::Data(Bytes::from_static(b"abcd"))));
        assert_eq!(s.next_line(), Some(Line::Data(Bytes::from_static(b"ok"))));
        // One byte more than the limit, then its end: too long, whichever way it arrives.
        s.extend(b"abcd\r");
        assert_eq!(s.next_line(), None);
        s.extend(b"x");
        assert_eq!(s.next_line(), None);
        s.extend(b"\n");
        assert_eq!(s.next_line(), Some(Line::TooLong(7)));
        s.extend(b"abcd\r");
        assert_eq!(s.next_line(), None);
        assert_eq!(s.finish(), Some(Line::TooLong(5)));
    }

    #[tokio::test]
    async fn line_reader_splits_and_limits() {
        let out = collect(b"a\r\nbb\n\nccc".to_vec(), 1024).await;
        assert_eq!(
            out,
            vec![
                Line::Data(Bytes::from_static(b"a")),
                Line::Data(Bytes::from_static(b"bb")),
                Line::Data(Bytes::new()),
                Line::Data(Bytes::from_static(b"ccc")),
            ]
        );
        let mut input = vec![b'x'; 100_000];
        input.extend_from_slice(b"\nok\n");
        let out = collect(input, 1024).await;
        assert_eq!(out, vec![Line::TooLong(100_001), Line::Data(Bytes::from_static(b"ok"))]);
    }

    #[tokio::test]
    async fn line_reader_handles_split_reads() {
        let (mut tx, rx) = tokio::io::duplex(8);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in [&b"{\"a\""[..], b":1}\n{\"b\":", b"2}\n"] {
                tx.write_all(chunk).await.unwrap();
            }
        });
        let mut r = LineReader::new(rx, 1024);
        assert_eq!(r.next_line().await.unwrap(), Some(Line::Data(Bytes::from_static(b"{\"a\":1}"))));
        assert_eq!(r.next_line().await.unwrap(), Some(Line::Data(Bytes::from_static(b"{\"b\":2}"))));
        writer.await.unwrap();
        assert_eq!(r.next_line().await.unwrap(), None);
    }
}
