"""The fenced code blocks of the documentation (README.md and every page of docs/), found one way
for every test that runs them and for the inventory in test_docs.py that proves each one is run.
Also the shell side of running them: a block's commands, the long-running ones (a broker, a
redis-server, a web app) started in the background and stopped with their whole process group,
and the checks from outside (HTTP routes, metrics, Redis answering)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from v1peer import DEADLINE

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# An opening fence (possibly indented inside a list), its language, the body, the same fence closing.
FENCE = re.compile(r"^( *)```([\w+-]*)\n(.*?)^\1```[ \t]*$", re.S | re.M)


@dataclass(frozen=True)
class Block:
    page: str
    """Relative to docs/ ("guides/testing.md"), or "README.md"."""
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ({self.lang or 'no language'})"


def path_of(page: str) -> Path:
    return ROOT / page if page == "README.md" else DOCS / page


def pages() -> list[str]:
    return ["README.md", *sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))]


def blocks(page: str, lang: str | None = None) -> list[Block]:
    """The page's fenced blocks in order (all, or those of one language). A block whose body is a
    snippet include (`--8<--`) is a whole example file: it is run by tests/test_examples.py."""
    text = path_of(page).read_text()
    found = []
    for m in FENCE.finditer(text):
        indent = len(m.group(1))
        body = "\n".join(line[indent:] for line in m.group(3).splitlines()) + "\n"
        if body.lstrip().startswith("--8<--"):
            continue
        found.append(Block(page, text.count("\n", 0, m.start()) + 1, m.group(2), body))
    return [b for b in found if lang is None or b.lang == lang]


def texts(page: str, *langs: str) -> list[str]:
    return [b.text for b in blocks(page) if b.lang in langs]


def commands(block: str) -> list[str]:
    """The commands of a shell block, one per logical line (backslash continuations joined; blank
    and comment-only lines dropped; a trailing comment is left to the shell)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def run(command: str, cwd: Path, env: Mapping[str, str], timeout: float = 600) -> str:
    """Runs one command with bash and returns its standard output; a non-zero exit fails with
    everything it printed."""
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"`{command}` exited with {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"
    return done.stdout


class Program:
    """A long-running command started by :func:`background`; a thread reads what it prints (so a
    chatty program never blocks on a full pipe) into `lines`."""

    def __init__(self, command: str, cwd: Path, env: Mapping[str, str]) -> None:
        self.command = command
        self.proc = subprocess.Popen(
            ["bash", "-c", command], cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def output(self) -> str:
        return "".join(self.lines)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Sends `signum` to the program's whole process group."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def wait_line(self, accept: Callable[[str], bool], what: str, deadline: float = 20.0) -> str:
        """The first line printed that `accept` takes; fails at the deadline or if the program ends."""
        end = time.monotonic() + deadline
        seen = 0
        while True:
            while seen < len(self.lines):
                seen += 1
                if accept(self.lines[seen - 1]):
                    return self.lines[seen - 1]
            assert self.proc.poll() is None or seen < len(self.lines), f"`{self.command}` ended before {what}:\n{self.output()[-4000:]}"
            assert time.monotonic() < end, f"timed out waiting for {what}; output:\n{self.output()[-4000:]}"
            time.sleep(0.02)


@contextmanager
def background(command: str, cwd: Path, env: Mapping[str, str]) -> Iterator[Program]:
    """Starts a long-running command (`bash -c`, in its own process group) and on exit sends the
    group SIGTERM, then SIGKILL if it has not ended within 10 s."""
    program = Program(command, cwd, env)
    try:
        yield program
    finally:
        program.signal(signal.SIGTERM)
        try:
            program.wait(10)
        except subprocess.TimeoutExpired:
            program.signal(signal.SIGKILL)
            program.wait(10)


def stops_cleanly(program: Program) -> None:
    """SIGTERM to the program's process group: it ends with status 0."""
    program.signal(signal.SIGTERM)
    assert program.wait(DEADLINE) == 0, program.output()[-4000:]


def http_get(url: str, context: object = None, timeout: float = 2.0) -> tuple[int, str]:
    """GET → (status, body); an HTTP error status is returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:  # type: ignore[arg-type]
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_http(url: str, program: Program, context: object = None, deadline: float = 20.0) -> tuple[int, str]:
    """Polls `url` until it answers; fails with the program's output if the program ends first."""
    end = time.monotonic() + deadline
    while True:
        if program.poll() is not None:
            raise AssertionError(f"`{program.command}` ended ({program.poll()}) before serving {url}:\n{program.output()[-4000:]}")
        try:
            return http_get(url, context)
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def metric(port: int, name: str, context: object = None) -> float | None:
    """One sample of the broker's /metrics (None when the family is absent), parsed by
    prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_get(f"{'https' if context else 'http'}://localhost:{port}/metrics", context)
    assert status == 200, body
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


# ------------------------------------------------------------------------------ running a broker


def base_env(**more: str) -> dict[str, str]:
    """The suite's environment without PyStrands settings, with the suite's bin/ (its
    pystrands-broker, uvicorn, ...) first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSTRANDS_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(more)
    return env


def broker_ports() -> tuple[int, int, dict[str, str]]:
    """Two free ports (WebSocket, backends) and the environment that gives them to a broker."""
    from procinfo import free_port

    ws, tcp = free_port(), free_port()
    return ws, tcp, {"PYSTRANDS_WS_PORT": str(ws), "PYSTRANDS_TCP_PORT": str(tcp)}


def with_ports(command: str, ws: int, tcp: int) -> str:
    """A documented command line with the default ports (8080, 8081) moved to free ones."""
    assert "--ws-port 8080" in command and "--tcp-port 8081" in command, command
    return command.replace("--ws-port 8080", f"--ws-port {ws}").replace("--tcp-port 8081", f"--tcp-port {tcp}")


def signed_token(secret: str, **claims: object) -> str:
    """An HS256 connection token valid for five minutes."""
    import jwt

    return jwt.encode({"exp": time.time() + 300, **claims}, secret, algorithm="HS256")


REDIS = shutil.which("redis-server")


def redis_answers(port: int, context: ssl.SSLContext | None = None, password: str | None = None) -> bool:
    """True once the redis-server on `port` answers PING (over TLS with `context`)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
            conn = context.wrap_socket(raw, server_hostname="localhost") if context else raw
            with conn:
                if password:
                    conn.sendall(f"AUTH {password}\r\n".encode())
                    if not conn.recv(64).startswith(b"+OK"):
                        return False
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def wait_until(predicate: Callable[[], object], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)
