#!/usr/bin/env python3
"""Benchmark suite: our broker side by side with real peers, in one run on one machine.

    python benches/run.py            # full run (about 15 minutes on 2 cores)
    python benches/run.py --quick    # under 3 minutes: fewer clients, seconds and runs

What it does, all on 127.0.0.1, everything started here and stopped here (process groups):

1. Environment: `benches/.venv-bench` (peers + matplotlib, benches/requirements-bench.txt),
   `.venv-v1` (PyStrands 1.0 from PyPI), `.venv` (this package, release build via maturin),
   and `cargo build --release -p pystrands-loadgen` (the load generator, the bare tokio ceiling
   and a Rust backend). Missing pieces are created; a peer that cannot be installed is reported
   in the summary, not silently left out.
2. Systems under test, each started on free ports as its own process (group):
   * `pystrands`: our broker (`python -m pystrands server`) + our AsyncPyStrandsClient backend
   * `pystrands+inproc`: our broker with the same backend in the broker's process (no TCP between them)
   * `pystrands+inproc-uvloop`: the same, on uvloop (`async with Broker.serving(backend)`)
   * `pystrands+uvloop`: the same, with the backend on uvloop instead of asyncio's own loop
   * `pystrands+pure-python`: the same, with the native inbound codec off (`PYSTRANDS_PURE_PYTHON=1`)
   * `pystrands+history`: the same, with the broker started with `--history-size 100` (W2, W5)
   * `pystrands+structured`, `pystrands+history+structured`: the same two with receivers speaking
     the browser protocol `pystrands.1` (W2, W5)
   * `pystrands@baseline` (only with `--baseline DIR`): broker and backend from an earlier build in DIR
   * `pystrands+v1-client`: our broker + the PyStrands 1.0 async client (PyPI) as the backend
   * `pystrands+rust-backend`: our broker + a Rust backend (accepting/handling done in Rust)
   * `pystrands+token`: our broker with `jwt_secret` (issue 18); the load generator's clients carry
     a signed connection token (`?token=`, HS256, made here with hmac/hashlib) and the broker
     accepts them itself, no `connection_request`; our Python backend stays connected (it gets
     the `new_connection` events)
   * `pystrands+tls`: our broker with `tls_cert`/`tls_key` (wss:// only), a self-signed EC P-256
     certificate for 127.0.0.1 made with `openssl` at the start of the run in a temporary
     directory; the load generator trusts it (`--ca`)
   * `python-socketio`: python-socketio on aiohttp + uvloop (or uvicorn, `--socketio-server`)
   * `websockets`: a hand-written broker on the `websockets` package
   * `tokio-ceiling`: a bare tokio WebSocket server (no rooms, no protocol, no Python)
   * `picows`: a picows echo server (echo only): the ceiling with Python in the loop
3. Workloads (benches/loadgen): W1 echo, W2 room fan-out (fixed and max rate), W3 idle RSS,
   W4 connect storm, W5 broadcast. Each is run `--runs` times per system (median reported).
4. Writes benches/results/<workload>.json, benches/results/summary.md (tables, ratios vs the
   targets of issue 5, machine info, CPU used by each part) and PNG plots (throughput, latency
   curves, RSS); `--quick` writes the same into benches/results/quick/.

Numbers measured while the 1-minute load average is above 1.5 (other work on the machine) are
marked provisional in the summary.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import hashlib
import hmac
import json
import os
import platform
import resource
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import Proc, free_port, raise_nofile, rss_kib, wait_port

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ROOT / "benches"
RESULTS = BENCHES / "results"
PEERS = BENCHES / "peers"
BENCH_VENV = BENCHES / ".venv-bench"
OUR_VENV = ROOT / ".venv"
V1_VENV = ROOT / ".venv-v1"
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
BIN = TARGET / "release"
LOADGEN = BIN / "pystrands-loadgen"

PROVISIONAL_LOAD = 1.5
PROVISIONAL_OTHERS = 0.25  # cores used by processes that are not part of the measurement

# ------------------------------------------------------------------ environment


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_env(skip_build: bool) -> dict[str, str]:
    """Creates what is missing (unless skip_build: then only checks). Returns {component: problem}."""
    problems: dict[str, str] = {}
    req = BENCHES / "requirements-bench.txt"
    marker = BENCH_VENV / ".installed"
    env = dict(os.environ, CARGO_TARGET_DIR=str(TARGET))
    if not skip_build:
        if not venv_python(BENCH_VENV).exists():
            log(f"creating {BENCH_VENV} (peers + matplotlib)")
            subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        if not marker.exists() or marker.read_text() != req.read_text():
            log("installing the peers into the bench venv (benches/requirements-bench.txt)")
            r = subprocess.run([str(venv_python(BENCH_VENV)), "-m", "pip", "install", "-q", "-r", str(req)])
            if r.returncode == 0:
                marker.write_text(req.read_text())
        if not venv_python(V1_VENV).exists():
            log(f"creating {V1_VENV} with pystrands==1.0.0 from PyPI")
            subprocess.run([sys.executable, "-m", "venv", str(V1_VENV)], check=True)
            subprocess.run([str(venv_python(V1_VENV)), "-m", "pip", "install", "-q", "pystrands==1.0.0"])
        if not _imports(OUR_VENV, "pystrands._core"):
            log(f"building our package into {OUR_VENV} (maturin develop --release)")
            if not venv_python(OUR_VENV).exists():
                subprocess.run([sys.executable, "-m", "venv", str(OUR_VENV)], check=True)
            subprocess.run([str(venv_python(OUR_VENV)), "-m", "pip", "install", "-q", "maturin"], check=True)
            subprocess.run([str(OUR_VENV / "bin" / "maturin"), "develop", "--release"], cwd=ROOT, env=env)
        if venv_python(OUR_VENV).exists() and not _imports(OUR_VENV, "uvloop"):
            log(f"installing uvloop into {OUR_VENV} (the pystrands+uvloop backend), the version the bench venv pins")
            pin = next((line.strip() for line in req.read_text().splitlines() if line.startswith("uvloop")), "uvloop")
            subprocess.run([str(venv_python(OUR_VENV)), "-m", "pip", "install", "-q", pin])
        log("cargo build --release -p pystrands-loadgen")
        if subprocess.run(["cargo", "build", "--release", "-q", "-p", "pystrands-loadgen"], cwd=ROOT, env=env).returncode != 0:
            sys.exit("building the load generator failed")
    if not LOADGEN.exists():
        sys.exit(f"{LOADGEN} missing: run without --no-build")
    if not marker.exists() or marker.read_text() != req.read_text():
        problems["bench venv"] = f"pip install -r {req.name} into {BENCH_VENV.name} did not succeed"
    if not _imports(V1_VENV, "pystrands"):
        problems["pystrands 1.0"] = "pip install pystrands==1.0.0 did not succeed"
    if not _imports(OUR_VENV, "pystrands._core"):
        problems["pystrands"] = f"{OUR_VENV} has no built pystrands (maturin develop --release failed?)"
    if not _imports(OUR_VENV, "uvloop"):
        problems["pystrands+uvloop"] = f"uvloop is not installed in {OUR_VENV}"
    return problems


def _imports(venv: Path, module: str) -> bool:
    py = venv_python(venv)
    return py.exists() and subprocess.run([str(py), "-c", f"import {module}"], capture_output=True).returncode == 0


# ------------------------------------------------------------------ tokens and TLS (issue 18)

# The HMAC key of `pystrands+token`'s broker (given to it in PYSTRANDS_JWT_SECRET, not on its
# command line) and of the tokens the load generator's clients carry.
JWT_SECRET = secrets.token_hex(32)
TOKEN_TTL = 3600.0


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def make_token(room: str, secret: str = JWT_SECRET, ttl: float = TOKEN_TTL) -> str:
    """A signed connection token (JWT, HS256): user `bench`, first room `room`, valid for `ttl` s;
    no `cid`, so every connection made with it gets a fresh client id."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = _b64url(json.dumps({"sub": "bench", "room": room, "exp": int(time.time() + ttl)}, separators=(",", ":")).encode())
    signing_input = f"{header}.{claims}".encode()
    signature = _b64url(hmac.new(secret.encode(), signing_input, hashlib.sha256).digest())
    return f"{header}.{claims}.{signature}"


_TLS_FILES: tuple[str, str] | None = None


def tls_files() -> tuple[str, str]:
    """(certificate, key) PEM paths for `pystrands+tls`: a self-signed EC P-256 certificate for
    IP 127.0.0.1 and localhost, made with `openssl` once per run in a temporary directory (removed
    at exit). The load generator trusts the certificate itself (`--ca`)."""
    global _TLS_FILES
    if _TLS_FILES is None:
        if not shutil.which("openssl"):
            raise RuntimeError("the openssl command is needed to make the TLS certificate")
        d = tempfile.mkdtemp(prefix="pystrands-bench-tls-")
        atexit.register(shutil.rmtree, d, True)
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                            "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                            "-addext", "basicConstraints=critical,CA:FALSE",
                            "-addext", "keyUsage=critical,digitalSignature",
                            "-addext", "extendedKeyUsage=serverAuth"], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"openssl req failed: {r.stderr.strip()[-400:]}")
        _TLS_FILES = (cert, key)
    return _TLS_FILES


# ------------------------------------------------------------------ processes


def wait_upgrade(port: int, path: str, procs: list[Proc], timeout: float = 30.0, ca: str | None = None) -> None:
    """Waits until a WebSocket upgrade on `path` answers 101 (our broker: 503 until a backend is up);
    with `ca`, over TLS trusting that certificate."""
    end = time.monotonic() + timeout
    tls = ssl.create_default_context(cafile=ca) if ca else None
    req = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    status = ""
    while time.monotonic() < end:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited: {p.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                s = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
                s.sendall(req)
                status = s.recv(200).decode(errors="replace").split("\r\n", 1)[0]
                if " 101 " in status + " ":
                    return
        except OSError as e:
            status = str(e)
        time.sleep(0.1)
    raise RuntimeError(f"no WebSocket upgrade on port {port}{path} after {timeout} s (last: {status})")


# ------------------------------------------------------------------ systems under test


class Running:
    def __init__(self, system: System, procs: list[Proc], ws_port: int, rss_pids: dict[str, int]):
        self.system, self.procs, self.ws_port, self.rss_pids = system, procs, ws_port, rss_pids

    def url(self, room: str) -> str:
        if self.system.socketio:
            return f"ws://127.0.0.1:{self.ws_port}/socket.io/?EIO=4&transport=websocket&room={room}"
        scheme = "wss" if self.system.tls else "ws"
        query = f"?token={make_token(room)}" if self.system.token else ""
        return f"{scheme}://127.0.0.1:{self.ws_port}/{room}{query}"

    def rss(self) -> dict[str, int]:
        return {k: rss_kib(pid, default=0) for k, pid in self.rss_pids.items()}

    def check(self) -> None:
        for p in self.procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} died: {p.tail()}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


class System:
    def __init__(self, name: str, kind: str, workloads: set[str], description: str, socketio: bool = False, backend: str = "",
                 pythonpath: str = "", env: dict[str, str] | None = None, broker_args: tuple[str, ...] = (), structured: bool = False,
                 token: bool = False, tls: bool = False):
        self.name, self.kind, self.workloads, self.description = name, kind, workloads, description
        # issue 18: the broker checks signed connection tokens (the clients' URLs carry one) / serves wss://
        self.token, self.tls = token, tls
        self.socketio, self.backend = socketio, backend
        self.broker_args = list(broker_args)  # extra options of `python -m pystrands server`
        self.structured = structured  # the receivers of W2/W5 speak the browser protocol pystrands.1
        # environment for the broker and backend processes: `pythonpath` is a directory holding another
        # build of the `pystrands` package (imported first), `env` extra variables
        self.env = dict(env or {})
        if pythonpath:
            self.env["PYTHONPATH"] = pythonpath

    def start(self, logdir: Path, socketio_server: str) -> Running:
        ws_port = free_port()
        procs: list[Proc] = []
        try:
            if self.kind == "inproc":
                tcp_port = free_port()
                env = dict(os.environ, **self.env) if self.env else None
                loop = "uvloop" if self.backend == "ours-uvloop" else "asyncio"
                p = Proc(self.name, [str(venv_python(OUR_VENV)), str(PEERS / "pystrands_inproc.py"), str(ws_port), str(tcp_port), loop],
                         logdir, env=env)
                procs.append(p)
                rss = {"server": p.pid}
            elif self.kind == "pystrands":
                tcp_port = free_port()
                env = dict(os.environ, **self.env) if self.env else None
                broker_env, broker_args = env, list(self.broker_args)
                if self.token:  # the key in the environment, not on the command line
                    broker_env = dict(env or os.environ, PYSTRANDS_JWT_SECRET=JWT_SECRET)
                if self.tls:
                    cert, key = tls_files()
                    broker_args += ["--tls-cert", cert, "--tls-key", key]
                broker = Proc(f"{self.name}-broker", [str(venv_python(OUR_VENV)), "-m", "pystrands", "server", "--host", "127.0.0.1",
                                                      "--ws-port", str(ws_port), "--tcp-port", str(tcp_port), "--log-level", "error",
                                                      *broker_args], logdir,
                              env=broker_env)
                procs.append(broker)
                wait_port(tcp_port, 30.0, broker.check_alive)
                if self.backend == "rust":
                    be = Proc(f"{self.name}-backend", [str(BIN / "bench-rust-backend"), "--port", str(tcp_port)], logdir)
                else:
                    python = venv_python(V1_VENV if self.backend == "v1" else OUR_VENV)
                    loop = "uvloop" if self.backend == "ours-uvloop" else "asyncio"
                    be = Proc(f"{self.name}-backend", [str(python), str(PEERS / "pystrands_backend.py"), str(tcp_port), loop], logdir,
                              env=env)
                procs.append(be)
                rss = {"server": broker.pid, "backend": be.pid}
            elif self.kind == "socketio":
                p = Proc(self.name, [str(venv_python(BENCH_VENV)), str(PEERS / "socketio_server.py"), "--port", str(ws_port), "--server", socketio_server], logdir)
                procs.append(p)
                rss = {"server": p.pid}
            elif self.kind == "websockets":
                p = Proc(self.name, [str(venv_python(BENCH_VENV)), str(PEERS / "websockets_broker.py"), "--port", str(ws_port)], logdir)
                procs.append(p)
                rss = {"server": p.pid}
            elif self.kind == "picows":
                p = Proc(self.name, [str(venv_python(BENCH_VENV)), str(PEERS / "picows_echo.py"), "--port", str(ws_port)], logdir)
                procs.append(p)
                rss = {"server": p.pid}
            elif self.kind == "ceiling":
                p = Proc(self.name, [str(BIN / "bench-ceiling"), "--port", str(ws_port)], logdir)
                procs.append(p)
                rss = {"server": p.pid}
            else:
                raise ValueError(self.kind)
            # (a token system's probe has no token: it goes to the backend, so this also waits for it)
            path = "/socket.io/?EIO=4&transport=websocket&room=probe" if self.socketio else "/probe"
            wait_upgrade(ws_port, path, procs, ca=tls_files()[0] if self.tls else None)
            time.sleep(0.3)
            return Running(self, procs, ws_port, rss)
        except BaseException:
            for p in reversed(procs):
                p.stop()
            raise


ALL = {"echo", "fanout", "idle", "connect", "broadcast"}
SYSTEMS = [
    System("pystrands", "pystrands", ALL, "our broker (release) + our AsyncPyStrandsClient backend", backend="ours"),
    System("pystrands+inproc", "inproc", {"echo", "fanout", "connect", "broadcast"},
           "our broker with our AsyncPyStrandsClient backend in the same process (Broker.serve(backend=...))", backend="ours"),
    System("pystrands+inproc-uvloop", "inproc", {"echo", "fanout", "connect", "broadcast"},
           "the same on uvloop (async with Broker.serving(backend))", backend="ours-uvloop"),
    System("pystrands+uvloop", "pystrands", {"echo", "connect"}, "our broker + our AsyncPyStrandsClient backend on uvloop", backend="ours-uvloop"),
    System("pystrands+pure-python", "pystrands", {"echo", "connect"},
           "our broker + our AsyncPyStrandsClient backend with the native codec off (PYSTRANDS_PURE_PYTHON=1)",
           backend="ours", env={"PYSTRANDS_PURE_PYTHON": "1"}),
    System("pystrands+v1-client", "pystrands", {"echo", "fanout", "connect", "broadcast"}, "our broker + PyStrands 1.0 async client (PyPI) as backend", backend="v1"),
    System("pystrands+5rooms", "pystrands", {"fanout", "broadcast"},
           "our broker + our AsyncPyStrandsClient backend; every receiver is also in 5 other rooms (join_room)",
           backend="ours", env={"PYSTRANDS_BENCH_EXTRA_ROOMS": "5"}),
    System("pystrands+history", "pystrands", {"fanout", "broadcast"},
           "our broker started with --history-size 100 (every room keeps its last 100 messages) + our AsyncPyStrandsClient backend",
           backend="ours", broker_args=("--history-size", "100")),
    System("pystrands+structured", "pystrands", {"fanout", "broadcast"},
           "our broker + our AsyncPyStrandsClient backend; the receivers speak the browser protocol pystrands.1 (JSON envelopes)",
           backend="ours", structured=True),
    System("pystrands+history+structured", "pystrands", {"fanout", "broadcast"},
           "our broker with --history-size 100; the receivers speak pystrands.1 (envelopes with offset and epoch)",
           backend="ours", broker_args=("--history-size", "100"), structured=True),
    System("pystrands@before-rooms", "pystrands", {"echo", "fanout", "connect", "broadcast"},
           "the same broker and backend built from the commit before issue 15 (rooms/users), from PYSTRANDS_BEFORE_BUILD",
           backend="ours", pythonpath=os.environ.get("PYSTRANDS_BEFORE_BUILD", str(ROOT / "build-before"))),
    System("pystrands@before-observability", "pystrands", {"echo", "fanout", "connect", "broadcast"},
           "the same broker and backend built from the commit before issue 16 (routes, log bridge), from PYSTRANDS_BEFORE_OBS_BUILD",
           backend="ours", pythonpath=os.environ.get("PYSTRANDS_BEFORE_OBS_BUILD", str(ROOT / "build-before-obs"))),
    System("pystrands+rust-backend", "pystrands", {"echo", "fanout", "connect", "broadcast"}, "our broker + a Rust backend (no Python in the loop)", backend="rust"),
    System("pystrands+token", "pystrands", {"connect"},
           "our broker with jwt_secret: the clients carry a signed token (?token=, HS256) and the broker accepts them itself; "
           "our AsyncPyStrandsClient backend connected (gets the new_connection events)", backend="ours", token=True),
    System("pystrands+tls", "pystrands", ALL,
           "our broker with tls_cert/tls_key (wss:// only; self-signed EC P-256 certificate) + our AsyncPyStrandsClient backend",
           backend="ours", tls=True),
    System("python-socketio", "socketio", ALL, "python-socketio (server chosen by --socketio-server)", socketio=True),
    System("websockets", "websockets", ALL, "hand-written broker on the websockets package (asyncio)"),
    System("tokio-ceiling", "ceiling", ALL, "bare tokio + tungstenite server: the ceiling"),
    System("picows", "picows", {"echo"}, "picows echo server (uvloop): the ceiling with Python in the loop"),
]

# ------------------------------------------------------------------ workloads


def settings(quick: bool) -> dict:
    if quick:
        return {
            "runs": 1,
            "echo": {"clients": 100, "seconds": 2.0, "warmup": 0.5, "size": 64},
            "fanout": {"clients": 1000, "seconds": 2.0, "warmup": 0.5, "size": 64, "rate": 50, "window": 16, "drain": 3.0},
            "idle": {"sizes": [1000, 3000], "hold": 1.0},
            "connect": {"clients": 1000, "concurrency": 50},
            "broadcast": {"clients": 2000, "triggers": 10, "gap_ms": 20},
        }
    return {
        "runs": 3,
        "echo": {"clients": 100, "seconds": 10, "warmup": 2.0, "size": 64},
        "fanout": {"clients": 1000, "seconds": 8, "warmup": 2.0, "size": 64, "rate": 50, "window": 16, "drain": 10.0},
        # 19,800 not 20,000: this machine's hard limit of open files per process is 20,000
        "idle": {"sizes": [2000, 10000, 19800], "hold": 3.0},
        "connect": {"clients": 2000, "concurrency": 50, "runs": 9},  # a storm lasts 0.1-3 s: more runs
        "broadcast": {"clients": 10000, "triggers": 20, "gap_ms": 100},
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def settle(run: Running, deadline: float = 10.0, window: float = 0.2, busy: float = 0.1) -> None:
    """Wait (at most `deadline` s) until the system's processes are idle: below `busy` cores over
    `window` s. After a run a server may still be closing its clients, and with the systems
    taking turns that work must not land in the next system's measurement."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        c0 = sum(cpu_seconds(pid) for pid in run.rss_pids.values())
        time.sleep(window)
        if sum(cpu_seconds(pid) for pid in run.rss_pids.values()) - c0 < busy * window:
            return


def machine_busy_seconds() -> tuple[float, float]:
    """CPU time used so far on the machine (from /proc/stat): (by processes, by interrupts).

    Interrupt time (irq + softirq) is mostly the kernel moving our own loopback packets, so it
    is reported apart (`irq`) and not counted as other people's work."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    tck = os.sysconf("SC_CLK_TCK")
    return (user + nice + system) / tck, (irq + softirq) / tck


def cpu_split(wall: float, ru0, busy0: tuple[float, float], cpu0: dict, run: Running | None) -> dict:
    """Cores used during `wall` seconds by the load generator, each process of the system, the
    kernel's interrupt handling, and every other process on the machine (`others`)."""
    ru1, busy1 = resource.getrusage(resource.RUSAGE_CHILDREN), machine_busy_seconds()
    cores = {"loadgen": (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / wall}
    if run:
        cores.update({k: (cpu_seconds(pid) - cpu0[k]) / wall for k, pid in run.rss_pids.items()})
    cores["others"] = max(0.0, (busy1[0] - busy0[0]) / wall - sum(cores.values()))
    cores["irq"] = (busy1[1] - busy0[1]) / wall
    return {k: round(v, 2) for k, v in cores.items()}


LOADGEN_THREADS = 1


def loadgen(args: list[str], timeout: float, run: Running | None = None) -> dict:
    """Runs the load generator; adds how many cores it and the system's processes used meanwhile."""
    args = [*args, "--threads", LOADGEN_THREADS]
    t0, ru0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = {k: cpu_seconds(pid) for k, pid in run.rss_pids.items()} if run else {}
    busy0 = machine_busy_seconds()
    r = subprocess.run([str(LOADGEN), *map(str, args)], capture_output=True, text=True, timeout=timeout, preexec_fn=raise_nofile)
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"loadgen {args[0]} failed (exit {r.returncode}): {r.stderr.strip()[-400:]}")
    out = json.loads(lines[-1])
    if "error" in out:
        raise RuntimeError(f"loadgen: {out['error']}")
    out["cpu_cores"] = cpu_split(time.monotonic() - t0, ru0, busy0, cpu0, run)
    return out


def proto(run: Running) -> list[str]:
    """The load generator's client options for this system: protocol, and the CA to trust for wss://."""
    ca = ["--ca", tls_files()[0]] if run.system.tls else []
    return ["--protocol", "socketio" if run.system.socketio else "pystrands1" if run.system.structured else "plain", *ca]


def measure(workload: str, mode: str, run: Running, cfg: dict) -> dict:
    load = os.getloadavg()[0]
    if workload == "echo":
        c = cfg["echo"]
        out = loadgen(["echo", "--url", run.url("bench"), *proto(run), "--clients", c["clients"], "--seconds", c["seconds"],
                       "--warmup", c["warmup"], "--size", c["size"]], timeout=c["seconds"] + 90, run=run)
    elif workload == "fanout":
        c = cfg["fanout"]
        rate = c["rate"] if mode == "fixed" else 0
        out = loadgen(["fanout", "--url", run.url("bench"), "--pub-url", run.url("pub"), *proto(run), "--clients", c["clients"],
                       "--seconds", c["seconds"], "--warmup", c["warmup"], "--size", c["size"], "--rate", rate,
                       "--window", c["window"], "--drain", c["drain"]], timeout=c["seconds"] + 120, run=run)
    elif workload == "connect":
        c = cfg["connect"]
        out = loadgen(["connect", "--url", run.url("bench"), *proto(run), "--clients", c["clients"], "--concurrency", c["concurrency"]], timeout=180, run=run)
    elif workload == "broadcast":
        c = cfg["broadcast"]
        out = loadgen(["broadcast", "--url", run.url("bench"), "--pub-url", run.url("pub"), *proto(run), "--clients", c["clients"],
                       "--triggers", c["triggers"], "--gap-ms", c["gap_ms"], "--warmup", 0.5], timeout=300, run=run)
    else:
        raise ValueError(workload)
    run.check()
    out["load_avg_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return out


def measure_idle(run: Running, n: int, hold: float) -> dict:
    """Opens n idle clients, samples RSS of the server (and backend) before and while they are held."""
    load = os.getloadavg()[0]
    time.sleep(0.5)
    base = run.rss()
    sources = max(1, -(-n // 25000))  # one source address per 25k connections
    t0, ru0, busy0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN), machine_busy_seconds()
    cpu0 = {k: cpu_seconds(pid) for k, pid in run.rss_pids.items()}
    p = subprocess.Popen([str(LOADGEN), "idle", "--url", run.url("bench"), *proto(run), "--clients", str(n), "--concurrency", "100", "--threads", str(LOADGEN_THREADS),
                          "--hold", str(hold + 2.0), "--sources", str(sources)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=raise_nofile)
    try:
        ready = json.loads(p.stdout.readline() or "{}")
        if ready.get("event") != "ready":
            raise RuntimeError(f"loadgen idle failed: {p.stderr.read()[-400:]}")
        time.sleep(hold)
        loaded = run.rss()
        out_lines = [l for l in p.stdout.read().splitlines() if l.strip()]
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    cores = cpu_split(time.monotonic() - t0, ru0, busy0, cpu0, run)
    out = json.loads(out_lines[-1]) if out_lines else {}
    out["cpu_cores"] = cores
    run.check()
    opened = max(ready.get("open", 0), 1)
    out.update({
        "rss_base_kib": base, "rss_loaded_kib": loaded,
        "rss_per_connection_kib": {k: round((loaded[k] - base[k]) / opened, 2) for k in base},
        "server_rss_per_connection_kib": round((loaded["server"] - base["server"]) / opened, 2),
        "total_rss_per_connection_kib": round((sum(loaded.values()) - sum(base.values())) / opened, 2),
        "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
    })
    return out


MAIN_METRIC = {  # (key path, higher is better)
    "echo": (("msgs_per_sec",), True),
    "fanout": (("deliveries_per_sec",), True),
    "connect": (("connects_per_sec",), True),
    "broadcast": (("last_delivery_us", "p99"), False),
}


def metric(workload: str, r: dict) -> float | None:
    path, _ = MAIN_METRIC[workload]
    v = r
    for k in path:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return float(v)


def disturbed(r: dict) -> bool:
    return (r.get("cpu_cores") or {}).get("others", 0.0) > PROVISIONAL_OTHERS


def median_run(workload: str, runs: list[dict]) -> dict:
    """The median run, among the runs other processes did not disturb if there is one."""
    ok = [r for r in runs if metric(workload, r) is not None]
    if any(not disturbed(r) for r in ok):
        ok = [r for r in ok if not disturbed(r)]
    if not ok:
        return runs[-1] if runs else {}
    ok.sort(key=lambda r: metric(workload, r))
    return ok[(len(ok) - 1) // 2] if MAIN_METRIC[workload][1] else ok[len(ok) // 2]


# ------------------------------------------------------------------ report


def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine_info() -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = sh([str(venv_python(BENCH_VENV)), "-c",
                   "import importlib.metadata as m\nfor p in ['python-socketio','python-engineio','aiohttp','uvicorn','websockets','picows','uvloop']:\n"
                   "  try: print(p, m.version(p))\n  except Exception: print(p, 'missing')"])
    return {
        "cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
        "rustc": sh(["rustc", "--version"]),
        "pystrands_v1": sh([str(venv_python(V1_VENV)), "-c", "import importlib.metadata as m; print(m.version('pystrands'))"]),
        "peers": dict(l.split(" ", 1) for l in versions.splitlines() if " " in l),
        "nofile_hard_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


def fmt_ms(us) -> str:
    return "-" if us is None else f"{us / 1000:,.2f}"


def lat(r: dict, key: str = "latency_us") -> dict:
    return r.get(key) or {}


def cpu(r: dict) -> str:
    c = r.get("cpu_cores") or {}
    return " / ".join(f"{c[k]:.2f}" if k in c else "-" for k in ("loadgen", "server", "backend", "irq", "others"))


def provisional(r: dict) -> str:
    """⚠ when other work on the machine took CPU during the measurement (or, for RSS, the load was high)."""
    others = (r.get("cpu_cores") or {}).get("others")
    if others is not None:
        return " ⚠" if others > PROVISIONAL_OTHERS else ""
    la = r.get("load_avg_1m") or [0, 0]
    return " ⚠" if max(la) > PROVISIONAL_LOAD else ""


def backend_us_per_msg(r: dict) -> float | None:
    """CPU time of the backend process per message of the run (None without a backend)."""
    cores, rate = (r.get("cpu_cores") or {}).get("backend"), r.get("msgs_per_sec")
    return cores / rate * 1e6 if cores and rate else None


def write_summary(data: dict, path: Path) -> None:
    m, cfg, res = data["machine"], data["settings"], data["results"]
    L: list[str] = []
    L.append(f"# Benchmark results ({'quick' if data['quick'] else 'full'} run)\n")
    L.append(f"Run {data['started']} – {data['finished']} with `python benches/run.py{' --quick' if data['quick'] else ''}`. "
             f"Machine: {m['cpu']}, {m['cores']} cores (shared by the system under test and the load generator), "
             f"Linux {m['kernel']}, Python {m['python']}, {m['rustc']}; 1-minute load average at start {data['load_start']}, "
             f"at end {data['load_end']} (the benchmark itself keeps it near 2). Median of {cfg['runs']} run(s) per system "
             f"(W4: {cfg['connect'].get('runs', cfg['runs'])}), taken among the runs other processes did not disturb when there is one. "
             f"The systems of a workload (except W3) are all started and take turns, one run each in a rotating order, "
             f"so a slow spell of the machine hits all of them; W4 starts with one unrecorded storm per system. "
             f"⚠ marks a provisional number: other processes on the machine (not the load generator, server or backend) used more "
             f"than {PROVISIONAL_OTHERS} cores during that measurement.\n")
    peers = ", ".join(f"{k} {v}" for k, v in m["peers"].items())
    L.append(f"Peers: {peers}; PyStrands 1.0 client {m['pystrands_v1']}; python-socketio served by {data['socketio_server']}. "
             f"Load generator threads: {cfg.get('loadgen_threads', 1)}.\n")
    if data["problems"]:
        L.append("**Not measured:** " + "; ".join(f"{k}: {v}" for k, v in data["problems"].items()) + "\n")

    def rows(workload: str) -> list[tuple[str, dict]]:
        return [(name, r["median"]) for name, r in res.get(workload, {}).items() if r.get("median")]

    if "echo" in res:
        c = cfg["echo"]
        L.append(f"\n## W1 echo round trip ({c['clients']} clients ping-pong, {c['size']} B, {c['seconds']} s)\n")
        L.append("Backend µs/msg = the backend process's CPU time per echoed message: the client library's own cost, "
                 "whatever limits the throughput.\n")
        L.append("| system | msg/s | p50 ms | p99 ms | p99.9 ms | errors | backend µs/msg | CPU cores: load gen / server / backend / irq / others |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for name, r in rows("echo"):
            la = lat(r)
            per = backend_us_per_msg(r)
            L.append(f"| {name} | {r['msgs_per_sec']:,.0f}{provisional(r)} | {fmt_ms(la.get('p50'))} | {fmt_ms(la.get('p99'))} | {fmt_ms(la.get('p999'))} | {r['errors']['count']} | {'-' if per is None else f'{per:.1f}'} | {cpu(r)} |")
    for mode in ("fixed", "max"):
        key = f"fanout_{mode}"
        if key not in res:
            continue
        c = cfg["fanout"]
        what = f"publisher at {c['rate']} msg/s" if mode == "fixed" else f"publisher as fast as delivered (≤ {c['window']} messages in flight)"
        L.append(f"\n## W2 room fan-out, {mode} rate (1 room × {c['clients']} clients, {what}, {c['seconds']} s)\n")
        L.append(f"Missing = sent to the room but not delivered within the {c['drain']:g} s drain after the publisher stopped.\n")
        L.append("| system | deliveries/s | published msg/s | p50 ms | p99 ms | p99.9 ms | missing | errors | CPU cores: load gen / server / backend / irq / others |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for name, r in rows(key):
            la = lat(r)
            L.append(f"| {name} | {r['deliveries_per_sec']:,.0f}{provisional(r)} | {r['publish_rate']:,.1f} | {fmt_ms(la.get('p50'))} | {fmt_ms(la.get('p99'))} | {fmt_ms(la.get('p999'))} | {r['missing']:,} | {r['errors']['count']} | {cpu(r)} |")
    if "idle" in res:
        L.append("\n## W3 idle connections (RSS growth per connection)\n")
        L.append("| system | connections | server KiB/conn | backend KiB/conn | total KiB/conn | server RSS MiB | errors |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for name, per_n in res["idle"].items():
            for n, r in sorted(per_n.items(), key=lambda kv: int(kv[0])):
                if "rss_per_connection_kib" not in r:
                    L.append(f"| {name} | {n} | failed: {r.get('failed', '?')[:80]} | | | | |")
                    continue
                pc = r["rss_per_connection_kib"]
                L.append(f"| {name} | {r.get('open', n):,} | {pc['server']:.2f}{provisional(r)} | {pc.get('backend', '-') if 'backend' in pc else '-'} | {r['total_rss_per_connection_kib']:.2f} | {r['rss_loaded_kib']['server'] / 1024:,.1f} | {r['errors']['count']} |")
    if "connect" in res:
        c = cfg["connect"]
        L.append(f"\n## W4 connect storm ({c['clients']} connections, {c['concurrency']} at a time, held until the end)\n")
        L.append("| system | connects/s | p50 ms | p99 ms | errors | CPU cores: load gen / server / backend / irq / others |")
        L.append("|---|---:|---:|---:|---:|---|")
        for name, r in rows("connect"):
            la = lat(r)
            L.append(f"| {name} | {r['connects_per_sec']:,.0f}{provisional(r)} | {fmt_ms(la.get('p50'))} | {fmt_ms(la.get('p99'))} | {r['errors']['count']} | {cpu(r)} |")
    if "broadcast" in res:
        c = cfg["broadcast"]
        L.append(f"\n## W5 broadcast to all ({c['clients']} clients, {c['triggers']} messages one after the other)\n")
        L.append("| system | last delivery p50 ms | last delivery p99 ms | all deliveries p50 ms | p99 ms | incomplete | errors | CPU cores: load gen / server / backend / irq / others |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for name, r in rows("broadcast"):
            ld, la = lat(r, "last_delivery_us"), lat(r)
            L.append(f"| {name} | {fmt_ms(ld.get('p50'))} | {fmt_ms(ld.get('p99'))}{provisional(r)} | {fmt_ms(la.get('p50'))} | {fmt_ms(la.get('p99'))} | {r['incomplete_triggers']} | {r['errors']['count']} | {cpu(r)} |")

    L.append("\nCPU cores = CPU time used during the load generator's whole run (connect, warm-up, measurement) divided by its "
             "wall time; the machine has " + str(m["cores"]) + "; `irq` is the kernel's interrupt work (mostly moving the loopback "
             "packets of the benchmark itself); `others` is every other process on the machine. A load generator "
             "near 1.0 is saturated (it runs on one thread): then the load generator, not the system, sets the number.\n")
    L.append("\n## Targets (issues 5, 14-18), ratios from this run\n")
    L.append("| target | measured | met? |")
    L.append("|---|---|---|")
    for t in data["targets"]:
        if t["ratio"] is None:
            L.append(f"| {t['what']} | not measured ({t['why']}) | - |")
        else:
            met = "(reported)" if t["met"] is None else "yes" if t["met"] else "**no**"
            L.append(f"| {t['what']} | {t['ratio']:.2f}x ({t['detail']}){' ⚠ provisional' if t.get('provisional') else ''} | {met} |")
    ours, v1 = (res.get("echo", {}).get(k, {}).get("median") for k in ("pystrands", "pystrands+v1-client"))
    if ours and v1 and backend_us_per_msg(ours) and backend_us_per_msg(v1):
        a, b = backend_us_per_msg(ours), backend_us_per_msg(v1)
        L.append(f"\nClient-side cost in W1 (not a target, the measure behind the 4x one): the PyStrands 1.0 async client "
                 f"spends {b:.1f} µs of CPU per echoed message, ours {a:.1f} µs: {b / a:.2f}x less.\n")
    L.append("\nPlots: `throughput.png`, `latency.png`, `rss.png` beside this file. Raw runs: `<workload>.json`.\n")
    path.write_text("\n".join(L) + "\n")


def targets(res: dict) -> list[dict]:
    def med(workload: str, system: str) -> dict | None:
        return (res.get(workload, {}).get(system) or {}).get("median") or None

    out = []

    def ratio(what: str, num: tuple, den: tuple, need: float | None, higher: bool = True) -> None:
        """num/den of the workloads' main metric; `need` None: reported, no target."""
        a, b = med(num[0], num[1]), med(den[0], den[1])
        va = metric(num[0].split("_")[0], a) if a else None
        vb = metric(den[0].split("_")[0], b) if b else None
        if not va or not vb:
            missing = num[1] if not va else den[1]
            out.append({"what": what, "ratio": None, "why": f"{missing} has no result"})
            return
        prov = disturbed(a) or disturbed(b)
        r = va / vb
        if higher:
            met = None if need is None else r >= need
            out.append({"what": what, "ratio": r, "met": met, "provisional": prov, "detail": f"{va:,.0f} vs {vb:,.0f}"})
        else:  # latency: the target is num <= need * den; report num/den
            met = None if need is None else r <= need
            out.append({"what": what, "ratio": r, "met": met, "provisional": prov, "detail": f"{va / 1000:,.1f} ms vs {vb / 1000:,.1f} ms"})

    ratio("W1 ours ≥ 70% of picows echo", ("echo", "pystrands"), ("echo", "picows"), 0.70)
    ratio("W2 (max rate) ≥ 85% of the tokio ceiling", ("fanout_max", "pystrands"), ("fanout_max", "tokio-ceiling"), 0.85)
    ratio("W4 Python accept ≥ 80% of the same broker accepting in Rust", ("connect", "pystrands"), ("connect", "pystrands+rust-backend"), 0.80)
    ratio("W5 p99 of last delivery ≤ 2x the ceiling's", ("broadcast", "pystrands"), ("broadcast", "tokio-ceiling"), 2.0, higher=False)
    ratio("W1 ≥ 4x PyStrands 1.0 async client as backend", ("echo", "pystrands"), ("echo", "pystrands+v1-client"), 4.0)
    ratio("W1 ≥ 3x python-socketio", ("echo", "pystrands"), ("echo", "python-socketio"), 3.0)
    ratio("W2 (max rate) ≥ 10x python-socketio", ("fanout_max", "pystrands"), ("fanout_max", "python-socketio"), 10.0)
    ratio("W4 ≥ 3x python-socketio", ("connect", "pystrands"), ("connect", "python-socketio"), 3.0)
    # The same targets with our backend on uvloop (how picows and python-socketio run here too).
    ratio("W1 ours on uvloop ≥ 70% of picows echo", ("echo", "pystrands+uvloop"), ("echo", "picows"), 0.70)
    ratio("W4 Python accept on uvloop ≥ 80% of the same broker accepting in Rust", ("connect", "pystrands+uvloop"),
          ("connect", "pystrands+rust-backend"), 0.80)
    # Issue 14: the backend in the broker's process.
    ratio("W1 in-process ≥ 1.0x picows echo", ("echo", "pystrands+inproc"), ("echo", "picows"), 1.0)
    ratio("W1 in-process on uvloop ≥ 1.0x picows echo", ("echo", "pystrands+inproc-uvloop"), ("echo", "picows"), 1.0)
    ratio("W1 in-process ≥ 0.8x the tokio ceiling", ("echo", "pystrands+inproc"), ("echo", "tokio-ceiling"), 0.8)
    ratio("W4 in-process Python accept ≥ 0.9x the same broker accepting in Rust", ("connect", "pystrands+inproc"),
          ("connect", "pystrands+rust-backend"), 0.9)
    ratio("W2 (max rate) in-process publisher ≥ 0.9x the tokio ceiling", ("fanout_max", "pystrands+inproc"),
          ("fanout_max", "tokio-ceiling"), 0.9)
    ratio("W5 p99 of last delivery, in-process publisher, ≤ 1/0.9x the ceiling's", ("broadcast", "pystrands+inproc"),
          ("broadcast", "tokio-ceiling"), 1 / 0.9, higher=False)
    ratio("W1 in-process ≥ 1.0x our TCP backend (same run)", ("echo", "pystrands+inproc"), ("echo", "pystrands"), 1.0)
    # Issue 15: rooms and users must not slow fan-out or broadcast down (within 5%, same run).
    ratio("W2 (max rate) ≥ 0.95x the build before rooms/users", ("fanout_max", "pystrands"), ("fanout_max", "pystrands@before-rooms"), 0.95)
    ratio("W5 p99 of last delivery ≤ 1.05x the build before rooms/users", ("broadcast", "pystrands"),
          ("broadcast", "pystrands@before-rooms"), 1.05, higher=False)
    ratio("W2 (max rate), receivers in 5 other rooms too, ≥ 0.95x single-room", ("fanout_max", "pystrands+5rooms"),
          ("fanout_max", "pystrands"), 0.95)
    # Issue 16: the operator routes and the log bridge must not cost W1/W2 anything measurable.
    ratio("W1 ≥ 0.95x the build before the routes and the log bridge", ("echo", "pystrands"), ("echo", "pystrands@before-observability"), 0.95)
    ratio("W2 (max rate) ≥ 0.95x the build before the routes and the log bridge", ("fanout_max", "pystrands"),
          ("fanout_max", "pystrands@before-observability"), 0.95)
    # Issue 17: history may cost at most 15% of fan-out throughput on one node.
    ratio("W2 (max rate) with --history-size 100 ≥ 0.85x without", ("fanout_max", "pystrands+history"), ("fanout_max", "pystrands"), 0.85)
    ratio("W2 (max rate), pystrands.1 receivers, with --history-size 100 ≥ 0.85x without", ("fanout_max", "pystrands+history+structured"),
          ("fanout_max", "pystrands+structured"), 0.85)
    # Issue 18: signed connection tokens are checked by the broker itself; TLS on the WebSocket port.
    ratio("W4 token connects ≥ 0.9x the same broker accepting in Rust", ("connect", "pystrands+token"),
          ("connect", "pystrands+rust-backend"), 0.9)
    ratio("W4 token connects vs Python accept handler", ("connect", "pystrands+token"), ("connect", "pystrands"), None)
    ratio("TLS echo vs plain", ("echo", "pystrands+tls"), ("echo", "pystrands"), None)
    ratio("TLS fan-out ≥ 0.7x plain (W2 max rate)", ("fanout_max", "pystrands+tls"), ("fanout_max", "pystrands"), 0.7)
    ratio("TLS W4 connects vs plain (TLS handshake included)", ("connect", "pystrands+tls"), ("connect", "pystrands"), None)
    return out


def plots(data: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = data["results"]
    made = []
    colors = {}
    palette = plt.get_cmap("tab10")
    for i, s in enumerate(SYSTEMS):
        colors[s.name] = palette(i)
    tag = "quick run" if data["quick"] else "full run"

    # throughput bars
    panels = [("echo", "W1 echo: msg/s", lambda r: r["msgs_per_sec"]),
              ("fanout_max", "W2 fan-out (max rate): deliveries/s", lambda r: r["deliveries_per_sec"]),
              ("connect", "W4 connect storm: connects/s", lambda r: r["connects_per_sec"]),
              ("broadcast", "W5 broadcast: p99 of last delivery, ms (lower is better)", lambda r: r["last_delivery_us"]["p99"] / 1000)]
    panels = [p for p in panels if res.get(p[0])]
    if panels:
        fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), squeeze=False)
        for ax, (key, title, get) in zip(axes[:, 0], panels):
            names, vals = [], []
            for name, r in res[key].items():
                try:
                    vals.append(get(r["median"]))
                    names.append(name)
                except (KeyError, TypeError):
                    pass
            ax.barh(names, vals, color=[colors.get(n) for n in names])
            ax.invert_yaxis()
            ax.set_title(title, fontsize=10)
            for y, v in enumerate(vals):
                ax.text(v, y, f" {v:,.0f}" if v >= 100 else f" {v:,.1f}", va="center", fontsize=8)
            ax.margins(x=0.15)
        fig.suptitle(f"PyStrands vs peers, {tag} ({data['machine']['cores']} cores, loopback)", fontsize=11)
        fig.tight_layout()
        fig.savefig(RESULTS / "throughput.png", dpi=110)
        plt.close(fig)
        made.append("throughput.png")

    # latency percentile curves
    panels = [(k, t) for k, t in [("echo", "W1 echo round trip"), ("fanout_fixed", "W2 fan-out delivery, fixed rate"),
                                  ("fanout_max", "W2 fan-out delivery, max rate"), ("broadcast", "W5 broadcast, every delivery")] if res.get(k)]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
        for ax, (key, title) in zip(axes[0], panels):
            for name, r in res[key].items():
                curve = ((r.get("median") or {}).get("latency_us") or {}).get("curve")
                if not curve:
                    continue
                pts = [(q, v) for q, v in curve if 0 < q < 1]
                xs = [1 / (1 - q) for q, _ in pts]
                ax.plot(xs, [v / 1000 for _, v in pts], marker="o", ms=3, label=name, color=colors.get(name))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks([2, 10, 100, 1000, 10000])
            ax.set_xticklabels(["p50", "p90", "p99", "p99.9", "p99.99"])
            ax.set_ylabel("latency, ms")
            ax.set_title(title, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"Latency percentiles, {tag}", fontsize=11)
        fig.tight_layout()
        fig.savefig(RESULTS / "latency.png", dpi=110)
        plt.close(fig)
        made.append("latency.png")

    # RSS vs connections
    if res.get("idle"):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for name, per_n in res["idle"].items():
            pts = sorted((int(n), r) for n, r in per_n.items() if "rss_loaded_kib" in r)
            if not pts:
                continue
            xs = [r.get("open", n) for n, r in pts]
            ax1.plot(xs, [sum(r["rss_loaded_kib"].values()) / 1024 for _, r in pts], marker="o", label=name, color=colors.get(name))
            ax2.plot(xs, [r["total_rss_per_connection_kib"] for _, r in pts], marker="o", label=name, color=colors.get(name))
        ax1.set_xlabel("idle connections")
        ax1.set_ylabel("RSS, MiB (server + backend)")
        ax1.set_title("W3 RSS vs connections", fontsize=10)
        ax2.set_xlabel("idle connections")
        ax2.set_ylabel("KiB per connection (growth over baseline)")
        ax2.set_title("W3 RSS growth per connection", fontsize=10)
        for ax in (ax1, ax2):
            ax.grid(True, alpha=0.3)
        ax1.legend(fontsize=8)
        fig.suptitle(f"Idle connections, {tag}", fontsize=11)
        fig.tight_layout()
        fig.savefig(RESULTS / "rss.png", dpi=110)
        plt.close(fig)
        made.append("rss.png")
    return made


def resummarize(results: Path) -> None:
    """Rebuilds summary.md and the plots of a finished run from run.json and <workload>.json."""
    data = json.loads((results / "run.json").read_text())
    data["results"] = {f.stem: json.loads(f.read_text())["results"] for f in sorted(results.glob("*.json"))
                       if f.stem in {"echo", "fanout_fixed", "fanout_max", "idle", "connect", "broadcast"}}
    data["targets"] = targets(data["results"])
    global RESULTS
    RESULTS = results
    plots(data)
    write_summary(data, results / "summary.md")
    print((results / "summary.md").read_text())


# ------------------------------------------------------------------ main


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="PyStrands benchmark suite against real peers")
    ap.add_argument("--quick", action="store_true", help="small and short: finishes in under 3 minutes")
    ap.add_argument("--runs", type=int, help="runs per system and workload (default 3, quick 1)")
    ap.add_argument("--workloads", default="echo,fanout,idle,connect,broadcast", help="comma-separated subset")
    ap.add_argument("--systems", default="", help="comma-separated subset of: " + ", ".join(s.name for s in SYSTEMS))
    ap.add_argument("--socketio-server", choices=["aiohttp", "uvicorn"], default="aiohttp")
    ap.add_argument("--loadgen-threads", type=int, default=1, help="threads of the load generator (default 1; more only pays on more than 2 cores)")
    ap.add_argument("--no-build", action="store_true", help="don't create venvs or build; use what is there")
    ap.add_argument("--out", help="results directory (default benches/results, with --quick benches/results/quick)")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also measure system `pystrands@baseline`: broker and backend from the `pystrands` package in DIR "
                         "(e.g. a copy of an earlier build's site-packages/pystrands), for before/after comparisons")
    ap.add_argument("--summary-only", action="store_true", help="rewrite summary.md and the plots from the results directory's JSON; run nothing")
    return ap


def check_args(args: argparse.Namespace) -> None:
    """Refuses (exit status 2, naming the choices) a system or workload that does not exist,
    instead of silently measuring less than asked."""
    known = {s.name for s in SYSTEMS} | ({"pystrands@baseline"} if args.baseline else set())
    for what, given, choices in (("system", args.systems, known), ("workload", args.workloads, ALL)):
        unknown = [name for name in given.split(",") if name and name not in choices]
        if unknown:
            raise SystemExit(f"run.py: unknown {what} {', '.join(unknown)} (choose from: {', '.join(sorted(choices))})")


def main() -> None:
    global RESULTS, LOADGEN_THREADS
    args = parser().parse_args()
    check_args(args)
    if args.summary_only:
        resummarize(Path(args.out) if args.out else (RESULTS / "quick" if args.quick else RESULTS))
        return

    problems = ensure_env(args.no_build)
    # Plots need matplotlib from the bench venv: continue under that interpreter.
    if Path(sys.prefix).resolve() != BENCH_VENV.resolve() and venv_python(BENCH_VENV).exists():
        os.execv(str(venv_python(BENCH_VENV)), [str(venv_python(BENCH_VENV)), __file__, *sys.argv[1:], "--no-build"])

    RESULTS = Path(args.out) if args.out else (RESULTS / "quick" if args.quick else RESULTS)
    RESULTS.mkdir(parents=True, exist_ok=True)
    logdir = RESULTS / "logs"
    logdir.mkdir(exist_ok=True)
    raise_nofile()
    LOADGEN_THREADS = max(1, args.loadgen_threads)
    cfg = settings(args.quick)
    cfg["loadgen_threads"] = LOADGEN_THREADS
    if args.runs:
        cfg["runs"] = args.runs
        for c in cfg.values():  # --runs is for every workload (W4 too): the summary says so
            if isinstance(c, dict):
                c.pop("runs", None)
    workloads = [w for w in args.workloads.split(",") if w]
    if args.baseline:
        base = str(Path(args.baseline).resolve())
        SYSTEMS.append(System("pystrands@baseline", "pystrands", {"echo", "connect"},
                              f"our broker + AsyncPyStrandsClient backend, both from {base}", backend="ours", pythonpath=base))
    chosen = [s for s in SYSTEMS if not args.systems or s.name in args.systems.split(",")]
    if "pystrands" in problems:
        chosen = [s for s in chosen if s.kind != "pystrands"]
    if "pystrands 1.0" in problems:
        chosen = [s for s in chosen if s.backend != "v1"]
    if "pystrands+uvloop" in problems:
        chosen = [s for s in chosen if s.backend != "ours-uvloop"]
    if "bench venv" in problems:
        for s in chosen:
            if s.kind in ("socketio", "websockets", "picows"):
                problems[s.name] = "not installed (bench venv failed)"
        chosen = [s for s in chosen if s.kind not in ("socketio", "websockets", "picows")]

    t_start = time.time()
    data = {
        "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": cfg, "machine": machine_info(),
        "socketio_server": f"{args.socketio_server} + uvloop" if args.socketio_server == "aiohttp" else "uvicorn + uvloop + httptools + websockets (ASGI)",
        "load_start": round(os.getloadavg()[0], 2), "problems": problems, "results": {},
    }
    res = data["results"]
    log(f"systems: {', '.join(s.name for s in chosen)}; workloads: {', '.join(workloads)}; runs: {cfg['runs']}")
    for workload in workloads:
        if workload == "idle":  # one system at a time: RSS growth of a lone server
            for system in chosen:
                if workload not in system.workloads:
                    continue
                for n in cfg["idle"]["sizes"]:
                    entry = res.setdefault("idle", {}).setdefault(system.name, {})
                    run = None
                    try:
                        run = system.start(logdir, args.socketio_server)
                        r = measure_idle(run, n, cfg["idle"]["hold"])
                        entry[str(n)] = r
                        log(f"idle {system.name} {n}: server {r['rss_per_connection_kib']['server']} KiB/conn, total {r['total_rss_per_connection_kib']} KiB/conn, open {r.get('open')}, cpu {r.get('cpu_cores')}")
                    except Exception as e:  # a failed system is reported, the suite goes on
                        entry[str(n)] = {"failed": str(e)[:500]}
                        log(f"idle {system.name} {n}: FAILED {e}")
                    finally:
                        if run:
                            run.stop()
            continue
        # The systems of one workload run side by side and take turns, one run each in a
        # rotating order: a slow spell of the machine then hits every system, not just one,
        # and the ratios between them hold better than the absolute numbers.
        contenders = [s for s in chosen if workload in s.workloads]
        modes = ["fixed", "max"] if workload == "fanout" else [""]
        started: dict[str, Running] = {}
        try:
            for system in contenders:
                try:
                    started[system.name] = system.start(logdir, args.socketio_server)
                except Exception as e:
                    log(f"{workload} {system.name}: FAILED {e}")
                    for mode in modes:
                        key = f"{workload}_{mode}" if mode else workload
                        res.setdefault(key, {}).setdefault(system.name, {"runs": []})["failed"] = str(e)[:500]
            if workload == "connect":  # an unrecorded storm first: the first one also warms up allocators
                for run in started.values():
                    try:
                        measure(workload, "", run, cfg)
                    except Exception as e:
                        log(f"connect warm-up {run.system.name}: {e}")
                    settle(run)
            for mode in modes:
                key = f"{workload}_{mode}" if mode else workload
                n_runs = cfg[workload].get("runs", cfg["runs"]) if not args.runs else cfg["runs"]
                order = [s for s in contenders if s.name in started]
                for i in range(n_runs):
                    for system in order[i % len(order):] + order[:i % len(order)] if order else []:
                        run = started[system.name]
                        entry = res.setdefault(key, {}).setdefault(system.name, {"runs": []})
                        if "failed" in entry:
                            continue
                        try:
                            run.check()
                            r = measure(workload, mode, run, cfg)
                        except Exception as e:
                            entry["runs"].append({"failed": str(e)[:500]})
                            log(f"{key} {system.name} run {i}: FAILED {e}")
                            try:
                                run.check()
                            except Exception as dead:  # the system is gone: no more runs for it
                                entry["failed"] = str(dead)[:500]
                            continue
                        entry["runs"].append(r)
                        m = metric(workload, r)
                        log(f"{key} {system.name} run {i}: {MAIN_METRIC[workload][0][-1]} {m if m is not None else '-'}"
                            f"{' p99 ' + fmt_ms(r['latency_us'].get('p99')) + ' ms' if 'latency_us' in r else ''}"
                            f" errors {r.get('errors', {}).get('count')} cpu {r.get('cpu_cores')}")
                        settle(run)  # e.g. the previous storm's disconnects
                for system in order:
                    entry = res.setdefault(key, {}).setdefault(system.name, {"runs": []})
                    entry["median"] = median_run(workload, [r for r in entry["runs"] if "failed" not in r])
        finally:
            for run in started.values():
                run.stop()
        # progress, in case the run is interrupted; the result files are only replaced at the end
        (logdir / "partial.json").write_text(json.dumps(data, indent=1))
    data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    data["load_end"] = round(os.getloadavg()[0], 2)
    data["elapsed_seconds"] = round(time.time() - t_start, 1)
    data["targets"] = targets(res)
    for key in res:
        (RESULTS / f"{key}.json").write_text(json.dumps({"machine": data["machine"], "settings": cfg, "quick": args.quick, "results": res[key]}, indent=1))
    (RESULTS / "run.json").write_text(json.dumps({k: v for k, v in data.items() if k != "results"}, indent=1))
    try:
        made = plots(data)
    except Exception as e:  # plots are a convenience; the numbers are already written
        made = []
        log(f"plots failed: {e}")
    write_summary(data, RESULTS / "summary.md")
    log(f"done in {data['elapsed_seconds']} s: {RESULTS / 'summary.md'}, plots {', '.join(made)}")
    print((RESULTS / "summary.md").read_text())


if __name__ == "__main__":
    main()
