"""The history API (``room_config``, ``room_history``) of each client flavour, end to end over a
real socket.

Two brokers:

* **the fake** of tests/test_clients_rooms.py (a TCP listener in the test), announcing
  ``history`` too and answering ``room_history`` from a canned history of 3,000 messages (a
  reply of about 300 KB, more than one read, so with the native codec the switch to the
  reference codec and back happens over real chunking). A handler of each flavour
  (threading, asyncio, app with a sync and with an async handler) calls the API while the
  client must go on reading to get the reply.
* **the real broker** (``pystrands.testing.running_broker``), for the tests marked
  ``NEEDS_HISTORY_BROKER`` below: they need a native extension built with the broker side of
  ``history``, and skip themselves (saying so) when the broker they start does not announce it.

Every wait has a deadline; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import websockets

from fake_broker import wait_for
from pystrands import (
    AsyncPyStrandsClient,
    BrokerUnavailable,
    Context,
    HistoryMessage,
    PyStrands,
    PyStrandsClient,
    RoomHistory,
    UnsupportedFeature,
)
from pystrands.testing import running_broker, ws_url
from test_clients_rooms import DEADLINE, RoomsBroker, app_handling_one_message

FEATURES = ("ack", "heartbeat", "rooms", "history")
EPOCH = "9c1f0e2ab3d4"
HISTORY = [{"offset": o, "data": f"message {o:04d}: " + "é" * (o % 7) + "x" * 70} for o in range(1, 3001)]
REFUSED_SIZE = 99_999  # the fake refuses this history_size with a command_error


class HistoryBroker(RoomsBroker):
    """The rooms fake, plus ``history``: ``room_history`` answered from :data:`HISTORY`,
    ``room_config`` recorded (and refused for :data:`REFUSED_SIZE`)."""

    def __init__(self, features: tuple[str, ...] = FEATURES) -> None:
        super().__init__(features)

    def _frame(self, frame: dict[str, Any]) -> None:
        super()._frame(frame)  # records it (and answers the hello and the rooms queries)
        action, params, rid = frame["action"], frame.get("params", {}), frame.get("request_id")
        if action == "room_history":
            since, limit = params["since"], params.get("limit")
            newer = [m for m in HISTORY if m["offset"] > since]
            kept = newer[-limit:] if limit is not None else newer
            answer = {"epoch": EPOCH, "offset": len(HISTORY), "messages": kept, "complete": kept == newer}
            self.send({"request_id": rid, "action": "reply", "params": answer})
        elif action == "room_config" and params.get("history_size") == REFUSED_SIZE:
            error = f"room_config: history_size must be between 0 and 100000, got {REFUSED_SIZE}"
            self.send({"request_id": rid, "action": "command_error", "params": {"command": "room_config", "error": error}})


@pytest.fixture
def history_broker() -> Iterator[HistoryBroker]:
    b = HistoryBroker()
    try:
        yield b
    finally:
        b.close()


def expected(since: int = 0, limit: int | None = None) -> RoomHistory:
    newer = [HistoryMessage(m["offset"], m["data"]) for m in HISTORY if m["offset"] > since]
    kept = newer[-limit:] if limit is not None else newer
    return RoomHistory(EPOCH, len(HISTORY), kept, kept == newer)


def check_results(results: dict[str, Any]) -> None:
    assert results.get("error") is None, results["error"]
    whole = results["whole"]
    assert type(whole) is RoomHistory and whole == expected() and whole.complete is True
    assert len(whole.messages) == 3000 and whole.messages[-1] == HistoryMessage(3000, HISTORY[-1]["data"])
    tail = results["tail"]
    assert tail == expected(10, 5) and [m.offset for m in tail.messages] == [2996, 2997, 2998, 2999, 3000]
    assert tail.complete is False  # the limit left messages out
    assert results["no_settings"] == "room_config needs at least one of history_size, history_ttl, presence"


def check_wire(broker: HistoryBroker) -> None:
    """What every handler below wrote, in order."""
    config = broker.recv()
    assert (config["action"], config["params"]) == (
        "room_config",
        {"room_id": "lobby", "history_size": 500, "history_ttl": 60.5, "presence": True},
    )
    whole = broker.recv()
    assert (whole["action"], whole["params"]) == ("room_history", {"room_id": "lobby", "since": 0})
    tail = broker.recv()
    assert (tail["action"], tail["params"]) == ("room_history", {"room_id": "lobby", "since": 10, "limit": 5})
    assert tail["request_id"] != whole["request_id"]


# ------------------------------------------------------------------------- threading


def test_threading_client_configures_a_room_and_reads_its_history(history_broker: HistoryBroker) -> None:
    results: dict[str, Any] = {}
    handled = threading.Event()

    class Backend(PyStrandsClient):
        def on_message(self, message: str, context: Context) -> None:
            try:
                self.room_config("lobby", history_size=500, history_ttl=60.5, presence=True)
                results["whole"] = self.room_history("lobby", timeout=DEADLINE)  # blocks this worker
                results["tail"] = self.room_history("lobby", since=10, limit=5, timeout=DEADLINE)
                try:
                    self.room_config("lobby")
                except ValueError as exc:
                    results["no_settings"] = str(exc)
            except Exception as exc:  # reported by the test thread
                results["error"] = exc
            finally:
                handled.set()

    # max_pending=1: reading pauses while one event is handled, except while a query waits
    client = Backend(port=history_broker.port, auto_reconnect=False, max_pending=1)
    assert client.connect()
    try:
        history_broker.message("hello")
        assert handled.wait(DEADLINE), "the handler did not finish: was the reply read?"
        check_results(results)
        check_wire(history_broker)
        assert "history" in client.broker_features
        with pytest.raises(ValueError, match="limit=0: must be between 1 and 100000"):
            client.room_history("lobby", limit=0)
        with pytest.raises(TypeError, match="history_size must be an int, not float"):
            client.room_config("lobby", history_size=1.5)  # type: ignore[arg-type]
    finally:
        client.disconnect()
    with pytest.raises(BrokerUnavailable, match="not connected"):
        client.room_history("lobby")
    client.room_config("lobby", presence=False)  # kept for a later connection, never raises
    assert client.buffered_sends == 1


def test_threading_client_logs_a_refused_room_config(history_broker: HistoryBroker, caplog: pytest.LogCaptureFixture) -> None:
    client = PyStrandsClient(port=history_broker.port, auto_reconnect=False)
    assert client.connect()
    try:
        assert history_broker.hello.wait(DEADLINE)
        with caplog.at_level(logging.WARNING, logger="pystrands.client"):
            client.room_config("lobby", history_size=REFUSED_SIZE)
            assert history_broker.recv()["action"] == "room_config"
            # the warning is logged by the reader; a query answered after it proves it was read
            assert client.room_history("lobby", since=2999, timeout=DEADLINE) == expected(2999)
        (record,) = [r for r in caplog.records if r.name == "pystrands.client" and r.levelno == logging.WARNING]
        assert "The broker refused room_config" in record.getMessage() and "got 99999" in record.getMessage()
    finally:
        client.disconnect()


def test_threading_client_on_a_broker_without_history() -> None:
    broker = HistoryBroker(features=("ack", "heartbeat", "rooms"))
    client = PyStrandsClient(port=broker.port, auto_reconnect=False)
    try:
        assert client.connect()
        assert broker.hello.wait(DEADLINE)
        # the answer is read by the reader thread: a query made before it waits for it
        with pytest.raises(UnsupportedFeature, match="'history' feature.*does not keep room history"):
            client.room_history("lobby", timeout=DEADLINE)
        with pytest.raises(UnsupportedFeature, match="'history' feature"):
            client.room_config("lobby", history_size=10)
        assert client.room_count("lobby", timeout=DEADLINE) == 2  # rooms still work
    finally:
        client.disconnect()
        broker.close()


# --------------------------------------------------------------------------- asyncio


def test_async_client_configures_a_room_and_awaits_its_history(history_broker: HistoryBroker) -> None:
    results: dict[str, Any] = {}

    async def main() -> None:
        handled = asyncio.Event()

        class Backend(AsyncPyStrandsClient):
            async def on_message(self, message: str, context: Context) -> None:
                try:
                    await self.room_config("lobby", history_size=500, history_ttl=60.5, presence=True)
                    results["whole"] = await self.room_history("lobby", timeout=DEADLINE)
                    results["tail"] = await self.room_history("lobby", since=10, limit=5, timeout=DEADLINE)
                    try:
                        await self.room_config("lobby")
                    except ValueError as exc:
                        results["no_settings"] = str(exc)
                except Exception as exc:
                    results["error"] = exc
                finally:
                    handled.set()

        client = Backend(port=history_broker.port, auto_reconnect=False, max_pending=1)
        assert await client.connect()
        try:
            await asyncio.to_thread(history_broker.message, "hello")
            await asyncio.wait_for(handled.wait(), DEADLINE)
        finally:
            await client.disconnect()
        with pytest.raises(BrokerUnavailable):
            await client.room_history("lobby")

    asyncio.run(asyncio.wait_for(main(), 3 * DEADLINE))
    check_results(results)
    check_wire(history_broker)


def test_async_client_on_a_broker_without_history() -> None:
    broker = HistoryBroker(features=("ack", "heartbeat", "rooms"))

    async def main() -> None:
        client = AsyncPyStrandsClient(port=broker.port, auto_reconnect=False)
        assert await client.connect()
        try:
            with pytest.raises(UnsupportedFeature, match="'history' feature"):
                await client.room_history("lobby", timeout=DEADLINE)
            with pytest.raises(UnsupportedFeature, match="'history' feature"):
                await client.room_config("lobby", presence=True)
        finally:
            await client.disconnect()

    try:
        asyncio.run(asyncio.wait_for(main(), 3 * DEADLINE))
    finally:
        broker.close()


# -------------------------------------------------------------------------------- app


def test_app_sync_handler_reads_history_with_result(history_broker: HistoryBroker) -> None:
    results: dict[str, Any] = {}
    handled = threading.Event()
    app = PyStrands(port=history_broker.port, auto_reconnect=False, max_pending=1)

    @app.on_message
    def on_message(message: str, context: Context) -> None:  # runs in the app's thread pool
        try:
            app.room_config("lobby", history_size=500, history_ttl=60.5, presence=True)
            results["whole"] = app.room_history("lobby", timeout=DEADLINE).result()
            results["tail"] = app.room_history("lobby", since=10, limit=5, timeout=DEADLINE).result()
            try:
                app.room_config("lobby")
            except ValueError as exc:  # errors reach the handler's thread
                results["no_settings"] = str(exc)
            try:
                app.room_history("lobby", since=-1).result()
            except ValueError as exc:
                results["bad_since"] = str(exc)
        except Exception as exc:
            results["error"] = exc
        finally:
            handled.set()

    with app_handling_one_message(app, history_broker, handled):
        check_results(results)
        assert results["bad_since"].startswith("since=-1: must be between 0 and")
        check_wire(history_broker)
    with pytest.raises(BrokerUnavailable, match="not running"):
        app.room_history("lobby")
    assert app.room_config("lobby", presence=True).done()  # does nothing while the app does not run


def test_app_async_handler_awaits_history(history_broker: HistoryBroker) -> None:
    results: dict[str, Any] = {}
    handled = threading.Event()
    app = PyStrands(port=history_broker.port, auto_reconnect=False)

    @app.on_message
    async def on_message(message: str, context: Context) -> None:
        try:
            await app.room_config("lobby", history_size=500, history_ttl=60.5, presence=True)
            results["whole"] = await app.room_history("lobby", timeout=DEADLINE)
            query = app.room_history("lobby", since=10, limit=5, timeout=DEADLINE)
            try:
                query.result()  # on the loop: must be awaited
            except RuntimeError as exc:
                results["blocking"] = str(exc)
            results["tail"] = await query
            try:
                app.room_config("lobby")
            except ValueError as exc:
                results["no_settings"] = str(exc)
        except Exception as exc:
            results["error"] = exc
        finally:
            handled.set()

    with app_handling_one_message(app, history_broker, handled):
        check_results(results)
        assert "await it" in results["blocking"]
        check_wire(history_broker)


# ----------------------------------------------------------- the real broker (new build)

NEEDS_HISTORY_BROKER = "needs a native extension whose broker has the `history` feature (rust/core history.rs)"
FLAVOURS = ["thread", "async", "app"]
BIG = 4000  # messages of the big room: a reply of ~400 KB


def skip_without_history(features: frozenset[str]) -> None:
    if "history" not in features:
        pytest.skip(f"{NEEDS_HISTORY_BROKER}; this broker announces {sorted(features)}")


def real_broker_calls(api: Any, wait: Any) -> dict[str, Any]:
    """The scenario of test_browser_protocol.py's backend test, through our API: ``wait`` turns
    what a call returned into its value (identity, ``asyncio`` awaiting, ``.result()``)."""
    out: dict[str, Any] = {}
    wait(api.room_config("h", history_size=3, history_ttl=60))
    for text in "abcd":
        wait(api.send_room_message("h", text))
    wait(api.send_room_message("plain", "not kept"))
    wait(api.room_config("big", history_size=BIG))
    for n in range(BIG):
        wait(api.send_room_message("big", f"{n:05d} " + "y" * 90))
    out["h"] = wait(api.room_history("h"))
    out["h_tail"] = wait(api.room_history("h", since=2, limit=1))
    out["h_since_3"] = wait(api.room_history("h", since=3))
    out["plain"] = wait(api.room_history("plain"))
    out["big"] = wait(api.room_history("big", timeout=10.0))
    return out


def check_real(out: dict[str, Any]) -> None:
    h = out["h"]
    assert h.offset == 4 and h.complete is False and h.epoch  # 1 was evicted (history_size 3)
    assert h.messages == [HistoryMessage(2, "b"), HistoryMessage(3, "c"), HistoryMessage(4, "d")]
    assert out["h_tail"].messages == [HistoryMessage(4, "d")] and out["h_tail"].complete is False
    assert out["h_since_3"] == RoomHistory(h.epoch, 4, [HistoryMessage(4, "d")], True)
    assert out["plain"] == RoomHistory("", 0, [], True)
    big = out["big"]
    assert big.complete is True and big.offset == BIG and len(big.messages) == BIG
    assert [m.offset for m in big.messages] == list(range(1, BIG + 1))
    assert big.messages[-1].data == f"{BIG - 1:05d} " + "y" * 90


@contextmanager
def connected(flavour: str, port: int) -> Iterator[tuple[Any, Any, frozenset[str]]]:
    """A client of ``flavour`` connected to the broker at ``port`` and past its hello answer,
    with a function turning what one of its calls returned, from this thread, into the value
    (the asyncio client runs on a loop in a thread of its own, the app in its own thread);
    and the features the broker announced."""
    if flavour == "thread":
        client = PyStrandsClient(port=port, auto_reconnect=False)
        assert client.connect()
        try:
            wait_for(lambda: client.broker_features, what="the hello answer")
            yield client, lambda value: value, client.broker_features
        finally:
            client.disconnect()
    elif flavour == "async":
        aclient = AsyncPyStrandsClient(port=port, auto_reconnect=False)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()

        def on_loop(coro: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

        try:
            assert on_loop(aclient.connect())
            wait_for(lambda: aclient.broker_features, what="the hello answer")
            yield aclient, on_loop, aclient.broker_features
        finally:
            on_loop(aclient.disconnect())
            loop.call_soon_threadsafe(loop.stop)
            thread.join(DEADLINE)
            loop.close()
    else:
        app = PyStrands(port=port, auto_reconnect=False)
        thread = threading.Thread(target=app.run, daemon=True)
        thread.start()
        try:
            wait_for(lambda: app._client is not None and app._client.broker_features, what="the hello answer")
            assert app._client is not None
            # from this thread: commands return once queued, queries are waited for with .result()
            yield app, lambda value: value.result() if hasattr(value, "result") else value, app._client.broker_features
        finally:
            app.stop()
            thread.join(DEADLINE)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_real_broker_room_config_and_room_history(flavour: str) -> None:
    """NEEDS_HISTORY_BROKER. Each flavour configures rooms and reads their history from the
    real broker (a lone one: history in memory)."""
    with running_broker() as broker, connected(flavour, broker.tcp_port) as (api, wait, features):
        skip_without_history(features)
        out = real_broker_calls(api, wait)
    check_real(out)


def test_real_broker_refuses_what_only_it_checks(caplog: pytest.LogCaptureFixture) -> None:
    """NEEDS_HISTORY_BROKER. A ``history_ttl`` the client lets through (it only asks for a
    positive finite number) that the broker refuses is logged as a warning."""
    with running_broker() as broker:
        client = PyStrandsClient(port=broker.tcp_port, auto_reconnect=False)
        assert client.connect()
        try:
            wait_for(lambda: client.broker_features, what="the hello answer")
            skip_without_history(client.broker_features)
            with caplog.at_level(logging.WARNING, logger="pystrands.client"):
                client.room_config("h", history_ttl=1e12)
                assert client.room_history("h") == RoomHistory("", 0, [], True)  # read after the refusal
            assert any("refused room_config" in r.getMessage() for r in caplog.records if r.name == "pystrands.client")
        finally:
            client.disconnect()


# ------------------------------------------------- the documented example (docs/broker.md)


def history_example() -> str:
    text = (Path(__file__).resolve().parent.parent / "docs" / "broker.md").read_text()
    section = text[text.index("## Rooms, users, presence and moderation") :]
    section = section[: section.index("\n## ", 1)]
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", section, re.S) if "class Feed(" in block]
    return code


def test_the_documented_history_example_works() -> None:
    """NEEDS_HISTORY_BROKER. The ``Feed`` backend of docs/broker.md, as pasted, with the real
    broker and a real WebSocket client."""
    namespace: dict[str, Any] = {}
    exec(compile(history_example(), "docs/broker.md", "exec"), namespace)  # defines Feed
    feed_class = namespace["Feed"]

    async def main() -> None:
        with running_broker() as broker:
            backend = feed_class(port=broker.tcp_port, auto_reconnect=False)
            task = asyncio.create_task(backend.run_forever())
            try:
                for _ in range(int(DEADLINE / 0.01)):
                    if backend.broker_features:
                        break
                    await asyncio.sleep(0.01)
                skip_without_history(backend.broker_features)
                async with websockets.connect(ws_url(broker, "/news"), open_timeout=DEADLINE) as ws:
                    for text in ("one", "two", "three"):
                        await ws.send(text)
                        assert await asyncio.wait_for(ws.recv(), DEADLINE) == text  # the room's message
                    await ws.send("/since 1")
                    got = [await asyncio.wait_for(ws.recv(), DEADLINE) for _ in range(2)]
                    assert got == ["2: two", "3: three"]
            finally:
                await backend.disconnect()
                await asyncio.wait_for(task, DEADLINE)

    asyncio.run(asyncio.wait_for(main(), 30))
