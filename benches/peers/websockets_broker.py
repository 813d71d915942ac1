"""A hand-written broker on the `websockets` package: what a user would otherwise write.

Same semantics as the PyStrands benchmark backend: a client's room is its path (`/bench` →
`bench`); `e…` is sent back to the sender, `r…` to room `bench` (`websockets.broadcast`), `b…`
to everyone. Plain asyncio event loop, library defaults except keepalive pings.
Usage: python websockets_broker.py --port PORT
"""

import argparse
import asyncio

from websockets import broadcast
from websockets.asyncio.server import serve

rooms: dict[str, set] = {}
everyone: set = set()


async def handler(ws):
    room = ws.request.path.split("?", 1)[0].strip("/")
    members = rooms.setdefault(room, set())
    members.add(ws)
    everyone.add(ws)
    try:
        async for message in ws:
            kind = message[:1]
            if kind == "r":
                broadcast(rooms.get("bench", ()), message)
            elif kind == "b":
                broadcast(everyone, message)
            else:
                await ws.send(message)
    finally:
        members.discard(ws)
        everyone.discard(ws)


async def main(port: int) -> None:
    async with serve(handler, "127.0.0.1", port, ping_interval=None, backlog=4096) as server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    asyncio.run(main(ap.parse_args().port))
