//! Fuzzes the WebSocket port's request-head parser, `http::parse_request`, and
//! `http::read_request` reading the same bytes in chunks of every size: it is the first code that
//! reads bytes from anyone who can reach the port (before any backend is asked), so whatever
//! arrives must become an upgrade, a plain `GET` or an HTTP refusal, never a panic, and reading
//! the head from a stream must agree with parsing it whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pystrands_core::fuzzing::{self, HttpHead, HTTP_MAX_HEAD};

/// Checks what a head parsed to (`read`: by `read_request`, which may also close without an
/// answer, status 0, when the stream ends before the head does).
fn check(head: &HttpHead, read: bool) {
    match head {
        HttpHead::Refused(0) => assert!(read, "parse_request refused with status 0"),
        HttpHead::Refused(status) => {
            assert!(matches!(status, 400 | 405 | 426 | 431), "unexpected status {status}");
            let answer = fuzzing::http_error_response(*status, "refused");
            assert!(answer.starts_with(format!("HTTP/1.1 {status} ").as_bytes()));
        }
        HttpHead::Get { path, bearer } => {
            assert!(!path.contains('?'), "query left in the path {path:?}");
            if let Some(b) = bearer {
                assert_eq!(b.trim(), b, "bearer token not trimmed");
            }
        }
        HttpHead::Upgrade { path, key, headers, origin, .. } => {
            assert!(!path.contains('?'), "query left in the path {path:?}");
            assert!(key.len() == 24 && key.ends_with("=="), "bad key {key:?} accepted");
            assert!(!headers.is_empty());
            for (_, v) in headers {
                assert_eq!(v.trim(), v, "header value not trimmed");
            }
            if let Some(o) = origin {
                assert!(headers.iter().any(|(n, v)| n.eq_ignore_ascii_case("origin") && v == o));
            }
            let answer = fuzzing::http_switching_protocols(key, Some("pystrands.1"));
            assert!(answer.starts_with(b"HTTP/1.1 101 ") && answer.ends_with(b"\r\n\r\n"));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks how many bytes each read returns (1..=128, or 256..=32768); the rest
    // is what the client sent.
    let Some((&first, sent)) = data.split_first() else { return };
    let chunk = if first < 128 { first as usize + 1 } else { (first as usize - 127) * 256 };

    let whole = fuzzing::http_parse_request(sent);
    check(&whole, false);

    let Some((read, leftover)) = fuzzing::http_read_request(sent, chunk) else { return };
    check(&read, true);
    let end = memchr_crlfcrlf(sent).map(|pos| pos + 4);
    match end {
        Some(end) if end <= HTTP_MAX_HEAD => {
            assert_eq!(read, fuzzing::http_parse_request(&sent[..end]), "read_request and parse_request disagree");
            if !matches!(read, HttpHead::Refused(_)) {
                // What was read past the head is exactly the bytes that follow it.
                assert!(leftover.len() <= sent.len() - end);
                assert_eq!(&leftover[..], &sent[end..end + leftover.len()]);
            }
        }
        Some(_) => assert_eq!(read, HttpHead::Refused(431)),
        None if sent.len() > HTTP_MAX_HEAD => assert_eq!(read, HttpHead::Refused(431)),
        None => assert_eq!(read, HttpHead::Refused(0), "a head without its blank line was used"),
    }
});

fn memchr_crlfcrlf(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n")
}
