"""The HTML and JavaScript blocks of the docs, run in a real headless Chromium against the real
broker. The blocks name hosts like broker.example.com over wss://: Chromium resolves those names
to the test broker's port on 127.0.0.1 (`--host-resolver-rules`), which serves TLS with the test
CA's certificate (Chromium is told to accept it), so the blocks run exactly as written. The page
around a block supplies what the block leaves to the application (`render`, a form, the token
endpoint `/api/broker-token`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from docblocks import ROOT, background, base_env, signed_token, texts, wait_http
from procinfo import free_port
from pystrands.testing import running_broker
from test_browser_client import Pages, backend_on, chromium, wait
from tls_util import TLSFiles
from v1peer import DEADLINE

JWT_SECRET = "docs-jwt-" * 4


def token(room: str | None = None) -> str:
    return signed_token(JWT_SECRET, sub="ann", **({"room": room} if room else {}))


def tls_broker(files: TLSFiles, **settings: Any) -> Any:
    return running_broker(tls_cert=files.server_cert, tls_key=files.server_key, jwt_secret=JWT_SECRET, **settings)


@pytest.fixture
def site() -> Iterator[Pages]:
    """The application's origin: an HTTP server for the page and its token endpoint."""
    pages = Pages()
    try:
        yield pages
    finally:
        pages.close()


def mapped(host: str, port: int) -> list[str]:
    return [f"--host-resolver-rules=MAP {host} 127.0.0.1:{port}", "--ignore-certificate-errors"]


# What the application around the browser guide's block provides.
APP = """<!doctype html><meta charset="utf-8"><title>chat</title>
<form><input name="text"></form>
<script>
window.rendered = [];
window.reloads = [];
window.render = (room, offset, data) => window.rendered.push([room, offset, data]);
window.reloadRoomFromMyApi = (room) => window.reloads.push(room);
</script>
"""


def test_browser_guide_block_in_chromium(site: Pages, tls_files: TLSFiles):
    """browser.md: the module comes from the broker, the token from the app, room messages are
    rendered with their offsets, and the form's text reaches the backend."""
    [block] = texts("browser.md", "html")
    assert "https://broker.example.com/pystrands.js" in block and "wss://broker.example.com/lobby" in block
    with tls_broker(tls_files, history_size=100) as broker, backend_on(broker.tcp_port, broker) as backend:
        site.pages["/chat.html"] = APP + block
        site.pages["/api/broker-token"] = token()
        with chromium(*mapped("broker.example.com", broker.ws_port)) as driver:
            driver.get(site.url("/chat.html"))
            wait(lambda: backend.connections, "the page's client to connect with its token")
            assert broker.stats()["token_connections"] == 1
            for n in range(3):  # no room claim in this token: the first room is the URL's path
                backend.send_room_message("/lobby", f"news {n}")
            rendered = wait(lambda: len(got := driver.execute_script("return window.rendered")) == 3 and got, "three rendered messages")
            assert [(room, data) for room, _, data in rendered] == [("/lobby", f"news {n}") for n in range(3)]
            offsets = [offset for _, offset, _ in rendered]
            assert offsets == sorted(offsets) and len(set(offsets)) == 3 and all(isinstance(o, int) for o in offsets), offsets
            driver.execute_script('document.querySelector("input").value = "typed"; document.querySelector("form").requestSubmit()')
            wait(lambda: "typed" in backend.received, "the form's text at the backend")
            assert driver.execute_script("return window.reloads") == []


def test_security_guide_token_block_in_chromium(site: Pages, tls_files: TLSFiles):
    """security.md: the client with a `token` function fetching /api/broker-token is accepted by
    the broker on the token alone, in the token's room."""
    [block] = texts("security.md", "js")
    assert "wss://chat.example.com/lobby" in block
    page = (
        APP
        + '<script type="module">\nimport { PyStrands } from "https://chat.example.com/pystrands.js";\n'
        + block
        + 'window.joined = [];\nclient.on("connected", (ev) => window.joined.push(ev));\n</script>'
    )
    with tls_broker(tls_files) as broker, backend_on(broker.tcp_port, broker) as backend:
        site.pages["/chat.html"] = page
        site.pages["/api/broker-token"] = token(room="support")
        with chromium(*mapped("chat.example.com", broker.ws_port)) as driver:
            driver.get(site.url("/chat.html"))
            wait(lambda: driver.execute_script("return window.joined && window.joined.length"), "the connected event")
            assert backend.requests == [], "a token connection asks no backend"
            wait(lambda: backend.connections, "new_connection at the backend")
            assert broker.stats()["token_connections"] == 1 and broker.stats()["rooms"] == 1
            assert list(driver.execute_script("return window.joined[0].rooms")) == ["support"]


def test_fastapi_guide_block_in_chromium(tmp_path: Path):
    """fastapi.md: `uvicorn examples.fastapi_lifespan:app` as the guide says (ports chosen free),
    then the page's two lines: a token URL from /token, a WebSocket to it, an echo through the
    in-process handlers."""
    [block] = texts("guides/fastapi.md", "js")
    http_port, ws_port = free_port(), free_port()
    env = base_env(CHAT_WS_PORT=str(ws_port))
    with background(f"uvicorn examples.fastapi_lifespan:app --port {http_port}", ROOT, env) as app:
        wait_http(f"http://127.0.0.1:{http_port}/", app)
        with chromium() as driver:
            driver.get(f"http://localhost:{http_port}/")
            script = (
                "const done = arguments[arguments.length - 1];\n(async () => {\n"
                + block
                + 'ws.onopen = () => ws.send("hi");\nws.onmessage = (ev) => done(ev.data);\n'
                'ws.onerror = () => done("websocket error");\n})().catch((e) => done("failed: " + e));'
            )
            assert driver.execute_async_script(script) == "ann: hi"
        app.signal()
        app.wait(DEADLINE)
    out = app.output()
    # uvicorn shuts down gracefully, then ends by the signal it got (status -15)
    assert "Application shutdown complete" in out and "Traceback" not in out, out
