"""The code blocks of the documentation site's guides (docs/guides/), run as written (only ports
are changed to free ones) against the real broker. Blocks that include an example file
(`--8<--`) are run through that example in tests/test_examples.py."""

from __future__ import annotations

import asyncio
import re
import types
from pathlib import Path

import websockets

from pystrands.testing import running_broker, ws_url
from v1peer import DEADLINE, wait_for

GUIDES = Path(__file__).resolve().parents[1] / "docs" / "guides"


def python_blocks(page: str) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", (GUIDES / page).read_text(), re.S)
    return [b for b in blocks if not b.lstrip().startswith("--8<--")]


def load(code: str, name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(code, f"<{name}>", "exec"), module.__dict__)
    return module


def test_every_guide_block_is_run_by_a_test():
    """A new block in a guide must get a test here (this list is the inventory)."""
    counted = {page.name: len(python_blocks(page.name)) for page in GUIDES.glob("*.md")}
    assert counted == {"fastapi.md": 1, "flask-django.md": 1, "testing.md": 1}, counted


def test_fastapi_guide_tcp_backend_with_lifespan():
    from fastapi.testclient import TestClient

    [code] = python_blocks("fastapi.md")
    with running_broker() as broker:
        assert 'Backend("localhost", 8081)' in code
        module = load(code.replace('Backend("localhost", 8081)', f'Backend("127.0.0.1", {broker.tcp_port})'), "fastapi_guide")
        with TestClient(module.app):
            asyncio.run(wait_for(lambda: broker.stats()["backends"] == 1, what="the guide's backend connects"))

            async def chat() -> None:
                async with websockets.connect(ws_url(broker, "/room1"), open_timeout=DEADLINE) as ws:
                    await ws.send("ping")
                    assert await asyncio.wait_for(ws.recv(), DEADLINE) == "echo: ping"

            asyncio.run(chat())
        assert module.backend.connected is False


def test_flask_guide_sends_to_a_room_from_a_view():
    [code] = python_blocks("flask-django.md")
    with running_broker() as broker:
        assert 'Notifier("localhost", 8081)' in code
        module = load(code.replace('Notifier("localhost", 8081)', f'Notifier("127.0.0.1", {broker.tcp_port})'), "flask_guide")
        try:
            asyncio.run(wait_for(lambda: broker.stats()["backends"] == 1, what="the guide's client connects"))

            async def scenario() -> None:
                async with websockets.connect(ws_url(broker, "/orders"), open_timeout=DEADLINE) as ws:
                    reply = await asyncio.to_thread(module.app.test_client().post, "/rooms/orders/notify", data="order 7 shipped")
                    assert reply.get_json() == {"sent": True}
                    assert await asyncio.wait_for(ws.recv(), DEADLINE) == "order 7 shipped"

            asyncio.run(scenario())
        finally:
            module.notifier.disconnect()


def test_testing_guide_example_passes_as_a_test():
    [code] = python_blocks("testing.md")
    module = load(code, "testing_guide")
    module.test_chat()
