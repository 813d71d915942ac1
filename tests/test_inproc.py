"""In-process backends (issue 14): ``Broker.start(backend=...)``, ``Broker.serve(backend=...)`` and
``Broker.serving(backend)`` run the handlers of the three client flavours in the broker's own
process. Real broker, real WebSocket clients (``websockets``, through
``pystrands.testing.BrokerHarness`` or directly), real TCP backends alongside.

Every wait has a deadline; nothing sleeps to wait for something that can be awaited, and no test
asserts a speed: "A does not delay B" and "pongs arrive while the GIL is held" are checked by the
order of events (gates, flags), not by durations.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import os
import random
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import websockets

from procinfo import rss_kib
from pystrands import AsyncPyStrandsClient, Broker, PyStrands, PyStrandsClient
from pystrands.testing import BrokerHarness
from v1peer import DEADLINE, wait_for

FLAVOURS = ["thread", "async", "app"]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NEEDS_UVLOOP = pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed")


def run(coro: Any, loop: str = "asyncio", limit: float = 90) -> Any:
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(coro, limit))


async def set_within(event: threading.Event, what: str, timeout: float = DEADLINE) -> None:
    """Waits (off the loop) for a threading.Event a handler sets."""
    assert await asyncio.to_thread(event.wait, timeout), f"{what} did not happen within {timeout:g}s"


# ------------------------------------------------------------------------------------ backends
#
# One piece of application logic (`Script`) and three shells, one per flavour, that call it and
# carry out what it returns with their own send methods. A step is ("room", room, text),
# ("private", client_id, text), ("broadcast", text), ("wait", threading.Event) (block or await
# until set), ("sleep", seconds), ("yield",) (async shells: let the loop run), ("set", Event).


class Script:
    """What the backends do; records every callback in `events` (list.append is atomic)."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag
        self.events: list[tuple[Any, ...]] = []

    def before_request(self, request: Any) -> list[tuple[Any, ...]]:
        return []

    def request(self, request: Any) -> bool:
        user = request.headers.get("X-User", [None])[0]
        self.events.append(("request", request.url, request.query, request.remote_addr, user))
        if user is None:
            return False
        request.context.client_id = user
        request.context.room_id = request.url.strip("/") or "lobby"
        request.context.metadata = {"user": user, "n": [1, 2], "by": self.tag}
        return True

    def new(self, ctx: Any) -> list[tuple[Any, ...]]:
        self.events.append(("new", ctx.client_id, ctx.room_id, ctx.metadata))
        return [("private", ctx.client_id, f"welcome {ctx.client_id}"), ("room", ctx.room_id, f"{ctx.client_id} joined")]

    def message(self, message: str, ctx: Any) -> list[tuple[Any, ...]]:
        self.events.append(("message", message, ctx.client_id, ctx.room_id, ctx.metadata))
        cmd, _, rest = message.partition(":")
        if cmd == "raise":
            raise ValueError(f"boom from {ctx.client_id}")
        if cmd == "room":
            return [("room", ctx.room_id, rest)]
        if cmd == "dm":
            target, _, text = rest.partition(":")
            return [("private", target, text)]
        if cmd == "all":
            return [("broadcast", rest)]
        return [("private", ctx.client_id, f"{self.tag}echo: {message}")]

    def error(self, error: str, ctx: Any) -> list[tuple[Any, ...]]:
        self.events.append(("error", error, ctx.client_id))
        return [("room", ctx.room_id, f"error {ctx.client_id}")]

    def disconnect(self, ctx: Any) -> list[tuple[Any, ...]]:
        self.events.append(("disconnect", ctx.client_id, ctx.room_id))
        return [("room", ctx.room_id, f"{ctx.client_id} left")]

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == kind]


class SyncBackend(PyStrandsClient):
    def __init__(self, script: Script, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.script = script

    def _do(self, steps: list[tuple[Any, ...]]) -> None:
        for kind, *args in steps:
            if kind == "room":
                self.send_room_message(*args)
            elif kind == "private":
                self.send_private_message(*args)
            elif kind == "broadcast":
                self.broadcast_message(*args)
            elif kind == "wait":
                args[0].wait(DEADLINE)
            elif kind == "sleep":
                time.sleep(args[0])
            elif kind == "set":
                args[0].set()

    def on_connection_request(self, request: Any) -> bool:
        self._do(self.script.before_request(request))
        return self.script.request(request)

    def on_new_connection(self, context: Any) -> None:
        self._do(self.script.new(context))

    def on_message(self, message: str, context: Any) -> None:
        self._do(self.script.message(message, context))

    def on_disconnect(self, context: Any) -> None:
        self._do(self.script.disconnect(context))

    def on_error(self, error: str, context: Any) -> None:
        self._do(self.script.error(error, context))


async def _do_async(steps: list[tuple[Any, ...]], sends: dict[str, Callable[..., Any]]) -> None:
    for kind, *args in steps:
        if kind in sends:
            await sends[kind](*args)
        elif kind == "wait":
            await asyncio.to_thread(args[0].wait, DEADLINE)
        elif kind == "sleep":
            await asyncio.sleep(args[0])
        elif kind == "yield":
            await asyncio.sleep(0)
        elif kind == "set":
            args[0].set()


class AsyncBackend(AsyncPyStrandsClient):
    def __init__(self, script: Script, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.script = script
        self.loops: set[asyncio.AbstractEventLoop] = set()

    async def _do(self, steps: list[tuple[Any, ...]]) -> None:
        self.loops.add(asyncio.get_running_loop())
        sends = {"room": self.send_room_message, "private": self.send_private_message, "broadcast": self.broadcast_message}
        await _do_async(steps, sends)

    async def on_connection_request(self, request: Any) -> bool:
        await self._do(self.script.before_request(request))
        return self.script.request(request)

    async def on_new_connection(self, context: Any) -> None:
        await self._do(self.script.new(context))

    async def on_message(self, message: str, context: Any) -> None:
        await self._do(self.script.message(message, context))

    async def on_disconnect(self, context: Any) -> None:
        await self._do(self.script.disconnect(context))

    async def on_error(self, error: str, context: Any) -> None:
        await self._do(self.script.error(error, context))


def make_app(script: Script, **kwargs: Any) -> PyStrands:
    """The decorator app, with sync handlers (run in its thread pool) and async ones."""
    app = PyStrands(**kwargs)
    sends = {"room": app.send_room_message, "private": app.send_private_message, "broadcast": app.broadcast}

    def do_sync(steps: list[tuple[Any, ...]]) -> None:
        for kind, *args in steps:
            if kind in sends:
                sends[kind](*args)  # SendResult: fire and forget from a sync handler
            elif kind == "wait":
                args[0].wait(DEADLINE)

    @app.on_connection_request
    def auth(request: Any) -> bool:  # sync: the app's thread pool
        do_sync(script.before_request(request))
        return script.request(request)

    @app.on_new_connection
    async def joined(context: Any) -> None:
        await _do_async(script.new(context), sends)

    @app.on_message
    async def message(message: str, context: Any) -> None:
        await _do_async(script.message(message, context), sends)

    @app.on_disconnect
    def left(context: Any) -> None:  # sync
        do_sync(script.disconnect(context))

    @app.on_error
    async def error(error: str, context: Any) -> None:
        await _do_async(script.error(error, context), sends)

    return app


def make_backend(flavour: str, script: Script, **kwargs: Any) -> Any:
    if flavour == "thread":
        return SyncBackend(script, **kwargs)
    if flavour == "async":
        return AsyncBackend(script, **kwargs)
    return make_app(script, **kwargs)


def user(name: str) -> dict[str, str]:
    return {"X-User": name}


# ------------------------------------------------------------------ 1. callbacks and sends


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_callback_and_send_method_in_process(flavour):
    script = Script()

    async def main():
        # One handler raises on purpose (on_error); the harness keeps it in handler_errors.
        async with BrokerHarness(make_backend(flavour, script), max_message_size=1024, raise_handler_errors=False) as h:
            assert await h.connect_status("/red") == 403  # no X-User: rejected
            a = await h.client("/red?x=1", headers=user("alice"))
            assert await a.receive_many(2) == ["welcome alice", "alice joined"]
            b = await h.client("/red", headers=user("bob"))
            assert await b.receive_many(2) == ["welcome bob", "bob joined"]
            assert await a.receive() == "bob joined"
            c = await h.client("/blue", headers=user("carol"))
            assert await c.receive_many(2) == ["welcome carol", "carol joined"]

            await a.send("room:hello red")  # send_room_message: a and b, not c
            assert await a.receive() == "hello red" and await b.receive() == "hello red"
            await a.send("dm:carol:psst")  # send_private_message
            assert await c.receive() == "psst"
            await b.send("all:everyone")  # broadcast
            for ws in (a, b, c):
                assert await ws.receive() == "everyone"  # c got nothing from room red before it

            await a.send("raise")  # the handler raises -> on_error with a's context; a stays up
            assert await a.receive() == "error alice" and await b.receive() == "error alice"
            await a.send("still here")
            assert await a.receive() == "echo: still here"

            await b.send("x" * 2000)  # over max_message_size: the broker closes b (1009)
            assert await b.wait_closed() == 1009
            assert await a.receive_many(2) == ["error bob", "bob left"]  # error event, then disconnect
            await c.close()
            await a.close()
            assert a.close_code == c.close_code == 1000  # the broker answered the close frame
            await h.wait_until(lambda: len(script.of("disconnect")) == 3, what="three disconnects")
            assert [r.exc_info[1].args[0] for r in h.handler_errors] == ["boom from alice"]

    run(main())
    requests = script.of("request")
    assert requests[0][1:3] == ("/red", "") and requests[0][4] is None
    assert requests[1][1:3] == ("/red", "x=1") and requests[1][3].startswith("127.0.0.1:") and requests[1][4] == "alice"
    meta = {"user": "alice", "n": [1, 2], "by": ""}
    assert script.of("new")[0] == ("new", "alice", "red", meta)
    assert [e[1:3] for e in script.of("new")] == [("alice", "red"), ("bob", "red"), ("carol", "blue")]
    assert script.of("message")[0] == ("message", "room:hello red", "alice", "red", meta)
    errors = script.of("error")
    assert errors[0] == ("error", "boom from alice", "alice")
    assert errors[1][2] == "bob" and "max_message_size=1024" in errors[1][1]
    assert sorted(e[1] for e in script.of("disconnect")) == ["alice", "bob", "carol"]


# ---------------------------------------------------------------------- 2. handshake codes


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_accept_reject_and_handler_timeout_status_codes(flavour):
    gate = threading.Event()
    slow_started = threading.Event()

    class Slow(Script):
        def before_request(self, request: Any) -> list[tuple[Any, ...]]:
            if request.headers.get("X-Slow"):
                slow_started.set()
                return [("wait", gate)]  # far beyond request_timeout; released by the test
            return []

    script = Slow()

    async def main():
        async with BrokerHarness(make_backend(flavour, script), request_timeout=0.3) as h:
            assert await h.connect_status("/r", headers=user("a")) == 101
            assert await h.connect_status("/r") == 403
            assert await h.connect_status("/r", headers={**user("s"), "X-Slow": "1"}) == 503
            assert slow_started.is_set()  # it was the handler that made the broker wait
            gate.set()
            assert await h.connect_status("/r", headers=user("b")) == 101  # still serving
            assert h.stats()["connections_unavailable"] == 1

    try:
        run(main())
    finally:
        gate.set()


def test_no_backend_is_503():
    async def main():
        async with BrokerHarness(None) as h:
            assert await h.connect_status("/r", headers=user("a")) == 503

    run(main())


# ---------------------------------------------------------------------- 3. order, no loss


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_order_of_200_messages_per_client_with_concurrent_clients(flavour):
    rng = random.Random(14)

    class Echo(Script):
        def message(self, message: str, ctx: Any) -> list[tuple[Any, ...]]:
            # Vary handler durations so a handler of one client may overtake another of the
            # same client if per-client order were not enforced.
            pause = rng.choice([(), (), ("yield",), ("sleep", 0.0005)])
            return [*([pause] if pause else []), ("private", ctx.client_id, message)]

    clients, count = 6, 200

    async def main():
        async with BrokerHarness(make_backend(flavour, Echo())) as h:
            conns = [await h.client(f"/r{i}", headers=user(f"c{i}")) for i in range(clients)]
            for ws in conns:
                await ws.receive_many(2)  # welcome, joined

            async def blast(i: int) -> None:
                for n in range(count):
                    await conns[i].send(f"c{i}:{n}")

            async def collect(i: int) -> list[str]:
                return await conns[i].receive_many(count, timeout=60)

            results = await asyncio.gather(*[blast(i) for i in range(clients)], *[collect(i) for i in range(clients)])
            for i, got in enumerate(results[clients:]):
                assert got == [f"c{i}:{n}" for n in range(count)], f"client c{i}: lost or reordered"
            for ws in conns:
                await ws.close()

    run(main())


# ------------------------------------------------------------- 4. a slow handler, other clients


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_slow_handler_for_one_client_does_not_delay_another(flavour):
    gate = threading.Event()
    a_started = threading.Event()
    a_done = threading.Event()

    class Gated(Script):
        def message(self, message: str, ctx: Any) -> list[tuple[Any, ...]]:
            if message == "slow":
                a_started.set()
                return [("wait", gate), ("set", a_done), ("private", ctx.client_id, "slow done")]
            return [("private", ctx.client_id, f"echo: {message}")]

    async def main():
        async with BrokerHarness(make_backend(flavour, Gated())) as h:
            a = await h.client("/a", headers=user("a"))
            b = await h.client("/b", headers=user("b"))
            await a.receive_many(2)
            await b.receive_many(2)
            await a.send("slow")
            await a.send("after")  # same client: must wait for "slow"
            await set_within(a_started, "A's handler start")
            await b.send("hi")
            assert await b.receive() == "echo: hi"
            assert not a_done.is_set(), "B's echo waited for A's slow handler"
            gate.set()
            assert await a.receive_many(2) == ["slow done", "echo: after"]

    try:
        run(main())
    finally:
        gate.set()


# ------------------------------------------------------------ 5. in-process and TCP together


def test_in_process_and_tcp_backends_side_by_side():
    inproc_script, tcp_script = Script("inproc:"), Script("tcp:")
    inproc = SyncBackend(inproc_script)

    async def main():
        async with BrokerHarness(inproc) as h:
            tcp = SyncBackend(tcp_script, host="127.0.0.1", port=h.tcp_port, auto_reconnect=False)
            assert await asyncio.to_thread(tcp.connect)
            try:
                await h.wait_until(lambda: h.stats()["backends"] == 2, what="both backends registered")
                conns = [await h.client(f"/r{i}", headers=user(f"u{i}")) for i in range(6)]
                owner: dict[int, str] = {}
                for i, ws in enumerate(conns):
                    assert await ws.receive_many(2) == [f"welcome u{i}", f"u{i} joined"]
                    await ws.send("m1")
                    await ws.send("m2")
                    first = await ws.receive()
                    assert first.endswith("echo: m1"), first
                    owner[i] = first.removesuffix("echo: m1")
                    assert await ws.receive() == f"{owner[i]}echo: m2"  # sticky: the same backend
                assert set(owner.values()) == {"inproc:", "tcp:"}  # both took clients
                assert {e[1] for e in inproc_script.of("new")} == {f"u{i}" for i, t in owner.items() if t == "inproc:"}

                # The in-process backend leaves: its clients move to the TCP one, nothing is lost.
                await asyncio.to_thread(inproc.disconnect)
                await h.wait_until(lambda: h.stats()["backends"] == 1, what="in-process backend detached")
                for i, ws in enumerate(conns):
                    await ws.send("m3")
                    assert await ws.receive() == "tcp:echo: m3", f"client u{i} (was {owner[i]})"
                late = await h.client("/late", headers=user("late"))
                await late.receive_many(2)
                assert [e[1] for e in tcp_script.of("new")][-1] == "late"
            finally:
                await asyncio.to_thread(tcp.disconnect)

    run(main())


# ------------------------------------------------- 6. the GIL held by a handler; pings answered

PING_CLIENT = r"""
import asyncio, os, sys
import websockets

async def main(url):
    async with websockets.connect(url, ping_interval=None, additional_headers={"X-User": "b"}) as ws:
        assert (await ws.recv()).startswith("welcome")
        print("ready", flush=True)
        sys.stdin.readline()  # the busy handler says go, then holds the GIL
        for i in range(10):
            await ws.send(f"f{i}")
        pong = await ws.ping()  # answered after the 10 frames were read
        await asyncio.wait_for(pong, 10)
        os.write(1, b"pong\n")
        got = [m for m in [await asyncio.wait_for(ws.recv(), 10) for _ in range(11)] if m.startswith("echo")]
        assert got == [f"echo: f{i}" for i in range(10)], got
        print("echoes ok", flush=True)

asyncio.run(main(sys.argv[1]))
"""


def read_line(fd: int, timeout: float) -> bytes:
    """One line from a raw pipe descriptor, with a deadline."""
    buf = b""
    end = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = end - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], f"no line within {timeout:g}s (got {buf!r})"
        chunk = os.read(fd, 1)
        assert chunk, f"pipe closed (got {buf!r})"
        buf += chunk
    return buf


@pytest.mark.parametrize("flavour", ["thread", "async"])
def test_pings_and_frames_are_answered_while_a_handler_holds_the_gil(flavour):
    """The other client runs in a subprocess so that nothing it does needs our GIL, and the
    switch interval is raised so the busy loop really keeps the GIL for its 300 ms."""
    proc: subprocess.Popen[bytes] | None = None
    verdict: dict[str, bool] = {}
    early: list[bytes] = []  # what the ping client printed while the handler was busy
    calls: list[Any] = []

    class Busy(Script):
        def message(self, message: str, ctx: Any) -> list[tuple[Any, ...]]:
            if message != "busy":
                return [("private", ctx.client_id, f"echo: {message}")]
            calls.append((ctx.event_id, ctx.redelivered))
            if len(calls) > 1:  # handled twice: the test fails on `calls` below
                return []
            assert proc is not None and proc.stdin is not None and proc.stdout is not None
            os.write(proc.stdin.fileno(), b"go\n")
            end = time.monotonic() + 0.3
            while time.monotonic() < end:  # pure Python: holds the GIL
                pass
            try:
                seen = os.read(proc.stdout.fileno(), 100)
            except BlockingIOError:
                seen = b""
            verdict["pong_before_end"] = b"pong" in seen
            early.append(seen)
            return [("private", ctx.client_id, "busy done")]

    async def main():
        nonlocal proc
        async with BrokerHarness(make_backend(flavour, Busy())) as h:
            a = await h.client("/a", headers=user("a"))
            await a.receive_many(2)
            proc = subprocess.Popen([sys.executable, "-c", PING_CLIENT, h.url("/b")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                assert proc.stdout is not None
                out = proc.stdout.fileno()
                assert read_line(out, DEADLINE) == b"ready\n"
                os.set_blocking(out, False)
                old = sys.getswitchinterval()
                sys.setswitchinterval(5.0)
                try:
                    await a.send("busy")
                    assert await a.receive() == "busy done"
                finally:
                    sys.setswitchinterval(old)
                assert verdict == {"pong_before_end": True}, "the pong waited for the busy handler"
                os.set_blocking(out, True)
                rest, err = await asyncio.to_thread(proc.communicate, None, DEADLINE)
                # A loaded machine may let the echoes through in the window the handler leaves
                # the GIL (its write to the pipe): they are then among what it read already.
                rest = b"".join(early) + rest
                assert proc.returncode == 0 and rest.endswith(b"echoes ok\n"), (rest, err, calls)
                assert len(calls) == 1, calls
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    run(main())


# -------------------------------------------------------------------------- 7. backpressure



BACKPRESSURE_SECONDS = float(os.environ.get("PYSTRANDS_TEST_BACKPRESSURE_SECONDS", "8"))


def test_backpressure_slow_handlers_no_loss_order_kept_memory_bounded():
    """4 clients blast 1 KiB messages; the handler sleeps 1 ms per message, far slower than they
    arrive. The run is sized to take roughly PYSTRANDS_TEST_BACKPRESSURE_SECONDS (default 8; the
    issue's full run is 20), at about 450 handled messages per second and client. The broker must
    stop reading the clients instead of queueing: every message is handled once, in order, while
    what is in flight to the backend stays bounded and so does the process' memory."""
    clients = 4
    per_client = max(500, int(BACKPRESSURE_SECONDS * 450))
    pad = "p" * 1024
    expected = {f"c{i}": 0 for i in range(clients)}
    problems: list[str] = []

    class Slow(Script):
        def message(self, message: str, ctx: Any) -> list[tuple[Any, ...]]:
            n = int(message.split(":", 1)[0])
            if n != expected[ctx.client_id]:
                problems.append(f"{ctx.client_id}: got {n}, expected {expected[ctx.client_id]}")
            expected[ctx.client_id] = n + 1
            if n == per_client - 1:
                return [("private", ctx.client_id, "done")]
            return [("sleep", 0.001)]

    backend = SyncBackend(Slow(), max_pending=256)

    async def main():
        async with BrokerHarness(backend, inproc_queue_size=64, timeout=30) as h:
            conns = [await h.client("/r", headers=user(f"c{i}")) for i in range(clients)]
            for ws in conns:
                await ws.receive()  # welcome ("joined" messages are read at the end)
            before = rss_kib()
            peak = {"rss": before, "unacked": 0, "queued": 0}
            stop = asyncio.Event()

            async def sample() -> None:
                while not stop.is_set():
                    s = h.stats()
                    peak["unacked"] = max(peak["unacked"], s["unacked_events"])
                    peak["queued"] = max(peak["queued"], s["queued_events"])
                    peak["rss"] = max(peak["rss"], rss_kib())
                    try:
                        await asyncio.wait_for(stop.wait(), 0.05)
                    except asyncio.TimeoutError:
                        pass

            async def blast(ws: Any) -> None:
                for n in range(per_client):
                    await ws.send(f"{n}:{pad}")

            sampler = asyncio.create_task(sample())
            await asyncio.gather(*[blast(ws) for ws in conns])
            for ws in conns:
                while (await ws.receive(timeout=BACKPRESSURE_SECONDS * 4 + 30)) != "done":
                    pass
            stop.set()
            await sampler
            return before, peak

    before, peak = run(main(), limit=BACKPRESSURE_SECONDS * 6 + 60)
    assert problems == [], problems[:5]
    assert expected == {f"c{i}": per_client for i in range(clients)}  # every message, once
    total = clients * per_client
    # In flight to the backend: the link's high-water mark (64) plus what the client reads
    # ahead (max_pending=256) plus acks not yet written; without backpressure it is ~total.
    assert peak["unacked"] < 2000 < total, peak
    assert peak["queued"] == 0, peak
    # Without backpressure the broker would hold ~total KiB of messages (and Python more).
    assert peak["rss"] - before < min(32 * 1024, total // 2), (before, peak)


# ---------------------------------------------------------------------- 8. start/stop cycles


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_50_start_stop_cycles_release_threads_and_fds():
    async def cycle(i: int) -> None:
        flavour = FLAVOURS[i % 3]
        async with BrokerHarness(make_backend(flavour, Script())) as h:
            async with h.client("/r", headers=user("u")) as ws:
                await ws.send("hi")
                assert (await ws.receive_many(3))[2] == "echo: hi"

    def executor_threads() -> int:
        # the loop's default executor grows lazily up to its max_workers, whenever a cycle happens to
        # need one more: not the broker's threads, so not counted
        return sum(t.name.startswith("asyncio_") for t in threading.enumerate())

    def counts() -> tuple[int, int, int]:
        gc.collect()  # sockets that only a reference cycle still holds are closed by the collector
        extra = executor_threads()
        return (os_threads() - extra, threading.active_count() - extra, open_fds())

    def fd_targets() -> list[str]:
        out = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                out.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        return sorted(out)

    async def main():
        for i in range(3):  # warm-up: lazily made fds and threads
            await cycle(i)
        base = counts()
        before = fd_targets()
        for i in range(50):
            await cycle(i)
        limit = (base[0] + 2, base[1] + 1, base[2] + 2)
        try:
            await wait_for(
                lambda: all(now <= most for now, most in zip(counts(), limit)),
                what="threads and fds back to the baseline",
            )
        except AssertionError:
            after = fd_targets()
            new_fds = [t for t in after if t not in before or after.count(t) > before.count(t)]
            raise AssertionError(
                f"baseline {base}, now {counts()}: threads {[t.name for t in threading.enumerate()]}, new fds {new_fds}"
            )

    run(main())


# ------------------------------------------------------------------- 9. the seed examples


def load_example(name: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Runs an example file unchanged, except that run_forever() only records the backend it
    was called on (the quick starts call it at module level), so its handlers can be hosted."""
    started: list[Any] = []

    def fake_run(self: Any) -> None:
        started.append(self)

    async def fake_arun(self: Any) -> None:
        started.append(self)

    with monkeypatch.context() as m:
        m.setattr(PyStrandsClient, "run_forever", fake_run)
        m.setattr(AsyncPyStrandsClient, "run_forever", fake_arun)
        ns = runpy.run_path(str(EXAMPLES / name), run_name="example")
    ns["_started"] = started
    return ns


@pytest.mark.parametrize("name", ["quickstart_sync.py", "quickstart_async.py"])
def test_quickstart_examples_in_process(name, monkeypatch):
    ns = load_example(name, monkeypatch)
    (backend,) = ns["_started"]

    async def main():
        async with BrokerHarness(backend) as h:
            a, b, other = [await h.client(p) for p in ("/lobby", "/lobby", "/other")]
            await a.send("hi")
            assert await a.receive() == "echo: hi" and await b.receive() == "echo: hi"
            await other.send("x")
            assert await other.receive() == "echo: x"
            for ws in (a, b, other):
                await ws.close()

    run(main())


@pytest.mark.parametrize("name, speaker", [("chat_sync.py", lambda n: n.removeprefix("User ")), ("chat_async.py", lambda n: n)])
def test_chat_examples_in_process(name, speaker, monkeypatch):
    ns = load_example(name, monkeypatch)
    backend = ns["ChatServer"](host="localhost", port=8081, auto_reconnect=True)  # as in its __main__
    token = {"X-Token": "secret"}

    async def main():
        async with BrokerHarness(backend) as h:
            assert await h.connect_status("/general", headers={"X-Token": "wrong"}) == 403
            a = await h.client("/general", headers=token)
            joined = await a.receive()
            assert joined.endswith(" joined")
            a_name = joined.removesuffix(" joined")
            b = await h.client("/general", headers=token)
            b_joined = await a.receive()
            assert b_joined == await b.receive() and b_joined.endswith(" joined")
            b_name = b_joined.removesuffix(" joined")
            lobby = await h.client("/", headers=token)
            assert (await lobby.receive()).endswith(" joined")
            await a.send("hello")
            assert await a.receive() == await b.receive() == f"{speaker(a_name)}: hello"
            await b.close()
            assert await a.receive() == f"{b_name} left"
            await lobby.send("anyone?")
            assert (await lobby.receive()).endswith(": anyone?")
            await a.close()
            await lobby.close()

    run(main())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the documented example uses on_event
def test_fastapi_example_backend_in_process(monkeypatch):
    pytest.importorskip("fastapi")
    ns = load_example("fastapi_app.py", monkeypatch)
    backend = ns["backend"]

    async def main():
        # The example's backend on the application's own loop, as a lifespan would run it.
        async with BrokerHarness(backend, share_loop=True) as h:
            async with h.client("/room1") as ws:
                await ws.send("ping")
                assert await ws.receive() == "echo: ping"
            assert backend.connected

    run(main())
    assert backend.connected is False


# ------------------------------------------------------------- 10. serving(), serve(), signals


@pytest.mark.parametrize("loop", ["asyncio", pytest.param("uvloop", marks=NEEDS_UVLOOP)])
@pytest.mark.parametrize("flavour", ["async", "app"])
def test_serving_on_an_already_running_loop(flavour, loop):
    seen_loops: set[Any] = set()

    class Probe(Script):
        def message(self, message: str, ctx: Any) -> list[tuple[Any, ...]]:
            seen_loops.add(asyncio.get_running_loop())
            return super().message(message, ctx)

    backend = make_backend(flavour, Probe())

    async def main():
        broker = Broker(host="127.0.0.1", ws_port=0, tcp_port=0, log_level="warn")
        async with broker.serving(backend) as served:
            assert served is broker and broker.running
            url = f"ws://127.0.0.1:{broker.ws_port}/r"
            async with websockets.connect(url, additional_headers=user("a"), open_timeout=DEADLINE) as ws:
                await asyncio.wait_for(ws.recv(), DEADLINE)
                await ws.send("hi")
                while (msg := await asyncio.wait_for(ws.recv(), DEADLINE)) != "echo: hi":
                    assert "joined" in msg
            stays = await websockets.connect(url, additional_headers=user("b"), open_timeout=DEADLINE)
        assert seen_loops == {asyncio.get_running_loop()}  # the handlers ran on this loop
        assert not broker.running
        await asyncio.wait_for(stays.wait_closed(), DEADLINE)
        assert stays.close_code == 1001

    run(main(), loop)


def serve_in_thread(broker: Broker, backend: Any, drain_timeout: float = 5.0) -> tuple[threading.Thread, list[BaseException]]:
    """Runs ``broker.serve(backend=...)`` in a thread; returns it and the list its failure lands in."""
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            broker.serve(drain_timeout, backend=backend)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=serve, name="test-serve")
    thread.start()
    return thread, failure


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_serve_with_backend_stopped_by_stop_from_another_thread(flavour):
    script = Script()
    broker = Broker(host="127.0.0.1", ws_port=0, tcp_port=0, log_level="warn")
    thread, failure = serve_in_thread(broker, make_backend(flavour, script))

    async def main():
        await wait_for(lambda: broker.running and broker.stats().get("backends") == 1, what="serve() attached the backend")
        ws = await websockets.connect(f"ws://127.0.0.1:{broker.ws_port}/r", additional_headers=user("a"), open_timeout=DEADLINE)
        assert await asyncio.wait_for(ws.recv(), DEADLINE) == "welcome a"
        await asyncio.to_thread(broker.stop)
        await asyncio.wait_for(ws.wait_closed(), DEADLINE)
        assert ws.close_code == 1001
        # The client's disconnect was handled before the backend went away.
        assert script.of("disconnect") == [("disconnect", "a", "r")]

    try:
        run(main())
    finally:
        broker.stop()
        thread.join(DEADLINE)
    assert not thread.is_alive() and failure == []
    assert not broker.running


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_stop_with_connected_clients_does_not_wait_out_its_drain_timeout(flavour):
    """Regression: an event-loop backend that took the clients' last events before the broker
    finished its link was never woken again, so stop() waited its full drain timeout (the
    link's "drained" signal was only given by a later read). Stop with a 60 s timeout must end
    long before it; a lost wake-up shows as a stop that outlives the 20 s deadline."""

    async def main():
        for _ in range(10):  # the race went either way; ten stops hit it almost surely
            broker = Broker(host="127.0.0.1", ws_port=0, tcp_port=0, log_level="warn")
            broker.start(backend=make_backend(flavour, Script()))
            ws = await websockets.connect(f"ws://127.0.0.1:{broker.ws_port}/r", additional_headers=user("a"), open_timeout=DEADLINE)
            await asyncio.wait_for(ws.recv(), DEADLINE)
            stopper = threading.Thread(target=broker.stop, args=(60.0,))
            stopper.start()
            await asyncio.to_thread(stopper.join, 20.0)
            assert not stopper.is_alive(), "stop() waited out its drain timeout"
            await asyncio.wait_for(ws.wait_closed(), DEADLINE)

    run(main(), limit=300)


UPGRADE = (
    b"GET /a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_a_client_right_after_start_is_accepted():
    """Regression: start(backend=...) returned before the broker had carried out the backend's
    hello (it went through the link's task), so a client connecting at once could get 503 (no
    backend). Three flavours start and stop concurrently, each sending a raw upgrade request the
    moment start() returns."""
    statuses: dict[str, list[bytes]] = {f: [] for f in FLAVOURS}

    def cycles(flavour: str) -> None:
        for _ in range(60):
            broker = Broker(host="127.0.0.1", ws_port=0, tcp_port=0, log_level="error")
            broker.start(backend=make_backend(flavour, Script()))
            try:
                with socket.create_connection(("127.0.0.1", broker.ws_port), timeout=DEADLINE) as s:
                    s.sendall(UPGRADE.replace(b"\r\n\r\n", b"\r\nX-User: u\r\n\r\n"))
                    statuses[flavour].append(s.recv(12))
            finally:
                broker.stop()

    threads = [threading.Thread(target=cycles, args=(f,)) for f in FLAVOURS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    for flavour, got in statuses.items():
        assert len(got) == 60 and set(got) == {b"HTTP/1.1 101"}, (flavour, sorted(set(got)))


POLL_WHILE_STARTING = r"""
import threading
from pystrands import Broker

broker = Broker(host="127.0.0.1", ws_port=0, tcp_port=0, log_level="warn")
done = threading.Event()

def poll():
    while not done.is_set():
        broker.running, broker.stats(), broker.ws_port

poller = threading.Thread(target=poll)
poller.start()
for _ in range(30):
    broker.start()
    broker.stop()
done.set()
poller.join()
print("ok", flush=True)
"""


def test_reading_broker_state_while_another_thread_starts_it_does_not_deadlock():
    """Regression: start() held the broker's state lock while it waited to take the GIL back,
    and the getters (running, stats, ports) take that lock while holding the GIL: a thread
    polling `broker.running` while serve() started in another thread hung both for ever. Run
    in a subprocess, so a deadlock fails the test instead of hanging the run."""
    try:
        done = subprocess.run([sys.executable, "-c", POLL_WHILE_STARTING], capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("start() deadlocked with a thread reading the broker's state")
    assert done.returncode == 0 and done.stdout == b"ok\n", done


SERVE_SCRIPT = r"""
import sys, threading, time
from pystrands import AsyncPyStrandsClient, Broker, PyStrandsClient

class T(PyStrandsClient):
    def on_message(self, message, context):
        self.send_private_message(context.client_id, "echo: " + message)
    def on_disconnect(self, context):
        print("disconnected", context.client_id, flush=True)

class A(AsyncPyStrandsClient):
    async def on_message(self, message, context):
        await self.send_private_message(context.client_id, "echo: " + message)
    async def on_disconnect(self, context):
        print("disconnected", context.client_id, flush=True)

broker = Broker(host="127.0.0.1", ws_port=0, tcp_port=0, log_level="warn")

def announce():
    while not (broker.running and broker.stats().get("backends") == 1):
        time.sleep(0.01)
    print("ready", broker.ws_port, flush=True)

threading.Thread(target=announce, daemon=True).start()
broker.serve(backend=T() if sys.argv[1] == "thread" else A())
print("served", flush=True)
"""


@pytest.mark.parametrize("flavour", ["thread", "async"])
def test_serve_with_backend_stops_cleanly_on_sigterm(flavour):
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, flavour], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )

    async def main():
        assert proc.stdout is not None
        line = read_line(proc.stdout.fileno(), DEADLINE).decode()
        assert line.startswith("ready "), line
        port = int(line.split()[1])
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/r", open_timeout=DEADLINE)
        await ws.send("hi")
        assert await asyncio.wait_for(ws.recv(), DEADLINE) == "echo: hi"
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(ws.wait_closed(), DEADLINE)
        assert ws.close_code == 1001
        out, _ = await asyncio.to_thread(proc.communicate, None, DEADLINE)
        return out.decode()

    try:
        out = run(main())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "disconnected" in out and out.rstrip().endswith("served"), out
    assert "Traceback" not in out, out


# ------------------------------------------------------------------------ 11. bad input


def test_backend_of_the_wrong_type_is_a_clear_type_error():
    broker = Broker(host="127.0.0.1", ws_port=0, tcp_port=0, log_level="warn")
    with pytest.raises(TypeError, match="PyStrandsClient subclass.*AsyncPyStrandsClient.*PyStrands app, not object"):
        broker.start(backend=object())  # type: ignore[arg-type]
    assert not broker.running
    with pytest.raises(TypeError, match="not object"):
        broker.serve(backend=object())  # type: ignore[arg-type]
    assert not broker.running

    async def main():
        with pytest.raises(TypeError, match="asyncio backend"):
            async with broker.serving(SyncBackend(Script())):
                pass
        assert not broker.running

    run(main())


def test_starting_twice_is_a_runtime_error_and_the_first_backend_keeps_working():
    first, second = Script("first:"), Script("second:")
    broker = Broker(host="127.0.0.1", ws_port=0, tcp_port=0, log_level="warn")
    broker.start(backend=SyncBackend(first))
    try:
        with pytest.raises(RuntimeError, match="already"):
            broker.start(backend=AsyncBackend(second))
        with pytest.raises(RuntimeError, match="already"):
            broker.start()

        async def main():
            ws = await websockets.connect(f"ws://127.0.0.1:{broker.ws_port}/r", additional_headers=user("a"), open_timeout=DEADLINE)
            await asyncio.wait_for(ws.recv(), DEADLINE)
            await asyncio.wait_for(ws.recv(), DEADLINE)
            await ws.send("hi")
            assert await asyncio.wait_for(ws.recv(), DEADLINE) == "first:echo: hi"
            await ws.close()

        run(main())
        assert broker.stats()["backends"] == 1 and second.events == []
    finally:
        broker.stop()
    assert not broker.running


# ------------------------------------------------- stop() from handlers and from several threads


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_concurrent_stops_all_wait_for_one_ordered_stop(flavour):
    script = Script()
    broker = Broker(host="127.0.0.1", ws_port=0, tcp_port=0, log_level="warn")
    broker.start(backend=make_backend(flavour, script))

    async def main():
        ws = await websockets.connect(f"ws://127.0.0.1:{broker.ws_port}/r", additional_headers=user("a"), open_timeout=DEADLINE)
        assert await asyncio.wait_for(ws.recv(), DEADLINE) == "welcome a"
        stoppers = [threading.Thread(target=broker.stop, args=(30.0,)) for _ in range(3)]
        for t in stoppers:
            t.start()
        for t in stoppers:
            await asyncio.to_thread(t.join, 20.0)
            assert not t.is_alive(), "a stop() outlived the ordered stop"
        # Every caller returned only after the one ordered stop finished: the client's last
        # event was handled, and the broker is down.
        assert script.of("disconnect") == [("disconnect", "a", "r")]
        assert not broker.running
        await asyncio.wait_for(ws.wait_closed(), DEADLINE)
        assert ws.close_code == 1001

    run(main())


class StopFromHandler(Script):
    """Stops the broker from its handler when a client says "stop"."""

    def __init__(self, broker: Broker, use_async: bool) -> None:
        super().__init__()
        self.broker = broker
        self.use_async = use_async

    def message(self, message: str, ctx: Any) -> list[tuple[Any, ...]]:
        if message == "stop":
            self.events.append(("stopping",))
            if not self.use_async:
                self.broker.stop(30.0)  # returns at once: the stop waits for this handler
                self.events.append(("stop returned",))
            return []
        return super().message(message, ctx)


class AsyncStopper(AsyncPyStrandsClient):
    def __init__(self, broker: Broker, script: Script) -> None:
        super().__init__()
        self.broker, self.script = broker, script

    async def on_message(self, message: str, context: Any) -> None:
        self.script.message(message, context)
        if message == "stop":
            await self.broker.stop_async(30.0)
            self.script.events.append(("stop_async returned",))


@pytest.mark.parametrize("how", ["thread-handler-stop", "async-handler-stop", "async-handler-stop_async"])
def test_serve_stopped_from_one_of_its_own_handlers_ends_without_waiting_out_the_timeout(how):
    broker = Broker(host="127.0.0.1", ws_port=0, tcp_port=0, log_level="warn")
    script = StopFromHandler(broker, use_async=how.endswith("stop_async"))
    if how.startswith("thread"):
        backend: Any = make_backend("thread", script)
    elif how.endswith("stop_async"):
        backend = AsyncStopper(broker, script)
    else:
        backend = make_backend("async", script)
    thread, failure = serve_in_thread(broker, backend, drain_timeout=60.0)

    async def main():
        await wait_for(lambda: broker.running and broker.stats().get("backends") == 1, what="serve() attached the backend")
        ws = await websockets.connect(f"ws://127.0.0.1:{broker.ws_port}/r", additional_headers=user("a"), open_timeout=DEADLINE)
        await ws.send("stop")
        await asyncio.to_thread(thread.join, 20.0)
        assert not thread.is_alive(), "serve() waited out its 60 s drain timeout"
        await asyncio.wait_for(ws.wait_closed(), DEADLINE)
        assert ws.close_code == 1001

    try:
        run(main())
    finally:
        broker.stop()
        thread.join(DEADLINE)
    assert failure == [] and not broker.running
    assert ("stopping",) in script.events
    if how == "thread-handler-stop":
        assert ("stop returned",) in script.events
