"""Unit tests of the ``rooms`` feature in the sans-I/O session (rooms, users, presence, moderation).

The session is driven with bytes and a fake clock only, as in tests/test_session.py: the
broker's lines go in through ``receive_data``, what the client would write comes out of
``data_to_send``. Every test runs against both inbound codecs (the native one when the
extension has it).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest

from pystrands import (
    BrokerUnavailable,
    ConnectionRequestContext,
    Context,
    QueryError,
    QueryTimeout,
    UnsupportedFeature,
)
from pystrands import _protocol as p
from pystrands._session import HELLO_WAIT, Query, Session

# The codec fixture (every test against both inbound codecs), the fake clock and the line helper
# are test_session.py's.
from test_session import CODEC, FakeClock, codec, line  # noqa: E402, F401  (codec: autouse fixture)

LIMITS = {"max_rooms_per_client": 100, "max_id_length": 16}


def hello_reply(features: tuple[str, ...] = ("ack", "heartbeat", "rooms"), limits: Any = LIMITS) -> bytes:
    params: dict[str, Any] = {"ok": True, "version": 2, "features": list(features), "heartbeat_interval": 15.0}
    if limits is not None:
        params["limits"] = limits
    return line({"request_id": "hello", "action": "hello", "params": params})


def reply(request_id: str, **params: Any) -> bytes:
    return line({"request_id": request_id, "action": "reply", "params": params})


def ctx(client_id: str, room_id: str = "lobby", user_id: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"client_id": client_id, "room_id": room_id, "metadata": {}}
    if user_id is not None:
        c["user_id"] = user_id
    return c


def frames(data: bytes) -> list[dict[str, Any]]:
    assert data == b"" or data.endswith(b"\n"), data
    return [json.loads(raw) for raw in data.splitlines()]


def actions(data: bytes) -> list[str]:
    return [f["action"] for f in frames(data)]


def session(clock: FakeClock | None = None, **kw: Any) -> Session:
    s = Session(clock=clock or FakeClock(), peer="broker:8081", **kw)
    assert s.codec == CODEC["name"]
    return s


def rooms_link(s: Session, features: tuple[str, ...] = ("ack", "heartbeat", "rooms"), limits: Any = LIMITS) -> int:
    """Bring a link up, write its hello, and have the broker answer it."""
    link = s.connection_made()
    assert actions(s.data_to_send()) == ["hello"]
    assert s.receive_data(hello_reply(features, limits)) == []
    return link


def one_frame(s: Session) -> bytes:
    data = s.data_to_send()
    assert data.count(b"\n") == 1, data
    return data


def rid_of(data: bytes) -> str:
    rid = json.loads(data)["request_id"]
    assert isinstance(rid, str)
    return rid


class Done:
    """An ``on_done`` callback that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


# ---------------------------------------------------------------------------- the hello


def test_hello_announces_rooms() -> None:
    s = session()
    s.connection_made()
    hello = frames(s.data_to_send())[0]
    assert hello["params"]["features"] == ["ack", "heartbeat", "rooms", "history"]
    assert p.V2_FEATURES == ("ack", "heartbeat", "rooms", "history")


def test_hello_answer_with_rooms_and_limits() -> None:
    s = session()
    assert s.rooms is None and s.features is None  # no link
    s.connection_made()
    s.data_to_send()
    assert s.rooms is None  # not answered yet
    s.receive_data(hello_reply())
    assert s.version == 2 and s.rooms is True
    assert s.features == frozenset({"ack", "heartbeat", "rooms"})
    assert s.limits == LIMITS and s.max_id_length == 16
    s.connection_lost()
    assert s.rooms is None and s.limits == LIMITS  # the last announced limits stay known


def test_hello_answer_without_rooms() -> None:
    s = session()
    rooms_link(s, ("ack", "heartbeat"), None)
    assert s.version == 2 and s.rooms is False and s.limits == {} and s.max_id_length is None


def test_a_v1_broker_has_no_rooms() -> None:
    s = session()
    s.connection_made()
    s.data_to_send()
    events = s.receive_data(line({"request_id": "1", "action": "new_message", "params": {"message": "m", "context": ctx("a")}}))
    assert len(events) == 1 and s.version == 1 and s.rooms is False
    with pytest.raises(UnsupportedFeature, match=r"does not support rooms/users \(a 1\.0 broker\?\)"):
        s.join_room("a", "r")


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({"max_rooms_per_client": 7, "max_id_length": 99}, {"max_rooms_per_client": 7, "max_id_length": 99}),
        ({"max_id_length": "99", "max_rooms_per_client": 0, "x": -1, "y": True, "z": 1.5, "future": 3}, {"future": 3}),
        ([1, 2], {}),
        ("big", {}),
        (None, {}),
    ],
)
def test_limits_parsing(limits: Any, expected: dict[str, int]) -> None:
    ev = p.decode_event(hello_reply(limits=limits))
    assert isinstance(ev, p.HelloReply) and ev.limits == expected
    s = session()
    rooms_link(s, limits=limits)
    assert s.limits == expected


# ------------------------------------------------------------------- command encodings


def test_every_command_encodes_to_the_documented_bytes() -> None:
    s = session()
    rooms_link(s)
    cases = [
        (lambda: s.join_room("c1", "r2"), 'join_room","params":{"client_id":"c1","room_id":"r2"}}'),
        (lambda: s.leave_room("c1", "lobby"), 'leave_room","params":{"client_id":"c1","room_id":"lobby"}}'),
        (
            lambda: s.room_message("lobby", "hi", ["a", "b", "a"]),
            'message_to_room","params":{"room_id":"lobby","message":"hi","exclude":["a","b"]}}',
        ),
        (lambda: s.room_message("lobby", "hi", "a"), 'message_to_room","params":{"room_id":"lobby","message":"hi","exclude":["a"]}}'),
        (lambda: s.room_message("lobby", "hi", ("x" for _ in range(1))), 'message_to_room","params":{"room_id":"lobby","message":"hi","exclude":["x"]}}'),
        (lambda: s.user_message("ann", "ping"), 'message_to_user","params":{"user_id":"ann","message":"ping"}}'),
        (lambda: s.disconnect_client("c1"), 'disconnect","params":{"client_id":"c1","code":1000,"reason":""}}'),
        (lambda: s.disconnect_client("c1", 4001, "bye é"), 'disconnect","params":{"client_id":"c1","code":4001,"reason":"bye é"}}'),
    ]
    for call, tail in cases:
        assert call() is True  # on the live link: the shell writes it
        data = one_frame(s)
        expected = f'{{"request_id":"{rid_of(data)}","action":"{tail}\n'
        assert data == expected.encode(), data


def test_queries_encode_a_unique_request_id_and_the_timeout() -> None:
    s = session()
    rooms_link(s)
    q1 = s.query_room_members("lobby", 2.0)
    q2 = s.query_room_members("lobby", 2.0)
    data = s.data_to_send()
    assert data == (
        b'{"request_id":"%s","action":"room_members","params":{"room_id":"lobby","timeout":2.0}}\n'
        b'{"request_id":"%s","action":"room_members","params":{"room_id":"lobby","timeout":2.0}}\n'
    ) % (q1.request_id.encode(), q2.request_id.encode())
    assert q1.request_id != q2.request_id
    q3 = s.query_room_count("r", 0.4)  # the broker answers within a part of it
    assert one_frame(s) == b'{"request_id":"%s","action":"room_count","params":{"room_id":"r","timeout":0.4}}\n' % q3.request_id.encode()
    s.query_room_count("r", 10)
    assert frames(s.data_to_send())[0]["params"]["timeout"] == 10.0
    assert s.pending_queries == 4


def test_exclude_is_omitted_when_empty_and_the_plain_send_is_unchanged() -> None:
    assert p.encode_room_message("lobby", "hi", "7") == b'{"request_id":"7","action":"message_to_room","params":{"room_id":"lobby","message":"hi"}}\n'
    assert p.encode_room_message("lobby", "hi", "7", []) == p.encode_room_message("lobby", "hi", "7")
    s = session()
    rooms_link(s)
    for empty in ([], (), set()):
        assert s.room_message("lobby", "hi", empty) is True
        data = one_frame(s)
        assert data == s.encoders.room("lobby", "hi", rid_of(data))  # type: ignore[call-arg]
        assert b"exclude" not in data
    # without exclude it is the 1.0 send, even on a broker without rooms
    s2 = session()
    rooms_link(s2, ("ack", "heartbeat"), None)
    assert s2.room_message("lobby", "hi", []) is True
    assert b"exclude" not in one_frame(s2)
    with pytest.raises(UnsupportedFeature):
        s2.room_message("lobby", "hi", ["a"])


# ---------------------------------------------------------------------- contexts, users


def test_context_without_user_id_is_exactly_1_0() -> None:
    c = Context("c1", "r1", {"k": [1]})
    assert c.user_id is None
    assert c.to_json() == {"client_id": "c1", "room_id": "r1", "metadata": {"k": [1]}}
    assert list(c.to_json()) == ["client_id", "room_id", "metadata"]
    assert repr(c) == "Context(client_id='c1', room_id='r1', metadata={'k': [1]})"
    assert Context.from_json({"client_id": "c1", "room_id": "r1", "metadata": {}, "user_id": None}).to_json() == {
        "client_id": "c1",
        "room_id": "r1",
        "metadata": {},
    }
    assert Context.from_json({"client_id": "c1"}).to_json() == {"client_id": "c1", "room_id": None, "metadata": None}


def test_context_user_id_round_trip() -> None:
    c = Context("c1", "r1", {}, user_id="ann")
    assert c.user_id == "ann"
    assert c.to_json() == {"client_id": "c1", "room_id": "r1", "metadata": {}, "user_id": "ann"}
    back = Context.from_json(c.to_json())
    assert back == c and back.user_id == "ann"
    assert c != Context("c1", "r1", {})  # part of equality when set
    assert "user_id='ann'" in repr(c)
    c.user_id = None
    assert c.to_json() == {"client_id": "c1", "room_id": "r1", "metadata": {}} and c == Context("c1", "r1", {})
    with pytest.raises(TypeError, match="user_id must be a str or None"):
        c.user_id = 5  # type: ignore[assignment]
    req = ConnectionRequestContext.from_json({"url": "/x", "context": {"client_id": "a", "room_id": "r", "metadata": {}, "user_id": "u"}})
    assert req.context.user_id == "u" and req.to_json()["context"]["user_id"] == "u"


def test_received_contexts_carry_the_user_id() -> None:
    s = session()
    rooms_link(s)
    data = b"".join(
        line({"seq": n, "request_id": str(n), "action": action, "params": params})
        for n, (action, params) in enumerate(
            [
                ("new_connection", {"context": ctx("a", user_id="ann")}),
                ("new_message", {"message": "m", "context": ctx("a", user_id="ann")}),
                ("new_message", {"message": "m", "context": ctx("b")}),
                ("disconnected", {"context": ctx("a", user_id="ann")}),
            ],
            start=1,
        )
    )
    events = s.receive_data(data)
    assert [e.context.user_id for e in events] == ["ann", "ann", None, "ann"]  # type: ignore[attr-defined]
    assert events[2].context.to_json() == ctx("b")  # type: ignore[attr-defined]
    assert events[0].context.to_json() == ctx("a", user_id="ann")  # type: ignore[attr-defined]


def test_a_context_with_a_non_string_user_id_is_malformed(caplog: pytest.LogCaptureFixture) -> None:
    s = session()
    rooms_link(s)
    bad = {"client_id": "a", "room_id": "r", "metadata": {}, "user_id": 5}
    with caplog.at_level(logging.WARNING, logger="pystrands.protocol"):
        assert s.receive_data(line({"request_id": "1", "action": "new_message", "params": {"message": "m", "context": bad}})) == []
    assert any("malformed context" in r.getMessage() for r in caplog.records)


def test_response_carries_the_user_id_only_when_set() -> None:
    req = ConnectionRequestContext(url="/chat", context=Context("c1", "lobby", {"a": 1}))
    assert p.response_for("c7", True, req) == (
        b'{"request_id":"c7","action":"response","params":{"accepted":true,"client_id":"c1","room_id":"lobby","metadata":{"a":1}}}\n'
    )
    req.context.user_id = "u1"
    assert p.response_for("c7", None, req) == (
        b'{"request_id":"c7","action":"response","params":{"accepted":true,"client_id":"c1","room_id":"lobby",'
        b'"metadata":{"a":1},"user_id":"u1"}}\n'
    )
    # a decoded request's context: set it in on_connection_request
    s = session()
    rooms_link(s)
    (ev,) = s.receive_data(line({"request_id": "c9", "action": "connection_request", "params": {"headers": {}, "url": "/x", "remote_addr": "1.2.3.4:5"}}))
    assert isinstance(ev, p.ConnectionRequest) and ev.request.context.user_id is None
    assert b"user_id" not in p.response_for(ev.request_id, True, ev.request)
    ev.request.context.user_id = "ann"
    assert json.loads(p.response_for(ev.request_id, True, ev.request))["params"]["user_id"] == "ann"


# -------------------------------------------------------------------------------- queries


def test_replies_are_matched_by_request_id_in_any_order() -> None:
    s = session()
    rooms_link(s)
    d1, d2 = Done(), Done()
    members = s.query_room_members("lobby", 5.0, d1)
    count = s.query_room_count("lobby", 5.0, d2)
    s.data_to_send()
    assert not members.done and not count.done
    assert s.receive_data(reply(count.request_id, count=3)) == []
    assert count.done and count.result() == 3 and d2.calls == 1
    assert not members.done and d1.calls == 0
    assert s.receive_data(reply(members.request_id, members=[ctx("a", user_id="ann"), ctx("b")], complete=True)) == []
    assert members.done and d1.calls == 1
    got = members.result()
    assert [c.client_id for c in got] == ["a", "b"] and [c.user_id for c in got] == ["ann", None]
    assert all(type(c) is Context for c in got)
    assert s.pending_queries == 0


def test_replies_are_never_acknowledged_and_never_reach_handlers() -> None:
    s = session()
    rooms_link(s)
    q = s.query_room_count("lobby")
    s.data_to_send()
    events = s.receive_data(
        line({"seq": 1, "request_id": "e1", "action": "new_message", "params": {"message": "m", "context": ctx("a")}})
        + reply(q.request_id, count=1)
    )
    assert [e.kind for e in events] == ["new_message"]  # the reply is not an event
    assert s.acks is not None and s.acks.watermark == 0  # nothing handled yet: the reply counts for nothing
    s.event_done(s.link, 1)
    assert frames(s.data_to_send()) == [{"request_id": "ack", "action": "ack", "params": {"seq": 1}}]


def test_a_reply_to_no_pending_query_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    s = session()
    rooms_link(s)
    q = s.query_room_count("lobby")
    s.data_to_send()
    with caplog.at_level(logging.DEBUG):
        assert s.receive_data(reply("q-unknown", count=9) + reply(q.request_id, count=2) + reply(q.request_id, count=5)) == []
    assert q.result() == 2  # the duplicate is ignored too
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("no pending query" in r.getMessage() for r in caplog.records) == 2


def test_an_error_reply_raises_query_error() -> None:
    s = session()
    rooms_link(s)
    q = s.query_room_members("lobby")
    s.data_to_send()
    s.receive_data(reply(q.request_id, error="room_members: room_id must not be empty"))
    with pytest.raises(QueryError, match=r"room_members\('lobby'\): the broker answered: room_members: room_id must not be empty"):
        q.result()
    bad = s.query_room_count("lobby")
    s.receive_data(reply(bad.request_id, count="three"))
    with pytest.raises(QueryError, match="malformed reply"):
        bad.result()
    worse = s.query_room_members("lobby")
    s.receive_data(reply(worse.request_id, members={"a": 1}))
    with pytest.raises(QueryError, match="malformed reply"):
        worse.result()


def test_an_incomplete_reply_returns_what_it_has_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("pystrands.test_client")
    s = session(log=log)
    rooms_link(s)
    q = s.query_room_members("lobby")
    s.data_to_send()
    with caplog.at_level(logging.WARNING):
        s.receive_data(reply(q.request_id, members=[ctx("a")], complete=False, missing=["node-b", "node-c"]))
    assert [c.client_id for c in q.result()] == ["a"]
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.name == "pystrands.test_client"
    assert "node-b, node-c" in record.getMessage() and "incomplete" in record.getMessage()


def test_a_dropped_link_fails_pending_queries() -> None:
    s = session()
    rooms_link(s)
    done = Done()
    q = s.query_room_members("lobby", 5.0, done)
    s.data_to_send()
    s.connection_lost()
    assert q.done and done.calls == 1 and s.pending_queries == 0
    with pytest.raises(BrokerUnavailable, match="lost before the reply"):
        q.result()
    assert isinstance(BrokerUnavailable("x"), ConnectionError)
    # a reply arriving on the next link means nothing
    rooms_link(s)
    assert s.receive_data(reply(q.request_id, members=[])) == []


def test_queries_without_a_link_raise_broker_unavailable() -> None:
    s = session()
    with pytest.raises(BrokerUnavailable, match=r"room_count\('lobby'\): not connected to the broker at broker:8081"):
        s.query_room_count("lobby")
    rooms_link(s)
    s.connection_lost()
    with pytest.raises(BrokerUnavailable):
        s.query_room_members("lobby")
    assert s.pending_queries == 0


def test_a_query_past_its_deadline_times_out_and_its_late_reply_is_ignored() -> None:
    s = session()
    rooms_link(s)
    q = s.query_room_members("lobby", 0.25)
    s.data_to_send()
    err = s.query_timed_out(q)
    assert isinstance(err, QueryTimeout) and isinstance(err, TimeoutError)
    assert "within 0.25s" in str(err) and s.pending_queries == 0
    s.receive_data(reply(q.request_id, members=[]))
    assert not q.done


def test_fail_queries_on_demand() -> None:
    s = session()
    rooms_link(s)
    q = s.query_room_count("lobby")
    s.fail_queries("disconnect() stopped reading")
    with pytest.raises(BrokerUnavailable, match="disconnect"):
        q.result()


# ------------------------------------------------------------------- unsupported feature


def test_a_broker_without_rooms_gets_unsupported_feature() -> None:
    s = session()
    rooms_link(s, ("ack", "heartbeat"), None)
    calls = [
        lambda: s.join_room("a", "r"),
        lambda: s.leave_room("a", "r"),
        lambda: s.room_message("r", "m", "a"),
        lambda: s.user_message("u", "m"),
        lambda: s.disconnect_client("a"),
        lambda: s.query_room_members("r"),
        lambda: s.query_room_count("r"),
    ]
    for call in calls:
        with pytest.raises(UnsupportedFeature, match=r"broker at broker:8081 does not support rooms/users \(a 1\.0 broker\?\)"):
            call()
    assert s.data_to_send() == b"" and s.pending_queries == 0
    assert issubclass(UnsupportedFeature, RuntimeError)


# ------------------------------------------------------------- kept and held commands


def test_commands_while_disconnected_are_kept_and_sent_in_order_after_the_hello_answer() -> None:
    s = session()
    assert s.join_room("a", "r2") is False  # kept, never raises
    assert s.send(p.encode_room_message("r2", "welcome")) is False
    assert s.disconnect_client("b", 4000, "kicked") is False
    assert s.buffered == 3
    s.connection_made()
    assert actions(s.data_to_send()) == ["hello"]  # the rest waits for the answer
    assert s.hello_deadline == 1000.0 + HELLO_WAIT
    s.receive_data(hello_reply())
    assert actions(s.data_to_send()) == ["join_room", "message_to_room", "disconnect"]
    assert s.hello_deadline == 0.0


def test_kept_commands_are_dropped_with_one_warning_when_the_next_broker_lacks_rooms(caplog: pytest.LogCaptureFixture) -> None:
    s = session()
    s.send(p.encode_broadcast("first"))
    s.join_room("a", "r2")
    s.send(p.encode_room_message("r2", "welcome"))
    s.user_message("ann", "hi")
    s.connection_made()
    assert actions(s.data_to_send()) == ["hello", "broadcast"]  # what came before the first command goes at once
    with caplog.at_level(logging.WARNING, logger="pystrands.session"):
        s.receive_data(hello_reply(("ack", "heartbeat"), None))
    assert actions(s.data_to_send()) == ["message_to_room"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Dropping 2 room/user command(s)" in warnings[0] and "a 1.0 broker?" in warnings[0]


def test_a_v1_broker_drops_kept_commands_at_its_first_line(caplog: pytest.LogCaptureFixture) -> None:
    s = session()
    s.join_room("a", "r2")
    s.send(p.encode_broadcast("after"))
    s.connection_made()
    assert actions(s.data_to_send()) == ["hello"]
    with caplog.at_level(logging.WARNING, logger="pystrands.session"):
        s.receive_data(line({"request_id": "heartbeat", "action": "heartbeat", "params": {}}))
    assert actions(s.data_to_send()) == ["broadcast"]
    assert sum("Dropping 1 room/user command(s)" in r.getMessage() for r in caplog.records) == 1


def test_commands_before_the_hello_answer_wait_for_it_with_later_sends() -> None:
    clock = FakeClock()
    s = session(clock)
    s.connection_made()
    s.data_to_send()
    assert s.join_room("a", "r2") is False  # not known yet whether the broker has rooms
    assert s.send(p.encode_room_message("r2", "welcome")) is False  # stays behind it
    q = s.query_room_count("r2")
    assert s.data_to_send() == b"" and not s.wants_write()
    assert s.next_deadline() == 1000.0 + HELLO_WAIT
    s.receive_data(hello_reply())
    assert actions(s.data_to_send()) == ["join_room", "message_to_room", "room_count"]
    assert s.pending_queries == 1 and not q.done


def test_no_hello_answer_in_time_releases_the_sends_and_drops_the_commands(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    s = session(clock)
    s.connection_made()
    s.data_to_send()
    s.join_room("a", "r2")
    s.send(p.encode_broadcast("x"))
    q = s.query_room_count("r2")
    clock.now += HELLO_WAIT - 0.01
    assert s.check_hello() is False and s.data_to_send() == b""
    clock.now += 0.02
    with caplog.at_level(logging.WARNING, logger="pystrands.session"):
        assert s.check_hello() is True
    assert actions(s.data_to_send()) == ["broadcast"]
    assert any("did not answer the hello within" in r.getMessage() for r in caplog.records)
    with pytest.raises(UnsupportedFeature):
        q.result()
    with pytest.raises(UnsupportedFeature):
        s.join_room("a", "r3")
    # a late answer with rooms still counts
    s.receive_data(hello_reply())
    assert s.rooms is True and s.join_room("a", "r3") is True


def test_a_command_past_the_hello_wait_joins_what_waits_for_the_timer() -> None:
    clock = FakeClock()
    s = session(clock)
    s.connection_made()
    s.data_to_send()
    s.join_room("a", "r")
    clock.now += HELLO_WAIT + 1  # the shell's timer is late
    assert s.send(p.encode_broadcast("x")) is False
    assert s.join_room("b", "r") is False  # still waiting: the timer releases all at once
    assert s.data_to_send() == b""
    assert s.check_hello() is True
    assert actions(s.data_to_send()) == ["broadcast"]


def test_a_command_after_the_hello_wait_on_a_silent_broker_raises() -> None:
    clock = FakeClock()
    s = session(clock)
    s.connection_made()
    s.data_to_send()
    clock.now += HELLO_WAIT
    with pytest.raises(UnsupportedFeature):
        s.join_room("a", "r")
    assert s.send(p.encode_broadcast("x")) is True


def test_held_sends_are_kept_when_the_link_drops_before_the_hello_answer() -> None:
    s = session()
    s.connection_made()
    s.data_to_send()
    s.join_room("a", "r2")
    s.send(p.encode_broadcast("x"))
    q = s.query_room_count("r2")
    assert s.connection_lost() == 0  # nothing queued for writing was lost
    assert s.buffered == 2 and q.done  # the query failed, the others wait for the next link
    rooms_link(s)
    assert actions(s.data_to_send()) == ["join_room", "broadcast"]


def test_command_errors_are_logged_on_the_client_logger(caplog: pytest.LogCaptureFixture) -> None:
    s = session(log=logging.getLogger("pystrands.test_client"))
    rooms_link(s)
    error = "join_room: client 'c1' is already in 100 rooms (max_rooms_per_client=100)"
    frame = {"request_id": "41", "action": "command_error", "params": {"command": "join_room", "error": error}}
    with caplog.at_level(logging.WARNING):
        assert s.receive_data(line(frame) + line({**frame, "params": {"command": 5}}) + line({**frame, "params": []})) == []
    records = [r for r in caplog.records if r.name == "pystrands.test_client"]
    assert len(records) == 2 and all(r.levelno == logging.WARNING for r in records)
    assert error in records[0].getMessage() and "join_room" in records[0].getMessage()
    assert "no reason given" in records[1].getMessage()


# -------------------------------------------------------------------------- validation


def test_argument_errors() -> None:
    s = session()
    rooms_link(s)
    for bad in (None, 5, b"c1", ["c1"]):
        with pytest.raises(TypeError, match="client_id must be a str"):
            s.join_room(bad, "r")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="room_id must be a str"):
        s.query_room_members(7)  # type: ignore[arg-type]
    for call in (lambda: s.join_room("", "r"), lambda: s.leave_room("a", ""), lambda: s.user_message("", "m")):
        with pytest.raises(ValueError, match="must not be empty"):
            call()
    long_id = "é" * 9  # 18 bytes > max_id_length 16
    with pytest.raises(ValueError, match=r"is 18 bytes long; the broker's max_id_length is 16"):
        s.join_room("c", long_id)
    with pytest.raises(ValueError, match="max_id_length"):
        s.user_message("u" * 17, "m")
    # Client ids are not limited (v1 backends may use long ones): only room and user ids are.
    assert s.join_room("c" * 300, "r") is True
    assert s.room_message("r", "m", ["ok", "x" * 300]) is True
    assert s.disconnect_client("c" * 300) is True
    with pytest.raises(ValueError, match="max_id_length"):
        s.query_room_count("r" * 17)
    assert s.join_room("x" * 16, "é" * 8) is True  # exactly at the limit
    with pytest.raises(TypeError, match="exclude must be a client id"):
        s.room_message("r", "m", 5)
    with pytest.raises(TypeError, match="exclude client id must be a str"):
        s.room_message("r", "m", ["a", 5])
    for code in (999, 1001, 3999, 5000, True, "1000", 1000.0, None):
        with pytest.raises(ValueError, match=re.escape(f"code={code!r}")):
            s.disconnect_client("a", code, "")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="124 bytes of UTF-8; a WebSocket close reason holds at most 123"):
        s.disconnect_client("a", 4000, "é" * 62)
    with pytest.raises(TypeError, match="reason must be a str"):
        s.disconnect_client("a", 4000, None)  # type: ignore[arg-type]
    for timeout in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            s.query_room_count("r", timeout)
    with pytest.raises(TypeError, match="timeout"):
        s.query_room_count("r", "5")  # type: ignore[arg-type]
    assert s.data_to_send().count(b"\n") == 4 and s.pending_queries == 0  # only the valid commands went
    assert s.disconnect_client("a", 4999, "é" * 61) is True  # 122 bytes
    assert s.disconnect_client("a", 1000) is True
    # without a known max_id_length only the type and emptiness are checked
    s2 = session()
    assert s2.join_room("x" * 1000, "r") is False
    with pytest.raises(ValueError, match="must not be empty"):
        s2.join_room("a", "")


# ----------------------------------------------------------------------- native probe


def test_query_result_before_the_answer_says_so() -> None:
    s = session()
    rooms_link(s)
    q: Query[int] = s.query_room_count("lobby")
    with pytest.raises(RuntimeError, match="no answer yet"):
        q.result()
    assert repr(q) == "room_count('lobby')"
