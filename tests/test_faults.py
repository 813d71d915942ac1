"""Delivery guarantees and fault tolerance of the broker, driven over the wire: protocol v2
acknowledgements and redelivery, the no-backend queue, the backend secret, hostile input from
clients and backends, rate limits, dead peers. Raw sockets on the backend side so the tests check
exactly what crosses the wire. Every wait has a deadline."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import threading

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from procinfo import rss_kib
from pystrands import Broker
from pystrands.testing import running_broker
from v1peer import DEADLINE, RawBackend, connect_backend, connect_client, connect_v2_backend, open_ws, wait_for


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


async def recv(ws, timeout=DEADLINE):
    return await asyncio.wait_for(ws.recv(), timeout)


async def messages(backend: RawBackend, n: int) -> list[dict]:
    out = []
    while len(out) < n:
        ev = await backend.recv()
        if ev["action"] == "new_message":
            out.append(ev)
    return out


# --- protocol v2: hello, seq, ack, redelivery -------------------------------------------------


def test_v2_hello_seq_and_acks_release_events():
    async def main():
        with running_broker(heartbeat_interval=7.5) as broker:
            b = await RawBackend.connect(broker.tcp_port)
            reply = await b.hello()
            assert reply == {
                "ok": True,
                "version": 2,
                "features": ["ack", "heartbeat", "rooms", "history"],
                "heartbeat_interval": 7.5,
                "limits": {"max_rooms_per_client": 100, "max_id_length": 256},
            }
            await wait_for(lambda: broker.stats()["backends"] == 1)
            task = open_ws(f"ws://127.0.0.1:{broker.ws_port}/")
            req = await b.expect("connection_request")
            assert "seq" not in req, "connection requests carry no seq"
            await b.answer(req, True, client_id="c", room_id="r")
            ws = await task
            new = await b.expect("new_connection")
            assert new["seq"] == 1 and "redelivered" not in new
            for i in range(3):
                await ws.send(f"m{i}")
            got = await messages(b, 3)
            assert [e["seq"] for e in got] == [2, 3, 4]
            assert len({e["request_id"] for e in got}) == 3, "event ids are unique"
            assert broker.stats()["unacked_events"] == 4
            await b.ack(3)
            await wait_for(lambda: broker.stats()["unacked_events"] == 1, what="ack released 3 events")
            await b.ack(4)
            await wait_for(lambda: broker.stats()["unacked_events"] == 0, what="ack released the rest")
            await ws.close()
            await b.close()

    run(main())


def test_unacked_events_are_redelivered_in_order_to_the_backend_that_takes_over():
    async def main():
        with running_broker() as broker:
            b1 = await connect_v2_backend(broker)
            ws, new = await connect_client(broker.ws_port, b1, client_id="c", room_id="r")
            b2 = await connect_v2_backend(broker)
            for i in range(10):
                await ws.send(f"m{i}")
            first = await messages(b1, 10)
            assert [e["params"]["message"] for e in first] == [f"m{i}" for i in range(10)]
            await b1.ack(first[4]["seq"])  # m0..m4 handled (and new_connection before them)
            await wait_for(lambda: broker.stats()["unacked_events"] == 5, what="ack processed")
            b1.writer.transport.abort()  # the backend dies with m5..m9 unacknowledged
            again = await messages(b2, 5)
            assert [e["params"]["message"] for e in again] == [f"m{i}" for i in range(5, 10)]
            assert [e["request_id"] for e in again] == [e["request_id"] for e in first[5:]], "same event ids"
            assert all(e["redelivered"] is True for e in again)
            assert [e["seq"] for e in again] == [1, 2, 3, 4, 5], "b2's own sequence"
            await ws.send("m10")
            newer = (await messages(b2, 1))[0]
            assert newer["params"]["message"] == "m10" and "redelivered" not in newer
            stats = broker.stats()
            assert stats["events_redelivered"] == 5
            assert stats["events_lost"] == 0
            await ws.close()
            await b2.close()

    run(main())


def test_all_backends_gone_events_queue_in_order_and_overflow_is_counted_exactly():
    async def main():
        with running_broker(queue_size=20) as broker:
            b1 = await connect_v2_backend(broker)
            ws, _ = await connect_client(broker.ws_port, b1, client_id="c", room_id="r")
            for i in range(5):
                await ws.send(f"m{i}")
            await messages(b1, 5)  # received, never acknowledged
            b1.writer.transport.abort()
            await wait_for(lambda: broker.stats()["backends"] == 0, what="backend gone")
            for i in range(5, 50):
                await ws.send(f"m{i}")
            # Into the queue went new_connection and m0..m4 (never acknowledged, redelivered)
            # and m5..m49: 51 events for 20 places, so exactly 31 dropped (oldest first).
            queued_total = 1 + 5 + 45
            await wait_for(lambda: broker.stats()["queue_dropped"] == queued_total - 20, what="31 dropped")
            stats = broker.stats()
            assert stats["queued_events"] == 20 and stats["messages_in"] == 50
            b2 = await connect_v2_backend(broker)
            got = await messages(b2, 20)
            assert [e["params"]["message"] for e in got] == [f"m{i}" for i in range(30, 50)]
            await ws.close()
            await b2.close()

    run(main())


def test_v1_backend_loss_is_counted_as_lost_not_redelivered():
    async def main():
        with running_broker() as broker:
            b1 = await connect_backend(broker)
            ws, _ = await connect_client(broker.ws_port, b1, client_id="c", room_id="r")
            b2 = await connect_backend(broker)
            await ws.send("m0")
            await messages(b1, 1)
            b1.writer.transport.abort()
            await wait_for(lambda: broker.stats()["backends"] == 1)
            await ws.send("m1")
            got = await messages(b2, 1)
            assert got[0]["params"]["message"] == "m1" and "seq" not in got[0], "v1: no redelivery, no seq"
            assert broker.stats()["events_redelivered"] == 0
            await ws.close()
            await b2.close()

    run(main())


def test_a_v2_backend_that_stops_answering_heartbeats_is_declared_dead():
    async def main():
        with running_broker(heartbeat_interval=0.05) as broker:
            silent = await connect_v2_backend(broker)  # reads, but never answers heartbeats
            ws, _ = await connect_client(broker.ws_port, silent, client_id="c", room_id="r")
            alive = await connect_v2_backend(broker)

            async def answer_heartbeats():
                while True:
                    line = await alive.reader.readline()
                    if not line:
                        return
                    obj = json.loads(line)
                    if obj["action"] == "heartbeat":
                        await alive.send("heartbeat", {}, "heartbeat")
                    else:
                        got.append(obj)

            got: list[dict] = []
            pump = asyncio.create_task(answer_heartbeats())
            await wait_for(lambda: broker.stats()["backends_lost"] == 1, what="silent backend declared dead")
            assert broker.stats()["backends"] == 1
            await ws.send("after")
            await wait_for(lambda: any(e.get("params", {}).get("message") == "after" for e in got), what="client moved")
            pump.cancel()
            await ws.close()
            await alive.close()
            silent.writer.transport.abort()

    run(main())


# --- backend secret ---------------------------------------------------------------------------


def test_backend_secret_refuses_backends_without_it_and_admits_those_with_it():
    async def main():
        with running_broker(backend_secret="s3cret-value", handshake_timeout=0.5) as broker:
            # A v1 backend (no hello): refused after handshake_timeout, never registered.
            v1 = await RawBackend.connect(broker.tcp_port)
            reply = await v1.recv()
            assert reply["action"] == "hello" and reply["params"]["ok"] is False
            assert "secret" in reply["params"]["error"]
            assert await v1.reader.read() == b"", "connection closed"
            # Wrong secret, and a broadcast attempted anyway: refused, nothing delivered.
            wrong = await RawBackend.connect(broker.tcp_port)
            await wrong.send("hello", {"version": 2, "secret": "s3cret-valuf"}, "hello")
            await wrong.send("broadcast", {"message": "evil"})
            reply = await wrong.recv()
            assert reply["params"] == {"ok": False, "error": "wrong backend secret"}
            # A v1 backend trying to act right away.
            rogue = await RawBackend.connect(broker.tcp_port)
            await rogue.send("broadcast", {"message": "evil"})
            assert (await rogue.recv())["params"]["ok"] is False
            await wait_for(lambda: broker.stats()["backends_refused"] == 3, what="3 refusals")
            assert broker.stats()["backends"] == 0
            # No backend is registered, so no connection request can go to the rogue ones.
            with pytest.raises(InvalidStatus) as info:
                await websockets.connect(f"ws://127.0.0.1:{broker.ws_port}/", open_timeout=DEADLINE)
            assert info.value.response.status_code == 503
            # With the secret everything works, and nothing the rogues sent was delivered.
            good = await connect_v2_backend(broker, secret="s3cret-value")
            ws, _ = await connect_client(broker.ws_port, good, client_id="c", room_id="r")
            await good.send("broadcast", {"message": "hello"})
            assert await recv(ws) == "hello"
            assert broker.stats()["deliveries"] == 1
            await ws.close()
            await good.close()

    run(main())


def test_hello_edge_cases_without_a_secret():
    async def main():
        with running_broker() as broker:
            old = await RawBackend.connect(broker.tcp_port)
            await old.send("hello", {"version": 1}, "hello")
            reply = await old.recv()
            assert reply["params"]["ok"] is False and "version" in reply["params"]["error"]
            future = await RawBackend.connect(broker.tcp_port)
            assert (await future.hello(version=3))["version"] == 2, "a newer backend is answered with 2"
            await wait_for(lambda: broker.stats()["backends"] == 1)
            # A late hello and an ack on a v1 connection are bad lines, counted; the backend stays.
            v1 = await connect_backend(broker)
            await v1.send("ack", {"seq": 1})
            await v1.send("hello", {"version": 2})
            await wait_for(lambda: broker.stats()["backend_errors"] == 2, what="2 bad lines")
            assert broker.stats()["backends"] == 2
            for b in (old, future, v1):
                await b.close()

    run(main())


# --- hostile and excessive client input -------------------------------------------------------


def _raw_upgrade(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    s.sendall(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    return s


def _read_until(s: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _close_code(s: socket.socket) -> int | None:
    """Reads frames until a close frame (returns its code) or EOF (None)."""
    buf = b""
    while True:
        while len(buf) < 2:
            chunk = s.recv(65536)
            if not chunk:
                return None
            buf += chunk
        op, ln = buf[0] & 0x0F, buf[1] & 0x7F
        head = 2
        if ln == 126:
            head, ln = 4, struct.unpack(">H", buf[2:4])[0] if len(buf) >= 4 else (4, 0)[1]
        elif ln == 127:
            head, ln = 10, struct.unpack(">Q", buf[2:10])[0] if len(buf) >= 10 else 0
        while len(buf) < head + ln:
            chunk = s.recv(65536)
            if not chunk:
                return None
            buf += chunk
        payload, buf = buf[head : head + ln], buf[head + ln :]
        if op == 8:
            return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005


async def _accepted_raw_client(broker, backend, client_id: str) -> socket.socket:
    """A raw socket upgraded to a WebSocket that ``backend`` accepted as ``client_id`` in room
    ``r``; returns once the backend got its ``new_connection``."""
    loop = asyncio.get_running_loop()
    s = await loop.run_in_executor(None, _raw_upgrade, broker.ws_port)
    req = await backend.expect("connection_request")
    await backend.answer(req, True, client_id=client_id, room_id="r")
    assert b" 101 " in await loop.run_in_executor(None, _read_until, s, b"\r\n\r\n")
    await backend.expect("new_connection")
    return s


def _masked(opcode: int, payload: bytes, announce: int | None = None) -> bytes:
    n = len(payload) if announce is None else announce
    if n < 126:
        head = struct.pack(">BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = b"\x01\x02\x03\x04"
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize(
    "frame, code",
    [
        (_masked(0x1, b"", announce=1 << 40), 1009),  # a header announcing 1 TiB
        (_masked(0x1, b"\xff\xfe\xfd"), 1007),  # invalid UTF-8 in a text frame
        (_masked(0x3, b"x"), 1002),  # reserved opcode
        (_masked(0x1, b"x")[:1] + bytes([0x01]) + b"x", 1002),  # unmasked client frame
    ],
    ids=["1TiB-header", "invalid-utf8", "reserved-opcode", "unmasked"],
)
def test_hostile_frames_close_only_that_client(frame, code):
    async def main():
        with running_broker() as broker:
            backend = await connect_backend(broker)
            ok, _ = await connect_client(broker.ws_port, backend, client_id="ok", room_id="r")
            loop = asyncio.get_running_loop()
            s = await _accepted_raw_client(broker, backend, "bad")
            await loop.run_in_executor(None, s.sendall, frame)
            assert await loop.run_in_executor(None, _close_code, s) == code
            s.close()
            err = await backend.expect("error")
            assert err["params"]["context"]["client_id"] == "bad"
            assert (await backend.expect("disconnected"))["params"]["context"]["client_id"] == "bad"
            await backend.send("message_to_room", {"room_id": "r", "message": "still here"})
            assert await recv(ok) == "still here"
            assert broker.stats()["client_protocol_errors"] == 1
            await ok.close()
            await backend.close()

    run(main())


@pytest.mark.parametrize("how", ["reset", "eof"])
def test_a_client_that_vanishes_without_a_close_frame_just_leaves(how):
    """Tabs get killed and networks drop: a connection reset or a bare EOF is a departure, not
    an error. The backend gets `disconnected` and no `error` event; nothing counts as a
    protocol error."""

    async def main():
        with running_broker() as broker:
            backend = await connect_backend(broker)
            loop = asyncio.get_running_loop()
            s = await _accepted_raw_client(broker, backend, "gone")
            await loop.run_in_executor(None, s.sendall, _masked(0x1, b"last words"))
            assert (await backend.expect("new_message"))["params"]["message"] == "last words"
            if how == "reset":  # RST instead of FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            frame = await backend.recv()
            assert frame["action"] == "disconnected", frame
            assert frame["params"]["context"]["client_id"] == "gone"
            assert broker.stats()["client_protocol_errors"] == 0
            await backend.close()

    run(main())


def test_slow_and_oversized_handshakes_get_http_errors():
    async def main():
        with running_broker(handshake_timeout=0.3) as broker:
            loop = asyncio.get_running_loop()

            def slow() -> bytes:
                s = socket.create_connection(("127.0.0.1", broker.ws_port), timeout=DEADLINE)
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes the request
                data = s.recv(4096)
                s.close()
                return data

            def huge() -> bytes:
                s = socket.create_connection(("127.0.0.1", broker.ws_port), timeout=DEADLINE)
                try:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
                except OSError:
                    pass
                data = s.recv(4096)
                s.close()
                return data

            assert b" 408 " in (await loop.run_in_executor(None, slow)).split(b"\r\n")[0] + b" "
            assert b" 431 " in (await loop.run_in_executor(None, huge)).split(b"\r\n")[0] + b" "
            assert broker.stats()["handshakes_failed"] == 2

    run(main())


@pytest.mark.parametrize("policy", ["drop", "close"])
def test_client_rate_limit(policy):
    async def main():
        with running_broker(client_rate_limit=0.001, client_rate_burst=5, rate_limit_policy=policy) as broker:
            backend = await connect_backend(broker)
            ws, _ = await connect_client(broker.ws_port, backend, client_id="c", room_id="r")
            for i in range(8):
                await ws.send(f"m{i}")
            got = await messages(backend, 5)
            assert [e["params"]["message"] for e in got] == [f"m{i}" for i in range(5)]
            if policy == "close":
                with pytest.raises(ConnectionClosed) as info:
                    await recv(ws)
                assert info.value.rcvd.code == 1008
                err = await backend.expect("error")
                assert "client_rate_limit" in err["params"]["error"]
                await backend.expect("disconnected")
                assert broker.stats()["rate_limited"] == 1
            else:
                await wait_for(lambda: broker.stats()["rate_limited"] == 3, what="3 dropped")
                await backend.send("message_to_connection", {"conn_id": "c", "message": "still open"})
                assert await recv(ws) == "still open"
                await ws.close()
            await backend.close()

    run(main())


def test_new_settings_are_validated():
    for kwargs, name in [
        ({"client_rate_limit": -1}, "client_rate_limit"),
        ({"rate_limit_policy": "ignore"}, "rate_limit_policy"),
        ({"max_unacked": 0}, "max_unacked"),
        ({"backend_secret": "a\nb"}, "backend_secret"),
        ({"client_rate_burst": -1}, "client_rate_burst"),
    ]:
        with pytest.raises(ValueError, match=name):
            Broker(**kwargs)
    with pytest.raises(ValueError) as info:
        Broker(backend_secret="zq9x\nbreak")
    assert "zq9x" not in str(info.value), "the secret is never echoed"


# --- restart hygiene --------------------------------------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fifty_start_stop_cycles_leak_no_threads_or_fds():
    def cycle():
        with running_broker(workers=2) as broker:
            with socket.create_connection(("127.0.0.1", broker.tcp_port), timeout=DEADLINE):
                pass

    cycle()  # warm up lazily created process-wide state (logging, thread-locals)
    threads, fds = threading.active_count(), _fds()
    native_before = len(os.listdir("/proc/self/task"))
    for _ in range(50):
        cycle()
    assert threading.active_count() == threads
    assert _fds() <= fds, f"file descriptors grew from {fds} to {_fds()}"
    # A stopped runtime's last threads may still be exiting when stop() returns: allow them the
    # deadline to go (a leaked thread stays, and fails this).
    asyncio.run(
        wait_for(lambda: len(os.listdir("/proc/self/task")) <= native_before, what="native threads of stopped brokers to exit")
    )


# --- slow consumers ---------------------------------------------------------------------------


def _stalled_client(port: int) -> socket.socket:
    """A WebSocket client that upgrades and then never reads (tiny receive buffer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(DEADLINE)
    s.connect(("127.0.0.1", port))
    s.sendall(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    return s



async def _room_with_a_stalled_client(broker, backend, readers: int):
    loop = asyncio.get_running_loop()
    clients = []
    for i in range(readers):
        ws, _ = await connect_client(broker.ws_port, backend, client_id=f"r{i}", room_id="room", max_size=None)
        clients.append(ws)
    stalled = await loop.run_in_executor(None, _stalled_client, broker.ws_port)
    req = await backend.expect("connection_request")
    await backend.answer(req, True, client_id="stalled", room_id="room")
    await backend.expect("new_connection")
    return clients, stalled


async def _collect(ws, until: str, progress: list[int], i: int) -> list[str]:
    got = []
    while True:
        m = await recv(ws, 30)
        if m == until:
            return got
        got.append(m[:8])
        progress[i] += 1


async def _paced(progress: list[int], sent: int, lag: int = 8) -> None:
    """The producer waits for the healthy readers to keep within `lag` messages: the test is
    about one client that stopped reading, not about readers slower than the producer."""
    await wait_for(lambda: min(progress) >= sent - lag, timeout=30, what="readers caught up")


def test_one_stalled_client_in_a_room_of_200_does_not_slow_the_others():
    async def main():
        with running_broker(client_queue_size=16, slow_client_policy="close") as broker:
            backend = await connect_backend(broker)
            clients, stalled = await _room_with_a_stalled_client(broker, backend, 199)
            progress = [0] * len(clients)
            readers = [asyncio.create_task(_collect(ws, "end", progress, i)) for i, ws in enumerate(clients)]
            body = "x" * 16_376
            sent = 0
            while broker.stats()["slow_clients_closed"] == 0:
                await backend.send("message_to_room", {"room_id": "room", "message": f"{sent:08d}{body}"})
                sent += 1
                assert sent < 20_000, "the stalled client was never closed"
                if sent % 8 == 0:
                    await _paced(progress, sent)
            for _ in range(20):  # and the room keeps going after the close
                await backend.send("message_to_room", {"room_id": "room", "message": f"{sent:08d}{body}"})
                sent += 1
                await _paced(progress, sent)
            await backend.send("message_to_room", {"room_id": "room", "message": "end"})
            results = await asyncio.gather(*readers)
            want = [f"{i:08d}" for i in range(sent)]
            assert all(r == want for r in results), "every reader got every message, in order"
            # The stalled client is closed with 1013 (it sees the code once it reads again),
            # and its backend is told.
            loop = asyncio.get_running_loop()
            stalled.settimeout(DEADLINE)
            assert await loop.run_in_executor(None, _close_code_after_upgrade, stalled) == 1013
            ev = await backend.recv()
            while ev["action"] != "error":
                ev = await backend.recv()
            assert ev["params"]["context"]["client_id"] == "stalled"
            assert "slow consumer" in ev["params"]["error"]
            stats = broker.stats()
            assert stats["slow_clients_closed"] == 1 and stats["slow_client_drops"] == 0
            for ws in clients:
                await ws.close()
            await backend.close()

    run(main())


def _close_code_after_upgrade(s: socket.socket) -> int | None:
    head = _read_until(s, b"\r\n\r\n")
    assert b" 101 " in head.split(b"\r\n")[0] + b" "
    rest = head.split(b"\r\n\r\n", 1)[1]

    class Prefixed:
        def __init__(self):
            self.pending = rest

        def recv(self, n):
            if self.pending:
                out, self.pending = self.pending[:n], self.pending[n:]
                return out
            return s.recv(n)

    return _close_code(Prefixed())  # type: ignore[arg-type]


def test_drop_policy_keeps_memory_bounded_under_a_long_stall():
    async def main():
        with running_broker(client_queue_size=16, slow_client_policy="drop") as broker:
            backend = await connect_backend(broker)
            (reader,), stalled = await _room_with_a_stalled_client(broker, backend, 1)
            progress = [0]
            collect = asyncio.create_task(_collect(reader, "end", progress, 0))
            body = "x" * 16_376
            rss_before = None
            total = 6000  # ~96 MiB through the room, far beyond what any buffer may hold
            for i in range(total):
                await backend.send("message_to_room", {"room_id": "room", "message": f"{i:08d}{body}"})
                if i % 8 == 7:
                    await _paced(progress, i + 1)
                if i == 1000:
                    rss_before = rss_kib()
            await backend.send("message_to_room", {"room_id": "room", "message": "end"})
            got = await collect
            assert got == [f"{i:08d}" for i in range(total)]
            grown = rss_kib() - rss_before
            assert grown < 48 * 1024, f"RSS grew by {grown} KiB while a client stalled"
            stats = broker.stats()
            assert stats["slow_client_drops"] > 4000, stats["slow_client_drops"]
            assert stats["slow_clients_closed"] == 0
            stalled.close()
            await reader.close()
            await backend.close()

    run(main())
