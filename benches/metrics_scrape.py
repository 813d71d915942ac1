"""Broker CPU per `/metrics` (and `/stats`) scrape with 10,000 clients in 1,000 rooms (issue 16's bar:
< 5 ms of broker CPU per scrape).

Starts the broker (`python -m pystrands server`, the release build in the running interpreter's
environment) on free loopback ports with pings off, accepts every connection with a raw protocol-v2
backend in this process, opens the clients (bare WebSocket handshakes) spread over the rooms, then
for each route: reads the broker process's CPU time (utime + stime from /proc), scrapes it
`--scrapes` times one after the other, reads the CPU time again, and subtracts the broker's idle
CPU over the same wall time (measured just before, with nothing scraped). Repeats `--runs` times and
prints the median per route, in ms of CPU per scrape, with the body size. Everything stops by itself.

    python benches/metrics_scrape.py [--clients 10000] [--rooms 1000] [--scrapes 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchutil import free_port, stop_process, wait_port

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:80]
    return body


async def backend(tcp_port: int, stop: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)

    def send(obj: dict) -> None:
        writer.write(json.dumps(obj).encode() + b"\n")

    send({"request_id": "hello", "action": "hello", "params": {"version": 2, "features": ["ack", "heartbeat"]}})
    while not stop.is_set():
        try:
            line = await asyncio.wait_for(reader.readline(), 0.5)
        except asyncio.TimeoutError:
            continue
        if not line:
            return
        obj = json.loads(line)
        if obj.get("action") == "connection_request":
            room = obj["params"]["url"].strip("/")
            send({"request_id": obj["request_id"], "action": "response", "params": {"accepted": True, "room_id": room}})
        elif "seq" in obj:
            send({"request_id": "ack", "action": "ack", "params": {"seq": obj["seq"]}})
        elif obj.get("action") == "heartbeat":
            send({"request_id": "heartbeat", "action": "heartbeat", "params": {}})
    writer.close()


async def open_clients(port: int, n: int, rooms: int) -> list[asyncio.StreamWriter]:
    sem = asyncio.Semaphore(200)
    out: list[asyncio.StreamWriter] = []

    async def one(i: int) -> None:
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"GET /r{i % rooms} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
            out.append(writer)

    await asyncio.gather(*(one(i) for i in range(n)))
    return out


def measure(pid: int, port: int, path: str, scrapes: int) -> tuple[float, int]:
    """(broker CPU ms per scrape, body bytes), the broker's idle CPU over the same time removed."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    size = 0
    for _ in range(scrapes):
        size = len(get(port, path))
    wall = time.monotonic() - t0
    busy = cpu_seconds(pid) - c0
    i0 = cpu_seconds(pid)
    time.sleep(wall)
    idle = cpu_seconds(pid) - i0
    return max(0.0, busy - idle) * 1000 / scrapes, size


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--rooms", type=int, default=1_000)
    ap.add_argument("--scrapes", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    return ap


async def main() -> None:
    args = parser().parse_args()
    ws_port, tcp_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pystrands", "server", "--host", "127.0.0.1", "--ws-port", str(ws_port),
         "--tcp-port", str(tcp_port), "--ping-interval", "0", "--log-level", "warn"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stop = asyncio.Event()
    try:
        wait_port(tcp_port, 30.0)
        task = asyncio.create_task(backend(tcp_port, stop))
        writers = await open_clients(ws_port, args.clients, args.rooms)
        loop = asyncio.get_running_loop()
        results: dict[str, list[float]] = {"/metrics": [], "/stats": []}
        sizes: dict[str, int] = {}
        for _ in range(args.runs):
            for path in results:
                ms, size = await loop.run_in_executor(None, measure, proc.pid, ws_port, path, args.scrapes)
                results[path].append(ms)
                sizes[path] = size
        print(f"{args.clients:,} clients in {args.rooms:,} rooms, {args.scrapes} scrapes x {args.runs} runs "
              f"(CPU clock tick {1000 / TICK:g} ms; load {os.getloadavg()[0]:.2f})")
        print("| route | broker CPU ms per scrape (median) | runs | body bytes |\n|---|---:|---|---:|")
        for path, runs in results.items():
            print(f"| `{path}` | {statistics.median(runs):.3f} | {', '.join(f'{r:.3f}' for r in runs)} | {sizes[path]:,} |")
        for w in writers:
            w.close()
        stop.set()
        await task
    finally:
        stop_process(proc)


if __name__ == "__main__":
    asyncio.run(main())
