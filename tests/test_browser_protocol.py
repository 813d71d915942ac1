"""The browser protocol `pystrands.1` on the wire (issue 17), with real WebSocket clients (the
`websockets` package speaking the JSON envelopes by hand) against the real broker, real TCP
backends, and for the cluster a real redis-server: negotiation, envelopes, history with offsets
and epochs, recovery after a reconnect (exact, repeatable, and refused when it cannot be exact),
rooms restored from the session, presence, backends' `room_config` / `room_history`, and hostile
input on the new protocol closing with 4400 while the broker keeps serving.

Every wait has a deadline; nothing sleeps for correctness.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pystrands.testing import running_broker
from test_cluster import brokers, redis  # noqa: F401  (the fixture: a real redis-server per test)
from v1peer import DEADLINE, RawBackend, connect_v2_backend, open_ws, wait_for

PROTO = "pystrands.1"


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


async def open_structured(
    port: int,
    backend: RawBackend,
    path: str = "/",
    *,
    connect: dict[str, Any] | None = None,
    by_query: bool = False,
    **answer: Any,
) -> tuple[Any, dict[str, Any]]:
    """Opens a `pystrands.1` client, lets `backend` accept it, sends `connect` and returns the
    client and its `welcome`."""
    if by_query:
        task = open_ws(f"ws://127.0.0.1:{port}{path}?proto={PROTO}")
    else:
        task = open_ws(f"ws://127.0.0.1:{port}{path}", subprotocols=[PROTO])
    req = await expect_skipping(backend, "connection_request")
    await backend.answer(req, True, **answer)
    ws = await asyncio.wait_for(task, DEADLINE)
    await expect_skipping(backend, "new_connection")
    await ws.send(json.dumps({"t": "connect", **(connect or {})}))
    welcome = await frame(ws)
    assert welcome["t"] == "welcome", welcome
    return ws, welcome


async def expect_skipping(backend: RawBackend, action: str) -> dict[str, Any]:
    """The next event `action`, skipping others (say an earlier client's `disconnected`)."""
    while True:
        ev = await backend.recv()
        if ev["action"] == action:
            return ev


async def frame(ws: Any, timeout: float = DEADLINE) -> dict[str, Any]:
    """The next frame that is not a ping."""
    while True:
        f = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if f.get("t") != "ping":
            return dict(f)


async def frames(ws: Any, n: int) -> list[dict[str, Any]]:
    return [await frame(ws) for _ in range(n)]


async def closed_with(ws: Any) -> int:
    """Waits for the broker to close `ws`; returns the close code."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), DEADLINE)
    except ConnectionClosed as e:
        assert e.rcvd is not None, "closed without a close frame"
        return int(e.rcvd.code)


async def to_room(backend: RawBackend, room: str, *messages: str) -> None:
    for m in messages:
        await backend.send("message_to_room", {"room_id": room, "message": m})


def resume_from(welcome_or_session: str, positions: dict[str, tuple[int, str]]) -> dict[str, Any]:
    return {
        "session": welcome_or_session,
        "positions": {r: {"offset": o, "epoch": e} for r, (o, e) in positions.items()},
    }


def test_raw_clients_keep_plain_text_and_structured_ones_get_envelopes_with_positions():
    async def main() -> None:
        with running_broker(history_size=100) as br:
            backend = await connect_v2_backend(br)
            task = open_ws(f"ws://127.0.0.1:{br.ws_port}/")
            await backend.answer(await backend.expect("connection_request"), True, client_id="raw", room_id="lobby")
            raw = await asyncio.wait_for(task, DEADLINE)
            await backend.expect("new_connection")
            assert raw.subprotocol is None
            ws, welcome = await open_structured(br.ws_port, backend, client_id="s1", room_id="lobby", user_id="ann")
            assert ws.subprotocol == PROTO, "the broker echoes the subprotocol it accepted"
            assert welcome["client"] == "s1" and welcome["user"] == "ann" and welcome["session"]
            assert welcome["ping"] == 30 and "recovered" not in welcome
            start = welcome["rooms"]["lobby"]
            assert start["offset"] == 0 and isinstance(start["epoch"], str) and start["epoch"]
            await to_room(backend, "lobby", "one", 'two "quoted"\n')
            assert await asyncio.wait_for(raw.recv(), DEADLINE) == "one"
            assert await asyncio.wait_for(raw.recv(), DEADLINE) == 'two "quoted"\n'
            got = await frames(ws, 2)
            assert got == [
                {"t": "msg", "room": "lobby", "offset": 1, "epoch": start["epoch"], "data": "one"},
                {"t": "msg", "room": "lobby", "offset": 2, "epoch": start["epoch"], "data": 'two "quoted"\n'},
            ]
            await backend.send("message_to_connection", {"conn_id": "s1", "message": "direct"})
            await backend.send("message_to_user", {"user_id": "ann", "message": "to ann"}, request_id="u")
            await backend.send("broadcast", {"message": "everyone"})
            assert await frames(ws, 3) == [
                {"t": "msg", "data": "direct"},
                {"t": "msg", "user": "ann", "data": "to ann"},
                {"t": "msg", "all": True, "data": "everyone"},
            ]
            # A client message reaches the backend as the envelope's data.
            await ws.send(json.dumps({"t": "msg", "data": "hello backend"}))
            ev = await backend.expect("new_message")
            assert ev["params"]["message"] == "hello backend"
            await ws.close()
            await raw.close()
            await backend.close()

    run(main())


def test_the_query_fallback_and_a_foreign_proto_refused_before_the_upgrade():
    async def main() -> None:
        with running_broker() as br:
            backend = await connect_v2_backend(br)
            ws, welcome = await open_structured(br.ws_port, backend, by_query=True, client_id="q", room_id="r")
            assert ws.subprotocol is None and welcome["client"] == "q" and welcome["rooms"] == {"r": {}}
            with pytest.raises(InvalidStatus) as e:
                await websockets.connect(f"ws://127.0.0.1:{br.ws_port}/?proto=socket.io", open_timeout=DEADLINE)
            assert e.value.response.status_code == 400
            assert br.stats()["handshakes_failed"] == 1
            with pytest.raises(asyncio.TimeoutError):
                await backend.recv(timeout=0.3)  # the backend was never asked
            await ws.close()
            await backend.close()

    run(main())


def test_recovery_replays_exactly_what_was_missed_every_time():
    async def main() -> None:
        with running_broker(history_size=100) as br:
            backend = await connect_v2_backend(br)
            ws, welcome = await open_structured(br.ws_port, backend, client_id="c", room_id="news")
            epoch = welcome["rooms"]["news"]["epoch"]
            session = welcome["session"]
            n = 0
            last = 0
            for round_ in range(3):
                await to_room(backend, "news", *[f"live{round_}-{i}" for i in range(3)])
                got = await frames(ws, 3)
                assert [g["offset"] for g in got] == [last + 1, last + 2, last + 3]
                last = got[-1]["offset"]
                await ws.close()
                await backend.expect("disconnected")
                missed = [f"missed{round_}-{i}" for i in range(5)]
                await to_room(backend, "news", *missed)
                # The history holds them before the client is back.
                await wait_for(lambda: br.stats()["history_appended"] >= last + 5, what="appended")
                ws, welcome = await open_structured(
                    br.ws_port, backend, client_id="c", room_id="news", connect=resume_from(session, {"news": (last, epoch)})
                )
                assert welcome["recovered"] is True
                assert welcome["rooms"]["news"] == {"offset": last + 5, "epoch": epoch, "recovered": True}
                replay = await frames(ws, 5)
                assert [r["data"] for r in replay] == missed
                assert [r["offset"] for r in replay] == list(range(last + 1, last + 6))
                last += 5
                session = welcome["session"]
                n += 1
            s = br.stats()
            assert s["recoveries"] == 3 and s["messages_replayed"] == 15 and s["recoveries_failed"] == 0
            await ws.close()
            await backend.close()

    run(main())


def test_live_messages_during_recovery_are_neither_lost_nor_duplicated():
    """A backend publishes without pause while the client drops and comes back: the client ends
    with every number exactly once, in order (replay, then held-back live frames)."""

    async def main() -> None:
        with running_broker(history_size=10_000) as br:
            backend = await connect_v2_backend(br)
            ws, welcome = await open_structured(br.ws_port, backend, client_id="c", room_id="feed")
            epoch, session = welcome["rooms"]["feed"]["epoch"], welcome["session"]
            stop = asyncio.Event()
            sent = 0

            async def publish() -> None:
                nonlocal sent
                while not stop.is_set():
                    sent += 1
                    await to_room(backend, "feed", str(sent))
                    await asyncio.sleep(0.001)  # ~1,000 a second: a reconnect misses tens

            pub = asyncio.create_task(publish())
            seen: list[int] = []
            for _ in range(4):
                for _ in range(30):
                    f = await frame(ws)
                    seen.append(int(f["data"]))
                    assert f["offset"] == len(seen)
                await ws.close()
                ws, welcome = await open_structured(
                    br.ws_port, backend, client_id="c", room_id="feed", connect=resume_from(session, {"feed": (len(seen), epoch)})
                )
                assert welcome["recovered"] is True, (json.dumps(welcome), len(seen), {k: v for k, v in br.stats().items() if v})
                session = welcome["session"]
            stop.set()
            await pub
            while len(seen) < sent:
                f = await frame(ws)
                seen.append(int(f["data"]))
                assert f["offset"] == len(seen)
            assert seen == list(range(1, sent + 1))
            await ws.close()
            await backend.close()

    run(main())


def test_messages_sent_between_the_upgrade_and_connect_come_once_after_the_replay():
    """The deterministic form of the race above: messages published while the client is
    connected but has not sent `connect` are both queued for it and in the history the broker
    then reads. Each must arrive exactly once, after the replay, in order."""

    async def main() -> None:
        with running_broker(history_size=100) as br:
            backend = await connect_v2_backend(br)
            ws, welcome = await open_structured(br.ws_port, backend, client_id="c", room_id="r")
            epoch, session = welcome["rooms"]["r"]["epoch"], welcome["session"]
            await to_room(backend, "r", "a", "b")
            assert [f["offset"] for f in await frames(ws, 2)] == [1, 2]
            await ws.close()
            await to_room(backend, "r", "c", "d")  # missed while away
            for fresh_connect in (False, True):
                task = open_ws(f"ws://127.0.0.1:{br.ws_port}/", subprotocols=[PROTO])
                await backend.answer(await expect_skipping(backend, "connection_request"), True, client_id="c", room_id="r")
                ws = await asyncio.wait_for(task, DEADLINE)
                await expect_skipping(backend, "new_connection")
                before = br.stats()["history_appended"]
                await to_room(backend, "r", "e", "f", "g")  # queued for it AND in the history
                await wait_for(lambda: br.stats()["history_appended"] == before + 3, what="appended")
                if fresh_connect:
                    # No position at all: the first room's position at the join is used.
                    await ws.send(json.dumps({"t": "connect"}))
                    welcome = await frame(ws)
                    assert "recovered" not in welcome and welcome["rooms"]["r"]["offset"] == 11
                    got = await frames(ws, 3)
                    assert [(g["data"], g["offset"]) for g in got] == [("e", 9), ("f", 10), ("g", 11)]
                else:
                    await ws.send(json.dumps({"t": "connect", **resume_from(session, {"r": (2, epoch)})}))
                    welcome = await frame(ws)
                    assert welcome["recovered"] is True and welcome["rooms"]["r"]["offset"] == 7
                    got = await frames(ws, 5)
                    assert [(g["data"], g["offset"]) for g in got] == [("c", 3), ("d", 4), ("e", 5), ("f", 6), ("g", 7)]
                await to_room(backend, "r", "live")
                f = await frame(ws)
                assert f["data"] == "live", f"a duplicate came before it: {f}"
                await ws.close()
            await backend.close()

    run(main())


def test_a_gap_beyond_the_history_or_a_new_epoch_is_not_recovered():
    async def main() -> None:
        with running_broker(history_size=3) as br:
            backend = await connect_v2_backend(br)
            ws, welcome = await open_structured(br.ws_port, backend, client_id="c", room_id="r")
            epoch, session = welcome["rooms"]["r"]["epoch"], welcome["session"]
            await ws.close()
            await to_room(backend, "r", *"abcde")
            await wait_for(lambda: br.stats()["history_appended"] == 5, what="appended")
            ws, welcome = await open_structured(
                br.ws_port, backend, client_id="c", room_id="r", connect=resume_from(session, {"r": (0, epoch)})
            )
            assert welcome["recovered"] is False
            assert welcome["rooms"]["r"] == {"offset": 5, "epoch": epoch, "recovered": False}
            await to_room(backend, "r", "live")
            f = await frame(ws)
            assert (f["data"], f["offset"]) == ("live", 6), "nothing replayed; live goes on"
            await ws.close()
            # Another epoch (say the broker restarted): not recovered, whatever the offset.
            ws, welcome = await open_structured(
                br.ws_port, backend, client_id="c", room_id="r", connect=resume_from(session, {"r": (6, "old-epoch")})
            )
            assert welcome["recovered"] is False and welcome["rooms"]["r"]["epoch"] == epoch
            # A room the connection is not in is not recovered (no reading others' history).
            await ws.close()
            ws, welcome = await open_structured(
                br.ws_port, backend, client_id="c", room_id="r", connect={"positions": {"secret": {"offset": 0, "epoch": epoch}}}
            )
            assert welcome["recovered"] is False and welcome["rooms"]["secret"] == {"recovered": False}
            assert br.stats()["recoveries_failed"] == 3
            await ws.close()
            await backend.close()

    run(main())


def test_the_session_restores_rooms_and_refuses_another_user_or_a_forged_token():
    async def main() -> None:
        with running_broker(history_size=10) as br:
            backend = await connect_v2_backend(br)
            ws, welcome = await open_structured(br.ws_port, backend, client_id="c", room_id="home", user_id="ann")
            await backend.send("join_room", {"client_id": "c", "room_id": "extra"}, request_id="j")
            joined = await frame(ws)
            assert joined["t"] == "join" and joined["room"] == "extra" and joined["offset"] == 0 and joined["session"]
            await to_room(backend, "extra", "x1")
            assert (await frame(ws))["offset"] == 1
            await ws.close()
            await backend.expect("disconnected")
            await to_room(backend, "extra", "x2")
            await wait_for(lambda: br.stats()["history_appended"] == 2, what="appended")
            ws, welcome = await open_structured(
                br.ws_port,
                backend,
                client_id="c2",
                room_id="home",
                user_id="ann",
                connect=resume_from(joined["session"], {"extra": (1, joined["epoch"])}),
            )
            assert set(welcome["rooms"]) == {"home", "extra"} and welcome["recovered"] is True
            assert (await frame(ws))["data"] == "x2"
            await to_room(backend, "extra", "x3")
            assert (await frame(ws))["data"] == "x3", "the restored room is a real membership"
            await ws.close()
            # Another user cannot take the session's rooms.
            ws, welcome = await open_structured(
                br.ws_port, backend, client_id="c3", room_id="home", user_id="bob", connect={"session": joined["session"]}
            )
            assert welcome["session_error"] == "user mismatch" and set(welcome["rooms"]) == {"home"}
            await ws.close()
            forged = joined["session"][:-2] + ("AA" if not joined["session"].endswith("AA") else "BB")
            ws, welcome = await open_structured(
                br.ws_port, backend, client_id="c4", room_id="home", user_id="ann", connect={"session": forged}
            )
            assert welcome["session_error"] == "invalid" and set(welcome["rooms"]) == {"home"}
            await ws.close()
            await backend.close()

    run(main())


def test_presence_events_per_connection_and_per_user_and_suppressed_in_big_rooms():
    async def main() -> None:
        with running_broker(presence_max_members=3) as br:
            backend = await connect_v2_backend(br)
            await backend.send("room_config", {"room_id": "chat", "presence": True}, request_id="cfg")
            watcher, _ = await open_structured(br.ws_port, backend, client_id="w", room_id="chat", user_id="wendy")
            a1, _ = await open_structured(br.ws_port, backend, client_id="a1", room_id="chat", user_id="ann")
            assert await frame(watcher) == {"t": "presence", "room": "chat", "event": "join", "client": "a1", "user": "ann", "user_first": True}
            a2, _ = await open_structured(br.ws_port, backend, client_id="a2", room_id="lobby", user_id="ann")
            await backend.send("join_room", {"client_id": "a2", "room_id": "chat"}, request_id="j")
            assert await frame(watcher) == {"t": "presence", "room": "chat", "event": "join", "client": "a2", "user": "ann", "user_first": False}
            assert (await frame(a1))["client"] == "a2", "every member hears it, not only the first"
            await a1.close()
            assert await frame(watcher) == {"t": "presence", "room": "chat", "event": "leave", "client": "a1", "user": "ann", "user_last": False}
            await backend.send("leave_room", {"client_id": "a2", "room_id": "chat"}, request_id="l")
            assert await frame(watcher) == {"t": "presence", "room": "chat", "event": "leave", "client": "a2", "user": "ann", "user_last": True}
            # A room without presence on says nothing; a room over presence_max_members neither.
            others = [(await open_structured(br.ws_port, backend, client_id=f"o{i}", room_id="chat"))[0] for i in range(3)]
            await wait_for(lambda: br.stats()["presence_suppressed"] >= 1, what="suppressed")
            for ws in [watcher, a2, *others]:
                await ws.close()
            await backend.close()

    run(main())


def test_backends_configure_rooms_and_read_their_history():
    async def main() -> None:
        with running_broker() as br:
            backend = await connect_v2_backend(br)
            hello_features = br.stats()  # the hello answer was checked by connect_v2_backend
            assert hello_features is not None
            await backend.send("room_config", {"room_id": "h", "history_size": 3, "history_ttl": 60}, request_id="c1")
            await to_room(backend, "h", *"abcd")
            await to_room(backend, "plain", "not kept")
            await backend.send("room_history", {"room_id": "h"}, request_id="q1")
            reply = await backend.expect("reply")
            assert reply["request_id"] == "q1"
            p = reply["params"]
            assert p["offset"] == 4 and p["complete"] is False and p["epoch"]
            assert p["messages"] == [{"offset": 2, "data": "b"}, {"offset": 3, "data": "c"}, {"offset": 4, "data": "d"}]
            await backend.send("room_history", {"room_id": "h", "since": 2, "limit": 1}, request_id="q2")
            p = (await backend.expect("reply"))["params"]
            assert p["messages"] == [{"offset": 4, "data": "d"}] and p["complete"] is False
            await backend.send("room_history", {"room_id": "h", "since": 3}, request_id="q3")
            p = (await backend.expect("reply"))["params"]
            assert p["messages"] == [{"offset": 4, "data": "d"}] and p["complete"] is True
            await backend.send("room_history", {"room_id": "plain"}, request_id="q4")
            assert (await backend.expect("reply"))["params"] == {"epoch": "", "offset": 0, "messages": [], "complete": True}
            for params, why in [
                ({"room_id": "h", "history_size": 100_001}, "history_size must be between 0 and 100000"),
                ({"room_id": "h", "history_ttl": 0}, "history_ttl must be a number of seconds > 0"),
                ({"room_id": "h"}, "give at least one of"),
                ({"room_id": ""}, "room_id is empty"),
            ]:
                await backend.send("room_config", params, request_id="bad")
                err = await backend.expect("command_error")
                assert why in err["params"]["error"], err
            await backend.send("room_history", {"room_id": "h", "limit": 0}, request_id="q5")
            assert "limit must be between" in (await backend.expect("reply"))["params"]["error"]
            await backend.close()

    run(main())


BAD_FIRST_FRAMES = [
    "not json",
    "[1,2]",
    json.dumps({"t": "msg", "data": "before connect"}),
    json.dumps({"t": "connect", "positions": {"r": {"offset": -1, "epoch": "e"}}}),
    json.dumps({"t": "connect", "positions": {"r": {"offset": "7", "epoch": "e"}}}),
    json.dumps({"t": "connect", "positions": [1, 2]}),
    json.dumps({"t": "connect", "session": 12}),
    json.dumps({"t": "hello"}),
    json.dumps({"t": "connect", "positions": {f"r{i}": {"offset": 1, "epoch": "e"} for i in range(5000)}}),
]


def test_hostile_input_on_the_structured_protocol_closes_4400_and_the_broker_keeps_serving():
    async def main() -> None:
        with running_broker(history_size=10, handshake_timeout=1.0) as br:
            backend = await connect_v2_backend(br)

            async def opened(client_id: str) -> Any:
                task = open_ws(f"ws://127.0.0.1:{br.ws_port}/", subprotocols=[PROTO])
                await backend.answer(await expect_skipping(backend, "connection_request"), True, client_id=client_id, room_id="r")
                ws = await asyncio.wait_for(task, DEADLINE)
                await expect_skipping(backend, "new_connection")
                return ws

            for i, bad in enumerate(BAD_FIRST_FRAMES):
                ws = await opened(f"bad{i}")
                await ws.send(bad)
                assert await closed_with(ws) == 4400, bad
                assert "pystrands.1" in (await expect_skipping(backend, "error"))["params"]["error"]
            # A binary frame, a second connect, a bad msg after connect.
            for bad in [b"\x00\x01", json.dumps({"t": "connect"}), json.dumps({"t": "msg", "data": 5})]:
                ws = await opened("late")
                await ws.send(json.dumps({"t": "connect"}))
                assert (await frame(ws))["t"] == "welcome"
                await ws.send(bad)
                assert await closed_with(ws) == 4400, bad
            # A lying offset (beyond the room's last, same epoch).
            ws, welcome = await open_structured(br.ws_port, backend, client_id="liar", room_id="r")
            epoch = welcome["rooms"]["r"]["epoch"]
            await ws.close()
            ws = await opened("liar")
            await ws.send(json.dumps({"t": "connect", "positions": {"r": {"offset": 10**12, "epoch": epoch}}}))
            assert await closed_with(ws) == 4400
            # No connect at all: 4408 after handshake_timeout (the client may reconnect).
            ws = await opened("silent")
            assert await closed_with(ws) == 4408
            assert br.stats()["browser_protocol_errors"] >= len(BAD_FIRST_FRAMES) + 5
            # Still serving, raw and structured.
            ws, welcome = await open_structured(br.ws_port, backend, client_id="fine", room_id="r")
            await to_room(backend, "r", "still here")
            assert (await frame(ws))["data"] == "still here"
            await ws.close()
            await backend.close()

    run(main())


def test_the_browser_client_is_served_as_a_module_a_classic_script_and_typings():
    def get(port: int, path: str) -> tuple[str, str]:
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return head.decode(), body.decode()

    with running_broker(metrics_bind="127.0.0.1:0") as br:
        head, module = get(br.ws_port, "/pystrands.js")
        assert head.startswith("HTTP/1.1 200") and "text/javascript" in head and "Access-Control-Allow-Origin: *" in head
        assert module.rstrip().splitlines()[-1].startswith("export {")
        head, classic = get(br.ws_port, "/pystrands.classic.js")
        assert "export " not in classic and "root.PyStrands = PyStrands;" in classic
        head, types = get(br.ws_port, "/pystrands.d.ts")
        assert head.startswith("HTTP/1.1 200") and "PyStrands" in types
        head, _ = get(br.ws_port, "/metrics")
        assert not head.startswith("HTTP/1.1 200"), "operator routes stay on metrics_bind"


def test_recovery_in_a_three_node_cluster_on_another_node_from_the_redis_streams(redis):  # noqa: F811
    """History lives in Redis: a client that drops from node a and comes back on node c gets
    exactly what a backend on node b sent meanwhile, in order, `recovered: true`; the live
    frames carry the offsets Redis gave; a backend on any node reads the same history."""

    async def main() -> None:
        with brokers(redis.url, 3, history_size=100) as (a, b, c):
            ba, bb, bc = [await connect_v2_backend(x) for x in (a, b, c)]
            ws, welcome = await open_structured(a.ws_port, ba, client_id="c", room_id="room")
            assert welcome["rooms"]["room"] == {}, "no message yet: Redis has no stream for the room"
            session = welcome["session"]
            await to_room(bb, "room", "m1", "m2")
            got = await frames(ws, 2)
            assert [(g["data"], g["offset"]) for g in got] == [("m1", 1), ("m2", 2)]
            epoch = got[0]["epoch"]
            last = 2
            for node, backend in [(c, bc), (b, bb), (a, ba)]:
                await ws.close()
                missed = [f"missed-{node.ws_port}-{i}" for i in range(4)]
                await to_room(bb, "room", *missed)
                await wait_for(lambda: redis.command("XLEN", "pystrands:hist:room").startswith(b":%d" % (last + 4)), what="in Redis")
                ws, welcome = await open_structured(
                    node.ws_port, backend, client_id="c", room_id="room", connect=resume_from(session, {"room": (last, epoch)})
                )
                assert welcome["recovered"] is True, welcome
                assert welcome["rooms"]["room"] == {"offset": last + 4, "epoch": epoch, "recovered": True}
                replay = await frames(ws, 4)
                assert [(r["data"], r["offset"]) for r in replay] == [(m, last + 1 + i) for i, m in enumerate(missed)]
                last += 4
                session = welcome["session"]
                await to_room(ba, "room", "live")
                f = await frame(ws)
                assert (f["data"], f["offset"], f["epoch"]) == ("live", last + 1, epoch), "from node a's backend, via Redis"
                last += 1
            await bc.send("room_history", {"room_id": "room", "since": last - 2}, request_id="h")
            p = (await expect_skipping(bc, "reply"))["params"]
            assert p["epoch"] == epoch and p["offset"] == last and p["complete"] is True
            assert [m["offset"] for m in p["messages"]] == [last - 1, last]
            # Presence and joins across nodes: a backend on node b joins the client (on node a)
            # to a room with presence on; a member on node c hears it.
            await bb.send("room_config", {"room_id": "talk", "presence": True}, request_id="p")
            await wait_for(lambda: b"presence" in redis.command("HGET", "pystrands:roomcfg", "talk"), what="kept")
            listener, _ = await open_structured(c.ws_port, bc, client_id="l", room_id="talk")
            await bb.send("join_room", {"client_id": "c", "room_id": "talk"}, request_id="j")
            joined = await frame(ws)
            assert joined["t"] == "join" and joined["room"] == "talk" and "offset" not in joined
            assert await frame(listener) == {"t": "presence", "room": "talk", "event": "join", "client": "c"}
            await listener.close()
            # room_config spreads to every node (and Redis keeps it).
            await ba.send("room_config", {"room_id": "cfg", "history_size": 5}, request_id="cfg")
            await wait_for(lambda: b"history_size" in redis.command("HGET", "pystrands:roomcfg", "cfg"), what="kept")
            await to_room(bc, "cfg", "x")
            await wait_for(lambda: redis.command("XLEN", "pystrands:hist:cfg").startswith(b":1"), what="node c used it")
            await ws.close()
            for backend in (ba, bb, bc):
                await backend.close()

    run(main())
