"""Every code example of the PyStrands documentation (examples/), run unchanged against the real
broker and real WebSocket clients. The examples hard-code the backend port 8081."""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from pystrands.testing import running_broker, ws_url
from v1peer import DEADLINE, wait_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def broker():
    if not port_free(8081):
        pytest.skip("the documented examples need port 8081, which is in use")
    with running_broker(tcp_port=8081) as b:
        yield b


async def recv(ws):
    return await asyncio.wait_for(ws.recv(), DEADLINE)


async def connect(broker, path, token=None):
    headers = {"X-Token": token} if token else {}
    return await websockets.connect(ws_url(broker, path), additional_headers=headers, open_timeout=DEADLINE)


class Example:
    """An example program running in its own process."""

    def __init__(self, name: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(EXAMPLES / name)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            raise AssertionError(f"example did not stop on Ctrl-C:\n{out}")
        return self.proc.returncode, out


@pytest.mark.parametrize("name", ["quickstart_async.py", "quickstart_sync.py"])
def test_quickstart(broker, name):
    async def main():
        ex = Example(name)
        try:
            await wait_for(lambda: broker.stats()["backends"] == 1, what="example connected")
            a = await connect(broker, "/lobby")
            b = await connect(broker, "/lobby")
            other = await connect(broker, "/other")
            await a.send("hi")
            assert await recv(a) == "echo: hi" and await recv(b) == "echo: hi"
            await other.send("x")
            assert await recv(other) == "echo: x"
            for ws in (a, b, other):
                await ws.close()
        finally:
            code, out = ex.stop()
        assert code == 0, out
        assert "Traceback" not in out, out

    asyncio.run(main())


# How each example names a user in join/leave lines, and in chat lines.
CHAT_EXAMPLES = [
    ("chat_sync.py", lambda joined_name: joined_name.removeprefix("User ")),  # "User <id> joined", "<id>: msg"
    ("chat_async.py", lambda joined_name: joined_name),  # "User_<id8> joined", "User_<id8>: msg"
]


@pytest.mark.parametrize("name, speaker", CHAT_EXAMPLES)
def test_complete_chat_example(broker, name, speaker):
    async def main():
        ex = Example(name)
        try:
            await wait_for(lambda: broker.stats()["backends"] == 1, what="example connected")
            with pytest.raises(InvalidStatus) as info:
                await connect(broker, "/general", token="wrong")
            assert info.value.response.status_code == 403
            a = await connect(broker, "/general", token="secret")
            joined = await recv(a)
            assert joined.endswith(" joined")
            a_name = joined.removesuffix(" joined")
            b = await connect(broker, "/general", token="secret")
            b_joined = await recv(a)
            assert b_joined == await recv(b) and b_joined.endswith(" joined")
            b_name = b_joined.removesuffix(" joined")
            lobby = await connect(broker, "/", token="secret")
            assert (await recv(lobby)).endswith(" joined")
            await a.send("hello")
            assert await recv(a) == await recv(b) == f"{speaker(a_name)}: hello"
            await b.close()
            assert await recv(a) == f"{b_name} left"
            await lobby.send("anyone?")
            assert (await recv(lobby)).endswith(": anyone?")
            await a.close()
            await lobby.close()
        finally:
            code, out = ex.stop()
        assert code == 0, out

    asyncio.run(main())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the documented example uses on_event
def test_fastapi_integration(broker):
    from fastapi.testclient import TestClient

    spec = importlib.util.spec_from_file_location("fastapi_example", EXAMPLES / "fastapi_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    with TestClient(module.app) as http:
        asyncio.run(wait_for(lambda: http.get("/").json() == {"status": "running", "connected": True}, what="backend connected"))

        async def chat():
            ws = await connect(broker, "/room1")
            await ws.send("ping")
            assert await recv(ws) == "echo: ping"
            await ws.close()

        asyncio.run(chat())
    assert module.backend.connected is False


def test_fastapi_lifespan_with_the_broker_in_process_and_signed_tokens(monkeypatch):
    """The modern FastAPI example: lifespan starts the broker and its in-process handlers, the
    app hands out signed tokens, and a browser-like client connects with one (no header)."""
    from fastapi.testclient import TestClient

    monkeypatch.setenv("CHAT_WS_PORT", "0")
    spec = importlib.util.spec_from_file_location("fastapi_lifespan_example", EXAMPLES / "fastapi_lifespan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    with TestClient(module.app) as http:
        issued = http.get("/token", params={"user": "ann"}).json()
        url = issued["url"].replace("localhost", "127.0.0.1")

        async def chat():
            async with websockets.connect(url, open_timeout=DEADLINE) as ann:
                await ann.send("hi")
                assert await recv(ann) == "ann: hi"
                assert http.get("/").json() == {"clients": 1}
            forged = url.rsplit(".", 1)[0] + ".AAAA"
            with pytest.raises(InvalidStatus) as refused:
                await websockets.connect(forged, open_timeout=DEADLINE)
            assert refused.value.response.status_code == 401

        asyncio.run(chat())
        stats = module.broker.stats()
        assert stats["token_connections"] == 1 and stats["tokens_refused"] == 1

