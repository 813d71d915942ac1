"""Soak: many WebSocket clients churning through the broker while backends are killed and
restarted, bounded in time. Reports messages sent vs echoed vs counted drops, and the broker's
RSS over time.

What runs (all on 127.0.0.1, stopped by the script):
  * the broker as its own process (`python -m pystrands server`), polled for stats;
  * two echo backends (our async client, protocol v2) as processes; every `--kill-every` seconds
    one is killed with SIGKILL and a fresh one started;
  * `--clients` client slots in this process: each connects, sends a burst of numbered messages,
    waits for every echo (deadline), disconnects, and starts over under a new client id.

With protocol v2 nothing may go missing: every message is echoed at least once; duplicates are
the redeliveries of events a killed backend had not acknowledged. Usage:

    python benches/soak.py                      # 2 minutes, 2,000 clients
    python benches/soak.py --seconds 10 --clients 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import websockets

from benchutil import free_port, rss_kib

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benches" / "results"


BROKER_CHILD = """
import json, sys, threading
from pystrands import Broker
b = Broker(host="127.0.0.1", ws_port=int(sys.argv[1]), tcp_port=int(sys.argv[2]), log_level="error",
           queue_size=100_000).start()
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    if line.strip() == "stats":
        print(json.dumps(b.stats()), flush=True)
    else:
        break
b.stop()
"""

BACKEND_CHILD = """
import asyncio, sys
from pystrands import AsyncPyStrandsClient
class Echo(AsyncPyStrandsClient):
    async def on_connection_request(self, request):
        request.context.client_id = request.url.strip("/")
        return True
    async def on_message(self, message, context):
        await self.send_private_message(context.client_id, message)
asyncio.run(Echo(host="127.0.0.1", port=int(sys.argv[1]), reconnect_delay=0.05, max_reconnect_delay=0.5).run_forever())
"""


class BrokerProc:
    def __init__(self, ws_port: int, tcp_port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BROKER_CHILD, str(ws_port), str(tcp_port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None and json.loads(self.proc.stdout.readline())["ready"]

    def stats(self) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        self.proc.wait(30)


def start_backend(tcp_port: int) -> subprocess.Popen:
    # Children run this interpreter with its installed pystrands (`pip install .`).
    return subprocess.Popen([sys.executable, "-c", BACKEND_CHILD, str(tcp_port)], stdin=subprocess.DEVNULL)


class Tally:
    def __init__(self) -> None:
        self.sent = 0
        self.echoed = 0
        self.duplicates = 0
        self.missing = 0
        self.sessions = 0
        self.refused = 0


async def slot(i: int, ws_port: int, until: float, tally: Tally, rng: random.Random) -> None:
    gen = 0
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        gen += 1
        name = f"s{i}-{gen}"
        try:
            ws = await websockets.connect(f"ws://127.0.0.1:{ws_port}/{name}", open_timeout=15, max_size=None)
        except (OSError, asyncio.TimeoutError, websockets.exceptions.InvalidStatus, websockets.exceptions.InvalidMessage):
            tally.refused += 1  # e.g. 503 while no backend is up: nothing was sent
            await asyncio.sleep(0.2)
            continue
        tally.sessions += 1
        burst = rng.randint(5, 20)
        expected = set(range(burst))
        seen: set[int] = set()
        try:
            for n in range(burst):
                await ws.send(str(n))
                tally.sent += 1
                await asyncio.sleep(rng.uniform(0.0, 0.05))
            deadline = loop.time() + 20
            while seen != expected and loop.time() < deadline:
                try:
                    n = int(await asyncio.wait_for(ws.recv(), max(0.01, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
                if n in seen:
                    tally.duplicates += 1
                else:
                    seen.add(n)
                    tally.echoed += 1
        except websockets.exceptions.ConnectionClosed:
            pass
        tally.missing += len(expected - seen)
        await ws.close()


async def soak(seconds: float, clients: int, kill_every: float) -> dict:
    ws_port, tcp_port = free_port(), free_port()
    broker = BrokerProc(ws_port, tcp_port)
    backends = [start_backend(tcp_port), start_backend(tcp_port)]
    kills = 0
    rss: list[tuple[float, int]] = []
    try:
        t0 = time.monotonic()
        while broker.stats()["backends"] < 2:
            if time.monotonic() - t0 > 30:
                raise RuntimeError("backends did not connect")
            await asyncio.sleep(0.05)
        tally = Tally()
        rng = random.Random(7)
        loop = asyncio.get_running_loop()
        start = loop.time()
        until = start + seconds
        tasks = []
        for i in range(clients):
            tasks.append(asyncio.create_task(slot(i, ws_port, until, tally, random.Random(rng.random()))))
            if i % 50 == 49:
                await asyncio.sleep(0.01)  # ramp up
        next_kill = start + kill_every
        while loop.time() < until:
            await asyncio.sleep(1.0)
            rss.append((round(loop.time() - start, 1), rss_kib(broker.proc.pid, default=0)))
            if loop.time() >= next_kill:
                victim = backends.pop(0)
                victim.send_signal(signal.SIGKILL)
                victim.wait(10)
                backends.append(start_backend(tcp_port))
                kills += 1
                next_kill += kill_every
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        stats = broker.stats()
        rss.append((round(loop.time() - start, 1), rss_kib(broker.proc.pid, default=0)))
    finally:
        for b in backends:
            b.kill()
            b.wait(10)
        broker.stop()
    counted = {k: stats[k] for k in ("queue_dropped", "events_lost", "slow_client_drops", "slow_clients_closed",
                                     "rate_limited", "unacked_overflow", "events_redelivered", "backends_lost",
                                     "connections_unavailable")}
    return {
        "seconds": seconds,
        "client_slots": clients,
        "sessions": tally.sessions,
        "connects_refused": tally.refused,
        "backend_kills": kills,
        "sent": tally.sent,
        "echoed_unique": tally.echoed,
        "duplicates": tally.duplicates,
        "missing": tally.missing,
        "broker_counters": counted,
        "broker_rss_kib": {"min": min(r for _, r in rss), "max": max(r for _, r in rss), "final": rss[-1][1], "timeline": rss},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--clients", type=int, default=2000)
    p.add_argument("--kill-every", type=float, default=15.0, help="seconds between backend kills")
    p.add_argument("--out", default=str(RESULTS / "soak.json"), help="where to write the JSON report ('' for nowhere)")
    args = p.parse_args(argv)
    report = asyncio.run(soak(args.seconds, args.clients, args.kill_every))
    summary = {k: v for k, v in report.items() if k != "broker_rss_kib"}
    summary["broker_rss_kib"] = {k: v for k, v in report["broker_rss_kib"].items() if k != "timeline"}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
