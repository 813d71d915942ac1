"""The native broker end to end: real WebSocket clients (websockets) and a v1 backend on a raw
socket. Every wait has a deadline; nothing sleeps for correctness."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pystrands import Broker
from pystrands.testing import running_broker
from v1peer import DEADLINE, connect_backend, connect_client, open_ws, wait_for


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def recv(ws, timeout=DEADLINE):
    return await asyncio.wait_for(ws.recv(), timeout)


async def status_of(port: int, path: str = "/", headers=None) -> int:
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(f"ws://127.0.0.1:{port}{path}", additional_headers=headers or {}, open_timeout=DEADLINE)
    return info.value.response.status_code


def test_accept_sends_request_details_and_exact_metadata():
    async def main():
        with running_broker() as broker:
            backend = await connect_backend(broker)
            task = open_ws(
                f"ws://127.0.0.1:{broker.ws_port}/ws/chat?room=7&x=1",
                additional_headers={"x-token": "secret", "Authorization": "Bearer t"},
            )
            req = await backend.expect("connection_request")
            p = req["params"]
            assert p["url"] == "/ws/chat"
            assert p["query"] == "room=7&x=1"
            assert p["headers"]["X-Token"] == ["secret"]
            assert p["headers"]["Authorization"] == ["Bearer t"]
            assert "Sec-Websocket-Key" in p["headers"]
            assert p["remote_addr"].startswith("127.0.0.1:")
            await backend.answer(req, True, client_id="alice", room_id="chat", metadata={"user": "alice", "n": [1, 2]})
            ws = await task
            new = await backend.expect("new_connection")
            assert new["params"]["context"] == {"client_id": "alice", "room_id": "chat", "metadata": {"user": "alice", "n": [1, 2]}}
            await ws.send("hello")
            msg = await backend.expect("new_message")
            assert msg["params"]["message"] == "hello"
            assert msg["params"]["context"]["metadata"] == {"user": "alice", "n": [1, 2]}
            await ws.close()
            gone = await backend.expect("disconnected")
            assert gone["params"]["context"]["client_id"] == "alice"
            await wait_for(lambda: broker.stats()["clients"] == 0, what="client removed")
            await backend.close()

    run(main())


def test_reject_is_403_before_upgrade_and_no_backend_is_503():
    async def main():
        with running_broker() as broker:
            assert await status_of(broker.ws_port) == 503
            backend = await connect_backend(broker)
            await wait_for(lambda: broker.stats()["backends"] == 1, what="backend registered")

            async def reject():
                req = await backend.expect("connection_request")
                await backend.answer(req, False)

            answering = asyncio.create_task(reject())
            assert await status_of(broker.ws_port, "/private") == 403
            await answering
            # No new_connection or disconnected for a rejected client.
            s = broker.stats()
            assert s["connections_rejected"] == 1 and s["connections_unavailable"] == 1 and s["clients"] == 0
            await backend.close()

    run(main())


def test_silent_backend_gives_503_after_request_timeout():
    async def main():
        with running_broker(request_timeout=0.3) as broker:
            backend = await connect_backend(broker)
            await wait_for(lambda: broker.stats()["backends"] == 1)
            assert await status_of(broker.ws_port) == 503
            req = await backend.expect("connection_request")
            # A late answer is ignored, and the broker keeps working.
            await backend.answer(req, True)
            ws, _ = await connect_client(broker.ws_port, backend)
            await ws.close()
            await backend.close()

    run(main())


def test_plain_http_gets_an_http_error():
    async def main():
        with running_broker() as broker:
            reader, writer = await asyncio.open_connection("127.0.0.1", broker.ws_port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            status = await asyncio.wait_for(reader.readline(), DEADLINE)
            assert status.startswith(b"HTTP/1.1 426"), status
            writer.close()
            assert broker.stats()["handshakes_failed"] == 1

    run(main())


def test_room_private_and_broadcast_reach_exactly_the_right_clients():
    async def main():
        with running_broker() as broker:
            backend = await connect_backend(broker)
            a, _ = await connect_client(broker.ws_port, backend, client_id="a", room_id="red")
            b, _ = await connect_client(broker.ws_port, backend, client_id="b", room_id="red")
            c, _ = await connect_client(broker.ws_port, backend, client_id="c", room_id="blue")
            await backend.send("message_to_room", {"room_id": "red", "message": "to red"})
            await backend.send("message_to_connection", {"conn_id": "c", "message": "to c"})
            await backend.send("message_to_connection", {"conn_id": "nobody", "message": "lost"})
            await backend.send("broadcast", {"message": "to all"})
            assert [await recv(a), await recv(a)] == ["to red", "to all"]
            assert [await recv(b), await recv(b)] == ["to red", "to all"]
            assert [await recv(c), await recv(c)] == ["to c", "to all"]
            s = broker.stats()
            assert s["rooms"] == 2 and s["clients"] == 3 and s["no_route"] == 1
            for ws in (a, b, c):
                await ws.close()
            await backend.close()

    run(main())


def test_events_wait_in_the_queue_and_flush_in_order():
    async def main():
        with running_broker(queue_size=5) as broker:
            first = await connect_backend(broker)
            ws, _ = await connect_client(broker.ws_port, first, client_id="q")
            await first.close()
            await wait_for(lambda: broker.stats()["backends"] == 0, what="backend gone")
            for i in range(8):
                await ws.send(f"m{i}")
            # queued_events reaches 5 before the last 3 arrive: wait for the drops, then check.
            await wait_for(lambda: broker.stats()["queue_dropped"] == 3, what="3 dropped")
            assert broker.stats()["queued_events"] == 5
            second = await connect_backend(broker)
            got = [(await second.expect("new_message"))["params"]["message"] for _ in range(5)]
            assert got == ["m3", "m4", "m5", "m6", "m7"]
            await wait_for(lambda: broker.stats()["queued_events"] == 0)
            # The client now belongs to the new backend.
            await ws.send("after")
            assert (await second.expect("new_message"))["params"]["message"] == "after"
            await ws.close()
            await second.close()

    run(main())


def test_sticky_routing_keeps_each_client_on_one_backend_in_order():
    async def main():
        with running_broker() as broker:
            b1 = await connect_backend(broker)
            b2 = await connect_backend(broker)
            await wait_for(lambda: broker.stats()["backends"] == 2)
            clients = []
            seen: dict[str, list[tuple[int, str]]] = {}

            # Each connection request goes to one backend; answer it from whichever got it.
            pending = {1: asyncio.create_task(b1.recv()), 2: asyncio.create_task(b2.recv())}
            backends = {1: b1, 2: b2}
            for i in range(6):
                task = open_ws(f"ws://127.0.0.1:{broker.ws_port}/")
                done, _ = await asyncio.wait(pending.values(), timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
                assert done
                n = next(k for k, t in pending.items() if t in done)
                req = pending[n].result()
                assert req["action"] == "connection_request"
                await backends[n].answer(req, True, client_id=f"c{i}", room_id="r")
                new = await backends[n].expect("new_connection")
                assert new["params"]["context"]["client_id"] == f"c{i}"
                pending[n] = asyncio.create_task(backends[n].recv())
                clients.append(await task)
            for j in range(30):
                for i, ws in enumerate(clients):
                    await ws.send(f"c{i}:{j}")
            total = 6 * 30
            got = 0
            while got < total:
                done, _ = await asyncio.wait(pending.values(), timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
                assert done, "messages stopped arriving"
                for n, t in list(pending.items()):
                    if t in done:
                        ev = t.result()
                        assert ev["action"] == "new_message"
                        cid, _, j = ev["params"]["message"].partition(":")
                        seen.setdefault(cid, []).append((n, j))
                        got += 1
                        pending[n] = asyncio.create_task(backends[n].recv())
            for cid, events in seen.items():
                assert len({n for n, _ in events}) == 1, f"{cid} went to two backends"
                assert [int(j) for _, j in events] == list(range(30)), f"{cid} out of order"
            assert len({events[0][0] for events in seen.values()}) == 2, "both backends got clients"
            for t in pending.values():
                t.cancel()
            for ws in clients:
                await ws.close()

    run(main())


@pytest.mark.parametrize(
    "bad",
    [
        b"{not json\n",
        b"[1,2,3]\n",
        b'{"action":"launch_missiles","params":{}}\n',
        b'{"action":"message_to_room","params":{"room_id":5,"message":"x"}}\n',
        b'{"action":"broadcast"}\n',
        b'{"action":"broadcast","params":{"message":"\xff\xfe"}}\n',
        b"x" * 5000 + b"\n",
        b'{"request_id":"nope","action":"response","params":{"accepted":true}}\n',
    ],
    ids=["malformed", "array", "unknown-action", "wrong-type", "missing-params", "invalid-utf8", "oversized", "unknown-request"],
)
def test_bad_backend_lines_are_counted_and_the_broker_keeps_serving(bad):
    async def main():
        with running_broker(max_line_size=4096) as broker:
            backend = await connect_backend(broker)
            ws, _ = await connect_client(broker.ws_port, backend, client_id="k", room_id="r")
            await backend.send_raw(bad)
            # Same backend connection still works.
            await backend.send("message_to_room", {"room_id": "r", "message": "still here"})
            assert await recv(ws) == "still here"
            await ws.send("ping")
            assert (await backend.expect("new_message"))["params"]["message"] == "ping"
            if b"nope" not in bad:
                assert broker.stats()["backend_errors"] == 1
            await ws.close()
            await backend.close()

    run(main())


def test_oversized_and_invalid_client_messages_close_only_that_client():
    async def main():
        with running_broker(max_message_size=1024) as broker:
            backend = await connect_backend(broker)
            big, _ = await connect_client(broker.ws_port, backend, client_id="big", room_id="r")
            ok, _ = await connect_client(broker.ws_port, backend, client_id="ok", room_id="r")
            await big.send("x" * 2000)
            with pytest.raises(ConnectionClosed) as info:
                await recv(big)
            assert info.value.rcvd.code == 1009
            err = await backend.expect("error")
            assert "max_message_size" in err["params"]["error"]
            assert (await backend.expect("disconnected"))["params"]["context"]["client_id"] == "big"
            await backend.send("message_to_room", {"room_id": "r", "message": "fine"})
            assert await recv(ok) == "fine"
            await ok.close()
            await backend.close()

    run(main())


def test_same_client_id_replaces_the_older_connection():
    async def main():
        with running_broker() as broker:
            backend = await connect_backend(broker)
            old, _ = await connect_client(broker.ws_port, backend, client_id="dup", room_id="r1")
            task = open_ws(f"ws://127.0.0.1:{broker.ws_port}/")
            req = await backend.expect("connection_request")
            await backend.answer(req, True, client_id="dup", room_id="r2")
            new = await task
            gone = await backend.expect("disconnected")
            assert gone["params"]["context"]["room_id"] == "r1"
            came = await backend.expect("new_connection")
            assert came["params"]["context"]["room_id"] == "r2"
            with pytest.raises(ConnectionClosed) as info:
                await recv(old)
            assert info.value.rcvd.code == 4001
            await backend.send("message_to_connection", {"conn_id": "dup", "message": "for new"})
            assert await recv(new) == "for new"
            await new.close()
            assert (await backend.expect("disconnected"))["params"]["context"]["room_id"] == "r2"
            assert broker.stats()["clients"] == 0

    run(main())


def test_stop_closes_clients_with_1001_and_flushes_their_disconnects():
    async def main():
        broker = Broker(host="127.0.0.1", ws_port=0, tcp_port=0, log_level="warn").start()
        backend = await connect_backend(broker)
        ws, _ = await connect_client(broker.ws_port, backend, client_id="s")
        await asyncio.get_running_loop().run_in_executor(None, broker.stop)
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)
        assert info.value.rcvd.code == 1001
        assert (await backend.expect("disconnected"))["params"]["context"]["client_id"] == "s"
        assert await asyncio.wait_for(backend.reader.read(), DEADLINE) == b""
        assert not broker.running

    run(main())


def test_start_stop_twice_ports_and_settings_errors():
    b = Broker(host="127.0.0.1", ws_port=0, tcp_port=0, log_level="warn")
    for _ in range(2):
        b.start()
        assert b.running and b.ws_port > 0 and b.tcp_port > 0
        with pytest.raises(RuntimeError):
            b.start()
        b.stop()
        b.stop()
        assert not b.running and b.stats() == {}
    with Broker(host="127.0.0.1", ws_port=0, tcp_port=0, log_level="warn") as running:
        taken = running.ws_port
        with pytest.raises(OSError, match=str(taken)):
            Broker(host="127.0.0.1", ws_port=taken, tcp_port=0).start()
    for kwargs, name in [
        ({"ws_port": -1}, "ws_port"),
        ({"queue_size": -5}, "queue_size"),
        ({"request_timeout": 0}, "request_timeout"),
        ({"slow_client_policy": "explode"}, "slow_client_policy"),
        ({"client_queue_size": 0}, "client_queue_size"),
        ({"log_level": "chatty"}, "log_level"),
        ({"allowed_origins": "https://a"}, "allowed_origins"),
        ({"ws_port": "8080"}, "ws_port"),
    ]:
        with pytest.raises(ValueError, match=name):
            Broker(**kwargs)


def test_python_defaults_match_the_core():
    import inspect

    from pystrands import _core

    sig = inspect.signature(Broker)
    core = _core.default_settings()
    for name, param in sig.parameters.items():
        if name in core and param.default is not None:
            want = core[name]
            got = list(param.default) if name == "allowed_origins" else param.default
            assert got == want, f"{name}: Broker default {got!r} != core default {want!r}"
    assert sig.parameters["host"].default == core["ws_host"] == core["tcp_host"]


def test_heartbeats_reach_backends():
    async def main():
        with running_broker(heartbeat_interval=0.05) as broker:
            backend = await connect_backend(broker)
            for _ in range(3):
                line = await asyncio.wait_for(backend.reader.readline(), DEADLINE)
                assert json.loads(line) == {"request_id": "heartbeat", "action": "heartbeat", "params": {}}
            await backend.close()

    run(main())


def test_backend_that_stops_reading_is_declared_dead_and_its_clients_move():
    async def main():
        with running_broker(heartbeat_interval=0.1) as broker:
            # A small reader limit: asyncio stops pulling from the socket once 128 KiB are buffered.
            stuck = await connect_backend(broker, limit=64 * 1024)
            ws, _ = await connect_client(broker.ws_port, stuck, client_id="w", room_id="r")
            healthy = await connect_backend(broker)
            await wait_for(lambda: broker.stats()["backends"] == 2)
            # `stuck` never reads again: its socket buffers fill, the write deadline passes.
            chunk = "x" * 60_000
            sent = 0
            while broker.stats()["backends_lost"] == 0:
                await ws.send(chunk)
                sent += 1
                assert sent < 5000, "backend never declared dead"
                if sent % 50 == 0:
                    await asyncio.sleep(0.05)
            await wait_for(lambda: broker.stats()["backends"] == 1)
            await ws.send("after")
            while True:  # the client's later events reach the healthy backend
                ev = await healthy.expect("new_message")
                if ev["params"]["message"] == "after":
                    break
            assert broker.stats()["events_lost"] > 0
            await ws.close()
            await healthy.close()
            stuck.writer.transport.abort()

    run(main())


def test_allowed_origins_and_max_connections():
    async def main():
        with running_broker(allowed_origins=["https://app.example"], max_connections=1) as broker:
            backend = await connect_backend(broker)
            await wait_for(lambda: broker.stats()["backends"] == 1)
            assert await status_of(broker.ws_port, headers={"Origin": "https://evil.example"}) == 403
            ws, _ = await connect_client(broker.ws_port, backend, headers={"Origin": "https://app.example"}, client_id="one")
            assert await status_of(broker.ws_port, headers={"Origin": "https://app.example"}) == 503
            s = broker.stats()
            assert s["handshakes_failed"] == 1 and s["connections_unavailable"] == 1
            await ws.close()
            await backend.close()

    run(main())
