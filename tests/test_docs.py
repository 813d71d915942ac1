"""Every code block of the README and the docs site is run by a test: the inventory below names,
block by block, the test that runs it, and `test_every_code_block_of_the_docs_is_run_by_a_test`
fails on a block without one (it checks that the named test exists, not what it reads: each
test takes its block from the page itself). The Python blocks are run here as written (only
ports are changed to free ones) against the real broker; shell blocks in test_docs_commands.py,
JSON and YAML in test_docs_wire.py, HTML and JavaScript in a real Chromium in
test_docs_browser.py; some next to the feature they show. Not run as written: the benchmark
commands (minutes each; their arguments are checked by each script's parser), the fuzzing
commands (.ci/run runs scripts/fuzz.sh) and the README's `bash tests/run_all.sh` (the suite
itself, run by .ci/run). Blocks that include an example file (`--8<--`) are run through that
example in tests/test_examples.py; `text` blocks are diagrams, not code."""

from __future__ import annotations

import asyncio
import importlib
import types
from pathlib import Path

import pytest
import websockets

import docblocks
from pystrands.testing import running_broker, ws_url
from v1peer import DEADLINE, wait_for

DOCS = docblocks.DOCS
GUIDES = DOCS / "guides"
DIAGRAM = "(a diagram, not code)"

# page → (language, the test that runs it) for each of its blocks, in order.
INVENTORY: dict[str, list[tuple[str, str]]] = {
    "README.md": [
        ("text", DIAGRAM),
        ("bash", "test_docs_commands.py::test_readme_install_block_builds_and_serves"),
        ("bash", "test_docs_commands.py::test_ci_runs_the_readme_test_command"),
        ("python", "test_readme.py::test_one_process_quick_start_runs_and_stops_on_sigterm"),
        ("python", "test_readme.py::test_tcp_backend_quick_start_runs"),
        ("python", "test_bare_broker_block_serves_and_stops"),
    ],
    "benchmarks.md": [("bash", "test_docs_commands.py::test_benchmark_commands_parse")] * 4
    + [("sh", "test_docs_commands.py::test_benchmark_commands_parse")] * 2,
    "broker.md": [
        ("python", "test_clients_history.py::test_the_documented_history_example_works"),
        ("python", "test_rooms.py::test_the_documented_chat_example_works"),
        ("python", "test_room_config_block"),
        ("python", "test_in_process_serve_block_echoes_and_stops"),
        ("python", "test_fastapi_lifespan_block_of_broker_md"),
    ],
    "browser.md": [("html", "test_docs_browser.py::test_browser_guide_block_in_chromium")],
    "deployment.md": [("text", DIAGRAM), ("bash", "test_docs_commands.py::test_deployment_block_runs_a_cluster_node")],
    "getting-started.md": [
        ("bash", "test_docs_commands.py::test_pip_install_blocks_in_a_fresh_venv"),
        ("python", "test_readme.py::test_one_process_quick_start_runs_and_stops_on_sigterm"),
        ("python", "test_readme.py::test_tcp_backend_quick_start_runs"),
        ("python", "test_bare_broker_block_serves_and_stops"),
    ],
    "guides/fastapi.md": [
        ("js", "test_docs_browser.py::test_fastapi_guide_block_in_chromium"),
        ("python", "test_fastapi_guide_tcp_backend_with_lifespan"),
    ],
    "guides/flask-django.md": [
        ("python", "test_flask_guide_sends_to_a_room_from_a_view"),
        ("bash", "test_docs_commands.py::test_django_guide_commands_run_the_example"),
    ],
    "guides/operations.md": [
        ("python", "test_logging_block"),
        ("json", "test_docs_wire.py::test_json_log_line_block"),
        ("yaml", "test_docs_wire.py::test_kubernetes_probe_block"),
    ],
    "guides/testing.md": [("python", "test_testing_guide_example_passes_as_a_test")],
    "index.md": [("bash", "test_docs_commands.py::test_pip_install_blocks_in_a_fresh_venv")],
    "migration.md": [("bash", "test_docs_commands.py::test_upgrade_block_from_1_0")],
    "protocol.md": [("json", "test_docs_wire.py::test_protocol_lines_are_what_the_broker_speaks")] * 6,
    "security.md": [
        ("bash", "test_docs_commands.py::test_tls_block_serves_wss_only"),
        ("bash", "test_docs_commands.py::test_backend_mutual_tls_block"),
        ("python", "test_client_tls_block_builds_the_three_flavours"),
        ("bash", "test_docs_commands.py::test_token_block_both_key_kinds"),
        ("js", "test_docs_browser.py::test_security_guide_token_block_in_chromium"),
        ("python", "test_security.py::test_the_token_recipe_of_the_security_guide_makes_tokens_the_broker_accepts"),
        ("bash", "test_docs_commands.py::test_redis_over_tls_block"),
        ("bash", "test_docs_commands.py::test_fuzz_block_names_real_targets"),
    ],
}


def blocks_of(page: str) -> list[str]:
    return docblocks.texts(page, "python")


def python_blocks(page: str) -> list[str]:
    return blocks_of(f"guides/{page}")


def load(code: str, name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(code, f"<{name}>", "exec"), module.__dict__)
    return module


def test_every_code_block_of_the_docs_is_run_by_a_test():
    """A new block anywhere in README.md or docs/ must get a test and a line in INVENTORY; each
    named test must exist."""
    found = {page: [b.lang for b in docblocks.blocks(page)] for page in docblocks.pages()}
    found = {page: langs for page, langs in found.items() if langs}
    assert found == {page: [lang for lang, _ in entries] for page, entries in INVENTORY.items()}, found
    for page, entries in INVENTORY.items():
        for lang, test in entries:
            if test == DIAGRAM:
                assert lang == "text", f"{page}: only `text` blocks can be left unrun"
                continue
            module, _, name = test.rpartition("::")
            names = vars(importlib.import_module(module.removesuffix(".py"))) if module else globals()
            assert name.startswith("test_") and callable(names.get(name)), f"{page}: {test} does not exist"


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


def run_until_sigterm(code: str, ws_port: int, tmp_path: Path, path: str = "/lobby", reply: str = "hi") -> None:
    """Runs a block as a program, checks it serves — an echo of "hi", or with `reply=""` the 503
    of a broker with no backend yet — and stops it with SIGTERM (exit 0, no traceback)."""
    import shlex
    import sys

    from test_readme import echo_round_trip

    url = f"ws://127.0.0.1:{ws_port}{path}"
    script = tmp_path / "program.py"
    script.write_text(code)
    with docblocks.background(shlex.join([sys.executable, str(script)]), tmp_path, docblocks.base_env()) as program:

        async def scenario() -> None:
            if reply:
                got, ws = await echo_round_trip(url)
                assert got == reply
                await ws.close()
                return
            end = asyncio.get_running_loop().time() + DEADLINE
            while True:
                try:
                    await websockets.connect(url, open_timeout=DEADLINE)
                    raise AssertionError("a broker with no backend accepted a client")
                except websockets.InvalidStatus as refused:
                    assert refused.response.status_code == 503
                    return
                except OSError:
                    assert program.poll() is None, program.output()
                    assert asyncio.get_running_loop().time() < end, "the program did not serve"
                    await asyncio.sleep(0.05)

        asyncio.run(scenario())
        docblocks.stops_cleanly(program)
        assert "Traceback" not in program.output(), program.output()


@pytest.mark.parametrize("page", ["README.md", "getting-started.md"])
def test_bare_broker_block_serves_and_stops(tmp_path: Path, page: str):
    from procinfo import free_port

    [code] = [b for b in blocks_of(page) if ".serve()" in b]
    ws, tcp = free_port(), free_port()
    assert "Broker(ws_port=8080, tcp_port=8081)" in code
    code = code.replace("Broker(ws_port=8080, tcp_port=8081)", f"Broker(host='127.0.0.1', ws_port={ws}, tcp_port={tcp})")
    run_until_sigterm(code, ws, tmp_path, reply="")  # no backend: the upgrade is answered 503


def test_in_process_serve_block_echoes_and_stops(tmp_path: Path):
    from procinfo import free_port

    code = blocks_of("broker.md")[3]
    ws, tcp = free_port(), free_port()
    assert "Broker(ws_port=8080)" in code
    run_until_sigterm(code.replace("Broker(ws_port=8080)", f"Broker(host='127.0.0.1', ws_port={ws}, tcp_port={tcp})"), ws, tmp_path)


def test_fastapi_lifespan_block_of_broker_md():
    from fastapi.testclient import TestClient

    from procinfo import free_port

    code = blocks_of("broker.md")[4]
    ws = free_port()
    assert "Broker(ws_port=8080)" in code
    module = load(code.replace("Broker(ws_port=8080)", f"Broker(host='127.0.0.1', ws_port={ws}, tcp_port=0)"), "broker_md_fastapi")
    with TestClient(module.app):

        async def chat() -> None:
            async with websockets.connect(f"ws://127.0.0.1:{ws}/lobby", open_timeout=DEADLINE) as c:
                await c.send("hi")
                assert await asyncio.wait_for(c.recv(), DEADLINE) == "hi"

        asyncio.run(chat())


def test_logging_block():
    import logging

    [code] = blocks_of("guides/operations.md")
    throttle = logging.getLogger("pystrands.broker.throttle")
    before = throttle.level
    try:
        load(code, "broker_md_logging")
        assert throttle.level == logging.ERROR
    finally:
        throttle.setLevel(before)


def test_room_config_block():
    """A fragment (`await client.room_config(...)`): run inside a coroutine with a connected client."""
    from pystrands import AsyncPyStrandsClient

    code = blocks_of("broker.md")[2]
    body = "\n".join("    " + line for line in code.strip().splitlines())
    with running_broker() as broker:

        async def main() -> None:
            client = AsyncPyStrandsClient("127.0.0.1", broker.tcp_port)
            assert await client.connect()
            try:
                fragment = load(f"async def run(client):\n{body}\n", "room_config_block")
                await fragment.run(client)
                await client.send_room_message("lobby", "kept")
                history = await client.room_history("lobby")
                assert [m.data for m in history.messages][-1:] == ["kept"]
            finally:
                await client.disconnect()

        asyncio.run(main())


def test_client_tls_block_builds_the_three_flavours(tmp_path: Path, tls_files, monkeypatch):
    import shutil
    import ssl

    code = blocks_of("security.md")[0]
    for name, source in (("backend-ca.pem", tls_files.ca), ("backend-1.pem", tls_files.client_cert), ("backend-1.key", tls_files.client_key)):
        shutil.copyfile(source, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    module = load(code, "security_tls_block")
    assert isinstance(module.ctx, ssl.SSLContext)
    for client in (module.client, module.aclient):
        assert client.ssl is module.ctx
