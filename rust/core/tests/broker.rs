//! End-to-end tests of the real broker: [`BrokerHandle::start`] on port 0, raw WebSocket clients
//! (tokio-tungstenite's client handshake over a plain `TcpStream`) on one side and raw TCP
//! backends speaking newline-delimited JSON (docs/protocol.md) on the other. Nothing of the
//! broker is mocked, so the WebSocket side (`ws`, `http`) and the backend side (`backend`,
//! `router`, `delivery`) are covered by `cargo test` alone, without Python.
//!
//! Every wait has a deadline ([`WAIT`]); a test that hangs fails instead.

use futures_util::{SinkExt, StreamExt};
use pystrands_core::{BrokerHandle, Config};
use serde_json::{json, Value};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// Longest any single expected thing (a line, a message, a state change) may take.
const WAIT: Duration = Duration::from_secs(5);
/// Longest a whole test may take.
const TEST_DEADLINE: Duration = Duration::from_secs(30);

/// A broker on free local ports, with settings a test may adjust.
fn start_broker(adjust: impl FnOnce(&mut Config)) -> BrokerHandle {
    let mut cfg = Config {
        ws_host: "127.0.0.1".into(),
        ws_port: 0,
        tcp_host: "127.0.0.1".into(),
        tcp_port: 0,
        workers: 1,
        log_level: "error".into(),
        ..Config::default()
    };
    adjust(&mut cfg);
    BrokerHandle::start(cfg).expect("broker starts")
}

/// Runs a test body on a runtime of its own (the broker has its own; `BrokerHandle::stop` must
/// not run inside a runtime, so the broker is dropped after this returns).
fn run(body: impl Future<Output = ()>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("test runtime");
    rt.block_on(async {
        tokio::time::timeout(TEST_DEADLINE, body).await.expect("the test finished within its deadline");
    });
}

/// Waits (polling, under [`WAIT`]) until `cond` holds.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let polled = tokio::time::timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    polled.await.unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

/// A backend connection speaking the line protocol by hand.
struct Backend {
    lines: Lines<BufReader<OwnedReadHalf>>,
    wr: OwnedWriteHalf,
}

impl Backend {
    /// Connects a v1 backend (no hello) and waits until the broker routes to it.
    async fn v1(broker: &BrokerHandle) -> Backend {
        let before = broker.stats().backends;
        let b = Backend::connect(broker.tcp_addr()).await;
        wait_until("the v1 backend is registered", || broker.stats().backends > before).await;
        b
    }

    /// Connects a backend that negotiates v2 with a `hello`, checks the answer and waits until
    /// the broker routes to it.
    async fn v2(broker: &BrokerHandle) -> Backend {
        let before = broker.stats().backends;
        let mut b = Backend::connect(broker.tcp_addr()).await;
        b.send(json!({"request_id": "hello", "action": "hello", "params": {"version": 2, "features": ["ack", "heartbeat"]}}))
            .await;
        let reply = b.next().await;
        assert_eq!(reply["action"], "hello", "{reply}");
        assert_eq!(reply["params"]["ok"], true, "hello refused: {reply}");
        assert_eq!(reply["params"]["version"], 2, "{reply}");
        wait_until("the v2 backend is registered", || broker.stats().backends > before).await;
        b
    }

    async fn connect(addr: SocketAddr) -> Backend {
        let stream = TcpStream::connect(addr).await.expect("backend connects");
        let (rd, wr) = stream.into_split();
        Backend { lines: BufReader::new(rd).lines(), wr }
    }

    async fn send_raw(&mut self, line: &str) {
        self.wr.write_all(line.as_bytes()).await.expect("backend write");
        self.wr.write_all(b"\n").await.expect("backend write");
    }

    async fn send(&mut self, v: Value) {
        self.send_raw(&v.to_string()).await;
    }

    /// The next line from the broker other than a heartbeat, parsed.
    async fn next(&mut self) -> Value {
        loop {
            let line = tokio::time::timeout(WAIT, self.lines.next_line())
                .await
                .expect("a line from the broker in time")
                .expect("backend read")
                .expect("the broker closed the backend connection");
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("broker sent bad JSON ({e}): {line}"));
            if v["action"] != "heartbeat" {
                return v;
            }
        }
    }

    /// The next line, which must be `action`.
    async fn expect(&mut self, action: &str) -> Value {
        let v = self.next().await;
        assert_eq!(v["action"], action, "expected {action}, got {v}");
        v
    }

    /// Answers a `connection_request`.
    async fn answer(&mut self, request: &Value, params: Value) {
        assert_eq!(request["action"], "connection_request", "{request}");
        self.send(json!({"request_id": request["request_id"], "action": "response", "params": params})).await;
    }
}

type Ws = WebSocketStream<TcpStream>;

/// Starts a WebSocket handshake for `path` in a task of its own (the broker answers it only
/// after a backend decided).
fn dial(broker: &BrokerHandle, path: &str) -> tokio::task::JoinHandle<Result<Ws, WsError>> {
    let addr = broker.ws_addr();
    let url = format!("ws://{addr}{path}");
    tokio::spawn(async move {
        let stream = TcpStream::connect(addr).await.map_err(WsError::Io)?;
        tokio_tungstenite::client_async(url, stream).await.map(|(ws, _)| ws)
    })
}

/// The outcome of a handshake started with [`dial`], within [`WAIT`].
async fn dialed(task: tokio::task::JoinHandle<Result<Ws, WsError>>) -> Result<Ws, WsError> {
    tokio::time::timeout(WAIT, task).await.expect("handshake finished in time").expect("dial task")
}

/// The HTTP status a refused handshake got.
fn refusal_status(outcome: Result<Ws, WsError>) -> u16 {
    match outcome {
        Ok(_) => panic!("the connection was upgraded, expected a refusal"),
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
    }
}

/// Connects a client that `backend` accepts as `client_id` in `room`; consumes the
/// `new_connection` event and returns it with the socket.
async fn accepted_client(broker: &BrokerHandle, backend: &mut Backend, client_id: &str, room: &str) -> (Ws, Value) {
    let task = dial(broker, &format!("/ws/{room}?user={client_id}"));
    let request = backend.expect("connection_request").await;
    backend.answer(&request, json!({"accepted": true, "client_id": client_id, "room_id": room, "metadata": {}})).await;
    let ws = dialed(task).await.expect("the client was upgraded");
    let event = backend.expect("new_connection").await;
    assert_eq!(event["params"]["context"]["client_id"], client_id, "{event}");
    (ws, event)
}

/// The next text message a client receives.
async fn text(ws: &mut Ws) -> String {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message for the client in time")
            .expect("the broker closed the client's socket")
            .expect("client read");
        match msg {
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

#[test]
fn accepted_clients_reach_their_backend_and_room_messages_reach_every_member() {
    let broker = start_broker(|_| {});
    run(async {
        let mut backend = Backend::v1(&broker).await;

        // The connection request carries the path and query; the client is upgraded once accepted.
        let task = dial(&broker, "/ws/lobby?user=alice");
        let request = backend.expect("connection_request").await;
        assert_eq!(request["params"]["url"], "/ws/lobby", "{request}");
        assert_eq!(request["params"]["query"], "user=alice", "{request}");
        backend
            .answer(&request, json!({"accepted": true, "client_id": "alice", "room_id": "lobby", "metadata": {"n": 1}}))
            .await;
        let mut alice = dialed(task).await.expect("alice was upgraded");
        let hello = backend.expect("new_connection").await;
        assert_eq!(hello["params"]["context"], json!({"client_id": "alice", "room_id": "lobby", "metadata": {"n": 1}}));

        let (mut bob, _) = accepted_client(&broker, &mut backend, "bob", "lobby").await;
        let (mut carol, _) = accepted_client(&broker, &mut backend, "carol", "elsewhere").await;

        alice.send(Message::text("hi")).await.expect("alice sends");
        let msg = backend.expect("new_message").await;
        assert_eq!(msg["params"]["message"], "hi", "{msg}");
        assert_eq!(msg["params"]["context"]["client_id"], "alice", "{msg}");
        assert_eq!(msg["params"]["context"]["room_id"], "lobby", "{msg}");

        // The backend echoes to the room: both members get it, the client in another room not.
        backend.send(json!({"request_id": "1", "action": "message_to_room", "params": {"room_id": "lobby", "message": "alice: hi"}})).await;
        assert_eq!(text(&mut alice).await, "alice: hi");
        assert_eq!(text(&mut bob).await, "alice: hi");
        backend.send(json!({"request_id": "2", "action": "message_to_room", "params": {"room_id": "elsewhere", "message": "only carol"}})).await;
        assert_eq!(text(&mut carol).await, "only carol", "carol got nothing of the lobby before this");
        assert_eq!(broker.stats().clients, 3);
        assert_eq!(broker.stats().counter("connections_accepted"), 3);
    });
}

#[test]
fn a_rejected_connection_gets_403_and_is_never_upgraded() {
    let broker = start_broker(|_| {});
    run(async {
        let mut backend = Backend::v1(&broker).await;
        let task = dial(&broker, "/ws/private");
        let request = backend.expect("connection_request").await;
        backend.answer(&request, json!({"accepted": false, "reason": "not invited"})).await;
        let outcome = dialed(task).await;
        if let Err(WsError::Http(resp)) = &outcome {
            let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            assert!(body.contains("not invited"), "the reason is the 403 body, got {body:?}");
        }
        assert_eq!(refusal_status(outcome), 403);
        assert_eq!(broker.stats().clients, 0);
        assert_eq!(broker.stats().counter("connections_rejected"), 1);
        assert_eq!(broker.stats().counter("connections_accepted"), 0);
    });
}

#[test]
fn without_a_backend_a_connection_gets_503() {
    let broker = start_broker(|_| {});
    run(async {
        assert_eq!(refusal_status(dialed(dial(&broker, "/ws/lobby")).await), 503);
        assert_eq!(broker.stats().counter("connections_unavailable"), 1);
        assert_eq!(broker.stats().clients, 0);
    });
}

#[test]
fn private_messages_reach_only_their_client_and_broadcasts_reach_everyone() {
    let broker = start_broker(|_| {});
    run(async {
        let mut backend = Backend::v1(&broker).await;
        let (mut alice, _) = accepted_client(&broker, &mut backend, "alice", "r1").await;
        let (mut bob, _) = accepted_client(&broker, &mut backend, "bob", "r2").await;

        backend.send(json!({"request_id": "1", "action": "message_to_connection", "params": {"conn_id": "bob", "message": "psst"}})).await;
        backend.send(json!({"request_id": "2", "action": "message_to_connection", "params": {"conn_id": "nobody", "message": "lost"}})).await;
        backend.send(json!({"request_id": "3", "action": "broadcast", "params": {"message": "hello all"}})).await;
        assert_eq!(text(&mut bob).await, "psst");
        assert_eq!(text(&mut bob).await, "hello all");
        // One queue per client, in order: had alice been sent "psst", it would come first.
        assert_eq!(text(&mut alice).await, "hello all");
        wait_until("the message for nobody counts as no_route", || broker.stats().counter("no_route") == 1).await;
    });
}

#[test]
fn a_client_that_leaves_is_reported_to_its_backend() {
    let broker = start_broker(|_| {});
    run(async {
        let mut backend = Backend::v1(&broker).await;
        let (mut alice, _) = accepted_client(&broker, &mut backend, "alice", "lobby").await;
        alice.close(None).await.expect("alice closes");
        let gone = backend.expect("disconnected").await;
        assert_eq!(gone["params"]["context"]["client_id"], "alice", "{gone}");
        assert_eq!(gone["params"]["context"]["room_id"], "lobby", "{gone}");
        wait_until("the client is unregistered", || broker.stats().clients == 0).await;
    });
}

#[test]
fn v2_events_a_dead_backend_did_not_ack_are_redelivered_to_the_next() {
    let broker = start_broker(|_| {});
    run(async {
        let mut first = Backend::v2(&broker).await;
        let (mut alice, joined) = accepted_client(&broker, &mut first, "alice", "lobby").await;
        assert_eq!(joined["seq"], 1, "v2 events carry a seq: {joined}");
        assert!(joined.get("redelivered").is_none(), "{joined}");
        alice.send(Message::text("are you there?")).await.expect("alice sends");
        let msg = first.expect("new_message").await;
        assert_eq!(msg["seq"], 2, "{msg}");
        // Neither event is acknowledged. A second backend comes up, then the first dies.
        let mut second = Backend::v2(&broker).await;
        drop(first);
        let again = second.expect("new_connection").await;
        assert_eq!(again["redelivered"], true, "{again}");
        assert_eq!(again["request_id"], joined["request_id"], "same event id on redelivery");
        assert_eq!(again["seq"], 1, "the second backend's own numbering: {again}");
        let again = second.expect("new_message").await;
        assert_eq!(again["redelivered"], true, "{again}");
        assert_eq!(again["request_id"], msg["request_id"], "same event id on redelivery");
        assert_eq!(again["params"]["message"], "are you there?", "{again}");
        assert_eq!(broker.stats().counter("events_redelivered"), 2);

        // Acknowledged events are not redelivered: the next message is new, and alice stays served.
        second.send(json!({"request_id": "ack", "action": "ack", "params": {"seq": 2}})).await;
        alice.send(Message::text("hello?")).await.expect("alice sends");
        let fresh = second.expect("new_message").await;
        assert_eq!(fresh["seq"], 3, "{fresh}");
        assert!(fresh.get("redelivered").is_none(), "{fresh}");
        wait_until("the ack released the unacked events", || broker.stats().unacked_events == 1).await;
    });
}

#[test]
fn a_malformed_backend_line_is_counted_and_the_session_carries_on() {
    let broker = start_broker(|_| {});
    run(async {
        let mut backend = Backend::v1(&broker).await;
        let (mut alice, _) = accepted_client(&broker, &mut backend, "alice", "lobby").await;
        backend.send_raw("this is not json").await;
        backend.send_raw(r#"{"request_id":"1","action":"no_such_action","params":{}}"#).await;
        backend.send_raw(r#"{"request_id":"2","action":"message_to_room","params":{"room_id":7}}"#).await;
        backend.send(json!({"request_id": "3", "action": "broadcast", "params": {"message": "still here"}})).await;
        assert_eq!(text(&mut alice).await, "still here");
        assert_eq!(broker.stats().counter("backend_errors"), 3);
        assert_eq!(broker.stats().backends, 1, "the backend was not dropped");
        // The same connection still serves new clients.
        let (_bob, _) = accepted_client(&broker, &mut backend, "bob", "lobby").await;
        assert_eq!(broker.stats().clients, 2);
    });
}

/// The next batch of lines from an in-process link (blocking wait on a helper thread).
async fn link_lines(link: &std::sync::Arc<pystrands_core::InprocLink>) -> Vec<Value> {
    let link = link.clone();
    tokio::time::timeout(
        WAIT,
        tokio::task::spawn_blocking(move || loop {
            let mut lines = Vec::new();
            match link.take(&mut lines, 1024) {
                pystrands_core::InprocStatus::Lines => {
                    return lines
                        .iter()
                        .map(|l| serde_json::from_slice::<Value>(l).expect("the broker sent JSON"))
                        .filter(|v| v["action"] != "heartbeat")
                        .collect::<Vec<_>>();
                }
                pystrands_core::InprocStatus::Empty => {
                    link.wait(Some(WAIT));
                }
                pystrands_core::InprocStatus::End => panic!("the link ended"),
            }
        }),
    )
    .await
    .expect("lines from the link in time")
    .expect("reader thread")
}

fn line(v: Value) -> Vec<u8> {
    let mut l = v.to_string().into_bytes();
    l.push(b'\n');
    l
}

#[test]
fn an_in_process_backend_is_one_more_backend_and_its_unacked_events_move_on_when_it_closes() {
    let broker = start_broker(|_| {});
    run(async {
        let link = std::sync::Arc::new(broker.attach_backend().expect("attach"));
        link.write(&line(json!({"request_id": "h", "action": "hello", "params": {"version": 2}})));
        let hello = link_lines(&link).await;
        assert_eq!(hello[0]["params"]["ok"], true, "{hello:?}");
        assert_eq!(hello[0]["params"]["heartbeat_interval"], 0.0, "no heartbeats in-process: {hello:?}");
        wait_until("the in-process backend is registered", || broker.stats().backends == 1).await;

        // A client is asked about, accepted, and its messages arrive with seqs; a send reaches it
        // (written in two pieces: a line may span writes).
        let task = dial(&broker, "/room");
        let request = link_lines(&link).await.remove(0);
        assert_eq!(request["action"], "connection_request", "{request}");
        let response = line(json!({"request_id": request["request_id"], "action": "response",
            "params": {"accepted": true, "client_id": "c1", "room_id": "room", "metadata": {}}}));
        let (a, b) = response.split_at(10);
        link.write(a);
        link.write(b);
        let mut ws = dialed(task).await.expect("upgraded");
        let events = link_lines(&link).await;
        assert_eq!(events[0]["action"], "new_connection", "{events:?}");
        ws.send(Message::text("one")).await.expect("client send");
        ws.send(Message::text("two")).await.expect("client send");
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(link_lines(&link).await);
        }
        assert_eq!(got[0]["params"]["message"], "one");
        assert_eq!(got[1]["params"]["message"], "two");
        assert!(got[1]["seq"].as_u64() > got[0]["seq"].as_u64(), "v2 seqs: {got:?}");
        link.write(&line(json!({"request_id": "s", "action": "message_to_connection",
            "params": {"conn_id": "c1", "message": "hello c1"}})));
        assert_eq!(text(&mut ws).await, "hello c1");

        // A TCP backend joins; the in-process one closes without acking anything: its events go
        // to the TCP backend, in order, marked as redelivered.
        let mut tcp = Backend::v2(&broker).await;
        link.close();
        let again = tcp.expect("new_connection").await;
        assert_eq!(again["redelivered"], true, "{again}");
        let first = tcp.expect("new_message").await;
        let second = tcp.expect("new_message").await;
        assert_eq!(
            (first["params"]["message"].as_str(), second["params"]["message"].as_str()),
            (Some("one"), Some("two"))
        );
        assert_eq!(first["redelivered"], true, "{first}");
        wait_until("the in-process backend is gone", || broker.stats().backends == 1).await;
        assert!(link.is_closed());
    });
}
