"""Benchmark backend for the PyStrands broker, run with our package or with PyStrands 1.0.

Implements the load generator's message convention (benches/loadgen): `e…` is sent back to its
sender, `r…` to room `bench`, `b…` to everyone. Every connection is accepted (in Python, in
`on_connection_request`) into the room named by its path (`/bench` → `bench`, `/pub` → `pub`).
The same source runs on our `AsyncPyStrandsClient` and on the PyStrands 1.0 one from PyPI, so
the comparison isolates the client library. With `PYSTRANDS_BENCH_EXTRA_ROOMS=N` in the
environment every receiver of room `bench` also joins N other rooms (`extra0`…) as it connects, so
a fan-out to `bench` walks members that are in N + 1 rooms (issue 15: multi-room membership must
not slow down fan-out). Usage: python pystrands_backend.py TCP_PORT [asyncio|uvloop]
(the event loop; default asyncio, the standard library's).
"""

import asyncio
import os
import sys

from pystrands import AsyncPyStrandsClient

EXTRA_ROOMS = int(os.environ.get("PYSTRANDS_BENCH_EXTRA_ROOMS", "0"))


class Bench(AsyncPyStrandsClient):
    async def on_connection_request(self, request):
        request.context.room_id = request.url.split("?", 1)[0].strip("/")
        return True

    async def on_new_connection(self, context):
        if EXTRA_ROOMS and context.room_id == "bench":
            for i in range(EXTRA_ROOMS):
                await self.join_room(context.client_id, f"extra{i}")

    async def on_disconnect(self, context):
        pass

    async def on_message(self, message, context):
        kind = message[:1]
        if kind == "r":
            await self.send_room_message("bench", message)
        elif kind == "b":
            await self.broadcast_message(message)
        else:
            await self.send_private_message(context.client_id, message)


if __name__ == "__main__":
    backend = Bench(host="127.0.0.1", port=int(sys.argv[1]))
    loop = sys.argv[2] if len(sys.argv) > 2 else "asyncio"
    if loop == "uvloop":
        import uvloop

        uvloop.run(backend.run_forever())
    elif loop == "asyncio":
        asyncio.run(backend.run_forever())
    else:
        sys.exit(f"unknown event loop {loop!r}: asyncio or uvloop")
