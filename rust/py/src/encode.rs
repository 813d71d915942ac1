//! The native encoder of the backend clients' three sends (`message_to_room`,
//! `message_to_connection`, `broadcast`): an optional accelerator of
//! `pystrands._protocol.encode_room_message` / `encode_private_message` / `encode_broadcast`.
//!
//! Why it exists: a handler's send is the other half of a backend's per-message cost (after
//! decoding the event): two dicts, a JSON dump and a concatenation in Python. Here it is one call
//! that writes the line straight into a new `bytes`, byte for byte what the Python encoder writes
//! (compact JSON, same key order, same escapes; `tests/test_codec_native.py` compares both). Only
//! plain `str` arguments take this path; anything else is handed to the Python encoder, so odd
//! input behaves exactly as the reference does. Request ids come from a native counter (the
//! broker does not use the ids of sends; they only need to differ).

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Appends `s` as a JSON string (the escapes orjson and serde_json agree on).
fn push_str(buf: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, s);
}

/// The line, or `None` when an argument is not a plain `str` (or not encodable as UTF-8).
fn line(action: &str, fields: &[(&str, &Bound<'_, PyAny>)], request_id: Option<&str>) -> Option<Vec<u8>> {
    let mut texts = Vec::with_capacity(fields.len());
    for (_, v) in fields {
        if !v.is_exact_instance_of::<PyString>() {
            return None;
        }
        texts.push(v.cast::<PyString>().ok()?.to_str().ok()?);
    }
    let mut buf = Vec::with_capacity(64 + texts.iter().map(|t| t.len()).sum::<usize>());
    buf.extend_from_slice(b"{\"request_id\":");
    match request_id {
        Some(id) => push_str(&mut buf, id),
        None => {
            buf.push(b'"');
            buf.extend_from_slice(NEXT_ID.fetch_add(1, Ordering::Relaxed).to_string().as_bytes());
            buf.push(b'"');
        }
    }
    buf.extend_from_slice(b",\"action\":\"");
    buf.extend_from_slice(action.as_bytes());
    buf.extend_from_slice(b"\",\"params\":{");
    for (i, ((key, _), text)) in fields.iter().zip(texts).enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        buf.push(b'"');
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(b"\":");
        push_str(&mut buf, text);
    }
    buf.extend_from_slice(b"}}\n");
    Some(buf)
}

/// The native line, or the Python encoder `name`'s answer for anything unusual.
fn encode<'py>(
    py: Python<'py>,
    name: &str,
    action: &str,
    fields: &[(&str, &Bound<'py, PyAny>)],
    request_id: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    if let Some(buf) = line(action, fields, request_id) {
        return Ok(PyBytes::new(py, &buf).into_any());
    }
    let fallback = py.import("pystrands._protocol")?.getattr(name)?;
    let mut args: Vec<Bound<'py, PyAny>> = fields.iter().map(|(_, v)| (*v).clone()).collect();
    if let Some(id) = request_id {
        args.push(PyString::new(py, id).into_any());
    }
    fallback.call1(pyo3::types::PyTuple::new(py, args)?)
}

/// `{"request_id":…,"action":"message_to_room","params":{"room_id":…,"message":…}}` + newline.
#[pyfunction]
#[pyo3(signature = (room_id, message, request_id = None))]
pub(crate) fn encode_room_message<'py>(
    py: Python<'py>,
    room_id: &Bound<'py, PyAny>,
    message: &Bound<'py, PyAny>,
    request_id: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    encode(py, "encode_room_message", "message_to_room", &[("room_id", room_id), ("message", message)], request_id)
}

/// `{"request_id":…,"action":"message_to_connection","params":{"conn_id":…,"message":…}}` + newline.
#[pyfunction]
#[pyo3(signature = (client_id, message, request_id = None))]
pub(crate) fn encode_private_message<'py>(
    py: Python<'py>,
    client_id: &Bound<'py, PyAny>,
    message: &Bound<'py, PyAny>,
    request_id: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    encode(
        py,
        "encode_private_message",
        "message_to_connection",
        &[("conn_id", client_id), ("message", message)],
        request_id,
    )
}

/// `{"request_id":…,"action":"broadcast","params":{"message":…}}` + newline.
#[pyfunction]
#[pyo3(signature = (message, request_id = None))]
pub(crate) fn encode_broadcast<'py>(
    py: Python<'py>,
    message: &Bound<'py, PyAny>,
    request_id: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    encode(py, "encode_broadcast", "broadcast", &[("message", message)], request_id)
}
