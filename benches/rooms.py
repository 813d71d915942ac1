#!/usr/bin/env python3
"""Rooms, users and presence (issue 15): our broker, on one node and on three over Redis,
side by side with PondSocket and Centrifuge, in one run on one machine.

    python benches/rooms.py            # full run (about 9 minutes on 2 cores, plus the wait for a quiet machine)
    python benches/rooms.py --quick    # small sizes, 1 round: a few minutes, for development

Options: `--systems pystrands,centrifuge,pondsocket`, `--rounds N` (default 3), `--fanout-runs N`
(default 5), `--no-wait` (do not wait for a quiet machine), `--no-loadgen` (skip (c) with the load
generator), `--out DIR` (default benches/results/rooms, with --quick benches/results/rooms/quick),
`--summary-only` (rewrite summary.md from rooms.json).

Everything runs on 127.0.0.1 and is started and stopped here (each process in its own process
group, stopped by its pid; a failed system is reported and the run goes on); the script ends by
itself. It runs under `.venv` (this package's release build; it re-executes itself there) and
needs `target/release/pystrands-loadgen` (`cargo build --release -p pystrands-loadgen`) and
`redis-server`. Peers: PondSocket from `benches/.venv-bench` (benches/requirements-bench.txt;
created by benches/run.py or here), Centrifuge built here from benches/peers/centrifuge/ with
Debian's Go and library source (`apt-get install golang-go golang-github-centrifugal-centrifuge-dev
golang-github-centrifugal-protocol-dev golang-github-fzambia-eagle-dev golang-github-igm-sockjs-go-dev
golang-github-mna-redisc-dev`), offline: `GO111MODULE=off GOPATH=/usr/share/gocode go build`.
A peer that cannot be built or started is named under "Not measured".

Systems ("the application" is what decides joins, asks for members and sends to rooms):

* `pystrands`: our broker(s) (`python -m pystrands server`, with `--redis-url` for 3 nodes); the
  application is one `AsyncPyStrandsClient` per node in this process (protocol v2, feature
  `rooms`): `join_room`, `leave_room`, `room_members`, `room_count`, `send_room_message`.
  With 3 nodes, node 0's client issues every command and query, for clients held by nodes 1-2.
* `centrifuge`: benches/peers/centrifuge (Go; Redis broker + presence for 3 nodes); the
  application's operations are RPCs over a control WebSocket per node (Client.Subscribe,
  Node.Presence, Node.Publish; see its main.go).
* `pondsocket`: benches/peers/pondsocket_server.py on uvicorn (RedisPubSub for 3 nodes); the
  operations are events on a control channel per node (Channel.add_user, get_assigns,
  broadcast; see the file).

Centrifuge 0.15 and PondSocket can only subscribe a connection of the node they run on, so
their control messages go to the node holding the client; ours go to node 0 and the broker
routes them.

The clients are held by a lean asyncio WebSocket client in this process (handshake, frames,
pongs; a few KiB per connection), the same for every system. Workloads:

(a) `joins`: C clients (3,000) each join K rooms (5) and then leave them: C*K joins, then
    C*K leaves, issued back to back without waiting; the clock stops when a members query of
    each of the K rooms returns the expected count (C after the joins, 0 after the leaves),
    queried again every 20 ms while it does not. Joins/s and leaves/s. On 1 node, and on
    3 nodes with the clients on nodes 1 and 2 and the commands from node 0.
(b) `presence`: 10,000 members of one room (on 3 nodes: 3,334 + 3,333 + 3,333); Q (50)
    members queries one after the other from node 0, each returning every member (checked),
    and Q count queries: latency p50/p99. Also on 1 node.
(c) `fanout`: two parts.
    - our broker with the Rust load generator (`pystrands-loadgen fanout`, max rate: at most 16
      messages in flight, 10,000 receivers in room `bench`, 64 B) and the benchmark backend
      benches/peers/pystrands_backend.py, with every receiver also in 5 other rooms
      (PYSTRANDS_BENCH_EXTRA_ROOMS=5, system `pystrands+5rooms` of benches/run.py) against
      receivers in that one room only (`pystrands`); runs alternate, median of --fanout-runs.
      Deliveries/s.
    - every system, 1 node, the room of 10,000 held clients: the application publishes R
      (2) messages/s for S (8) s, first with the members in that room only, then after each
      joined 5 more rooms. Per message the time until its last delivery (p50/p99), every
      delivery's latency, missing deliveries, and the server's CPU per delivery (the
      receivers here are Python, so this is a fixed rate every system carries, not a maximum).

Systems take turns within a round (the order rotates); medians over the rounds are reported.
Before measuring, the script waits (up to 10 minutes, checking every 30 s) for a 1-minute load
average below 1.0, and marks the results provisional if it never comes. Writes
`<out>/rooms.json` (machine, settings, load averages, every run) and `<out>/summary.md` (the
Markdown table, also printed); process logs go to target/bench-rooms-logs/.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchutil import Proc, free_port, raise_nofile

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ROOT / "benches"
PEERS = BENCHES / "peers"
OUR_VENV = ROOT / ".venv"
BENCH_VENV = BENCHES / ".venv-bench"
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
LOADGEN = TARGET / "release" / "pystrands-loadgen"
GO_PEER = TARGET / "bench-peers" / "centrifuge-peer"
LOGDIR = TARGET / "bench-rooms-logs"
GOPATH = "/usr/share/gocode"
QUIET_LOAD = 1.0

sys.path.insert(0, str(BENCHES))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def in_our_venv() -> bool:
    return Path(sys.prefix).resolve() == OUR_VENV.resolve()


# ------------------------------------------------------------------ processes


def proc(name: str, argv: list[str]) -> Proc:
    """A child in its own process group, logging to target/bench-rooms-logs/<name>.log."""
    LOGDIR.mkdir(parents=True, exist_ok=True)
    return Proc(name, argv, LOGDIR)


async def wait_port(port: int, procs: list[Proc], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while True:
        for p in procs:
            p.check_alive()
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if time.monotonic() > end:
                raise RuntimeError(f"port {port} not open after {timeout} s") from None
            await asyncio.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def machine_busy() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used between start() and stop() by the system's processes, this process (the
    application for ours and the clients for everyone) and every other process (`others`)."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.t0 = time.monotonic()
        self.s0 = sum(cpu_seconds(p) for p in pids)
        self.d0 = self_cpu()
        self.m0 = machine_busy()

    def stop(self) -> dict:
        wall = max(time.monotonic() - self.t0, 1e-9)
        server = sum(cpu_seconds(p) for p in self.pids) - self.s0
        driver = self_cpu() - self.d0
        others = max(0.0, machine_busy() - self.m0 - server - driver)
        return {"wall_s": round(wall, 3), "server_cpu_s": round(server, 3), "driver_cpu_s": round(driver, 3),
                "server_cores": round(server / wall, 2), "driver_cores": round(driver / wall, 2), "others_cores": round(others / wall, 2)}


# ------------------------------------------------------------------ a lean WebSocket client


class WSConn(asyncio.Protocol):
    """One client connection: HTTP upgrade, then text frames to `handler(conn, payload)`, pings
    answered. Frames to the server are masked with a zero key (allowed; no per-byte work)."""

    __slots__ = ("transport", "buf", "open", "handler", "ready", "closed", "ident", "host", "path", "early")

    def __init__(self, host: str, path: str, ready: asyncio.Future):
        self.host, self.path, self.ready = host, path, ready
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.open = False
        self.closed = False
        self.handler = None
        self.ident = ""
        self.early: list[bytes] = []  # frames that came before a handler, while setting up (no ident yet)

    def connection_made(self, transport) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write((f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        if not self.open:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            status = head.split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" ":
                if not self.ready.done():
                    self.ready.set_exception(RuntimeError(f"upgrade refused: {status.decode(errors='replace')}"))
                self.transport.close()
                return
            self.open = True
            if not self.ready.done():
                self.ready.set_result(self)
            if not self.buf:
                return
            data, self.buf = self.buf, b""
        if self.buf:
            data = self.buf + data
            self.buf = b""
        n, i = len(data), 0
        while n - i >= 2:
            b0, ln = data[i], data[i + 1] & 0x7F
            h = i + 2
            if ln == 126:
                if n - i < 4:
                    break
                ln = int.from_bytes(data[i + 2:i + 4], "big")
                h = i + 4
            elif ln == 127:
                if n - i < 10:
                    break
                ln = int.from_bytes(data[i + 2:i + 10], "big")
                h = i + 10
            if n - h < ln:
                break
            op = b0 & 0x0F
            if op == 1 or op == 0:
                if self.handler is not None:
                    self.handler(self, data[h:h + ln])
                elif not self.ident:
                    self.early.append(data[h:h + ln])
            elif op == 9:
                self._frame(0x8A, data[h:h + ln])
            elif op == 8:
                self.transport.close()
                return
            i = h + ln
        if i < n:
            self.buf = data[i:]

    def _frame(self, b0: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = bytes((b0, 0x80 | n))
        elif n < 65536:
            head = bytes((b0, 0xFE)) + n.to_bytes(2, "big")
        else:
            head = bytes((b0, 0xFF)) + n.to_bytes(8, "big")
        self.transport.write(head + b"\0\0\0\0" + payload)

    def send_text(self, payload: bytes) -> None:
        self._frame(0x81, payload)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost before the upgrade: {exc}"))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"\x88\x82\0\0\0\0\x03\xe8")
            self.transport.close()


async def ws_connect(port: int, path: str, timeout: float = 30.0) -> WSConn:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    await asyncio.wait_for(loop.create_connection(lambda: WSConn(f"127.0.0.1:{port}", path, ready), "127.0.0.1", port), timeout)
    return await asyncio.wait_for(ready, timeout)


def next_text(conn: WSConn) -> asyncio.Future:
    """A future of the next text frame on `conn` (replaces its handler until then)."""
    fut = asyncio.get_running_loop().create_future()
    if conn.early:
        fut.set_result(conn.early.pop(0))
        return fut

    def h(c, payload):
        if not fut.done():
            fut.set_result(payload)

    conn.handler = h
    return fut


class Fanout:
    """Receivers' tally: `@<seq>:<t_ns>@` anywhere in a frame is one delivery."""

    def __init__(self):
        self.active = False
        self.lat = array.array("q")
        self.per_seq: dict[int, list[int]] = {}
        self.delivered = 0

    def on_text(self, conn, payload: bytes) -> None:
        if not self.active:
            return
        i = payload.find(b"@")
        if i < 0:
            return
        j = payload.find(b"@", i + 1)
        seq, t = payload[i + 1:j].split(b":")
        now = time.perf_counter_ns()
        seq = int(seq)
        self.lat.append(now - int(t))
        self.delivered += 1
        e = self.per_seq.get(seq)
        if e is None:
            self.per_seq[seq] = [1, now]
        else:
            e[0] += 1
            e[1] = now


def pct(values, q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


# ------------------------------------------------------------------ systems


class System:
    name = ""

    def __init__(self, nodes: int, redis_url: str | None):
        self.nodes, self.redis_url = nodes, redis_url
        self.procs: list[Proc] = []
        self.conns: list[list[WSConn]] = [[] for _ in range(nodes)]
        self.extra_pids: list[int] = []  # the shared redis-server, on 3 nodes

    def server_pids(self) -> list[int]:
        return [p.pid for p in self.procs] + self.extra_pids

    def check(self) -> None:
        for p in self.procs:
            p.check_alive()

    async def stop(self) -> None:
        for node in self.conns:
            for c in node:
                c.close()
        self.conns = [[] for _ in range(self.nodes)]
        await asyncio.sleep(0.2)
        for p in reversed(self.procs):
            p.stop()
        self.procs = []

    async def hold(self, node: int, count: int, concurrency: int = 100) -> float:
        """Opens `count` clients on `node`; returns the seconds it took."""
        t0 = time.monotonic()
        base = len(self.conns[node])
        sem = asyncio.Semaphore(concurrency)

        async def one(k: int) -> WSConn:
            async with sem:
                return await self.open_client(node, base + k)

        conns = await asyncio.gather(*(one(k) for k in range(count)))
        self.conns[node].extend(conns)
        await self.settle_holders(node)
        return time.monotonic() - t0

    async def settle_holders(self, node: int) -> None:
        pass

    def ids(self, node: int, start: int = 0, count: int | None = None) -> list[str]:
        cs = self.conns[node][start:None if count is None else start + count]
        return [c.ident for c in cs]

    def set_handler(self, handler) -> None:
        for node in self.conns:
            for c in node:
                c.handler = handler

    # operations: subclasses
    async def open_client(self, node: int, k: int) -> WSConn: ...
    async def start(self) -> None: ...
    async def join_many(self, pairs: list[tuple[int, str, str]]) -> None: ...  # (node holding, client id, room)
    async def leave_many(self, pairs: list[tuple[int, str, str]]) -> None: ...
    async def members(self, room: str) -> list[str]: ...
    async def count(self, room: str) -> int: ...
    async def publish(self, room: str, text: str) -> None: ...


class Ours(System):
    name = "pystrands"

    async def start(self) -> None:
        from pystrands import AsyncPyStrandsClient

        self.ports = []
        self.tcp_ports = []
        self.backends = []
        self.accepted = [0] * self.nodes
        system = self

        class App(AsyncPyStrandsClient):
            node = 0

            async def on_connection_request(self, request):
                request.context.room_id = request.url.strip("/")
                request.context.client_id = request.query.split("cid=", 1)[1]
                return True

            async def on_new_connection(self, context):
                if context.client_id != "probe":
                    system.accepted[self.node] += 1

            async def on_disconnect(self, context):
                pass

            async def on_message(self, message, context):
                pass

        for i in range(self.nodes):
            ws, tcp = free_port(), free_port()
            argv = [sys.executable, "-m", "pystrands", "server", "--host", "127.0.0.1", "--ws-port", str(ws), "--tcp-port", str(tcp),
                    "--log-level", "error"]
            if self.redis_url:
                argv += ["--redis-url", self.redis_url, "--cluster-node-id", f"rooms-bench-{i}"]
            p = proc(f"pystrands-{self.nodes}n-{i}", argv)
            self.procs.append(p)
            await wait_port(tcp, [p])
            be = App(host="127.0.0.1", port=tcp)
            be.node = i
            if not await be.connect():
                raise RuntimeError(f"backend could not connect to node {i}")
            self.backends.append(be)
            self.ports.append(ws)
            self.tcp_ports.append(tcp)
        for be in self.backends:
            end = time.monotonic() + 10
            while "rooms" not in be.broker_features:
                if time.monotonic() > end:
                    raise RuntimeError("the broker did not announce the 'rooms' feature")
                await asyncio.sleep(0.02)
        if self.nodes > 1:  # every node knows the others: a member on the last node is seen from node 0
            c = await ws_connect(self.ports[-1], "/probe?cid=probe")
            end = time.monotonic() + 20
            while len(await self.backends[0].room_members("probe", timeout=2.0)) != 1:
                if time.monotonic() > end:
                    raise RuntimeError("node 0 does not see the members of the other nodes")
                await asyncio.sleep(0.1)
            c.close()

    async def stop(self) -> None:
        for be in getattr(self, "backends", []):
            try:
                await be.disconnect(timeout=2)
            except Exception:
                pass
        self.backends = []
        await super().stop()

    async def open_client(self, node: int, k: int) -> WSConn:
        c = await ws_connect(self.ports[node], f"/hold?cid=n{node}-{k}")
        c.ident = f"n{node}-{k}"
        return c

    async def settle_holders(self, node: int) -> None:
        end = time.monotonic() + 30
        while self.accepted[node] < len(self.conns[node]):
            if time.monotonic() > end:
                raise RuntimeError(f"node {node}: {self.accepted[node]} of {len(self.conns[node])} connections announced")
            await asyncio.sleep(0.01)

    async def join_many(self, pairs) -> None:
        be = self.backends[0]
        for _, cid, room in pairs:
            await be.join_room(cid, room)

    async def leave_many(self, pairs) -> None:
        be = self.backends[0]
        for _, cid, room in pairs:
            await be.leave_room(cid, room)

    async def members(self, room: str) -> list[str]:
        return [c.client_id for c in await self.backends[0].room_members(room, timeout=10.0)]

    async def count(self, room: str) -> int:
        return await self.backends[0].room_count(room)

    async def publish(self, room: str, text: str) -> None:
        await self.backends[0].send_room_message(room, text)

    async def wire_members(self, room: str, want: int, queries: int) -> dict:
        """room_members on the wire, without our client library: a second, raw v2 link to node 0
        (hello with feature `rooms`) sends the query and times the arrival of the whole reply line
        (decoded afterwards, outside the clock, to check it): the broker's (and Redis's) share of
        the latency."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.tcp_ports[0], limit=256 * 1024 * 1024)

        async def reply_to(rid: str) -> bytes:
            while True:
                line = await asyncio.wait_for(reader.readline(), 30)
                if not line:
                    raise ConnectionError("broker closed the raw link")
                if f'"request_id":"{rid}"'.encode() in line:
                    return line

        try:
            hello = {"version": 2, "features": ["ack", "heartbeat", "rooms"]}
            writer.write(json.dumps({"request_id": "hello", "action": "hello", "params": hello}).encode() + b"\n")
            await reply_to("hello")
            lat, wrong = [], 0
            for i in range(queries + 3):
                rid = f"wq{i}"
                line = json.dumps({"request_id": rid, "action": "room_members", "params": {"room_id": room, "timeout": 10.0}}).encode()
                t0 = time.perf_counter_ns()
                writer.write(line + b"\n")
                data = await reply_to(rid)
                t = time.perf_counter_ns() - t0
                if i >= 3:  # 3 warm-up queries
                    lat.append(t)
                    wrong += len(json.loads(data)["params"].get("members", [])) != want
            return {"p50": ms(pct(lat, 0.5)), "p99": ms(pct(lat, 0.99)), "min": ms(min(lat)), "max": ms(max(lat)), "wrong": wrong,
                    "reply_bytes": len(data)}
        finally:
            writer.close()


class RpcSystem(System):
    """A peer driven over one control WebSocket per node, request/reply by id."""

    query_node = 0  # the node asked for members and counts

    async def start_control(self) -> None:
        self.ctl: list[WSConn] = []
        self.pending: dict[str, asyncio.Future] = {}
        self.next_id = 0
        for i in range(self.nodes):
            c = await self.open_control(i)
            c.handler = self.on_control
            self.ctl.append(c)

    def request(self, node: int, method: str, data: dict) -> asyncio.Future:
        self.next_id += 1
        rid = self.next_id
        fut = asyncio.get_running_loop().create_future()
        self.pending[str(rid)] = fut
        self.ctl[node].send_text(self.encode(rid, method, data))
        return fut

    async def call(self, node: int, method: str, data: dict, timeout: float = 30.0):
        return await asyncio.wait_for(self.request(node, method, data), timeout)

    async def join_many(self, pairs) -> None:
        futs = [self.request(node, "join", {"c": cid, "ch": room}) for node, cid, room in pairs]
        await asyncio.wait_for(asyncio.gather(*futs), 600)

    async def leave_many(self, pairs) -> None:
        futs = [self.request(node, "leave", {"c": cid, "ch": room}) for node, cid, room in pairs]
        await asyncio.wait_for(asyncio.gather(*futs), 600)

    async def members(self, room: str) -> list[str]:
        return (await self.call(self.query_node, "members", {"ch": room}))["members"]

    async def count(self, room: str) -> int:
        return (await self.call(self.query_node, "count", {"ch": room}))["count"]

    async def publish(self, room: str, text: str) -> None:
        self.request(0, "publish", {"ch": room, "d": {"m": text}})  # not awaited: as our send_room_message


class Centrifuge(RpcSystem):
    name = "centrifuge"

    async def start(self) -> None:
        self.ports = []
        for i in range(self.nodes):
            ws = free_port()
            argv = [str(GO_PEER), "-port", str(ws)]
            if self.redis_url:
                argv += ["-redis", self.redis_url.split("//", 1)[1].split("/", 1)[0]]
            p = proc(f"centrifuge-{self.nodes}n-{i}", argv)
            self.procs.append(p)
            await wait_port(ws, [p])
            self.ports.append(ws)
        await self.start_control()

    async def _connect(self, node: int) -> WSConn:
        c = await ws_connect(self.ports[node], "/connection/websocket")
        fut = next_text(c)
        c.send_text(b'{"id":1,"params":{}}')
        reply = json.loads((await asyncio.wait_for(fut, 30)).split(b"\n", 1)[0])
        c.ident = reply["result"]["client"]
        c.handler = None
        return c

    async def open_control(self, node: int) -> WSConn:
        return await self._connect(node)

    async def open_client(self, node: int, k: int) -> WSConn:
        return await self._connect(node)

    def encode(self, rid: int, method: str, data: dict) -> bytes:
        return json.dumps({"id": rid, "method": 9, "params": {"method": method, "data": data}}, separators=(",", ":")).encode()

    def on_control(self, conn, payload: bytes) -> None:
        for line in payload.split(b"\n"):
            if not line:
                continue
            msg = json.loads(line)
            fut = self.pending.pop(str(msg.get("id")), None)
            if fut is None or fut.done():
                continue
            if "error" in msg:
                fut.set_exception(RuntimeError(f"centrifuge: {msg['error']}"))
            else:
                fut.set_result(msg.get("result", {}).get("data", {}))


class PondSocket(RpcSystem):
    name = "pondsocket"

    def __init__(self, nodes: int, redis_url: str | None):
        super().__init__(nodes, redis_url)
        # A PondSocket channel exists on a node only while that node has a member in it, and
        # only such a node knows the channel's members: ask node 1, which has members in every
        # workload (node 0 has none in (a) on 3 nodes).
        self.query_node = 1 if nodes > 1 else 0

    async def start(self) -> None:
        self.ports = []
        for i in range(self.nodes):
            ws = free_port()
            argv = [str(BENCH_VENV / "bin" / "python"), str(PEERS / "pondsocket_server.py"), "--port", str(ws), "--node-id", f"pond-{i}"]
            if self.redis_url:
                argv += ["--redis", self.redis_url]
            p = proc(f"pondsocket-{self.nodes}n-{i}", argv)
            self.procs.append(p)
            await wait_port(ws, [p])
            self.ports.append(ws)
        await self.start_control()

    async def _connect(self, node: int) -> WSConn:
        c = await ws_connect(self.ports[node], "/socket")
        ev = json.loads(await asyncio.wait_for(next_text(c), 30))
        if ev.get("action") != "CONNECT":
            raise RuntimeError(f"pondsocket: expected CONNECT, got {ev}")
        c.ident = ev["payload"]["id"]
        c.handler = None
        return c

    async def open_control(self, node: int) -> WSConn:
        c = await self._connect(node)
        fut = next_text(c)
        c.send_text(json.dumps({"action": "JOIN_CHANNEL", "channelName": "ctl", "event": "join", "requestId": "ctl-join", "payload": {}}).encode())
        ack = json.loads(await asyncio.wait_for(fut, 30))
        if ack.get("event") != "ACKNOWLEDGE":
            raise RuntimeError(f"pondsocket: control join refused: {ack}")
        return c

    async def open_client(self, node: int, k: int) -> WSConn:
        return await self._connect(node)

    def encode(self, rid: int, method: str, data: dict) -> bytes:
        return json.dumps({"action": "BROADCAST", "channelName": "ctl", "event": method, "requestId": str(rid), "payload": data},
                          separators=(",", ":")).encode()

    def on_control(self, conn, payload: bytes) -> None:
        msg = json.loads(payload)
        fut = self.pending.pop(msg.get("requestId"), None)
        if fut is None or fut.done():
            return
        if msg.get("event") == "ok":
            fut.set_result(msg.get("payload") or {})
        else:
            fut.set_exception(RuntimeError(f"pondsocket: {msg}"))


SYSTEM_CLASSES = {"pystrands": Ours, "centrifuge": Centrifuge, "pondsocket": PondSocket}


# ------------------------------------------------------------------ workloads


async def until_count(system: System, room: str, want: int, timeout: float) -> tuple[int, int]:
    """Queries members of `room` until there are `want`; returns (queries made, last count)."""
    end = time.monotonic() + timeout
    n = 0
    while True:
        got = len(await system.members(room))
        n += 1
        if got == want or time.monotonic() > end:
            return n, got
        await asyncio.sleep(0.02)


async def w_joins(system: System, holders: list[tuple[int, str]], rooms: int, tag: str) -> dict:
    """(a): every holder joins `rooms` rooms, then leaves them; both confirmed by members queries."""
    names = [f"{tag}{r}" for r in range(rooms)]
    pairs = [(node, cid, room) for room in names for node, cid in holders]
    out: dict = {"clients": len(holders), "rooms_per_client": rooms, "commands": len(pairs)}
    for phase, want, op in (("join", len(holders), system.join_many), ("leave", 0, system.leave_many)):
        meter = CpuMeter(system.server_pids())
        t0 = time.perf_counter()
        await op(pairs)
        t_sent = time.perf_counter()
        queries, wrong = 0, []
        for room in names:
            q, got = await until_count(system, room, want, 30.0)
            queries += q
            if got != want:
                wrong.append((room, got))
        t = time.perf_counter() - t0
        cpu = meter.stop()
        out[phase] = {"seconds": round(t, 4), "per_sec": round(len(pairs) / t, 1), "issue_seconds": round(t_sent - t0, 4),
                      "confirm_queries": queries, "wrong_counts": wrong, "cpu": cpu}
        system.check()
    return out


async def w_presence(system: System, room: str, want: int, queries: int) -> dict:
    """(b): `queries` members queries, then as many count queries, one after the other."""
    for _ in range(3):  # warm-up
        await system.members(room)
    meter = CpuMeter(system.server_pids())
    lat, wrong = [], 0
    for _ in range(queries):
        t0 = time.perf_counter_ns()
        got = await system.members(room)
        lat.append(time.perf_counter_ns() - t0)
        wrong += len(got) != want
    cpu = meter.stop()
    # a count may lag (ours: each node's presence report, at most ~1 s old): time until it is right
    t0 = time.perf_counter()
    while await system.count(room) != want and time.perf_counter() - t0 < 10:
        await asyncio.sleep(0.01)
    count_ready = time.perf_counter() - t0
    clat, cwrong = [], 0
    for _ in range(queries):
        t0 = time.perf_counter_ns()
        got = await system.count(room)
        clat.append(time.perf_counter_ns() - t0)
        cwrong += got != want
    out = {}
    if hasattr(system, "wire_members"):
        out["wire_members_ms"] = await system.wire_members(room, want, queries)
    return out | {"members": want, "queries": queries,
            "members_ms": {"p50": ms(pct(lat, 0.5)), "p99": ms(pct(lat, 0.99)), "min": ms(min(lat)), "max": ms(max(lat))},
            "members_wrong": wrong, "count_right_after_s": round(count_ready, 3), "count_ms": {"p50": ms(pct(clat, 0.5)), "p99": ms(pct(clat, 0.99))}, "count_wrong": cwrong, "cpu": cpu}


async def w_fanout(system: System, room: str, members: int, rate: float, seconds: float, size: int = 64) -> dict:
    """(c, every system): the application publishes `rate` msg/s to `room` for `seconds`."""
    tally = Fanout()
    system.set_handler(tally.on_text)
    await asyncio.sleep(0.5)
    tally.active = True
    meter = CpuMeter(system.server_pids())
    n = int(rate * seconds)
    sent: dict[int, int] = {}
    t0 = time.perf_counter()
    for seq in range(n):
        delay = t0 + seq / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t = time.perf_counter_ns()
        sent[seq] = t
        text = f"@{seq}:{t}@"
        await system.publish(room, text + "x" * max(0, size - len(text)))
    expected = n * members
    end = time.monotonic() + 15
    last_seen, quiet = tally.delivered, time.monotonic()
    while tally.delivered < expected and time.monotonic() < end:
        await asyncio.sleep(0.02)
        if tally.delivered != last_seen:
            last_seen, quiet = tally.delivered, time.monotonic()
        elif time.monotonic() - quiet > 3:
            break
    cpu = meter.stop()
    tally.active = False
    system.set_handler(None)
    last = [e[1] - sent[s] for s, e in tally.per_seq.items() if e[0] >= members]
    span = (max((e[1] for e in tally.per_seq.values()), default=0) - sent.get(0, 0)) / 1e9 if tally.per_seq else 0
    return {"members": members, "rate": rate, "seconds": seconds, "published": n, "delivered": tally.delivered, "expected": expected,
            "missing": expected - tally.delivered, "complete_messages": len(last),
            "deliveries_per_sec": round(tally.delivered / span, 1) if span > 0 else None,
            "last_delivery_ms": {"p50": ms(pct(last, 0.5)), "p99": ms(pct(last, 0.99))},
            "latency_ms": {"p50": ms(pct(tally.lat, 0.5)), "p99": ms(pct(tally.lat, 0.99))},
            "server_us_per_delivery": round(cpu["server_cpu_s"] / tally.delivered * 1e6, 2) if tally.delivered else None,
            "driver_us_per_delivery": round(cpu["driver_cpu_s"] / tally.delivered * 1e6, 2) if tally.delivered else None, "cpu": cpu}


async def session_one_node(system: System, cfg: dict) -> dict:
    out: dict = {}
    t = await system.hold(0, cfg["members"])
    out["connect_seconds"] = round(t, 2)
    log(f"  {system.name} 1 node: {cfg['members']} clients in {t:.1f} s")
    holders = [(0, cid) for cid in system.ids(0, 0, cfg["join_clients"])]
    out["joins"] = await w_joins(system, holders, cfg["join_rooms"], "j")
    log(f"  {system.name} 1 node joins: {out['joins']['join']['per_sec']:,.0f}/s, leaves {out['joins']['leave']['per_sec']:,.0f}/s")
    everyone = [(0, cid) for cid in system.ids(0)]
    t0 = time.perf_counter()
    await system.join_many([(n, c, "big") for n, c in everyone])
    q, got = await until_count(system, "big", len(everyone), 60)
    out["join_big_seconds"] = round(time.perf_counter() - t0, 3)
    out["presence"] = await w_presence(system, "big", len(everyone), cfg["queries"])
    log(f"  {system.name} 1 node presence {len(everyone)}: members p50 {out['presence']['members_ms']['p50']} ms")
    out["fanout_1room"] = await w_fanout(system, "big", len(everyone), cfg["rate"], cfg["seconds"])
    t0 = time.perf_counter()
    await system.join_many([(n, c, f"x{r}") for r in range(cfg["extra_rooms"]) for n, c in everyone])
    for r in range(cfg["extra_rooms"]):
        await until_count(system, f"x{r}", len(everyone), 60)
    out["join_extra_seconds"] = round(time.perf_counter() - t0, 3)
    out["fanout_6rooms"] = await w_fanout(system, "big", len(everyone), cfg["rate"], cfg["seconds"])
    for k in ("fanout_1room", "fanout_6rooms"):
        f = out[k]
        log(f"  {system.name} {k}: last delivery p50 {f['last_delivery_ms']['p50']} ms, missing {f['missing']}, "
            f"server {f['server_us_per_delivery']} µs/delivery")
    system.check()
    return out


async def session_three_nodes(system: System, cfg: dict) -> dict:
    out: dict = {}
    per = [cfg["members"] // 3 + (1 if i < cfg["members"] % 3 else 0) for i in range(3)]
    t0 = time.monotonic()
    for node in range(3):
        await system.hold(node, per[node])
    out["connect_seconds"] = round(time.monotonic() - t0, 2)
    log(f"  {system.name} 3 nodes: {per} clients in {out['connect_seconds']} s")
    half = cfg["join_clients"] // 2
    holders = [(1, cid) for cid in system.ids(1, 0, half)] + [(2, cid) for cid in system.ids(2, 0, cfg["join_clients"] - half)]
    out["joins"] = await w_joins(system, holders, cfg["join_rooms"], "k")
    log(f"  {system.name} 3 nodes joins: {out['joins']['join']['per_sec']:,.0f}/s, leaves {out['joins']['leave']['per_sec']:,.0f}/s")
    everyone = [(node, cid) for node in range(3) for cid in system.ids(node)]
    t0 = time.perf_counter()
    await system.join_many([(n, c, "big") for n, c in everyone])
    q, got = await until_count(system, "big", len(everyone), 60)
    out["join_big_seconds"] = round(time.perf_counter() - t0, 3)
    out["presence"] = await w_presence(system, "big", len(everyone), cfg["queries"])
    log(f"  {system.name} 3 nodes presence {len(everyone)}: members p50 {out['presence']['members_ms']['p50']} ms "
        f"p99 {out['presence']['members_ms']['p99']} ms")
    system.check()
    return out


async def one_session(name: str, nodes: int, redis_url: str | None, redis_pid: int, cfg: dict) -> dict:
    system = SYSTEM_CLASSES[name](nodes, redis_url)
    if redis_url:
        system.extra_pids = [redis_pid]
    try:
        await system.start()
        if nodes == 1:
            return await session_one_node(system, cfg)
        return await session_three_nodes(system, cfg)
    finally:
        t0 = time.monotonic()
        await system.stop()
        log(f"  {name} stopped in {time.monotonic() - t0:.1f} s")


# ------------------------------------------------------------------ (c) with the load generator


def loadgen_fanout(cfg: dict, rounds: int) -> dict:
    """Our broker, 10,000 receivers, max rate: members in 1 room vs in 1 + 5 rooms (benches/run.py's systems)."""
    import run as suite

    raise_nofile()
    names = ["pystrands", "pystrands+5rooms"]
    systems = {s.name: s for s in suite.SYSTEMS if s.name in names}
    logdir = LOGDIR
    res: dict = {n: {"runs": []} for n in names}
    started = {}
    try:
        for n in names:
            started[n] = systems[n].start(logdir, "aiohttp")
        for i in range(rounds):
            order = names[i % 2:] + names[:i % 2]
            for n in order:
                run = started[n]
                load = os.getloadavg()[0]
                try:
                    r = suite.loadgen(["fanout", "--url", run.url("bench"), "--pub-url", run.url("pub"), "--clients", cfg["lg_clients"],
                                       "--seconds", cfg["lg_seconds"], "--warmup", 2.0, "--size", 64, "--rate", 0, "--window", 16,
                                       "--drain", 10], timeout=cfg["lg_seconds"] + 180, run=run)
                    run.check()
                    r["load_avg_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
                except Exception as e:
                    r = {"failed": str(e)[:400]}
                res[n]["runs"].append(r)
                log(f"loadgen fanout {n} run {i}: {r.get('deliveries_per_sec', 0):,.0f} deliveries/s, missing {r.get('missing')}, "
                    f"errors {(r.get('errors') or {}).get('count')}, cpu {r.get('cpu_cores')}")
                suite.settle(run)
    finally:
        for run in started.values():
            run.stop()
    for n in names:
        ok = sorted((r for r in res[n]["runs"] if "deliveries_per_sec" in r), key=lambda r: r["deliveries_per_sec"])
        res[n]["median"] = ok[(len(ok) - 1) // 2] if ok else None
    a, b = res["pystrands+5rooms"]["median"], res["pystrands"]["median"]
    res["ratio_5rooms_vs_1room"] = round(a["deliveries_per_sec"] / b["deliveries_per_sec"], 3) if a and b else None
    return res


# ------------------------------------------------------------------ environment and report


def prepare(systems: list[str]) -> dict[str, str]:
    problems: dict[str, str] = {}
    if not LOADGEN.exists():
        sys.exit(f"{LOADGEN} missing: cargo build --release -p pystrands-loadgen")
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    if "pondsocket" in systems:
        py = BENCH_VENV / "bin" / "python"
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=False)
        ok = subprocess.run([str(py), "-c", "import pondsocket, pondsocket_asgi, uvicorn, redis"], capture_output=True).returncode == 0
        if not ok:
            req = BENCHES / "requirements-bench.txt"
            log(f"installing benches/requirements-bench.txt into {BENCH_VENV}")
            subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(req)], check=False)
            ok = subprocess.run([str(py), "-c", "import pondsocket, pondsocket_asgi, uvicorn, redis"], capture_output=True).returncode == 0
        if not ok:
            problems["pondsocket"] = f"pondsocket / pondsocket-asgi / uvicorn / redis not importable in {BENCH_VENV}"
    if "centrifuge" in systems:
        go = shutil.which("go")
        src = Path(GOPATH) / "src/github.com/centrifugal/centrifuge"
        if go is None or not src.exists():
            problems["centrifuge"] = ("Go or the Centrifuge source is missing: apt-get install golang-go golang-github-centrifugal-centrifuge-dev "
                                      "golang-github-centrifugal-protocol-dev golang-github-fzambia-eagle-dev golang-github-igm-sockjs-go-dev "
                                      "golang-github-mna-redisc-dev")
        else:
            GO_PEER.parent.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ, GO111MODULE="off", GOPATH=GOPATH, GOCACHE=str(TARGET / "bench-peers" / "gocache"), GOFLAGS="")
            r = subprocess.run([go, "build", "-o", str(GO_PEER), "."], cwd=PEERS / "centrifuge", env=env, capture_output=True, text=True)
            if r.returncode != 0:
                problems["centrifuge"] = f"go build failed: {r.stderr.strip()[-400:]}"
    return problems


def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine_info() -> dict:
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    peers = sh([str(BENCH_VENV / "bin" / "python"), "-c",
                "import importlib.metadata as m\nfor p in ['pondsocket','pondsocket-asgi','pondsocket-common','uvicorn','websockets','redis']:\n"
                "  try: print(p, m.version(p))\n  except Exception: print(p, 'missing')"])
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "rustc": sh(["rustc", "--version"]), "go": sh(["go", "version"]), "redis": sh(["redis-server", "--version"]),
            "centrifuge": sh(["dpkg-query", "-W", "-f=${Version}", "golang-github-centrifugal-centrifuge-dev"]),
            "peers": dict(l.split(" ", 1) for l in peers.splitlines() if " " in l),
            "pystrands_commit": sh(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
            "nofile_hard_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1]}


def wait_quiet(max_wait: float) -> tuple[bool, list[float]]:
    seen = []
    end = time.monotonic() + max_wait
    while True:
        la = os.getloadavg()[0]
        seen.append(round(la, 2))
        if la < QUIET_LOAD:
            return True, seen
        if time.monotonic() > end:
            return False, seen
        log(f"1-minute load {la:.2f} >= {QUIET_LOAD}: waiting 30 s for a quiet machine")
        time.sleep(30)


def median_of(runs: list[dict], path: tuple) -> float | None:
    vals = []
    for r in runs:
        v = r
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
            if v is None:
                break
        if isinstance(v, (int, float)):
            vals.append(v)
    return statistics.median(vals) if vals else None


def fmt(v, unit: str = "", digits: int = 0) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}{unit}"


def _walk(obj, key: str):
    """Every value stored under `key` anywhere in `obj`."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key and isinstance(v, (int, float)):
                yield v
            else:
                yield from _walk(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v, key)


def summary(data: dict) -> str:
    res, cfg = data["results"], data["settings"]
    systems = [s for s in data["systems"] if s in res.get("one_node", {}) or s in res.get("three_nodes", {})]
    L = [f"# Rooms, users and presence (issue 15): {'quick' if data['quick'] else 'full'} run\n",
         f"Run {data['started']} – {data['finished']} with `python benches/rooms.py{' --quick' if data['quick'] else ''}`; "
         f"{data['machine']['cpu']}, {data['machine']['cores']} cores, Linux {data['machine']['kernel']}, Python {data['machine']['python']}; "
         f"commit {data['machine']['pystrands_commit']}. 1-minute load average before the run {data['load_before']}, at the start "
         f"{data['load_start']}, at the end {data['load_end']}{' — **provisional: the machine never got quiet**' if data['provisional'] else ''}. "
         f"Medians over {cfg['rounds']} round(s), the systems taking turns in each.\n"]
    others = [v for v in _walk(res, "others_cores")] + [v for v in _walk(res, "others")]
    if others:
        L.append(f"Other processes on the machine used at most {max(others):.2f} cores during any measurement "
                 f"(median {statistics.median(others):.2f}).\n")
    if data["problems"]:
        L.append("**Not measured:** " + "; ".join(f"{k}: {v}" for k, v in data["problems"].items()) + "\n")
    L.append("| measure | " + " | ".join(systems) + " |")
    L.append("|---|" + "---:|" * len(systems))

    def row(label: str, phase: str, path: tuple, unit: str = "", digits: int = 0) -> None:
        cells = []
        for s in systems:
            runs = [r for r in res.get(phase, {}).get(s, {}).get("runs", []) if "failed" not in r]
            cells.append(fmt(median_of(runs, path), unit, digits) if runs else ("failed" if res.get(phase, {}).get(s) else "–"))
        L.append(f"| {label} | " + " | ".join(cells) + " |")

    c = cfg
    row(f"(a) 1 node: joins/s ({c['join_clients']:,} clients × {c['join_rooms']} rooms)", "one_node", ("joins", "join", "per_sec"))
    row("(a) 1 node: leaves/s", "one_node", ("joins", "leave", "per_sec"))
    row("(a) 3 nodes: joins/s (clients on nodes 1-2, commands from node 0)", "three_nodes", ("joins", "join", "per_sec"))
    row("(a) 3 nodes: leaves/s", "three_nodes", ("joins", "leave", "per_sec"))
    row(f"(b) 3 nodes: members of a {c['members']:,}-member room, p50 ms", "three_nodes", ("presence", "members_ms", "p50"), "", 1)
    row("(b) 3 nodes: members, p99 ms", "three_nodes", ("presence", "members_ms", "p99"), "", 1)
    row("(b) 3 nodes: members, reply on the wire (raw link, no client library), p50 ms", "three_nodes", ("presence", "wire_members_ms", "p50"), "", 1)
    row("(b) 3 nodes: members, reply on the wire, p99 ms", "three_nodes", ("presence", "wire_members_ms", "p99"), "", 1)
    row("(b) 3 nodes: count, p50 ms", "three_nodes", ("presence", "count_ms", "p50"), "", 2)
    row(f"(b) 1 node: members of a {c['members']:,}-member room, p50 ms", "one_node", ("presence", "members_ms", "p50"), "", 1)
    row("(b) 1 node: members, p99 ms", "one_node", ("presence", "members_ms", "p99"), "", 1)
    row("(b) 1 node: members, reply on the wire, p50 ms", "one_node", ("presence", "wire_members_ms", "p50"), "", 1)
    row("(b) 1 node: count, p50 ms", "one_node", ("presence", "count_ms", "p50"), "", 2)
    for key, label in (("fanout_1room", "members in that room only"), ("fanout_6rooms", f"members in {c['extra_rooms']} more rooms")):
        row(f"(c) 1 node, {c['rate']:g} msg/s to {c['members']:,}, {label}: last delivery p50 ms", "one_node", (key, "last_delivery_ms", "p50"), "", 1)
        row("(c) same, last delivery p99 ms", "one_node", (key, "last_delivery_ms", "p99"), "", 1)
        row("(c) same, server CPU µs per delivery", "one_node", (key, "server_us_per_delivery"), "", 2)
        row("(c) same, missing deliveries", "one_node", (key, "missing"))
    lg = res.get("loadgen_fanout")
    if lg:
        one, five = lg["pystrands"].get("median"), lg["pystrands+5rooms"].get("median")
        L.append("")
        L.append(f"(c) our broker, Rust load generator, max rate (≤ 16 messages in flight), {c['lg_clients']:,} receivers, "
                 f"median of {len(lg['pystrands']['runs'])} alternating runs:\n")
        L.append("| receivers | deliveries/s | p50 ms | p99 ms | missing | runs (deliveries/s) |")
        L.append("|---|---:|---:|---:|---:|---|")
        for n, m, label in (("pystrands", one, "in room `bench` only"), ("pystrands+5rooms", five, "also in 5 other rooms each")):
            runs = ", ".join(f"{r['deliveries_per_sec']:,.0f}" for r in lg[n]["runs"] if "deliveries_per_sec" in r)
            if m:
                L.append(f"| {label} | {m['deliveries_per_sec']:,.0f} | {m['latency_us']['p50'] / 1000:.1f} | {m['latency_us']['p99'] / 1000:.1f} | "
                         f"{m['missing']:,} | {runs} |")
            else:
                L.append(f"| {label} | failed | | | | {lg[n]['runs'][:1]} |")
        if lg.get("ratio_5rooms_vs_1room"):
            L.append(f"\nRatio 5 extra rooms / one room: **{lg['ratio_5rooms_vs_1room']:.3f}x** (issue 15's target: ≥ 0.95x).\n")
    return "\n".join(L) + "\n"


async def amain(args, cfg: dict, systems: list[str], data: dict) -> None:
    res = data["results"]
    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    redis = proc("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
    try:
        await wait_port(redis_port, [redis])
        for phase, nodes in (("one_node", 1), ("three_nodes", 3)):
            for rnd in range(cfg["rounds"]):
                order = systems[rnd % len(systems):] + systems[:rnd % len(systems)]
                for name in order:
                    entry = res.setdefault(phase, {}).setdefault(name, {"runs": []})
                    log(f"{phase} round {rnd}: {name}")
                    subprocess.run(["redis-cli", "-p", str(redis_port), "flushall"], capture_output=True)
                    load = os.getloadavg()[0]
                    try:
                        r = await asyncio.wait_for(one_session(name, nodes, redis_url if nodes > 1 else None, redis.pid, cfg), cfg["session_timeout"])
                        r["load_avg_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
                    except BaseException as e:  # a failed system is reported; the run goes on
                        if isinstance(e, KeyboardInterrupt):
                            raise
                        r = {"failed": f"{type(e).__name__}: {e}"[:500]}
                        log(f"  {name} {phase}: FAILED {r['failed']}")
                    entry["runs"].append(r)
                    await asyncio.sleep(1.0)
    finally:
        redis.stop()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="rooms, users and presence: our broker vs PondSocket and Centrifuge")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--systems", default="pystrands,centrifuge,pondsocket")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--fanout-runs", type=int)
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a 1-minute load average below 1.0")
    ap.add_argument("--no-loadgen", action="store_true", help="skip (c) with the load generator")
    ap.add_argument("--out")
    ap.add_argument("--summary-only", action="store_true", help="rewrite summary.md from the output directory's rooms.json; run nothing")
    return ap


def check_args(args: argparse.Namespace) -> None:
    """Refuses (exit status 1, naming the choices) a system that does not exist."""
    unknown = sorted(set(s for s in args.systems.split(",") if s) - set(SYSTEM_CLASSES))
    if unknown:
        sys.exit(f"unknown systems {', '.join(unknown)}: pick from {', '.join(SYSTEM_CLASSES)}")


def main() -> None:
    args = parser().parse_args()
    check_args(args)
    if args.summary_only:
        out = Path(args.out) if args.out else BENCHES / "results" / "rooms" / ("quick" if args.quick else "")
        text = summary(json.loads((out / "rooms.json").read_text()))
        (out / "summary.md").write_text(text)
        print(text)
        return
    if not in_our_venv():
        py = OUR_VENV / "bin" / "python"
        if not py.exists():
            sys.exit(f"{py} missing: build this package first (maturin develop --release)")
        os.execv(str(py), [str(py), __file__, *sys.argv[1:]])
    raise_nofile()
    if args.quick:
        cfg = {"rounds": 1, "members": 2000, "join_clients": 600, "join_rooms": 5, "queries": 20, "rate": 2.0, "seconds": 3.0,
               "extra_rooms": 5, "lg_clients": 2000, "lg_seconds": 3.0, "fanout_runs": 2, "session_timeout": 600}
    else:
        cfg = {"rounds": 3, "members": 10000, "join_clients": 3000, "join_rooms": 5, "queries": 50, "rate": 2.0, "seconds": 8.0,
               "extra_rooms": 5, "lg_clients": 10000, "lg_seconds": 8.0, "fanout_runs": 5, "session_timeout": 900}
    if args.rounds:
        cfg["rounds"] = args.rounds
    if args.fanout_runs:
        cfg["fanout_runs"] = args.fanout_runs
    out = Path(args.out) if args.out else BENCHES / "results" / "rooms" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    systems = [s for s in args.systems.split(",") if s]
    problems = prepare(systems)
    systems = [s for s in systems if s not in problems]
    load_before = round(os.getloadavg()[0], 2)
    quiet, loads = (True, [load_before]) if args.no_wait else wait_quiet(600)
    data = {"quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": cfg, "machine": machine_info(),
            "systems": systems, "problems": problems, "load_before": load_before, "load_waited": loads, "load_start": round(os.getloadavg()[0], 2),
            "provisional": not quiet, "results": {}}
    log(f"systems: {', '.join(systems)}; not measured: {problems or 'none'}; load {data['load_start']}")
    t0 = time.time()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(amain(args, cfg, systems, data))
        if not args.no_loadgen and "pystrands" in systems:
            data["results"]["loadgen_fanout"] = loadgen_fanout(cfg, cfg["fanout_runs"])
    finally:
        data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        data["load_end"] = round(os.getloadavg()[0], 2)
        data["elapsed_seconds"] = round(time.time() - t0, 1)
        (out / "rooms.json").write_text(json.dumps(data, indent=1))
    text = summary(data)
    (out / "summary.md").write_text(text)
    log(f"done in {data['elapsed_seconds']} s: {out / 'rooms.json'}, {out / 'summary.md'}")
    print(text)


if __name__ == "__main__":
    main()
