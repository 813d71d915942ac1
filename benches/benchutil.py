"""Small helpers every benchmark script shares: free loopback ports, a process's RSS, waiting
for a port to open, children in their own process group with a log file, stopping a child
process."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int, default: int | None = None) -> int:
    """Resident memory of process `pid` in KiB. A process without one (it exited) gives
    `default`, or raises when no default is given."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    if default is None:
        raise RuntimeError(f"process {pid} has no VmRSS (exited?)")
    return default


def wait_port(port: int, timeout: float = 20.0, check: Callable[[], None] | None = None) -> None:
    """Waits until 127.0.0.1:`port` accepts connections. `check` is called on every attempt and
    should raise if the process that is to open the port has died."""
    end = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise RuntimeError(f"port {port} not open after {timeout} s") from None
            time.sleep(0.05)


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM `proc` and wait for it; SIGKILL it if it is still running after `timeout` s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Proc:
    """A child in its own process group, output to a log file."""

    def __init__(self, name: str, argv: list[str], logdir: Path, cwd: Path | None = None, env: dict[str, str] | None = None):
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self.log = open(self.log_path, "ab")
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True, preexec_fn=raise_nofile, cwd=cwd or tempfile.gettempdir(), env=env)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def check_alive(self) -> None:
        """Raises if the child has exited (a `wait_port` check)."""
        if not self.alive():
            raise RuntimeError(f"{self.name} exited: {self.tail()}")

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout=8)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait(timeout=5)
        self.log.close()

    def tail(self, n: int = 8) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
