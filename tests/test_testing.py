"""pystrands.testing.BrokerHarness: what it promises users testing their own backends — real
broker, in-process backend, test clients whose waits fail with clear messages, refused
handshakes as HTTP statuses, handler exceptions surfaced as test failures."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from pystrands import AsyncPyStrandsClient, PyStrands, PyStrandsClient
from pystrands.testing import BrokerHarness, ClientClosed, HandshakeRefused, ReceiveTimeout


class Echo(PyStrandsClient):
    """The module docstring's example backend."""

    def on_connection_request(self, request: Any) -> bool:
        request.context.room_id = request.url.strip("/")
        return request.headers.get("X-Token", [None])[0] == "secret"

    def on_message(self, message: str, context: Any) -> None:
        if message == "raise":
            raise RuntimeError("handler bug")
        self.send_room_message(context.room_id, f"echo: {message}")


TOKEN = {"X-Token": "secret"}


def test_docstring_example_async():
    async def main():
        async with BrokerHarness(Echo()) as h:
            async with h.client("/room", headers=TOKEN) as ws:
                await ws.send("hi")
                assert await ws.receive() == "echo: hi"
            assert ws.close_code == 1000
            assert await h.connect_status("/room", headers={"X-Token": "wrong"}) == 403
            assert await h.connect_status("/room", headers=TOKEN) == 101

    asyncio.run(main())


def test_sync_api_without_asyncio():
    with BrokerHarness(Echo()) as h:
        with h.sync_client("/room", headers=[("X-Token", "secret")]) as ws:
            ws.send_json({"a": 1})
            assert ws.receive() == 'echo: {"a": 1}'
            ws.ping()
            assert ws.received == ['echo: {"a": 1}']
        assert h.connect_status_sync("/room") == 403
        kept = h.sync_client("/room", headers=TOKEN)
    # Leaving the harness stopped the broker: the open client got 1001.
    assert kept.wait_closed() == 1001 and kept.close_reason


def test_failures_say_what_was_expected():
    async def main():
        async with BrokerHarness(Echo(), timeout=0.3, max_message_size=64, raise_handler_errors=False) as h:
            with pytest.raises(HandshakeRefused) as refused:
                await h.client("/room", headers={"X-Token": "nope"})
            assert refused.value.status == 403 and "HTTP 403" in str(refused.value)

            ws = await h.client("/room", headers=TOKEN)
            await ws.send("one")
            assert await ws.receive() == "echo: one"
            with pytest.raises(ReceiveTimeout, match=r"/room: no message within 0.3s; last messages received: \['echo: one'\]"):
                await ws.receive()
            await ws.send("raise")
            with pytest.raises(ReceiveTimeout, match="handler errors so far: on_message raised .*handler bug"):
                await ws.receive()
            with pytest.raises(ReceiveTimeout, match="only 0 of 2 messages"):
                await ws.receive_many(2)
            await ws.assert_no_message(0.05)

            await ws.send("x" * 100)  # over max_message_size
            assert await ws.wait_closed() == 1009
            with pytest.raises(ClientClosed, match="closed with code 1009") as closed:
                await ws.receive()
            assert closed.value.code == 1009
            assert len(h.handler_errors) == 1

    asyncio.run(main())


def test_wait_closed_keeps_messages_for_receive():
    async def main():
        async with BrokerHarness(Echo()) as h:
            ws = await h.client("/room", headers=TOKEN)
            other = await h.client("/room", headers=TOKEN)
            closing = asyncio.create_task(ws.wait_closed())
            await other.send("for both")
            await h.wait_until(lambda: ws.received == ["echo: for both"], what="read by wait_closed")
            await h.broker.stop_async()
            assert await closing == 1001
            assert await ws.receive() == "echo: for both"  # arrived before the close: kept

    asyncio.run(main())


def test_handler_errors_fail_the_block_unless_expected():
    with pytest.raises(AssertionError, match=r"(?s)1 handler error\(s\).*RuntimeError: handler bug"):
        with BrokerHarness(Echo()) as h:
            with h.sync_client("/room", headers=TOKEN) as ws:
                ws.send("raise")
                ws.send("after")
                assert ws.receive() == "echo: after"  # the handler ran, and raised, before


def test_share_loop_runs_handlers_on_the_tests_loop():
    loops: list[asyncio.AbstractEventLoop] = []

    class Async(AsyncPyStrandsClient):
        async def on_message(self, message: str, context: Any) -> None:
            loops.append(asyncio.get_running_loop())
            await self.send_private_message(context.client_id, message.upper())

    async def main():
        async with BrokerHarness(Async(), share_loop=True) as h:
            async with h.client("/x") as ws:
                await ws.send("hi")
                assert await ws.receive() == "HI"
        assert loops == [asyncio.get_running_loop()]

    asyncio.run(main())
    with pytest.raises(RuntimeError, match="async with"):
        with BrokerHarness(Async(), share_loop=True):
            pass


def test_app_and_bare_broker():
    app = PyStrands()
    seen = threading.Event()

    @app.on_message
    def on_message(message: str, context: Any) -> None:
        seen.set()
        app.broadcast(message)

    async def main():
        async with BrokerHarness(app) as h:
            async with h.client("/a") as a, h.client("/b") as b:
                await a.send("to all")
                assert await a.receive() == await b.receive() == "to all"
        assert seen.is_set()
        async with BrokerHarness() as h:
            assert await h.connect_status() == 503
            await h.wait_until(lambda: h.stats()["connections_unavailable"] == 1, what="503 counted")

    asyncio.run(main())
    with pytest.raises(RuntimeError, match="not running"):
        BrokerHarness().broker  # noqa: B018
