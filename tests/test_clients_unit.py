"""Unit tests of PyStrandsClient (threading) and AsyncPyStrandsClient against a local fake broker.

The fake broker (tests/fake_broker.py) is a real TCP server speaking v1 lines (or v2 with
``version=2``); it is the mocked side, since these tests are about the clients. Every wait
has a deadline. The protocol v2 tests at the end run each case against both clients.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest

import pystrands
from fake_broker import DEADLINE, FakeBroker, ctx, wait_for
from pystrands import AsyncPyStrandsClient, ConnectionRequestContext, Context, PyStrandsClient
from pystrands._protocol import BACKEND_SECRET_ENV

T = TypeVar("T")
FAST = {"reconnect_delay": 0.05, "max_reconnect_delay": 0.2}


def run_async(coro_fn: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    """Run an async test body with an overall deadline."""

    async def guarded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(guarded())


async def athread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking fake-broker call without blocking the loop."""
    return await asyncio.to_thread(fn, *args)


async def await_event(event: asyncio.Event, timeout: float = DEADLINE) -> None:
    await asyncio.wait_for(event.wait(), timeout)


def by_message(frames: list[dict[str, Any]]) -> list[str]:
    return [f["params"]["message"] for f in frames]


# ============================================================================ sync client


class Recorder(PyStrandsClient):
    """Sync client recording every callback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple[str, Any, Any]] = []
        self.lock = threading.Lock()
        self.seen = threading.Condition(self.lock)
        self.decide: Callable[[ConnectionRequestContext], Any] = lambda r: True
        self.message_hook: Callable[[str, Context], None] | None = None

    def _record(self, *item: Any) -> None:
        with self.seen:
            self.events.append(item)  # type: ignore[arg-type]
            self.seen.notify_all()

    def wait_events(self, n: int, timeout: float = DEADLINE) -> list[tuple[str, Any, Any]]:
        end = time.monotonic() + timeout
        with self.seen:
            while len(self.events) < n:
                left = end - time.monotonic()
                assert left > 0, f"only {len(self.events)} of {n} callbacks: {self.events}"
                self.seen.wait(left)
            return list(self.events)

    def on_connection_request(self, request: ConnectionRequestContext) -> Any:
        self._record("request", request, None)
        return self.decide(request)

    def on_new_connection(self, context: Context) -> None:
        self._record("new", context, None)
        self.send_private_message(context.client_id, "welcome")

    def on_message(self, message: str, context: Context) -> None:
        if self.message_hook is not None:
            self.message_hook(message, context)
        self._record("message", message, context)

    def on_disconnect(self, context: Context) -> None:
        self._record("disconnect", context, None)

    def on_error(self, error: str, context: Context) -> None:
        self._record("error", error, context)


def connected_sync(broker: FakeBroker, cls: type[PyStrandsClient] = Recorder, **kw: Any) -> Any:
    client = cls("127.0.0.1", broker.port, **{**FAST, **kw})
    n = broker.connection_count
    assert client.connect() is True
    broker.wait_connections(n + 1)
    wait_for(lambda: client.connected, what="connected")
    return client


def test_sync_constructor_defaults_and_attributes() -> None:
    c = PyStrandsClient()
    assert (c.host, c.port, c.connected, c.auto_reconnect) == ("localhost", 8081, False, True)
    assert (c.reconnect_delay, c.max_reconnect_delay, c.reconnect_backoff) == (1.0, 30.0, 2.0)
    c2 = PyStrandsClient("h", 1, False, 0.5, 5.0, 3.0)
    assert (c2.host, c2.port, c2.auto_reconnect, c2.reconnect_delay, c2.max_reconnect_delay, c2.reconnect_backoff) == (
        "h", 1, False, 0.5, 5.0, 3.0,
    )


def test_sync_connect_failure_returns_false(broker: FakeBroker) -> None:
    broker.stop_listening()
    c = PyStrandsClient("127.0.0.1", broker.port, auto_reconnect=False)
    assert c.connect() is False
    assert c.connected is False
    c.disconnect(0.5)


def test_sync_callbacks_and_sends(broker: FakeBroker) -> None:
    c = connected_sync(broker)
    try:
        broker.send_event("new_connection", {"context": ctx("c1", "lobby", {"u": 1})})
        frame = broker.recv()
        assert frame["action"] == "message_to_connection"
        assert frame["params"] == {"conn_id": "c1", "message": "welcome"}
        broker.message("c1", "hello", "lobby")
        broker.send_event("disconnected", {"context": ctx("c1", "lobby")})
        broker.send_event("error", {"error": "write failed", "context": ctx("c1", "lobby")})
        broker.send({"request_id": "heartbeat", "action": "heartbeat", "params": {}})
        events = c.wait_events(4)
        kinds = [e[0] for e in events]
        assert kinds == ["new", "message", "disconnect", "error"]
        assert events[0][1] == Context("c1", "lobby", {"u": 1})
        assert events[1][1] == "hello" and events[1][2].room_id == "lobby"
        assert events[3][1] == "write failed" and events[3][2].client_id == "c1"

        c.send_room_message("lobby", "to room")
        c.send_private_message("c9", "to one")
        c.broadcast_message("to all")
        frames = broker.recv_n(3)
        assert [(f["action"], f["params"]) for f in frames] == [
            ("message_to_room", {"room_id": "lobby", "message": "to room"}),
            ("message_to_connection", {"conn_id": "c9", "message": "to one"}),
            ("broadcast", {"message": "to all"}),
        ]
        assert all(isinstance(f["request_id"], str) for f in frames)
    finally:
        c.disconnect()


@pytest.mark.parametrize(
    "decide,expected",
    [
        (lambda r: True, True),
        (lambda r: False, False),
        (lambda r: setattr(r, "accepted", False), False),
        (lambda r: None, True),
    ],
    ids=["return-true", "return-false", "set-accepted-false", "return-none"],
)
def test_sync_connection_request_decisions(broker: FakeBroker, decide: Any, expected: bool) -> None:
    c = connected_sync(broker)
    try:
        c.decide = decide
        rid = broker.connection_request(url="/ws/chat")
        resp = broker.recv()
        assert resp["request_id"] == rid and resp["action"] == "response"
        assert resp["params"]["accepted"] is expected
        assert resp["params"]["room_id"] == "/ws/chat" and resp["params"]["metadata"] == {}
        assert len(resp["params"]["client_id"]) == 36
    finally:
        c.disconnect()


def test_sync_connection_request_sets_context(broker: FakeBroker) -> None:
    c = connected_sync(broker)
    try:

        def decide(r: ConnectionRequestContext) -> bool:
            if r.headers.get("x-token", [None])[0] != "secret" or r.headers.get("X-Token", [None])[0] != "secret":
                return False
            r.context.room_id = r.url.strip("/") or "lobby"
            r.context.client_id = "alice-1"
            r.context.metadata = {"user": "alice", "roles": ["admin"]}
            return True

        c.decide = decide
        rid = broker.connection_request(url="/chat/", headers={"X-Token": ["secret"]}, query="a=1")
        resp = broker.recv()
        assert resp == {
            "request_id": rid,
            "action": "response",
            "params": {"accepted": True, "client_id": "alice-1", "room_id": "chat", "metadata": {"user": "alice", "roles": ["admin"]}},
        }
        request = c.wait_events(1)[0][1]
        assert request.query == "a=1" and request.remote_addr == "127.0.0.1:5555"
    finally:
        c.disconnect()


def test_sync_connection_request_exception_rejects(broker: FakeBroker) -> None:
    c = connected_sync(broker)
    try:

        def decide(r: ConnectionRequestContext) -> bool:
            raise RuntimeError("db down")

        c.decide = decide
        rid = broker.connection_request()
        assert broker.recv() == {"request_id": rid, "action": "response", "params": {"accepted": False}}
        events = c.wait_events(2)
        assert events[1][0] == "error" and events[1][1] == "db down"
    finally:
        c.disconnect()


def test_sync_handler_exception_reports_and_keeps_running(broker: FakeBroker, caplog: pytest.LogCaptureFixture) -> None:
    class Boom(Recorder):
        def on_message(self, message: str, context: Context) -> None:
            if message == "boom":
                raise ValueError("bad input")
            self.send_private_message(context.client_id, f"ok:{message}")

    class BadOnError(Boom):
        def on_error(self, error: str, context: Context) -> None:
            super().on_error(error, context)
            raise RuntimeError("on_error broke too")

    c = connected_sync(broker, BadOnError)
    try:
        with caplog.at_level(logging.ERROR, logger="pystrands.client"):
            broker.message("c1", "boom")
            broker.message("c1", "after")
            assert broker.recv()["params"] == {"conn_id": "c1", "message": "ok:after"}
        events = c.wait_events(1)
        assert events[0][:2] == ("error", "bad input") and events[0][2].client_id == "c1"
        assert "bad input" in caplog.text and "Traceback" in caplog.text
        assert "on_error raised" in caplog.text
    finally:
        c.disconnect()


def test_sync_per_client_order_and_slow_client_isolation(broker: FakeBroker) -> None:
    gate = threading.Event()
    started = threading.Event()

    class Ordered(PyStrandsClient):
        def on_message(self, message: str, context: Context) -> None:
            if message == "slow":
                started.set()
                assert gate.wait(DEADLINE)
            self.send_private_message(context.client_id, f"{context.client_id}:{message}")

    c = connected_sync(broker, Ordered)
    try:
        broker.message("A", "slow")
        for i in range(20):
            broker.message("A", f"a{i}")
        assert started.wait(DEADLINE)
        for i in range(20):
            broker.message("B", f"b{i}")
        # B is fully handled while A's first handler is still blocked
        b_frames = broker.recv_n(20)
        assert by_message(b_frames) == [f"B:b{i}" for i in range(20)]
        assert not gate.is_set()
        gate.set()
        a_frames = broker.recv_n(21)
        assert by_message(a_frames) == ["A:slow"] + [f"A:a{i}" for i in range(20)]
    finally:
        gate.set()
        c.disconnect()


def test_sync_many_clients_interleaved_keep_order(broker: FakeBroker) -> None:
    class Echo(PyStrandsClient):
        def on_message(self, message: str, context: Context) -> None:
            self.send_private_message(context.client_id, message)

    c = connected_sync(broker, Echo, workers=4)
    try:
        lines = []
        for i in range(200):
            for k in range(10):
                lines.append(
                    b'{"request_id":"x","action":"new_message","params":{"message":"%d","context":{"client_id":"c%d","room_id":"r","metadata":{}}}}\n'
                    % (i, k)
                )
        broker.send_raw(b"".join(lines))
        frames = broker.recv_n(2000)
        per: dict[str, list[int]] = {}
        for f in frames:
            per.setdefault(f["params"]["conn_id"], []).append(int(f["params"]["message"]))
        assert per == {f"c{k}": list(range(200)) for k in range(10)}
    finally:
        c.disconnect()


def test_sync_garbage_and_large_messages(broker: FakeBroker) -> None:
    class Sizes(PyStrandsClient):
        def on_message(self, message: str, context: Context) -> None:
            self.send_private_message(context.client_id, f"{len(message)}:{message[:3]}")
            if len(message) > 1000:
                self.send_room_message(context.room_id, message)

    c = connected_sync(broker, Sizes)
    try:
        broker.send_raw(b"garbage\n\xff\xfe\n{\"action\": 3}\n[]\n\n   \n{\"action\":\"new_message\",\"params\":{}}\n")
        big = "x" * (2 * 1024 * 1024)
        broker.message("c1", big)
        broker.message("c1", "abc")
        f1, f2, f3 = broker.recv_n(3, timeout=10)
        assert f1["params"]["message"] == f"{len(big)}:xxx"
        assert f2["action"] == "message_to_room" and f2["params"]["message"] == big
        assert f3["params"]["message"] == "3:abc"
        assert c.connected
    finally:
        c.disconnect()


def test_sync_disconnect_waits_for_inflight_handler(broker: FakeBroker) -> None:
    started, gate, finished = threading.Event(), threading.Event(), threading.Event()

    class Slow(PyStrandsClient):
        def on_message(self, message: str, context: Context) -> None:
            started.set()
            assert gate.wait(DEADLINE)
            self.send_private_message(context.client_id, "done")
            finished.set()

    c = connected_sync(broker, Slow)
    broker.message("c1", "work")
    assert started.wait(DEADLINE)
    returned = threading.Event()

    def stopper() -> None:
        c.disconnect(timeout=DEADLINE)
        returned.set()

    t = threading.Thread(target=stopper)
    t.start()
    wait_for(lambda: not c.connected, what="disconnect started")
    assert not returned.is_set(), "disconnect returned while a handler was still running"
    gate.set()
    t.join(DEADLINE)
    assert returned.is_set() and finished.is_set()
    assert broker.recv()["params"]["message"] == "done"  # flushed before the close
    wait_for(lambda: broker.peers[-1].closed.is_set(), what="socket closed")


def test_sync_disconnect_timeout_force_closes(broker: FakeBroker) -> None:
    gate, started = threading.Event(), threading.Event()

    class Stuck(PyStrandsClient):
        def on_message(self, message: str, context: Context) -> None:
            started.set()
            gate.wait(DEADLINE)
            self.send_private_message(context.client_id, "late")

    c = connected_sync(broker, Stuck)
    try:
        broker.message("c1", "work")
        assert started.wait(DEADLINE)
        t0 = time.monotonic()
        c.disconnect(timeout=0.2)
        assert time.monotonic() - t0 < DEADLINE
        wait_for(lambda: broker.peers[-1].closed.is_set(), what="socket closed")
    finally:
        gate.set()
    broker.expect_nothing(0.1)


def test_sync_run_forever_returns_after_disconnect(broker: FakeBroker) -> None:
    c = PyStrandsClient("127.0.0.1", broker.port, **FAST)
    t = threading.Thread(target=c.run_forever)
    t.start()
    broker.wait_connections(1)
    wait_for(lambda: c.connected, what="connected")
    c.disconnect()
    t.join(DEADLINE)
    assert not t.is_alive()
    broker.stop_listening()


def test_sync_disconnect_from_handler(broker: FakeBroker) -> None:
    class Quitter(PyStrandsClient):
        def on_message(self, message: str, context: Context) -> None:
            self.send_private_message(context.client_id, "bye")
            self.disconnect(timeout=1.0)

    c = Quitter("127.0.0.1", broker.port, **FAST)
    t = threading.Thread(target=c.run_forever)
    t.start()
    broker.wait_connections(1)
    broker.message("c1", "quit")
    assert broker.recv()["params"]["message"] == "bye"
    t.join(DEADLINE)
    assert not t.is_alive() and not c.connected


def test_sync_reconnects_after_connection_drop(broker: FakeBroker) -> None:
    c = connected_sync(broker)
    try:
        broker.drop_connections()
        broker.wait_connections(2)
        wait_for(lambda: c.connected, what="reconnected")
        broker.message("c1", "after reconnect")
        assert c.wait_events(1)[0][1] == "after reconnect"
    finally:
        c.disconnect()


def test_sync_reconnects_after_broker_restart(broker: FakeBroker) -> None:
    c = connected_sync(broker)
    try:
        broker.stop_listening()
        broker.drop_connections()
        wait_for(lambda: not c.connected, what="disconnect noticed")
        c.send_room_message("r", "kept while down")  # kept, no exception
        assert c.buffered_sends == 1
        broker.listen()
        broker.wait_connections(2)
        wait_for(lambda: c.connected, what="reconnected")
        c.send_room_message("r", "back")
        # the kept send is written first on the new connection, right after the hello
        assert broker.recv()["params"]["message"] == "kept while down"
        assert broker.recv()["params"]["message"] == "back"
        assert c.dropped_sends == 0 and c.buffered_sends == 0
    finally:
        c.disconnect()


def test_sync_no_reconnect_after_intentional_disconnect(broker: FakeBroker) -> None:
    c = connected_sync(broker)
    c.disconnect()
    assert not c.connected
    time.sleep(0.3)  # several reconnect delays: a reconnect would show up as connection #2
    assert broker.connection_count == 1


def test_sync_no_reconnect_when_disabled(broker: FakeBroker) -> None:
    c = PyStrandsClient("127.0.0.1", broker.port, auto_reconnect=False, reconnect_delay=0.05)
    t = threading.Thread(target=c.run_forever)
    t.start()
    broker.wait_connections(1)
    wait_for(lambda: c.connected, what="connected")
    broker.drop_connections()
    t.join(DEADLINE)
    assert not t.is_alive(), "run_forever must return when the connection is lost without auto_reconnect"
    time.sleep(0.3)
    assert broker.connection_count == 1 and not c.connected


def test_sync_run_forever_retries_first_connect(broker: FakeBroker) -> None:
    broker.stop_listening()
    c = PyStrandsClient("127.0.0.1", broker.port, **FAST)
    t = threading.Thread(target=c.run_forever)
    t.start()
    try:
        time.sleep(0.15)
        broker.listen()
        broker.wait_connections(1)
        wait_for(lambda: c.connected, what="connected")
    finally:
        c.disconnect()
        t.join(DEADLINE)
    assert not t.is_alive()


def test_sync_send_while_disconnected_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    c = PyStrandsClient("127.0.0.1", 1, max_buffered_sends=4)
    with caplog.at_level(logging.WARNING, logger="pystrands.client"):
        for _ in range(3):
            c.send_room_message("r", "m")
            c.send_private_message("c", "m")
            c.broadcast_message("m")
    assert c.buffered_sends == 4 and c.dropped_sends == 5  # drop-oldest beyond the bound
    assert len([r for r in caplog.records if "dropping" in r.getMessage()]) == 1


@pytest.mark.skipif(os.name != "posix", reason="needs pthread_kill")
def test_sync_run_forever_ctrl_c_stops_cleanly(broker: FakeBroker) -> None:
    c = PyStrandsClient("127.0.0.1", broker.port, **FAST)
    main = threading.main_thread().ident
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def blocked_in_run_forever() -> bool:
        frame = sys._current_frames().get(main)  # type: ignore[arg-type]
        names = []
        while frame is not None:
            names.append(frame.f_code.co_name)
            frame = frame.f_back
        return len(names) > 1 and names[0] == "wait" and "run_forever" in names and "connect" not in names

    def interrupt() -> None:
        broker.wait_connections(1)
        wait_for(lambda: c.connected, what="connected")
        wait_for(blocked_in_run_forever, what="run_forever waiting")
        signal.pthread_kill(main, signal.SIGINT)  # type: ignore[arg-type]

    t = threading.Thread(target=interrupt)
    t.start()
    try:
        c.run_forever()
    except KeyboardInterrupt:  # pragma: no cover - the failure mode
        pytest.fail("run_forever let KeyboardInterrupt escape")
    finally:
        t.join(DEADLINE)
    assert not c.connected
    wait_for(lambda: broker.peers[-1].closed.is_set(), what="socket closed")


# =========================================================================== async client


class ARecorder(AsyncPyStrandsClient):
    """Async client recording every callback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple[str, Any, Any]] = []
        self.changed: asyncio.Event | None = None
        self.decide: Callable[[ConnectionRequestContext], Any] = lambda r: True

    def _record(self, *item: Any) -> None:
        self.events.append(item)  # type: ignore[arg-type]
        if self.changed is None:
            self.changed = asyncio.Event()
        self.changed.set()

    async def wait_events(self, n: int, timeout: float = DEADLINE) -> list[tuple[str, Any, Any]]:
        end = time.monotonic() + timeout
        while len(self.events) < n:
            if self.changed is None:
                self.changed = asyncio.Event()
            self.changed.clear()
            left = end - time.monotonic()
            assert left > 0, f"only {len(self.events)} of {n} callbacks: {self.events}"
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                pass
        return list(self.events)

    async def on_connection_request(self, request: ConnectionRequestContext) -> Any:
        self._record("request", request, None)
        result = self.decide(request)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    async def on_new_connection(self, context: Context) -> None:
        self._record("new", context, None)
        await self.send_private_message(context.client_id, "welcome")

    async def on_message(self, message: str, context: Context) -> None:
        self._record("message", message, context)

    async def on_disconnect(self, context: Context) -> None:
        self._record("disconnect", context, None)

    async def on_error(self, error: str, context: Context) -> None:
        self._record("error", error, context)


async def connected_async(broker: FakeBroker, cls: type[AsyncPyStrandsClient] = ARecorder, **kw: Any) -> Any:
    client = cls("127.0.0.1", broker.port, **{**FAST, **kw})
    n = broker.connection_count
    assert await client.connect() is True
    await athread(broker.wait_connections, n + 1)
    return client


def test_async_constructor_outside_loop() -> None:
    c = AsyncPyStrandsClient()
    assert (c.host, c.port, c.connected, c.auto_reconnect) == ("localhost", 8081, False, True)
    assert (c.reconnect_delay, c.max_reconnect_delay, c.reconnect_backoff) == (1.0, 30.0, 2.0)


def test_async_callbacks_and_sends(broker: FakeBroker) -> None:
    async def body() -> None:
        c = await connected_async(broker)
        try:
            broker.send_event("new_connection", {"context": ctx("c1", "lobby", {"u": 1})})
            frame = await athread(broker.recv)
            assert frame["action"] == "message_to_connection"
            assert frame["params"] == {"conn_id": "c1", "message": "welcome"}
            broker.message("c1", "hello", "lobby")
            broker.send_event("disconnected", {"context": ctx("c1", "lobby")})
            broker.send_event("error", {"error": "write failed", "context": ctx("c1", "lobby")})
            broker.send({"request_id": "heartbeat", "action": "heartbeat", "params": {}})
            events = await c.wait_events(4)
            assert [e[0] for e in events] == ["new", "message", "disconnect", "error"]
            assert events[0][1] == Context("c1", "lobby", {"u": 1})
            assert events[1][1] == "hello" and events[3][1] == "write failed"

            await c.send_room_message("lobby", "to room")
            await c.send_private_message("c9", "to one")
            await c.broadcast_message("to all")
            frames = await athread(broker.recv_n, 3)
            assert [(f["action"], f["params"]) for f in frames] == [
                ("message_to_room", {"room_id": "lobby", "message": "to room"}),
                ("message_to_connection", {"conn_id": "c9", "message": "to one"}),
                ("broadcast", {"message": "to all"}),
            ]
        finally:
            await c.disconnect()

    run_async(body)


def test_async_connection_requests(broker: FakeBroker) -> None:
    async def body() -> None:
        c = await connected_async(broker)
        try:
            cases: list[tuple[Callable[[ConnectionRequestContext], Any], dict[str, Any]]] = []

            def set_ctx(r: ConnectionRequestContext) -> bool:
                r.context.room_id = r.url.strip("/")
                r.context.client_id = "bob"
                r.context.metadata = {"user": r.headers.get("x-token", [None])[0]}
                return True

            async def async_reject(r: ConnectionRequestContext) -> bool:
                await asyncio.sleep(0)
                return False

            def raises(r: ConnectionRequestContext) -> bool:
                raise RuntimeError("auth backend down")

            async def async_set_ctx(r: ConnectionRequestContext) -> bool:
                await asyncio.sleep(0)
                return set_ctx(r)

            async def async_raises(r: ConnectionRequestContext) -> bool:
                await asyncio.sleep(0)
                raise RuntimeError("token check failed")

            cases = [
                (set_ctx, {"accepted": True, "client_id": "bob", "room_id": "chat", "metadata": {"user": "secret"}}),
                (async_set_ctx, {"accepted": True, "client_id": "bob", "room_id": "chat", "metadata": {"user": "secret"}}),
                (async_raises, {"accepted": False}),
                (async_reject, {"accepted": False}),
                (lambda r: setattr(r, "accepted", False), {"accepted": False}),
                (lambda r: None, {"accepted": True}),
                (raises, {"accepted": False}),
            ]
            for decide, expected in cases:
                c.decide = decide
                rid = broker.connection_request(url="/chat")
                resp = await athread(broker.recv)
                assert resp["request_id"] == rid and resp["action"] == "response"
                for key, value in expected.items():
                    assert resp["params"][key] == value
            assert resp["params"] == {"accepted": False}  # exception: bare rejection
            events = await c.wait_events(9)
            errors = [e[1] for e in events if e[0] == "error"]
            assert errors == ["token check failed", "auth backend down"]
        finally:
            await c.disconnect()

    run_async(body)


def test_async_connection_requests_run_concurrently(broker: FakeBroker) -> None:
    async def body() -> None:
        release = asyncio.Event()

        class SlowAuth(AsyncPyStrandsClient):
            async def on_connection_request(self, request: ConnectionRequestContext) -> bool:
                if request.url == "/slow":
                    await release.wait()
                return True

        c = await connected_async(broker, SlowAuth)
        try:
            slow = broker.connection_request(url="/slow")
            fast = broker.connection_request(url="/fast")
            first = await athread(broker.recv)
            assert first["request_id"] == fast
            release.set()
            second = await athread(broker.recv)
            assert second["request_id"] == slow
        finally:
            release.set()
            await c.disconnect()

    run_async(body)


def test_async_slow_client_does_not_delay_others_and_order_holds(broker: FakeBroker) -> None:
    async def body() -> None:
        gate = asyncio.Event()
        started = asyncio.Event()

        class Ordered(AsyncPyStrandsClient):
            async def on_message(self, message: str, context: Context) -> None:
                if message == "slow":
                    started.set()
                    await gate.wait()
                elif message.endswith("sleep"):
                    await asyncio.sleep(0.01)
                await self.send_private_message(context.client_id, f"{context.client_id}:{message}")

        c = await connected_async(broker, Ordered)
        try:
            broker.message("A", "slow")
            for i in range(20):
                broker.message("A", f"a{i}" + ("sleep" if i % 5 == 0 else ""))
            await await_event(started)
            for i in range(20):
                broker.message("B", f"b{i}" + ("sleep" if i % 7 == 0 else ""))
            b_frames = await athread(broker.recv_n, 20)
            assert by_message(b_frames) == [f"B:b{i}" + ("sleep" if i % 7 == 0 else "") for i in range(20)]
            assert not gate.is_set()
            gate.set()
            a_frames = await athread(broker.recv_n, 21)
            assert by_message(a_frames) == ["A:slow"] + [f"A:a{i}" + ("sleep" if i % 5 == 0 else "") for i in range(20)]
        finally:
            gate.set()
            await c.disconnect()

    run_async(body)


def test_async_sleeping_handler_on_a_does_not_block_b(broker: FakeBroker) -> None:
    """The documented case (a slow `await` in A's handler): B is answered first. A's handler
    waits until B's handler has run, so a client that serialized handlers would time out."""

    async def body() -> None:
        b_handled = asyncio.Event()

        class Sleepy(AsyncPyStrandsClient):
            async def on_message(self, message: str, context: Context) -> None:
                if context.client_id == "A":
                    await asyncio.wait_for(b_handled.wait(), DEADLINE)
                await self.send_private_message(context.client_id, message)
                if context.client_id == "B":
                    b_handled.set()

        c = await connected_async(broker, Sleepy)
        try:
            broker.message("A", "a")
            broker.message("B", "b")
            frames = await athread(broker.recv_n, 2)
            assert by_message(frames) == ["b", "a"]
        finally:
            await c.disconnect()

    run_async(body)


def test_async_handlers_run_inside_a_task(broker: FakeBroker) -> None:
    """Handlers run inline until they first wait, but always inside a real task: asyncio.timeout,
    TaskGroup and current_task work, before and after the first suspension, and a handler that
    raises after suspending is reported like any other."""

    async def body() -> None:
        errors: list[str] = []

        class Tasky(AsyncPyStrandsClient):
            async def on_message(self, message: str, context: Context) -> None:
                before = asyncio.current_task()
                assert before is not None
                if message == "timeout":
                    try:
                        async with asyncio.timeout(0.01):
                            await asyncio.Event().wait()
                        reply = "no timeout"
                    except TimeoutError:
                        reply = "timed out"
                elif message == "group":
                    async with asyncio.TaskGroup() as tg:
                        a = tg.create_task(asyncio.sleep(0, "x"))
                        b = tg.create_task(asyncio.sleep(0.001, "y"))
                    reply = a.result() + b.result()
                elif message == "raise-late":
                    await asyncio.sleep(0)
                    raise RuntimeError("late failure")
                else:
                    reply = "plain"
                assert asyncio.current_task() is before
                await self.send_private_message(context.client_id, reply)

            async def on_error(self, error: str, context: Context) -> None:
                await asyncio.sleep(0)
                errors.append(f"{context.client_id}:{error}")
                await self.send_private_message(context.client_id, "reported")

        c = await connected_async(broker, Tasky)
        try:
            broker.message("A", "timeout")
            broker.message("B", "group")
            broker.message("C", "raise-late")
            broker.message("D", "plain")
            frames = await athread(broker.recv_n, 4)
            got = {f["params"]["conn_id"]: f["params"]["message"] for f in frames}
            assert got == {"A": "timed out", "B": "xy", "C": "reported", "D": "plain"}
            assert errors == ["C:late failure"]
            assert not c._queues and c._pending == 0
        finally:
            await c.disconnect()

    if sys.version_info < (3, 11):
        pytest.skip("asyncio.timeout and TaskGroup need Python 3.11")
    run_async(body)


def test_async_many_clients_interleaved_keep_order(broker: FakeBroker) -> None:
    async def body() -> None:
        class Echo(AsyncPyStrandsClient):
            async def on_message(self, message: str, context: Context) -> None:
                if int(message) % 50 == 0:
                    await asyncio.sleep(0)
                await self.send_private_message(context.client_id, message)

        c = await connected_async(broker, Echo, max_pending=100)
        try:
            lines = []
            for i in range(300):
                for k in range(10):
                    lines.append(
                        b'{"request_id":"x","action":"new_message","params":{"message":"%d","context":{"client_id":"c%d","room_id":"r","metadata":{}}}}\n'
                        % (i, k)
                    )
            broker.send_raw(b"".join(lines))
            frames = await athread(broker.recv_n, 3000)
            per: dict[str, list[int]] = {}
            for f in frames:
                per.setdefault(f["params"]["conn_id"], []).append(int(f["params"]["message"]))
            assert per == {f"c{k}": list(range(300)) for k in range(10)}
            assert not c._queues and c._pending == 0
        finally:
            await c.disconnect()

    run_async(body)


def test_async_handler_exception_reports_and_keeps_running(broker: FakeBroker, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        errors: list[tuple[str, str]] = []

        class Boom(AsyncPyStrandsClient):
            async def on_message(self, message: str, context: Context) -> None:
                if message == "boom":
                    raise ValueError("bad input")
                await self.send_private_message(context.client_id, f"ok:{message}")

            async def on_error(self, error: str, context: Context) -> None:
                errors.append((error, context.client_id))
                raise RuntimeError("on_error broke too")

        c = await connected_async(broker, Boom)
        try:
            broker.message("c1", "boom")
            broker.message("c1", "after")
            frame = await athread(broker.recv)
            assert frame["params"] == {"conn_id": "c1", "message": "ok:after"}
            assert errors == [("bad input", "c1")]
        finally:
            await c.disconnect()

    with caplog.at_level(logging.ERROR, logger="pystrands.async_client"):
        run_async(body)
    assert "bad input" in caplog.text and "Traceback" in caplog.text and "on_error raised" in caplog.text


def test_async_garbage_and_large_messages(broker: FakeBroker) -> None:
    async def body() -> None:
        class Sizes(AsyncPyStrandsClient):
            async def on_message(self, message: str, context: Context) -> None:
                await self.send_private_message(context.client_id, f"{len(message)}")
                if len(message) > 1000:
                    await self.send_room_message(context.room_id, message)

        c = await connected_async(broker, Sizes)
        try:
            broker.send_raw(b"garbage\n\xff\xfe\n{\"action\": 3}\n[]\n\n{\"action\":\"new_message\",\"params\":{}}\n")
            big = "y" * (3 * 1024 * 1024)
            broker.message("c1", big)
            broker.message("c1", "abc")
            f1, f2, f3 = await athread(broker.recv_n, 3, 10.0)
            assert f1["params"]["message"] == str(len(big))
            assert f2["params"]["message"] == big
            assert f3["params"]["message"] == "3"
            assert c.connected
        finally:
            await c.disconnect()

    run_async(body)


def test_async_disconnect_waits_for_inflight_handler(broker: FakeBroker) -> None:
    async def body() -> None:
        started, gate, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

        class Slow(AsyncPyStrandsClient):
            async def on_message(self, message: str, context: Context) -> None:
                started.set()
                await gate.wait()
                await self.send_private_message(context.client_id, "done")
                finished.set()

        c = await connected_async(broker, Slow)
        broker.message("c1", "work")
        await await_event(started)
        stopper = asyncio.create_task(c.disconnect(timeout=DEADLINE))
        await asyncio.sleep(0)
        assert not c.connected
        assert not stopper.done()
        gate.set()
        await asyncio.wait_for(stopper, DEADLINE)
        assert finished.is_set()
        frame = await athread(broker.recv)
        assert frame["params"]["message"] == "done"
        await athread(wait_for, lambda: broker.peers[-1].closed.is_set())

    run_async(body)


def test_async_disconnect_timeout_cancels_stuck_handler(broker: FakeBroker) -> None:
    async def body() -> None:
        started = asyncio.Event()
        cancelled = asyncio.Event()

        class Stuck(AsyncPyStrandsClient):
            async def on_message(self, message: str, context: Context) -> None:
                started.set()
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    cancelled.set()
                    raise

        c = await connected_async(broker, Stuck)
        broker.message("c1", "work")
        await await_event(started)
        await asyncio.wait_for(c.disconnect(timeout=0.1), DEADLINE)
        assert cancelled.is_set()
        await athread(wait_for, lambda: broker.peers[-1].closed.is_set())

    run_async(body)


def test_async_run_forever_returns_after_disconnect(broker: FakeBroker) -> None:
    async def body() -> None:
        c = AsyncPyStrandsClient("127.0.0.1", broker.port, **FAST)
        task = asyncio.create_task(c.run_forever())
        await athread(broker.wait_connections, 1)
        await athread(wait_for, lambda: c.connected)
        await c.disconnect()
        await asyncio.wait_for(task, DEADLINE)
        assert not c.connected

    run_async(body)


def test_async_client_built_at_import_time_like_fastapi(broker: FakeBroker) -> None:
    """Seed 002 FastAPI pattern: constructed outside a loop, run as a task, disconnected at shutdown.

    Runs twice on two different event loops with the same client object.
    """

    class Backend(AsyncPyStrandsClient):
        async def on_message(self, message: str, context: Context) -> None:
            await self.send_room_message(context.room_id, f"echo: {message}")

    backend = Backend("127.0.0.1", broker.port, **FAST)  # no running loop here

    for round_no in (1, 2):

        async def body() -> None:
            task = asyncio.create_task(backend.run_forever())
            await athread(broker.wait_connections, round_no)
            await athread(wait_for, lambda: backend.connected)
            broker.message("c1", f"hi{round_no}")
            frame = await athread(broker.recv)
            assert frame["params"] == {"room_id": "room", "message": f"echo: hi{round_no}"}
            await backend.disconnect()
            await asyncio.wait_for(task, DEADLINE)

        run_async(body)
        assert not backend.connected


def test_async_run_forever_cancel_disconnects(broker: FakeBroker) -> None:
    async def body() -> None:
        c = AsyncPyStrandsClient("127.0.0.1", broker.port, **FAST)
        task = asyncio.create_task(c.run_forever())
        await athread(broker.wait_connections, 1)
        await athread(wait_for, lambda: c.connected)
        task.cancel()
        # Like PyStrands 1.0: a cancelled run_forever disconnects and returns normally.
        assert await asyncio.wait_for(task, DEADLINE) is None
        assert not c.connected
        await athread(wait_for, lambda: broker.peers[-1].closed.is_set())

    run_async(body)


def test_async_reconnects_after_drop_and_restart(broker: FakeBroker) -> None:
    async def body() -> None:
        c = await connected_async(broker)
        try:
            broker.drop_connections()
            await athread(broker.wait_connections, 2)
            await athread(wait_for, lambda: c.connected)
            broker.message("c1", "after drop")
            assert (await c.wait_events(1))[0][1] == "after drop"

            broker.stop_listening()
            broker.drop_connections()
            await athread(wait_for, lambda: not c.connected)
            await c.send_room_message("r", "kept")  # kept, no exception
            assert c.buffered_sends == 1
            broker.listen()
            await athread(broker.wait_connections, 3)
            await athread(wait_for, lambda: c.connected)
            await c.send_room_message("r", "back")
            frame = await athread(broker.recv)
            assert frame["params"]["message"] == "kept"
            frame = await athread(broker.recv)
            assert frame["params"]["message"] == "back"
            assert c.dropped_sends == 0 and c.buffered_sends == 0
        finally:
            await c.disconnect()

    run_async(body)


def test_async_no_reconnect_after_intentional_disconnect(broker: FakeBroker) -> None:
    async def body() -> None:
        c = await connected_async(broker)
        await c.disconnect()
        await asyncio.sleep(0.3)  # several reconnect delays
        assert broker.connection_count == 1 and not c.connected

    run_async(body)


def test_async_no_reconnect_when_disabled(broker: FakeBroker) -> None:
    async def body() -> None:
        c = AsyncPyStrandsClient("127.0.0.1", broker.port, auto_reconnect=False, reconnect_delay=0.05)
        task = asyncio.create_task(c.run_forever())
        await athread(broker.wait_connections, 1)
        await athread(wait_for, lambda: c.connected)
        broker.drop_connections()
        await asyncio.wait_for(task, DEADLINE)  # run_forever returns
        await asyncio.sleep(0.3)
        assert broker.connection_count == 1 and not c.connected

    run_async(body)


def test_async_run_forever_retries_first_connect(broker: FakeBroker) -> None:
    async def body() -> None:
        broker.stop_listening()
        c = AsyncPyStrandsClient("127.0.0.1", broker.port, **FAST)
        task = asyncio.create_task(c.run_forever())
        await asyncio.sleep(0.15)
        broker.listen()
        await athread(broker.wait_connections, 1)
        await athread(wait_for, lambda: c.connected)
        await c.disconnect()
        await asyncio.wait_for(task, DEADLINE)

    run_async(body)


def test_async_connect_failure_and_send_while_disconnected(broker: FakeBroker, caplog: pytest.LogCaptureFixture) -> None:
    broker.stop_listening()

    async def body() -> None:
        c = AsyncPyStrandsClient("127.0.0.1", broker.port, auto_reconnect=False, max_buffered_sends=0)
        assert await c.connect() is False
        for _ in range(3):
            await c.send_room_message("r", "m")
            await c.send_private_message("c", "m")
            await c.broadcast_message("m")
        assert c.dropped_sends == 9 and c.buffered_sends == 0  # 0: nothing is kept
        await c.run_forever()  # auto_reconnect off and broker down: returns
        await c.disconnect()

    with caplog.at_level(logging.WARNING, logger="pystrands.async_client"):
        run_async(body)
    assert len([r for r in caplog.records if "dropping" in r.getMessage()]) == 1


def test_async_disconnect_before_run_is_harmless() -> None:
    async def body() -> None:
        c = AsyncPyStrandsClient("127.0.0.1", 1)
        await c.disconnect()
        assert not c.connected

    run_async(body)


def test_async_plain_function_callbacks_are_accepted(broker: FakeBroker) -> None:
    async def body() -> None:
        seen = asyncio.Event()

        class Plain(AsyncPyStrandsClient):
            def on_message(self, message: str, context: Context) -> None:  # type: ignore[override]
                seen.set()

        c = await connected_async(broker, Plain)
        try:
            broker.message("c1", "x")
            await await_event(seen)
        finally:
            await c.disconnect()

    run_async(body)


def test_async_disconnect_from_handler_and_double_connect(broker: FakeBroker) -> None:
    async def body() -> None:
        class Quitter(AsyncPyStrandsClient):
            async def on_message(self, message: str, context: Context) -> None:
                await self.send_private_message(context.client_id, "bye")
                await self.disconnect(timeout=1.0)

        c = Quitter("127.0.0.1", broker.port, **FAST)
        task = asyncio.create_task(c.run_forever())
        await athread(broker.wait_connections, 1)
        await athread(wait_for, lambda: c.connected)
        assert await c.connect() is True  # already connected: no second connection
        broker.message("c1", "quit")
        frame = await athread(broker.recv)
        assert frame["params"]["message"] == "bye"
        await asyncio.wait_for(task, DEADLINE)
        assert not c.connected and broker.connection_count == 1

    run_async(body)


def test_sync_double_connect_is_idempotent(broker: FakeBroker) -> None:
    c = connected_sync(broker)
    try:
        assert c.connect() is True
        assert broker.connection_count == 1
    finally:
        c.disconnect()


# ============================================================== protocol v2 (both clients)
#
# One harness drives either client from plain test code (the async one on a loop in a
# background thread), so every v2 behaviour is checked for both with the same assertions.

KINDS = ["sync", "async"]
HELLO_PARAMS = {"version": 2, "features": ["ack", "heartbeat", "rooms", "history"], "client": f"pystrands-python/{pystrands.__version__}"}


@pytest.fixture(autouse=True)
def _no_secret_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_SECRET_ENV, raising=False)


class Harness:
    """A sync or async client whose ``on_message`` records what it saw.

    Messages starting with ``echo`` are answered with ``send_private_message``, ``raise``
    makes the handler raise, and a message registered with :meth:`gate` blocks its
    handler until the gate opens (``started(message)`` is set when it blocks).
    """

    def __init__(self, kind: str, broker: FakeBroker, connect: bool = True, **kw: Any) -> None:
        self.kind = kind
        self.seen: list[tuple[str, str, str | None, bool, dict[str, Any]]] = []
        self.cond = threading.Condition()
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.stopped = False
        h = self
        options = {**FAST, **kw}
        if kind == "sync":

            class SyncClient(PyStrandsClient):
                def on_message(self, message: str, context: Context) -> None:
                    gate = h.gates.get(message)
                    if gate is not None:
                        h.started[message].set()
                        gate.wait(DEADLINE)
                    if message.startswith("echo"):
                        self.send_private_message(context.client_id, message)
                    h.record(message, context)
                    if message.startswith("raise"):
                        raise ValueError(message)

            self.client: Any = SyncClient("127.0.0.1", broker.port, **options)
        else:

            class AsyncClient(AsyncPyStrandsClient):
                async def on_message(self, message: str, context: Context) -> None:
                    gate = h.gates.get(message)
                    if gate is not None:
                        h.started[message].set()
                        await asyncio.get_running_loop().run_in_executor(None, gate.wait, DEADLINE)
                    if message.startswith("echo"):
                        await self.send_private_message(context.client_id, message)
                    h.record(message, context)
                    if message.startswith("raise"):
                        raise ValueError(message)

                async def on_error(self, error: str, context: Context) -> None:
                    pass

            self.client = AsyncClient("127.0.0.1", broker.port, **options)
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
            self.thread.start()
        if connect:
            n = broker.connection_count
            assert self.call(self.client.connect) is True
            broker.wait_connections(n + 1)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = DEADLINE) -> Any:
        """Call a client method (awaiting it on the client's loop for the async client)."""
        if self.loop is None:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(fn(*args), self.loop).result(timeout)

    def gate(self, message: str) -> threading.Event:
        self.gates[message] = threading.Event()
        self.started[message] = threading.Event()
        return self.gates[message]

    def record(self, message: str, context: Context) -> None:
        with self.cond:
            self.seen.append((message, context.client_id, context.event_id, context.redelivered, context.to_json()))
            self.cond.notify_all()

    def wait_seen(self, n: int, timeout: float = DEADLINE) -> list[tuple[str, str, str | None, bool, dict[str, Any]]]:
        end = time.monotonic() + timeout
        with self.cond:
            while len(self.seen) < n:
                left = end - time.monotonic()
                assert left > 0, f"only {len(self.seen)} of {n} messages handled"
                self.cond.wait(left)
            return list(self.seen)

    def run_forever(self) -> None:
        """Start run_forever in the background (it reconnects with backoff)."""
        if self.loop is None:
            self.thread = threading.Thread(target=self.client.run_forever, daemon=True)
            self.thread.start()
        else:
            asyncio.run_coroutine_threadsafe(self.client.run_forever(), self.loop)

    def disconnect(self, timeout: float = DEADLINE) -> None:
        for gate in self.gates.values():
            gate.set()
        self.stop(timeout)

    def stop(self, timeout: float = DEADLINE) -> None:
        """Disconnect without opening the gates (once)."""
        if self.stopped:
            return
        self.stopped = True
        self.call(self.client.disconnect, timeout, timeout=timeout + DEADLINE)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            assert self.thread is not None
            self.thread.join(DEADLINE)
            self.loop.close()
            self.loop = None


@contextmanager
def session(kind: str, broker: FakeBroker, **kw: Any) -> Iterator[Harness]:
    """A :class:`Harness` client on ``broker``; afterwards the client disconnects and the
    fake broker closes (the broker also when the client could not be built)."""
    try:
        h = Harness(kind, broker, **kw)
        try:
            yield h
        finally:
            h.disconnect()
    finally:
        broker.close()


def heartbeat_round_trips(broker: FakeBroker, peer: Any, n: int = 2) -> None:
    """Let the client answer ``n`` heartbeats. A heartbeat reply carries any due ack, and
    the second round trip guarantees that everything the client wrote with the first one
    was recorded: afterwards ``peer.acks`` is complete up to that point."""
    have = peer.heartbeat_replies
    for i in range(1, n + 1):
        broker.heartbeat()
        peer.wait_heartbeat_replies(have + i)


def message_lines(items: list[tuple[int, str, str]]) -> bytes:
    """Raw v2 new_message lines for (seq, client_id, message)."""
    return b"".join(
        json.dumps(
            {"seq": seq, "request_id": f"e{seq}", "action": "new_message", "params": {"message": text, "context": ctx(cid)}}
        ).encode()
        + b"\n"
        for seq, cid, text in items
    )


@pytest.mark.parametrize("kind", KINDS)
def test_hello_is_the_first_line_on_every_connect(broker: FakeBroker, kind: str) -> None:
    h = Harness(kind, broker)
    try:
        first = broker.peers[0]
        hello = first.wait_hello()
        assert json.loads(first.raw_lines[0]) == hello
        assert hello == {"request_id": "hello", "action": "hello", "params": HELLO_PARAMS}  # no secret configured
        broker.drop_connections()
        second = broker.wait_connections(2)
        assert second.wait_hello() == hello and json.loads(second.raw_lines[0]) == hello
        wait_for(lambda: h.client.connected, what="reconnected")
        broker.message("c1", "echo after reconnect")
        assert broker.recv()["params"]["message"] == "echo after reconnect"
        assert h.client.protocol_version == 1  # a v1 broker never answers the hello
    finally:
        h.disconnect()


@pytest.mark.parametrize("kind", KINDS)
def test_v1_broker_gets_no_acks_and_no_heartbeat_replies(broker: FakeBroker, kind: str) -> None:
    h = Harness(kind, broker)
    peer = broker.peers[0]
    try:
        broker.heartbeat()
        broker.message("c1", "echo 1")
        # a seq on a v1 session (a broker bug) must not make the client acknowledge anything
        broker.send({"seq": 2, "request_id": "x", "action": "new_message", "params": {"message": "two", "context": ctx("c2")}})
        broker.send({"request_id": "hello", "action": "hello", "params": {"version": 2}})  # not a reply: ignored
        broker.heartbeat()
        broker.message("c1", "echo 3")
        h.wait_seen(3)
        assert [f["params"]["message"] for f in broker.recv_n(2)] == ["echo 1", "echo 3"]
    finally:
        h.disconnect()  # flushes everything the client still had to send, then closes
    peer.closed.wait(DEADLINE)
    assert peer.closed.is_set()
    assert peer.acks == [] and peer.heartbeat_replies == 0
    actions = [json.loads(line)["action"] for line in peer.raw_lines]
    assert actions == ["hello", "message_to_connection", "message_to_connection"]
    assert all(s[2] is None and s[3] is False for s in h.seen if s[0] != "two")  # no event ids from v1


@pytest.mark.parametrize("kind", KINDS)
def test_hello_carries_the_backend_secret(broker: FakeBroker, kind: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def hello_of(**kw: Any) -> dict[str, Any]:
        h = Harness(kind, broker, **kw)
        try:
            return broker.peers[-1].wait_hello()["params"]
        finally:
            h.disconnect()

    with caplog.at_level(logging.DEBUG, logger="pystrands"):
        assert hello_of(backend_secret="arg-s3cret") == {**HELLO_PARAMS, "secret": "arg-s3cret"}
        monkeypatch.setenv(BACKEND_SECRET_ENV, "env-s3cret")
        assert hello_of() == {**HELLO_PARAMS, "secret": "env-s3cret"}
        assert hello_of(backend_secret="arg-wins")["secret"] == "arg-wins"
        monkeypatch.setenv(BACKEND_SECRET_ENV, "")
        assert "secret" not in hello_of()
    assert "s3cret" not in caplog.text  # never logged


@pytest.mark.parametrize("kind", KINDS)
def test_v2_acks_are_cumulative_and_wait_for_a_slow_client(kind: str) -> None:
    broker = FakeBroker(version=2)
    with session(kind, broker) as h:
        peer = broker.wait_v2(1)
        wait_for(lambda: h.client.protocol_version == 2, what="v2 session")
        first, gate = h.gate("echo first"), h.gate("slow")
        broker.message("C", "echo first")  # seq 1: blocks until released below
        broker.message("A", "slow")  # seq 2: blocks until the end
        assert h.started["echo first"].wait(DEADLINE) and h.started["slow"].wait(DEADLINE)
        for i in range(9):
            broker.message("B", f"echo b{i}")  # seq 3..11 finish first
        assert [f["params"]["message"] for f in broker.recv_n(9)] == [f"echo b{i}" for i in range(9)]
        heartbeat_round_trips(broker, peer)  # anything due would have been acknowledged by now
        assert peer.acks == [], "the watermark passed an event whose handler is still running"
        first.set()  # seq 1 done: the watermark reaches 1, not beyond the running seq 2
        assert broker.recv()["params"]["message"] == "echo first"
        peer.wait_ack(1)
        heartbeat_round_trips(broker, peer)
        assert peer.acks == [1], "the watermark must stop right before the event still running"
        gate.set()
        acks = peer.wait_ack(11)
        assert acks == sorted(acks) and acks[-1] == 11 and len(set(acks)) == len(acks)
        h.wait_seen(11)
        broker.message("A", "raise after")  # seq 12: a handler that raises is handled too
        assert peer.wait_ack(12)[-1] == 12


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("echo", [False, True], ids=["quiet", "echo"])
@pytest.mark.parametrize("clients", [1, 20])
def test_v2_acks_are_batched(kind: str, echo: bool, clients: int) -> None:
    """Many events at once: far fewer ack lines than events. With one WebSocket client
    every completion moves the watermark, so acking per completion would show here."""
    broker = FakeBroker(version=2)
    with session(kind, broker) as h:
        peer = broker.wait_v2(1)
        wait_for(lambda: h.client.protocol_version == 2, what="v2 session")
        n = 2000
        text = "echo" if echo else "quiet"
        broker.send_raw(message_lines([(seq, f"c{seq % clients}", text) for seq in range(1, n + 1)]))
        acks = peer.wait_ack(n, timeout=20)
        assert acks[-1] == n and acks == sorted(acks)
        assert len(acks) < n // 4, f"{len(acks)} ack lines for {n} events"
        assert len(h.wait_seen(n)) == n
        if echo:
            assert len(broker.recv_n(n, timeout=20)) == n


@pytest.mark.parametrize("kind", KINDS)
def test_v2_heartbeats_are_answered_and_keep_the_connection_alive(kind: str) -> None:
    broker = FakeBroker(version=2, heartbeat_interval=0.25)  # silence limit 0.75 s
    with session(kind, broker) as h:
        peer = broker.wait_v2(1)
        wait_for(lambda: h.client.protocol_version == 2, what="v2 session")
        start = time.monotonic()
        count = 0
        while time.monotonic() - start < 1.6:  # twice the silence limit, heartbeats every 50 ms
            broker.heartbeat()
            count += 1
            peer.wait_heartbeat_replies(count)
            time.sleep(0.05)  # pacing of the broker's heartbeats, not synchronization
        assert broker.connection_count == 1 and not peer.closed.is_set() and h.client.connected
        assert peer.acks == []  # nothing was handled, nothing acknowledged


@pytest.mark.parametrize("kind", KINDS)
def test_v2_silence_for_three_intervals_reconnects(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    broker = FakeBroker(version=2, heartbeat_interval=0.05)  # the fake then stays silent
    with caplog.at_level(logging.WARNING, logger="pystrands"):
        with session(kind, broker):
            first = broker.wait_v2(1)
            t0 = time.monotonic()
            first.closed.wait(DEADLINE)
            assert first.closed.is_set(), "the client did not close a silent v2 connection"
            assert time.monotonic() - t0 >= 0.1  # not before ~3 x 0.05 s of silence
            second = broker.wait_v2(2)
            assert second.wait_hello()["params"] == HELLO_PARAMS
            wait_for(lambda: "Nothing received from the broker" in caplog.text, what="silence warning")


@pytest.mark.parametrize("kind", KINDS)
def test_refused_hello_logs_the_error_and_backs_off(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    broker = FakeBroker(version=2, secret="right-s3cret")
    with caplog.at_level(logging.INFO, logger="pystrands"):
        with session(kind, broker, connect=False, backend_secret="bad-s3cret") as h:
            h.run_forever()
            broker.wait_connections(4)
            wait_for(lambda: len(re.findall(r"Reconnecting to \S+ in ([0-9.]+)s", caplog.text)) >= 3, what="3 reconnects")
            assert h.client.protocol_version == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "refused" in r.getMessage()]
    assert errors and "wrong backend secret" in errors[0].getMessage()
    assert "s3cret" not in caplog.text.replace("wrong backend secret", "")
    delays = [float(d) for d in re.findall(r"Reconnecting to \S+ in ([0-9.]+)s", caplog.text)]
    # a refused hello is not a successful session: the backoff grows (0.05, 0.1, 0.2 +-15%)
    assert delays[2] > delays[0], delays
    assert all(p.acks == [] for p in broker.peers)


@pytest.mark.parametrize("kind", KINDS)
def test_refused_hello_stops_reading_even_if_the_broker_keeps_the_connection(kind: str) -> None:
    broker = FakeBroker(version=2, refuse="unsupported version", close_on_refuse=False)
    with session(kind, broker, auto_reconnect=False) as h:
        peer = broker.peers[0]
        assert peer.answered.wait(DEADLINE)
        try:
            broker.message("c1", "echo must not be handled", seq=1)
        except OSError:
            pass  # the client may already have closed the connection
        peer.closed.wait(DEADLINE)
        assert peer.closed.is_set(), "the client must close a refused connection"
    assert h.seen == [] and peer.acks == []
    broker.expect_nothing(0.05)


@pytest.mark.parametrize("kind", KINDS)
def test_v2_context_event_id_and_redelivered(kind: str) -> None:
    broker = FakeBroker(version=2)
    with session(kind, broker) as h:
        broker.wait_v2(1)
        wait_for(lambda: h.client.protocol_version == 2, what="v2 session")
        broker.message("c1", "first", request_id="1007")
        broker.message("c1", "again", request_id="1007", redelivered=True)
        seen = h.wait_seen(2)
        assert [(s[0], s[2], s[3]) for s in seen] == [("first", "1007", False), ("again", "1007", True)]
        assert seen[0][4] == {"client_id": "c1", "room_id": "room", "metadata": {}}  # to_json unchanged
        assert broker.peers[0].wait_ack(2)[-1] == 2


@pytest.mark.parametrize("kind", KINDS)
def test_v2_events_of_a_replaced_connection_are_not_acked_on_the_new_one(kind: str) -> None:
    broker = FakeBroker(version=2)
    with session(kind, broker) as h:
        broker.wait_v2(1)
        gate = h.gate("echo slow")
        broker.message("A", "echo slow")  # seq 1 of connection 1
        assert h.started["echo slow"].wait(DEADLINE)
        broker.drop_connections()
        second = broker.wait_v2(2)
        wait_for(lambda: h.client.connected and h.client.protocol_version == 2, what="v2 reconnect")
        gate2 = h.gate("echo new")
        broker.message("B", "echo new")  # seq 1 of connection 2, still running below
        assert h.started["echo new"].wait(DEADLINE)
        gate.set()  # the old connection's seq 1 finishes now; its reply goes out on the new one
        assert broker.recv()["params"]["message"] == "echo slow"
        heartbeat_round_trips(broker, second)
        assert second.acks == [], "an event of the old connection was acknowledged on the new one"
        gate2.set()
        assert broker.recv()["params"]["message"] == "echo new"
        assert second.wait_ack(1) == [1]


@pytest.mark.parametrize("kind", KINDS)
def test_v2_disconnect_acks_handled_events_but_not_abandoned_ones(kind: str) -> None:
    broker = FakeBroker(version=2)
    h = Harness(kind, broker)
    try:
        peer = broker.wait_v2(1)
        for i in range(5):
            broker.message(f"c{i}", f"m{i}")
        h.wait_seen(5)
    finally:
        h.disconnect()
    peer.closed.wait(DEADLINE)
    assert peer.acks and peer.acks[-1] == 5  # the final ack goes out before the close

    h2 = Harness(kind, broker)
    try:
        peer2 = broker.wait_v2(2)
        h2.gate("stuck")
        broker.message("A", "stuck")  # seq 1 never finishes before the deadline
        broker.message("B", "fine")  # seq 2 does
        assert h2.started["stuck"].wait(DEADLINE)
        h2.wait_seen(1)
        h2.stop(timeout=0.2)  # force-close: the stuck handler is abandoned
        peer2.closed.wait(DEADLINE)
        assert peer2.closed.is_set()
        assert peer2.acks == [], "an abandoned event (and so everything after it) must not be acknowledged"
    finally:
        h2.disconnect()
        broker.close()


@pytest.mark.parametrize("kind", KINDS)
def test_v2_a_skipped_seq_is_acked_without_other_traffic(kind: str) -> None:
    """A frame with a seq that no handler sees counts as handled: its ack goes out by itself,
    even when nothing else is written and no heartbeat comes (the threading client's
    housekeeper must be woken for it)."""
    broker = FakeBroker(version=2, heartbeat_interval=60.0)
    with session(kind, broker) as h:
        peer = broker.wait_v2(1)
        wait_for(lambda: h.client.protocol_version == 2, what="v2 session")
        broker.send({"request_id": "x1", "action": "not_a_known_action", "params": {}, "seq": 1})
        assert peer.wait_ack(1)[-1] == 1


def test_sync_connect_during_disconnect_is_refused_and_nothing_reconnects(broker: FakeBroker) -> None:
    """connect() from another thread while disconnect() drains handlers neither spins the
    reader on the closing link nor reconnects after disconnect() returned."""
    with session("sync", broker) as h:
        gate = h.gate("slow")
        broker.message("A", "slow")
        assert h.started["slow"].wait(DEADLINE)
        reader = h.client._manager  # the thread that would reconnect
        assert reader is not None
        closer = threading.Thread(target=h.client.disconnect, args=(DEADLINE,))
        closer.start()
        wait_for(lambda: not h.client.connected, what="disconnect under way")
        assert h.client.connect() is False
        gate.set()
        closer.join(DEADLINE)
        assert not closer.is_alive()
        reader.join(DEADLINE)  # it ended: nothing is left that could reconnect
        assert not reader.is_alive()
        assert broker.connection_count == 1 and not h.client.connected and h.client._manager is None
