"""python-socketio peer: the same semantics as the PyStrands benchmark backend.

Clients connect to `/socket.io/?EIO=4&transport=websocket&room=NAME` and are put in room NAME
(`bench` by default) by the Python `connect` handler (the accept step). Event `m`: data `e…` is
emitted back to the sender, `r…` to room `bench`, `b…` to everyone.

Server: `--server aiohttp` (aiohttp, uvloop) or `--server uvicorn` (ASGI on uvicorn with uvloop,
httptools and the websockets implementation). Usage:
    python socketio_server.py --port PORT [--server aiohttp|uvicorn]
"""

import argparse
import asyncio
from urllib.parse import parse_qs

import socketio

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--server", choices=["aiohttp", "uvicorn"], default="aiohttp")
args = ap.parse_args()

sio = socketio.AsyncServer(async_mode="aiohttp" if args.server == "aiohttp" else "asgi", logger=False, engineio_logger=False)


@sio.event
async def connect(sid, environ, auth=None):
    room = parse_qs(environ.get("QUERY_STRING", "")).get("room", ["bench"])[0]
    await sio.enter_room(sid, room)
    return True


@sio.on("m")
async def on_m(sid, data):
    kind = data[:1]
    if kind == "r":
        await sio.emit("m", data, room="bench")
    elif kind == "b":
        await sio.emit("m", data)
    else:
        await sio.emit("m", data, to=sid)


if args.server == "aiohttp":
    import uvloop
    from aiohttp import web

    app = web.Application()
    sio.attach(app)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None, backlog=4096)
else:
    import uvicorn

    app = socketio.ASGIApp(sio)
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools", ws="websockets",
                log_level="error", access_log=False, backlog=4096, ws_ping_interval=None)
