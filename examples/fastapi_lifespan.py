"""FastAPI with the broker in the same process, started and stopped by the app's lifespan, and
browsers authenticated by signed tokens.

    uvicorn examples.fastapi_lifespan:app     # HTTP on 8000, WebSocket clients on 8080

A browser cannot set headers such as ``X-Token`` on a WebSocket, so the page first asks this app
for a short-lived token (``GET /token?user=ann``, where a real app would check its own session)
and connects with it: ``ws://localhost:8080/lobby?token=...``. The broker checks the token itself
(``jwt_secret``) and accepts the connection with no round trip to Python; the token's ``sub``
becomes the connection's ``user_id`` and its ``room`` the first room. The handlers below run
in-process on the app's event loop: they get every message and send to rooms and users.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import jwt  # pip install pyjwt
from fastapi import FastAPI

from pystrands import AsyncPyStrandsClient, Broker

JWT_SECRET = os.environ.get("CHAT_JWT_SECRET") or secrets.token_urlsafe(32)
WS_PORT = int(os.environ.get("CHAT_WS_PORT", "8080"))


class Chat(AsyncPyStrandsClient):
    async def on_message(self, message, context):
        await self.send_room_message(context.room_id, f"{context.user_id}: {message}")


broker = Broker(host="127.0.0.1", ws_port=WS_PORT, tcp_port=0, jwt_secret=JWT_SECRET)
chat = Chat()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with broker.serving(chat):  # starts the broker; stops it (draining) at shutdown
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/token")
async def token(user: str, room: str = "lobby") -> dict[str, str]:
    claims = {"sub": user, "room": room, "exp": int(time.time()) + 300}
    signed = jwt.encode(claims, JWT_SECRET, algorithm="HS256")
    return {"token": signed, "url": f"ws://localhost:{broker.ws_port}/{room}?token={signed}"}


@app.get("/")
async def status() -> dict[str, int]:
    return {"clients": broker.stats()["clients"]}
