"""Unit tests of the ``history`` feature in the sans-I/O session: ``room_config`` (a command) and
``room_history`` (a query answered with a ``RoomHistory``).

As in tests/test_session_rooms.py (whose helpers these tests use), the session is driven with
bytes and a fake clock only, and every test runs against both inbound codecs. With the native
codec, a ``room_history`` reply is read by the reference codec (the native decoder of this
release drops its keys): the chunking tests below check that switch at every split point.
"""

from __future__ import annotations

import enum
import logging
import random
import re
from typing import Any

import pytest

import pystrands
from pystrands import (
    BrokerUnavailable,
    HistoryMessage,
    QueryError,
    QueryTimeout,
    RoomHistory,
    UnsupportedFeature,
)
from pystrands import _protocol as p
from pystrands._session import HELLO_WAIT, MAX_OFFSET, Session, native_decoder, native_keeps_history

# The codec fixture (autouse: every test against both inbound codecs), the fake clock and the
# helpers are test_session.py's and test_session_rooms.py's.
from test_session import CODEC, FakeClock, codec, line  # noqa: F401  (codec: autouse fixture)
from test_session_rooms import Done, actions, ctx, frames, hello_reply, one_frame, reply, rid_of, rooms_link, session

FEATURES = ("ack", "heartbeat", "rooms", "history")
ROOMS_ONLY = ("ack", "heartbeat", "rooms")
EPOCH = "5f0c2a9e01b7"


def history_link(s: Session, features: tuple[str, ...] = FEATURES) -> int:
    """A link whose broker announced ``features`` (by default with ``history``)."""
    return rooms_link(s, features)


def history_reply(request_id: str, offsets: range | list[int], complete: bool = True, epoch: str = EPOCH, last: int | None = None) -> bytes:
    messages = [{"offset": o, "data": f"m{o}"} for o in offsets]
    if last is None:
        last = messages[-1]["offset"] if messages else 0
    return reply(request_id, epoch=epoch, offset=last, messages=messages, complete=complete)


def expected(offsets: range | list[int], complete: bool = True, epoch: str = EPOCH, last: int | None = None) -> RoomHistory:
    messages = [HistoryMessage(o, f"m{o}") for o in offsets]
    if last is None:
        last = messages[-1].offset if messages else 0
    return RoomHistory(epoch, last, messages, complete)


def message_line(text: str, seq: int | None = None, client_id: str = "a") -> bytes:
    frame: dict[str, Any] = {"request_id": f"e-{text}", "action": "new_message", "params": {"message": text, "context": ctx(client_id)}}
    if seq is not None:
        frame["seq"] = seq
    return line(frame)


def texts(events: list[p.Event]) -> list[str]:
    out = []
    for ev in events:
        assert isinstance(ev, p.NewMessage), ev
        out.append(ev.message)
    return out


# ---------------------------------------------------------------------------- the hello


def test_hello_announces_history() -> None:
    s = session()
    s.connection_made()
    assert frames(s.data_to_send())[0]["params"]["features"] == ["ack", "heartbeat", "rooms", "history"]
    assert p.HISTORY_FEATURE == "history" and p.HISTORY_FEATURE in p.V2_FEATURES


def test_hello_answer_with_history(caplog: pytest.LogCaptureFixture) -> None:
    s = session()
    assert s.history is None  # no link
    s.connection_made()
    s.data_to_send()
    assert s.history is None  # not answered yet
    with caplog.at_level(logging.INFO, logger="pystrands.session"):
        s.receive_data(hello_reply(FEATURES))
    assert s.history is True and s.rooms is True and s.features == frozenset(FEATURES)
    assert any("Protocol v2" in r.getMessage() and ", rooms, history)" in r.getMessage() for r in caplog.records)
    s.connection_lost()
    assert s.history is None


def test_a_broker_with_rooms_but_without_history() -> None:
    s = session()
    history_link(s, ROOMS_ONLY)
    assert s.history is False and s.rooms is True
    why = r"needs the 'history' feature, and the broker at broker:8081 does not keep room history"
    with pytest.raises(UnsupportedFeature, match=why):
        s.room_config("lobby", history_size=10)
    with pytest.raises(UnsupportedFeature, match=r"room_history\('lobby'\) " + why):
        s.query_room_history("lobby")
    assert s.data_to_send() == b"" and s.pending_queries == 0
    assert s.join_room("a", "r") is True  # rooms still work
    assert actions(s.data_to_send()) == ["join_room"]


def test_a_broker_with_history_but_without_rooms() -> None:
    s = session()
    history_link(s, ("ack", "heartbeat", "history"))
    assert s.history is True and s.rooms is False
    assert s.room_config("lobby", presence=True) is True
    q = s.query_room_history("lobby")
    assert actions(s.data_to_send()) == ["room_config", "room_history"]
    with pytest.raises(UnsupportedFeature, match="does not support rooms/users"):
        s.join_room("a", "r")
    with pytest.raises(UnsupportedFeature, match="does not support rooms/users"):
        s.query_room_count("r")
    s.receive_data(history_reply(q.request_id, [1]))
    assert q.result() == expected([1])


@pytest.mark.parametrize(
    "first_line",
    [
        message_line("v1 event"),  # a v1 broker: something else before any hello answer
        line({"request_id": "heartbeat", "action": "heartbeat", "params": {}}),
    ],
)
def test_a_v1_broker_has_no_history(first_line: bytes) -> None:
    s = session()
    s.connection_made()
    s.data_to_send()
    s.receive_data(first_line)
    assert s.version == 1 and s.history is False
    with pytest.raises(UnsupportedFeature, match=r"a 1\.0 or older broker\?"):
        s.room_config("lobby", history_size=1)
    with pytest.raises(UnsupportedFeature):
        s.query_room_history("lobby")


def test_a_refused_hello_means_no_history() -> None:
    s = session()
    s.connection_made()
    s.data_to_send()
    s.receive_data(line({"request_id": "hello", "action": "hello", "params": {"ok": False, "error": "bad secret"}}))
    assert s.refused and s.history is None  # the shell closes the link


# ------------------------------------------------------------------------ room_config


class Size(enum.IntEnum):
    SMALL = 50


@pytest.mark.parametrize(
    ("kwargs", "params"),
    [
        ({"history_size": 200}, '{"room_id":"lobby","history_size":200}'),
        ({"history_size": 0}, '{"room_id":"lobby","history_size":0}'),
        ({"history_size": 100_000}, '{"room_id":"lobby","history_size":100000}'),
        ({"history_size": Size.SMALL}, '{"room_id":"lobby","history_size":50}'),
        ({"history_ttl": 600}, '{"room_id":"lobby","history_ttl":600.0}'),
        ({"history_ttl": 0.5}, '{"room_id":"lobby","history_ttl":0.5}'),
        ({"presence": True}, '{"room_id":"lobby","presence":true}'),
        ({"presence": False}, '{"room_id":"lobby","presence":false}'),
        ({"history_size": None, "presence": False}, '{"room_id":"lobby","presence":false}'),
        (
            {"history_size": 200, "history_ttl": 600, "presence": True},
            '{"room_id":"lobby","history_size":200,"history_ttl":600.0,"presence":true}',
        ),
    ],
)
def test_room_config_sends_only_the_given_fields(kwargs: dict[str, Any], params: str) -> None:
    s = session()
    history_link(s)
    assert s.room_config("lobby", **kwargs) is True  # on the live link: the shell writes it
    data = one_frame(s)
    assert data == f'{{"request_id":"{rid_of(data)}","action":"room_config","params":{params}}}\n'.encode()


CONFIG_ERRORS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({}, ValueError, "room_config needs at least one of history_size, history_ttl, presence"),
    ({"history_size": None, "history_ttl": None, "presence": None}, ValueError, "at least one of"),
    ({"history_size": -1}, ValueError, "history_size=-1: must be between 0 and 100000"),
    ({"history_size": 100_001}, ValueError, "history_size=100001: must be between 0 and 100000"),
    ({"history_size": True}, TypeError, "history_size must be an int, not bool"),
    ({"history_size": 10.0}, TypeError, "history_size must be an int, not float"),
    ({"history_size": "10"}, TypeError, "history_size must be an int, not str"),
    ({"history_ttl": 0}, ValueError, "history_ttl=0: must be a positive number of seconds"),
    ({"history_ttl": -5.0}, ValueError, "history_ttl=-5.0: must be a positive number of seconds"),
    ({"history_ttl": float("inf")}, ValueError, "history_ttl=inf: must be a positive number"),
    ({"history_ttl": float("nan")}, ValueError, "history_ttl=nan: must be a positive number"),
    ({"history_ttl": 10**400}, ValueError, "history_ttl=1000"),
    ({"history_ttl": True}, TypeError, "history_ttl must be a number of seconds, not bool"),
    ({"history_ttl": "60"}, TypeError, "history_ttl must be a number of seconds, not str"),
    ({"presence": 1}, TypeError, "presence must be a bool, not int"),
    ({"presence": "yes"}, TypeError, "presence must be a bool, not str"),
    ({"history_size": 5, "presence": "no"}, TypeError, "presence must be a bool"),  # nothing half-sent
]


@pytest.mark.parametrize(("kwargs", "error", "message"), CONFIG_ERRORS)
def test_room_config_argument_errors_name_the_argument(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    s = session()
    history_link(s)
    with pytest.raises(error, match=re.escape(message)):
        s.room_config("lobby", **kwargs)
    assert s.data_to_send() == b""
    # checked before the link is looked at: the same while disconnected (nothing kept)
    s.connection_lost()
    with pytest.raises(error, match=re.escape(message)):
        s.room_config("lobby", **kwargs)
    assert s.buffered == 0


def test_room_config_room_id_errors() -> None:
    s = session()
    history_link(s)  # max_id_length 16
    with pytest.raises(TypeError, match="room_id must be a str, not int"):
        s.room_config(5, history_size=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="room_id must not be empty"):
        s.room_config("", history_size=1)
    with pytest.raises(ValueError, match=r"is 18 bytes long; the broker's max_id_length is 16"):
        s.room_config("é" * 9, history_size=1)
    with pytest.raises(TypeError):
        s.room_config("lobby", 10)  # type: ignore[misc]  # the settings are keyword-only
    assert s.data_to_send() == b""
    assert s.room_config("é" * 8, history_size=1) is True  # exactly at the limit


def test_room_config_while_disconnected_is_kept_and_sent_in_order() -> None:
    s = session()
    assert s.room_config("lobby", history_size=100) is False  # kept, never raises
    assert s.send(p.encode_room_message("lobby", "first")) is False
    assert s.buffered == 2
    s.connection_made()
    assert actions(s.data_to_send()) == ["hello"]  # the rest waits for the answer
    s.receive_data(hello_reply(FEATURES))
    assert actions(s.data_to_send()) == ["room_config", "message_to_room"]


def test_kept_room_config_is_dropped_with_one_warning_when_the_next_broker_lacks_history(caplog: pytest.LogCaptureFixture) -> None:
    s = session()
    s.room_config("a", history_size=1)
    s.join_room("c1", "r")
    s.room_config("b", presence=True)
    s.send(p.encode_broadcast("after"))
    s.connection_made()
    assert actions(s.data_to_send()) == ["hello"]
    with caplog.at_level(logging.WARNING, logger="pystrands.session"):
        s.receive_data(hello_reply(ROOMS_ONLY))
    assert actions(s.data_to_send()) == ["join_room", "broadcast"]  # the rooms command goes, in order
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "Dropping 2 room_config command(s)" in warning
    assert "does not keep room history" in warning and "its hello answer does not list 'history'" in warning


def test_a_broker_without_either_feature_drops_each_kind_with_its_warning(caplog: pytest.LogCaptureFixture) -> None:
    s = session()
    s.room_config("a", history_size=1)
    s.join_room("c1", "r")
    s.connection_made()
    s.data_to_send()
    with caplog.at_level(logging.WARNING, logger="pystrands.session"):
        s.receive_data(hello_reply(("ack", "heartbeat")))
    assert s.data_to_send() == b""
    warnings = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert len(warnings) == 2
    assert "Dropping 1 room/user command(s)" in warnings[0] and "list 'rooms'" in warnings[0]
    assert "Dropping 1 room_config command(s)" in warnings[1] and "list 'history'" in warnings[1]


def test_room_config_and_history_before_the_hello_answer_wait_for_it() -> None:
    s = session()
    s.connection_made()
    s.data_to_send()
    assert s.room_config("lobby", history_size=10) is False  # not known yet whether the broker has history
    assert s.send(p.encode_room_message("lobby", "hi")) is False  # stays behind it
    q = s.query_room_history("lobby", since=3)
    assert s.data_to_send() == b"" and not s.wants_write()
    assert s.next_deadline() == 1000.0 + HELLO_WAIT
    s.receive_data(hello_reply(FEATURES))
    assert actions(s.data_to_send()) == ["room_config", "message_to_room", "room_history"]
    assert not q.done and s.pending_queries == 1


def test_a_hello_answer_without_history_releases_the_rest_and_fails_the_history_query() -> None:
    s = session()
    s.connection_made()
    s.data_to_send()
    s.room_config("lobby", history_size=10)
    members = s.query_room_members("lobby")
    history = s.query_room_history("lobby")
    s.receive_data(hello_reply(ROOMS_ONLY))
    assert actions(s.data_to_send()) == ["room_members"]
    assert history.done and not members.done and s.pending_queries == 1
    with pytest.raises(UnsupportedFeature, match=r"room_history\('lobby'\) needs the 'history' feature"):
        history.result()


def test_no_hello_answer_in_time_drops_room_config_and_fails_the_history_query() -> None:
    clock = FakeClock()
    s = session(clock)
    s.connection_made()
    s.data_to_send()
    s.room_config("lobby", presence=True)
    s.send(p.encode_broadcast("x"))
    q = s.query_room_history("lobby")
    clock.now += HELLO_WAIT
    assert s.check_hello() is True
    assert actions(s.data_to_send()) == ["broadcast"]
    with pytest.raises(UnsupportedFeature, match="'history' feature"):
        q.result()
    with pytest.raises(UnsupportedFeature):
        s.room_config("lobby", presence=True)
    s.receive_data(hello_reply(FEATURES))  # a late answer with history still counts
    assert s.history is True and s.room_config("lobby", presence=True) is True


def test_room_config_after_the_hello_wait_on_a_silent_broker_raises() -> None:
    clock = FakeClock()
    s = session(clock)
    s.connection_made()
    s.data_to_send()
    clock.now += HELLO_WAIT
    with pytest.raises(UnsupportedFeature):
        s.room_config("lobby", history_size=1)
    with pytest.raises(UnsupportedFeature):
        s.query_room_history("lobby")


def test_a_held_history_query_fails_and_a_held_room_config_is_kept_when_the_link_drops() -> None:
    s = session()
    s.connection_made()
    s.data_to_send()
    s.room_config("lobby", history_size=5)
    q = s.query_room_history("lobby")
    s.connection_lost()
    assert s.buffered == 1 and q.done
    with pytest.raises(BrokerUnavailable, match="lost before the reply"):
        q.result()
    history_link(s)
    assert actions(s.data_to_send()) == ["room_config"]


def test_a_refused_room_config_is_logged_on_the_client_logger(caplog: pytest.LogCaptureFixture) -> None:
    s = session(log=logging.getLogger("pystrands.test_client"))
    history_link(s)
    s.room_config("lobby", history_size=10)
    rid = rid_of(one_frame(s))
    error = "room_config: history_size must be between 0 and 100000, got 100001"
    with caplog.at_level(logging.WARNING):
        s.receive_data(line({"request_id": rid, "action": "command_error", "params": {"command": "room_config", "error": error}}))
    (record,) = [r for r in caplog.records if r.name == "pystrands.test_client"]
    assert record.levelno == logging.WARNING and error in record.getMessage() and rid in record.getMessage()


# ----------------------------------------------------------------------- room_history


def test_room_history_encodes_since_and_only_a_given_limit() -> None:
    s = session()
    history_link(s)
    q1 = s.query_room_history("lobby")
    assert one_frame(s) == b'{"request_id":"%s","action":"room_history","params":{"room_id":"lobby","since":0}}\n' % q1.request_id.encode()
    q2 = s.query_room_history("lobby", 41, 10)
    assert one_frame(s) == (
        b'{"request_id":"%s","action":"room_history","params":{"room_id":"lobby","since":41,"limit":10}}\n' % q2.request_id.encode()
    )
    q3 = s.query_room_history("lobby", since=MAX_OFFSET, limit=100_000, timeout=0.5)
    assert frames(one_frame(s))[0]["params"] == {"room_id": "lobby", "since": MAX_OFFSET, "limit": 100_000}
    assert len({q1.request_id, q2.request_id, q3.request_id}) == 3 and s.pending_queries == 3
    assert repr(q1) == "room_history('lobby')" and q3.timeout == 0.5


def test_a_history_reply_becomes_a_room_history() -> None:
    s = session()
    history_link(s)
    done = Done()
    q = s.query_room_history("lobby", since=2, on_done=done)
    s.data_to_send()
    assert s.receive_data(history_reply(q.request_id, range(3, 6))) == []  # never an event
    assert q.done and done.calls == 1 and s.pending_queries == 0
    got = q.result()
    assert got == expected(range(3, 6)) == RoomHistory(EPOCH, 5, [HistoryMessage(3, "m3"), HistoryMessage(4, "m4"), HistoryMessage(5, "m5")], True)
    assert type(got) is RoomHistory and all(type(m) is HistoryMessage for m in got.messages)
    assert got.epoch == EPOCH and got.offset == 5 and got.complete is True
    assert [(m.offset, m.data) for m in got.messages] == [(3, "m3"), (4, "m4"), (5, "m5")]
    epoch, offset, messages, complete = got  # a named tuple
    assert (epoch, offset, len(messages), complete) == (EPOCH, 5, 3, True)
    assert pystrands.RoomHistory is RoomHistory and "RoomHistory" in pystrands.__all__ and "HistoryMessage" in pystrands.__all__


def test_an_incomplete_history_is_returned_as_such_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    s = session()
    history_link(s)
    q = s.query_room_history("lobby", since=1)
    s.data_to_send()
    with caplog.at_level(logging.WARNING):
        s.receive_data(history_reply(q.request_id, range(8, 11), complete=False))
    assert q.result() == expected(range(8, 11), complete=False)
    assert q.result().complete is False
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # the caller decides what to do


def test_a_room_without_history_and_a_room_past_since() -> None:
    s = session()
    history_link(s)
    empty = s.query_room_history("plain")
    caught_up = s.query_room_history("lobby", since=7)
    s.data_to_send()
    s.receive_data(reply(empty.request_id, epoch="", offset=0, messages=[], complete=True))
    s.receive_data(history_reply(caught_up.request_id, [], last=7))
    assert empty.result() == RoomHistory("", 0, [], True)
    assert caught_up.result() == RoomHistory(EPOCH, 7, [], True)


def test_history_replies_are_matched_with_other_queries_in_any_order() -> None:
    s = session()
    history_link(s)
    h1 = s.query_room_history("a")
    count = s.query_room_count("a")
    h2 = s.query_room_history("b", limit=1)
    s.data_to_send()
    s.receive_data(history_reply(h2.request_id, [9]) + reply(count.request_id, count=2) + history_reply(h1.request_id, [1, 2]))
    assert h1.result() == expected([1, 2]) and h2.result() == expected([9]) and count.result() == 2


def test_an_error_reply_raises_query_error() -> None:
    s = session()
    history_link(s)
    q = s.query_room_history("lobby", limit=5)
    s.data_to_send()
    s.receive_data(reply(q.request_id, error="room_history: limit must be between 1 and 100000, got 0"))
    with pytest.raises(QueryError, match=re.escape("room_history('lobby'): the broker answered: room_history: limit must be between 1 and 100000, got 0")):
        q.result()
    assert isinstance(QueryError("x"), RuntimeError)


GOOD = {"epoch": EPOCH, "offset": 2, "messages": [{"offset": 2, "data": "m2"}], "complete": True}

MALFORMED: list[tuple[dict[str, Any], str]] = [
    ({}, "epoch=None"),
    ({**GOOD, "epoch": None}, "epoch=None"),
    ({**GOOD, "epoch": 5}, "epoch=5"),
    ({**GOOD, "offset": "2"}, "offset='2'"),
    ({**GOOD, "offset": -1}, "offset=-1"),
    ({**GOOD, "offset": True}, "offset=True"),
    ({**GOOD, "offset": 2.0}, "offset=2.0"),
    ({k: v for k, v in GOOD.items() if k != "offset"}, "offset=None"),
    ({**GOOD, "complete": "yes"}, "complete='yes'"),
    ({**GOOD, "complete": 1}, "complete=1"),
    ({k: v for k, v in GOOD.items() if k != "complete"}, "complete=None"),
    ({**GOOD, "messages": {"2": "m2"}}, "messages of type dict"),
    ({**GOOD, "messages": None}, "messages of type NoneType"),
    ({**GOOD, "messages": [{"offset": 1, "data": "ok"}, {"offset": 2, "data": 5}]}, "message {'offset': 2, 'data': 5}"),
    ({**GOOD, "messages": [{"offset": 0, "data": "x"}]}, "message {'offset': 0"),
    ({**GOOD, "messages": [{"offset": "2", "data": "x"}]}, "message {'offset': '2'"),
    ({**GOOD, "messages": [{"offset": True, "data": "x"}]}, "message {'offset': True"),
    ({**GOOD, "messages": [{"data": "x"}]}, "message {'data': 'x'}"),
    ({**GOOD, "messages": [["2", "x"]]}, "message ['2', 'x']"),
    ({**GOOD, "messages": [{"offset": 3, "data": None, "pad": "x" * 500}]}, "'pad': 'xxx"),  # cut at 80 characters
]


@pytest.mark.parametrize(("params", "detail"), MALFORMED)
def test_a_malformed_history_reply_raises_query_error(params: dict[str, Any], detail: str) -> None:
    s = session()
    history_link(s)
    q = s.query_room_history("lobby")
    s.data_to_send()
    assert s.receive_data(line({"request_id": q.request_id, "action": "reply", "params": params})) == []
    assert q.done and s.pending_queries == 0
    with pytest.raises(QueryError, match=r"room_history\('lobby'\): malformed reply from the broker \(") as info:
        q.result()
    assert detail in str(info.value) and len(str(info.value)) < 250  # a long message is cut


def test_a_history_query_past_its_deadline_times_out_and_its_late_reply_is_ignored() -> None:
    s = session()
    history_link(s)
    q = s.query_room_history("lobby", timeout=0.25)
    s.data_to_send()
    err = s.query_timed_out(q)
    assert isinstance(err, QueryTimeout) and isinstance(err, TimeoutError)
    assert "room_history('lobby'): no answer from the broker at broker:8081 within 0.25s" in str(err)
    assert s.pending_queries == 0
    assert s.receive_data(history_reply(q.request_id, [1]) + message_line("after")) != []
    assert not q.done


def test_a_dropped_link_fails_a_pending_history_query() -> None:
    s = session()
    history_link(s)
    done = Done()
    q = s.query_room_history("lobby", on_done=done)
    s.data_to_send()
    s.connection_lost()
    assert q.done and done.calls == 1
    with pytest.raises(BrokerUnavailable, match="lost before the reply"):
        q.result()
    history_link(s)  # its reply on the next link means nothing
    assert s.receive_data(history_reply(q.request_id, [1])) == []


def test_a_history_query_without_a_link_raises_broker_unavailable() -> None:
    s = session()
    with pytest.raises(BrokerUnavailable, match=r"room_history\('lobby'\): not connected to the broker at broker:8081"):
        s.query_room_history("lobby")
    assert s.pending_queries == 0 and s.buffered == 0


HISTORY_ERRORS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"since": -1}, ValueError, "since=-1: must be between 0 and 18446744073709551615"),
    ({"since": MAX_OFFSET + 1}, ValueError, "since=18446744073709551616: must be between 0"),
    ({"since": True}, TypeError, "since must be an int, not bool"),
    ({"since": 1.0}, TypeError, "since must be an int, not float"),
    ({"since": "3"}, TypeError, "since must be an int, not str"),
    ({"since": None}, TypeError, "since must be an int, not NoneType"),
    ({"limit": 0}, ValueError, "limit=0: must be between 1 and 100000 (None: every message)"),
    ({"limit": -3}, ValueError, "limit=-3: must be between 1 and 100000"),
    ({"limit": 100_001}, ValueError, "limit=100001: must be between 1 and 100000"),
    ({"limit": True}, TypeError, "limit must be an int, not bool"),
    ({"limit": 2.0}, TypeError, "limit must be an int, not float"),
    ({"limit": "5"}, TypeError, "limit must be an int, not str"),
    ({"timeout": 0}, ValueError, "timeout=0: must be a positive number of seconds"),
    ({"timeout": float("nan")}, ValueError, "timeout=nan"),
    ({"timeout": "5"}, TypeError, "timeout must be a number of seconds, not str"),
    ({"room_id": ""}, ValueError, "room_id must not be empty"),
    ({"room_id": 7}, TypeError, "room_id must be a str, not int"),
    ({"room_id": "r" * 17}, ValueError, "max_id_length is 16"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), HISTORY_ERRORS)
def test_room_history_argument_errors_name_the_argument(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    s = session()
    history_link(s)
    args = {"room_id": "lobby", **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        s.query_room_history(**args)
    assert s.data_to_send() == b"" and s.pending_queries == 0


def test_room_history_argument_errors_come_before_the_link_state() -> None:
    s = session()  # no link: a bad argument is still the error raised
    with pytest.raises(ValueError, match="limit=0"):
        s.query_room_history("lobby", limit=0)
    history_link(s, ROOMS_ONLY)
    with pytest.raises(TypeError, match="since must be an int"):
        s.query_room_history("lobby", since="0")  # type: ignore[arg-type]


# ----------------------------------------------- the reply through either codec, chunked

BEFORE = message_line("before", 1)
AFTER = message_line("after", 2)
TRICKY = ["plain", "é ü 😀", '{"request_id":"q1","action":"reply","params":{}}', "line\nbreak", 'back\\slash "quoted"', "", "   "]
TRICKY_MESSAGES = [{"offset": o, "data": d} for o, d in enumerate(TRICKY, start=1)]


def cut_plans(length: int, seed: int) -> list[list[int]]:
    """Where to cut a stream of ``length`` bytes: nowhere, everywhere, at each single position,
    and at random positions."""
    plans: list[list[int]] = [[], list(range(1, length))]
    plans += [[i] for i in range(1, length)]
    rnd = random.Random(seed)
    plans += [sorted(rnd.sample(range(1, length), rnd.randint(2, 12))) for _ in range(20)]
    return plans


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def run_with_reply(pre: bytes, rest: Any, cuts: Any, **kw: Any) -> tuple[list[str], RoomHistory, Session]:
    """A session that read ``pre``, then made a history query, then reads ``rest(request_id)``
    cut by ``cuts(length)``. Returns the texts of the events, the history and the session."""
    s = session(**kw)
    history_link(s)
    events = s.receive_data(pre) if pre else []
    q = s.query_room_history("lobby")
    assert actions(s.data_to_send()) == ["room_history"]
    data = rest(q.request_id)
    for chunk in split(data, cuts(len(data))):
        events += s.receive_data(chunk)
    return texts(events), q.result(), s


def tricky_reply(request_id: str) -> bytes:
    return reply(request_id, epoch=EPOCH, offset=len(TRICKY), messages=TRICKY_MESSAGES, complete=False)


TRICKY_HISTORY = RoomHistory(EPOCH, len(TRICKY), [HistoryMessage(o, d) for o, d in enumerate(TRICKY, start=1)], False)

# What was read before the query was made, and what follows it.
CASES = {
    "mid-line-1": (BEFORE[:1], lambda rid: BEFORE[1:] + tricky_reply(rid) + AFTER),
    "mid-line-half": (BEFORE[: len(BEFORE) // 2], lambda rid: BEFORE[len(BEFORE) // 2 :] + tricky_reply(rid) + AFTER),
    "mid-line-no-newline-yet": (BEFORE[:-1], lambda rid: BEFORE[-1:] + tricky_reply(rid) + AFTER),
    "line-end": (BEFORE, lambda rid: tricky_reply(rid) + AFTER),  # the reply may be the very next byte
    "nothing": (b"", lambda rid: BEFORE + tricky_reply(rid) + AFTER),
    "reply-last": (BEFORE, lambda rid: AFTER + tricky_reply(rid)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_history_reply_survives_any_chunking_with_events_around_it(case: str) -> None:
    """Whatever was half read when the query was made, and however the bytes arrive, every
    event comes out once and in order, and the history is whole (with the native codec the
    reading switches to the reference codec and back around the reply)."""
    pre, rest = CASES[case]
    n_plans = len(cut_plans(len(rest("q1000")), 0))
    for index in range(n_plans):
        def cuts(length: int, index: int = index) -> list[int]:
            plans = cut_plans(length, index)
            return plans[min(index, len(plans) - 1)]

        got_texts, history, s = run_with_reply(pre, rest, cuts)
        assert got_texts == (["before", "after"] if case != "nothing" else ["before", "after"]), (case, index)
        assert history == TRICKY_HISTORY, (case, index)
        assert s.acks is not None and s.acks.pending == 2
        # and the next bytes are read as usual
        assert texts(s.receive_data(message_line("later", 3))) == ["later"]
        assert not s._on_reference


def test_the_native_decoder_reads_again_once_no_history_reply_is_awaited() -> None:
    s = session()
    history_link(s)
    native_lossy = CODEC["name"] == "native" and not native_keeps_history(native_decoder())
    assert s._lossy_replies is native_lossy
    s.receive_data(BEFORE[:10])  # half a line
    q1 = s.query_room_history("a")
    q2 = s.query_room_history("b")
    members = s.query_room_members("a")
    s.data_to_send()
    assert texts(s.receive_data(BEFORE[10:])) == ["before"]  # the line in progress: still native
    assert s._on_reference is native_lossy  # from its end on: the reference codec
    s.receive_data(history_reply(q1.request_id, [1]))
    assert s._on_reference is native_lossy  # q2 still waits
    s.receive_data(history_reply(q2.request_id, [2]) + AFTER[:5])
    assert s._on_reference is native_lossy  # no switch within a read
    assert texts(s.receive_data(AFTER[5:] + message_line("x", 3))) == ["after", "x"]  # ends its line, then native
    assert not s._on_reference and not members.done  # a rooms reply needs no switch
    s.receive_data(reply(members.request_id, members=[ctx("a")], complete=True))
    assert [c.client_id for c in members.result()] == ["a"]
    assert q1.result() == expected([1]) and q2.result() == expected([2])
    # a history query that timed out no longer holds the reference codec
    q3 = s.query_room_history("c")
    s.receive_data(message_line("y", 4))
    assert s._on_reference is native_lossy
    s.query_timed_out(q3)
    s.receive_data(message_line("z", 5))
    assert not s._on_reference


def test_a_line_dropped_as_overlong_across_the_switch_stays_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """The query is made while the framer discards an overlong line: that line's tail is not
    read as a line of its own by the codec that takes over."""
    long_line = message_line("x" * 900, 1)  # > max_line_size 600; the reply is shorter
    for cut in (650, 899, len(long_line) - 1):  # the framer already discards at each of them
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            got, history, s = run_with_reply(
                long_line[:cut], lambda rid, cut=cut: long_line[cut:] + tricky_reply(rid) + AFTER, lambda n: [1, n // 2], max_line_size=600
            )
        assert got == ["after"] and history == TRICKY_HISTORY
        dropped = [r.getMessage() for r in caplog.records if "Dropping an inbound line" in r.getMessage()]
        assert len(dropped) == 1, dropped
        assert not [r for r in caplog.records if "undecodable" in r.getMessage() or "Skipping" in r.getMessage()]


def test_a_new_link_starts_with_the_native_decoder() -> None:
    s = session()
    history_link(s)
    s.query_room_history("lobby")
    s.receive_data(BEFORE[:5] + b"\n" + BEFORE[:9])  # switched (native), then half a line
    s.connection_lost()
    history_link(s)
    assert not s._on_reference and not s._mid_line
    assert texts(s.receive_data(AFTER)) == ["after"]


class KeepingDecoder:
    """A native decoder that keeps a history reply's keys (what a later extension may do)."""

    def __init__(self, max_line_size: int = 1) -> None:
        pass

    def feed(self, data: bytes) -> list[p.Event]:
        return [p.QueryReply("q", {"epoch": "e", "offset": 1, "messages": [], "complete": True})]


class DroppingDecoder(KeepingDecoder):
    def feed(self, data: bytes) -> list[p.Event]:
        return [p.QueryReply("q", {"complete": True})]


class BrokenDecoder(KeepingDecoder):
    def feed(self, data: bytes) -> list[p.Event]:
        raise ValueError("no")


def test_the_native_probe() -> None:
    assert native_keeps_history(KeepingDecoder) is True
    assert native_keeps_history(DroppingDecoder) is False
    assert native_keeps_history(BrokenDecoder) is False
    decoder = native_decoder()
    if decoder is not None:  # this release's LineDecoder drops them (rust/py/src/codec.rs)
        events = list(decoder().feed(history_reply("q1", [1])))
        assert native_keeps_history(decoder) == ("messages" in events[0].params)
