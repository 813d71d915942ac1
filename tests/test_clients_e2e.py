"""Our Python clients through the real broker, with real WebSocket clients: every callback and
send method of the asyncio client, the threading client and the decorator app; per-client order;
a slow handler does not stall other clients; reconnect after a broker restart."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import threading

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from pystrands import AsyncPyStrandsClient, Broker, PyStrands, PyStrandsClient
from pystrands.testing import running_broker, ws_url
from v1peer import DEADLINE, wait_for

# The asyncio client and the decorator app must work on any asyncio event loop; uvloop's
# transports, for one, do not derive from asyncio's classes.
NEEDS_UVLOOP = pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed")
LOOPS = ["asyncio", pytest.param("uvloop", marks=NEEDS_UVLOOP)]


def run(coro, loop="asyncio"):
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(coro, 90))


async def recv(ws, timeout=DEADLINE):
    return await asyncio.wait_for(ws.recv(), timeout)


async def open_ws(broker, path="/", token="secret"):
    headers = {"X-Token": token} if token else {}
    return await websockets.connect(ws_url(broker, path), additional_headers=headers, open_timeout=DEADLINE)


async def rejected_status(broker, path="/", token="wrong"):
    with pytest.raises(InvalidStatus) as info:
        await open_ws(broker, path, token)
    return info.value.response.status_code


class AsyncChat(AsyncPyStrandsClient):
    """Uses every callback and every send method."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.errors: list[str] = []
        self.release_slow = asyncio.Event()

    async def on_connection_request(self, request):
        if request.headers.get("x-token", [None])[0] != "secret":
            return False
        request.context.room_id = request.url.strip("/") or "lobby"
        request.context.metadata = {"token": request.headers.get("X-Token", [None])[0], "q": request.query}
        return True

    async def on_new_connection(self, context):
        await self.send_private_message(context.client_id, f"welcome {context.metadata['token']}")
        await self.send_room_message(context.room_id, f"joined {context.room_id}")

    async def on_message(self, message, context):
        if message == "slow":
            await self.release_slow.wait()
            await self.send_private_message(context.client_id, "slow done")
        elif message == "announce":
            await self.broadcast_message("to everyone")
        elif message.startswith("seq"):
            await self.send_private_message(context.client_id, message)
        else:
            await self.send_room_message(context.room_id, f"{context.room_id}: {message}")

    async def on_disconnect(self, context):
        await self.send_room_message(context.room_id, "left")

    async def on_error(self, error, context):
        self.errors.append(error)


async def exercise(broker, backend_connected, release_slow):
    """The scenario every client flavour must pass."""
    await wait_for(lambda: broker.stats()["backends"] == 1 and backend_connected(), what="backend connected")
    assert await rejected_status(broker, "/red", "wrong") == 403
    a = await open_ws(broker, "/red?x=1")
    assert await recv(a) == "welcome secret"
    assert await recv(a) == "joined red"
    b = await open_ws(broker, "/red")
    assert await recv(b) == "welcome secret"
    assert await recv(a) == "joined red" and await recv(b) == "joined red"
    c = await open_ws(broker, "/blue")
    assert [await recv(c), await recv(c)] == ["welcome secret", "joined blue"]

    await a.send("hello")
    assert await recv(a) == "red: hello" and await recv(b) == "red: hello"
    await c.send("announce")
    for ws in (a, b, c):
        assert await recv(ws) == "to everyone"

    # A slow handler for `a` must not stall `b`: `a`'s handler only finishes after `b` got its
    # answer, so a client that serialized all handlers would never get there.
    await a.send("slow")
    await b.send("meanwhile")
    assert await recv(b) == "red: meanwhile"
    assert await recv(a) == "red: meanwhile"
    release_slow()
    assert await recv(a) == "slow done"

    # Per-client order.
    for i in range(200):
        await c.send(f"seq{i}")
    assert [await recv(c) for _ in range(200)] == [f"seq{i}" for i in range(200)]

    await b.close()
    assert await recv(a) == "left"
    await a.close()
    await c.close()
    await wait_for(lambda: broker.stats()["clients"] == 0)


@pytest.mark.parametrize("loop", LOOPS)
def test_async_client_end_to_end(loop):
    async def main():
        with running_broker() as broker:
            client = AsyncChat(host="127.0.0.1", port=broker.tcp_port)
            task = asyncio.create_task(client.run_forever())
            await exercise(broker, lambda: client.connected, client.release_slow.set)
            await client.disconnect()
            await asyncio.wait_for(task, DEADLINE)
            assert not client.connected
            assert client.errors == []

    run(main(), loop)


class SyncChat(PyStrandsClient):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = threading.Event()

    def on_connection_request(self, request):
        if request.headers.get("X-Token", [None])[0] != "secret":
            request.accepted = False
            return None
        request.context.room_id = request.url.strip("/") or "lobby"
        request.context.metadata = {"token": "secret"}
        return True

    def on_new_connection(self, context):
        self.send_private_message(context.client_id, f"welcome {context.metadata['token']}")
        self.send_room_message(context.room_id, f"joined {context.room_id}")

    def on_message(self, message, context):
        if message == "slow":
            assert self.release.wait(DEADLINE)
            self.send_private_message(context.client_id, "slow done")
        elif message == "announce":
            self.broadcast_message("to everyone")
        elif message.startswith("seq"):
            self.send_private_message(context.client_id, message)
        else:
            self.send_room_message(context.room_id, f"{context.room_id}: {message}")

    def on_disconnect(self, context):
        self.send_room_message(context.room_id, "left")


def test_sync_client_end_to_end():
    async def main():
        with running_broker() as broker:
            client = SyncChat(host="127.0.0.1", port=broker.tcp_port)
            thread = threading.Thread(target=client.run_forever, daemon=True)
            thread.start()
            try:
                await exercise(broker, lambda: client.connected, client.release.set)
            finally:
                client.release.set()
                await asyncio.to_thread(client.disconnect)
                await asyncio.to_thread(thread.join, DEADLINE)
            assert not thread.is_alive(), "run_forever returned after disconnect"

    run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_decorator_app_with_sync_and_async_handlers(loop):
    async def main():
        with running_broker() as broker:
            app = PyStrands(host="127.0.0.1", port=broker.tcp_port)
            release = threading.Event()

            @app.on_connection_request
            def auth(request):
                if request.headers.get("X-Token", [None])[0] != "secret":
                    return False
                request.context.room_id = request.url.strip("/") or "lobby"
                request.context.metadata = {"token": "secret"}
                return True

            @app.on_new_connection
            async def joined(context):
                await app.send_private_message(context.client_id, f"welcome {context.metadata['token']}")
                await app.send_room_message(context.room_id, f"joined {context.room_id}")

            @app.on_message
            def message(message, context):  # sync handler: runs in a worker thread
                if message == "slow":
                    assert release.wait(DEADLINE)
                    app.send_private_message(context.client_id, "slow done")
                elif message == "announce":
                    app.broadcast("to everyone")
                elif message.startswith("seq"):
                    app.send_private_message(context.client_id, message)
                else:
                    app.send_room_message(context.room_id, f"{context.room_id}: {message}")

            @app.on_disconnect
            async def left(context):
                await app.send_room_message(context.room_id, "left")

            task = asyncio.create_task(app.run_async())
            try:
                await exercise(broker, lambda: app.connected, release.set)
            finally:
                release.set()
                await app.disconnect()
                await asyncio.wait_for(task, DEADLINE)

    run(main(), loop)


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.parametrize(("flavour", "loop"), [
    ("async", "asyncio"), ("sync", "asyncio"), pytest.param("async", "uvloop", marks=NEEDS_UVLOOP)])
def test_clients_reconnect_after_a_broker_restart(flavour, loop):
    async def main():
        ws_port, tcp_port = free_ports(2)
        settings = dict(host="127.0.0.1", ws_port=ws_port, tcp_port=tcp_port, log_level="warn")
        broker = Broker(**settings).start()
        if flavour == "async":
            client = AsyncChat(host="127.0.0.1", port=tcp_port, reconnect_delay=0.05, max_reconnect_delay=0.2)
            runner = asyncio.create_task(client.run_forever())
        else:
            client = SyncChat(host="127.0.0.1", port=tcp_port, reconnect_delay=0.05, max_reconnect_delay=0.2)
            runner = asyncio.create_task(asyncio.to_thread(client.run_forever))
        try:
            await wait_for(lambda: client.connected and broker.stats()["backends"] == 1)
            await asyncio.to_thread(broker.stop)
            await wait_for(lambda: not client.connected, what="client saw the broker go")
            broker = Broker(**settings).start()
            await wait_for(lambda: broker.stats()["backends"] == 1, what="client reconnected")
            ws = await open_ws(broker, "/again")
            assert await recv(ws) == "welcome secret"
            await ws.send("hi")
            assert await recv(ws) == "joined again"
            assert await recv(ws) == "again: hi"
            await ws.close()
        finally:
            if flavour == "async":
                await client.disconnect()
            else:
                await asyncio.to_thread(client.disconnect)
            await asyncio.wait_for(runner, DEADLINE)
            broker.stop()

    run(main(), loop)
