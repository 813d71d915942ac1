//! `LineDecoder`: an optional native accelerator of the backend clients' inbound codec.
//!
//! Why it exists: a Python backend spends most of its per-event time framing lines and turning
//! JSON into event objects (`pystrands._protocol.LineFramer` + `decode_event`). This module does
//! both in Rust, with the GIL held, on the calling thread (no threads, no Python callbacks but the
//! ones named here), and returns the very same Python objects (`NewMessage`, `Context`, ... from
//! `pystrands._protocol` / `pystrands.context`).
//!
//! The pure-Python codec stays the reference. Framing mirrors `LineFramer.feed` step by step. For
//! decoding, the native path only takes the well-formed common frames; any line it does not fully
//! and exactly understand (invalid JSON or UTF-8, an unexpected type anywhere in the known fields,
//! an unknown action, an invalid `seq`, a duplicated key, a number whose Python value could be
//! ambiguous, ...) is handed, as bytes, to the Python `decode_event`, so malformed input is logged
//! and skipped exactly as the reference does. `tests/test_codec_native.py` checks both codecs give
//! identical events on the same streams.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;

type DeResult<T> = Result<T, serde_json::Error>;

fn bail<T, E: de::Error>() -> Result<T, E> {
    Err(E::custom("not for the native path"))
}

/// A float whose Python value orjson might give differently: `-0` (orjson: int 0, serde_json:
/// float -0.0) and integers beyond 64 bits (both parse them as floats; leave them to Python).
fn ambiguous_float(x: f64) -> bool {
    (x == 0.0 && x.is_sign_negative()) || (x.fract() == 0.0 && x.abs() >= 9.2e18)
}

// ------------------------------------------------------------------------------ JSON -> Python

/// Any JSON value as the Python object orjson gives.
#[derive(Clone, Copy)]
struct AnyValue<'py>(Python<'py>);

impl<'de, 'py> DeserializeSeed<'de> for AnyValue<'py> {
    type Value = Bound<'py, PyAny>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'py> Visitor<'de> for AnyValue<'py> {
    type Value = Bound<'py, PyAny>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(PyBool::new(self.0, v).to_owned().into_any())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(PyInt::new(self.0, v).into_any())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(PyInt::new(self.0, v).into_any())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        if ambiguous_float(v) {
            return bail();
        }
        Ok(PyFloat::new(self.0, v).into_any())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(PyString::new(self.0, v).into_any())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(self.0.None().into_bound(self.0))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let list = PyList::empty(self.0);
        while let Some(item) = seq.next_element_seed(self)? {
            list.append(item).map_err(|_| de::Error::custom("append"))?;
        }
        Ok(list.into_any())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let dict = PyDict::new(self.0);
        while let Some(key) = map.next_key_seed(Str(self.0))? {
            let value = map.next_value_seed(self)?;
            dict.set_item(key, value).map_err(|_| de::Error::custom("set_item"))?;
        }
        Ok(dict.into_any())
    }
}

/// A JSON string as a Python `str`; anything else bails out.
#[derive(Clone, Copy)]
struct Str<'py>(Python<'py>);

impl<'de, 'py> DeserializeSeed<'de> for Str<'py> {
    type Value = Bound<'py, PyString>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, 'py> Visitor<'de> for Str<'py> {
    type Value = Bound<'py, PyString>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(PyString::new(self.0, v))
    }
}

/// A JSON string or `null` (`None`); anything else bails out.
#[derive(Clone, Copy)]
struct OptStr<'py>(Python<'py>);

impl<'de, 'py> DeserializeSeed<'de> for OptStr<'py> {
    type Value = Option<Bound<'py, PyString>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'py> Visitor<'de> for OptStr<'py> {
    type Value = Option<Bound<'py, PyString>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string or null")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(PyString::new(self.0, v)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// Skips any JSON value; `true` if it was the literal `true` (the `redelivered` rule).
struct Skip;

impl<'de> DeserializeSeed<'de> for Skip {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Skip {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        Ok(v)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<bool, E> {
        if ambiguous_float(v) {
            return bail();
        }
        Ok(false)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element_seed(Skip)?.is_some() {}
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_key::<de::IgnoredAny>()?.is_some() {
            map.next_value_seed(Skip)?;
        }
        Ok(false)
    }
}

/// Stores `value` in `slot`, bailing out on a duplicated key (Python would keep the last one).
fn put<T, E: de::Error>(slot: &mut Option<T>, value: T) -> Result<(), E> {
    if slot.is_some() {
        return bail();
    }
    *slot = Some(value);
    Ok(())
}

// ------------------------------------------------------------------------------- the frame

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    NewMessage,
    NewConnection,
    Disconnected,
    Error,
    ConnectionRequest,
    Heartbeat,
    Hello,
    Reply,
}

impl Action {
    fn from_str(s: &str) -> Option<Action> {
        Some(match s {
            "new_message" => Action::NewMessage,
            "new_connection" => Action::NewConnection,
            "disconnected" => Action::Disconnected,
            "error" => Action::Error,
            "connection_request" => Action::ConnectionRequest,
            "heartbeat" => Action::Heartbeat,
            "hello" => Action::Hello,
            "reply" => Action::Reply,
            _ => return None,
        })
    }
}

struct Ctx<'py> {
    client_id: Option<Bound<'py, PyString>>,
    room_id: Option<Bound<'py, PyString>>,
    metadata: Option<Bound<'py, PyAny>>,
    user_id: Option<Option<Bound<'py, PyString>>>,
}

#[derive(Clone, Copy)]
struct CtxSeed<'py>(Python<'py>);

impl<'de, 'py> DeserializeSeed<'de> for CtxSeed<'py> {
    type Value = Ctx<'py>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, 'py> Visitor<'de> for CtxSeed<'py> {
    type Value = Ctx<'py>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a context object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let py = self.0;
        let mut c = Ctx { client_id: None, room_id: None, metadata: None, user_id: None };
        while let Some(key) = map.next_key::<&str>()? {
            match key {
                "client_id" => put(&mut c.client_id, map.next_value_seed(Str(py))?)?,
                "room_id" => put(&mut c.room_id, map.next_value_seed(Str(py))?)?,
                "metadata" => put(&mut c.metadata, map.next_value_seed(AnyValue(py))?)?,
                "user_id" => put(&mut c.user_id, map.next_value_seed(OptStr(py))?)?,
                _ => {
                    map.next_value_seed(Skip)?;
                }
            }
        }
        Ok(c)
    }
}

#[derive(Default)]
struct Params<'py> {
    message: Option<Bound<'py, PyString>>,
    context: Option<Ctx<'py>>,
    error: Option<Bound<'py, PyString>>,
    headers: Option<Bound<'py, PyAny>>,
    url: Option<Bound<'py, PyString>>,
    remote_addr: Option<Bound<'py, PyString>>,
    query: Option<Option<Bound<'py, PyString>>>,
    // A query's `reply` (`rooms` feature).
    members: Option<Vec<Ctx<'py>>>,
    complete: Option<bool>,
    missing: Option<Bound<'py, PyAny>>,
    count: Option<Bound<'py, PyAny>>,
    // A `room_history` reply (`history` feature): plain values, checked by the session.
    epoch: Option<Bound<'py, PyAny>>,
    offset: Option<Bound<'py, PyAny>>,
    messages: Option<Bound<'py, PyAny>>,
}

/// A JSON array of context objects (a `room_members` reply: may hold thousands).
#[derive(Clone, Copy)]
struct CtxList<'py>(Python<'py>);

impl<'de, 'py> DeserializeSeed<'de> for CtxList<'py> {
    type Value = Vec<Ctx<'py>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, 'py> Visitor<'de> for CtxList<'py> {
    type Value = Vec<Ctx<'py>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of context objects")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(65_536));
        while let Some(c) = seq.next_element_seed(CtxSeed(self.0))? {
            out.push(c);
        }
        Ok(out)
    }
}

#[derive(Clone, Copy)]
struct ParamsSeed<'py>(Python<'py>);

impl<'de, 'py> DeserializeSeed<'de> for ParamsSeed<'py> {
    type Value = Option<Params<'py>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'py> Visitor<'de> for ParamsSeed<'py> {
    type Value = Option<Params<'py>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a params object or null")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let py = self.0;
        let mut p = Params::default();
        while let Some(key) = map.next_key::<&str>()? {
            match key {
                "message" => put(&mut p.message, map.next_value_seed(Str(py))?)?,
                "context" => put(&mut p.context, map.next_value_seed(CtxSeed(py))?)?,
                "error" => put(&mut p.error, map.next_value_seed(Str(py))?)?,
                "headers" => {
                    let h = map.next_value_seed(AnyValue(py))?;
                    if !(h.is_none() || h.is_exact_instance_of::<PyDict>()) {
                        return bail();
                    }
                    put(&mut p.headers, h)?
                }
                "url" => put(&mut p.url, map.next_value_seed(Str(py))?)?,
                "remote_addr" => put(&mut p.remote_addr, map.next_value_seed(Str(py))?)?,
                "query" => put(&mut p.query, map.next_value_seed(OptStr(py))?)?,
                "members" => put(&mut p.members, map.next_value_seed(CtxList(py))?)?,
                "complete" => put(&mut p.complete, map.next_value::<bool>()?)?,
                "missing" => put(&mut p.missing, map.next_value_seed(AnyValue(py))?)?,
                "count" => put(&mut p.count, map.next_value_seed(AnyValue(py))?)?,
                "epoch" => put(&mut p.epoch, map.next_value_seed(AnyValue(py))?)?,
                "offset" => put(&mut p.offset, map.next_value_seed(AnyValue(py))?)?,
                "messages" => put(&mut p.messages, map.next_value_seed(AnyValue(py))?)?,
                _ => {
                    map.next_value_seed(Skip)?;
                }
            }
        }
        Ok(Some(p))
    }
}

struct Frame<'py> {
    action: Option<Action>,
    request_id: Option<Option<Bound<'py, PyString>>>,
    seq: Option<Option<u64>>,
    redelivered: Option<bool>,
    params: Option<Option<Params<'py>>>,
}

/// A `seq`: `null` (none) or a positive integer; anything else bails out (Python logs it).
struct SeqSeed;

impl<'de> DeserializeSeed<'de> for SeqSeed {
    type Value = Option<u64>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for SeqSeed {
    type Value = Option<u64>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a positive integer or null")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        if v == 0 {
            return bail();
        }
        Ok(Some(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

#[derive(Clone, Copy)]
struct FrameSeed<'py>(Python<'py>);

impl<'de, 'py> DeserializeSeed<'de> for FrameSeed<'py> {
    type Value = Frame<'py>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, 'py> Visitor<'de> for FrameSeed<'py> {
    type Value = Frame<'py>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a frame object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let py = self.0;
        let mut fr = Frame { action: None, request_id: None, seq: None, redelivered: None, params: None };
        while let Some(key) = map.next_key::<&str>()? {
            match key {
                "action" => {
                    let action = Action::from_str(map.next_value::<&str>()?);
                    put(&mut fr.action, action.ok_or_else(|| de::Error::custom("unknown action"))?)?
                }
                "request_id" => put(&mut fr.request_id, map.next_value_seed(OptStr(py))?)?,
                "seq" => put(&mut fr.seq, map.next_value_seed(SeqSeed)?)?,
                "redelivered" => put(&mut fr.redelivered, map.next_value_seed(Skip)?)?,
                "params" => put(&mut fr.params, map.next_value_seed(ParamsSeed(py))?)?,
                _ => {
                    map.next_value_seed(Skip)?;
                }
            }
        }
        Ok(fr)
    }
}

fn parse<'py>(py: Python<'py>, line: &[u8]) -> DeResult<Frame<'py>> {
    let mut de = serde_json::Deserializer::from_slice(line);
    let frame = FrameSeed(py).deserialize(&mut de)?;
    de.end()?;
    Ok(frame)
}

// ------------------------------------------------------------------------- Python objects

/// The Python classes and functions the decoder builds with and falls back to.
struct Refs {
    object_new: Py<PyAny>,
    context: Py<PyAny>,
    request_from_wire: Py<PyAny>,
    new_message: Py<PyAny>,
    new_connection: Py<PyAny>,
    disconnected: Py<PyAny>,
    error_event: Py<PyAny>,
    connection_request: Py<PyAny>,
    skipped: Py<PyAny>,
    query_reply: Py<PyAny>,
    heartbeat: Py<PyAny>,
    fallback: Py<PyAny>,
    warn_dropped: Py<PyAny>,
}

impl Refs {
    fn load(py: Python<'_>, fallback: Option<Py<PyAny>>) -> PyResult<Refs> {
        let protocol = py.import("pystrands._protocol")?;
        let context = py.import("pystrands.context")?;
        let get = |name: &str| -> PyResult<Py<PyAny>> { Ok(protocol.getattr(name)?.unbind()) };
        Ok(Refs {
            object_new: py.import("builtins")?.getattr("object")?.getattr("__new__")?.unbind(),
            context: context.getattr("Context")?.unbind(),
            request_from_wire: context.getattr("ConnectionRequestContext")?.getattr("_from_wire")?.unbind(),
            new_message: get("NewMessage")?,
            new_connection: get("NewConnection")?,
            disconnected: get("Disconnected")?,
            error_event: get("ErrorEvent")?,
            connection_request: get("ConnectionRequest")?,
            skipped: get("Skipped")?,
            query_reply: get("QueryReply")?,
            heartbeat: get("HEARTBEAT")?,
            fallback: match fallback {
                Some(f) => f,
                None => get("decode_event")?,
            },
            warn_dropped: get("_warn_dropped_line")?,
        })
    }

    fn blank<'py>(&self, py: Python<'py>, cls: &Py<PyAny>) -> PyResult<Bound<'py, PyAny>> {
        self.object_new.bind(py).call1((cls.bind(py),))
    }

    /// A `Context` as `Context(client_id, room_id, metadata, user_id)` builds it.
    fn context<'py>(&self, py: Python<'py>, c: Option<Ctx<'py>>) -> PyResult<Bound<'py, PyAny>> {
        let (client_id, room_id, metadata, user_id) = match c {
            Some(c) => (c.client_id, c.room_id, c.metadata, c.user_id.flatten()),
            None => (None, None, None, None),
        };
        let empty = || PyString::new(py, "");
        let ctx = self.blank(py, &self.context)?;
        ctx.setattr(intern!(py, "client_id"), client_id.unwrap_or_else(empty))?;
        ctx.setattr(intern!(py, "room_id"), room_id.unwrap_or_else(empty))?;
        let metadata = match metadata {
            Some(m) if !m.is_none() => m,
            _ => PyDict::new(py).into_any(),
        };
        ctx.setattr(intern!(py, "metadata"), metadata)?;
        // The slot behind `Context.user_id` (unset reads as None), set only when there is one.
        if let Some(u) = user_id {
            ctx.setattr(intern!(py, "_user_id"), u)?;
        }
        Ok(ctx)
    }

    /// An event with a context, as its `__init__` builds it (`key` = the client id, `seq` 0).
    fn event<'py>(
        &self,
        py: Python<'py>,
        cls: &Py<PyAny>,
        ctx: &Bound<'py, PyAny>,
        field: Option<(&Bound<'py, PyString>, Bound<'py, PyString>)>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ev = self.blank(py, cls)?;
        ev.setattr(intern!(py, "key"), ctx.getattr(intern!(py, "client_id"))?)?;
        ev.setattr(intern!(py, "seq"), 0)?;
        if let Some((name, value)) = field {
            ev.setattr(name, value)?;
        }
        ev.setattr(intern!(py, "context"), ctx)?;
        Ok(ev)
    }

    /// The event of a parsed frame, or `None` when the reference must decide.
    fn build<'py>(&self, py: Python<'py>, fr: Frame<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Some(action) = fr.action else { return Ok(None) };
        let seq = fr.seq.flatten();
        let mut p = fr.params.flatten().unwrap_or_default();
        let ev = match action {
            Action::Heartbeat => {
                return Ok(Some(match seq {
                    None => self.heartbeat.bind(py).clone(),
                    Some(s) => self.skipped.bind(py).call1((s,))?,
                }))
            }
            // Once per connection, and its answer grows with the protocol: the reference
            // decoder reads it.
            Action::Hello => return Ok(None),
            Action::Reply => {
                // As `decode_event` builds it: the known keys, members as `Context`s.
                let Some(Some(request_id)) = fr.request_id else { return Ok(None) };
                if seq.is_some() {
                    return Ok(None);
                }
                let params = PyDict::new(py);
                if let Some(members) = p.members.take() {
                    let list = PyList::empty(py);
                    for c in members {
                        list.append(self.context(py, Some(c))?)?;
                    }
                    params.set_item(intern!(py, "members"), list)?;
                }
                if let Some(complete) = p.complete {
                    params.set_item(intern!(py, "complete"), complete)?;
                }
                if let Some(missing) = p.missing.take() {
                    params.set_item(intern!(py, "missing"), missing)?;
                }
                if let Some(count) = p.count.take() {
                    params.set_item(intern!(py, "count"), count)?;
                }
                if let Some(error) = p.error.take() {
                    params.set_item(intern!(py, "error"), error)?;
                }
                for (key, value) in
                    [("epoch", p.epoch.take()), ("offset", p.offset.take()), ("messages", p.messages.take())]
                {
                    if let Some(v) = value {
                        params.set_item(key, v)?;
                    }
                }
                return Ok(Some(self.query_reply.bind(py).call1((request_id, params))?));
            }
            Action::ConnectionRequest => {
                let Some(Some(request_id)) = fr.request_id else { return Ok(None) };
                let headers = p.headers.unwrap_or_else(|| py.None().into_bound(py));
                let empty = || PyString::new(py, "");
                let request = self.request_from_wire.bind(py).call1((
                    headers,
                    p.url.unwrap_or_else(empty),
                    p.remote_addr.unwrap_or_else(empty),
                    p.query.flatten().unwrap_or_else(empty),
                ))?;
                return Ok(Some(self.connection_request.bind(py).call1((request_id, request))?));
            }
            Action::NewMessage => {
                let (Some(message), Some(c)) = (p.message.take(), p.context.take()) else { return Ok(None) };
                let ctx = self.context(py, Some(c))?;
                self.event(py, &self.new_message, &ctx, Some((intern!(py, "message"), message)))?
            }
            Action::NewConnection | Action::Disconnected => {
                let Some(c) = p.context.take() else { return Ok(None) };
                let ctx = self.context(py, Some(c))?;
                let cls = if action == Action::NewConnection { &self.new_connection } else { &self.disconnected };
                self.event(py, cls, &ctx, None)?
            }
            Action::Error => {
                let ctx = self.context(py, p.context.take())?;
                let error = p.error.take().unwrap_or_else(|| PyString::new(py, ""));
                self.event(py, &self.error_event, &ctx, Some((intern!(py, "error"), error)))?
            }
        };
        if let Some(s) = seq {
            ev.setattr(intern!(py, "seq"), s)?;
            let ctx = ev.getattr(intern!(py, "context"))?;
            let rid = match fr.request_id.flatten() {
                Some(r) => r.into_any(),
                None => py.None().into_bound(py),
            };
            ctx.setattr(intern!(py, "_event_id"), rid)?;
            ctx.setattr(intern!(py, "_redelivered"), fr.redelivered.unwrap_or(false))?;
        }
        Ok(Some(ev))
    }
}

// ------------------------------------------------------------------------------ the decoder

/// Native framing + decoding of the broker -> backend stream (see the module comment).
///
/// `LineDecoder(max_line_size=64 MiB, decode_fallback=None)`; `feed(data)` frames `data` and
/// returns the decoder itself, an iterator over the events of the lines it completed (decoded
/// lazily, in order; lines decoding to nothing are skipped). Feeding again drops what was not
/// iterated.
#[pyclass(module = "pystrands._core")]
pub struct LineDecoder {
    #[pyo3(get)]
    max_line_size: usize,
    #[pyo3(get)]
    dropped_lines: u64,
    /// Lines handed to the Python decoder.
    #[pyo3(get)]
    fallbacks: u64,
    buf: Vec<u8>,
    discarding: bool,
    data: Vec<u8>,
    lines: Vec<(usize, usize)>,
    next: usize,
    refs: Refs,
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))
}

impl LineDecoder {
    /// `LineFramer.feed` step by step: fills `data`/`lines`, returns the sizes of dropped lines.
    fn frame(&mut self, input: &[u8]) -> Vec<usize> {
        let mut drops = Vec::new();
        self.data.clear();
        self.lines.clear();
        self.next = 0;
        let mut input = input;
        if self.discarding {
            match memchr::memchr(b'\n', input) {
                None => return drops,
                Some(nl) => {
                    self.discarding = false;
                    input = &input[nl + 1..];
                }
            }
        }
        let limit = self.max_line_size;
        if !self.buf.is_empty() {
            if memchr::memchr(b'\n', input).is_none() {
                self.buf.extend_from_slice(input);
                if self.buf.len() > limit + 1 {
                    self.overflow(&mut drops);
                }
                return drops;
            }
            std::mem::swap(&mut self.data, &mut self.buf);
        }
        self.data.extend_from_slice(input);
        let end = match memchr::memrchr(b'\n', &self.data) {
            Some(nl) => nl + 1,
            None => 0,
        };
        if end < self.data.len() {
            self.buf.extend_from_slice(&self.data[end..]);
            if self.buf.len() > limit + 1 {
                self.overflow(&mut drops);
            }
        }
        let data = &self.data;
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', &data[..end]) {
            let mut stop = nl;
            if stop > start && data[stop - 1] == b'\r' {
                stop -= 1;
            }
            if stop - start > limit {
                self.dropped_lines += 1;
                drops.push(stop - start);
            } else if !is_blank(&data[start..stop]) {
                self.lines.push((start, stop));
            }
            start = nl + 1;
        }
        drops
    }

    fn overflow(&mut self, drops: &mut Vec<usize>) {
        self.dropped_lines += 1;
        drops.push(self.buf.len());
        self.buf.clear();
        self.discarding = true;
    }
}

#[pymethods]
impl LineDecoder {
    #[new]
    #[pyo3(signature = (max_line_size = 64 * 1024 * 1024, decode_fallback = None))]
    fn new(py: Python<'_>, max_line_size: i64, decode_fallback: Option<Py<PyAny>>) -> PyResult<Self> {
        if max_line_size <= 0 {
            return Err(PyValueError::new_err("max_line_size must be positive"));
        }
        Ok(LineDecoder {
            max_line_size: max_line_size as usize,
            dropped_lines: 0,
            fallbacks: 0,
            buf: Vec::new(),
            discarding: false,
            data: Vec::new(),
            lines: Vec::new(),
            next: 0,
            refs: Refs::load(py, decode_fallback)?,
        })
    }

    /// Number of bytes held for an incomplete line.
    #[getter]
    fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Drops any partial line and any line not yet iterated.
    fn reset(&mut self) {
        self.buf.clear();
        self.discarding = false;
        self.data.clear();
        self.lines.clear();
        self.next = 0;
    }

    /// Frames `data` (bytes-like) and returns the iterator over the events of its complete lines.
    fn feed<'py>(slf: &Bound<'py, Self>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, Self>> {
        let py = slf.py();
        let owned;
        let bytes: &[u8] = match data.cast::<PyBytes>() {
            Ok(b) => b.as_bytes(),
            Err(_) => {
                owned = py.get_type::<PyBytes>().call1((data,)).map_err(|_| {
                    PyTypeError::new_err(format!("expected a bytes-like object, not {}", data.get_type()))
                })?;
                owned.cast::<PyBytes>()?.as_bytes()
            }
        };
        let (drops, warn, limit) = {
            let mut me = slf.borrow_mut();
            let drops = me.frame(bytes);
            (drops, me.refs.warn_dropped.clone_ref(py), me.max_line_size)
        };
        for size in drops {
            warn.bind(py).call1((size, limit))?;
        }
        Ok(slf.clone())
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(slf: &Bound<'py, Self>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let py = slf.py();
        loop {
            let mut me = slf.borrow_mut();
            let Some(&(start, stop)) = me.lines.get(me.next) else { return Ok(None) };
            me.next += 1;
            let line = &me.data[start..stop];
            if let Ok(frame) = parse(py, line) {
                if let Ok(Some(event)) = me.refs.build(py, frame) {
                    return Ok(Some(event));
                }
            }
            let raw = PyBytes::new(py, line);
            me.fallbacks += 1;
            let fallback = me.refs.fallback.clone_ref(py);
            drop(me); // the reference decoder logs: let handlers see this object unborrowed
            let event = fallback.bind(py).call1((raw,))?;
            if !event.is_none() {
                return Ok(Some(event));
            }
        }
    }
}
