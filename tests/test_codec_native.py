"""Differential tests of the native inbound codec (``pystrands._core.LineDecoder``).

The pure-Python codec (``LineFramer`` + ``decode_event``) is the reference: both codecs are fed
the same streams, split at random chunk boundaries, and must give identical event sequences
(type and every attribute, context fields, ``event_id``, ``redelivered``), identical
``dropped_lines`` and identical log records. Well-formed frames must take the native path (no
fallbacks), so a bug there cannot hide behind the fallback — except the broker's ``hello`` answer,
which the native decoder always leaves to the reference (once per connection, and its fields grow
with the protocol).
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

import pytest

from pystrands import _protocol as p
from pystrands._session import Session

LineDecoder = pytest.importorskip("pystrands._core").__dict__.get("LineDecoder")
if LineDecoder is None:  # pragma: no cover - an extension built without the codec
    pytest.skip("pystrands._core has no LineDecoder", allow_module_level=True)

BIG = 64 * 1024 * 1024


# ---------------------------------------------------------------------------- comparing


def canon(value: Any) -> Any:
    """A value with its exact Python types (``1 != 1.0 != True``, ``0.0 != -0.0``)."""
    if isinstance(value, dict):
        return ("dict", [(canon(k), canon(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [canon(v) for v in value])
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)


def context_facts(ctx: Any) -> Any:
    facts = [type(ctx).__name__, ctx.client_id, ctx.room_id, canon(ctx.metadata)]
    # whether the v2 facts were set at all (not only what the properties read)
    facts += [hasattr(ctx, "_event_id") and ctx._event_id, hasattr(ctx, "_redelivered") and ctx._redelivered]
    facts += [ctx.event_id, ctx.redelivered, sorted(vars(ctx)), canon(ctx.user_id)]
    return facts


def snap(ev: Any) -> Any:
    """Everything observable about one event."""
    out: list[Any] = [type(ev).__name__, ev.kind, ev.control, canon(ev.key), canon(ev.seq)]
    if isinstance(ev, p.Heartbeat):
        out.append(ev is p.HEARTBEAT)
    if isinstance(ev, (p.NewMessage, p.NewConnection, p.Disconnected, p.ErrorEvent)):
        out.append(context_facts(ev.context))
    if isinstance(ev, p.NewMessage):
        out.append(canon(ev.message))
    if isinstance(ev, p.ErrorEvent):
        out.append(canon(ev.error))
    if isinstance(ev, p.HelloReply):
        out += [canon(ev.ok), canon(ev.error), canon(ev.version), canon(ev.features), canon(ev.heartbeat_interval)]
    if isinstance(ev, p.QueryReply):
        params = dict(ev.params)
        if isinstance(params.get("members"), list):
            params["members"] = [None if m is None else context_facts(m) for m in params["members"]]
        out += [canon(ev.request_id), canon(params)]
    if isinstance(ev, p.ConnectionRequest):
        r = ev.request
        cid = r.context.client_id  # a fresh uuid4 each time: compare its shape only
        assert isinstance(cid, str) and len(cid) == 36 and cid[14] == "4"
        out += [canon(ev.request_id), canon(r.url), canon(r.remote_addr), canon(r.query), r.accepted]
        out += [canon(r._wire_headers), r.headers.to_json(), r.context.room_id, canon(r.context.metadata)]
    return out


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.levelname, record.getMessage()))


def run(codec: str, chunks: Iterable[bytes], limit: int) -> tuple[list[Any], int, list[Any], Any]:
    logger = logging.getLogger("pystrands.protocol")
    handler = Records()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    events: list[Any] = []
    try:
        if codec == "python":
            framer = p.LineFramer(limit)
            for chunk in chunks:
                for line in framer.feed(chunk):
                    ev = p.decode_event(line)
                    if ev is not None:
                        events.append(snap(ev))
            dec: Any = framer
        else:
            dec = LineDecoder(limit)
            for chunk in chunks:
                events += [snap(ev) for ev in dec.feed(chunk)]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return events, dec.dropped_lines, handler.seen, dec


def split(stream: bytes, rng: random.Random) -> list[list[bytes]]:
    """The stream whole, byte by byte (a prefix), and at random boundaries."""
    ways = [[stream], [stream[i : i + 1] for i in range(min(len(stream), 2000))] + [stream[2000:]]]
    for n in (3, 40, 500):
        if len(stream) > n:
            cuts = sorted(rng.sample(range(1, len(stream)), n))
            ways.append([stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])])
    return ways


def hello_lines(stream: bytes) -> int:
    """Lines of a well-formed stream that are the broker's ``hello`` answer."""
    return sum(1 for line in stream.split(b"\n") if line.strip() and json.loads(line).get("action") == "hello")


def check(stream: bytes, limit: int = BIG, seed: int = 0, native_only: bool = False) -> list[Any]:
    """Both codecs agree on ``stream`` however it is chunked; returns the events."""
    rng = random.Random(seed)
    want, dropped, logs, _ = run("python", [stream], limit)
    for chunks in split(stream, rng):
        assert b"".join(chunks) == stream
        py_events, py_dropped, py_logs, _ = run("python", chunks, limit)
        nat_events, nat_dropped, nat_logs, dec = run("native", chunks, limit)
        assert nat_events == py_events
        assert nat_dropped == py_dropped
        assert nat_logs == py_logs
        assert py_events == want
        assert py_dropped == dropped
        if native_only:
            assert dec.fallbacks == hello_lines(stream), "a well-formed frame went to the Python decoder"
    return want


# ------------------------------------------------------------------------------ frames


def ctx(client_id: str = "c1", room_id: str = "room", metadata: Any = None) -> dict[str, Any]:
    return {"client_id": client_id, "room_id": room_id, "metadata": {} if metadata is None else metadata}


def frame(action: str, params: dict[str, Any], rid: Any = "7", **top: Any) -> bytes:
    obj: dict[str, Any] = {"request_id": rid, "action": action, "params": params, **top}
    return json.dumps(obj).encode() + b"\n"


HEADERS = {"X-Token": ["secret"], "Sec-Websocket-Key": ["abc=="], "Accept": ["a", "b"]}

KINDS = [
    frame("new_message", {"message": "hi", "context": ctx()}),
    frame("new_message", {"message": "", "context": ctx("", "", {"k": [1, 2.5, None, True, "x"]})}),
    frame("new_connection", {"context": ctx("c2", "r2", {"user": "ann"})}),
    frame("disconnected", {"context": ctx("c3")}),
    frame("error", {"error": "boom", "context": ctx("c4")}),
    frame("error", {"error": "no context"}),
    frame("error", {"context": ctx("c5")}),
    frame("connection_request", {"headers": HEADERS, "url": "/ws/chat", "remote_addr": "1.2.3.4:5", "query": "a=1"}, "c9"),
    frame("connection_request", {"headers": {}, "url": "/", "remote_addr": "x"}, "c10"),
    frame("connection_request", {"url": "/q", "remote_addr": "x", "query": None}, "c11"),
    frame("connection_request", {}, "c12"),
    frame("heartbeat", {}, "heartbeat"),
    frame("hello", {"ok": True, "version": 2, "features": ["ack", "heartbeat"], "heartbeat_interval": 15.0}, "hello"),
    frame("hello", {"ok": True, "version": 2, "features": ["ack"], "heartbeat_interval": 2}, "hello"),
    frame("hello", {"ok": True}, "hello"),
    frame("hello", {"ok": True, "heartbeat_interval": 0}, "hello"),
    frame("hello", {"ok": True, "heartbeat_interval": -1.5, "version": 2.0, "features": "ack"}, "hello"),
    frame("hello", {"ok": True, "features": ["ack", 3, None, "x"], "version": True}, "hello"),
    frame("hello", {"ok": False, "error": "bad secret"}, "hello"),
    # query replies (feature `rooms`): members as Contexts, known keys only
    frame("reply", {"members": [ctx("a", "r", {"k": [1]}), {**ctx("b"), "user_id": "u"}, {}], "complete": True}, "q1"),
    frame("reply", {"members": [], "complete": False, "missing": ["n2", "unknown (x)"]}, "q2"),
    frame("reply", {"count": 3, "extra": {"ignored": True}}, "q3"),
    frame("reply", {"error": "room_count: room_id is empty"}, "q4"),
    frame("reply", {}, "q5"),
    frame("new_connection", {"context": {**ctx("c14"), "user_id": "u1"}}),
    frame("new_connection", {"context": {**ctx("c15"), "user_id": None}}),
    # v2 facts
    frame("new_message", {"message": "v2", "context": ctx()}, "1007", seq=41),
    frame("new_message", {"message": "again", "context": ctx()}, "1007", seq=42, redelivered=True),
    frame("new_message", {"message": "m", "context": ctx()}, "1008", seq=43, redelivered=False),
    frame("new_message", {"message": "m", "context": ctx()}, "1009", seq=44, redelivered=[True]),
    frame("new_message", {"message": "m", "context": ctx()}, None, seq=45),
    frame("new_connection", {"context": ctx("c6")}, "1010", seq=46, redelivered=True),
    frame("disconnected", {"context": ctx("c7")}, "1011", seq=47),
    frame("error", {"error": "e", "context": ctx("c8")}, "1012", seq=48),
    frame("error", {"error": "e"}, "1013", seq=49),
    frame("heartbeat", {}, "heartbeat", seq=50),
    frame("hello", {"ok": True}, "hello", seq=51),
    frame("connection_request", {"url": "/s", "remote_addr": "r"}, "c13", seq=52),
    frame("new_message", {"message": "big seq", "context": ctx()}, "1014", seq=2**64 - 1),
    # unknown keys anywhere, key order, null params
    b'{"params":{"context":{"metadata":null,"x":[{}],"room_id":"r","client_id":"c"},"message":"m","y":1},'
    b'"zzz":{"a":[1,{"b":null}]},"action":"new_message","request_id":"1"}\n',
    b'{"action":"heartbeat","params":null}\n',
    b'{"action":"heartbeat"}\n',
    b'{"action":"error","params":null}\n',
]


def test_every_frame_kind_takes_the_native_path_and_matches() -> None:
    events = check(b"".join(KINDS), native_only=True)
    assert len(events) == len(KINDS)


UNICODE = [
    frame("new_message", {"message": "héllo wörld ✓ 😀 中文", "context": ctx("ü", "r\u00e9", {"ключ": "значение"})}),
    json.dumps({"action": "new_message", "params": {"message": "é😀\n\t\"\\/\x00\x1f", "context": ctx()}}).encode()
    + b"\n",
    b'{"action":"new_message","params":{"message":"\\u00e9\\ud83d\\ude00\\u0041\\/","context":'
    b'{"client_id":"\\u0063","room_id":"r","metadata":{"k\\u00e9y":"v","\\n":1}}}}\n',
    json.dumps({"action": "new_message", "params": {"message": "x" * 100_000, "context": ctx()}}).encode() + b"\n",
    b"  \t{\"action\": \"new_message\" , \"params\" : {\"message\" : \"spaced\", \"context\": {}}}  \r\n",
]


def test_unicode_and_escapes() -> None:
    check(b"".join(UNICODE), native_only=True)


NUMBERS = [
    0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1, 0.5, -2.25, 1.5e18, 5e-324, 1.5e-300,
    0.1, 123.456e-7, 0.0,
]  # integral floats of 2**63 and beyond go to Python (they might be integers orjson made floats)
ODD_NUMBERS = [b"2e0", b"1E2", b"1.0", b"-0.0", b"-0", b"18446744073709551616", b"-9223372036854775809",
               b"9223372036854775808", b"123456789012345678901234567890", b"1e400", b"1e-400", b"-1e-400",
               b"0.30000000000000004", b"1.00000000000000000000000001", b"1e19", b"9.3e18", b"-1e19",
               b"NaN", b"Infinity", b"-Infinity", b"1e300", b"1.7976931348623157e308", b"01", b"1.", b".5", b"+1", b"0x10", b"1e", b"-"]


def test_numbers_have_orjson_types_and_values() -> None:
    ok = [frame("new_message", {"message": "n", "context": ctx(metadata={"n": n, "l": [n]})}) for n in NUMBERS]
    check(b"".join(ok), native_only=True)
    odd = [b'{"action":"new_message","params":{"message":"n","context":{"metadata":{"n":' + n + b"}}}}\n"
           for n in ODD_NUMBERS]
    odd += [b'{"action":"new_message","params":{"message":"n","context":{"metadata":' + n + b"}}}\n" for n in ODD_NUMBERS]
    odd += [b'{"seq":' + n + b',"action":"new_message","params":{"message":"n","context":{}}}\n' for n in ODD_NUMBERS]
    odd += [b'{"unknown":' + n + b',"action":"new_message","params":{"message":"n","context":{}}}\n' for n in ODD_NUMBERS]
    odd += [b'{"action":"hello","params":{"ok":true,"heartbeat_interval":' + n + b',"version":' + n + b"}}\n"
            for n in ODD_NUMBERS]
    check(b"".join(odd))


def nested(depth: int) -> Any:
    value: Any = {"leaf": [1, "two", None]}
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def test_nested_metadata() -> None:
    check(b"".join(frame("new_message", {"message": "d", "context": ctx(metadata=nested(d))}) for d in (0, 5, 60)),
          native_only=True)
    deep = [b'{"action":"new_message","params":{"message":"d","context":{"metadata":' + b'{"k":[' * d + b"1"
            + b"]}" * d + b"}}}\n" for d in (62, 63, 64, 100, 511, 512, 513)]
    deep.append(b'{"action":"new_message","params":{"message":"m","context":{"metadata":' + b"[" * 1100 + b"]" * 1100
                + b"}}}\n")
    deep.append(b'{"action":"new_message","params":{"message":' + b"[" * 100_000 + b"]" * 100_000 + b"}}\n")
    check(b"".join(deep))


HOSTILE = [
    b"this is not json\n",
    b'{"action":"new_message","params":{"message":"unterminated\n',
    b'{"action":"new_message","params":{"message":"\xff\xfe bad utf-8","context":{"client_id":"c1"}}}\n',
    b'{"action":"new_message","params":{"message":"ok","context":{"client_id":"c1"}}}\xff\n',
    b'{"action":"new_message","params":{"message":"\xed\xa0\x80 surrogate bytes","context":{}}}\n',
    b'{"action":"new_message","params":{"message":"\\ud800 lone","context":{}}}\n',
    b'{"action":"new_message","params":{"message":"\\udc00\\ud800","context":{}}}\n',
    b'{"action":"new_message","params":{"message":"raw \x01 control","context":{}}}\n',
    b'\xef\xbb\xbf{"action":"heartbeat"}\n',
    b"[1, 2, 3]\n", b'"just a string"\n', b"42\n", b"null\n", b"true\n", b"{}\n", b"{\n", b"}\n",
    b'{"action":"new_message","params":[1,2]}\n',
    b'{"action":"new_message","params":"text"}\n',
    b'{"action":"new_message","params":{"message":7,"context":{"client_id":"c1"}}}\n',
    b'{"action":"new_message","params":{"message":null,"context":{}}}\n',
    b'{"action":"new_message","params":{"message":"m","context":"not an object"}}\n',
    b'{"action":"new_message","params":{"message":"m","context":null}}\n',
    b'{"action":"new_message","params":{"message":"m","context":{"client_id":5}}}\n',
    b'{"action":"new_message","params":{"message":"m","context":{"room_id":null}}}\n',
    b'{"action":"new_message","params":{"message":"m"}}\n',
    b'{"action":"new_message","params":{"message":"m","context":{}},"seq":0}\n',
    b'{"action":"new_message","params":{"message":"m","context":{}},"seq":-3}\n',
    b'{"action":"new_message","params":{"message":"m","context":{}},"seq":1.0}\n',
    b'{"action":"new_message","params":{"message":"m","context":{}},"seq":"1"}\n',
    b'{"action":"new_message","params":{"message":"m","context":{}},"seq":true}\n',
    b'{"action":"new_message","params":{"message":"m","context":{}},"seq":5,"request_id":17}\n',
    b'{"action":"new_message","params":{"message":"m","context":{}},"seq":5,"request_id":1.5e300}\n',
    b'{"action":"new_message","params":{"message":"m","context":{}},"seq":5,"request_id":{"a":1}}\n',
    b'{"action":"new_message","params":{"message":7},"seq":6}\n',
    b'{"action":"frobnicate","params":{"x":1},"seq":7}\n',
    b'{"action":"reply","params":{"members":[{"client_id":"a"},5,null]}}\n',
    b'{"action":"reply","request_id":"q","params":{"members":[{"client_id":"a"},5,null],"complete":true}}\n',
    b'{"action":"reply","request_id":"q","params":{"members":"all","complete":"yes","error":null}}\n',
    b'{"action":"reply","request_id":"q","params":{"members":[{"client_id":1}]}}\n',
    b'{"action":"reply","request_id":"q","params":{"members":[{"user_id":7}]}}\n',
    b'{"action":"reply","request_id":"q","params":{"count":1.0,"missing":{}}}\n',
    b'{"action":"reply","request_id":"q","params":{"count":1},"seq":9}\n',
    b'{"action":"reply","request_id":5,"params":{"count":1}}\n',
    b'{"action":"new_message","params":{"message":"m","context":{"user_id":5}}}\n',
    b'{"action":"frobnicate","params":{"x":1}}\n',
    b'{"action":"new\\u005fmessage","params":{"message":"escaped action","context":{}}}\n',
    b'{"action":"new_message","params":{"mess\\u0061ge":"escaped key","context":{}}}\n',
    b'{"action":"new_message","action":"disconnected","params":{"message":"dup","context":{}}}\n',
    b'{"action":"new_message","params":{"message":"a","message":"b","context":{}}}\n',
    b'{"action":"new_message","params":{"message":"a","context":{"client_id":"x","client_id":"y"}}}\n',
    b'{"action":"new_message","params":{"message":"m","context":{"metadata":{"a":1,"a":2}}}}\n',
    b'{"action":"disconnected","params":{"context":[]}}\n',
    b'{"action":"error","params":{"error":5,"context":{}}}\n',
    b'{"action":"error","params":{"error":null,"context":{}}}\n',
    b'{"action":"error","params":{"error":"e","context":null}}\n',
    b'{"action":"connection_request","params":{"url":"/x"}}\n',
    b'{"action":"connection_request","request_id":null,"params":{"url":"/x"}}\n',
    b'{"action":"connection_request","request_id":5,"params":{"url":"/x"}}\n',
    b'{"action":"connection_request","request_id":[1],"params":{"url":"/x"}}\n',
    b'{"action":"connection_request","request_id":"c1","params":{"url":5}}\n',
    b'{"action":"connection_request","request_id":"c1","params":{"query":5}}\n',
    b'{"action":"connection_request","request_id":"c1","params":{"headers":[["a","b"]]}}\n',
    b'{"action":"connection_request","request_id":"c1","params":{"headers":"x"}}\n',
    b'{"action":"connection_request","request_id":"c1","params":{"headers":null,"url":"/n"}}\n',
    b'{"action":"connection_request","request_id":"c1","params":{"headers":{"A":"not a list","B":[1]}}}\n',
    b'{"action":"hello","params":{"ok":"yes"}}\n',
    b'{"action":"hello","params":{"version":2,"features":["ack"]}}\n',
    b'{"action":"hello","params":{"ok":true,"error":5}}\n',
    b'{"action":"hello","params":{"ok":false,"error":null}}\n',
    b'{"action":"hello","params":{"ok":true,"heartbeat_interval":"15"}}\n',
    b'{"action":"hello","params":{"ok":true,"heartbeat_interval":true}}\n',
    b'{"params":{"message":"no action"}}\n',
    b'{"action":null,"params":{}}\n',
    b'{"action":5,"params":{}}\n',
    b'{"action":"heartbeat","params":{}} trailing\n',
    b'{"action":"heartbeat","params":{}}{}\n',
    b'{"action":"heartbeat",}\n',
    b'{"action":NaN}\n',
    b'{"action":"new_message","params":{"message":"m","context":{"metadata":NaN}}}\n',
    b'{"action":"new_message","params":{"message":"m","context":{"metadata":[Infinity]}}}\n',
    b"\n", b"   \n", b"\r\n", b"\t\x0b\x0c \r\n", b"\r\r\n", b"\x00\n",
    b'{"action":"heartbeat"}\r\r\n',
    b'{"action":"heartbeat"}\r \n',
    b'{"action":"heartbeat"\r}\n',
    b'{"action":"new_message","params":{"message":"' + b"x" * 5000 + b'","context":{"client_id":"c1"}}}\n',
    b"y" * 3000 + b"\r\n",
]


def test_hostile_lines_match_the_reference() -> None:
    good = [frame("new_message", {"message": f"ok-{i}", "context": ctx()}) for i in range(len(HOSTILE))]
    stream = b"".join(g + h for g, h in zip(good, HOSTILE))
    events = check(stream, limit=1024)
    assert [e[6] for e in events if e[0] == "NewMessage"][: 3] == [("str", "ok-0"), ("str", "ok-1"), ("str", "ok-2")]
    check(stream, limit=BIG, seed=1)
    check(stream, limit=40, seed=2)


@pytest.mark.parametrize("limit", [1, 2, 5, 10, 37, 38, 39, 64, 1000])
def test_overlong_lines_crlf_and_resync(limit: int) -> None:
    hb = b'{"action":"heartbeat"}'  # 22 bytes
    msg = frame("new_message", {"message": "m", "context": ctx()})  # 92 bytes
    pieces = [hb + b"\n", hb + b"\r\n", b"x" * limit + b"\n", b"x" * limit + b"\r\n", b"x" * (limit + 1) + b"\n",
              b"x" * (limit + 1) + b"\r\n", b"x" * (limit + 2) + b"\r\n", msg, msg[:-1] + b"\r\n", b"\n" * 3,
              b"z" * (3 * limit + 5) + b"\n", hb + b"\n"]
    rng = random.Random(limit)
    stream = b"".join(rng.choice(pieces) for _ in range(300))
    check(stream, limit=limit, seed=limit)


# ------------------------------------------------------------------------- random frames


def rand_str(rng: random.Random) -> str:
    alphabet = "abcXYZ019 _-/\\\"'\n\t\x00\x1fé中😀\u2028\ufeff"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))


def rand_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, rng.randrange(-(10**12), 10**12)])
    if kind == 3:
        return rng.choice([0.0, 1.5, -2.5e-300, 1.5e18, rng.uniform(-1e6, 1e6), rng.random()])
    if kind in (4, 5):
        return rand_str(rng)
    if kind in (6, 7):
        return {rand_str(rng): rand_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))}
    return [rand_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]


def rand_context(rng: random.Random) -> dict[str, Any]:
    c: dict[str, Any] = {}
    if rng.random() < 0.9:
        c["client_id"] = rand_str(rng)
    if rng.random() < 0.9:
        c["room_id"] = rand_str(rng)
    if rng.random() < 0.8:
        c["metadata"] = rand_json(rng)
    if rng.random() < 0.3:
        c["user_id"] = rand_str(rng)
    if rng.random() < 0.1:
        c["extra"] = rand_json(rng)
    return c


def rand_frame(rng: random.Random) -> dict[str, Any]:
    action = rng.choice(["new_message", "new_message", "new_connection", "disconnected", "error",
                         "connection_request", "heartbeat", "hello"])
    params: dict[str, Any] = {}
    top: dict[str, Any] = {"action": action}
    if action == "new_message":
        params = {"message": rand_str(rng), "context": rand_context(rng)}
    elif action in ("new_connection", "disconnected"):
        params = {"context": rand_context(rng)}
    elif action == "error":
        params = {"error": rand_str(rng)} if rng.random() < 0.8 else {}
        if rng.random() < 0.8:
            params["context"] = rand_context(rng)
    elif action == "connection_request":
        headers = {rand_str(rng): [rand_str(rng) for _ in range(rng.randrange(3))] for _ in range(rng.randrange(4))}
        params = {"headers": headers, "url": rand_str(rng), "remote_addr": rand_str(rng)}
        if rng.random() < 0.5:
            params["query"] = rng.choice([None, rand_str(rng)])
    elif action == "hello":
        params = {"ok": rng.random() < 0.8}
        if rng.random() < 0.7:
            params.update(version=rng.choice([1, 2, 3]), features=rng.choice([[], ["ack"], ["ack", "heartbeat"]]))
        if rng.random() < 0.7:
            params["heartbeat_interval"] = rng.choice([15.0, 0.5, 1, 30, 0.001])
        if rng.random() < 0.3:
            params["error"] = rand_str(rng)
    if rng.random() < 0.2:
        params["unknown"] = rand_json(rng)
    top["params"] = params
    if action == "connection_request" or rng.random() < 0.9:
        top["request_id"] = rng.choice(["hello", "heartbeat", str(rng.randrange(10**9)), rand_str(rng), "c1"])
    if action != "connection_request" and rng.random() < 0.5:
        top["seq"] = rng.randrange(1, 2**40)
        if rng.random() < 0.5:
            top["redelivered"] = rng.choice([True, False])
    if rng.random() < 0.1:
        top["zz"] = rand_json(rng)
    items = list(top.items())
    rng.shuffle(items)
    return dict(items)


def dump(rng: random.Random, obj: Any) -> bytes:
    ascii_ = rng.random() < 0.5
    seps = rng.choice([(",", ":"), (", ", ": ")])
    end = rng.choice([b"\n", b"\n", b"\r\n"])
    return json.dumps(obj, ensure_ascii=ascii_, separators=seps).encode() + end


def test_random_valid_frames_take_the_native_path_and_match() -> None:
    rng = random.Random(14)
    stream = b"".join(dump(rng, rand_frame(rng)) for _ in range(3000))
    events = check(stream, native_only=True, seed=14)
    assert len(events) > 2500


def mutate(rng: random.Random, line: bytes) -> bytes:
    """A hostile variant of a valid line."""
    how = rng.randrange(7)
    body = line.rstrip(b"\r\n")
    if how == 0:  # truncated
        return body[: rng.randrange(len(body))] + b"\n"
    if how == 1:  # invalid UTF-8 somewhere
        i = rng.randrange(len(body))
        return body[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]) + body[i:] + b"\n"
    if how == 2:  # one byte replaced
        i = rng.randrange(len(body))
        return body[:i] + bytes([rng.randrange(256)]) + body[i + 1 :] + b"\n"
    obj = json.loads(body)
    if how == 3:  # a field of a wrong type
        target = obj.get("params") if isinstance(obj.get("params"), dict) and rng.random() < 0.7 else obj
        if isinstance(target.get("context"), dict) and rng.random() < 0.5:
            target = target["context"]
        if target:
            key = rng.choice(list(target))
            target[key] = rand_json(rng)
        return json.dumps(obj).encode() + b"\n"
    if how == 4:  # a field removed
        if obj:
            del obj[rng.choice(list(obj))]
        return json.dumps(obj).encode() + b"\n"
    if how == 5:  # NaN / Infinity somewhere
        return json.dumps({**obj, "params": {**(obj.get("params") or {}), "x": float("nan")}}).encode() + b"\n"
    return json.dumps(obj).encode()[: rng.randrange(1, 20)] + b"\r\n"


def test_random_hostile_streams_match_the_reference() -> None:
    rng = random.Random(1414)
    lines = []
    for _ in range(3000):
        line = dump(rng, rand_frame(rng))
        lines.append(mutate(rng, line) if rng.random() < 0.5 else line)
    stream = b"".join(lines)
    check(stream, seed=3)
    check(stream, limit=300, seed=4)


# --------------------------------------------------------------------- the decoder itself


def test_decoder_basics() -> None:
    dec = LineDecoder(10)
    assert dec.max_line_size == 10 and dec.buffered == 0 and dec.dropped_lines == 0 and dec.fallbacks == 0
    assert list(dec.feed(b'{"action":')) == [] and dec.buffered == 10
    dec.reset()
    assert dec.buffered == 0
    assert list(dec.feed(memoryview(b"\n{}\n"))) == []  # {} goes to Python: no action
    assert dec.fallbacks == 1
    assert list(dec.feed(bytearray(b'{"action":"heartbeat"}\n'))) == []  # 22 bytes > 10
    assert dec.dropped_lines == 1
    with pytest.raises(ValueError, match="max_line_size"):
        LineDecoder(0)
    with pytest.raises(TypeError):
        LineDecoder().feed("text")  # type: ignore[arg-type]


def test_feeding_again_drops_the_lines_not_iterated() -> None:
    dec = LineDecoder()
    it = dec.feed(KINDS[0] + KINDS[2])
    assert type(next(it)) is p.NewMessage
    assert [type(e) for e in dec.feed(KINDS[3])] == [p.Disconnected]


def test_decode_fallback_is_called_with_the_line() -> None:
    seen: list[bytes] = []

    def fallback(line: bytes) -> Any:
        seen.append(line)
        return None

    dec = LineDecoder(decode_fallback=fallback)
    assert [type(e) for e in dec.feed(b"garbage\r\n" + KINDS[0] + b'{"action":"x"}\n')] == [p.NewMessage]
    assert seen == [b"garbage", b'{"action":"x"}']


# ------------------------------------------------------------------------ the session


def test_session_picks_the_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYSTRANDS_PURE_PYTHON", raising=False)
    assert Session().codec == "native"
    assert type(Session().framer) is LineDecoder
    assert Session(codec="python").codec == "python"
    monkeypatch.setenv("PYSTRANDS_PURE_PYTHON", "0")
    assert Session().codec == "native"
    monkeypatch.setenv("PYSTRANDS_PURE_PYTHON", "1")
    s = Session()
    assert s.codec == "python" and type(s.framer) is p.LineFramer
    with pytest.raises(RuntimeError, match="native codec"):
        Session(codec="native")
    with pytest.raises(ValueError, match="codec"):
        Session(codec="rust")


def test_import_without_the_native_extension() -> None:
    """``import pystrands`` and the clients' session work with no ``_core`` at all."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'pystrands._core': raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pystrands, pystrands.client, pystrands.async_client\n"
        "from pystrands._session import Session\n"
        "s = Session(); s.connection_made()\n"
        "print(s.codec, [type(e).__name__ for e in s.receive_data(b'{\"action\":\"new_message\","
        "\"params\":{\"message\":\"m\",\"context\":{}}}\\n')])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYSTRANDS_PURE_PYTHON"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["python", "['NewMessage']"]


# ------------------------------------------------------------------------------ encoders

ENCODERS = [
    ("encode_room_message", 2),
    ("encode_private_message", 2),
    ("encode_broadcast", 1),
]

HOSTILE_TEXT = [
    "",
    "plain",
    'quote " backslash \\ slash /',
    "".join(chr(c) for c in range(0x20)) + "\x7f",
    "é ü ß — 中文 🎉 \u2028 \u2029 \ufeff",
    "\U0010ffff" * 3,
    "a" * 100_000,
]


@pytest.mark.parametrize("name, arity", ENCODERS)
def test_native_encoders_write_the_reference_bytes(name: str, arity: int) -> None:
    from pystrands import _core

    native, python = getattr(_core, name), getattr(p, name)
    rng = random.Random(name)
    texts = HOSTILE_TEXT + [rand_str(rng) for _ in range(500)]
    for i, text in enumerate(texts):
        args = [text, texts[(i * 7) % len(texts)]][:arity]
        rid = str(i)
        assert native(*args, request_id=rid) == python(*args, request_id=rid), args
    # Request ids of their own, each a fresh one, in the same line shape.
    a, b = json.loads(native(*["x"] * arity)), json.loads(native(*["x"] * arity))
    assert a["request_id"] != b["request_id"] and a["params"] == json.loads(python(*["x"] * arity))["params"]


@pytest.mark.parametrize("name, arity", ENCODERS)
def test_native_encoders_hand_odd_arguments_to_the_reference(name: str, arity: int) -> None:
    from pystrands import _core

    native, python = getattr(_core, name), getattr(p, name)
    for odd in (5, None, 1.5, ["a"], {"k": "v"}, True):
        args = ["room", odd][-arity:]
        assert native(*args, request_id="7") == python(*args, request_id="7")

    class Sub(str):
        pass

    args = [Sub("r"), Sub("m")][:arity]
    assert native(*args, request_id="1") == python(*args, request_id="1")
    surrogate = ["room", "\ud800"][-arity:]
    with pytest.raises(TypeError):
        python(*surrogate)
    with pytest.raises(TypeError):
        native(*surrogate)


def test_sessions_send_with_the_encoders_of_their_codec() -> None:
    from pystrands import _core

    assert Session(codec="native").encoders.room is _core.encode_room_message
    assert Session(codec="python").encoders.room is p.encode_room_message
