"""A browser chat on the PyStrands browser client (docs/browser.md).

    python examples/browser_chat/app.py            # then open http://localhost:8000/?name=ann

One process runs the broker (WebSocket port 8080, backends 8081), its chat backend in-process,
and a small HTTP server (port 8000) for index.html. The page loads the client from the broker
itself (http://<host>:8080/pystrands.js) and speaks the structured protocol `pystrands.1`: every
message comes with its room's offset, presence shows who comes and goes, and a tab that loses
its connection gets exactly the messages it missed when it is back (the room keeps its last 100
messages: `history_size=100`). When it cannot (the gap is longer than that), the page is told
and reloads the room from the backend (`/history`, the backend's `room_history`).

Options: --ws-port, --tcp-port, --http-port, --host (environment: PYSTRANDS_WS_PORT, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

from pystrands import AsyncPyStrandsClient, Broker

ROOM = "lobby"
PAGE = Path(__file__).with_name("index.html")


class Chat(AsyncPyStrandsClient):
    """Everyone is in ROOM under the name given in the URL (`?name=ann`); a message is sent to
    the room as JSON {"from", "text"}; `/who` and `/history` answer the asking tab only."""

    configured = False

    async def on_connection_request(self, request):
        name = parse_qs(request.query).get("name", [""])[0].strip()
        if not name or len(name) > 32:
            return False  # HTTP 403: a real app authenticates here (a cookie, a signed token)
        request.context.user_id = name  # every tab of this user shares it
        request.context.room_id = ROOM
        return True

    async def on_new_connection(self, context):
        if not self.configured:  # presence on for the room (history: the broker's history_size)
            self.configured = True
            await self.room_config(ROOM, presence=True)

    async def on_message(self, message, context):
        if message == "/who":
            members = await self.room_members(ROOM, timeout=2.0)
            users = sorted({m.user_id or m.client_id for m in members})
            await self.send_private_message(context.client_id, json.dumps({"who": users}))
        elif message == "/history":  # the page's "reload the room from the store"
            history = await self.room_history(ROOM, limit=100)
            messages = [{"offset": m.offset, "data": m.data} for m in history.messages]
            await self.send_private_message(
                context.client_id,
                json.dumps({"history": messages, "epoch": history.epoch, "complete": history.complete}),
            )
        elif message.strip():
            await self.send_room_message(ROOM, json.dumps({"from": context.user_id, "text": message[:2000]}))


class PageHandler(BaseHTTPRequestHandler):
    """Serves index.html, pointing it at the broker on the host the browser used."""

    def __init__(self, *args, ws_port: int, **kwargs):
        self.ws_port = ws_port
        super().__init__(*args, **kwargs)

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.split("?")[0] not in ("/", "/index.html"):
            self.send_error(404)
            return
        host = (self.headers.get("Host") or "localhost").rsplit(":", 1)[0]
        body = PAGE.read_text().replace("__BROKER__", f"http://{host}:{self.ws_port}").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=os.environ.get("PYSTRANDS_HOST", "127.0.0.1"))
    parser.add_argument("--ws-port", type=int, default=int(os.environ.get("PYSTRANDS_WS_PORT", "8080")))
    parser.add_argument("--tcp-port", type=int, default=int(os.environ.get("PYSTRANDS_TCP_PORT", "8081")))
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("CHAT_HTTP_PORT", "8000")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    pages = ThreadingHTTPServer((args.host, args.http_port), partial(PageHandler, ws_port=args.ws_port))
    threading.Thread(target=pages.serve_forever, name="pages", daemon=True).start()
    logging.info("chat page on http://%s:%d/?name=ann", args.host, pages.server_port)
    broker = Broker(host=args.host, ws_port=args.ws_port, tcp_port=args.tcp_port, history_size=100)
    try:
        broker.serve(backend=Chat())  # until Ctrl-C / SIGTERM
    finally:
        pages.shutdown()


if __name__ == "__main__":
    main()
