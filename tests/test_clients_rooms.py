"""The rooms/users/presence API of each client flavour, end to end over a real socket.

The broker here is a fake: a real TCP listener in the test that answers the hello with the
``rooms`` feature and its limits, records every line the backend writes, and answers
``room_members`` / ``room_count`` queries. Each test has a handler block (threading) or
await (asyncio, app) on a query while the client must go on reading to get the reply.
Every wait has a deadline; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from pystrands import (
    AsyncPyStrandsClient,
    BrokerUnavailable,
    Context,
    PyStrands,
    PyStrandsClient,
    UnsupportedFeature,
)

DEADLINE = 5.0
MEMBERS = [
    {"client_id": "a", "room_id": "lobby", "metadata": {}, "user_id": "ann"},
    {"client_id": "b", "room_id": "lobby", "metadata": {"k": 1}},
]


class RoomsBroker:
    """A fake broker for one backend connection at a time (see the module docstring)."""

    def __init__(self, features: tuple[str, ...] = ("ack", "heartbeat", "rooms")) -> None:
        self.features = features
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.hello = threading.Event()
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        self._sock = sock
        buf = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    if raw.strip():
                        self._frame(json.loads(raw))
        except OSError:
            return

    def _frame(self, frame: dict[str, Any]) -> None:
        action = frame["action"]
        if action == "hello":
            params = {
                "ok": True,
                "version": 2,
                "features": list(self.features),
                "heartbeat_interval": 15.0,
                "limits": {"max_rooms_per_client": 100, "max_id_length": 64},
            }
            self.send({"request_id": "hello", "action": "hello", "params": params})
            self.hello.set()
            return
        if action in ("ack", "heartbeat"):
            return
        self.inbox.put(frame)
        rid = frame["request_id"]
        if action == "room_members":
            self.send({"request_id": rid, "action": "reply", "params": {"members": MEMBERS, "complete": True}})
        elif action == "room_count":
            self.send({"request_id": rid, "action": "reply", "params": {"count": len(MEMBERS)}})
        elif action == "join_room" and frame["params"]["room_id"] == "full":
            error = "join_room: client 'a' is already in 100 rooms (max_rooms_per_client=100)"
            self.send({"request_id": rid, "action": "command_error", "params": {"command": "join_room", "error": error}})

    def send(self, frame: dict[str, Any]) -> None:
        assert self._sock is not None
        with self._send_lock:
            self._sock.sendall(json.dumps(frame).encode() + b"\n")

    def message(self, text: str, seq: int = 1) -> None:
        """A client's message, from a connection of the user ``ann``."""
        assert self.hello.wait(DEADLINE), "no hello from the backend"
        context = {"client_id": "a", "room_id": "lobby", "metadata": {}, "user_id": "ann"}
        self.send({"seq": seq, "request_id": f"e{seq}", "action": "new_message", "params": {"message": text, "context": context}})

    def recv(self) -> dict[str, Any]:
        try:
            return self.inbox.get(timeout=DEADLINE)
        except queue.Empty:
            raise AssertionError(f"no frame from the backend within {DEADLINE}s") from None

    def close(self) -> None:
        self._listener.close()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()


@pytest.fixture
def rooms_broker() -> Any:
    b = RoomsBroker()
    try:
        yield b
    finally:
        b.close()


def check_wire(broker: RoomsBroker) -> None:
    """What every handler below wrote, in order: join, exclude-send, user message, disconnect,
    then the two queries (each answered)."""
    join = broker.recv()
    assert (join["action"], join["params"]) == ("join_room", {"client_id": "a", "room_id": "r2"})
    send = broker.recv()
    assert (send["action"], send["params"]) == ("message_to_room", {"room_id": "r2", "message": "hi", "exclude": ["a"]})
    user = broker.recv()
    assert (user["action"], user["params"]) == ("message_to_user", {"user_id": "ann", "message": "psst"})
    kick = broker.recv()
    assert (kick["action"], kick["params"]) == ("disconnect", {"client_id": "b", "code": 4003, "reason": "spam"})
    members = broker.recv()
    assert members["action"] == "room_members" and members["params"]["room_id"] == "r2"
    count = broker.recv()
    assert count["action"] == "room_count" and count["request_id"] != members["request_id"]


def check_results(results: dict[str, Any]) -> None:
    assert results.get("error") is None, results["error"]
    assert results["user_id"] == "ann"
    members = results["members"]
    assert all(isinstance(m, Context) for m in members)
    assert [m.to_json() for m in members] == MEMBERS
    assert results["count"] == 2


# ------------------------------------------------------------------------- threading


def test_threading_client_blocks_on_a_query_while_its_reader_reads_the_reply(rooms_broker: RoomsBroker) -> None:
    results: dict[str, Any] = {}
    handled = threading.Event()

    class Backend(PyStrandsClient):
        def on_message(self, message: str, context: Context) -> None:
            try:
                results["user_id"] = context.user_id
                self.join_room(context.client_id, "r2")
                self.send_room_message("r2", "hi", exclude=context.client_id)
                self.send_user_message("ann", "psst")
                self.disconnect_client("b", 4003, "spam")
                results["members"] = self.room_members("r2", timeout=DEADLINE)  # blocks this worker
                results["count"] = self.room_count("r2", timeout=DEADLINE)
            except Exception as exc:  # reported by the test thread
                results["error"] = exc
            finally:
                handled.set()

    # max_pending=1: reading pauses as soon as one event is being handled, except while a
    # query waits for its reply
    client = Backend(port=rooms_broker.port, auto_reconnect=False, max_pending=1)
    assert client.connect()
    try:
        rooms_broker.message("hello")
        assert handled.wait(DEADLINE), "the handler did not finish: was the reply read?"
        check_results(results)
        check_wire(rooms_broker)
        assert client.broker_features == frozenset({"ack", "heartbeat", "rooms"})
        assert client.broker_limits == {"max_rooms_per_client": 100, "max_id_length": 64}
        with pytest.raises(ValueError, match="max_id_length is 64"):
            client.join_room("x", "r" * 65)
    finally:
        client.disconnect()
    with pytest.raises(BrokerUnavailable, match="not connected"):
        client.room_count("r2")
    client.join_room("a", "later")  # kept for a later connection, never raises
    assert client.buffered_sends == 1


def test_threading_client_refuses_a_query_on_its_reader_thread(rooms_broker: RoomsBroker) -> None:
    client = PyStrandsClient(port=rooms_broker.port, auto_reconnect=False)
    assert client.connect()
    try:
        reader = client._manager
        assert reader is not None and reader is not threading.current_thread()
        client._manager = threading.current_thread()  # as if called from the reader thread
        try:
            with pytest.raises(RuntimeError, match="reader thread"):
                client.room_members("lobby")
        finally:
            client._manager = reader
    finally:
        client.disconnect()


def test_threading_client_logs_command_errors(rooms_broker: RoomsBroker, caplog: pytest.LogCaptureFixture) -> None:
    client = PyStrandsClient(port=rooms_broker.port, auto_reconnect=False)
    assert client.connect()
    try:
        assert rooms_broker.hello.wait(DEADLINE)
        with caplog.at_level(logging.WARNING, logger="pystrands.client"):
            client.join_room("a", "full")
            assert rooms_broker.recv()["action"] == "join_room"
            # the warning is logged by the reader; a query answered after it proves it was read
            assert client.room_count("r", timeout=DEADLINE) == 2
        (record,) = [r for r in caplog.records if r.name == "pystrands.client" and r.levelno == logging.WARNING]
        assert "already in 100 rooms (max_rooms_per_client=100)" in record.getMessage()
    finally:
        client.disconnect()


def test_threading_client_on_a_broker_without_rooms() -> None:
    broker = RoomsBroker(features=("ack", "heartbeat"))
    client = PyStrandsClient(port=broker.port, auto_reconnect=False)
    try:
        assert client.connect()
        assert broker.hello.wait(DEADLINE)
        # the answer is read by the reader thread: a query made before may still wait for it
        with pytest.raises(UnsupportedFeature, match=r"a 1\.0 broker\?"):
            client.room_members("lobby", timeout=DEADLINE)
        with pytest.raises(UnsupportedFeature):
            client.join_room("a", "r")
    finally:
        client.disconnect()
        broker.close()


# --------------------------------------------------------------------------- asyncio


def test_async_client_awaits_a_query_while_it_reads_the_reply(rooms_broker: RoomsBroker) -> None:
    results: dict[str, Any] = {}

    async def main() -> None:
        handled = asyncio.Event()

        class Backend(AsyncPyStrandsClient):
            async def on_message(self, message: str, context: Context) -> None:
                try:
                    results["user_id"] = context.user_id
                    await self.join_room(context.client_id, "r2")
                    await self.send_room_message("r2", "hi", exclude=[context.client_id])
                    await self.send_user_message("ann", "psst")
                    await self.disconnect_client("b", 4003, "spam")
                    results["members"] = await self.room_members("r2", timeout=DEADLINE)
                    results["count"] = await self.room_count("r2", timeout=DEADLINE)
                except Exception as exc:
                    results["error"] = exc
                finally:
                    handled.set()

        client = Backend(port=rooms_broker.port, auto_reconnect=False, max_pending=1)  # as above
        assert await client.connect()
        try:
            await asyncio.to_thread(rooms_broker.message, "hello")
            await asyncio.wait_for(handled.wait(), DEADLINE)
        finally:
            await client.disconnect()
        with pytest.raises(BrokerUnavailable):
            await client.room_members("r2")

    asyncio.run(asyncio.wait_for(main(), 3 * DEADLINE))
    check_results(results)
    check_wire(rooms_broker)


# -------------------------------------------------------------------------------- app


@contextmanager
def app_handling_one_message(app: PyStrands, rooms_broker: RoomsBroker, handled: threading.Event) -> Iterator[None]:
    """Runs `app` in a thread, has the fake broker send it one message, waits until its handler
    finished, and stops the app after the block."""
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    try:
        rooms_broker.message("hello")
        assert handled.wait(DEADLINE), "the handler did not finish"
        yield
    finally:
        app.stop()
        thread.join(DEADLINE)
    assert not thread.is_alive()


def test_app_sync_handler_queries_with_result(rooms_broker: RoomsBroker) -> None:
    results: dict[str, Any] = {}
    handled = threading.Event()
    app = PyStrands(port=rooms_broker.port, auto_reconnect=False, max_pending=1)

    @app.on_message
    def on_message(message: str, context: Context) -> None:  # runs in the app's thread pool
        try:
            results["user_id"] = context.user_id
            app.join_room(context.client_id, "r2")
            app.send_room_message("r2", "hi", exclude=context.client_id)
            app.send_user_message("ann", "psst")
            app.disconnect_client("b", 4003, "spam")
            results["members"] = app.room_members("r2", timeout=DEADLINE).result()
            results["count"] = app.room_count("r2", timeout=DEADLINE).result()
            try:
                app.join_room("", "r2")
            except ValueError as exc:  # errors reach the handler's thread
                results["empty"] = str(exc)
        except Exception as exc:
            results["error"] = exc
        finally:
            handled.set()

    with app_handling_one_message(app, rooms_broker, handled):
        check_results(results)
        assert results["empty"] == "client_id must not be empty"
        check_wire(rooms_broker)
    with pytest.raises(BrokerUnavailable, match="not running"):
        app.room_count("r2")


def test_app_async_handler_awaits_queries(rooms_broker: RoomsBroker) -> None:
    results: dict[str, Any] = {}
    handled = threading.Event()
    app = PyStrands(port=rooms_broker.port, auto_reconnect=False)

    @app.on_message
    async def on_message(message: str, context: Context) -> None:
        try:
            results["user_id"] = context.user_id
            await app.join_room(context.client_id, "r2")
            await app.send_room_message("r2", "hi", exclude=[context.client_id])
            app.send_user_message("ann", "psst")  # awaiting is optional
            app.disconnect_client("b", 4003, "spam")
            results["members"] = await app.room_members("r2", timeout=DEADLINE)
            query = app.room_count("r2", timeout=DEADLINE)
            try:
                query.result()  # on the loop: must be awaited
            except RuntimeError as exc:
                results["blocking"] = str(exc)
            results["count"] = await query
        except Exception as exc:
            results["error"] = exc
        finally:
            handled.set()

    with app_handling_one_message(app, rooms_broker, handled):
        check_results(results)
        assert "await it" in results["blocking"]
        check_wire(rooms_broker)
