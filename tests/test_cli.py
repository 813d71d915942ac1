"""The broker command: `pystrands-broker` and `python -m pystrands server`, as a user runs them."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading

import pytest

from procinfo import free_port

DEADLINE = 20.0



def module_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pystrands", "server", *args]


def script_cmd(*args: str) -> list[str]:
    script = shutil.which("pystrands-broker", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("pystrands-broker console script is not installed in this environment")
    return [script, *args]


def start(cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, queue.Queue[str]]:
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})})
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def wait_line(lines: queue.Queue[str], needle: str) -> str:
    seen = []
    while True:
        try:
            line = lines.get(timeout=DEADLINE)
        except queue.Empty:
            raise AssertionError(f"no line containing {needle!r}; saw {seen}")
        seen.append(line)
        if needle in line:
            return line


def upgrade_status(port: int) -> int:
    """Sends a WebSocket upgrade request by hand and returns the HTTP status."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        status_line = s.makefile("rb").readline()
    return int(status_line.split()[1])


@pytest.mark.parametrize("how", ["module", "script"])
def test_serves_and_exits_cleanly_on_sigint(how):
    ws, tcp = free_port(), free_port()
    args = ["--host", "127.0.0.1", "--ws-port", str(ws), "--tcp-port", str(tcp), "--queue-size", "10"]
    cmd = module_cmd(*args) if how == "module" else script_cmd(*args)
    proc, lines = start(cmd)
    try:
        line = wait_line(lines, "listening")
        assert f"127.0.0.1:{ws}" in line and f"127.0.0.1:{tcp}" in line
        assert upgrade_status(ws) == 503  # serving: no backend yet
        with socket.create_connection(("127.0.0.1", tcp), timeout=DEADLINE):
            pass
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=DEADLINE) == 0
        wait_line(lines, "stopped")
    finally:
        proc.kill()


def test_env_vars_and_sigterm():
    ws, tcp = free_port(), free_port()
    proc, lines = start(module_cmd("--host", "127.0.0.1"), env={"PYSTRANDS_WS_PORT": str(ws), "PYSTRANDS_TCP_PORT": str(tcp), "PYSTRANDS_QUEUE_SIZE": "0"})
    try:
        line = wait_line(lines, "listening")
        assert f":{ws}" in line and f":{tcp}" in line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE) == 0
    finally:
        proc.kill()


@pytest.mark.parametrize(
    "args, env, needle",
    [
        (["--ws-port", "abc"], {}, "--ws-port"),
        (["--queue-size", "-1"], {}, "queue_size"),
        (["--slow-client-policy", "explode"], {}, "slow_client_policy"),
        (["--no-such-flag"], {}, "unrecognized"),
        ([], {"PYSTRANDS_WS_PORT": "eighty"}, "PYSTRANDS_WS_PORT"),
    ],
)
def test_bad_flags_exit_2_with_a_message(args, env, needle):
    proc = subprocess.run(module_cmd(*args), capture_output=True, text=True, timeout=DEADLINE, env={**os.environ, **env})
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr


def test_port_in_use_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        proc = subprocess.run(module_cmd("--host", "127.0.0.1", "--ws-port", str(taken), "--tcp-port", "0"), capture_output=True, text=True, timeout=DEADLINE)
    assert proc.returncode == 1
    assert f"127.0.0.1:{taken}" in proc.stderr and "ws_port" in proc.stderr
    assert "panicked" not in proc.stderr


def test_help_and_usage():
    out = subprocess.run(module_cmd("--help"), capture_output=True, text=True, timeout=DEADLINE)
    assert out.returncode == 0
    for flag in ("--host", "--ws-port", "--tcp-port", "--queue-size", "PYSTRANDS_WS_PORT"):
        assert flag in out.stdout
    bare = subprocess.run([sys.executable, "-m", "pystrands"], capture_output=True, text=True, timeout=DEADLINE)
    assert bare.returncode == 2 and "server" in bare.stderr
