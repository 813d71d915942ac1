"""Unit tests of the sans-I/O protocol session (pystrands._session.Session).

The session is driven with bytes and a fake clock only: no sockets, no threads, no
event loop. Bytes go in through ``receive_data``; what the client would write comes out
of ``data_to_send`` and is parsed back into frames here.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import pytest

from pystrands import _protocol as p
from pystrands._session import PURE_PYTHON_ENV, Session, native_decoder

LOGGER = "pystrands.session"
CODEC = {"name": "python"}


@pytest.fixture(autouse=True, params=["native", "python"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs against both inbound codecs (the native one when the extension has it)."""
    if request.param == "native":
        monkeypatch.delenv(PURE_PYTHON_ENV, raising=False)
        if native_decoder() is None:
            pytest.skip("no native LineDecoder in pystrands._core")
    else:
        monkeypatch.setenv(PURE_PYTHON_ENV, "1")
    CODEC["name"] = request.param
    return str(request.param)


# ------------------------------------------------------------------------------ helpers


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def ctx(client_id: str = "c1", room_id: str = "r") -> dict[str, Any]:
    return {"client_id": client_id, "room_id": room_id, "metadata": {}}


def event(message: str, seq: int | None = None, client_id: str = "c1") -> bytes:
    """A broker ``new_message`` line (with a top-level ``seq`` when given)."""
    frame: dict[str, Any] = {
        "request_id": f"e-{message}",
        "action": "new_message",
        "params": {"message": message, "context": ctx(client_id)},
    }
    if seq is not None:
        frame["seq"] = seq
    return line(frame)


def hello_reply(ok: bool = True, interval: float | None = 1.0, error: str | None = None) -> bytes:
    params: dict[str, Any] = {"ok": ok}
    if ok:
        params.update(version=2, features=["ack", "heartbeat"])
        if interval is not None:
            params["heartbeat_interval"] = interval
    if error is not None:
        params["error"] = error
    return line({"request_id": "hello", "action": "hello", "params": params})


HEARTBEAT = line({"request_id": "heartbeat", "action": "heartbeat", "params": {}})


def frames(data: bytes) -> list[dict[str, Any]]:
    """The frames of one ``data_to_send`` result (each line must be a JSON object)."""
    assert data == b"" or data.endswith(b"\n"), data
    return [json.loads(raw) for raw in data.splitlines()]


def actions(data: bytes) -> list[str]:
    return [f["action"] for f in frames(data)]


def acks(data: bytes) -> list[int]:
    return [f["params"]["seq"] for f in frames(data) if f["action"] == "ack"]


def messages(events: list[p.Event]) -> list[str]:
    out = []
    for ev in events:
        assert isinstance(ev, p.NewMessage), ev
        out.append(ev.message)
    return out


def room_send(text: str) -> bytes:
    return p.encode_room_message("r", text)


def sent_messages(data: bytes) -> list[str]:
    return [f["params"]["message"] for f in frames(data) if f["action"] == "message_to_room"]


def new_session(clock: FakeClock | None = None, **kw: Any) -> Session:
    s = Session(clock=clock or FakeClock(), **kw)
    assert s.codec == CODEC["name"]
    return s


def open_link(s: Session) -> int:
    """Bring a link up and write its hello (and any kept sends); return its number."""
    link = s.connection_made()
    assert actions(s.data_to_send())[0] == "hello"
    return link


def v2_link(s: Session, interval: float | None = 1.0) -> int:
    """Bring a link up and have the broker accept the hello."""
    link = open_link(s)
    assert s.receive_data(hello_reply(interval=interval)) == []
    assert s.version == 2
    return link


def drop_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and "Not connected" in r.getMessage()]


def summaries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and "dropped while disconnected" in r.getMessage()]


# ------------------------------------------------------------------------ the hello


def test_nothing_is_written_before_the_link_is_up() -> None:
    s = new_session()
    assert s.link == 0 and not s.open
    assert s.data_to_send() == b"" and not s.wants_write()
    # bytes arriving without a link (a stale read) give nothing
    assert s.receive_data(event("too early")) == []
    assert s.send(room_send("early")) is False  # kept for the link, not written
    assert s.data_to_send() == b"" and not s.wants_write()


def test_a_new_link_writes_the_hello_first_then_nothing_more() -> None:
    s = new_session()
    assert s.connection_made() == 1
    assert s.wants_write()
    out = frames(s.data_to_send())
    assert len(out) == 1
    hello = out[0]
    assert hello["action"] == "hello" and hello["request_id"] == "hello"
    assert hello["params"]["version"] == 2
    assert hello["params"]["features"] == ["ack", "heartbeat", "rooms", "history"]
    assert hello["params"]["client"].startswith("pystrands-python/")
    assert s.data_to_send() == b"" and not s.wants_write()  # written once
    # every link opens with its own hello, before anything queued on it
    s.connection_lost()
    assert s.connection_made() == 2
    s.send(room_send("x"))
    assert actions(s.data_to_send()) == ["hello", "message_to_room"]


@pytest.mark.parametrize("secret", [None, ""])
def test_hello_has_no_secret_when_none_is_given(secret: str | None) -> None:
    s = new_session(backend_secret=secret)
    s.connection_made()
    (hello,) = frames(s.data_to_send())
    assert "secret" not in hello["params"]


def test_hello_carries_the_secret_on_every_link_and_never_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        s = new_session(backend_secret="s3cr3t-value")
        for _ in range(2):
            s.connection_made()
            (hello,) = frames(s.data_to_send())
            assert hello["params"]["secret"] == "s3cr3t-value"
            s.receive_data(hello_reply(ok=False, error="wrong backend secret"))
            s.connection_lost()
    assert "s3cr3t-value" not in caplog.text


# -------------------------------------------------------------------------------- v1


def test_v1_by_default_events_in_order_no_acks_no_heartbeat_replies() -> None:
    clock = FakeClock()
    s = new_session(clock)
    link = open_link(s)
    assert s.version == 1
    # a v1 broker sends no seq; even if an event carried one, a v1 link never acks it
    got = s.receive_data(event("a") + HEARTBEAT + event("b", seq=1) + event("c") + HEARTBEAT)
    assert messages(got) == ["a", "b", "c"]
    assert all(ev.seq == 0 for ev in got)
    assert s.event_done(link, 1) is False
    assert s.data_to_send() == b"" and not s.wants_write()  # no heartbeat reply, no ack
    assert s.version == 1 and s.acks is None
    # and a v1 link never goes silent
    assert s.next_deadline() is None
    clock.now += 1e6
    assert s.check_silence() is False and s.check_silence(clock.now) is False


def test_hello_frames_that_are_not_replies_keep_v1() -> None:
    s = new_session()
    open_link(s)
    # an echoed hello (no boolean ok) is ignored; so is an ok that is not a bool
    s.receive_data(line({"action": "hello", "params": {"version": 2}}))
    s.receive_data(line({"action": "hello", "params": {"ok": "true"}}))
    assert s.version == 1 and not s.refused
    s.receive_data(HEARTBEAT)
    assert s.data_to_send() == b""


# -------------------------------------------------------------------------------- v2


def test_ok_hello_reply_switches_the_link_to_v2() -> None:
    s = new_session()
    open_link(s)
    assert s.receive_data(hello_reply(interval=2.5)) == []  # control: no handler sees it
    assert s.version == 2
    assert s.heartbeat_interval == 2.5 and s.silence_limit == 7.5
    # the version is the link's: a new link starts in v1 again
    s.connection_lost()
    assert s.version == 1
    s.connection_made()
    assert s.version == 1


def test_v2_heartbeats_are_answered() -> None:
    s = new_session()
    v2_link(s)
    assert s.receive_data(HEARTBEAT + HEARTBEAT) == []
    assert s.wants_write()
    assert s.data_to_send() == p.HEARTBEAT_REPLY * 2
    assert s.data_to_send() == b""


def test_v2_events_are_acked_cumulatively_once_done() -> None:
    s = new_session()
    link = v2_link(s)
    got = s.receive_data(event("a", 1) + event("b", 2) + event("c", 3))
    assert messages(got) == ["a", "b", "c"]
    assert [ev.seq for ev in got] == [1, 2, 3]
    assert s.data_to_send() == b""  # nothing handled yet: no ack
    assert s.event_done(link, 1) is True
    assert acks(s.data_to_send()) == [1]
    assert s.event_done(link, 2) is True
    assert s.event_done(link, 3) is True
    out = s.data_to_send()
    assert frames(out) == [{"request_id": "ack", "action": "ack", "params": {"seq": 3}}]  # one ack covers both
    assert s.data_to_send() == b""


def test_v2_ack_rides_with_sends_in_wire_order() -> None:
    s = new_session()
    link = v2_link(s)
    s.receive_data(event("a", 1))
    s.event_done(link, 1)
    s.send(room_send("reply"))
    assert actions(s.data_to_send()) == ["message_to_room", "ack"]


def test_v2_out_of_order_completion_moves_the_ack_only_with_the_lowest() -> None:
    s = new_session()
    link = v2_link(s)
    s.receive_data(b"".join(event(str(i), i, client_id=f"c{i}") for i in range(1, 6)))
    assert s.event_done(link, 3) is False
    assert s.event_done(link, 2) is False
    assert s.event_done(link, 5) is False
    assert s.data_to_send() == b"" and not s.wants_write()
    assert s.event_done(link, 1) is True  # 1, 2, 3 are done; 4 is not
    assert acks(s.data_to_send()) == [3]
    assert s.event_done(link, 4) is True
    assert acks(s.data_to_send()) == [5]


def test_v2_random_completion_order_acks_match_a_model() -> None:
    rng = random.Random(2024)
    for _ in range(30):
        s = new_session()
        link = v2_link(s)
        n = rng.randint(1, 60)
        s.receive_data(b"".join(event(str(i), i, client_id=f"c{i}") for i in range(1, n + 1)))
        order = list(range(1, n + 1))
        rng.shuffle(order)
        finished: set[int] = set()
        last = 0
        for seq in order:
            s.event_done(link, seq)
            finished.add(seq)
            expected = last
            while expected + 1 in finished:
                expected += 1
            got = acks(s.data_to_send())
            if expected > last:
                assert got == [expected]
                last = expected
            else:
                assert got == []
        assert last == n


def test_v2_skipped_frames_count_as_handled() -> None:
    s = new_session()
    link = v2_link(s)
    got = s.receive_data(
        event("a", 1)
        + line({"seq": 2, "request_id": "x", "action": "frobnicate", "params": {}})  # unknown action
        + line({"seq": 3, "action": "new_message", "params": {"message": 42, "context": ctx()}})  # malformed
        + line({"seq": 4, "action": "new_message", "params": "not an object"})  # malformed params
        + event("b", 5)
    )
    assert messages(got) == ["a", "b"] and [ev.seq for ev in got] == [1, 5]
    assert s.data_to_send() == b""  # 1 still running: the skipped seqs wait behind it
    s.event_done(link, 1)
    assert acks(s.data_to_send()) == [4]
    s.event_done(link, 5)
    assert acks(s.data_to_send()) == [5]
    # with nothing in flight, a skipped frame is acknowledged by itself
    assert s.receive_data(line({"seq": 6, "action": "frobnicate"})) == []
    assert acks(s.data_to_send()) == [6]


def test_v2_duplicate_and_reordered_seqs_are_delivered_but_not_acked(caplog: pytest.LogCaptureFixture) -> None:
    s = new_session()
    link = v2_link(s)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = s.receive_data(event("a", 1) + event("b", 2) + event("b-again", 2) + event("a-late", 1))
    assert messages(got) == ["a", "b", "b-again", "a-late"]
    assert [ev.seq for ev in got] == [1, 2, 0, 0]  # 0: never acknowledged
    assert "will not be acknowledged" in caplog.text
    s.event_done(link, 1)
    s.event_done(link, 2)
    assert acks(s.data_to_send()) == [2]
    assert s.event_done(link, 0) is False
    assert s.data_to_send() == b""


def test_v2_gap_of_lost_seqs_counts_as_handled(caplog: pytest.LogCaptureFixture) -> None:
    s = new_session()
    link = v2_link(s)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = s.receive_data(event("a", 1) + b'{"seq": 2, not json\n' + event("d", 4))
    assert [ev.seq for ev in got] == [1, 4]
    assert "2..3" in caplog.text
    s.event_done(link, 1)
    assert acks(s.data_to_send()) == [3]
    s.event_done(link, 4)
    assert acks(s.data_to_send()) == [4]


# ------------------------------------------------------------------------- ack delay


def test_ack_delay_holds_the_ack_until_the_deadline() -> None:
    clock = FakeClock()
    s = new_session(clock, ack_delay=0.005)
    link = v2_link(s, interval=10.0)
    t0 = clock.now
    s.receive_data(event("a", 1))
    assert s.event_done(link, 1) is True
    assert s.next_deadline() == pytest.approx(t0 + 0.005)
    assert s.data_to_send() == b"" and not s.wants_write()
    # a write before the deadline goes without the ack
    s.send(room_send("reply"))
    assert actions(s.data_to_send()) == ["message_to_room"]
    clock.now = t0 + 0.004
    assert s.data_to_send() == b"" and not s.wants_write()
    assert s.data_to_send(now=t0 + 0.0049) == b""
    clock.now = t0 + 0.005
    assert s.wants_write()
    assert acks(s.data_to_send()) == [1]
    # nothing due: the next deadline is the silence one again
    assert s.next_deadline() == pytest.approx(t0 + 30.0)


def test_ack_delay_explicit_now_argument() -> None:
    clock = FakeClock()
    s = new_session(clock, ack_delay=0.005)
    link = v2_link(s)
    t0 = clock.now
    s.receive_data(event("a", 1))
    s.event_done(link, 1)
    assert not s.wants_write(t0 + 0.001)
    assert s.wants_write(t0 + 0.006)
    assert acks(s.data_to_send(now=t0 + 0.006)) == [1]


def test_ack_delay_deadline_is_the_first_completion_not_the_last() -> None:
    clock = FakeClock()
    s = new_session(clock, ack_delay=0.005)
    link = v2_link(s, interval=10.0)
    t0 = clock.now
    s.receive_data(event("a", 1) + event("b", 2))
    s.event_done(link, 1)
    clock.now = t0 + 0.003
    s.event_done(link, 2)  # covered by the same pending ack
    assert s.next_deadline() == pytest.approx(t0 + 0.005)
    clock.now = t0 + 0.005
    assert acks(s.data_to_send()) == [2]


def test_ack_now_forces_the_delayed_ack() -> None:
    clock = FakeClock()
    s = new_session(clock, ack_delay=0.005)
    link = v2_link(s)
    s.receive_data(event("a", 1))
    s.event_done(link, 1)
    assert s.data_to_send() == b""
    s.ack_now()
    assert s.wants_write()
    assert acks(s.data_to_send()) == [1]
    assert s.data_to_send() == b""


def test_heartbeat_reply_carries_the_delayed_ack() -> None:
    clock = FakeClock()
    s = new_session(clock, ack_delay=10.0)
    link = v2_link(s)
    s.receive_data(event("a", 1))
    s.event_done(link, 1)
    assert s.data_to_send() == b""
    s.receive_data(HEARTBEAT)
    out = s.data_to_send()
    assert actions(out) == ["heartbeat", "ack"] and acks(out) == [1]
    assert out.startswith(p.HEARTBEAT_REPLY)


# --------------------------------------------------------------------- refused hello


def test_refused_hello_sets_refused_and_stops_the_chunk(caplog: pytest.LogCaptureFixture) -> None:
    s = new_session(peer="broker:7000")
    open_link(s)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        got = s.receive_data(
            hello_reply(ok=False, error="wrong backend secret") + event("after", 1) + event("more")
        )
    assert got == []
    assert s.refused is True and s.version == 1
    assert "wrong backend secret" in caplog.text and "broker:7000" in caplog.text
    # the next link starts afresh
    s.connection_lost()
    open_link(s)
    assert s.refused is False
    assert messages(s.receive_data(event("fine"))) == ["fine"]


def test_refused_hello_events_before_it_still_come_out() -> None:
    s = new_session()
    open_link(s)
    got = s.receive_data(event("before") + hello_reply(ok=False) + event("after"))
    assert messages(got) == ["before"] and s.refused


# --------------------------------------------------------------------------- silence


def test_v2_silence_after_three_heartbeat_intervals(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    s = new_session(clock)
    v2_link(s, interval=1.0)
    t0 = clock.now
    assert s.next_deadline() == pytest.approx(t0 + 3.0)
    assert s.check_silence(t0 + 2.999) is False
    clock.now = t0 + 2.9
    assert s.check_silence() is False
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert s.check_silence(t0 + 3.0) is True
        clock.now = t0 + 3.5
        assert s.check_silence() is True
    assert "Nothing received" in caplog.text


def test_receiving_bytes_moves_the_silence_deadline() -> None:
    clock = FakeClock()
    s = new_session(clock)
    v2_link(s, interval=1.0)
    t0 = clock.now
    clock.now = t0 + 2.5
    s.receive_data(b'{"action":"heart')  # any bytes count, even half a line
    assert s.next_deadline() == pytest.approx(t0 + 5.5)
    assert s.check_silence(t0 + 3.0) is False
    assert s.check_silence(t0 + 5.4) is False
    clock.now = t0 + 5.0
    s.receive_data(b'beat","params":{}}\n')
    assert s.check_silence(t0 + 7.9) is False
    assert s.check_silence(t0 + 8.0) is True


def test_no_silence_check_without_a_heartbeat_interval_or_a_link() -> None:
    clock = FakeClock()
    s = new_session(clock)
    v2_link(s, interval=None)
    assert s.version == 2 and s.next_deadline() is None
    assert s.check_silence(clock.now + 1e9) is False
    s2 = new_session(clock)
    v2_link(s2, interval=1.0)
    s2.connection_lost()
    assert s2.check_silence(clock.now + 1e9) is False and s2.next_deadline() is None


# ---------------------------------------------------------------- stale completions


def test_completions_of_an_earlier_link_are_ignored() -> None:
    s = new_session()
    old = v2_link(s)
    s.receive_data(event("a", 1) + event("b", 2))
    s.connection_lost()
    assert s.event_done(old, 1) is False  # no link at all
    new = v2_link(s)
    assert new == old + 1
    s.receive_data(event("x", 1) + event("y", 2))
    # the old link's handlers finish late: the new link's seqs 1 and 2 are not theirs
    assert s.event_done(old, 1) is False
    assert s.event_done(old, 2) is False
    assert s.data_to_send() == b"" and not s.wants_write()
    assert s.event_done(new, 1) is True
    assert acks(s.data_to_send()) == [1]


# ----------------------------------------------------------------- outbound buffer


def test_sends_while_down_are_written_in_order_after_the_next_hello() -> None:
    s = new_session()
    for text in ("a", "b", "c"):
        assert s.send(room_send(text)) is False
    assert s.buffered == 3
    s.connection_made()
    assert s.buffered == 0
    out = s.data_to_send()
    assert actions(out) == ["hello", "message_to_room", "message_to_room", "message_to_room"]
    assert sent_messages(out) == ["a", "b", "c"]
    # live sends go out as they come
    assert s.send(room_send("d")) is True
    assert sent_messages(s.data_to_send()) == ["d"]
    # queued but never written on a link: lost with it (with the hello, if unwritten)
    s.send(room_send("lost"))
    assert s.connection_lost() == 1
    s.send(room_send("e"))
    s.send(room_send("f"))
    s.connection_made()
    out = s.data_to_send()
    assert actions(out)[0] == "hello" and sent_messages(out) == ["e", "f"]
    assert s.dropped_sends == 0


def test_kept_sends_come_before_live_ones_and_an_ack() -> None:
    s = new_session()
    s.send(room_send("kept"))
    link = s.connection_made()
    s.send(room_send("live"))
    assert sent_messages(s.data_to_send()) == ["kept", "live"]
    s.receive_data(hello_reply())
    s.receive_data(event("m", 1))
    s.event_done(link, 1)
    assert s.data_to_send() == encode_ack_line(1)


def encode_ack_line(seq: int) -> bytes:
    return b'{"request_id":"ack","action":"ack","params":{"seq":%d}}\n' % seq


@pytest.mark.parametrize(
    ("policy", "kept"), [("drop_oldest", ["3", "4", "5"]), ("drop_newest", ["1", "2", "3"])]
)
def test_buffer_bound_keeps_what_the_policy_says(policy: str, kept: list[str]) -> None:
    s = new_session(max_buffered_sends=3, buffer_policy=policy)
    for i in range(1, 6):
        s.send(room_send(str(i)))
    assert s.buffered == 3 and s.dropped_sends == 2
    s.connection_made()
    assert sent_messages(s.data_to_send()) == kept


def test_buffer_bound_zero_drops_everything() -> None:
    s = new_session(max_buffered_sends=0)
    for i in range(4):
        assert s.send(room_send(str(i))) is False
    assert s.buffered == 0 and s.dropped_sends == 4
    s.connection_made()
    assert actions(s.data_to_send()) == ["hello"]


def test_keep_false_is_dropped_not_kept() -> None:
    s = new_session()
    assert s.send(room_send("x"), keep=False) is False
    assert s.buffered == 0 and s.dropped_sends == 1


def test_dropped_sends_warn_once_per_down_period_and_are_summarized(caplog: pytest.LogCaptureFixture) -> None:
    s = new_session(max_buffered_sends=2)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for i in range(5):
            s.send(room_send(str(i)), "message_to_room")
        assert len(drop_warnings(caplog)) == 1
        assert "message_to_room" in drop_warnings(caplog)[0]
        assert summaries(caplog) == []
        s.connection_made()
        assert len(summaries(caplog)) == 1 and summaries(caplog)[0].startswith("3 send(s)")
        assert "max_buffered_sends=2" in summaries(caplog)[0]
        s.data_to_send()
        # a second down period warns again, once, and its own count is summarized
        s.connection_lost()
        for i in range(4):
            s.send(room_send(str(i)))
        assert len(drop_warnings(caplog)) == 2
        s.connection_made()
        assert len(summaries(caplog)) == 2 and summaries(caplog)[1].startswith("2 send(s)")
        # a down period without drops: no warning, no summary
        s.connection_lost()
        s.send(room_send("fits"))
        s.connection_made()
    assert len(drop_warnings(caplog)) == 2 and len(summaries(caplog)) == 2
    assert s.dropped_sends == 5


def test_stale_reply_dropped_while_up_does_not_silence_the_next_down_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = new_session(max_buffered_sends=0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        old = s.connection_made()
        s.connection_lost()
        s.connection_made()
        s.send(room_send("late reply"), link=old)  # a handler of the old link finished late
        s.connection_lost()
        before = len(drop_warnings(caplog))
        s.send(room_send("while down"))  # the first drop of this down period
        assert len(drop_warnings(caplog)) == before + 1


def test_link_bound_frames_are_dropped_unless_their_link_is_live() -> None:
    s = new_session()
    first = open_link(s)
    assert s.send(room_send("reply-1"), link=first) is True
    assert sent_messages(s.data_to_send()) == ["reply-1"]
    s.connection_lost()
    # down: a reply for the old link is not kept (it means nothing on another link)
    assert s.send(room_send("stale"), link=first) is False
    assert s.buffered == 0 and s.dropped_sends == 1
    second = s.connection_made()
    assert s.send(room_send("stale again"), link=first) is False
    assert s.send(room_send("reply-2"), link=second) is True
    out = s.data_to_send()
    assert actions(out)[0] == "hello" and sent_messages(out) == ["reply-2"]
    assert s.dropped_sends == 2


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_buffered_sends": -1}, "max_buffered_sends"),
        ({"max_buffered_sends": "x"}, "max_buffered_sends"),
        ({"max_buffered_sends": True}, "max_buffered_sends"),
        ({"max_buffered_sends": 1.5}, "max_buffered_sends"),
        ({"max_buffered_sends": 10_000_001}, "max_buffered_sends"),
        ({"buffer_policy": "lifo"}, "buffer_policy"),
        ({"buffer_policy": None}, "buffer_policy"),
    ],
)
def test_bad_buffer_settings_raise_naming_the_setting(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises((TypeError, ValueError)) as info:
        Session(clock=FakeClock(), **kwargs)
    assert name in str(info.value)


def test_buffer_settings_at_the_limits_are_accepted() -> None:
    Session(clock=FakeClock(), max_buffered_sends=0, buffer_policy="drop_newest")
    Session(clock=FakeClock(), max_buffered_sends=10_000_000, buffer_policy="drop_oldest")


# --------------------------------------------------------------- malformed input

NESTED = b'{"action":"new_message","params":{"message":' + b"[" * 100_000 + b"]" * 100_000 + b"}}\n"

BAD_LINES = [
    b"this is not json\n",
    b'{"action":"new_message","params":{"message":"unterminated\n',
    b'{"action":"new_message","params":{"message":"\xff\xfe bad utf-8","context":{"client_id":"c1"}}}\n',
    b"[1, 2, 3]\n",
    b'"just a string"\n',
    b"42\n",
    b"null\n",
    b'{"action":"new_message","params":[1,2]}\n',
    b'{"action":"new_message","params":"text"}\n',
    b'{"action":"new_message","params":{"message":7,"context":{"client_id":"c1"}}}\n',
    b'{"action":"new_message","params":{"message":"m","context":"not an object"}}\n',
    b'{"action":"new_message","params":{"message":"m","context":{"client_id":5}}}\n',
    b'{"action":"new_message","params":{"message":"m"}}\n',
    b'{"action":"disconnected","params":{"context":[]}}\n',
    b'{"action":"connection_request","params":{"url":"/x"}}\n',
    b'{"action":"connection_request","request_id":"c1","params":{"url":5}}\n',
    b'{"params":{"message":"no action"}}\n',
    b'{"action":null,"params":{}}\n',
    b'{"action":"frobnicate","params":{"x":1}}\n',
    b"\n",
    b"   \n",
    b"\r\n",
    b'{"action":"new_message","params":{"message":"' + b"x" * 5000 + b'","context":{"client_id":"c1"}}}\n',
    NESTED,
    b'{"action":"hello","params":{"ok":"yes"}}\n',
]


def malformed_stream() -> tuple[bytes, list[str]]:
    """Good events (one CRLF-terminated) interleaved with every malformed line."""
    parts: list[bytes] = []
    want: list[str] = []
    for i, bad in enumerate(BAD_LINES):
        good = event(f"ok-{i}")
        if i % 3 == 0:
            good = good[:-1] + b"\r\n"
        parts += [good, bad]
        want.append(f"ok-{i}")
    parts.append(event("last"))
    want.append("last")
    return b"".join(parts), want


def chunkings(stream: bytes) -> list[list[bytes]]:
    rng = random.Random(99)
    out = [[stream], [stream[i : i + 1] for i in range(0, 3000)] + [stream[3000:]]]
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(stream)), 40))
        out.append([stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])])
    for size in (7, 4096):
        out.append([stream[i : i + size] for i in range(0, len(stream), size)])
    return out


def test_malformed_input_yields_only_the_good_events_whatever_the_chunking() -> None:
    stream, want = malformed_stream()
    for chunks in chunkings(stream):
        s = new_session(max_line_size=1024)
        open_link(s)
        got: list[p.Event] = []
        for chunk in chunks:
            got += s.receive_data(chunk)
        assert messages(got) == want
        assert s.framer.dropped_lines >= 2  # the long message and the nested JSON
        # and the session still works
        assert messages(s.receive_data(event("after"))) == ["after"]
        assert s.data_to_send() == b""


def test_malformed_input_on_a_v2_link_keeps_acks_flowing() -> None:
    stream, want = malformed_stream()
    for chunks in chunkings(stream)[:4]:
        s = new_session(max_line_size=1024)
        link = v2_link(s)
        seq = 0
        # number every line of the stream that parses as an object with an action (as a broker would)
        numbered: list[bytes] = []
        for raw in stream.splitlines(keepends=True):
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError):
                numbered.append(raw)
                continue
            if isinstance(obj, dict) and len(raw) < 1024:
                seq += 1
                obj["seq"] = seq
                numbered.append(line(obj))
            else:
                numbered.append(raw)
        data = b"".join(numbered)
        cuts = [len(c) for c in chunks]
        got: list[p.Event] = []
        pos = 0
        for size in cuts:
            got += s.receive_data(data[pos : pos + size])
            pos += size
        got += s.receive_data(data[pos:])
        assert messages(got) == want
        for ev in got:
            assert ev.seq > 0
            s.event_done(link, ev.seq)
        assert acks(s.data_to_send()) == [seq]


def test_overlong_lines_are_dropped_and_the_stream_resyncs(caplog: pytest.LogCaptureFixture) -> None:
    s = new_session(max_line_size=200)
    open_link(s)
    big = b'{"action":"new_message","params":{"message":"' + b"y" * 1000 + b'"}}'
    with caplog.at_level(logging.WARNING):
        got = s.receive_data(event("a") + big[:300])
        got += s.receive_data(big[300:700])
        got += s.receive_data(big[700:] + b"\n" + event("b")[:10])
        got += s.receive_data(event("b")[10:])
    assert messages(got) == ["a", "b"]
    assert s.framer.dropped_lines == 1
    assert "max_line_size" in caplog.text


def test_a_new_link_drops_the_partial_line_of_the_old_one() -> None:
    s = new_session()
    open_link(s)
    half = event("half")
    assert s.receive_data(half[:20]) == []
    s.connection_lost()
    open_link(s)
    assert messages(s.receive_data(half[20:] + event("whole"))) == ["whole"]


def test_use_clock_switches_the_time_source() -> None:
    """The asyncio client hands its loop's clock over: silence is then measured on it."""
    s = new_session()
    v2_link(s, interval=1.0)  # silent after 3 s
    loop_clock = FakeClock(start=50.0)
    s.use_clock(loop_clock)
    assert s.last_read == 50.0
    assert not s.check_silence(52.9)
    s.receive_data(b"\n")  # a byte moves the deadline, read on the new clock
    loop_clock.now = 52.0
    s.receive_data(b"\n")
    assert s.last_read == 52.0
    assert not s.check_silence(54.9) and s.check_silence(55.0)
