//! Exists only so the fuzz targets in `fuzz/` (cargo-fuzz, see `scripts/fuzz.sh`) can reach the
//! broker's private parsers; not a public API: hidden from the docs, and free to change with them.
//!
//! Each wrapper calls one parser and hands back plain owned values (or `None` / a status for a
//! refusal), so a fuzz target can check invariants without seeing the crate's own types. The
//! wrappers never panic on their own: a panic under fuzzing is the parser's.

use crate::cluster::envelope;
use crate::http;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, ReadBuf};

/// What `http::parse_request` (or `http::read_request`) made of a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpHead {
    /// A checked WebSocket upgrade.
    Upgrade { path: String, query: String, headers: Vec<(String, String)>, key: String, origin: Option<String> },
    /// A plain `GET`.
    Get { path: String, bearer: Option<String> },
    /// Refused: the HTTP status it would be answered with (0: close without answering).
    Refused(u16),
}

fn head(parsed: Result<http::Head, http::Refusal>) -> HttpHead {
    match parsed {
        Ok(http::Head::Upgrade(u)) => {
            HttpHead::Upgrade { path: u.path, query: u.query, headers: u.headers, key: u.key, origin: u.origin }
        }
        Ok(http::Head::Get(g)) => HttpHead::Get { path: g.path, bearer: g.bearer },
        Err(r) => HttpHead::Refused(r.status),
    }
}

/// `http::parse_request` on a complete head.
pub fn http_parse_request(bytes: &[u8]) -> HttpHead {
    head(http::parse_request(bytes))
}

/// The largest request head `http::read_request` accepts.
pub const HTTP_MAX_HEAD: usize = http::MAX_HEAD;

/// `http::switching_protocols`: the `101` answer to an upgrade with this key.
pub fn http_switching_protocols(key: &str, protocol: Option<&str>) -> Vec<u8> {
    http::switching_protocols(key, protocol)
}

/// `http::error_response`: the answer to a refused request.
pub fn http_error_response(status: u16, body: &str) -> Vec<u8> {
    http::error_response(status, body)
}

/// An in-memory stream that hands out `bytes` at most `chunk` bytes per read (then end of stream).
pub struct ChunkedReader<'a> {
    bytes: &'a [u8],
    chunk: usize,
}

impl<'a> ChunkedReader<'a> {
    pub fn new(bytes: &'a [u8], chunk: usize) -> Self {
        ChunkedReader { bytes, chunk: chunk.max(1) }
    }
}

impl AsyncRead for ChunkedReader<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let n = self.bytes.len().min(self.chunk).min(buf.remaining());
        let (now, later) = self.bytes.split_at(n);
        buf.put_slice(now);
        self.bytes = later;
        Poll::Ready(Ok(()))
    }
}

thread_local! {
    /// One small runtime per fuzzing thread (a runtime per input would dominate the time taken).
    static RUNTIME: Option<tokio::runtime::Runtime> =
        tokio::runtime::Builder::new_current_thread().enable_time().build().ok();
}

/// Runs `fut` to completion on this thread's runtime; `None` if none could be built.
pub fn block_on<F: std::future::Future>(fut: F) -> Option<F::Output> {
    RUNTIME.with(|rt| rt.as_ref().map(|rt| rt.block_on(fut)))
}

/// `http::read_request` over `bytes` arriving `chunk` bytes per read: the head, and the bytes it
/// read past the head (`None` if no runtime could be built).
pub fn http_read_request(bytes: &[u8], chunk: usize) -> Option<(HttpHead, Vec<u8>)> {
    block_on(async {
        let mut stream = ChunkedReader::new(bytes, chunk);
        match http::read_request(&mut stream, Duration::from_secs(3600)).await {
            Ok((h, leftover)) => (head(Ok(h)), leftover),
            Err(r) => (HttpHead::Refused(r.status), Vec::new()),
        }
    })
}

/// One record of the cluster envelope, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeRecord {
    /// The kind's byte on the wire (`R`, `X`, `P`...).
    pub kind: u8,
    pub target: String,
    pub body: Vec<u8>,
}

/// A decoded envelope payload: the header, and the records (`Err` with the decoder's reason
/// when they are malformed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopePayload {
    pub origin: String,
    pub first_seq: u64,
    pub count: u32,
    pub records: Result<Vec<EnvelopeRecord>, &'static str>,
}

/// The kind's byte, as `encode_record` writes it.
fn kind_byte(kind: envelope::Kind) -> u8 {
    envelope::encode_record(kind, "", b"").first().copied().unwrap_or(0)
}

/// The kind of a kind byte, as `decode_record` reads it (`None`: unknown).
fn kind_of(byte: u8) -> Option<envelope::Kind> {
    envelope::decode_record(&[byte, 0, 0, 0, 0, 0, 0, 0, 0]).ok().map(|r| r.kind)
}

fn record(r: envelope::Record<'_>) -> EnvelopeRecord {
    EnvelopeRecord { kind: kind_byte(r.kind), target: r.target.to_owned(), body: r.body.to_vec() }
}

/// The kind bytes the envelope knows.
pub fn envelope_kinds() -> Vec<u8> {
    (0..=u8::MAX).filter(|b| kind_of(*b).is_some()).collect()
}

/// `envelope::decode_payload`, then its records.
pub fn envelope_decode_payload(bytes: &[u8]) -> Result<EnvelopePayload, &'static str> {
    let p = envelope::decode_payload(bytes)?;
    let records = p.records().map(|rs| rs.into_iter().map(record).collect());
    Ok(EnvelopePayload { origin: p.origin.to_owned(), first_seq: p.first_seq, count: p.count, records })
}

/// `envelope::decode_record`.
pub fn envelope_decode_record(bytes: &[u8]) -> Result<EnvelopeRecord, &'static str> {
    envelope::decode_record(bytes).map(record)
}

/// `envelope::encode_record`; `None` for a kind byte the envelope does not know.
pub fn envelope_encode_record(kind: u8, target: &str, body: &[u8]) -> Option<Vec<u8>> {
    let kind = kind_of(kind)?;
    Some(envelope::encode_record(kind, target, body).to_vec())
}

/// `envelope::encode_payload`; `None` for an origin over 255 bytes (node ids are validated to
/// 64 bytes before they get there).
pub fn envelope_encode_payload(origin: &str, first_seq: u64, records: &[Vec<u8>]) -> Option<Vec<u8>> {
    if origin.len() > 255 {
        return None;
    }
    let records: Vec<bytes::Bytes> = records.iter().map(|r| bytes::Bytes::copy_from_slice(r)).collect();
    Some(envelope::encode_payload(origin, first_seq, &records))
}

/// `envelope::decode_except_body`: the excluded ids and the message.
pub fn envelope_decode_except_body(body: &[u8]) -> Result<(Vec<String>, String), &'static str> {
    envelope::decode_except_body(body).map(|(ids, m)| (ids, m.to_owned()))
}

pub fn envelope_encode_except_body(exclude: &[String], message: &str) -> Vec<u8> {
    envelope::encode_except_body(exclude, message)
}

/// `envelope::decode_kick_body`: the close code and reason.
pub fn envelope_decode_kick_body(body: &[u8]) -> Result<(u16, String), &'static str> {
    envelope::decode_kick_body(body).map(|(code, reason)| (code, reason.to_owned()))
}

pub fn envelope_encode_kick_body(code: u16, reason: &str) -> Vec<u8> {
    envelope::encode_kick_body(code, reason)
}

/// `envelope::decode_query_body`: the query id and the rest.
pub fn envelope_decode_query_body(body: &[u8]) -> Result<(u64, Vec<u8>), &'static str> {
    envelope::decode_query_body(body).map(|(q, rest)| (q, rest.to_vec()))
}

pub fn envelope_encode_query_body(query: u64, rest: &[u8]) -> Vec<u8> {
    envelope::encode_query_body(query, rest)
}

/// Settings of a [`JwtVerifier`] (the `jwt_*` settings and `max_id_length`).
#[derive(Debug, Clone)]
pub struct JwtSettings {
    pub secret: String,
    pub leeway_secs: u64,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub max_id_length: usize,
}

/// `token::Verifier` built from [`JwtSettings`].
pub struct JwtVerifier {
    verifier: crate::token::Verifier,
}

/// What a token that `token::Verifier::verify` accepted grants, owned.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtGrant {
    pub client_id: Option<String>,
    pub user_id: Option<String>,
    pub room_id: Option<String>,
    pub metadata_is_object: bool,
    pub expires: Option<f64>,
    /// `Grant::remaining` with the verifier's leeway.
    pub remaining: Option<Duration>,
}

/// The longest token `token::Verifier::verify` decodes.
pub const JWT_MAX_TOKEN: usize = crate::token::MAX_TOKEN;

impl JwtVerifier {
    /// `None` when the settings would not pass `Config::validate` (or set no key).
    pub fn new(s: &JwtSettings) -> Option<JwtVerifier> {
        let cfg = crate::Config {
            jwt_secret: Some(s.secret.clone()),
            jwt_leeway: Duration::from_secs(s.leeway_secs),
            jwt_audience: s.audience.clone(),
            jwt_issuer: s.issuer.clone(),
            max_id_length: s.max_id_length,
            ..crate::Config::default()
        };
        cfg.validate().ok()?;
        let verifier = crate::token::Verifier::from_config(&cfg).ok()??;
        Some(JwtVerifier { verifier })
    }

    /// `token::Verifier::verify`: the grant, or why the token is refused.
    pub fn verify(&self, token: &str) -> Result<JwtGrant, String> {
        let g = self.verifier.verify(token)?;
        Ok(JwtGrant {
            remaining: g.remaining(self.verifier.leeway()),
            client_id: g.client_id,
            user_id: g.user_id,
            room_id: g.room_id,
            metadata_is_object: g.metadata.is_object(),
            expires: g.expires,
        })
    }
}

/// `token::from_request`: the token of an upgrade request's query or `Authorization` header.
pub fn jwt_from_request(query: &str, headers: &[(String, String)]) -> Option<String> {
    crate::token::from_request(query, headers).map(str::to_owned)
}
