"""A backend speaking protocol v1 (or, after `hello()`, v2) over a plain asyncio socket, for tests
of the broker itself.

Deliberately not our client: broker tests drive the wire protocol directly so they check exactly
what goes over it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import websockets

DEADLINE = 10.0


class RawBackend:
    """One backend connection; `recv()` returns the next non-heartbeat object."""

    def __init__(self) -> None:
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    @classmethod
    async def connect(cls, port: int, limit: int = 64 * 1024 * 1024) -> RawBackend:
        self = cls()
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port, limit=limit)
        return self

    async def recv(self, timeout: float = DEADLINE) -> dict[str, Any]:
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError("broker closed the backend connection")
            obj = json.loads(line)
            if obj.get("action") != "heartbeat":
                return obj

    async def expect(self, action: str, timeout: float = DEADLINE) -> dict[str, Any]:
        obj = await self.recv(timeout)
        assert obj["action"] == action, f"expected {action}, got {obj}"
        return obj

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, action: str, params: dict[str, Any], request_id: str = "t") -> None:
        await self.send_raw(json.dumps({"request_id": request_id, "action": action, "params": params}).encode() + b"\n")

    async def hello(self, secret: str | None = None, version: int = 2) -> dict[str, Any]:
        """Sends the v2 `hello` and returns the broker's answer (its params)."""
        params: dict[str, Any] = {"version": version, "features": ["ack", "heartbeat"]}
        if secret is not None:
            params["secret"] = secret
        await self.send("hello", params, "hello")
        reply = await self.recv()
        assert reply["action"] == "hello", reply
        return reply["params"]

    async def ack(self, seq: int) -> None:
        await self.send("ack", {"seq": seq}, "ack")

    async def answer(self, request: dict[str, Any], accepted: bool = True, **fields: Any) -> None:
        await self.send("response", {"accepted": accepted, **fields}, request["request_id"])

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def wait_for(predicate: Any, timeout: float = DEADLINE, what: str = "condition") -> None:
    """Polls a cheap predicate (e.g. on broker.stats()) until true, failing after `timeout`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def connect_backend(broker: Any, **kwargs: Any) -> RawBackend:
    """Connects a raw backend and waits until the broker has registered it (a TCP connect
    completes before the broker's accept loop and router have seen it)."""
    before = broker.stats()["backends"]
    backend = await RawBackend.connect(broker.tcp_port, **kwargs)
    await wait_for(lambda: broker.stats()["backends"] > before, what="backend registered")
    return backend


async def connect_v2_backend(broker: Any, secret: str | None = None, **kwargs: Any) -> RawBackend:
    """Connects a raw backend that negotiates protocol v2, and waits until it is registered."""
    before = broker.stats()["backends"]
    backend = await RawBackend.connect(broker.tcp_port, **kwargs)
    reply = await backend.hello(secret)
    assert reply["ok"] is True, reply
    await wait_for(lambda: broker.stats()["backends"] > before, what="backend registered")
    return backend


def open_ws(url: str, **kwargs: Any) -> asyncio.Task[Any]:
    """Starts opening a WebSocket client in the background (the handshake waits for a backend)."""

    async def _open() -> Any:
        return await websockets.connect(url, open_timeout=DEADLINE, **kwargs)

    return asyncio.create_task(_open())


async def connect_client(
    ws_port: int,
    backend: RawBackend,
    path: str = "/",
    headers: dict[str, str] | None = None,
    **answer: Any,
) -> tuple[Any, dict[str, Any]]:
    """Opens a WebSocket client, lets `backend` accept it with `answer` fields, and returns the
    client and the `new_connection` event."""
    task = open_ws(f"ws://127.0.0.1:{ws_port}{path}", additional_headers=headers or {})
    req = await backend.expect("connection_request")
    await backend.answer(req, True, **answer)
    ws = await asyncio.wait_for(task, DEADLINE)
    new = await backend.expect("new_connection")
    return ws, new
