//! Property-based fuzzing of everything the broker parses from or writes to backends: the line
//! parser (`decode_backend_line`), the line splitter (`LineReader`) and the v2 codec (`with_seq`,
//! hello replies). Arbitrary bytes and arbitrary JSON must produce a value or a `DecodeError`,
//! never a panic; encoded lines must parse back to what was encoded.
//!
//! CI runs the default number of cases; run longer by hand with e.g.
//! `PROPTEST_CASES=200000 cargo test --release -p pystrands-core --test fuzz`.

use proptest::prelude::*;
use pystrands_core::protocol::{self, BackendCommand, Line, LineReader};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const ACTIONS: [&str; 16] = [
    "response",
    "join_room",
    "leave_room",
    "message_to_user",
    "disconnect",
    "room_members",
    "room_count",
    "message_to_room",
    "message_to_connection",
    "broadcast",
    "heartbeat",
    "ack",
    "hello",
    "nope",
    "",
    "RESPONSE",
];
const KEYS: [&str; 17] = [
    "accepted",
    "user_id",
    "exclude",
    "code",
    "timeout",
    "count",
    "client_id",
    "room_id",
    "metadata",
    "reason",
    "message",
    "conn_id",
    "seq",
    "version",
    "features",
    "secret",
    "x",
];

/// Objects shaped like backend lines, with every field of every type.
fn arb_line() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(&ACTIONS[..]),
        arb_json(),
        prop::collection::vec((prop::sample::select(&KEYS[..]), arb_json()), 0..6),
        any::<bool>(),
    )
        .prop_map(|(action, request_id, params, params_is_object)| {
            let params = if params_is_object {
                Value::Object(params.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            } else {
                Value::Array(params.into_iter().map(|(_, v)| v).collect())
            };
            json!({"request_id": request_id, "action": action, "params": params})
        })
}

/// A reader that hands out its data in the given chunks, one per read.
struct Chunks(VecDeque<Vec<u8>>);

impl AsyncRead for Chunks {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if let Some(mut chunk) = self.0.pop_front() {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            if n < chunk.len() {
                self.0.push_front(chunk.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

fn read_all(chunks: Vec<Vec<u8>>, max: usize) -> Vec<Line> {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut reader = LineReader::new(Chunks(chunks.into()), max);
        let mut out = Vec::new();
        while let Some(line) = reader.next_line().await.unwrap() {
            out.push(line);
        }
        out
    })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = protocol::decode_backend_line(&bytes);
    }

    #[test]
    fn arbitrary_lines_decode_or_explain(line in arb_line()) {
        let text = serde_json::to_vec(&line).unwrap();
        match protocol::decode_backend_line(&text) {
            Ok(BackendCommand::Ack { seq }) => prop_assert_eq!(Some(seq), line["params"]["seq"].as_u64()),
            Ok(BackendCommand::Hello(h)) => prop_assert_eq!(Some(h.version), line["params"]["version"].as_u64()),
            Ok(BackendCommand::MessageToRoom { room_id, .. }) => prop_assert_eq!(Some(room_id.as_str()), line["params"]["room_id"].as_str()),
            Ok(_) => {}
            Err(e) => {
                prop_assert!(!e.cause.is_empty());
                prop_assert!(!e.detail.is_empty());
            }
        }
    }

    #[test]
    fn mutated_valid_lines_never_panic(seq in any::<u64>(), cut in 0usize..64, flip in any::<u8>(), at in 0usize..64) {
        let mut line = format!(r#"{{"request_id":"ack","action":"ack","params":{{"seq":{seq}}}}}"#).into_bytes();
        let cut = cut.min(line.len());
        line.truncate(line.len() - cut);
        if !line.is_empty() {
            let i = at % line.len();
            line[i] ^= flip;
        }
        let _ = protocol::decode_backend_line(&line);
    }

    #[test]
    fn v2_event_lines_round_trip(
        id in any::<u64>(), message in ".{0,64}", client in ".{0,16}", room in ".{0,16}",
        meta in arb_json(), seq in any::<u64>(), redelivered in any::<bool>(), user in proptest::option::of(".{0,16}"),
    ) {
        let context = protocol::encode_context(&client, &room, &meta, user.as_deref());
        let line = protocol::encode_new_message(&id.to_string(), &message, &context);
        let wire = protocol::with_seq(&line, seq, redelivered);
        prop_assert!(wire.ends_with(b"\n"));
        prop_assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
        let v: Value = serde_json::from_slice(&wire).unwrap();
        prop_assert_eq!(v["seq"].as_u64(), Some(seq));
        prop_assert_eq!(v.get("redelivered").is_some(), redelivered);
        let id_text = id.to_string();
        prop_assert_eq!(v["request_id"].as_str(), Some(id_text.as_str()));
        prop_assert_eq!(v["params"]["message"].as_str(), Some(message.as_str()));
        prop_assert_eq!(v["params"]["context"]["client_id"].as_str(), Some(client.as_str()));
        prop_assert_eq!(&v["params"]["context"]["metadata"], &meta);
        prop_assert_eq!(v["params"]["context"].get("user_id").and_then(Value::as_str), user.as_deref());
    }

    #[test]
    fn hello_replies_are_valid_json(error in ".{0,64}", hb in 0.01f64..1e6) {
        let v: Value = serde_json::from_slice(&protocol::encode_hello_reply(Err(&error))).unwrap();
        prop_assert_eq!(v["params"]["error"].as_str(), Some(error.as_str()));
        let limits = protocol::Limits { max_rooms_per_client: 3, max_id_length: 9 };
        let v: Value = serde_json::from_slice(&protocol::encode_hello_reply(Ok((hb, limits)))).unwrap();
        prop_assert_eq!(v["params"]["heartbeat_interval"].as_f64(), Some(hb));
    }

    #[test]
    fn line_reader_splits_like_the_spec(
        lines in prop::collection::vec(prop::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..40), 0..12),
        cuts in prop::collection::vec(1usize..17, 1..40),
        max in 1024usize..1100,
        long_at in any::<Option<prop::sample::Index>>(),
    ) {
        let mut lines = lines;
        if let (Some(ix), false) = (long_at, lines.is_empty()) {
            let i = ix.index(lines.len());
            lines[i] = vec![b'a'; max + 1 + i];
        }
        let mut stream: Vec<u8> = Vec::new();
        for l in &lines {
            stream.extend_from_slice(l);
            stream.push(b'\n');
        }
        let mut chunks = Vec::new();
        let mut rest = &stream[..];
        let mut c = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = (*c.next().unwrap()).min(rest.len());
            chunks.push(rest[..n].to_vec());
            rest = &rest[n..];
        }
        let got = read_all(chunks, max);
        let want: Vec<Line> = lines
            .iter()
            .map(|l| {
                if l.len() > max {
                    Line::TooLong(l.len())
                } else {
                    let mut d = l.clone();
                    if d.last() == Some(&b'\r') {
                        d.pop();
                    }
                    Line::Data(d.into())
                }
            })
            .collect();
        prop_assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want.iter()) {
            match (g, w) {
                (Line::Data(a), Line::Data(b)) => prop_assert_eq!(a, b),
                (Line::TooLong(_), Line::TooLong(_)) => {}
                other => prop_assert!(false, "mismatch {:?}", other),
            }
        }
    }
}
