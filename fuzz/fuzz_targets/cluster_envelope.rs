//! Fuzzes the cluster envelope (`cluster/envelope.rs`), the bytes nodes exchange over Redis: a
//! node must survive any payload on the channel (another version, a bug, anyone with access to
//! Redis) without panicking or allocating what a length field claims. Checks that every decoder
//! refuses or decodes, that whatever decodes re-encodes to the very same bytes, and that
//! arbitrary records, exclusion lists, kicks and queries round-trip through encode → decode.
#![no_main]

use libfuzzer_sys::arbitrary::{Result as ArbResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use pystrands_core::fuzzing::{self as f, EnvelopeRecord};

fn encode(r: &EnvelopeRecord) -> Vec<u8> {
    f::envelope_encode_record(r.kind, &r.target, &r.body).expect("a decoded kind encodes")
}

/// Decoding arbitrary bytes: refused, or decoded to something that encodes back to them.
fn decode_raw(data: &[u8]) {
    if let Ok(p) = f::envelope_decode_payload(data) {
        if let Ok(records) = &p.records {
            assert_eq!(records.len(), p.count as usize);
            let encoded: Vec<Vec<u8>> = records.iter().map(encode).collect();
            let again = f::envelope_encode_payload(&p.origin, p.first_seq, &encoded).expect("origin fits in a u8");
            assert_eq!(again, data, "payload does not re-encode to its bytes");
        }
    }
    if let Ok(r) = f::envelope_decode_record(data) {
        assert_eq!(encode(&r), data, "record does not re-encode to its bytes");
    }
    if let Ok((ids, message)) = f::envelope_decode_except_body(data) {
        assert_eq!(f::envelope_encode_except_body(&ids, &message), data);
    }
    if let Ok((code, reason)) = f::envelope_decode_kick_body(data) {
        assert_eq!(f::envelope_encode_kick_body(code, &reason), data);
    }
    if let Ok((query, rest)) = f::envelope_decode_query_body(data) {
        assert_eq!(f::envelope_encode_query_body(query, &rest), data);
    }
}

/// Encoding arbitrary values: decodes back to them.
fn round_trip(u: &mut Unstructured<'_>, kinds: &[u8]) -> ArbResult<()> {
    let mut origin: String = u.arbitrary()?;
    while origin.len() > 255 {
        origin.pop();
    }
    let first_seq: u64 = u.arbitrary()?;
    let n = u.int_in_range(0..=8)?;
    let mut records = Vec::with_capacity(n);
    for _ in 0..n {
        let kind = *u.choose(kinds)?;
        let target: String = u.arbitrary()?;
        let body: Vec<u8> = u.arbitrary()?;
        records.push(EnvelopeRecord { kind, target, body });
    }
    let encoded: Vec<Vec<u8>> = records.iter().map(encode).collect();
    for (r, e) in records.iter().zip(&encoded) {
        assert_eq!(&f::envelope_decode_record(e).expect("an encoded record decodes"), r);
    }
    let payload = f::envelope_encode_payload(&origin, first_seq, &encoded).expect("origin fits in a u8");
    let p = f::envelope_decode_payload(&payload).expect("an encoded payload decodes");
    assert_eq!((p.origin.as_str(), p.first_seq, p.count as usize), (origin.as_str(), first_seq, n));
    assert_eq!(p.records, Ok(records));

    let exclude: Vec<String> = u.arbitrary()?;
    let message: String = u.arbitrary()?;
    let body = f::envelope_encode_except_body(&exclude, &message);
    assert_eq!(f::envelope_decode_except_body(&body), Ok((exclude, message)));

    let (code, reason): (u16, String) = u.arbitrary()?;
    assert_eq!(f::envelope_decode_kick_body(&f::envelope_encode_kick_body(code, &reason)), Ok((code, reason)));

    let (query, rest): (u64, Vec<u8>) = u.arbitrary()?;
    assert_eq!(f::envelope_decode_query_body(&f::envelope_encode_query_body(query, &rest)), Ok((query, rest)));
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    decode_raw(data);
    let kinds = f::envelope_kinds();
    assert_eq!(kinds.len(), 14, "the envelope's kinds changed: update this target");
    let _ = round_trip(&mut Unstructured::new(data), &kinds);
});
