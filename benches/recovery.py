#!/usr/bin/env python3
"""History and recovery (issue 17): a reconnect storm of browser clients that missed messages,
against our broker (`pystrands.1`) and Centrifuge (history and recovery on), on one node and on
three over Redis, with and without recovery, in one run on one machine.

    python benches/recovery.py            # full run: 10,000 clients, 5 rounds (about 5 minutes on 2 cores)
    python benches/recovery.py --quick    # 1,000 clients, 1 round: about 1 minute, for development

Options: `--systems pystrands,centrifuge`, `--nodes 1,3`, `--rounds N` (default 5), `--clients N`
(default 10,000), `--missed N` (default 50), `--concurrency N` (handshakes in flight, default 100),
`--no-burst` (skip the all-at-once variant), `--no-wait` (do not wait for a quiet machine),
`--no-build`, `--out DIR` (default benches/results/recovery, with --quick
benches/results/recovery/quick), `--summary-only` (rewrite summary.md from recovery.json).

What one run does (the client side is `pystrands-loadgen storm`, see benches/loadgen/src/storm.rs):

1. Starts the system fresh: our broker(s) `python -m pystrands server --history-size 100` (3
   nodes: `--redis-url`, one redis-server; history in Redis Streams), or the Centrifuge peer
   benches/peers/centrifuge (`-history-size 100 -recover`; 3 nodes: Redis broker with
   `UseStreams`, the same redis-server). `flushall` before every run.
2. The load generator (Rust, one thread) connects as the backend of every node of ours (v2,
   feature `history`; it accepts every client into room `storm`), opens N clients in room
   `storm` (ours: `Sec-WebSocket-Protocol: pystrands.1`, `connect`, `welcome`; Centrifuge:
   connect + subscribe in one frame), publishes a probe every client records as its position
   (offset, epoch), closes them all, and publishes 50 messages while nobody is connected (checked
   to be in the history). With 3 nodes the clients are spread round-robin and each comes back to
   the next node.
3. The driver samples CPU (/proc/<pid>/stat of every server process, redis-server, the load
   generator; /proc/stat for the machine), Redis `INFO commandstats`, the kernel's TCP counters
   (listen-queue overflows, SYN retransmits) and our brokers' /stats, then lets the storm go:
   every client reconnects at once, at most `--concurrency` TCP + WebSocket handshakes in flight
   (our broker listens with a backlog of 128: more in flight overflows its accept queue and the
   kernel drops SYNs, which costs the client a 1 s retransmit; `burst` runs, one per system and
   mode, use 10,000 in flight to show it). `recover`: with its session and its position, done when
   it has `welcome` with `recovered: true` and the 50 missed messages with exactly the offsets
   after its position, in order (Centrifuge: the subscribe reply with `recovered: true` and its
   50 publications, checked the same way). `plain`: the same reconnect with no position, done at
   the welcome (Centrifuge: the subscribe reply), which must name the room's current offset.
   The storm's time is until the last client is done. Then it samples again.

Systems, topologies and modes take turns within a round (the order rotates); medians over the
rounds are reported. Before measuring, the script waits (up to 10 minutes, checking every 30 s)
for a 1-minute load average below 1.0, and marks the results provisional if it never comes.
Writes `<out>/recovery.json` (machine, settings, every run with its samples) and
`<out>/summary.md` (the tables, also printed); process logs go to <target>/bench-recovery-logs/.
Everything runs on 127.0.0.1; every process is started in its own process group and stopped by
its pid; the script ends by itself. Needs `redis-server`, the load generator (built here:
`cargo build --release -p pystrands-loadgen`, under `flock /tmp/pystrands-build.lock`), this
package in `.venv` (release build), and for Centrifuge Debian's Go and library source (see
benches/rooms.py; built here offline).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from benchutil import Proc, free_port, raise_nofile, wait_port

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ROOT / "benches"
PEERS = BENCHES / "peers"
OUR_VENV = ROOT / ".venv"
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
LOADGEN = TARGET / "release" / "pystrands-loadgen"
GO_PEER = TARGET / "bench-peers" / "centrifuge-peer"
LOGDIR = TARGET / "bench-recovery-logs"
GOPATH = "/usr/share/gocode"
BUILD_LOCK = "/tmp/pystrands-build.lock"
QUIET_LOAD = 1.0
HISTORY_SIZE = 100
SYSTEMS = ("pystrands", "centrifuge")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ measuring


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy() -> float:
    """CPU time used by every process on the machine so far (user + nice + system)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2]) / os.sysconf("SC_CLK_TCK")


TCP_KEYS = ("TcpExt:ListenOverflows", "TcpExt:TCPSynRetrans")


def tcp_counters() -> dict[str, int]:
    """The kernel's TCP counters of /proc/net/netstat the storm can trip."""
    out = {}
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for head, vals in zip(lines[::2], lines[1::2]):
        prefix = head.split(":", 1)[0]
        for k, v in zip(head.split()[1:], vals.split()[1:]):
            if f"{prefix}:{k}" in TCP_KEYS:
                out[f"{prefix}:{k}"] = int(v)
    return out


def redis_commandstats(port: int) -> dict[str, int]:
    """`INFO commandstats` of the redis-server on `port`: calls per command (commands run by
    scripts are counted too)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"INFO commandstats\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, _, rest = data.partition(b"\r\n")
            if head.startswith(b"$") and len(rest) >= int(head[1:]):
                break
    calls = {}
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line[len("cmdstat_"):].partition(":")
            for kv in fields.split(","):
                if kv.startswith("calls="):
                    calls[name] = int(kv[6:])
    return calls


def broker_stats(port: int | None) -> dict:
    if port is None:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return {}


class Sample:
    def __init__(self, server_pids: list[int], redis_pid: int | None, redis_port: int | None, loadgen_pid: int,
                 stats_ports: list[int | None]):
        self.t = time.monotonic()
        self.servers = [cpu_seconds(p) for p in server_pids]
        self.redis = cpu_seconds(redis_pid) if redis_pid else 0.0
        self.loadgen = cpu_seconds(loadgen_pid)
        self.busy = machine_busy()
        self.tcp = tcp_counters()
        self.cmds = redis_commandstats(redis_port) if redis_port else {}
        self.stats = [broker_stats(p) for p in stats_ports]


def deltas(a: Sample, b: Sample, clients: int) -> dict:
    wall = max(b.t - a.t, 1e-9)
    servers = [round(y - x, 3) for x, y in zip(a.servers, b.servers)]
    redis = b.redis - a.redis
    loadgen = b.loadgen - a.loadgen
    others = max(0.0, b.busy - a.busy - sum(servers) - redis - loadgen)
    cmds = {k: v - a.cmds.get(k, 0) for k, v in b.cmds.items() if v - a.cmds.get(k, 0) > 0}
    cmds.pop("info", None)  # the samples' own INFO
    out = {
        "wall_s": round(wall, 3),
        "server_cpu_s": round(sum(servers), 3),
        "server_cpu_s_per_node": servers,
        "redis_cpu_s": round(redis, 3),
        "loadgen_cpu_s": round(loadgen, 3),
        "others_cores": round(others / wall, 2),
        "tcp": {k: b.tcp.get(k, 0) - a.tcp.get(k, 0) for k in TCP_KEYS},
    }
    if a.cmds or b.cmds:
        total = sum(cmds.values())
        out["redis_calls"] = dict(sorted(cmds.items(), key=lambda kv: -kv[1]))
        out["redis_calls_total"] = total
        out["redis_calls_per_client"] = round(total / clients, 2)
    if any(a.stats) and any(b.stats):
        keys = ("recoveries", "recoveries_failed", "messages_replayed", "connections_accepted", "browser_protocol_errors")
        out["broker_stats"] = {k: sum(s.get(k, 0) for s in b.stats) - sum(s.get(k, 0) for s in a.stats) for k in keys}
    return out


# ------------------------------------------------------------------ systems


def proc(name: str, argv: list[str]) -> Proc:
    LOGDIR.mkdir(parents=True, exist_ok=True)
    return Proc(name, argv, LOGDIR)


class Servers:
    """One system on `nodes` nodes: started fresh for every run."""

    def __init__(self, system: str, nodes: int, redis_url: str | None):
        self.system, self.nodes, self.redis_url = system, nodes, redis_url
        self.procs: list[Proc] = []
        self.urls: list[str] = []
        self.backends: list[str] = []
        self.stats_ports: list[int | None] = []

    def start(self) -> None:
        try:
            for i in range(self.nodes):
                ws = free_port()
                if self.system == "pystrands":
                    tcp, metrics = free_port(), free_port()
                    argv = [str(OUR_VENV / "bin" / "python"), "-m", "pystrands", "server", "--host", "127.0.0.1", "--ws-port", str(ws),
                            "--tcp-port", str(tcp), "--log-level", "error", "--history-size", str(HISTORY_SIZE),
                            "--metrics-bind", f"127.0.0.1:{metrics}"]
                    if self.redis_url:
                        argv += ["--redis-url", self.redis_url, "--cluster-node-id", f"recovery-{i}"]
                    p = proc(f"pystrands-{self.nodes}n-{i}", argv)
                    self.procs.append(p)
                    wait_port(tcp, 30.0, p.check_alive)
                    wait_port(ws, 30.0, p.check_alive)
                    self.urls.append(f"ws://127.0.0.1:{ws}/storm")
                    self.backends.append(f"127.0.0.1:{tcp}")
                    self.stats_ports.append(metrics)
                else:
                    argv = [str(GO_PEER), "-port", str(ws), "-history-size", str(HISTORY_SIZE), "-recover"]
                    if self.redis_url:
                        argv += ["-redis", self.redis_url.split("//", 1)[1].split("/", 1)[0]]
                    p = proc(f"centrifuge-{self.nodes}n-{i}", argv)
                    self.procs.append(p)
                    wait_port(ws, 30.0, p.check_alive)
                    self.urls.append(f"ws://127.0.0.1:{ws}/connection/websocket")
                    self.stats_ports.append(None)
            if self.nodes > 1:
                time.sleep(1.5)  # our nodes learn of each other through their first presence reports
        except BaseException:
            self.stop()
            raise

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check(self) -> None:
        for p in self.procs:
            p.check_alive()

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs = []


def storm(system: str, nodes: int, recover: bool, concurrency: int, cfg: dict, redis: Proc | None, redis_port: int | None,
          source_base: int) -> dict:
    """One run: fresh servers, the load generator's setup, the measured storm."""
    if redis_port:
        subprocess.run(["redis-cli", "-p", str(redis_port), "flushall"], capture_output=True, timeout=20)
    redis_url = f"redis://127.0.0.1:{redis_port}/0" if nodes > 1 else None
    servers = Servers(system, nodes, redis_url)
    servers.start()
    lg = None
    try:
        argv = [str(LOADGEN), "storm", "--system", system, "--urls", ",".join(servers.urls), "--clients", str(cfg["clients"]),
                "--missed", str(cfg["missed"]), "--recover", "true" if recover else "false", "--concurrency", str(concurrency),
                "--sources", str(cfg["sources"]), "--source-base", str(source_base), "--shift", "1" if nodes > 1 else "0",
                "--wait-go", "--timeout", "180"]
        if system == "pystrands":
            argv += ["--backends", ",".join(servers.backends)]
        LOGDIR.mkdir(parents=True, exist_ok=True)
        err = open(LOGDIR / "loadgen.log", "ab")
        lg = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                              start_new_session=True, preexec_fn=raise_nofile)
        err.close()
        watchdog = threading.Timer(cfg["run_timeout"], lambda: lg.poll() is None and os.killpg(lg.pid, 9))
        watchdog.start()
        try:
            first = json.loads(lg.stdout.readline() or '{"error": "the load generator said nothing (killed?)"}')
            if first.get("event") != "published":
                raise RuntimeError(f"setup failed: {json.dumps(first)[:600]}")
            servers.check()
            redis_pid = redis.pid if (redis and nodes > 1) else None
            rport = redis_port if nodes > 1 else None
            load = os.getloadavg()[0]
            before = Sample(servers.pids(), redis_pid, rport, lg.pid, servers.stats_ports)
            lg.stdin.write("go\n")
            lg.stdin.flush()
            line = lg.stdout.readline()
            after = Sample(servers.pids(), redis_pid, rport, lg.pid, servers.stats_ports)
            out = json.loads(line or '{"error": "the load generator said nothing (killed?)"}')
            if "error" in out:
                raise RuntimeError(f"storm failed: {json.dumps(out)[:600]}")
            lg.wait(timeout=30)
        finally:
            watchdog.cancel()
        servers.check()
        out["during_storm"] = deltas(before, after, cfg["clients"])
        out["load_avg_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        for k in ("welcome_us", "done_us"):  # the curve is for plots; keep the percentiles
            out.get(k, {}).pop("curve", None)
        return out
    finally:
        if lg is not None and lg.poll() is None:
            try:
                os.killpg(lg.pid, 9)
            except ProcessLookupError:
                pass
            lg.wait()
        servers.stop()


# ------------------------------------------------------------------ environment


def prepare(systems: list[str], build: bool) -> dict[str, str]:
    problems: dict[str, str] = {}
    env = dict(os.environ, CARGO_TARGET_DIR=str(TARGET))
    lock = ["flock", BUILD_LOCK] if shutil.which("flock") else []
    if build:
        log("cargo build --release -p pystrands-loadgen")
        if subprocess.run([*lock, "cargo", "build", "--release", "-q", "-p", "pystrands-loadgen"], cwd=ROOT, env=env).returncode != 0:
            sys.exit("building the load generator failed")
    if not LOADGEN.exists():
        sys.exit(f"{LOADGEN} missing: cargo build --release -p pystrands-loadgen")
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is needed (3 nodes)")
    if "pystrands" in systems and subprocess.run([str(OUR_VENV / "bin" / "python"), "-c", "import pystrands._core"],
                                                 capture_output=True).returncode != 0:
        problems["pystrands"] = f"{OUR_VENV} has no built pystrands (maturin develop --release)"
    if "centrifuge" in systems:
        go = shutil.which("go")
        if go is None or not (Path(GOPATH) / "src/github.com/centrifugal/centrifuge").exists():
            problems["centrifuge"] = "Go or the Centrifuge source is missing (see benches/rooms.py)"
        elif build or not GO_PEER.exists():
            GO_PEER.parent.mkdir(parents=True, exist_ok=True)
            genv = dict(os.environ, GO111MODULE="off", GOPATH=GOPATH, GOCACHE=str(TARGET / "bench-peers" / "gocache"), GOFLAGS="")
            r = subprocess.run([*lock, go, "build", "-o", str(GO_PEER), "."], cwd=PEERS / "centrifuge", env=genv, capture_output=True, text=True)
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
    core = next(iter((OUR_VENV / "lib").glob("python3*/site-packages/pystrands/_core*.so")), None)
    build = "?"
    if core is not None:
        st = core.stat()
        build = f"{core.name}, {st.st_size:,} bytes, built {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(st.st_mtime))}"
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "rustc": sh(["rustc", "--version"]), "go": sh(["go", "version"]), "redis": sh(["redis-server", "--version"]),
            "centrifuge": sh(["dpkg-query", "-W", "-f=${Version}", "golang-github-centrifugal-centrifuge-dev"]),
            "pystrands_commit": sh(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
            "pystrands_dirty": sh(["git", "-C", str(ROOT), "status", "--short", "--", "rust", "python"]).splitlines(),
            "pystrands_build": build, "somaxconn": sh(["cat", "/proc/sys/net/core/somaxconn"]),
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


# ------------------------------------------------------------------ report


def med(runs: list[dict], *path: str) -> float | None:
    vals = []
    for r in runs:
        v = r
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            vals.append(v)
    return statistics.median(vals) if vals else None


def fmt(v, digits: int = 0, unit: str = "") -> str:
    return "–" if v is None else f"{v:,.{digits}f}{unit}"


def ok_runs(res: dict, key: str) -> list[dict]:
    return [r for r in res.get(key, {}).get("runs", []) if "failed" not in r]


def summary(data: dict) -> str:
    cfg, res, m = data["settings"], data["results"], data["machine"]
    L = [f"# History and recovery (issue 17): {'quick' if data['quick'] else 'full'} run\n",
         f"Run {data['started']} – {data.get('finished', '?')} with `python benches/recovery.py{' --quick' if data['quick'] else ''}`; "
         f"{m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, Redis {m['redis'].split(' ')[2] if m['redis'].count(' ') > 2 else m['redis']}, "
         f"Centrifuge {m['centrifuge']}; commit {m['pystrands_commit']}{' + uncommitted changes in rust/ or python/' if m['pystrands_dirty'] else ''} "
         f"({m['pystrands_build']}). 1-minute load average before the run {data['load_before']}, at the start {data['load_start']}, "
         f"at the end {data.get('load_end', '?')}{' — **provisional: the machine never got quiet**' if data['provisional'] else ''}.\n",
         f"{cfg['clients']:,} clients in one room, history size {HISTORY_SIZE}, {cfg['missed']} missed messages; "
         f"at most {cfg['concurrency']} handshakes in flight; medians of {cfg['rounds']} round(s), systems and modes taking turns. "
         "`recover`: back with session + position, done with `welcome` `recovered: true` and every missed message checked "
         "(offset, order, epoch, data); `plain`: back with no position, done at the welcome. CPU seconds are over the storm only.\n"]
    others = [r["during_storm"]["others_cores"] for k in res for r in ok_runs(res, k)]
    if others:
        L.append(f"Other processes used at most {max(others):.2f} cores during any storm (median {statistics.median(others):.2f}).\n")
    if data["problems"]:
        L.append("**Not measured:** " + "; ".join(f"{k}: {v}" for k, v in data["problems"].items()) + "\n")
    failed = [f"{k} run {i}: {r['failed'][:200]}" for k in res for i, r in enumerate(res[k].get("runs", [])) if "failed" in r]
    if failed:
        L.append("**Failed runs:** " + "; ".join(failed) + "\n")
    L.append("| system | nodes | mode | storm s | welcome p50 / p99 ms | done p99 ms | server CPU s | CPU ms per client | "
             "Redis calls per client | Redis CPU s | loadgen CPU s | SYN drops | checked | errors | runs (storm s) |")
    L.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for system in data["systems"]:
        for nodes in cfg["nodes"]:
            for mode in ("recover", "plain"):
                key = f"{system}/{nodes}/{mode}"
                runs = ok_runs(res, key)
                if not runs:
                    if key in res:
                        L.append(f"| {system} | {nodes} | {mode} | failed | | | | | | | | | | | |")
                    continue
                cpu = med(runs, "during_storm", "server_cpu_s")
                each = ", ".join(f"{r['storm_seconds']:.2f}" for r in runs)
                L.append(
                    f"| {system} | {nodes} | {mode} | {fmt(med(runs, 'storm_seconds'), 2)} | "
                    f"{fmt(med(runs, 'welcome_us', 'p50') / 1000 if med(runs, 'welcome_us', 'p50') else None, 0)} / "
                    f"{fmt(med(runs, 'welcome_us', 'p99') / 1000 if med(runs, 'welcome_us', 'p99') else None, 0)} | "
                    f"{fmt(med(runs, 'done_us', 'p99') / 1000 if med(runs, 'done_us', 'p99') else None, 0)} | {fmt(cpu, 2)} | "
                    f"{fmt(cpu * 1000 / cfg['clients'] if cpu is not None else None, 3)} | "
                    f"{fmt(med(runs, 'during_storm', 'redis_calls_per_client'), 2) if nodes > 1 else '–'} | "
                    f"{fmt(med(runs, 'during_storm', 'redis_cpu_s'), 2) if nodes > 1 else '–'} | "
                    f"{fmt(med(runs, 'during_storm', 'loadgen_cpu_s'), 2)} | "
                    f"{sum(r['during_storm']['tcp'].get('TcpExt:ListenOverflows', 0) for r in runs):,} | "
                    f"{sum(r['completed'] for r in runs):,} / {sum(r['replayed_messages_checked'] for r in runs):,} | "
                    f"{sum(r['errors']['count'] for r in runs)} | {each} |")
    L.append("\n`checked`: clients done / missed messages checked, over all runs. `SYN drops`: the kernel's listen-queue "
             "overflows during the storms (TcpExt:ListenOverflows), summed over the runs; each costs a client a 1 s SYN retransmit.\n")
    # Recovery's price: recover over plain, and ours over Centrifuge.
    L.append("| nodes | measure | " + " | ".join(f"{s}: recover / plain" for s in data["systems"]) + " | pystrands / centrifuge (recover) |")
    L.append("|---:|---|" + "---:|" * (len(data["systems"]) + 1))
    for nodes in cfg["nodes"]:
        for label, path in (("storm s", ("storm_seconds",)), ("server CPU s", ("during_storm", "server_cpu_s")),
                            ("Redis calls", ("during_storm", "redis_calls_total"))):
            if label == "Redis calls" and nodes == 1:
                continue
            cells, rec = [], {}
            for s in data["systems"]:
                r, p = med(ok_runs(res, f"{s}/{nodes}/recover"), *path), med(ok_runs(res, f"{s}/{nodes}/plain"), *path)
                rec[s] = r
                cells.append(f"{fmt(r, 2)} / {fmt(p, 2)} = {r / p:.2f}x" if r and p else "–")
            ratio = rec.get("pystrands") / rec["centrifuge"] if rec.get("pystrands") and rec.get("centrifuge") else None
            L.append(f"| {nodes} | {label} | " + " | ".join(cells) + f" | {fmt(ratio, 2, 'x')} |")
    # Redis calls per recovered client, by command (3 nodes).
    for system in data["systems"]:
        for mode in ("recover", "plain"):
            runs = ok_runs(res, f"{system}/3/{mode}")
            if not runs:
                continue
            cmds = sorted({c for r in runs for c in r["during_storm"].get("redis_calls", {})})
            per = {c: statistics.median([r["during_storm"].get("redis_calls", {}).get(c, 0) for r in runs]) / cfg["clients"] for c in cmds}
            per = {c: v for c, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.005}
            if per:
                L.append(f"\nRedis calls per client, {system}, 3 nodes, {mode} (median of the runs; commands run by scripts "
                         "counted too): " + ", ".join(f"`{c}` {v:.2f}" for c, v in per.items()))
    burst = {k: v for k, v in res.items() if k.startswith("burst:")}
    if burst:
        L.append(f"\n**All at once** ({cfg['burst_concurrency']:,} handshakes in flight, 1 node, one run each):\n")
        L.append("| system | mode | storm s | welcome p50 / p99 ms | server CPU s | SYN drops (listen overflows) | SYN retransmits | errors |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for key, entry in burst.items():
            _, system, mode = key.split(":")
            for r in entry.get("runs", []):
                if "failed" in r:
                    L.append(f"| {system} | {mode} | failed: {r['failed'][:120]} | | | | | |")
                    continue
                d = r["during_storm"]
                L.append(f"| {system} | {mode} | {r['storm_seconds']:.2f} | {r['welcome_us']['p50'] / 1000:,.0f} / "
                         f"{r['welcome_us']['p99'] / 1000:,.0f} | {d['server_cpu_s']:.2f} | {d['tcp'].get('TcpExt:ListenOverflows', 0):,} | "
                         f"{d['tcp'].get('TcpExt:TCPSynRetrans', 0):,} | {r['errors']['count']} |")
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------ main


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="reconnect storm with recovery: our broker vs Centrifuge")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--nodes", default="1,3")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--clients", type=int)
    ap.add_argument("--missed", type=int)
    ap.add_argument("--concurrency", type=int)
    ap.add_argument("--no-burst", action="store_true", help="skip the all-at-once runs")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a 1-minute load average below 1.0")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--summary-only", action="store_true", help="rewrite summary.md from the output directory's recovery.json")
    return ap


def check_args(args: argparse.Namespace) -> None:
    """Refuses (exit status 1, naming the choices) a system that does not exist."""
    unknown = sorted(set(s for s in args.systems.split(",") if s) - set(SYSTEMS))
    if unknown:
        sys.exit(f"unknown systems {', '.join(unknown)}: pick from {', '.join(SYSTEMS)}")


def main() -> None:
    args = parser().parse_args()
    check_args(args)
    out = Path(args.out) if args.out else BENCHES / "results" / "recovery" / ("quick" if args.quick else "")
    if args.summary_only:
        text = summary(json.loads((out / "recovery.json").read_text()))
        (out / "summary.md").write_text(text)
        print(text)
        return
    raise_nofile()
    if args.quick:
        cfg = {"clients": 1000, "missed": 50, "rounds": 1, "concurrency": 100, "burst_concurrency": 1000}
    else:
        cfg = {"clients": 10000, "missed": 50, "rounds": 5, "concurrency": 100, "burst_concurrency": 10000}
    for k in ("clients", "missed", "rounds", "concurrency"):
        if getattr(args, k):
            cfg[k] = getattr(args, k)
    cfg.update({"nodes": [int(n) for n in args.nodes.split(",") if n], "history_size": HISTORY_SIZE, "sources": 4,
                "run_timeout": 600, "burst": not args.no_burst})
    systems = [s for s in args.systems.split(",") if s]
    out.mkdir(parents=True, exist_ok=True)
    problems = prepare(systems, not args.no_build)
    systems = [s for s in systems if s not in problems]
    load_before = round(os.getloadavg()[0], 2)
    quiet, loads = (True, [load_before]) if args.no_wait else wait_quiet(600)
    data = {"quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": cfg, "machine": machine_info(),
            "systems": systems, "problems": problems, "load_before": load_before, "load_waited": loads,
            "load_start": round(os.getloadavg()[0], 2), "provisional": not quiet, "results": {}}
    res = data["results"]
    log(f"systems: {', '.join(systems)}; nodes {cfg['nodes']}; not measured: {problems or 'none'}; load {data['load_start']}")
    redis_port = free_port()
    redis = proc("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
    t0 = time.time()
    run_no = 0

    def one(key: str, system: str, nodes: int, recover: bool, concurrency: int) -> None:
        nonlocal run_no
        # source addresses disjoint from the last few runs' (their closes leave TIME_WAIT entries)
        base = 1 + (run_no * 2 * cfg["sources"]) % (248 - 2 * cfg["sources"])
        run_no += 1
        entry = res.setdefault(key, {"runs": []})
        log(f"{key} (concurrency {concurrency})")
        try:
            r = storm(system, nodes, recover, concurrency, cfg, redis, redis_port, base)
            d = r["during_storm"]
            log(f"  storm {r['storm_seconds']:.2f} s, done {r['completed']:,}, checked {r['replayed_messages_checked']:,}, "
                f"errors {r['errors']['count']}, server CPU {d['server_cpu_s']} s, redis calls/client {d.get('redis_calls_per_client', '-')}, "
                f"loadgen CPU {d['loadgen_cpu_s']} s, others {d['others_cores']} cores, tcp {d['tcp']}")
        except Exception as e:  # a failed run is reported; the benchmark goes on
            r = {"failed": f"{type(e).__name__}: {e}"[:800]}
            log(f"  FAILED {r['failed']}")
        entry["runs"].append(r)
        time.sleep(1.0)

    try:
        wait_port(redis_port, 20.0, redis.check_alive)
        for rnd in range(cfg["rounds"]):
            for nodes in cfg["nodes"]:
                order = systems[rnd % len(systems):] + systems[:rnd % len(systems)]
                modes = [True, False] if rnd % 2 == 0 else [False, True]
                for system in order:
                    for recover in modes:
                        one(f"{system}/{nodes}/{'recover' if recover else 'plain'}", system, nodes, recover, cfg["concurrency"])
        if cfg["burst"] and 1 in cfg["nodes"]:
            for system in systems:
                for recover in (True, False):
                    one(f"burst:{system}:{'recover' if recover else 'plain'}", system, 1, recover, cfg["burst_concurrency"])
    finally:
        redis.stop()
        data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        data["load_end"] = round(os.getloadavg()[0], 2)
        data["elapsed_seconds"] = round(time.time() - t0, 1)
        (out / "recovery.json").write_text(json.dumps(data, indent=1))
    text = summary(data)
    (out / "summary.md").write_text(text)
    log(f"done in {data['elapsed_seconds']} s: {out / 'recovery.json'}, {out / 'summary.md'}")
    print(text)


if __name__ == "__main__":
    main()
