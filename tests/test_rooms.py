"""Rooms, users, presence and moderation through our Python clients, end to end: the real broker
(one node, and three nodes over a real redis-server), our clients as backends — the threading
client, the asyncio client and the decorator app with sync and with async handlers — over TCP and
in-process, and real WebSocket clients (pystrands.testing).

The backends obey commands that a controller client sends as messages ("join x game", "who
game", ...), so every API is called from inside a handler, as applications do, and its effect is
observed by the WebSocket clients. "Nothing else arrived" is checked by a marker sent afterwards
on a path that reaches the client. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest

from pystrands import AsyncPyStrandsClient, PyStrands, PyStrandsClient
from pystrands.testing import BrokerHarness

DEADLINE = 10.0
FLAVOURS = ["thread", "async", "app-sync", "app-async"]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


class Record:
    """What the backends saw (shared by the backends of every node of a test)."""

    def __init__(self) -> None:
        self.new: list[dict[str, Any]] = []
        self.left: list[str] = []


def accept(request: Any) -> bool:
    request.context.client_id = request.headers.first("X-Id")
    user = request.headers.first("X-User")
    if user:
        request.context.user_id = user
    request.context.room_id = request.url.strip("/")
    return True


def members_text(room: str, members: list[Any]) -> str:
    ids = ",".join(sorted(m.client_id for m in members))
    users = ",".join(sorted({m.user_id for m in members if m.user_id}))
    return f"who {room}: {ids} users {users}"


def handle_sync(api: Any, message: str, ctx: Any, wait: Any) -> None:
    """The commands, with blocking calls (threading client; the app's plain `def` handlers)."""
    op, *args = message.split(" ")
    reply = None
    if op == "join":
        api.join_room(args[0], args[1])
    elif op == "leave":
        api.leave_room(args[0], args[1])
    elif op == "say":
        api.send_room_message(args[0], args[2], exclude=None if args[1] == "-" else args[1].split(","))
    elif op == "user":
        api.send_user_message(args[0], args[1])
    elif op == "kick":
        api.disconnect_client(args[0], int(args[1]), args[2])
    elif op == "who":
        reply = members_text(args[0], wait(api.room_members(args[0])))
    elif op == "count":
        reply = f"count {args[0]}: {wait(api.room_count(args[0]))}"
    elif op == "badcode":
        try:
            api.disconnect_client(args[0], 1001)
        except ValueError as exc:
            reply = f"refused: {exc}"
    if reply is not None:
        api.send_private_message(ctx.client_id, reply)


async def handle_async(api: Any, message: str, ctx: Any) -> None:
    """The same commands as coroutines (asyncio client; the app's `async def` handlers)."""
    op, *args = message.split(" ")
    reply = None
    if op == "join":
        await api.join_room(args[0], args[1])
    elif op == "leave":
        await api.leave_room(args[0], args[1])
    elif op == "say":
        await api.send_room_message(args[0], args[2], exclude=None if args[1] == "-" else args[1].split(","))
    elif op == "user":
        await api.send_user_message(args[0], args[1])
    elif op == "kick":
        await api.disconnect_client(args[0], int(args[1]), args[2])
    elif op == "who":
        reply = members_text(args[0], await api.room_members(args[0]))
    elif op == "count":
        reply = f"count {args[0]}: {await api.room_count(args[0])}"
    elif op == "badcode":
        try:
            await api.disconnect_client(args[0], 1001)
        except ValueError as exc:
            reply = f"refused: {exc}"
    if reply is not None:
        await api.send_private_message(ctx.client_id, reply)


def make_backend(flavour: str, rec: Record, **kwargs: Any) -> Any:
    if flavour == "thread":

        class Sync(PyStrandsClient):
            def on_connection_request(self, request: Any) -> bool:
                return accept(request)

            def on_new_connection(self, context: Any) -> None:
                rec.new.append(context.to_json())

            def on_message(self, message: str, context: Any) -> None:
                handle_sync(self, message, context, lambda x: x)

            def on_disconnect(self, context: Any) -> None:
                rec.left.append(context.client_id)

        return Sync(**kwargs)
    if flavour == "async":

        class Async(AsyncPyStrandsClient):
            async def on_connection_request(self, request: Any) -> bool:
                return accept(request)

            async def on_new_connection(self, context: Any) -> None:
                rec.new.append(context.to_json())

            async def on_message(self, message: str, context: Any) -> None:
                await handle_async(self, message, context)

            async def on_disconnect(self, context: Any) -> None:
                rec.left.append(context.client_id)

        return Async(**kwargs)
    app = PyStrands(**kwargs)
    app.on_connection_request(accept)
    app.on_new_connection(lambda context: rec.new.append(context.to_json()))
    app.on_disconnect(lambda context: rec.left.append(context.client_id))
    if flavour == "app-sync":

        @app.on_message
        def message(message: str, context: Any) -> None:  # runs in the app's thread pool
            handle_sync(app, message, context, lambda q: q.result())

    else:

        @app.on_message
        async def amessage(message: str, context: Any) -> None:
            await handle_async(app, message, context)

    return app


@asynccontextmanager
async def tcp_backend(flavour: str, rec: Record, port: int) -> Any:
    """Our client of `flavour` connected over TCP, running in a thread of its own."""
    backend = make_backend(flavour, rec, host="127.0.0.1", port=port)
    loop_box: list[asyncio.AbstractEventLoop] = []
    if flavour == "thread":
        target: Any = backend.run_forever
    elif flavour == "async":

        def target() -> None:
            loop = asyncio.new_event_loop()
            loop_box.append(loop)
            loop.run_until_complete(backend.run_forever())
            loop.close()

    else:
        target = backend.run
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield backend
    finally:
        if flavour == "thread":
            await asyncio.to_thread(backend.disconnect)
        elif flavour == "async":
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(backend.disconnect(), loop_box[0]))
        else:
            backend.stop()
        await asyncio.to_thread(thread.join, DEADLINE)
        assert not thread.is_alive()


async def scenario(nodes: list[BrokerHarness], rec: Record) -> None:
    """Every API, with the controller on the first node and the clients on the last two (or
    all on the one node)."""
    first, second, third = nodes[0], nodes[min(1, len(nodes) - 1)], nodes[-1]
    ctl = await first.client("/ctl", headers={"X-Id": "ctl"})
    x = await second.client("/lobby", headers={"X-Id": "x", "X-User": "u"})
    y = await third.client("/lobby", headers={"X-Id": "y", "X-User": "u"})
    z = await third.client("/lobby", headers={"X-Id": "z"})
    await first.wait_until(lambda: len(rec.new) == 4, what="four new connections")
    by_id = {c["client_id"]: c for c in rec.new}
    assert by_id["x"] == {"client_id": "x", "room_id": "lobby", "metadata": {}, "user_id": "u"}
    assert by_id["z"] == {"client_id": "z", "room_id": "lobby", "metadata": {}}, "no user: the 1.0 context"

    async def ask(command: str) -> str:
        await ctl.send(command)
        return await ctl.receive(timeout=DEADLINE)

    for command in ("join x game", "join z game"):
        await ctl.send(command)
    # The query travels after the joins (same backend link, same Redis channel): it sees them.
    assert await ask("who game") == "who game: x,z users u"
    await ctl.send("say game z hello")  # exclude z
    await ctl.send("say lobby x,y lobby-msg")
    await ctl.send("user u tabs")
    await ctl.send("leave z game")
    await ctl.send("say game - g2")
    await ctl.send("say lobby - end")
    assert await x.receive_many(4) == ["hello", "tabs", "g2", "end"]
    assert await y.receive_many(2) == ["tabs", "end"]
    assert await z.receive_many(2) == ["lobby-msg", "end"]

    await ctl.send("kick y 4100 moderated")
    assert await y.wait_closed(timeout=DEADLINE) == 4100
    assert y.close_reason == "moderated"
    await first.wait_until(lambda: "y" in rec.left, what="the backend saw the kicked client leave")
    assert await ask("who lobby") == "who lobby: x,z users u"
    refused = await ask("badcode x")
    assert refused.startswith("refused: code=1001") and "1000 or 4000-4999" in refused
    # room_count comes from presence reports (≤ ~1 s old in a cluster): wait for them to agree.
    await first.wait_until(lambda: first.broker.room_members().get("lobby") == 2, what="presence caught up")
    assert await ask("count lobby") == "count lobby: 2"
    assert await ask("count nowhere") == "count nowhere: 0"
    for ws in (x, z, ctl):
        await ws.close()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_rooms_api_over_tcp_on_one_broker(flavour: str) -> None:
    async def main() -> None:
        rec = Record()
        async with BrokerHarness(None, timeout=DEADLINE) as h:
            async with tcp_backend(flavour, rec, h.tcp_port):
                await h.wait_until(lambda: h.stats()["backends"] == 1, what="backend connected")
                await scenario([h], rec)

    run(main())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_rooms_api_in_process(flavour: str) -> None:
    async def main() -> None:
        rec = Record()
        async with BrokerHarness(make_backend(flavour, rec), timeout=DEADLINE) as h:
            await scenario([h], rec)

    run(main())


try:
    from test_cluster import RedisServer, redis  # noqa: F401  (the fixture)
except pytest.skip.Exception:  # no redis-server outside CI: the cluster tests are skipped
    RedisServer = None  # type: ignore[assignment,misc]


@pytest.mark.skipif(RedisServer is None, reason="redis-server is not installed")
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_rooms_api_across_three_nodes(flavour: str, redis: Any) -> None:
    """Three nodes, each with its backend in-process; the one on the first node acts on clients
    of the other two."""

    async def main() -> None:
        rec = Record()
        async with AsyncExitStack() as stack:
            nodes = [
                await stack.enter_async_context(
                    BrokerHarness(make_backend(flavour, rec), timeout=DEADLINE, cluster_url=redis.url, cluster_node_id=f"node-{i}")
                )
                for i in range(3)
            ]
            await nodes[0].wait_until(lambda: all(n.stats()["cluster_nodes"] == 3 for n in nodes), timeout=20, what="three nodes")
            await scenario(nodes, rec)

    run(main())


# ---------------------------------------------------------------------------------------------
# The documented chat example (docs/broker.md), run as pasted (only the ports changed)
# ---------------------------------------------------------------------------------------------


def chat_example() -> str:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "broker.md").read_text()
    section = text[text.index("## Rooms, users, presence and moderation") :]
    section = section[: section.index("\n## ", 1)]
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", section, re.S) if "class Chat(" in block]
    return code


def test_the_documented_chat_example_works(tmp_path: Any) -> None:
    import signal
    import subprocess
    import sys

    import websockets

    from procinfo import free_port

    code = chat_example()
    assert "ws_port=8080, tcp_port=8081" in code
    ws_port, tcp_port = free_port(), free_port()
    script = tmp_path / "chat.py"
    script.write_text(code.replace("ws_port=8080, tcp_port=8081", f"ws_port={ws_port}, tcp_port={tcp_port}"))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    async def connect(user: str) -> Any:
        end = asyncio.get_running_loop().time() + 3 * DEADLINE  # the program starts a broker first
        while True:
            try:
                return await websockets.connect(f"ws://127.0.0.1:{ws_port}/", additional_headers={"X-User": user}, open_timeout=DEADLINE)
            except (OSError, websockets.InvalidStatus):  # not up yet
                if asyncio.get_running_loop().time() > end:
                    raise
                await asyncio.sleep(0.05)

    async def recv(ws: Any) -> str:
        return await asyncio.wait_for(ws.recv(), DEADLINE)

    async def main() -> None:
        root = await connect("root")
        ann = await connect("ann")
        assert await recv(root) == "ann is here"  # excluded from its own announcement
        ann2 = await connect("ann")  # a second tab of ann
        assert await recv(root) == "ann is here" and await recv(ann) == "ann is here"
        await ann.send("/join game")
        await ann.send("/who game")  # handled after the join (one client's messages keep their order)
        assert await recv(ann) == "game: ann"
        await ann2.send("/count lobby")
        assert await recv(ann2) == "lobby: 3 connection(s)"
        await root.send("/join game")
        assert await recv(ann) == "root joined game"
        await root.send("/who game")
        assert await recv(root) == "game: ann, root"
        await root.send("/dm ann psst")
        assert await recv(ann) == "root (private): psst" and await recv(ann2) == "root (private): psst"
        await ann.send("/join " + "x" * 300)
        assert (await recv(ann)).startswith("bad command: ")
        await ann.send("/kick root")  # not a moderator: a plain lobby message
        assert await recv(root) == "ann: /kick root" and await recv(ann2) == "ann: /kick root"
        await root.send("/say game bye")
        assert await recv(ann) == "root: bye"
        # The moderator kicks every tab of ann (found with room_members).
        await root.send("/kick ann")
        for tab in (ann, ann2):
            with pytest.raises(websockets.ConnectionClosed):
                await recv(tab)
            assert (tab.close_code, tab.close_reason) == (4000, "kicked by a moderator")
        await root.send("/count lobby")
        assert await recv(root) == "lobby: 1 connection(s)"
        await root.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0 and "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
