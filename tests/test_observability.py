"""The operator routes of issue 16 on a real broker: GET /health, /ready, /metrics (read with
prometheus-client's own text parser), /stats, on the WebSocket port or on a separate
`metrics_bind` listener; bad requests to them; `pystrands-broker --version`.

Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from procinfo import free_port
from pystrands.testing import running_broker
from v1peer import DEADLINE, connect_client, connect_v2_backend, wait_for


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def http_get(port: int, path: str, raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request over a fresh connection; the broker closes it after answering."""
    request = raw if raw is not None else f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


def scrape(port: int) -> dict[str, float]:
    status, headers, body = http_get(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[sample.name] = sample.value
    return samples


def test_health_ready_metrics_and_stats_follow_what_happens():
    async def main() -> None:
        with running_broker(max_message_size=64) as br:
            port = br.ws_port
            assert http_get(port, "/health")[:1] == (200,)
            status, _, body = http_get(port, "/ready")
            assert (status, body) == (503, b"not ready: no backend connected\n")
            m = scrape(port)
            assert m["pystrands_clients"] == 0 and m["pystrands_backends"] == 0
            assert m["pystrands_info"] == 1

            b = await connect_v2_backend(br)
            assert http_get(port, "/ready")[0] == 200
            a, _ = await connect_client(port, b, client_id="a", room_id="r", user_id="u")
            c, _ = await connect_client(port, b, client_id="c", room_id="r")
            for i in range(5):
                await a.send(f"m{i}")
            await wait_for(lambda: br.stats()["messages_in"] == 5, what="five messages in")
            await a.send("x" * 100)  # over max_message_size: closed 1009, a client protocol error
            await wait_for(lambda: br.stats()["client_protocol_errors"] == 1, what="the oversized message")
            await b.send("join_room", {"client_id": "c", "room_id": "other"})
            await wait_for(lambda: br.stats()["memberships"] == 2, what="a's close and c's join")

            m = scrape(port)
            stats = br.stats()
            assert m["pystrands_clients"] == stats["clients"] == 1
            assert m["pystrands_memberships"] == 2 and m["pystrands_rooms"] == 2
            assert m["pystrands_messages_in_total"] == 5
            assert m["pystrands_connections_accepted_total"] == 2
            assert m["pystrands_client_protocol_errors_total"] == 1
            assert m["pystrands_rooms_joined_total"] == 1
            # Every counter of stats() is exposed, as a *_total counter, and nothing is invented.
            counters = {k for k, v in stats.items() if isinstance(v, int) and f"pystrands_{k}_total" in m}
            gauges = {k for k in stats if f"pystrands_{k}" in m}
            assert counters | gauges == set(stats), set(stats) - counters - gauges

            status, headers, body = http_get(port, "/stats?pretty=0")
            assert status == 200 and headers["content-type"] == "application/json"
            assert json.loads(body)["messages_in"] == 5
            assert set(json.loads(body)) == set(br.stats())
            await c.close()
            await b.close()
            await wait_for(lambda: br.stats()["backends"] == 0, what="backend gone")
            assert http_get(port, "/ready")[0] == 503

    run(main())


def test_bad_requests_to_the_routes_get_4xx_and_nothing_else_breaks():
    with running_broker() as br:
        port = br.ws_port
        assert http_get(port, "/nope")[0] == 426, "any other plain GET keeps its old answer"
        assert http_get(port, "", raw=b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")[0] == 405
        assert http_get(port, "", raw=b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n")[0] == 431
        assert http_get(port, "", raw=b"\x00\x01 nonsense\r\n\r\n")[0] == 400
        assert http_get(port, "", raw=b"GET /metrics HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")[0] == 426
        assert http_get(port, "/health")[0] == 200
        assert br.stats()["handshakes_failed"] >= 5


def test_metrics_bind_serves_the_routes_on_their_own_port_only():
    mport = free_port()
    with running_broker(metrics_bind=f"127.0.0.1:{mport}") as br:
        assert http_get(br.ws_port, "/metrics")[0] == 426, "not on the public port"
        assert http_get(mport, "/health")[0] == 200
        assert "pystrands_clients" in scrape(mport)
        status, _, body = http_get(mport, "/")
        assert status == 404 and b"/metrics" in body
        upgrade = (
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        status, _, body = http_get(mport, "", raw=upgrade)
        assert (status, body) == (404, b"not a WebSocket port\n")


def test_metrics_bind_is_validated_and_a_taken_port_is_a_clear_error():
    with pytest.raises(ValueError, match="metrics_bind=localhost:x"):
        with running_broker(metrics_bind="localhost:x"):
            pass
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError, match="metrics_bind"):
            with running_broker(metrics_bind=f"127.0.0.1:{taken.getsockname()[1]}"):
                pass
    finally:
        taken.close()


def test_ready_flips_with_redis():
    test_cluster = pytest.importorskip("test_cluster")  # skipped without redis-server outside CI
    redis = test_cluster.RedisServer()
    redis.start()
    try:

        async def main() -> None:
            with running_broker(cluster_url=redis.url) as br:
                b = await connect_v2_backend(br)
                assert http_get(br.ws_port, "/ready")[0] == 200
                m = scrape(br.ws_port)
                assert m["pystrands_cluster_connected"] == 1 and m["pystrands_cluster_nodes"] >= 1
                redis.kill()
                await wait_for(lambda: http_get(br.ws_port, "/ready")[0] == 503, timeout=20, what="not ready without Redis")
                assert b"Redis" in http_get(br.ws_port, "/ready")[2]
                redis.start()
                await wait_for(lambda: http_get(br.ws_port, "/ready")[0] == 200, timeout=20, what="ready again")
                await b.close()

        run(main())
    finally:
        redis.stop()


def test_cli_version():
    out = subprocess.run([sys.executable, "-m", "pystrands", "server", "--version"], capture_output=True, text=True, timeout=DEADLINE)
    import pystrands

    assert out.returncode == 0 and out.stdout.strip().endswith(pystrands.__version__), out


async def hold_clients(port: int, n: int, rooms: int, concurrency: int = 200) -> list[asyncio.StreamWriter]:
    """Opens `n` bare WebSocket connections (handshake only; the kernel buffers pings), paths
    spread over `rooms` rooms."""
    writers: list[asyncio.StreamWriter] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"GET /r{i % rooms} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            assert head.startswith(b"HTTP/1.1 101"), head
            writers.append(writer)

    await asyncio.gather(*(one(i) for i in range(n)))
    return writers


def test_routes_answer_while_10000_clients_are_connected():
    """The broker runs as its own process here: 10,000 connections are 20,000 sockets, more than
    one process may open on some machines."""
    n = 10_000
    ws_port, tcp_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pystrands", "server", "--host", "127.0.0.1", "--ws-port", str(ws_port), "--tcp-port", str(tcp_port), "--ping-interval", "0", "--log-level", "warn"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def figure(name: str) -> float:
        return scrape(ws_port)[name]

    async def main() -> None:
        from v1peer import RawBackend

        loop = asyncio.get_running_loop()
        end = loop.time() + DEADLINE
        while True:
            try:
                b = await RawBackend.connect(tcp_port)
                break
            except OSError:  # not listening yet
                assert loop.time() < end, "the broker did not start"
                await asyncio.sleep(0.05)
        assert (await b.hello())["ok"] is True

        async def accept_all() -> None:
            while True:
                obj = await b.recv(timeout=120)
                if obj["action"] == "connection_request":
                    await b.answer(obj, True)
                elif "seq" in obj:
                    await b.ack(obj["seq"])

        acceptor = asyncio.create_task(accept_all())
        writers = await hold_clients(ws_port, n, rooms=1000)
        await wait_for(lambda: figure("pystrands_clients") == n, timeout=60, what="10,000 clients")
        assert (await loop.run_in_executor(None, http_get, ws_port, "/health"))[0] == 200
        assert (await loop.run_in_executor(None, http_get, ws_port, "/ready"))[0] == 200
        m = await loop.run_in_executor(None, scrape, ws_port)
        assert m["pystrands_rooms"] == 1000 and m["pystrands_connections_accepted_total"] == n
        status, _, body = await loop.run_in_executor(None, http_get, ws_port, "/stats")
        assert status == 200 and json.loads(body)["clients"] == n
        acceptor.cancel()
        for w in writers:
            w.close()
        await wait_for(lambda: figure("pystrands_clients") == 0, timeout=60, what="all closed")
        await b.close()

    try:
        run(main())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
