"""Small helpers every benchmark script shares: free loopback ports, a process's RSS, waiting
for a port to open, stopping a child process."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable


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
