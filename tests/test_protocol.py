"""Unit tests of the shared protocol core (framing, codec, events, backoff) and the contexts."""

from __future__ import annotations

import json
import logging
import random
import uuid

import pytest

from pystrands import ConnectionRequestContext, Context, Headers
from pystrands import _protocol as p
from pystrands._base import Backoff
from pystrands._session import AckTracker

# ----------------------------------------------------------------------------- framing


def test_framer_split_reads_byte_by_byte() -> None:
    framer = p.LineFramer()
    stream = b'{"a":1}\n{"b":2}\n'
    out: list[bytes] = []
    for i in range(len(stream)):
        out += framer.feed(stream[i : i + 1])
    assert out == [b'{"a":1}', b'{"b":2}']
    assert framer.buffered == 0


def test_framer_coalesced_and_partial() -> None:
    framer = p.LineFramer()
    assert framer.feed(b"one\ntwo\nthr") == [b"one", b"two"]
    assert framer.buffered == 3
    assert framer.feed(b"ee\r\n\n  \n\r\nfour") == [b"three"]
    assert framer.feed(b"\n") == [b"four"]


def test_framer_accepts_memoryview_and_bytearray() -> None:
    framer = p.LineFramer()
    assert framer.feed(memoryview(b"a\nb")) == [b"a"]
    assert framer.feed(bytearray(b"\n")) == [b"b"]


def test_framer_large_line_in_chunks() -> None:
    payload = b"x" * (2 * 1024 * 1024 + 17)
    framer = p.LineFramer()
    stream = payload + b"\nnext\n"
    out: list[bytes] = []
    for i in range(0, len(stream), 65536):
        out += framer.feed(stream[i : i + 65536])
    assert out == [payload, b"next"]


def test_framer_max_line_size_drops_and_resyncs(caplog: pytest.LogCaptureFixture) -> None:
    framer = p.LineFramer(max_line_size=10)
    with caplog.at_level(logging.WARNING, logger="pystrands.protocol"):
        # oversize line arriving in pieces: dropped, then resync at the newline
        assert framer.feed(b"0123456789ABCDEF") == []
        assert framer.feed(b"more garbage") == []
        assert framer.feed(b"tail\nok\n") == [b"ok"]
        # oversize complete line inside one chunk
        assert framer.feed(b"short\n" + b"y" * 50 + b"\nfine\n") == [b"short", b"fine"]
    assert framer.dropped_lines == 2
    assert "max_line_size" in caplog.text


def test_framer_any_chunking_gives_the_lines_of_a_model() -> None:
    """Random streams (blank, whitespace and CRLF lines, a partial tail) cut at random points
    give exactly the lines a one-shot split gives; lines over the limit are dropped, counted,
    and do not disturb the lines around them."""
    rng = random.Random(7)
    for _ in range(3000):
        limit = rng.choice([8, 16, 1000])
        lines = [bytes(rng.choice(b"ab \r{}") for _ in range(rng.randint(0, 12))) for _ in range(rng.randint(0, 15))]
        stream = b"\n".join(lines) + rng.choice([b"", b"\n", b"tail"])
        want, too_long = [], 0
        for raw in stream.split(b"\n")[:-1]:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if len(line) > limit:  # the limit counts the content, not the CR of a CRLF
                too_long += 1
            elif line and not line.isspace():
                want.append(line)
        framer = p.LineFramer(limit)
        got: list[bytes] = []
        i = 0
        while i < len(stream):
            n = rng.randint(1, 9)
            got += framer.feed(stream[i : i + n])
            i += n
        assert got == want, stream
        assert framer.dropped_lines >= too_long


def test_framer_rejects_bad_limit() -> None:
    with pytest.raises(ValueError):
        p.LineFramer(0)


# ------------------------------------------------------------------------------ codec


def test_encoders_round_trip() -> None:
    frames = [
        p.encode_room_message("r1", "hello"),
        p.encode_private_message("c1", "psst"),
        p.encode_broadcast("all ✓"),
    ]
    decoded = [json.loads(f) for f in frames]
    assert all(f.endswith(b"\n") and f.count(b"\n") == 1 for f in frames)
    assert decoded[0]["action"] == "message_to_room"
    assert decoded[0]["params"] == {"room_id": "r1", "message": "hello"}
    assert decoded[1]["action"] == "message_to_connection"
    assert decoded[1]["params"] == {"conn_id": "c1", "message": "psst"}
    assert decoded[2] == {"request_id": decoded[2]["request_id"], "action": "broadcast", "params": {"message": "all ✓"}}
    ids = [d["request_id"] for d in decoded]
    assert all(isinstance(i, str) for i in ids) and len(set(ids)) == 3


def test_encode_response_and_reject() -> None:
    ctx = Context("cid", "room", {"user": "alice", "n": [1, 2]})
    resp = json.loads(p.encode_response("rid-7", True, ctx))
    assert resp == {
        "request_id": "rid-7",
        "action": "response",
        "params": {"accepted": True, "client_id": "cid", "room_id": "room", "metadata": {"user": "alice", "n": [1, 2]}},
    }
    rej = json.loads(p.encode_reject("rid-8"))
    assert rej == {"request_id": "rid-8", "action": "response", "params": {"accepted": False}}


def test_response_for_unencodable_metadata_rejects(caplog: pytest.LogCaptureFixture) -> None:
    req = ConnectionRequestContext(url="/x")
    req.context.metadata = {"bad": object()}
    with caplog.at_level(logging.ERROR, logger="pystrands.protocol"):
        frame = json.loads(p.response_for("r", True, req))
    assert frame["params"] == {"accepted": False}
    assert "rejecting" in caplog.text


def test_resolve_accepted() -> None:
    req = ConnectionRequestContext(url="/x")
    assert p.resolve_accepted(True, req) is True
    assert p.resolve_accepted(False, req) is False
    assert p.resolve_accepted(None, req) is True
    req.accepted = False
    assert p.resolve_accepted(None, req) is False
    assert p.resolve_accepted("yes", req) is False
    assert p.resolve_accepted(True, req) is True


def test_encode_rejects_unserializable_message() -> None:
    with pytest.raises(TypeError):
        p.encode_room_message("r", object())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- decoding


def _line(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_decode_all_event_kinds() -> None:
    c = {"client_id": "c1", "room_id": "r1", "metadata": {"k": "v"}}
    ev = p.decode_event(_line({"request_id": "1", "action": "new_message", "params": {"message": "hi", "context": c}}))
    assert isinstance(ev, p.NewMessage)
    assert ev.message == "hi" and ev.key == "c1"
    assert ev.context == Context("c1", "r1", {"k": "v"})

    ev2 = p.decode_event(_line({"request_id": "2", "action": "new_connection", "params": {"context": c}}))
    assert isinstance(ev2, p.NewConnection) and ev2.key == "c1"
    ev3 = p.decode_event(_line({"request_id": "3", "action": "disconnected", "params": {"context": c}}))
    assert isinstance(ev3, p.Disconnected) and ev3.context.room_id == "r1"
    ev4 = p.decode_event(_line({"request_id": "4", "action": "error", "params": {"error": "boom", "context": c}}))
    assert isinstance(ev4, p.ErrorEvent) and ev4.error == "boom" and ev4.key == "c1"
    ev5 = p.decode_event(_line({"request_id": "5", "action": "error", "params": {"error": "no ctx"}}))
    assert isinstance(ev5, p.ErrorEvent) and ev5.context == Context()

    request_line = _line(
        {
            "request_id": "abc",
            "action": "connection_request",
            "params": {
                "headers": {"X-Token": ["secret"], "Sec-Websocket-Key": ["k"]},
                "url": "/ws/chat",
                "remote_addr": "1.2.3.4:5",
                "query": "a=1",
            },
        }
    )
    req = p.decode_event(request_line)
    assert isinstance(req, p.ConnectionRequest)
    assert req.key is None and req.request_id == "abc"
    r = req.request
    assert r.url == "/ws/chat" and r.remote_addr == "1.2.3.4:5" and r.query == "a=1"
    assert r.headers.get("x-token") == ["secret"]
    assert r.accepted is True
    assert r.context.room_id == "/ws/chat" and r.context.metadata == {}
    default_id = uuid.UUID(r.context.client_id)  # a random version-4 UUID, in the canonical form
    assert default_id.version == 4 and default_id.variant == uuid.RFC_4122
    assert str(default_id) == r.context.client_id
    others = {p.decode_event(request_line).request.context.client_id for _ in range(1000)}  # type: ignore[union-attr]
    assert len(others) == 1000 and r.context.client_id not in others


def test_decoded_request_headers_behave_like_constructed_ones() -> None:
    """Headers of a decoded request: same view, reads, replacement and JSON form as a
    request built by hand, including values that are not lists of strings."""
    wire = {"X-Token": ["secret"], "x-token": ["again"], "Num": 5, "Many": ["a", 1], "None": None}
    req = p.decode_event(
        _line({"request_id": "r", "action": "connection_request", "params": {"headers": wire, "url": "/u", "remote_addr": "a:1"}})
    )
    assert isinstance(req, p.ConnectionRequest)
    r = req.request
    by_hand = ConnectionRequestContext(headers=wire, url="/u", remote_addr="a:1")
    assert r.headers == by_hand.headers
    assert r.headers is r.headers  # one view: changes through it stay
    assert r.headers["X-TOKEN"] == ["secret", "again"] and r.headers["num"] == ["5"] and r.headers["many"] == ["a", "1"]
    r.headers["X-Extra"] = "1"
    assert r.to_json()["headers"]["X-Extra"] == ["1"]
    r.headers = {"Only": ["this"]}
    assert dict(r.headers) == {"Only": ["this"]} and r.to_json()["headers"] == {"Only": ["this"]}
    empty = p.decode_event(_line({"request_id": "e", "action": "connection_request", "params": {"url": "/u"}}))
    assert isinstance(empty, p.ConnectionRequest) and len(empty.request.headers) == 0


def test_decode_metadata_is_kept_exactly() -> None:
    meta = {"user": {"id": 7, "roles": ["a", "b"]}, "x": None}
    ev = p.decode_event(
        _line({"action": "new_message", "params": {"message": "m", "context": {"client_id": "c", "room_id": "r", "metadata": meta}}})
    )
    assert isinstance(ev, p.NewMessage)
    assert ev.context.metadata == meta


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"\xff\xfe\xfa invalid utf-8",
        b'{"action": "new_message", "params": {"message": "\xff"}}',
        b"[1, 2, 3]",
        b'"string"',
        b'{"action": "new_message", "params": "nope"}',
        b'{"action": "new_message", "params": {"message": 5, "context": {"client_id": "c"}}}',
        b'{"action": "new_message", "params": {"message": "m"}}',
        b'{"action": "new_message", "params": {"message": "m", "context": {"client_id": 5}}}',
        b'{"action": "new_connection", "params": {"context": "c"}}',
        b'{"action": "connection_request", "params": {"url": "/x"}}',
        b'{"request_id": "1", "action": "connection_request", "params": {"url": 5}}',
        b'{"params": {}}',
        b'{"action": 5}',
        b"{" * 100000,
    ],
)
def test_decode_garbage_is_skipped(line: bytes, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pystrands.protocol"):
        assert p.decode_event(line) is None
    assert caplog.records, "malformed input must be logged"


def test_decode_heartbeat_and_unknown_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="pystrands.protocol"):
        hb = p.decode_event(b'{"request_id": "heartbeat", "action": "heartbeat", "params": {}}')
        assert hb is p.HEARTBEAT and hb.control and hb.seq == 0
        # a hello that is not a reply (no boolean ok), e.g. on a v1-only flow: ignored
        assert p.decode_event(b'{"request_id": "1", "action": "hello", "params": {"version": 2}}') is None
        assert p.decode_event(b'{"request_id": "1", "action": "presence", "params": {"x": 1}}') is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_decode_2mib_message() -> None:
    text = "é" * (1024 * 1024)  # 2 MiB of UTF-8
    line = _line({"request_id": "1", "action": "new_message", "params": {"message": text, "context": {"client_id": "c", "room_id": "r", "metadata": {}}}})
    framer = p.LineFramer()
    lines: list[bytes] = []
    data = line + b"\n"
    for i in range(0, len(data), 100_000):
        lines += framer.feed(data[i : i + 100_000])
    assert len(lines) == 1
    ev = p.decode_event(lines[0])
    assert isinstance(ev, p.NewMessage) and ev.message == text


# ------------------------------------------------------------------------------ backoff


def test_backoff_schedule_without_jitter() -> None:
    b = Backoff(1.0, 2.0, 10.0, jitter=0.0)
    assert [b.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    b.reset()
    assert b.next() == 1.0


def test_backoff_jitter_bounds() -> None:
    rng = random.Random(1234)
    b = Backoff(0.5, 2.0, 8.0, jitter=0.2, rng=rng.random)
    nominal = 0.5
    seen: list[float] = []
    for _ in range(200):
        d = b.next()
        seen.append(d)
        assert nominal * 0.8 - 1e-9 <= d <= min(nominal * 1.2, 8.0) + 1e-9
        nominal = min(nominal * 2.0, 8.0)
    capped = seen[10:]
    assert max(capped) <= 8.0
    assert len({round(d, 6) for d in capped}) > 10, "jitter must spread the delays"


def test_backoff_extremes() -> None:
    assert Backoff(0.0, 2.0, 1.0).next() == 0.0
    b = Backoff(1.0, 0.5, 0.1, jitter=0.0)  # factor < 1 and max < initial are clamped
    assert [b.next() for _ in range(3)] == [1.0, 1.0, 1.0]
    lo = Backoff(1.0, 2.0, 30.0, jitter=0.15, rng=lambda: 0.0)
    hi = Backoff(1.0, 2.0, 30.0, jitter=0.15, rng=lambda: 0.999999)
    assert lo.next() == pytest.approx(0.85)
    assert hi.next() == pytest.approx(1.15, rel=1e-5)


# ----------------------------------------------------------------------------- contexts


def test_headers_case_insensitive() -> None:
    h = Headers({"X-Token": ["secret"], "Authorization": "Bearer t", "Sec-Websocket-Key": ["k1", "k2"]})
    assert h.get("X-Token", [None])[0] == "secret"
    assert h.get("x-token") == ["secret"]
    assert h["AUTHORIZATION"] == ["Bearer t"]
    assert h.get("Missing", [None])[0] is None
    assert h.get("missing") is None
    assert "sec-websocket-key" in h and 5 not in h
    assert h.first("sec-websocket-key") == "k1"
    assert h.first("nope", "d") == "d"
    assert list(h) == ["X-Token", "Authorization", "Sec-Websocket-Key"]
    assert len(h) == 3
    assert h.to_json() == {"X-Token": ["secret"], "Authorization": ["Bearer t"], "Sec-Websocket-Key": ["k1", "k2"]}
    assert h == {"x-token": ["secret"], "authorization": ["Bearer t"], "sec-websocket-key": ["k1", "k2"]}
    h["x-new"] = ["1"]
    del h["X-TOKEN"]
    assert "X-Token" not in h and h["X-NEW"] == ["1"]
    assert Headers.from_json(None) == {}
    assert isinstance(h.copy(), Headers) and h.copy() == h


def test_context_json_round_trip() -> None:
    c = Context.from_json({"client_id": "a", "room_id": "b", "metadata": {"x": 1}, "extra": True})
    assert (c.client_id, c.room_id, c.metadata) == ("a", "b", {"x": 1})
    assert c.to_json() == {"client_id": "a", "room_id": "b", "metadata": {"x": 1}}
    assert Context.from_json(c) is c
    assert Context.from_json({"client_id": "a", "room_id": "b", "metadata": None}).metadata == {}
    assert Context(client_id="a", room_id="b").metadata == {}
    assert "client_id='a'" in repr(c)


def test_connection_request_context_json() -> None:
    params = {"headers": {"X-Token": ["s"]}, "url": "/chat", "remote_addr": "1.1.1.1:1"}
    r = ConnectionRequestContext.from_json(params)
    assert r.accepted is True and r.query == ""
    assert r.context.room_id == "/chat" and r.context.metadata == {}
    assert r.headers.get("x-token") == ["s"]
    r.context.metadata = {"user": "alice"}
    r.accepted = False
    j = r.to_json()
    assert j["headers"] == {"X-Token": ["s"]} and j["accepted"] is False
    assert j["context"]["metadata"] == {"user": "alice"}
    again = ConnectionRequestContext.from_json(j)
    assert again.context == r.context and again.accepted is False and again.url == "/chat"
    # 1.0 style construction with a Context object
    ctx = Context(client_id="x", room_id="y", metadata={})
    r2 = ConnectionRequestContext.from_json({"headers": {}, "url": "/u", "remote_addr": None, "context": ctx, "accepted": True})
    assert r2.context is ctx and r2.remote_addr == ""


def test_headers_merge_names_differing_in_case() -> None:
    h = Headers({"X-Forwarded-For": ["1.1.1.1"], "x-forwarded-for": "2.2.2.2"})
    assert h.get("X-FORWARDED-FOR") == ["1.1.1.1", "2.2.2.2"]
    assert list(h) == ["X-Forwarded-For"]


# --------------------------------------------------------------------------- protocol v2


def test_encode_hello_with_and_without_secret() -> None:
    import pystrands

    plain = json.loads(p.encode_hello(None))
    assert plain == {
        "request_id": "hello",
        "action": "hello",
        "params": {"version": 2, "features": ["ack", "heartbeat", "rooms", "history"], "client": f"pystrands-python/{pystrands.__version__}"},
    }
    with_secret = p.encode_hello("s3cret")
    assert with_secret.endswith(b"\n") and with_secret.count(b"\n") == 1
    assert json.loads(with_secret)["params"]["secret"] == "s3cret"
    assert "secret" not in json.loads(p.encode_hello(""))["params"]


def test_encode_ack_and_heartbeat_reply() -> None:
    assert json.loads(p.encode_ack(41)) == {"request_id": "ack", "action": "ack", "params": {"seq": 41}}
    assert p.encode_ack(7).endswith(b"\n")
    assert json.loads(p.HEARTBEAT_REPLY) == {"request_id": "heartbeat", "action": "heartbeat", "params": {}}
    assert p.HEARTBEAT_REPLY.count(b"\n") == 1 and p.HEARTBEAT_REPLY.endswith(b"\n")


def test_resolve_backend_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(p.BACKEND_SECRET_ENV, raising=False)
    assert p.resolve_backend_secret(None) is None
    assert p.resolve_backend_secret("given") == "given"
    assert p.resolve_backend_secret("") is None
    monkeypatch.setenv(p.BACKEND_SECRET_ENV, "from-env")
    assert p.resolve_backend_secret(None) == "from-env"
    assert p.resolve_backend_secret("given") == "given"  # an explicit value wins
    monkeypatch.setenv(p.BACKEND_SECRET_ENV, "")
    assert p.resolve_backend_secret(None) is None  # empty = none
    with pytest.raises(TypeError):
        p.resolve_backend_secret(5)  # type: ignore[arg-type]


def test_decode_hello_replies(caplog: pytest.LogCaptureFixture) -> None:
    ok = p.decode_event(
        _line({"request_id": "hello", "action": "hello", "params": {"ok": True, "version": 2, "features": ["ack", "heartbeat"], "heartbeat_interval": 15.0}})
    )
    assert isinstance(ok, p.HelloReply) and ok.control
    assert (ok.ok, ok.version, ok.features, ok.heartbeat_interval, ok.error) == (True, 2, ("ack", "heartbeat"), 15.0, "")
    bad = p.decode_event(_line({"request_id": "hello", "action": "hello", "params": {"ok": False, "error": "wrong backend secret"}}))
    assert isinstance(bad, p.HelloReply) and bad.ok is False and bad.error == "wrong backend secret"
    with caplog.at_level(logging.WARNING, logger="pystrands.protocol"):
        odd = p.decode_event(
            _line({"action": "hello", "params": {"ok": True, "heartbeat_interval": "soon", "features": "ack", "version": "2"}})
        )
        assert isinstance(odd, p.HelloReply) and odd.ok and odd.heartbeat_interval == 0.0 and odd.features == () and odd.version == 0
        for interval in (-1, 0, True, None, [1]):
            r = p.decode_event(_line({"action": "hello", "params": {"ok": True, "heartbeat_interval": interval}}))
            assert isinstance(r, p.HelloReply) and r.heartbeat_interval == 0.0
        assert p.decode_event(_line({"action": "hello", "params": {"ok": "yes"}})) is None
    assert not caplog.records


def test_decode_v2_event_facts_and_context_json_unchanged() -> None:
    c = {"client_id": "c1", "room_id": "r1", "metadata": {"k": "v"}}
    ev = p.decode_event(
        _line({"seq": 41, "request_id": "1007", "action": "new_message", "redelivered": True, "params": {"message": "hi", "context": c}})
    )
    assert isinstance(ev, p.NewMessage) and ev.seq == 41 and not ev.control
    ctx = ev.context
    assert ctx.event_id == "1007" and ctx.redelivered is True
    assert ctx.to_json() == c  # delivery facts are not part of the JSON form
    assert ctx == Context("c1", "r1", {"k": "v"})  # nor of equality
    assert "1007" not in repr(ctx)
    with pytest.raises(AttributeError):
        ctx.event_id = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ctx.redelivered = False  # type: ignore[misc]

    first = p.decode_event(_line({"seq": 1, "request_id": 9, "action": "disconnected", "params": {"context": c}}))
    assert isinstance(first, p.Disconnected) and first.seq == 1
    assert first.context.event_id == "9" and first.context.redelivered is False
    for action, params in (("new_connection", {"context": c}), ("error", {"error": "e", "context": c})):
        e = p.decode_event(_line({"seq": 3, "request_id": "x", "action": action, "params": params}))
        assert e is not None and e.seq == 3 and e.context.event_id == "x"  # type: ignore[attr-defined]

    # v1 events: no seq, no event id
    v1 = p.decode_event(_line({"request_id": "5", "action": "new_message", "redelivered": True, "params": {"message": "m", "context": c}}))
    assert isinstance(v1, p.NewMessage) and v1.seq == 0
    assert v1.context.event_id is None and v1.context.redelivered is False

    # hand-built and from_json contexts: defaults, JSON form as documented
    built = Context.from_json(c)
    assert built.event_id is None and built.redelivered is False
    assert built.to_json() == c and Context("a").event_id is None


def test_decode_seq_on_skipped_frames(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="pystrands.protocol"):
        for frame in (
            {"seq": 4, "action": "presence", "params": {}},  # unknown action
            {"seq": 5, "action": "new_message", "params": {"message": 1}},  # malformed event
            {"seq": 6, "action": "new_message", "params": "nope"},
            {"seq": 7, "action": "heartbeat", "params": {}},
        ):
            ev = p.decode_event(_line(frame))
            assert isinstance(ev, p.Skipped) and ev.control and ev.seq == frame["seq"], frame
        # an invalid seq is ignored (logged), the event itself is kept
        for bad in (0, -3, "5", 1.5, True):
            ev = p.decode_event(_line({"seq": bad, "action": "new_message", "params": {"message": "m", "context": {"client_id": "c"}}}))
            assert isinstance(ev, p.NewMessage) and ev.seq == 0 and ev.context.event_id is None
    assert "invalid seq" in caplog.text


def test_ack_tracker_in_order() -> None:
    t = AckTracker()
    assert (t.watermark, t.sent, t.due, t.take()) == (0, 0, False, 0)
    for seq in (1, 2, 3):
        assert t.dispatch(seq)
    assert t.done(1) and t.watermark == 1
    assert t.done(2) and t.done(3) and t.watermark == 3 and t.pending == 0
    assert t.due and t.take() == 3 and not t.due and t.take() == 0


def test_ack_tracker_out_of_order_waits_for_the_slow_one() -> None:
    t = AckTracker()
    for seq in range(1, 11):
        t.dispatch(seq)
    # seq 1 is slow; 2..10 finish first: the watermark must not move
    for seq in range(10, 1, -1):
        assert t.done(seq) is False
        assert t.watermark == 0
    assert t.done(1) is True and t.watermark == 10 and t.pending == 0
    # slow one in the middle
    for seq in range(11, 16):
        t.dispatch(seq)
    assert t.done(11) and t.watermark == 11
    assert not t.done(13) and not t.done(14) and t.watermark == 11
    assert t.done(12) and t.watermark == 14
    assert t.done(15) and t.watermark == 15


def test_ack_tracker_gaps_skips_and_duplicates(caplog: pytest.LogCaptureFixture) -> None:
    t = AckTracker()
    t.dispatch(1)
    with caplog.at_level(logging.WARNING, logger="pystrands.protocol"):
        assert t.dispatch(4)  # 2 and 3 were lost in undecodable lines
        assert not t.dispatch(4) and not t.dispatch(2)  # duplicate / reordered: not tracked
    assert "2..3" in caplog.text and "not be acknowledged" in caplog.text
    assert t.done(1) and t.watermark == 3  # lost seqs count as handled
    assert t.done(4) and t.watermark == 4
    assert t.skip(5) and t.watermark == 5  # nothing in flight: a skipped seq moves it
    t.dispatch(6)
    assert not t.skip(7) and t.watermark == 5  # 6 still in flight
    assert not t.skip(7)  # not above the top: ignored
    assert t.done(6) and t.watermark == 7


def test_ack_tracker_matches_a_reference_model() -> None:
    rng = random.Random(1234)
    for _ in range(50):
        t = AckTracker()
        n = rng.randint(1, 200)
        order = list(range(1, n + 1))
        rng.shuffle(order)
        for seq in range(1, n + 1):
            t.dispatch(seq)
        finished: set[int] = set()
        for seq in order:
            moved_before = t.watermark
            t.done(seq)
            finished.add(seq)
            expected = 0
            while expected + 1 in finished:
                expected += 1
            assert t.watermark == expected
            assert t.watermark >= moved_before
        assert t.watermark == n and t.pending == 0
