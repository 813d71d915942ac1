"""Rooms, users, presence and moderation (protocol feature `rooms`) at the wire level: a raw
backend (tests/v1peer.py) drives the real broker, real WebSocket clients receive. On one broker
and across three nodes over a real redis-server. The Python clients' API over the same features is
tested in tests/test_rooms.py.

Every wait has a deadline; "nothing arrives" is checked by sending a marker on the same path
afterwards and seeing it arrive first.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from procinfo import free_port
from pystrands.testing import running_broker
from v1peer import DEADLINE, RawBackend, connect_client, connect_v2_backend, open_ws, wait_for


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


async def recv(ws: Any, timeout: float = DEADLINE) -> str:
    return await asyncio.wait_for(ws.recv(), timeout)


async def expect_only(ws: Any, want: list[str], marker: str) -> None:
    """`ws` receives exactly `want`, then `marker` (sent last on a path that reaches it)."""
    got = [await recv(ws) for _ in want]
    assert got == want
    assert await recv(ws) == marker


async def rooms_backend(broker: Any) -> RawBackend:
    b = await connect_v2_backend(broker)
    return b


async def next_reply(b: RawBackend, request_id: str) -> dict[str, Any]:
    """The `reply` (or `command_error`) with this request id, acknowledging events on the way."""
    while True:
        obj = await b.recv()
        if "seq" in obj:
            await b.ack(obj["seq"])
        if obj.get("request_id") == request_id and obj["action"] in ("reply", "command_error"):
            return obj


async def members(b: RawBackend, room: str, rid: str, timeout: float = 5.0) -> list[str]:
    await b.send("room_members", {"room_id": room, "timeout": timeout}, rid)
    reply = await next_reply(b, rid)
    assert reply["params"]["complete"] is True, reply
    return sorted(m["client_id"] for m in reply["params"]["members"])


# ---------------------------------------------------------------------------------------------
# One broker
# ---------------------------------------------------------------------------------------------


def test_hello_announces_rooms_and_its_limits():
    async def main() -> None:
        with running_broker(max_rooms_per_client=7, max_id_length=40) as br:
            b = await RawBackend.connect(br.tcp_port)
            params = await b.hello()
            assert "rooms" in params["features"]
            assert params["limits"] == {"max_rooms_per_client": 7, "max_id_length": 40}
            await b.close()

    run(main())


def test_user_ids_many_rooms_exclude_leave_and_user_messages():
    async def main() -> None:
        with running_broker() as br:
            b = await rooms_backend(br)
            a1, new_a1 = await connect_client(br.ws_port, b, client_id="a1", room_id="lobby", user_id="ann")
            a2, new_a2 = await connect_client(br.ws_port, b, client_id="a2", room_id="lobby", user_id="ann")
            c, new_c = await connect_client(br.ws_port, b, client_id="c", room_id="lobby")
            # A context with a user id carries it; one without is exactly the v1 context.
            assert new_a1["params"]["context"] == {"client_id": "a1", "room_id": "lobby", "metadata": {}, "user_id": "ann"}
            assert new_c["params"]["context"] == {"client_id": "c", "room_id": "lobby", "metadata": {}}
            assert br.stats()["users"] == 1

            await b.send("join_room", {"client_id": "a1", "room_id": "game"})
            await b.send("join_room", {"client_id": "c", "room_id": "game"})
            await wait_for(lambda: br.stats()["memberships"] == 5, what="two joins applied")
            await b.send("message_to_room", {"room_id": "game", "message": "g1"})
            await b.send("message_to_room", {"room_id": "lobby", "message": "l1", "exclude": ["a1", "c"]})
            await b.send("message_to_room", {"room_id": "game", "message": "g2", "exclude": "c"})
            await b.send("message_to_user", {"user_id": "ann", "message": "u1"})
            await b.send("leave_room", {"client_id": "a1", "room_id": "game"})
            await b.send("message_to_room", {"room_id": "game", "message": "g3"})
            await b.send("broadcast", {"message": "end"})
            await expect_only(a1, ["g1", "g2", "u1"], "end")
            await expect_only(a2, ["l1", "u1"], "end")
            await expect_only(c, ["g1", "g3"], "end")
            s = br.stats()
            assert (s["rooms_joined"], s["rooms_left"], s["memberships"]) == (2, 1, 4)
            # Its first room can be left too; its context keeps naming it.
            await b.send("leave_room", {"client_id": "a2", "room_id": "lobby"})
            await b.send("message_to_room", {"room_id": "lobby", "message": "l2"})
            await b.send("message_to_connection", {"conn_id": "a2", "message": "end2"})
            assert await recv(a2) == "end2"
            assert await members(b, "lobby", "q1") == ["a1", "c"]
            await a2.send("still here")
            ev = await b.expect("new_message")
            assert ev["params"]["context"]["room_id"] == "lobby"
            for ws in (a1, a2, c):
                await ws.close()
            await b.close()

    run(main())


def test_disconnect_closes_with_the_code_and_reason_after_what_was_queued():
    async def main() -> None:
        with running_broker() as br:
            b = await rooms_backend(br)
            # Many rounds: the close and the last message race inside the connection's task.
            clients = [(await connect_client(br.ws_port, b, client_id=f"k{i}", room_id="r"))[0] for i in range(30)]
            for i in range(30):
                await b.send("message_to_connection", {"conn_id": f"k{i}", "message": f"last words {i}"})
                await b.send("disconnect", {"client_id": f"k{i}", "code": 4403, "reason": "banned ü"})
            for i, ws in enumerate(clients):
                assert await recv(ws) == f"last words {i}"
                with pytest.raises(ConnectionClosed):
                    await recv(ws)
                assert ws.close_code == 4403 and ws.close_reason == "banned ü"
            gone: set[str] = set()
            while len(gone) < 30:  # the backend learns of each as of any close
                ev = await b.recv()
                if "seq" in ev:
                    await b.ack(ev["seq"])
                if ev["action"] == "disconnected":
                    gone.add(ev["params"]["context"]["client_id"])
            assert br.stats()["clients_disconnected"] == 30
            await b.close()

    run(main())


def test_room_members_and_room_count_on_one_broker():
    async def main() -> None:
        with running_broker() as br:
            b = await rooms_backend(br)
            clients = [(await connect_client(br.ws_port, b, client_id=f"m{i}", room_id="r", metadata={"i": i}))[0] for i in range(3)]
            await b.send("room_members", {"room_id": "r"}, "q1")
            reply = await next_reply(b, "q1")
            assert reply["params"]["complete"] is True
            assert sorted(reply["params"]["members"], key=lambda m: m["client_id"]) == [
                {"client_id": f"m{i}", "room_id": "r", "metadata": {"i": i}} for i in range(3)
            ]
            await b.send("room_count", {"room_id": "r"}, "q2")
            assert (await next_reply(b, "q2"))["params"] == {"count": 3}
            await b.send("room_members", {"room_id": "nobody-here"}, "q3")
            assert (await next_reply(b, "q3"))["params"] == {"members": [], "complete": True}
            await b.send("room_count", {"room_id": ""}, "q4")
            assert "room_id is empty" in (await next_reply(b, "q4"))["params"]["error"]
            for ws in clients:
                await ws.close()
            await b.close()

    run(main())


def test_bad_commands_are_refused_with_a_clear_error_and_the_broker_keeps_serving():
    async def main() -> None:
        with running_broker(max_rooms_per_client=3, max_id_length=16) as br:
            b = await rooms_backend(br)
            ws, _ = await connect_client(br.ws_port, b, client_id="x", room_id="r")
            cases = [
                ("join_room", {"client_id": "x", "room_id": "r" * 17}, "room_id is 17 bytes long (max_id_length=16)"),
                ("leave_room", {"client_id": "", "room_id": "r"}, "client_id is empty"),
            ("message_to_user", {"user_id": "u" * 17, "message": "m"}, "user_id is 17 bytes long (max_id_length=16)"),
                ("disconnect", {"client_id": "x", "code": 1001}, "close code 1001 is not allowed"),
                ("disconnect", {"client_id": "x", "code": 3000}, "close code 3000 is not allowed"),
                ("disconnect", {"client_id": "x", "code": 5000}, "close code 5000 is not allowed"),
                ("disconnect", {"client_id": "x", "code": 4000, "reason": "é" * 62}, "reason is 124 bytes"),
            ]
            for i, (action, params, says) in enumerate(cases):
                await b.send(action, params, f"bad{i}")
                err = await next_reply(b, f"bad{i}")
                assert err["action"] == "command_error" and err["params"]["command"] == action
                assert says in err["params"]["error"], err
            await b.send("join_room", {"client_id": "x", "room_id": "r2"})
            await b.send("join_room", {"client_id": "x", "room_id": "r3"})
            await b.send("join_room", {"client_id": "x", "room_id": "r4"}, "full")
            err = await next_reply(b, "full")
            assert "already in 3 rooms (max_rooms_per_client=3)" in err["params"]["error"]
            # Malformed lines are counted as before, without an answer.
            await b.send("disconnect", {"client_id": "x", "code": "soon"})
            await b.send("join_room", {"client_id": "x"})
            # Unknown clients, rooms and users: nothing happens, counted, no error line.
            await b.send("join_room", {"client_id": "ghost", "room_id": "r"})
            await b.send("leave_room", {"client_id": "ghost", "room_id": "r"})
            await b.send("disconnect", {"client_id": "ghost"})
            await b.send("message_to_user", {"user_id": "nobody", "message": "m"})
            await b.send("message_to_room", {"room_id": "r", "message": "alive", "exclude": ["ghost"]})
            assert await recv(ws) == "alive"
            s = br.stats()
            assert s["commands_refused"] == 8 and s["commands_unmatched"] == 4 and s["backend_errors"] >= 2
            assert s["memberships"] == 3 and s["clients"] == 1
            # An accept naming an over-long user id is refused with 503, and counted; a long
            # client id is fine (v1 backends may use one).
            task = open_ws(f"ws://127.0.0.1:{br.ws_port}/r")
            req = await b.expect("connection_request")
            await b.answer(req, True, client_id="y" * 17, user_id="u" * 17)
            with pytest.raises(Exception) as refused:
                await asyncio.wait_for(task, DEADLINE)
            assert "503" in str(refused.value)
            long_id, _ = await connect_client(br.ws_port, b, client_id="z" * 300, room_id="r")
            await b.send("join_room", {"client_id": "z" * 300, "room_id": "r2"})
            await b.send("message_to_room", {"room_id": "r2", "message": "long ids are fine"})
            assert await recv(long_id) == "long ids are fine"
            await long_id.close()
            await ws.close()
            await b.close()

    run(main())


def test_a_flood_of_joins_and_leaves_for_one_client_ends_consistent():
    async def main() -> None:
        with running_broker(max_rooms_per_client=10) as br:
            b = await rooms_backend(br)
            ws, _ = await connect_client(br.ws_port, b, client_id="f", room_id="home")
            lines = []
            for i in range(20_000):
                action = "join_room" if i % 2 == 0 else "leave_room"
                lines.append(json.dumps({"request_id": "", "action": action, "params": {"client_id": "f", "room_id": f"room{i % 40 // 2}"}}))
            await b.send_raw(("\n".join(lines) + "\n").encode())
            await b.send("join_room", {"client_id": "f", "room_id": "last"})
            await b.send("message_to_room", {"room_id": "last", "message": "done"})
            assert await recv(ws, timeout=30) == "done"
            s = br.stats()
            assert s["memberships"] == 2 and s["rooms"] == 2  # home + last
            assert s["rooms_joined"] == 10_001 and s["rooms_left"] == 10_000
            await ws.close()
            await b.close()

    run(main())


# ---------------------------------------------------------------------------------------------
# A cluster of three nodes over a real Redis
# ---------------------------------------------------------------------------------------------

try:
    from test_cluster import RedisServer, brokers, redis  # noqa: F401  (the fixture)
except pytest.skip.Exception:  # no redis-server outside CI: the cluster tests are skipped
    RedisServer = None  # type: ignore[assignment,misc]

needs_redis = pytest.mark.skipif(RedisServer is None, reason="redis-server is not installed")


@needs_redis
def test_every_command_reaches_the_node_that_holds_the_client(redis):
    async def main() -> None:
        with brokers(redis.url, 3) as (na, nb, nc):
            await wait_for(lambda: all(n.stats()["cluster_nodes"] == 3 for n in (na, nb, nc)), timeout=20, what="three nodes see each other")
            ba, bb, bc = [await rooms_backend(n) for n in (na, nb, nc)]
            x, _ = await connect_client(nb.ws_port, bb, client_id="x", room_id="lobby", user_id="u")
            y, _ = await connect_client(nc.ws_port, bc, client_id="y", room_id="lobby", user_id="u")
            z, _ = await connect_client(nc.ws_port, bc, client_id="z", room_id="lobby")
            # The backend on node A acts on clients it never saw.
            await ba.send("join_room", {"client_id": "x", "room_id": "game"})
            await ba.send("join_room", {"client_id": "z", "room_id": "game"})
            await wait_for(lambda: nb.stats()["memberships"] == 2 and nc.stats()["memberships"] == 3, what="joins applied on B and C")
            assert await members(ba, "game", "g1") == ["x", "z"]
            assert await members(bb, "lobby", "l1") == ["x", "y", "z"]
            await ba.send("message_to_room", {"room_id": "game", "message": "g"})
            await ba.send("message_to_room", {"room_id": "lobby", "message": "l", "exclude": ["y", "z"]})
            await ba.send("message_to_user", {"user_id": "u", "message": "tabs"})
            await ba.send("leave_room", {"client_id": "z", "room_id": "game"})
            await wait_for(lambda: nc.stats()["memberships"] == 2, what="leave applied on C")
            await ba.send("message_to_room", {"room_id": "game", "message": "g2"})
            await ba.send("broadcast", {"message": "end"})
            await expect_only(x, ["g", "l", "tabs", "g2"], "end")
            await expect_only(y, ["tabs"], "end")
            await expect_only(z, ["g"], "end")
            await wait_for(lambda: na.room_members().get("lobby") == 3, what="presence reports of B and C")
            await ba.send("room_count", {"room_id": "lobby"}, "c2")
            assert (await next_reply(ba, "c2"))["params"] == {"count": 3}
            # A kick from node A closes the client on node C with its code and reason.
            await ba.send("disconnect", {"client_id": "y", "code": 4001 + 99, "reason": "moderated"})
            with pytest.raises(ConnectionClosed):
                await recv(y)
            assert (y.close_code, y.close_reason) == (4100, "moderated")
            await wait_for(lambda: nc.stats()["clients_disconnected"] == 1, what="counted where it happened")
            assert await members(ba, "lobby", "l2") == ["x", "z"]
            for ws in (x, z):
                await ws.close()
            for b in (ba, bb, bc):
                await b.close()

    run(main())


@needs_redis
def test_a_killed_nodes_members_leave_room_members_within_the_bound(redis):
    ws_port, tcp_port = free_port(), free_port()
    env = {**os.environ, "PYSTRANDS_REDIS_URL": redis.url, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pystrands", "server", "--host", "127.0.0.1", "--ws-port", str(ws_port), "--tcp-port", str(tcp_port), "--cluster-node-id", "doomed"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    async def main() -> None:
        with brokers(redis.url, 2) as (na, nb):
            try:
                await wait_for(lambda: na.stats()["cluster_nodes"] == 3, timeout=20, what="subprocess node joined")
                doomed = await RawBackend.connect(tcp_port)
                await doomed.hello()
                gone, _ = await connect_client(ws_port, doomed, client_id="gone", room_id="r")
                ba, bb = await rooms_backend(na), await rooms_backend(nb)
                stay, _ = await connect_client(nb.ws_port, bb, client_id="stay", room_id="r")
                assert await members(ba, "r", "q1") == ["gone", "stay"]
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=DEADLINE)
                loop = asyncio.get_running_loop()
                killed_at = loop.time()
                # Until its presence expires a query may wait for it and say it is missing; its
                # member is never listed again, and within 10 s the answer is complete.
                n = 0
                while True:
                    n += 1
                    await ba.send("room_members", {"room_id": "r", "timeout": 1.0}, f"p{n}")
                    reply = await next_reply(ba, f"p{n}")
                    ids = sorted(m["client_id"] for m in reply["params"]["members"])
                    assert ids == ["stay"], reply
                    if reply["params"]["complete"]:
                        break
                    assert reply["params"]["missing"] == ["doomed"]
                    assert loop.time() - killed_at < 10, "a dead node was still waited for after 10 s"
                assert loop.time() - killed_at < 10
                await stay.close()
                await gone.close()
                await ba.close()
                await bb.close()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    run(main())


@needs_redis
def test_membership_survives_a_redis_restart(redis):
    async def main() -> None:
        with brokers(redis.url, 2) as (na, nb):
            await wait_for(lambda: na.stats()["cluster_nodes"] == 2, timeout=20, what="two nodes")
            ba, bb = await rooms_backend(na), await rooms_backend(nb)
            x, _ = await connect_client(nb.ws_port, bb, client_id="x", room_id="r")
            await ba.send("join_room", {"client_id": "x", "room_id": "extra"})
            await wait_for(lambda: nb.stats()["memberships"] == 2, what="join applied")
            redis.kill()
            # Without Redis a node does not know which nodes are live: it answers with its own
            # members and says the answer is incomplete (never a confident partial list).
            n = 0
            while True:
                n += 1
                await ba.send("room_members", {"room_id": "extra", "timeout": 1.0}, f"down{n}")
                reply = await next_reply(ba, f"down{n}")
                params = reply["params"]
                if not params["complete"] and params["missing"][0].startswith("unknown"):
                    assert params["members"] == []
                    break
                # Until the view expires B is still taken for live: it is waited for, in vain.
                assert not params["complete"] and params["missing"] == ["node-b"] and params["members"] == [], params
                assert n < 50, "the presence view never went stale"
                await asyncio.sleep(0.2)  # the view expires 3 s after the last report
            redis.start()
            # Both nodes reconnect; the next presence round rebuilds the reports from the hubs.
            await wait_for(lambda: na.stats()["cluster_connected"] and nb.stats()["cluster_connected"], timeout=20, what="reconnected")
            await wait_for(lambda: na.room_members().get("extra") == 1, timeout=20, what="presence rebuilt")
            assert await members(ba, "extra", "q1") == ["x"]
            await ba.send("message_to_room", {"room_id": "extra", "message": "back"})
            assert await recv(x) == "back"
            await x.close()
            await ba.close()
            await bb.close()

    run(main())
