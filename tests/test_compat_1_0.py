"""Drop-in compatibility with PyStrands 1.0.0: names, JSONModel, client attributes, the decorator app.

The public names are compared with the 1.0.0 package installed in its own environment
(``.venv-v1``, created by tests/run_all.sh; its interpreter comes from
``PYSTRANDS_V1_PYTHON``). The client checks run against tests/fake_broker.py's local
TCP server.

No ``from __future__ import annotations`` here on purpose: the JSONModel subclasses
below must have their annotations exactly as user code without that import has them.
"""

import asyncio
import importlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from unittest.mock import AsyncMock

import pytest

from fake_broker import DEADLINE, FakeBroker, wait_for
from pystrands import AsyncPyStrandsClient, PyStrands, PyStrandsClient
from pystrands.context import ConnectionRequestContext, Context, JSONModel

V1_PYTHON = Path(os.environ.get("PYSTRANDS_V1_PYTHON", str(Path(__file__).resolve().parents[1] / ".venv-v1/bin/python")))
needs_v1 = pytest.mark.skipif(not V1_PYTHON.exists(), reason="PyStrands 1.0 environment missing (run tests/run_all.sh)")

MODULES = ("pystrands", "pystrands.context", "pystrands.client", "pystrands.async_client")
FAST: dict[str, Any] = {"reconnect_delay": 0.05, "max_reconnect_delay": 0.1}

LIST_NAMES = textwrap.dedent(
    """
    import importlib, json, sys
    out = {}
    for name in sys.argv[1:]:
        module = importlib.import_module(name)
        out[name] = sorted(n for n in dir(module) if not n.startswith("_"))
    print(json.dumps(out))
    """
)


def run_async_bounded(coro_fn: Callable[[], Coroutine[Any, Any, None]], timeout: float = 20.0) -> None:
    """``asyncio.run(coro_fn())`` in a helper thread with a deadline, so a client that
    blocks its event loop fails the test instead of hanging the run."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(asyncio.wait_for(coro_fn(), timeout))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="compat-async-test", daemon=True)
    thread.start()
    thread.join(timeout + 5.0)
    assert not thread.is_alive(), f"the event loop did not finish within {timeout}s (blocked?)"
    if errors:
        raise errors[0]


def run_v1(script: str, *args: str) -> Any:
    """Run ``script`` with PyStrands 1.0's interpreter and return its JSON output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # 1.0's own package, not ours
    proc = subprocess.run(
        [str(V1_PYTHON), "-c", script, *args], capture_output=True, text=True, timeout=60, env=env, cwd="/"
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ------------------------------------------------------------------------------ names


@needs_v1
def test_v1_interpreter_really_has_pystrands_1_0() -> None:
    version = run_v1("import json, importlib.metadata as m; print(json.dumps(m.version('pystrands')))")
    assert version == "1.0.0"


@needs_v1
@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_of_1_0_exists(module_name: str) -> None:
    v1_names = run_v1(LIST_NAMES, module_name)[module_name]
    assert v1_names, "the 1.0 module lists no names: the comparison would prove nothing"
    module = importlib.import_module(module_name)
    ours = {n for n in dir(module) if not n.startswith("_")}
    missing = sorted(set(v1_names) - ours)
    assert missing == [], f"{module_name} lacks PyStrands 1.0 names: {missing}"
    for name in v1_names:
        assert getattr(module, name) is not None, name


@needs_v1
def test_the_1_0_classes_are_the_same_kind_of_object() -> None:
    # the names 1.0 exports as classes are classes here too (not e.g. functions or modules)
    kinds = run_v1(
        textwrap.dedent(
            """
            import importlib, json, sys
            out = {}
            for name in sys.argv[1:]:
                module = importlib.import_module(name)
                for attr in dir(module):
                    if not attr.startswith("_") and getattr(getattr(module, attr), "__module__", "").startswith("pystrands"):
                        out[name + ":" + attr] = type(getattr(module, attr)).__name__
            print(json.dumps(out))
            """
        ),
        *MODULES,
    )
    assert kinds  # e.g. pystrands:PyStrandsClient -> "type"
    for key, kind in kinds.items():
        module_name, attr = key.split(":")
        assert type(getattr(importlib.import_module(module_name), attr)).__name__ == kind, key


# -------------------------------------------------------------------------- JSONModel


class Point(JSONModel):
    a: int
    b: str


class Point3(Point):
    c: float


def test_jsonmodel_subclass_keyword_construction_and_missing_fields() -> None:
    p = Point(a=1, b="x")
    assert (p.a, p.b) == (1, "x")
    q = Point(a=2)
    assert q.a == 2 and q.b is None
    empty = Point()
    assert empty.a is None and empty.b is None
    # unknown keywords are not fields
    r = Point(a=1, zzz=3)
    assert not hasattr(r, "zzz")


def test_jsonmodel_subclass_from_json_and_to_json() -> None:
    p = Point.from_json({"a": 5, "b": "y"})
    assert isinstance(p, Point) and (p.a, p.b) == (5, "y")
    assert p.to_json() == {"a": 5, "b": "y"}
    assert list(p.to_json()) == ["a", "b"]
    assert Point.from_json({"b": "only"}).to_json() == {"a": None, "b": "only"}
    assert Point.from_json({}).to_json() == {"a": None, "b": None}


def test_jsonmodel_annotations_are_inherited() -> None:
    p = Point3(a=1, b="x", c=2.5)
    assert isinstance(p, Point)
    assert p.to_json() == {"a": 1, "b": "x", "c": 2.5}
    assert list(p.to_json()) == ["a", "b", "c"]  # base class fields first
    assert Point3.from_json({"c": 1.0}).to_json() == {"a": None, "b": None, "c": 1.0}
    assert set(Point3._get_annotations()) == {"a", "b", "c"}


def test_jsonmodel_base_itself_has_no_fields() -> None:
    assert JSONModel().to_json() == {}
    assert JSONModel.from_json({}).to_json() == {}


JSONMODEL_SCRIPT = textwrap.dedent(
    """
    import json
    from pystrands.context import JSONModel, Context

    class Point(JSONModel):
        a: int
        b: str

    class Point3(Point):
        c: float

    out = {
        "full": Point(a=1, b="x").to_json(),
        "missing": Point(a=1).to_json(),
        "from_json": Point.from_json({"b": "y"}).to_json(),
        "inherited": Point3(a=1, c=2.5).to_json(),
        "order": list(Point3(a=1, b="b", c=2.5).to_json()),
        "ctx_from_json": Context.from_json({"client_id": "c1"}).to_json(),
        "ctx_full": Context.from_json({"client_id": "c1", "room_id": "r", "metadata": {"k": 1}}).to_json(),
        "ctx_subclass": issubclass(Context, JSONModel),
    }
    print(json.dumps(out, sort_keys=True))
    """
)


@needs_v1
def test_jsonmodel_and_context_give_what_1_0_gives() -> None:
    v1 = run_v1(JSONMODEL_SCRIPT)
    proc = subprocess.run([sys.executable, "-c", JSONMODEL_SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == v1


def test_context_types_derive_from_jsonmodel() -> None:
    assert issubclass(Context, JSONModel)
    assert issubclass(ConnectionRequestContext, JSONModel)
    assert isinstance(Context(), JSONModel)


def test_context_from_json_missing_keys_are_none() -> None:
    c = Context.from_json({"client_id": "c1"})
    assert c.client_id == "c1"
    assert c.room_id is None
    assert c.metadata is None


def test_context_to_json_has_exactly_the_three_keys() -> None:
    c = Context(client_id="c1", room_id="r1", metadata={"k": [1, 2]})
    assert c.to_json() == {"client_id": "c1", "room_id": "r1", "metadata": {"k": [1, 2]}}
    assert set(Context().to_json()) == {"client_id", "room_id", "metadata"}
    assert set(Context.from_json({"client_id": "c1"}).to_json()) == {"client_id", "room_id", "metadata"}


# ------------------------------------------------------------- _intentional_disconnect


def test_sync_intentional_disconnect_flag() -> None:
    c = PyStrandsClient("127.0.0.1", 1)
    assert c._intentional_disconnect is False
    c.disconnect()
    assert c._intentional_disconnect is True


def test_sync_intentional_disconnect_flag_with_a_connection(broker: FakeBroker) -> None:
    c = PyStrandsClient("127.0.0.1", broker.port, **FAST)
    assert c.connect() is True
    assert c._intentional_disconnect is False
    c.disconnect()
    assert c._intentional_disconnect is True and not c.connected


def test_async_intentional_disconnect_flag() -> None:
    c = AsyncPyStrandsClient("127.0.0.1", 1)
    assert c._intentional_disconnect is False
    asyncio.run(c.disconnect())
    assert c._intentional_disconnect is True


class SyncStopper(PyStrandsClient):
    """1.0-style: the subclass sets the flag itself when told to stop reconnecting."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flag_set = threading.Event()

    def on_message(self, message: str, context: Context) -> None:
        if message == "stop reconnecting":
            self._intentional_disconnect = True
            self.flag_set.set()


class AsyncStopper(AsyncPyStrandsClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flag_set = threading.Event()

    async def on_message(self, message: str, context: Context) -> None:
        if message == "stop reconnecting":
            self._intentional_disconnect = True
            self.flag_set.set()


def test_sync_subclass_setting_the_flag_prevents_a_reconnect(broker: FakeBroker) -> None:
    c = SyncStopper("127.0.0.1", broker.port, **FAST)
    try:
        assert c.connect() is True
        broker.wait_connections(1)
        broker.message("c1", "stop reconnecting")
        assert c.flag_set.wait(DEADLINE)
        manager = c._manager
        assert manager is not None
        broker.drop_connections()
        # the reconnect loop ends instead of reconnecting (it would loop on forever otherwise)
        manager.join(DEADLINE)
        assert not manager.is_alive()
        assert broker.connection_count == 1
        assert c.connected is False  # as 1.0: the loss is seen, only the reconnect is off
    finally:
        c.disconnect(1.0)
    assert broker.connection_count == 1


def test_async_subclass_setting_the_flag_prevents_a_reconnect(broker: FakeBroker) -> None:
    async def body() -> None:
        c = AsyncStopper("127.0.0.1", broker.port, **FAST)
        try:
            assert await c.connect() is True
            await asyncio.to_thread(broker.wait_connections, 1)
            broker.message("c1", "stop reconnecting")
            assert await asyncio.to_thread(c.flag_set.wait, DEADLINE)
            manager = c._manager
            assert manager is not None
            broker.drop_connections()
            await asyncio.wait_for(asyncio.shield(manager), DEADLINE)
            assert broker.connection_count == 1
            assert c.connected is False  # as 1.0: the loss is seen, only the reconnect is off
        finally:
            await c.disconnect(1.0)
        assert broker.connection_count == 1

    run_async_bounded(body)


# ------------------------------------------------------------------ _stop_event (sync)


def test_sync_stop_event_is_a_threading_event_set_by_disconnect(broker: FakeBroker) -> None:
    c = PyStrandsClient("127.0.0.1", broker.port, **FAST)
    assert isinstance(c._stop_event, threading.Event)
    assert not c._stop_event.is_set()
    assert c.connect() is True
    assert not c._stop_event.is_set()
    c.disconnect()
    assert c._stop_event.is_set()


def test_sync_run_forever_returns_when_the_stop_event_is_set(broker: FakeBroker) -> None:
    c = PyStrandsClient("127.0.0.1", broker.port, **FAST)
    thread = threading.Thread(target=c.run_forever, daemon=True)
    thread.start()
    try:
        peer = broker.wait_connections(1)
        wait_for(lambda: c.connected, what="connected")
        assert thread.is_alive()
        c._stop_event.set()  # what 1.0 code does to stop run_forever from another thread
        thread.join(DEADLINE)
        assert not thread.is_alive()
        # run_forever disconnected on its way out
        assert c._intentional_disconnect is True and not c.connected
        assert peer.closed.wait(DEADLINE)
        assert broker.connection_count == 1
    finally:
        c.disconnect(1.0)


def test_sync_disconnect_of_an_idle_client_is_quick(broker: FakeBroker) -> None:
    c = PyStrandsClient("127.0.0.1", broker.port, **FAST)
    assert c.connect() is True
    peer = broker.wait_connections(1)
    peer.wait_hello()
    start = time.monotonic()
    c.disconnect()  # default timeout 5 s: 1.0 always waited for all of it
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"disconnect() took {elapsed:.2f}s with nothing to wait for"
    assert peer.closed.wait(DEADLINE)


def test_sync_disconnect_while_run_forever_runs_is_quick(broker: FakeBroker) -> None:
    c = PyStrandsClient("127.0.0.1", broker.port, **FAST)
    thread = threading.Thread(target=c.run_forever, daemon=True)
    thread.start()
    broker.wait_connections(1)
    wait_for(lambda: c.connected, what="connected")
    start = time.monotonic()
    c.disconnect()
    thread.join(DEADLINE)
    elapsed = time.monotonic() - start
    assert not thread.is_alive()
    assert elapsed < 2.0, f"disconnect() + run_forever exit took {elapsed:.2f}s"


# ------------------------------------------------------------------ the decorator app

EVENT_KEYS = ("connection_request", "new_connection", "message", "disconnect", "error")


def shutdown_executor(app: PyStrands) -> None:
    if app._executor is not None:
        app._executor.shutdown(wait=True)
        app._executor = None


def test_app_handlers_map_the_five_events_to_the_functions() -> None:
    app = PyStrands()
    assert app._handlers == {}

    @app.on_connection_request
    def decide(request: ConnectionRequestContext) -> bool:
        return True

    @app.on_new_connection()
    async def joined(context: Context) -> None:
        pass

    @app.on_message
    async def message(text: str, context: Context) -> None:
        pass

    @app.on_disconnect
    def left(context: Context) -> None:
        pass

    @app.on_error()
    def failed(error: str, context: Context) -> None:
        pass

    expected = {
        "connection_request": decide,
        "new_connection": joined,
        "message": message,
        "disconnect": left,
        "error": failed,
    }
    assert set(app._handlers) == set(EVENT_KEYS)
    for key, func in expected.items():
        assert app._handlers[key] is func, key
    # the decorators return the function unchanged
    assert callable(decide) and decide(ConnectionRequestContext()) is True


def test_app_call_returns_the_handler_result() -> None:
    ctx = Context("c1", "room1", {})
    app = PyStrands()
    assert asyncio.run(app._call("message", "hello", ctx)) is None  # nothing registered

    @app.on_message
    async def echo(text: str, context: Context) -> str:
        return f"async {text} {context.client_id}"

    assert asyncio.run(app._call("message", "hello", ctx)) == "async hello c1"

    seen: list[str] = []

    @app.on_message
    def echo_sync(text: str, context: Context) -> str:
        seen.append(threading.current_thread().name)
        return f"sync {text} {context.room_id}"

    try:
        assert asyncio.run(app._call("message", "hello", ctx)) == "sync hello room1"
        assert seen and seen[0] != threading.main_thread().name  # ran in the thread pool
    finally:
        shutdown_executor(app)

    inline = PyStrands(run_sync_in_thread=False)
    inline.on_message(echo_sync)
    assert asyncio.run(inline._call("message", "hi", ctx)) == "sync hi room1"
    assert asyncio.run(inline._call("disconnect", ctx)) is None


def test_app_create_client_carries_the_settings() -> None:
    app = PyStrands(host="broker.example", port=9123, auto_reconnect=False, reconnect_delay=0.25)
    client = app._create_client()
    assert isinstance(client, AsyncPyStrandsClient)
    assert client.host == "broker.example"
    assert client.port == 9123
    assert client.auto_reconnect is False
    assert client.reconnect_delay == 0.25
    assert app._client is None  # creating a client does not run the app


def test_app_client_callbacks_call_the_handlers() -> None:
    app = PyStrands()
    client = app._create_client()
    ctx = Context("c1", "room1", {})
    request = ConnectionRequestContext(url="/ws")
    # no connection_request handler: accept
    assert asyncio.run(client.on_connection_request(request)) is True

    got: list[tuple[str, str]] = []

    @app.on_message
    async def on_message(text: str, context: Context) -> None:
        got.append((text, context.client_id))

    asyncio.run(client.on_message("hello", ctx))
    assert got == [("hello", "c1")]

    @app.on_connection_request
    async def reject(req: ConnectionRequestContext) -> bool:
        return False

    assert asyncio.run(client.on_connection_request(request)) is False

    @app.on_connection_request
    async def accept(req: ConnectionRequestContext) -> bool:
        return True

    assert asyncio.run(client.on_connection_request(request)) is True


def test_app_sends_do_nothing_before_the_app_runs() -> None:
    app = PyStrands()
    assert app._client is None and app.client is None and not app.connected
    # outside any event loop
    app.send_room_message("room1", "hello")
    app.send_private_message("c1", "hello")
    app.broadcast("hello")

    async def inside_a_loop() -> None:
        await app.send_room_message("room1", "hello")
        await app.send_private_message("c1", "hello")
        await app.broadcast("hello")

    asyncio.run(inside_a_loop())
    assert app._client is None


def test_app_sends_go_through_the_client() -> None:
    app = PyStrands()

    async def body() -> None:
        mock = AsyncMock()
        app._client = mock
        await app.send_room_message("room1", "hello")
        mock.send_room_message.assert_called_once_with("room1", "hello")
        mock.send_room_message.assert_awaited_once_with("room1", "hello")
        await app.send_private_message("c1", "psst")
        mock.send_private_message.assert_called_once_with("c1", "psst")
        mock.send_private_message.assert_awaited_once_with("c1", "psst")
        await app.broadcast("everyone")
        mock.broadcast_message.assert_called_once_with("everyone")
        mock.broadcast_message.assert_awaited_once_with("everyone")
        # nothing else was sent
        assert mock.send_room_message.call_count == 1 and mock.send_private_message.call_count == 1

    asyncio.run(body())
