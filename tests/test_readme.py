"""The README's quick start and the docs site's getting-started page, pasted as they are: their
code blocks are extracted from README.md / docs/getting-started.md and run as programs (only the
ports are changed to free ones), driven by real WebSocket clients."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

import docblocks
from procinfo import free_port
from pystrands.testing import running_broker, ws_url
from v1peer import DEADLINE, wait_for

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# (file, heading its quick start starts at; None: the whole page)
SOURCES = {"readme": (README, "## Quick start"), "getting-started": (ROOT / "docs" / "getting-started.md", None)}



def quick_start_blocks(source: str = "readme") -> list[str]:
    """The page's Python blocks (for the README, those of its quick start section)."""
    path, heading = SOURCES[source]
    page = "README.md" if path == README else path.relative_to(docblocks.DOCS).as_posix()
    found = docblocks.blocks(page, "python")
    if heading is not None:
        lines = path.read_text().splitlines()
        start = lines.index(heading) + 1
        end = next(n for n in range(start, len(lines)) if lines[n].startswith("## ")) + 1
        found = [b for b in found if start <= b.line <= end]
    return [b.text for b in found]


@pytest.fixture(params=sorted(SOURCES))
def source(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run_program(code: str, tmp_path: Path) -> subprocess.Popen[str]:
    script = tmp_path / "program.py"
    script.write_text(code)
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def echo_round_trip(url: str) -> tuple[str, websockets.ClientConnection]:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while True:
        try:
            ws = await websockets.connect(url, open_timeout=DEADLINE)
            break
        except (OSError, websockets.InvalidStatus):  # not listening yet / backend not attached yet
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
    await ws.send("hi")
    return await asyncio.wait_for(ws.recv(), DEADLINE), ws


def test_readme_has_the_one_process_example_first(source):
    blocks = quick_start_blocks(source)
    assert ".serve(backend=" in blocks[0], "the quick start opens with the one-process example"


def test_one_process_quick_start_runs_and_stops_on_sigterm(tmp_path, source):
    code = quick_start_blocks(source)[0]
    ws_port, tcp_port = free_port(), free_port()
    assert "ws_port=8080, tcp_port=8081" in code
    proc = run_program(code.replace("ws_port=8080, tcp_port=8081", f"ws_port={ws_port}, tcp_port={tcp_port}"), tmp_path)
    try:

        async def scenario() -> int | None:
            reply, ws = await echo_round_trip(f"ws://127.0.0.1:{ws_port}/lobby")
            assert reply == "echo: hi"
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(ws.recv(), DEADLINE)
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None
            return None

        assert asyncio.run(scenario()) == 1001, "SIGTERM closes the clients with 1001"
        out, _ = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0, out
        assert "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_tcp_backend_quick_start_runs(tmp_path, source):
    code = quick_start_blocks(source)[1]
    assert "port=8081" in code
    with running_broker() as broker:
        proc = run_program(code.replace("port=8081", f"port={broker.tcp_port}"), tmp_path)
        try:
            async def scenario() -> str:
                await wait_for(lambda: broker.stats().get("backends") == 1, what="the README backend connects")
                reply, ws = await echo_round_trip(ws_url(broker, "/lobby"))
                await ws.close()
                return reply

            assert asyncio.run(scenario()) == "echo: hi"
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=DEADLINE)
            assert "Traceback" not in out or "KeyboardInterrupt" in out, out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
