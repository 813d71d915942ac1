"""Faults of whole processes: a backend killed with SIGKILL mid-stream (no event lost with
protocol v2, order per client kept, duplicates only for what was in flight), and a broker killed
with SIGKILL and restarted on the same ports (sync and async clients reconnect and work)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import websockets

from pystrands import AsyncPyStrandsClient, PyStrandsClient
from pystrands.testing import running_broker
from test_clients_e2e import free_ports
from v1peer import DEADLINE, wait_for

HERE = Path(__file__).parent


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def spawn_backend(port: int) -> subprocess.Popen:
    # Children use this interpreter and its installed pystrands (in CI, the built wheel).
    return subprocess.Popen([sys.executable, str(HERE / "echo_backend.py"), str(port)], stdin=subprocess.DEVNULL)


def test_sigkill_of_one_of_two_backends_loses_no_event():
    clients, per_client = 20, 300

    async def main():
        with running_broker() as broker:
            procs = [spawn_backend(broker.tcp_port) for _ in range(2)]
            try:
                await wait_for(lambda: broker.stats()["backends"] == 2, timeout=30, what="2 backends")
                conns = [await websockets.connect(f"ws://127.0.0.1:{broker.ws_port}/c{i}", open_timeout=DEADLINE) for i in range(clients)]
                echoes: list[list[tuple[str, int]]] = [[] for _ in range(clients)]
                done = [asyncio.Event() for _ in range(clients)]

                async def read(i: int) -> None:
                    seen: set[int] = set()
                    while len(seen) < per_client:
                        pid, n = (await asyncio.wait_for(conns[i].recv(), 30)).split()
                        echoes[i].append((pid, int(n)))
                        seen.add(int(n))
                    done[i].set()

                readers = [asyncio.create_task(read(i)) for i in range(clients)]
                victim = procs[0]
                killed = False
                for n in range(per_client):
                    for ws in conns:
                        await ws.send(str(n))
                    if n % 10 == 9:
                        await asyncio.sleep(0)  # let echoes flow, so some are in flight at the kill
                    if n == per_client // 3 and not killed:
                        victim.send_signal(signal.SIGKILL)
                        killed = True
                await asyncio.wait_for(asyncio.gather(*readers), 60)
                stats = broker.stats()
                victim_pid = str(victim.pid)
                duplicates = 0
                for i, got in enumerate(echoes):
                    firsts: list[int] = []
                    seen: set[int] = set()
                    for _pid, n in got:
                        if n in seen:
                            duplicates += 1
                        else:
                            seen.add(n)
                            firsts.append(n)
                    assert firsts == list(range(per_client)), f"client {i}: lost or reordered"
                    # Per backend, echoes come in order; a backend's duplicates are a contiguous
                    # re-run of what the dead one had in flight.
                    for pid in {p for p, _ in got}:
                        ns = [n for p, n in got if p == pid]
                        assert ns == sorted(ns), f"client {i}: backend {pid} out of order"
                    survivor = [n for p, n in got if p != victim_pid]
                    dead = [n for p, n in got if p == victim_pid]
                    if dead and survivor:
                        assert survivor[0] <= dead[-1] + 1, f"client {i}: a gap between backends"
                assert stats["events_lost"] == 0
                assert duplicates <= stats["events_redelivered"], (duplicates, stats["events_redelivered"])
            finally:
                for p in procs:
                    p.kill()
                    p.wait(10)
                for ws in conns if "conns" in dir() else []:
                    await ws.close()

    run(main())


class AsyncEcho(AsyncPyStrandsClient):
    async def on_connection_request(self, request):
        return True

    async def on_message(self, message, context):
        await self.send_private_message(context.client_id, f"async {message}")


class SyncEcho(PyStrandsClient):
    def on_connection_request(self, request):
        return True

    def on_message(self, message, context):
        self.send_private_message(context.client_id, f"sync {message}")


def start_broker_process(ws_port: int, tcp_port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pystrands", "server", "--host", "127.0.0.1", "--ws-port", str(ws_port), "--tcp-port", str(tcp_port), "--log-level", "warn"]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL)


async def echo_round_trip(ws_port: int, text: str, deadline: float = 30) -> str:
    """Connects a WebSocket client (retrying while the broker or a backend is not up yet),
    sends `text` and returns the echo."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        try:
            async with websockets.connect(f"ws://127.0.0.1:{ws_port}/", open_timeout=5) as ws:
                await ws.send(text)
                return await asyncio.wait_for(ws.recv(), 10)
        except (OSError, websockets.exceptions.InvalidStatus, websockets.exceptions.InvalidMessage):
            if loop.time() > end:
                raise
            await asyncio.sleep(0.05)


def test_broker_sigkill_and_restart_on_the_same_ports():
    async def main():
        ws_port, tcp_port = free_ports(2)
        broker = start_broker_process(ws_port, tcp_port)
        a = AsyncEcho(host="127.0.0.1", port=tcp_port, reconnect_delay=0.05, max_reconnect_delay=0.3)
        s = SyncEcho(host="127.0.0.1", port=tcp_port, reconnect_delay=0.05, max_reconnect_delay=0.3)
        runners = [asyncio.create_task(a.run_forever()), asyncio.create_task(asyncio.to_thread(s.run_forever))]
        try:
            await wait_for(lambda: a.connected and s.connected, timeout=30, what="both clients connected")
            first = {await echo_round_trip(ws_port, "one") for _ in range(6)}
            assert first == {"async one", "sync one"}, first
            broker.send_signal(signal.SIGKILL)
            broker.wait(10)
            await wait_for(lambda: not a.connected and not s.connected, what="clients saw the broker die")
            broker = start_broker_process(ws_port, tcp_port)
            await wait_for(lambda: a.connected and s.connected, timeout=30, what="clients reconnected")
            second = {await echo_round_trip(ws_port, "two") for _ in range(6)}
            assert second == {"async two", "sync two"}, second
        finally:
            await a.disconnect()
            await asyncio.to_thread(s.disconnect)
            await asyncio.wait_for(asyncio.gather(*runners), DEADLINE)
            broker.kill()
            broker.wait(10)

    run(main())
