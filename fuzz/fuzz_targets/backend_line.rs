//! Fuzzes what the broker reads from backends: `protocol::decode_backend_line` on arbitrary bytes
//! (a backend is trusted to route, not to send well-formed JSON: a bad line must be refused with
//! a `DecodeError`, never a panic), and `protocol::LineReader`, which cuts the TCP stream into
//! those lines under a size limit, checked against a plain reference splitter for every read size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pystrands_core::fuzzing::{self, ChunkedReader};
use pystrands_core::protocol::{decode_backend_line, Line, LineReader};

/// What `LineReader` should produce: `Some(line)` for a kept line, `None` for one over the limit.
fn reference(data: &[u8], max_line: usize) -> Vec<Option<&[u8]>> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
        let mut line = &rest[..nl];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        out.push((line.len() <= max_line).then_some(line));
        rest = &rest[nl + 1..];
    }
    if !rest.is_empty() {
        out.push((rest.len() <= max_line).then_some(rest));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    // The whole input as one line.
    if decode_backend_line(data).is_ok() {
        assert!(std::str::from_utf8(data).is_ok(), "a line that is not UTF-8 was accepted");
    }

    // The whole input as a stream, read in chunks, with a limit; both picked from the input's
    // bytes so that mutations explore them.
    let h = data.iter().fold(0u32, |h, &b| h.wrapping_mul(31).wrapping_add(b as u32));
    let chunk = if h & 1 == 0 { 1 + (h >> 1) as usize % 16 } else { 1 + (h >> 1) as usize % 4096 };
    let max_line = match (h >> 13) % 4 {
        0 => 1 + (h >> 15) as usize % 8,
        1 => 1 + (h >> 15) as usize % 256,
        _ => 64 * 1024,
    };
    let lines = fuzzing::block_on(async {
        let mut reader = LineReader::new(ChunkedReader::new(data, chunk), max_line);
        let mut lines = Vec::new();
        while let Some(line) = reader.next_line().await.expect("an in-memory read cannot fail") {
            lines.push(line);
        }
        lines
    });
    let Some(lines) = lines else { return };
    let got: Vec<Option<&[u8]>> = lines
        .iter()
        .map(|l| match l {
            Line::Data(b) => Some(&b[..]),
            Line::TooLong(_) => None,
        })
        .collect();
    assert_eq!(got, reference(data, max_line), "LineReader (chunk {chunk}, max_line {max_line}) differs");
    if lines.len() > 1 {
        for line in &lines {
            if let Line::Data(b) = line {
                let _ = decode_backend_line(b);
            }
        }
    }
});
