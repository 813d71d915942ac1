"""Unit tests of the PyStrands decorator app against the local fake broker (tests/fake_broker.py)."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from fake_broker import DEADLINE, FakeBroker, ctx, wait_for
from pystrands import ConnectionRequestContext, Context, PyStrands
from pystrands.app import SendResult

FAST = {"reconnect_delay": 0.05, "max_reconnect_delay": 0.2}


class AppRunner:
    """Runs ``app.run()`` in a thread; stops it with ``app.stop()``."""

    def __init__(self, app: PyStrands, broker: FakeBroker) -> None:
        self.app = app
        n = broker.connection_count
        self.thread = threading.Thread(target=app.run, daemon=True)
        self.thread.start()
        broker.wait_connections(n + 1)
        wait_for(lambda: app.connected, what="app connected")

    def stop(self) -> None:
        self.app.stop()
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive(), "app.run() did not return after stop()"


def test_app_constructor_defaults() -> None:
    app = PyStrands()
    assert app.client is None  # the running client; the app is not running
    c = app._create_client()
    assert (app.host, app.port, app.connected) == ("localhost", 8081, False)
    assert (c.auto_reconnect, c.reconnect_delay, c.max_reconnect_delay, c.reconnect_backoff) == (True, 1.0, 30.0, 2.0)
    app2 = PyStrands("h", 9, False, 0.5, 4.0, 3.0, run_sync_in_thread=False, max_threads=2)
    c2 = app2._create_client()
    assert (app2.host, app2.port, c2.auto_reconnect, c2.reconnect_delay, c2.max_reconnect_delay, c2.reconnect_backoff) == (
        "h", 9, False, 0.5, 4.0, 3.0,
    )
    assert app2.run_sync_in_thread is False and app2.max_threads == 2


def test_app_decorators_return_the_function() -> None:
    app = PyStrands()

    def f(message: str, context: Context) -> None: ...

    async def g(context: Context) -> None: ...

    assert app.on_message(f) is f
    assert app.on_disconnect()(g) is g
    with pytest.raises(TypeError):
        app.on_error(42)  # type: ignore[call-overload]


def test_app_send_when_not_running_does_not_raise() -> None:
    app = PyStrands("127.0.0.1", 1)
    r1 = app.send_room_message("r", "m")
    r2 = app.send_private_message("c", "m")
    r3 = app.broadcast("m")
    assert all(isinstance(r, SendResult) and r.done() for r in (r1, r2, r3))
    assert app.client is None  # sends of an app that does not run do nothing (as upstream)

    async def body() -> None:
        await app.send_room_message("r", "m")  # awaitable too

    asyncio.run(body())


def test_app_sync_and_async_handlers(broker: FakeBroker) -> None:
    app = PyStrands("127.0.0.1", broker.port, **FAST)
    errors: list[tuple[str, str]] = []
    threads: dict[str, int] = {}
    left = threading.Event()

    @app.on_connection_request
    def auth(request: ConnectionRequestContext) -> bool:
        threads["auth"] = threading.get_ident()
        if request.headers.get("x-token", [None])[0] != "secret":
            return False
        request.context.room_id = request.url.strip("/") or "lobby"
        request.context.metadata = {"user": "alice"}
        return True

    @app.on_new_connection
    def joined(context: Context) -> None:
        app.send_private_message(context.client_id, "welcome")  # sync: no await

    @app.on_message
    async def echo(message: str, context: Context) -> None:
        if message == "boom":
            raise ValueError("exploded")
        await app.send_room_message(context.room_id, f"echo: {message}")
        await app.broadcast(f"all: {message}")

    @app.on_disconnect
    async def gone(context: Context) -> None:
        await app.send_room_message(context.room_id, f"{context.client_id} left")
        left.set()

    @app.on_error()
    def err(error: str, context: Context) -> None:
        errors.append((error, context.client_id))

    runner = AppRunner(app, broker)
    try:
        rid = broker.connection_request(url="/chat", headers={"X-Token": ["secret"]})
        resp = broker.recv()
        assert resp["request_id"] == rid
        assert resp["params"]["accepted"] is True and resp["params"]["room_id"] == "chat"
        assert resp["params"]["metadata"] == {"user": "alice"}
        assert threads["auth"] != runner.thread.ident, "sync handlers run in the thread pool"

        rid2 = broker.connection_request(url="/chat", headers={})
        resp2 = broker.recv()
        assert resp2["request_id"] == rid2 and resp2["action"] == "response"
        assert resp2["params"]["accepted"] is False
        assert resp2["params"]["room_id"] == "/chat" and resp2["params"]["metadata"] == {}

        broker.send_event("new_connection", {"context": ctx("c1", "chat")})
        assert broker.recv()["params"] == {"conn_id": "c1", "message": "welcome"}
        broker.message("c1", "boom", "chat")
        broker.message("c1", "hi", "chat")
        f1, f2 = broker.recv_n(2)
        assert (f1["action"], f1["params"]) == ("message_to_room", {"room_id": "chat", "message": "echo: hi"})
        assert (f2["action"], f2["params"]) == ("broadcast", {"message": "all: hi"})
        assert errors == [("exploded", "c1")]
        broker.send_event("error", {"error": "slow client", "context": ctx("c1", "chat")})
        wait_for(lambda: len(errors) == 2, what="broker error reported")
        assert errors[1] == ("slow client", "c1")
        broker.send_event("disconnected", {"context": ctx("c1", "chat")})
        assert broker.recv()["params"] == {"room_id": "chat", "message": "c1 left"}
        assert left.wait(DEADLINE)
    finally:
        runner.stop()


def test_app_rejection_frame(broker: FakeBroker) -> None:
    app = PyStrands("127.0.0.1", broker.port, **FAST)

    @app.on_connection_request
    async def auth(request: ConnectionRequestContext) -> None:
        request.accepted = False

    runner = AppRunner(app, broker)
    try:
        rid = broker.connection_request(url="/x")
        resp = broker.recv()
        assert resp["request_id"] == rid and resp["params"]["accepted"] is False
    finally:
        runner.stop()


def test_app_without_handlers_accepts_with_defaults(broker: FakeBroker, caplog: pytest.LogCaptureFixture) -> None:
    app = PyStrands("127.0.0.1", broker.port, **FAST)
    runner = AppRunner(app, broker)
    try:
        rid = broker.connection_request(url="/room1")
        resp = broker.recv()
        assert resp["request_id"] == rid
        assert resp["params"]["accepted"] is True and resp["params"]["room_id"] == "/room1"
        assert resp["params"]["metadata"] == {} and len(resp["params"]["client_id"]) == 36
        with caplog.at_level(logging.ERROR, logger="pystrands.app"):
            broker.send_event("error", {"error": "unhandled", "context": ctx("c1")})
            broker.message("c1", "ignored")
            wait_for(lambda: "unhandled" in caplog.text, what="default on_error log")
    finally:
        runner.stop()


def test_app_connection_request_exception_rejects(broker: FakeBroker) -> None:
    app = PyStrands("127.0.0.1", broker.port, **FAST)
    errors: list[str] = []

    @app.on_connection_request
    def auth(request: ConnectionRequestContext) -> bool:
        raise RuntimeError("no db")

    @app.on_error
    async def err(error: str, context: Context) -> None:
        errors.append(error)

    runner = AppRunner(app, broker)
    try:
        rid = broker.connection_request()
        assert broker.recv() == {"request_id": rid, "action": "response", "params": {"accepted": False}}
        wait_for(lambda: errors == ["no db"], what="on_error")
    finally:
        runner.stop()


def test_app_sync_handlers_keep_order_and_isolate_slow_client(broker: FakeBroker) -> None:
    app = PyStrands("127.0.0.1", broker.port, **FAST)
    gate, started = threading.Event(), threading.Event()

    @app.on_message
    def handle(message: str, context: Context) -> None:
        if message == "slow":
            started.set()
            assert gate.wait(DEADLINE)
        app.send_private_message(context.client_id, f"{context.client_id}:{message}")

    runner = AppRunner(app, broker)
    try:
        broker.message("A", "slow")
        for i in range(10):
            broker.message("A", f"a{i}")
        assert started.wait(DEADLINE)
        for i in range(10):
            broker.message("B", f"b{i}")
        b = broker.recv_n(10)
        assert [f["params"]["message"] for f in b] == [f"B:b{i}" for i in range(10)]
        gate.set()
        a = broker.recv_n(11)
        assert [f["params"]["message"] for f in a] == ["A:slow"] + [f"A:a{i}" for i in range(10)]
    finally:
        gate.set()
        runner.stop()


def test_app_inline_sync_handlers_run_on_loop(broker: FakeBroker) -> None:
    app = PyStrands("127.0.0.1", broker.port, run_sync_in_thread=False, **FAST)
    seen: list[int] = []

    @app.on_message
    def handle(message: str, context: Context) -> None:
        seen.append(threading.get_ident())
        app.send_private_message(context.client_id, message)

    runner = AppRunner(app, broker)
    try:
        broker.message("c1", "x")
        assert broker.recv()["params"]["message"] == "x"
        assert seen == [runner.thread.ident]
    finally:
        runner.stop()


def test_app_run_async_and_disconnect(broker: FakeBroker) -> None:
    app = PyStrands("127.0.0.1", broker.port, **FAST)

    @app.on_message
    async def echo(message: str, context: Context) -> None:
        await app.send_private_message(context.client_id, message.upper())

    async def body() -> None:
        task = asyncio.create_task(app.run_async())
        await asyncio.to_thread(broker.wait_connections, 1)
        await asyncio.to_thread(wait_for, lambda: app.connected)
        broker.message("c1", "hey")
        frame = await asyncio.to_thread(broker.recv)
        assert frame["params"] == {"conn_id": "c1", "message": "HEY"}
        await app.disconnect()
        await asyncio.wait_for(task, DEADLINE)
        assert not app.connected

    asyncio.run(asyncio.wait_for(body(), 20))


def test_app_reconnects(broker: FakeBroker) -> None:
    app = PyStrands("127.0.0.1", broker.port, **FAST)

    @app.on_message
    def echo(message: str, context: Context) -> None:
        app.send_private_message(context.client_id, message)

    runner = AppRunner(app, broker)
    try:
        broker.drop_connections()
        broker.wait_connections(2)
        wait_for(lambda: app.connected, what="reconnected")
        broker.message("c1", "again")
        assert broker.recv()["params"]["message"] == "again"
    finally:
        runner.stop()


def test_app_stop_from_handler(broker: FakeBroker) -> None:
    app = PyStrands("127.0.0.1", broker.port, **FAST)

    @app.on_message
    def quit_(message: str, context: Context) -> None:
        app.send_private_message(context.client_id, "bye")
        app.stop()

    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    broker.wait_connections(1)
    broker.message("c1", "quit")
    assert broker.recv()["params"]["message"] == "bye"
    thread.join(DEADLINE)
    assert not thread.is_alive()


def test_send_result_is_awaitable_and_reusable() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        pending = SendResult(fut)
        assert not pending.done()
        loop.call_soon(fut.set_result, None)
        await pending
        assert pending.done()
        await SendResult()
        await SendResult()
        assert "done" in repr(SendResult())

    asyncio.run(body())


# --------------------------------------------------------------------------- protocol v2


@pytest.fixture(autouse=True)
def _no_secret_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYSTRANDS_BACKEND_SECRET", raising=False)


def test_app_passes_backend_secret_and_exposes_event_ids(caplog: pytest.LogCaptureFixture) -> None:
    broker = FakeBroker(version=2, secret="app-s3cret")
    app = PyStrands("127.0.0.1", broker.port, backend_secret="app-s3cret", **FAST)
    seen: list[tuple[str, str | None, bool, dict[str, object]]] = []

    @app.on_message
    def echo(message: str, context: Context) -> None:
        seen.append((message, context.event_id, context.redelivered, context.to_json()))
        app.send_private_message(context.client_id, message)

    with caplog.at_level(logging.DEBUG, logger="pystrands"):
        runner = AppRunner(app, broker)
        try:
            peer = broker.wait_v2(1)
            assert peer.wait_hello()["params"]["secret"] == "app-s3cret"
            wait_for(lambda: app.client.protocol_version == 2, what="v2 session")
            broker.message("c1", "hi", request_id="ev-1")
            broker.message("c1", "hi again", request_id="ev-1", redelivered=True)
            assert [f["params"]["message"] for f in broker.recv_n(2)] == ["hi", "hi again"]
            assert seen == [
                ("hi", "ev-1", False, {"client_id": "c1", "room_id": "room", "metadata": {}}),
                ("hi again", "ev-1", True, {"client_id": "c1", "room_id": "room", "metadata": {}}),
            ]
            assert peer.wait_ack(2)[-1] == 2
        finally:
            runner.stop()
            broker.close()
    assert "app-s3cret" not in caplog.text


def test_app_reads_backend_secret_from_env(broker: FakeBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYSTRANDS_BACKEND_SECRET", "env-s3cret")
    runner = AppRunner(PyStrands("127.0.0.1", broker.port, **FAST), broker)
    try:
        assert broker.peers[0].wait_hello()["params"]["secret"] == "env-s3cret"
        assert runner.app.client.protocol_version == 1  # the v1 fake never answers
    finally:
        runner.stop()
