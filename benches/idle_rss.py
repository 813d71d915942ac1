"""Broker RSS per idle WebSocket connection.

Starts the broker (`python -m pystrands server`) on free loopback ports, connects a backend that
accepts everyone, opens N idle WebSocket clients, and reports the broker's RSS growth per
connection. Stops by itself. Usage:

    python benches/idle_rss.py --clients 5000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import subprocess
import sys
import time

import websockets

from benchutil import free_port, rss_kib, stop_process


async def accept_everyone(port: int, stop: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    n = 0
    while not stop.is_set():
        line = await reader.readline()
        if not line:
            return
        obj = json.loads(line)
        if obj["action"] == "connection_request":
            n += 1
            resp = {"request_id": obj["request_id"], "action": "response", "params": {"accepted": True, "client_id": f"c{n}", "room_id": "idle", "metadata": {}}}
            writer.write(json.dumps(resp).encode() + b"\n")


async def main(n: int, batch: int) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n * 2 + 1000)), hard))
    ws_port, tcp_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pystrands", "server", "--host", "127.0.0.1", "--ws-port", str(ws_port), "--tcp-port", str(tcp_port), "--log-level", "warn", "--ping-interval", "0"],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n * 2 + 1000), hard)),
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", tcp_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        stop = asyncio.Event()
        backend = asyncio.create_task(accept_everyone(tcp_port, stop))
        await asyncio.sleep(0.2)
        base = rss_kib(proc.pid)
        clients = []
        t0 = time.monotonic()
        for start in range(0, n, batch):
            clients += await asyncio.gather(*(websockets.connect(f"ws://127.0.0.1:{ws_port}/idle", open_timeout=60, ping_interval=None) for _ in range(min(batch, n - start))))
        connect_s = time.monotonic() - t0
        await asyncio.sleep(1.0)
        loaded = rss_kib(proc.pid)
        result = {
            "clients": n,
            "rss_base_kib": base,
            "rss_loaded_kib": loaded,
            "rss_per_connection_kib": round((loaded - base) / n, 2),
            "connect_seconds": round(connect_s, 2),
        }
        stop.set()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        backend.cancel()
        return result
    finally:
        stop_process(proc, timeout=30)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=200)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main(args.clients, args.batch)), indent=2))
