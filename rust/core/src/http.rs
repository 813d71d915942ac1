//! The HTTP side of the WebSocket port, done by hand because the broker must ask a backend
//! (asynchronously) before deciding whether to upgrade: read and check a request head under a
//! size and time limit, then answer `101 Switching Protocols` or a plain HTTP error
//! (400/403/405/426/431/503) without ever upgrading a refused connection. A plain `GET` (no
//! upgrade) is handed on as such, for the operator routes (`crate::metrics`); the same parser
//! reads the requests of the separate metrics listener.

use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Largest request head accepted (request line + headers).
pub(crate) const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 100;

/// A checked WebSocket upgrade request.
#[derive(Debug, Clone)]
pub(crate) struct UpgradeRequest {
    pub(crate) path: String,
    pub(crate) query: String,
    /// Header names as sent, in order.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) key: String,
    pub(crate) origin: Option<String>,
}

/// A request head: a WebSocket upgrade, or a plain `GET`.
#[derive(Debug, Clone)]
pub(crate) enum Head {
    Upgrade(UpgradeRequest),
    Get(PlainGet),
}

/// A plain `GET`: what the operator routes look at.
#[derive(Debug, Clone, Default)]
pub(crate) struct PlainGet {
    /// The path, without the query string.
    pub(crate) path: String,
    /// The token of an `Authorization: Bearer <token>` header.
    pub(crate) bearer: Option<String>,
}

/// Why a request was not upgraded; `status` is the HTTP status to answer with (0: say nothing).
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) reason: String,
}

fn refuse(status: u16, reason: impl Into<String>) -> Refusal {
    Refusal { status, reason: reason.into() }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Reads the request head; returns the request and any bytes read past it.
pub(crate) async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<(Head, Vec<u8>), Refusal> {
    // Read straight into one growing buffer: no fixed-size chunk lives in the connection's future.
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let read = async {
        loop {
            if buf.capacity() - buf.len() < 512 {
                buf.reserve(1024);
            }
            let from = buf.len().saturating_sub(3);
            let n = stream.read_buf(&mut buf).await.map_err(|e| refuse(0, format!("read error: {e}")))?;
            if n == 0 {
                return Err(refuse(0, "connection closed during handshake"));
            }
            if let Some(pos) = memchr::memmem::find(&buf[from..], b"\r\n\r\n") {
                return Ok(from + pos + 4);
            }
            if buf.len() > MAX_HEAD {
                return Err(refuse(431, "request header fields too large"));
            }
        }
    };
    let head_len = tokio::time::timeout(timeout, read).await.map_err(|_| refuse(408, "handshake timed out"))??;
    if head_len > MAX_HEAD {
        return Err(refuse(431, "request header fields too large"));
    }
    let leftover = buf.split_off(head_len);
    let req = parse_request(&buf)?;
    Ok((req, leftover))
}

/// Parses and checks a complete request head.
pub(crate) fn parse_request(head: &[u8]) -> Result<Head, Refusal> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut raw);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(refuse(400, "incomplete request")),
        Err(httparse::Error::TooManyHeaders) => return Err(refuse(431, "too many headers")),
        Err(e) => return Err(refuse(400, format!("malformed request: {e}"))),
    }
    let method = parsed.method.unwrap_or("");
    let target = parsed.path.unwrap_or("/");
    let mut headers = Vec::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| refuse(400, format!("header {} is not UTF-8", h.name)))?;
        headers.push((h.name.to_string(), value.trim().to_string()));
    }
    if method != "GET" {
        return Err(refuse(405, "only GET can be upgraded to a WebSocket"));
    }
    let wants_upgrade = header(&headers, "upgrade").is_some() || has_token(header(&headers, "connection"), "upgrade");
    if !wants_upgrade {
        // A plain GET (HTTP/1.0 too: load balancers' checks): the caller decides.
        let path = target.split_once('?').map_or(target, |(p, _)| p);
        let bearer = header(&headers, "authorization")
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim().to_string());
        return Ok(Head::Get(PlainGet { path: path.to_string(), bearer }));
    }
    if parsed.version != Some(1) {
        return Err(refuse(400, "HTTP/1.1 is required"));
    }
    if !has_token(header(&headers, "upgrade"), "websocket") || !has_token(header(&headers, "connection"), "upgrade") {
        return Err(refuse(426, "this is a WebSocket endpoint: send an Upgrade: websocket request"));
    }
    if header(&headers, "sec-websocket-version") != Some("13") {
        return Err(refuse(426, "Sec-WebSocket-Version 13 is required"));
    }
    let key = match header(&headers, "sec-websocket-key") {
        Some(k) if k.len() == 24 && k.ends_with("==") => k.to_string(),
        _ => return Err(refuse(400, "missing or invalid Sec-WebSocket-Key")),
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };
    let origin = header(&headers, "origin").map(str::to_string);
    Ok(Head::Upgrade(UpgradeRequest { path: path.to_string(), query: query.to_string(), headers, key, origin }))
}

/// What a plain `GET` that is no route gets on the WebSocket port (as before the routes existed).
pub(crate) fn not_an_upgrade() -> Refusal {
    refuse(426, "this is a WebSocket endpoint: send an Upgrade: websocket request")
}

/// A complete `200`/`503`/`404` answer with a body, closing the connection.
pub(crate) fn response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    response_with(status, content_type, body, "Cache-Control: no-store\r\n")
}

/// [`response`] with other headers (`extra`: complete lines, each ending in CRLF) in place of
/// `Cache-Control: no-store`.
pub(crate) fn response_with(status: u16, content_type: &str, body: &[u8], extra: &str) -> Vec<u8> {
    let phrase = match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}\
         Referrer-Policy: no-referrer\r\nX-Frame-Options: DENY\r\nX-Content-Type-Options: nosniff\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The `101 Switching Protocols` answer.
pub(crate) fn switching_protocols(key: &str, protocol: Option<&str>) -> Vec<u8> {
    let protocol = protocol.map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n")).unwrap_or_default();
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{protocol}\r\n",
        derive_accept_key(key.as_bytes())
    )
    .into_bytes()
}

/// A plain-text HTTP error answer that closes the connection.
pub(crate) fn error_response(status: u16, body: &str) -> Vec<u8> {
    let phrase = match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let extra = if status == 426 { "Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n" } else { "" };
    let body = format!("{body}\n");
    format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /ws/chat?room=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Token: secret\r\n\r\n";

    #[test]
    fn parses_a_good_upgrade() {
        let Head::Upgrade(r) = parse_request(GOOD.as_bytes()).unwrap() else { panic!("not an upgrade") };
        assert_eq!(r.path, "/ws/chat");
        assert_eq!(r.query, "room=1");
        assert!(r.headers.iter().any(|(n, v)| n == "X-Token" && v == "secret"));
        let resp = String::from_utf8(switching_protocols(&r.key, None)).unwrap();
        // RFC 6455's worked example.
        assert!(resp.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    }

    #[test]
    fn refuses_what_is_not_an_upgrade() {
        let plain = "GET /health?x=1 HTTP/1.0\r\nHost: x\r\n\r\n";
        assert!(
            matches!(parse_request(plain.as_bytes()).unwrap(), Head::Get(g) if g.path == "/health" && g.bearer.is_none())
        );
        let admin = "GET /admin/stats?x HTTP/1.1\r\nAuthorization: BEARER s3cret \r\n\r\n";
        let Head::Get(g) = parse_request(admin.as_bytes()).unwrap() else { panic!("not a plain GET") };
        assert_eq!((g.path.as_str(), g.bearer.as_deref()), ("/admin/stats", Some("s3cret")));
        let basic = "GET /admin/stats HTTP/1.1\r\nAuthorization: Basic eDp5\r\n\r\n";
        assert!(matches!(parse_request(basic.as_bytes()).unwrap(), Head::Get(g) if g.bearer.is_none()));
        let half = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n\r\n";
        assert_eq!(parse_request(half.as_bytes()).unwrap_err().status, 426);
        let post = GOOD.replacen("GET", "POST", 1);
        assert_eq!(parse_request(post.as_bytes()).unwrap_err().status, 405);
        let v8 = GOOD.replace("Version: 13", "Version: 8");
        assert_eq!(parse_request(v8.as_bytes()).unwrap_err().status, 426);
        let nokey = GOOD.replace("Sec-WebSocket-Key", "X-Other");
        assert_eq!(parse_request(nokey.as_bytes()).unwrap_err().status, 400);
        assert_eq!(parse_request(b"\x00\x01garbage\r\n\r\n").unwrap_err().status, 400);
    }

    #[tokio::test]
    async fn oversized_and_leftover() {
        let mut big = String::from("GET / HTTP/1.1\r\n");
        while big.len() < MAX_HEAD + 10 {
            big.push_str("X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let mut s = big.as_bytes();
        assert_eq!(read_request(&mut s, Duration::from_secs(1)).await.unwrap_err().status, 431);
        let mut with_extra = GOOD.as_bytes().to_vec();
        with_extra.extend_from_slice(b"\x81\x00");
        let mut s = &with_extra[..];
        let (_, left) = read_request(&mut s, Duration::from_secs(1)).await.unwrap();
        assert_eq!(left, b"\x81\x00");
    }
}
