"""PyStrands 1.0 (the clients from PyPI, `pystrands==1.0.0`) as backends of our broker.

They run in their own virtual environment (tests/run_all.sh creates `.venv-v1` and passes its
interpreter in PYSTRANDS_V1_PYTHON), as a separate process, exactly as users run them today."""

from __future__ import annotations

import asyncio
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from pystrands.testing import running_broker, ws_url
from v1peer import DEADLINE, wait_for

V1_PYTHON = os.environ.get("PYSTRANDS_V1_PYTHON", str(Path(__file__).resolve().parent.parent / ".venv-v1/bin/python"))

pytestmark = pytest.mark.skipif(not Path(V1_PYTHON).exists(), reason="PyStrands 1.0 environment missing (run tests/run_all.sh)")

ASYNC_BACKEND = """
import asyncio, sys
from pystrands import AsyncPyStrandsClient

class Backend(AsyncPyStrandsClient):
    async def on_connection_request(self, request):
        token = request.headers.get("X-Token", [None])[0]
        if token != "secret":
            return False
        request.context.room_id = request.url.strip("/") or "lobby"
        request.context.metadata = {"token": token, "n": 1}
        return True

    async def on_new_connection(self, context):
        await self.send_private_message(context.client_id, "welcome %s %s" % (context.metadata["token"], context.metadata["n"]))

    async def on_message(self, message, context):
        if message == "all":
            await self.broadcast_message("everyone")
        else:
            await self.send_room_message(context.room_id, "%s: %s" % (context.room_id, message))

    async def on_disconnect(self, context):
        await self.send_room_message(context.room_id, "left")

asyncio.run(Backend(host="127.0.0.1", port=int(sys.argv[1])).run_forever())
"""

SYNC_BACKEND = """
import sys
from pystrands import PyStrandsClient

class Backend(PyStrandsClient):
    def on_connection_request(self, request):
        token = request.headers.get("X-Token", [None])[0]
        if token != "secret":
            return False
        request.context.room_id = request.url.strip("/") or "lobby"
        request.context.metadata = {"token": token, "n": 1}
        return True

    def on_new_connection(self, context):
        self.send_private_message(context.client_id, "welcome %s %s" % (context.metadata["token"], context.metadata["n"]))

    def on_message(self, message, context):
        if message == "all":
            self.broadcast_message("everyone")
        else:
            self.send_room_message(context.room_id, "%s: %s" % (context.room_id, message))

    def on_disconnect(self, context):
        self.send_room_message(context.room_id, "left")

try:
    Backend(host="127.0.0.1", port=int(sys.argv[1])).run_forever()
except KeyboardInterrupt:
    pass
"""


async def recv(ws):
    return await asyncio.wait_for(ws.recv(), DEADLINE)


@pytest.mark.parametrize("source", [ASYNC_BACKEND, SYNC_BACKEND], ids=["async", "sync"])
def test_pystrands_1_0_backend_works_with_our_broker(source):
    async def main():
        with running_broker() as broker:
            proc = subprocess.Popen([V1_PYTHON, "-c", textwrap.dedent(source), str(broker.tcp_port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                await wait_for(lambda: broker.stats()["backends"] == 1, what="1.0 backend connected")
                with pytest.raises(InvalidStatus) as info:
                    await websockets.connect(ws_url(broker, "/red"), additional_headers={"X-Token": "nope"}, open_timeout=DEADLINE)
                assert info.value.response.status_code == 403
                a = await websockets.connect(ws_url(broker, "/red"), additional_headers={"X-Token": "secret"}, open_timeout=DEADLINE)
                b = await websockets.connect(ws_url(broker, "/red"), additional_headers={"X-Token": "secret"}, open_timeout=DEADLINE)
                assert await recv(a) == "welcome secret 1" and await recv(b) == "welcome secret 1"
                for i in range(20):
                    await a.send(f"m{i}")
                assert [await recv(b) for _ in range(20)] == [f"red: m{i}" for i in range(20)]
                await b.send("all")
                assert [await recv(a) for _ in range(21)][-1] == "everyone"
                await b.close()
                assert await recv(a) == "left"
                await a.close()
                await wait_for(lambda: broker.stats()["clients"] == 0)
                assert broker.stats()["backend_errors"] == 0
            finally:
                proc.terminate()
                out, _ = proc.communicate(timeout=DEADLINE)
            assert "Traceback" not in out, out

    asyncio.run(main())
