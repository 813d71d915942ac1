"""Issue 18 beyond tokens and the backend link: certificates reloaded without a restart (file
change and SIGHUP, a broken file keeping the old one), a cluster over `rediss://` against a real
redis-server speaking TLS, secrets read from files and kept out of the logs, and the warning for
a backend port open beyond loopback with nothing guarding it.

Certificates come from `openssl` (tests/tls_util.py); every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import websockets

from procinfo import free_port
from pystrands.testing import running_broker
from test_cli import module_cmd, start, wait_line
from tls_util import TLSFiles, client_context, make_tls_files
from v1peer import DEADLINE, connect_v2_backend

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


async def wss_ok(port: int, ca: str, path: str = "/", **kw: Any) -> bool:
    """Whether a wss:// client trusting `ca` gets through the TLS handshake (and an upgrade)."""
    try:
        async with websockets.connect(f"wss://127.0.0.1:{port}{path}", ssl=client_context(ca), open_timeout=DEADLINE, **kw):
            return True
    except ssl.SSLCertVerificationError:
        return False


def until(predicate: Any, what: str, timeout: float = DEADLINE) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def install(src: TLSFiles, cert: Path, key: Path) -> None:
    """Replaces the served certificate and key, each file atomically."""
    for source, target in ((src.server_cert, cert), (src.server_key, key)):
        tmp = target.with_suffix(".new")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


def test_the_certificate_is_reloaded_when_its_files_change_and_a_broken_one_keeps_the_old(
    tls_files: TLSFiles, tmp_path: Path
):
    second = make_tls_files(tmp_path / "second")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    install(tls_files, cert, key)

    async def main() -> None:
        with running_broker(jwt_secret="k" * 32, tls_cert=str(cert), tls_key=str(key), log_level="error") as br:
            token = jwt.encode({"exp": time.time() + 60}, "k" * 32, algorithm="HS256")
            assert await wss_ok(br.ws_port, tls_files.ca, f"/?token={token}")
            install(second, cert, key)
            end = time.monotonic() + DEADLINE
            while not await wss_ok(br.ws_port, second.ca, f"/?token={token}"):
                assert time.monotonic() < end, "the new certificate was not picked up"
                await asyncio.sleep(0.1)
            assert not await wss_ok(br.ws_port, tls_files.ca, f"/?token={token}")
            assert br.stats()["tls_reloads"] >= 1
            # A half-written certificate: counted, and the one in use stays.
            reloads = br.stats()["tls_reloads"]
            cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
            end = time.monotonic() + DEADLINE
            while br.stats()["tls_reload_failures"] == 0:
                assert time.monotonic() < end, "the broken file was not looked at"
                await asyncio.sleep(0.1)
            assert br.stats()["tls_reloads"] == reloads
            assert await wss_ok(br.ws_port, second.ca, f"/?token={token}")

    run(main())


def test_sighup_reloads_the_certificate_of_the_standalone_broker(tls_files: TLSFiles, tmp_path: Path):
    ws, tcp = free_port(), free_port()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    install(tls_files, cert, key)
    args = ["--host", "127.0.0.1", "--ws-port", str(ws), "--tcp-port", str(tcp), "--tls-cert", str(cert), "--tls-key", str(key)]
    proc, lines = start(module_cmd(*args))
    try:
        assert "wss=true" in wait_line(lines, "listening")
        proc.send_signal(signal.SIGHUP)
        wait_line(lines, "TLS certificate reloaded")
        assert proc.poll() is None, "SIGHUP must not stop the broker"
        proc.send_signal(signal.SIGHUP)
        wait_line(lines, "TLS certificate reloaded")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=DEADLINE)
    assert proc.returncode == 0


def test_a_missing_or_broken_certificate_stops_the_start_with_the_setting_named(tls_files: TLSFiles, tmp_path: Path):
    from pystrands import Broker

    bad = tmp_path / "bad.pem"
    bad.write_text("garbage")
    cases = [
        ({"tls_cert": str(tmp_path / "nope.pem"), "tls_key": tls_files.server_key}, "tls_cert"),
        ({"tls_cert": str(bad), "tls_key": tls_files.server_key}, "tls_cert"),
        ({"tls_cert": tls_files.server_cert, "tls_key": str(bad)}, "tls_key"),
        ({"tls_cert": tls_files.server_cert, "tls_key": tls_files.client_key}, "tls_key"),
        ({"tls_cert": tls_files.server_cert}, "tls_key"),
        ({"backend_tls_client_ca": tls_files.ca}, "backend_tls_cert"),
        (
            {"backend_tls_cert": tls_files.server_cert, "backend_tls_key": tls_files.server_key, "backend_tls_client_ca": str(bad)},
            "backend_tls_client_ca",
        ),
        ({"redis_tls_ca": tls_files.ca, "cluster_url": "redis://127.0.0.1:1/0"}, "redis_tls_ca"),
        ({"jwt_public_key": str(bad)}, "jwt_public_key"),
    ]
    for settings, name in cases:
        with pytest.raises(ValueError, match=f"invalid setting {name}="):
            Broker(host="127.0.0.1", ws_port=0, tcp_port=0, **settings).start()


class TlsRedis:
    """A redis-server that speaks only TLS, with the test CA's server certificate."""

    def __init__(self, files: TLSFiles) -> None:
        self.port = free_port()
        self.files = files
        self.proc = subprocess.Popen(
            [
                REDIS, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
                "--tls-cert-file", files.server_cert, "--tls-key-file", files.server_key,
                "--tls-ca-cert-file", files.ca, "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        until(self.ping, "redis-server to answer over TLS")

    def ping(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
                with client_context(self.files.ca).wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.mark.skipif(not Path(REDIS).exists(), reason="redis-server is not installed")
def test_a_cluster_over_rediss_delivers_across_nodes(tls_files: TLSFiles):
    redis = TlsRedis(tls_files)
    try:
        url = f"rediss://127.0.0.1:{redis.port}/0"

        async def main() -> None:
            common: dict[str, Any] = {"cluster_url": url, "redis_tls_ca": tls_files.ca, "jwt_secret": "k" * 32}
            with running_broker(**common, cluster_node_id="a") as a, running_broker(**common, cluster_node_id="b") as b:
                token = jwt.encode({"room": "r", "exp": time.time() + 60}, "k" * 32, algorithm="HS256")
                ws = await websockets.connect(f"ws://127.0.0.1:{a.ws_port}/?token={token}", open_timeout=DEADLINE)
                backend = await connect_v2_backend(b)
                end = time.monotonic() + DEADLINE
                while True:  # until both nodes see each other
                    await backend.send("message_to_room", {"room_id": "r", "message": "over TLS"})
                    try:
                        assert await asyncio.wait_for(ws.recv(), 0.5) == "over TLS"
                        break
                    except asyncio.TimeoutError:
                        assert time.monotonic() < end, "no message across the rediss:// cluster"
                assert a.stats()["cluster_connected"] and b.stats()["cluster_connected"]
                assert a.stats()["cluster_received"] >= 1
                await ws.close()
                await backend.close()

        run(main())
        # Without the CA the Redis certificate is not trusted: the start fails and says why.
        from pystrands import Broker

        with pytest.raises(Exception, match="(?i)certificate|tls|ssl|unknown"):
            Broker(host="127.0.0.1", ws_port=0, tcp_port=0, cluster_url=url).start()
    finally:
        redis.stop()


def test_secrets_come_from_files_and_never_reach_the_logs(tmp_path: Path):
    secret = "file-secret-" + "x" * 40
    secret_file = tmp_path / "jwt"
    secret_file.write_text(secret + "\n")
    ws, tcp = free_port(), free_port()
    env = {"PYSTRANDS_JWT_SECRET_FILE": str(secret_file), "PYSTRANDS_BACKEND_SECRET": "b" * 40}
    proc, lines = start(module_cmd("--host", "127.0.0.1", "--ws-port", str(ws), "--tcp-port", str(tcp), "--log-level", "debug"), env)
    try:
        wait_line(lines, "listening")

        async def main() -> None:
            token = jwt.encode({"exp": time.time() + 60}, secret, algorithm="HS256")
            async with websockets.connect(f"ws://127.0.0.1:{ws}/?token={token}", open_timeout=DEADLINE):
                pass
            forged = jwt.encode({"exp": time.time() + 60}, secret + "\n", algorithm="HS256")
            with pytest.raises(websockets.exceptions.InvalidStatus):
                async with websockets.connect(f"ws://127.0.0.1:{ws}/?token={forged}", open_timeout=DEADLINE):
                    pass

        run(main())
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=DEADLINE)
    logged = []
    while True:  # until the reader thread has passed on the last line of the ended process
        try:
            logged.append(lines.get(timeout=1.0))
        except Exception:
            break
    assert logged and not any(secret in line or "b" * 40 in line for line in logged)
    # A secret file that cannot be read: exit 2 naming the variable.
    bad = subprocess.run(
        module_cmd("--ws-port", "0", "--tcp-port", "0"),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env={**os.environ, "PYSTRANDS_JWT_SECRET_FILE": str(tmp_path / "missing")},
    )
    assert bad.returncode == 2 and "PYSTRANDS_JWT_SECRET_FILE" in bad.stderr


def test_an_unguarded_backend_port_beyond_loopback_is_warned_about():
    script = (
        "import logging, pystrands\n"
        "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
        "for kw in ({}, {'backend_secret': 's' * 20}):\n"
        "    b = pystrands.Broker(ws_host='127.0.0.1', tcp_host='0.0.0.0', ws_port=0, tcp_port=0, **kw)\n"
        "    b.start(); print('---', flush=True); b.stop()\n"
        "b = pystrands.Broker(host='127.0.0.1', ws_port=0, tcp_port=0); b.start(); b.stop()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if "beyond loopback" in line]
    assert len(warnings) == 1 and "backend_secret" in warnings[0], out.stderr
    assert sum("clear text" in line for line in out.stderr.splitlines()) == 1, out.stderr


def test_the_token_recipe_of_the_security_guide_makes_tokens_the_broker_accepts(tmp_path: Path):
    """docs/security.md's "Making tokens" block, run as it is."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "security.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def broker_token" in b)
    script = tmp_path / "make_token.py"
    script.write_text(block)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30, check=True)
    token = out.stdout.strip()
    secret = re.search(r'"(a-long-random-secret[^"]*)"', block)
    assert secret is not None

    async def main() -> None:
        with running_broker(jwt_secret=secret.group(1)) as br:
            backend = await connect_v2_backend(br)
            async with websockets.connect(f"ws://127.0.0.1:{br.ws_port}/?token={token}", open_timeout=DEADLINE) as ws:
                await ws.send("x")
                while (ev := await backend.recv())["action"] != "new_message":
                    pass
                assert ev["params"]["context"]["user_id"] == "ann" and ev["params"]["context"]["room_id"] == "lobby"
            await backend.close()

    run(main())
