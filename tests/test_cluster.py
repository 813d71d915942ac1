"""Several brokers as one cluster over a real Redis (Debian's redis-server on a free port).

Backends and WebSocket clients speak the real protocols (tests/v1peer.py); every wait has a
deadline; nothing sleeps for correctness. Each test gets its own redis-server.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from procinfo import free_port
from pystrands import Broker
from pystrands.testing import running_broker
from v1peer import DEADLINE, RawBackend, connect_backend, connect_client, wait_for

REDIS = shutil.which("redis-server")
if REDIS is None:
    if os.environ.get("CI"):
        raise RuntimeError("redis-server is required in CI (.ci/run installs it with apt-get)")
    pytest.skip("redis-server is not installed (apt-get install redis-server)", allow_module_level=True)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))



class RedisServer:
    """A redis-server subprocess on a fixed port that can be killed and started again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + DEADLINE
        while not self.ping():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} (port {self.port} taken?)")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING in time")
            time.sleep(0.02)

    def command(self, *args: str | bytes) -> bytes:
        """Sends one command (RESP) and returns the raw reply."""
        parts = [a.encode() if isinstance(a, str) else a for a in args]
        req = f"*{len(parts)}\r\n".encode() + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(req)
            return s.recv(65536)

    def ping(self) -> bool:
        try:
            return self.command("PING").startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=DEADLINE)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def brokers(url: str, n: int, **settings) -> Iterator[list[Broker]]:
    with ExitStack() as stack:
        yield [stack.enter_context(running_broker(cluster_url=url, cluster_node_id=f"node-{'abc'[i]}", **settings)) for i in range(n)]


async def recv(ws, timeout: float = DEADLINE) -> str:
    return await asyncio.wait_for(ws.recv(), timeout)


async def expect_exactly(ws, want: list[str], end: str) -> None:
    """The client receives `want` in order, then `end` (sent last by the same backend): a
    duplicate or a stray message that travelled the same path would arrive before it."""
    got = [await recv(ws) for _ in want]
    assert got == want
    assert await recv(ws) == end


def cluster_stat(broker: Broker, name: str):
    return broker.stats()[name]


def test_room_private_and_broadcast_reach_every_node_exactly_once(redis):
    async def main():
        with brokers(redis.url, 3) as (a, b, c):
            sender = await connect_backend(a)  # sends everything, accepts clients of node A
            accept_b = await connect_backend(b)
            accept_c = await connect_backend(c)
            a1, _ = await connect_client(a.ws_port, sender, client_id="a1", room_id="r")
            b1, _ = await connect_client(b.ws_port, accept_b, client_id="b1", room_id="r")
            c1, _ = await connect_client(c.ws_port, accept_c, client_id="c1", room_id="r")
            c2, _ = await connect_client(c.ws_port, accept_c, client_id="c2", room_id="elsewhere")

            await sender.send("message_to_room", {"room_id": "r", "message": "room-1"})
            await sender.send("message_to_connection", {"conn_id": "c1", "message": "private-c1"})
            await sender.send("message_to_connection", {"conn_id": "b1", "message": "private-b1"})
            await sender.send("message_to_connection", {"conn_id": "a1", "message": "private-a1"})
            await sender.send("broadcast", {"message": "all-1"})
            await sender.send("message_to_room", {"room_id": "elsewhere", "message": "room-2"})
            await sender.send("broadcast", {"message": "end"})

            await expect_exactly(a1, ["room-1", "private-a1", "all-1"], "end")
            await expect_exactly(b1, ["room-1", "private-b1", "all-1"], "end")
            await expect_exactly(c1, ["room-1", "private-c1", "all-1"], "end")
            await expect_exactly(c2, ["all-1", "room-2"], "end")
            # A duplicate on node A (an echo of its own publish) would come back through Redis
            # after the local "end"; a marker from node B is ordered after A's publishes on the
            # channel, so it would arrive after such an echo.
            await accept_b.send("broadcast", {"message": "fin"})
            for ws in (a1, b1, c1, c2):
                assert await recv(ws) == "fin"

            # Counters: node A published every send whose recipients were not all local
            # (a1's private message stayed local), plus one claim per client on A.
            # claim of a1 + room-1, private-c1, private-b1, all-1, room-2, end
            await wait_for(lambda: a.stats()["cluster_published"] >= 7, what="publishes confirmed")
            assert a.stats()["deliveries"] == 5  # a1: room-1, private-a1, all-1, end, fin
            sa, sb = a.stats(), b.stats()
            assert sa["cluster_published"] == 7
            assert sa["cluster_publish_dropped"] == 0 and sb["cluster_missed"] == 0
            assert sb["deliveries"] == 5  # room-1, private-b1, all-1, end, fin: no duplicate
            assert sb["no_route"] == 0 and sb["cluster_decode_errors"] == 0

            # Figures visible cluster-wide (other nodes' reports arrive within about a second).
            for node in (a, b, c):
                await wait_for(lambda: node.stats()["cluster_clients"] == 4 and node.stats()["cluster_nodes"] == 3, what="cluster figures")
                s = node.stats()
                assert s["cluster_rooms"] == 2 and s["cluster_connected"] is True
                assert node.room_members() == {"r": 3, "elsewhere": 1}
            assert (a.stats()["clients"], b.stats()["clients"], c.stats()["clients"]) == (1, 1, 2)
            assert {n.stats()["cluster_node_id"] for n in (a, b, c)} == {"node-a", "node-b", "node-c"}

            for ws in (a1, b1, c1, c2):
                await ws.close()
            await wait_for(lambda: b.stats()["cluster_clients"] == 0, what="clients gone cluster-wide")
            for be in (sender, accept_b, accept_c):
                await be.close()

    run(main())


def test_private_messages_follow_a_client_to_another_node_after_its_node_stops(redis):
    async def main():
        with brokers(redis.url, 3) as (a, b, c):
            sender = await connect_backend(a)
            accept_b = await connect_backend(b)
            accept_c = await connect_backend(c)
            ws, _ = await connect_client(c.ws_port, accept_c, client_id="mover", room_id="r")
            await sender.send("message_to_connection", {"conn_id": "mover", "message": "on-c"})
            assert await recv(ws) == "on-c"

            c.stop()
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            # A stopped node leaves the presence set at once (no wait for its report to expire).
            await wait_for(lambda: a.stats()["cluster_nodes"] == 2, what="node C gone from presence")

            ws, _ = await connect_client(b.ws_port, accept_b, client_id="mover", room_id="r")
            await sender.send("message_to_connection", {"conn_id": "mover", "message": "on-b"})
            await sender.send("message_to_room", {"room_id": "r", "message": "room-on-b"})
            assert await recv(ws) == "on-b"
            assert await recv(ws) == "room-on-b"
            assert b.stats()["clients"] == 1
            await ws.close()
            for be in (sender, accept_b, accept_c):
                await be.close()

    run(main())


def test_newest_connection_with_a_client_id_wins_across_nodes(redis):
    async def main():
        with brokers(redis.url, 3) as (a, b, c):
            sender = await connect_backend(a)
            accept_b = await connect_backend(b)
            accept_c = await connect_backend(c)
            old, _ = await connect_client(b.ws_port, accept_b, client_id="dup", room_id="r")
            new, _ = await connect_client(c.ws_port, accept_c, client_id="dup", room_id="r")
            # The claim of the newer connection closes the older one on the other node.
            with pytest.raises(ConnectionClosed) as closed:
                await recv(old)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
            gone = await accept_b.expect("disconnected")
            assert gone["params"]["context"]["client_id"] == "dup"
            assert b.stats()["connections_replaced"] == 1
            await sender.send("message_to_connection", {"conn_id": "dup", "message": "to-newest"})
            await sender.send("broadcast", {"message": "end"})
            await expect_exactly(new, ["to-newest"], "end")
            await new.close()
            for be in (sender, accept_b, accept_c):
                await be.close()

    run(main())


def test_redis_killed_and_restarted_mid_test(redis):
    async def main():
        with brokers(redis.url, 2) as (a, b):
            sender = await connect_backend(a)
            accept_b = await connect_backend(b)
            a1, _ = await connect_client(a.ws_port, sender, client_id="a1", room_id="r")
            b1, _ = await connect_client(b.ws_port, accept_b, client_id="b1", room_id="r")
            await sender.send("message_to_room", {"room_id": "r", "message": "before"})
            assert await recv(a1) == "before" and await recv(b1) == "before"
            await wait_for(lambda: a.stats()["cluster_published"] == 2, what="claim and 'before' confirmed")
            published = 2

            redis.kill()
            await wait_for(lambda: not a.stats()["cluster_connected"] and not b.stats()["cluster_connected"], what="Redis loss noticed")
            # Local delivery keeps working; what could not reach the other node is counted.
            for i in range(5):
                await sender.send("message_to_room", {"room_id": "r", "message": f"during-{i}"})
            for i in range(5):
                assert await recv(a1) == f"during-{i}"
            await wait_for(lambda: a.stats()["cluster_publish_dropped"] >= 5, what="drops counted")
            assert a.stats()["cluster_publish_dropped"] == 5
            assert a.stats()["cluster_published"] == published

            redis.start()  # same port, empty
            await wait_for(lambda: a.stats()["cluster_connected"] and b.stats()["cluster_connected"], timeout=20, what="reconnected")
            await sender.send("message_to_room", {"room_id": "r", "message": "after"})
            assert await recv(a1) == "after"
            assert await recv(b1) == "after"  # nothing from the outage slipped in before it
            sa, sb = a.stats(), b.stats()
            assert sa["cluster_reconnects"] >= 1 and sb["cluster_reconnects"] >= 1
            # Dropped messages were counted where they were dropped, not again as gaps.
            assert sb["cluster_missed"] == 0
            # Presence is rebuilt in the new Redis.
            await wait_for(lambda: a.stats()["cluster_nodes"] == 2 and a.stats()["cluster_clients"] == 2, what="presence rebuilt")
            await a1.close()
            await b1.close()
            await sender.close()
            await accept_b.close()

    run(main())


def test_unreachable_redis_at_start_is_an_error_or_a_degraded_start(redis):
    port = free_port()
    url = f"redis://:secret@127.0.0.1:{port}/0"
    with pytest.raises(ConnectionError) as info:
        Broker(host="127.0.0.1", ws_port=0, tcp_port=0, cluster_url=url).start()
    assert "cluster_url=redis://:***@127.0.0.1" in str(info.value) and "secret" not in str(info.value)
    assert "cluster_required" in str(info.value)

    async def main():
        late = RedisServer()
        late.port = port
        with running_broker(cluster_url=f"redis://127.0.0.1:{port}/0", cluster_required=False) as degraded:
            assert degraded.stats()["cluster_connected"] is False
            backend = await connect_backend(degraded)
            ws, _ = await connect_client(degraded.ws_port, backend, client_id="x", room_id="r")
            await backend.send("message_to_room", {"room_id": "r", "message": "local"})
            assert await recv(ws) == "local"
            await wait_for(lambda: degraded.stats()["cluster_publish_dropped"] >= 2, what="room message and claim counted as dropped")
            late.start()
            try:
                await wait_for(lambda: degraded.stats()["cluster_connected"], timeout=20, what="connected once Redis is up")
                with running_broker(cluster_url=late.url) as other:
                    other_backend = await connect_backend(other)
                    ws2, _ = await connect_client(other.ws_port, other_backend, client_id="y", room_id="r")
                    await backend.send("message_to_room", {"room_id": "r", "message": "cross"})
                    assert await recv(ws) == "cross"
                    assert await recv(ws2) == "cross"
                    await ws2.close()
                    await other_backend.close()
            finally:
                late.stop()
            await ws.close()
            await backend.close()

    run(main())


def test_a_killed_node_expires_and_the_others_keep_working(redis, tmp_path: Path):
    ws_port, tcp_port = free_port(), free_port()
    env = {**os.environ, "PYSTRANDS_REDIS_URL": redis.url, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pystrands", "server", "--host", "127.0.0.1", "--ws-port", str(ws_port), "--tcp-port", str(tcp_port), "--cluster-node-id", "doomed", "--heartbeat-interval", "0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    async def main():
        with brokers(redis.url, 1) as (a,):
            try:
                await wait_for(lambda: a.stats()["cluster_nodes"] == 2, timeout=20, what="subprocess node joined")
                doomed = await RawBackend.connect(tcp_port)
                # Its first heartbeat shows the node registered this backend (its writer starts
                # after the registration is queued, ahead of any connection request).
                first = await asyncio.wait_for(doomed.reader.readline(), DEADLINE)
                assert b'"heartbeat"' in first
                ws, _ = await connect_client(ws_port, doomed, client_id="z", room_id="r")
                sender = await connect_backend(a)
                a1, _ = await connect_client(a.ws_port, sender, client_id="a1", room_id="r")
                await sender.send("message_to_room", {"room_id": "r", "message": "hi"})
                assert await recv(ws) == "hi" and await recv(a1) == "hi"
                await wait_for(lambda: a.stats()["cluster_clients"] == 2, what="remote client counted")

                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=DEADLINE)
                # Its presence expires (report TTL 3 s); the surviving node keeps serving.
                await wait_for(lambda: a.stats()["cluster_nodes"] == 1 and a.stats()["cluster_clients"] == 1, timeout=10, what="dead node expired")
                assert a.room_members() == {"r": 1}
                assert redis.command("EXISTS", "pystrands:node:doomed").startswith(b":0")
                await sender.send("message_to_room", {"room_id": "r", "message": "still"})
                assert await recv(a1) == "still"
                await a1.close()
                await sender.close()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    run(main())


def test_cluster_settings_are_validated():
    for kwargs, name in [
        ({"cluster_url": "http://x"}, "cluster_url"),
        ({"cluster_url": ""}, "cluster_url"),
        ({"cluster_url": "redis://h", "cluster_name": "has space"}, "cluster_name"),
        ({"cluster_url": "redis://h", "cluster_node_id": "x" * 65}, "cluster_node_id"),
        ({"cluster_url": "redis://h", "cluster_required": "yes"}, "cluster_required"),
    ]:
        with pytest.raises(ValueError, match=name):
            Broker(**kwargs)


def test_cli_refuses_to_start_when_redis_is_unreachable_and_can_start_degraded():
    port = free_port()
    cmd = [sys.executable, "-m", "pystrands", "server", "--host", "127.0.0.1", "--ws-port", "0", "--tcp-port", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYSTRANDS_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert f"cluster_url=redis://127.0.0.1:{port}/0" in out.stderr and "cluster_required" in out.stderr

    bad = subprocess.run([*cmd, "--cluster-required", "maybe"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "cluster-required" in bad.stderr

    env["PYSTRANDS_CLUSTER_REQUIRED"] = "false"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        seen: list[str] = []
        while not any("listening" in line for line in seen):
            try:
                seen.append(lines.get(timeout=DEADLINE))
            except queue.Empty:
                raise AssertionError(f"no 'listening' line; saw {seen}")
        assert any("starting without the cluster" in line for line in seen), seen
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=DEADLINE)


def envelope(origin: str, first_seq: int, records: list[tuple[bytes, str, bytes]]) -> bytes:
    """A cluster payload as rust/core/src/cluster/envelope.rs encodes it (version 1)."""
    out = bytes([1, len(origin)]) + origin.encode() + first_seq.to_bytes(8, "big") + len(records).to_bytes(4, "big")
    for kind, target, body in records:
        t = target.encode()
        out += kind + len(t).to_bytes(4, "big") + t + len(body).to_bytes(4, "big") + body
    return out


def test_what_arrives_on_the_channel_is_checked_and_gaps_are_counted(redis):
    async def main():
        with brokers(redis.url, 1) as (a,):
            backend = await connect_backend(a)
            ws, _ = await connect_client(a.ws_port, backend, client_id="x", room_id="r")
            # Garbage on the channel is counted and skipped; the node keeps working.
            redis.command("PUBLISH", "pystrands:bus", b"\x00garbage")
            redis.command("PUBLISH", "pystrands:bus", envelope("other", 1, [(b"Z", "r", b"?")]))
            await wait_for(lambda: a.stats()["cluster_decode_errors"] == 2, what="bad payloads counted")
            # A payload from another node reaches local members; a sequence gap is counted.
            redis.command("PUBLISH", "pystrands:bus", envelope("other", 1, [(b"R", "r", "from other ü".encode())]))
            assert await recv(ws) == "from other ü"
            redis.command("PUBLISH", "pystrands:bus", envelope("other", 10, [(b"P", "x", b"private")]))
            assert await recv(ws) == "private"
            s = a.stats()
            assert s["cluster_missed"] == 8  # records 2..9 of node "other" never came
            assert s["cluster_received"] == 2 and s["cluster_decode_errors"] == 2
            # Its own payloads coming back are skipped: a node never delivers twice.
            redis.command("PUBLISH", "pystrands:bus", envelope("node-a", 1, [(b"R", "r", b"echo")]))
            redis.command("PUBLISH", "pystrands:bus", envelope("other", 11, [(b"B", "", b"after-echo")]))
            assert await recv(ws) == "after-echo"
            assert a.stats()["cluster_missed"] == 8
            await ws.close()
            await backend.close()

    run(main())
