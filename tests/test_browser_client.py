"""The browser client the broker serves (/pystrands.js, python/pystrands/static/pystrands.js) in a
real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium), against the
real broker and real TCP backends (our threading client); cluster tests add a real redis-server.

The test pages (served by a small HTTP server on another port, so the module comes cross-origin
from the broker as in production) record every event of the client in `window.events`. Network
trouble is made by a TCP proxy between Chromium and the broker: it cuts every connection and
refuses new ones, freezes them (a dead link: nothing flows, nothing closes), or sends a new
connection to another cluster node. Publishers send numbered messages without pause; the page
must end with every number exactly once, in order.

Every wait has a deadline; nothing sleeps for correctness.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import pytest
import websockets

from procinfo import free_port
from pystrands import PyStrandsClient
from pystrands.testing import running_broker
from test_cluster import REDIS, RedisServer  # noqa: F401  (REDIS: the module skips without redis-server)
from v1peer import DEADLINE

STATIC = Path(__file__).resolve().parent.parent / "python" / "pystrands" / "static"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
EVENTS = ["state", "connected", "message", "join", "leave", "presence", "recovery", "disconnected", "error"]
FAST = {"minDelay": 50, "baseDelay": 100, "maxDelay": 500}  # reconnect quickly in tests

# The test page: loads the module named in ?module=, builds a client for ?ws= with ?opts= (JSON;
# ?token=1 adds a token function that counts its calls) and records every event.
MODULE_PAGE = """<!doctype html><meta charset="utf-8"><title>module</title>
<script type="module">
const q = new URLSearchParams(location.search);
window.events = [];
const plain = (ev) => JSON.parse(JSON.stringify(ev, (k, v) => (v instanceof Error ? String(v) : v)));
try {
  const mod = await import(q.get("module"));
  window.CLOSE_CODES = mod.CLOSE_CODES;
  const opts = JSON.parse(q.get("opts") || "{}");
  let n = 0;
  if (q.get("token") === "jwt") opts.token = () => fetch("/token").then((r) => r.text());
  else if (q.get("token")) opts.token = () => new Promise((resolve) => setTimeout(() => resolve("tok" + ++n), 1));
  const client = new mod.PyStrands(q.get("ws"), opts);
  for (const name of __EVENTS__) client.on(name, (ev) => window.events.push({ name, ev: plain(ev) }));
  window.client = client;
} catch (e) {
  window.loadError = String(e && e.stack || e);
}
</script>""".replace("__EVENTS__", json.dumps(EVENTS))

# The same with the classic script build: no module, `window.PyStrands` from a <script src>.
CLASSIC_PAGE = """<!doctype html><meta charset="utf-8"><title>classic</title>
<script src="__SRC__"></script>
<script>
var q = new URLSearchParams(location.search);
window.events = [];
try {
  var client = new window.PyStrands(q.get("ws"), JSON.parse(q.get("opts") || "{}"));
  __EVENTS__.forEach(function (name) {
    client.on(name, function (ev) { window.events.push({ name: name, ev: JSON.parse(JSON.stringify(ev)) }); });
  });
  window.client = client;
} catch (e) {
  window.loadError = String(e && e.stack || e);
}
</script>""".replace("__EVENTS__", json.dumps(EVENTS))

# The module driven through fake sockets (its `WebSocket` option): the test plays the broker.
FAKE_PAGE = """<!doctype html><meta charset="utf-8"><title>fake</title>
<script type="module">
const q = new URLSearchParams(location.search);
window.events = [];
window.sockets = [];
class FakeWS {
  constructor(url, protocols) {
    Object.assign(this, { url, protocols, sent: [], readyState: 0, protocol: "", closed: null });
    window.sockets.push(this);
  }
  send(data) { this.sent.push(JSON.parse(data)); }
  close(code, reason) { this.closed = [code, reason]; this.readyState = 3; }
}
window.fakeOpen = (i, protocol = "pystrands.1") => {
  const s = window.sockets[i];
  Object.assign(s, { protocol, readyState: 1 });
  s.onopen && s.onopen({});
};
window.fakeRecv = (i, ...frames) => frames.forEach((f) => window.sockets[i].onmessage && window.sockets[i].onmessage({ data: JSON.stringify(f) }));
window.fakeClose = (i, code, reason = "") => {
  const s = window.sockets[i];
  s.readyState = 3;
  s.onclose && s.onclose({ code, reason, wasClean: code !== 1006 });
};
try {
  const mod = await import(q.get("module"));
  window.makeClient = (url, opts) => {
    const client = new mod.PyStrands(url, Object.assign({ WebSocket: FakeWS }, opts));
    for (const name of __EVENTS__) client.on(name, (ev) => window.events.push({ name, ev: JSON.parse(JSON.stringify(ev)) }));
    window.client = client;
  };
} catch (e) {
  window.loadError = String(e && e.stack || e);
}
</script>""".replace("__EVENTS__", json.dumps(EVENTS))


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


@contextmanager
def chromium(*extra_args: str) -> Iterator[Any]:
    """A headless Chromium driven by Selenium, with more command-line switches if given."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        if os.environ.get("CI"):
            raise RuntimeError("chromium and chromium-driver are required in CI (.ci/run installs them)")
        pytest.skip("chromium / chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", *extra_args):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(DEADLINE)
    try:
        yield driver
    finally:
        driver.quit()


class Pages:
    """An HTTP server (another origin than the broker) serving the test pages."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {"/module.html": MODULE_PAGE, "/fake.html": FAKE_PAGE}
        # GET /token: a fresh signed token per call, when a test sets this.
        self.make_token: Callable[[], str] | None = None
        pages = self.pages
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                body = pages.get(self.path.split("?")[0])
                if self.path == "/token" and outer.make_token is not None:
                    body = outer.make_token()
                if body is None:
                    self.send_error(404)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, **query: Any) -> str:
        q = "&".join(f"{k}={quote(v if isinstance(v, str) else json.dumps(v), safe='')}" for k, v in query.items())
        return f"http://127.0.0.1:{self.server.server_port}{path}?{q}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pages() -> Iterator[Pages]:
    p = Pages()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------- helpers


class Page:
    """The events a test page recorded (fetched incrementally) and waits on them."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        error, new = self.driver.execute_script(
            "return [window.loadError || null, window.events ? window.events.slice(arguments[0]) : []]", len(self.events)
        )
        if error:
            raise AssertionError(f"the page failed: {error}")
        self.events.extend(new)
        return self.events

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e["ev"] for e in self.poll() if e["name"] == name]

    def messages(self, room: str | None = "feed") -> list[dict[str, Any]]:
        return [ev for ev in self.of("message") if ev["room"] == room]

    def numbers(self, room: str = "feed") -> list[int]:
        return [int(m["data"]) for m in self.messages(room)]

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def until(self, predicate: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
        end = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > end:
                tail = [(e["name"], e["ev"]) for e in self.events if e["name"] != "message"][-12:]
                raise AssertionError(f"timed out waiting for {what}; last non-message events: {tail}")
            time.sleep(0.02)


def open_page(driver: Any, pages: Pages, module: str, ws: str, **opts: Any) -> Page:
    token = opts.pop("token", False)
    query: dict[str, Any] = {"module": module, "ws": ws, "opts": json.dumps(opts)}
    if token:
        query["token"] = "jwt" if token == "jwt" else "1"
    driver.get(pages.url("/module.html", **query))
    page = Page(driver)
    page.until(lambda: page.js("return !!(window.client || window.loadError)"), "the client to load")
    page.poll()
    return page


def module_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/pystrands.js"


def wait(predicate: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    end = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


class Backend(PyStrandsClient):
    """Accepts every connection into the room ?room= (default "feed") as the user ?user=, with
    the client id ?cid= when given; records requests and messages."""

    def __init__(self, port: int, **kwargs: Any) -> None:
        super().__init__(host="127.0.0.1", port=port, **kwargs)
        self.requests: list[dict[str, list[str]]] = []
        self.received: list[str] = []
        self.connections: list[str] = []

    def on_connection_request(self, request: Any) -> bool:
        q = parse_qs(request.query)
        self.requests.append(q)
        request.context.room_id = q.get("room", ["feed"])[0]
        if "user" in q:
            request.context.user_id = q["user"][0]
        if "cid" in q:
            request.context.client_id = q["cid"][0]
        return True

    def on_new_connection(self, context: Any) -> None:
        self.connections.append(context.client_id)

    def on_message(self, message: str, context: Any) -> None:
        self.received.append(message)


@contextmanager
def backend_on(tcp_port: int, broker: Any = None, **kwargs: Any) -> Iterator[Backend]:
    b = Backend(tcp_port, **kwargs)
    assert b.connect(), "the backend could not connect"
    try:
        if broker is not None:
            wait(lambda: broker.stats()["backends"] >= 1, "the backend registered")
        yield b
    finally:
        b.disconnect(timeout=2.0)


class Publisher:
    """Sends "1", "2", ... to a room from one thread, every `interval` seconds, until stopped."""

    def __init__(self, backend: PyStrandsClient, room: str = "feed", interval: float = 0.004) -> None:
        self.backend, self.room, self.interval = backend, room, interval
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sent += 1
            self.backend.send_room_message(self.room, str(self.sent))
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(DEADLINE)
        return self.sent


class Proxy:
    """A TCP proxy on 127.0.0.1 (its own event loop thread) to `upstream` (a port, changeable).

    `cut()` resets every proxied connection and refuses new ones until `restore()`; `freeze()`
    makes the current connections a dead link (both directions dropped, nothing closed)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.refusing = False
        self.refused = 0
        self.accepted = 0
        self.pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.frozen: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(DEADLINE)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            self.refused += 1
            writer.transport.abort()
            return
        self.accepted += 1
        pair = (writer, up_writer)
        self.pairs.add(pair)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if pair in self.frozen:
                        continue  # a dead link: what is sent never arrives
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                if pair not in self.frozen:
                    writer.transport.abort()
                    up_writer.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.pairs.discard(pair)

    def cut(self) -> None:
        async def go() -> None:
            self.refusing = True
            for w1, w2 in list(self.pairs):
                w1.transport.abort()
                w2.transport.abort()

        self._call(go())

    def restore(self) -> None:
        self.refusing = False

    def freeze(self) -> None:
        async def go() -> None:
            self.frozen |= self.pairs

        self._call(go())

    def close(self) -> None:
        async def go() -> None:
            self.server.close()
            for w1, w2 in list(self.pairs):
                w1.transport.abort()
                w2.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self._call(go())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(DEADLINE)


@contextmanager
def proxy_to(port: int) -> Iterator[Proxy]:
    p = Proxy(port)
    try:
        yield p
    finally:
        p.close()


def http_body(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=DEADLINE) as r:
        return str(r.read().decode())


def all_numbers_once_in_order(page: Page, sent: int, what: str) -> None:
    page.until(lambda: len(page.messages()) >= sent, f"all {sent} messages ({what})", timeout=30)
    got = page.numbers()
    assert got == list(range(1, sent + 1)), (
        f"{what}: missing {sorted(set(range(1, sent + 1)) - set(got))[:20]}, duplicates {len(got) - len(set(got))}"
    )
    offsets = [m["offset"] for m in page.messages()]
    assert offsets == sorted(set(offsets)), "offsets strictly increasing"


def cut_and_restore(page: Page, proxy: Proxy, publisher: Publisher, round_: int) -> None:
    """Cuts the network path while the publisher keeps publishing, lets the page retry (and
    fail) twice, restores it, and waits for the page's recovered reconnect."""
    before = len(page.messages())
    refused = proxy.refused
    proxy.cut()
    page.until(lambda: len(page.of("disconnected")) >= round_, f"disconnect {round_}")
    wait(lambda: proxy.refused >= refused + 2, "two refused reconnect attempts")
    sent_while_away = publisher.sent
    proxy.restore()
    page.until(lambda: len(page.of("connected")) >= round_ + 1, f"reconnect {round_}")
    connected = page.of("connected")[-1]
    assert connected["reconnect"] is True and connected["recovered"] is True, connected
    assert connected["sessionError"] is None
    page.until(lambda: len(page.messages()) > sent_while_away, f"the messages published during cut {round_}")
    assert len(page.messages()) > before


# ---------------------------------------------------------------------------------- tests


def test_served_files_are_the_ones_in_the_package():
    """The broker embeds python/pystrands/static at build time: a stale build fails here first
    (rebuild: pip install .)."""
    module = (STATIC / "pystrands.js").read_text()
    lines = [line for line in module.splitlines() if line.strip()]
    assert lines[-1] == "export { PyStrands, CLOSE_CODES };"
    assert not any(("export " in line or "import " in line) for line in lines[:-1]), "one export line, no import"
    with running_broker() as br:
        assert http_body(br.ws_port, "/pystrands.js") == module, (
            "the broker serves an old build of pystrands.js: rebuild"
        )
        assert http_body(br.ws_port, "/pystrands.d.ts") == (STATIC / "pystrands.d.ts").read_text()
        classic = http_body(br.ws_port, "/pystrands.classic.js")
        assert "export " not in classic and "root.CLOSE_CODES = CLOSE_CODES;" in classic


def test_the_page_loads_the_client_from_the_broker_connects_and_gets_room_messages(browser: Any, pages: Pages):
    with running_broker(history_size=100) as br, backend_on(br.tcp_port, br) as backend:
        ws = f"ws://127.0.0.1:{br.ws_port}/chat?room=lobby"
        page = open_page(browser, pages, module_url(br.ws_port), ws, params={"user": "ann"}, token=True, **FAST)
        connected = page.until(lambda: page.of("connected"), "the welcome")[0]
        assert connected["userId"] == "ann" and connected["clientId"] and connected["reconnect"] is False
        assert connected["recovered"] is None and connected["sessionError"] is None and connected["ping"] == 30
        lobby = connected["rooms"]["lobby"]
        assert lobby["offset"] == 0 and lobby["epoch"]
        # autoConnect: "connecting" from the constructor on, then one change.
        assert page.of("state") == [{"state": "connected", "previous": "connecting"}]
        assert page.js("return window.client.state") == "connected"
        assert page.js("return window.client.userId") == "ann"
        # The token function ran before the attempt; params and the path reach the backend.
        assert backend.requests[-1]["token"] == ["tok1"] and backend.requests[-1]["user"] == ["ann"]

        backend.send_room_message("lobby", "one")
        backend.send_room_message("lobby", 'two "quoted"\n')
        page.until(lambda: len(page.messages("lobby")) == 2, "two room messages")
        assert page.messages("lobby") == [
            {"data": "one", "room": "lobby", "offset": 1, "epoch": lobby["epoch"], "user": None, "all": False},
            {
                "data": 'two "quoted"\n',
                "room": "lobby",
                "offset": 2,
                "epoch": lobby["epoch"],
                "user": None,
                "all": False,
            },
        ]
        assert page.js("return window.client.rooms") == {"lobby": {"offset": 2, "epoch": lobby["epoch"]}}

        # Private, user and broadcast messages carry no room.
        client_id = connected["clientId"]
        backend.send_private_message(client_id, "direct")
        backend.send_user_message("ann", "to ann")
        backend.broadcast_message("everyone")
        page.until(lambda: len(page.messages(None)) == 3, "the other kinds")
        assert [(m["data"], m["user"], m["all"]) for m in page.messages(None)] == [
            ("direct", None, False),
            ("to ann", "ann", False),
            ("everyone", None, True),
        ]

        # A join (with the room's position), its messages, a leave.
        backend.send_room_message("extra", "before the join")
        backend.join_room(client_id, "extra")
        joined = page.until(lambda: page.of("join"), "the join")[0]
        assert joined == {"room": "extra", "offset": 1, "epoch": joined["epoch"]}
        backend.send_room_message("extra", "x")
        page.until(lambda: page.messages("extra"), "a message of the joined room")
        assert page.messages("extra")[0]["offset"] == 2
        backend.leave_room(client_id, "extra")
        page.until(lambda: page.of("leave") == [{"room": "extra"}], "the leave")
        assert set(page.js("return window.client.rooms")) == {"lobby"}
        assert isinstance(page.js("return window.client.session"), str)

        # send() reaches the backend's on_message; a non-string is refused.
        assert page.js("return window.client.send('hi from the page')") is True
        wait(lambda: "hi from the page" in backend.received, "the page's message at the backend")
        assert "TypeError" in page.js("try { window.client.send(5) } catch (e) { return String(e) }")

        # close(): no reconnect, state closed, send throws.
        page.js("window.client.close()")
        page.until(lambda: page.of("disconnected"), "the close")
        closed = page.of("disconnected")[-1]
        assert (closed["code"], closed["local"], closed["willReconnect"], closed["delay"]) == (1000, True, False, None)
        assert page.js("return window.client.state") == "closed"
        assert "closed" in page.js("try { window.client.send('x') } catch (e) { return String(e) }")
        wait(lambda: br.stats()["clients"] == 0, "the broker saw the close")
        assert len(backend.requests) == 1 and not page.of("error")


def test_a_cut_network_path_is_recovered_exactly_twice_in_a_row(browser: Any, pages: Pages):
    with (
        running_broker(history_size=10_000) as br,
        backend_on(br.tcp_port, br) as backend,
        proxy_to(br.ws_port) as proxy,
    ):
        page = open_page(
            browser, pages, module_url(br.ws_port), f"ws://127.0.0.1:{proxy.port}/?cid=reader", token=True, **FAST
        )
        page.until(lambda: page.of("connected"), "the welcome")
        publisher = Publisher(backend)
        try:
            page.until(lambda: len(page.messages()) >= 20, "the first live messages")
            for round_ in (1, 2):
                cut_and_restore(page, proxy, publisher, round_)
        finally:
            sent = publisher.stop()
        all_numbers_once_in_order(page, sent, "two cuts")
        recoveries = page.of("recovery")
        assert recoveries == [{"room": None, "recovered": True, "offset": None, "epoch": None, "failed": []}] * 2
        disconnected = page.of("disconnected")
        assert all(d["willReconnect"] and d["code"] == 1006 for d in disconnected), disconnected
        # A fresh token for every attempt (the refused ones, which never reach the backend, too).
        tokens = [int(r["token"][0].removeprefix("tok")) for r in backend.requests]
        assert tokens[0] == 1 and tokens == sorted(set(tokens)) and len(tokens) == 3
        assert tokens[-1] == len(disconnected) + 1, "one token per attempt"
        stats = br.stats()
        assert stats["recoveries"] == 2 and stats["recoveries_failed"] == 0
        assert stats["messages_replayed"] > 0, "messages were missed and replayed"


def test_a_gap_longer_than_the_history_is_reported_as_not_recovered(browser: Any, pages: Pages):
    with running_broker(history_size=5) as br, backend_on(br.tcp_port, br) as backend, proxy_to(br.ws_port) as proxy:
        page = open_page(browser, pages, module_url(br.ws_port), f"ws://127.0.0.1:{proxy.port}/", **FAST)
        epoch = page.until(lambda: page.of("connected"), "the welcome")[0]["rooms"]["feed"]["epoch"]
        for i in range(1, 4):
            backend.send_room_message("feed", str(i))
        page.until(lambda: len(page.messages()) == 3, "three messages")
        proxy.cut()
        page.until(lambda: page.of("disconnected"), "the disconnect")
        for i in range(4, 24):
            backend.send_room_message("feed", str(i))
        wait(lambda: br.stats()["history_appended"] == 23, "20 more messages in the history")
        proxy.restore()
        page.until(lambda: len(page.of("recovery")) == 2, "the recovery events")
        assert page.of("recovery") == [
            {"room": "feed", "recovered": False, "offset": 23, "epoch": epoch},
            {"room": None, "recovered": False, "offset": None, "epoch": None, "failed": ["feed"]},
        ]
        connected = page.of("connected")[-1]
        assert connected["recovered"] is False and connected["rooms"] == {"feed": {"offset": 23, "epoch": epoch}}
        assert page.js("return window.client.rooms") == {"feed": {"offset": 23, "epoch": epoch}}
        backend.send_room_message("feed", "24")
        page.until(lambda: len(page.messages()) == 4, "the next live message")
        assert page.numbers() == [1, 2, 3, 24], "nothing of the gap replayed, live goes on"
        assert page.messages()[-1]["offset"] == 24


def test_a_raw_websocket_client_keeps_plain_text_frames_next_to_the_page(browser: Any, pages: Pages):
    async def raw_client(port: int, backend: Backend) -> str:
        async with websockets.connect(f"ws://127.0.0.1:{port}/?room=feed", open_timeout=DEADLINE) as ws:
            assert ws.subprotocol is None
            await asyncio.to_thread(wait, lambda: len(backend.connections) == 2, "the raw client's new_connection")
            await asyncio.to_thread(backend.send_room_message, "feed", 'plain "text"')
            return str(await asyncio.wait_for(ws.recv(), DEADLINE))

    with running_broker(history_size=10) as br, backend_on(br.tcp_port, br) as backend:
        page = open_page(browser, pages, module_url(br.ws_port), f"ws://127.0.0.1:{br.ws_port}/", **FAST)
        page.until(lambda: page.of("connected"), "the welcome")
        assert asyncio.run(raw_client(br.ws_port, backend)) == 'plain "text"', "the raw client gets the text as is"
        page.until(lambda: page.messages(), "the page's copy")
        assert page.messages()[0]["data"] == 'plain "text"' and page.messages()[0]["offset"] == 1


def test_the_classic_script_build_sets_window_pystrands(browser: Any, pages: Pages):
    with running_broker(history_size=10) as br, backend_on(br.tcp_port, br) as backend:
        pages.pages["/classic.html"] = CLASSIC_PAGE.replace(
            "__SRC__", f"http://127.0.0.1:{br.ws_port}/pystrands.classic.js"
        )
        browser.get(pages.url("/classic.html", ws=f"ws://127.0.0.1:{br.ws_port}/", opts=json.dumps(FAST)))
        page = Page(browser)
        page.until(lambda: page.js("return !!(window.client || window.loadError)"), "the classic script")
        page.until(lambda: page.of("connected"), "the welcome")
        assert page.js("return typeof window.PyStrands === 'function' && window.CLOSE_CODES.BAD_FRAME === 4400")
        assert page.js(
            "return window.PyStrands.isTerminal(4001) && !window.PyStrands.isTerminal(4408) && !window.PyStrands.isTerminal(1006)"
        )
        assert page.js(
            "return [4000, 4499, 1000, 1009].every(window.PyStrands.isTerminal) && ![4500, 4999, 1001, 1011, 4002].some(window.PyStrands.isTerminal)"
        )
        backend.send_room_message("feed", "classic")
        page.until(lambda: page.messages(), "a message")
        assert page.messages()[0]["data"] == "classic"


def fake_client(driver: Any, pages: Pages, port: int, url: str = "ws://broker.invalid/x", **opts: Any) -> Page:
    """A page whose client talks to fake sockets the test drives (sockets[i], fakeOpen, fakeRecv, fakeClose)."""
    driver.get(pages.url("/fake.html", module=module_url(port)))
    page = Page(driver)
    loaded = page.until(lambda: page.js("return window.makeClient ? 'ok' : window.loadError || ''"), "the module")
    assert loaded == "ok", loaded
    page.js("makeClient(arguments[0], arguments[1])", url, opts)
    return page


def welcome(rooms: dict[str, Any], session: str = "S1", **more: Any) -> dict[str, Any]:
    return {"t": "welcome", "client": "c1", "user": None, "ping": 30, "session": session, "rooms": rooms, **more}


def msg(offset: int, room: str = "r", epoch: str = "E") -> dict[str, Any]:
    return {"t": "msg", "room": room, "offset": offset, "epoch": epoch, "data": str(offset)}


def test_fake_broker_catch_up_duplicates_gaps_and_the_send_queue(browser: Any, pages: Pages):
    """The client's bookkeeping, with the test as the broker: the first welcome's position may be
    followed by replayed messages up to it; duplicates are dropped; a jump in a room's offsets
    reconnects at once naming the last offset seen, which the next welcome replays; sends wait
    (up to maxQueued) for the welcome."""
    with running_broker() as br:
        page = fake_client(browser, pages, br.ws_port, params={"a": "1 2"}, maxQueued=2, **FAST)
        page.until(lambda: page.js("return sockets.length") == 1, "the first socket")
        assert page.js("return [sockets[0].url, sockets[0].protocols]") == [
            "ws://broker.invalid/x?a=1+2",
            ["pystrands.1"],
        ]
        assert page.js("return [client.send('a'), client.send('b'), client.send('c'), client.queued]") == [
            True,
            True,
            False,
            2,
        ]
        page.js("fakeOpen(0)")
        assert page.js("return sockets[0].sent") == [{"t": "connect"}], "no session or positions the first time"
        page.js("fakeRecv(0, arguments[0])", welcome({"r": {"offset": 5, "epoch": "E"}, "plain": {}}))
        assert page.js("return sockets[0].sent.slice(1)") == [{"t": "msg", "data": "a"}, {"t": "msg", "data": "b"}]
        assert page.js("return client.rooms") == {
            "r": {"offset": 5, "epoch": "E"},
            "plain": {"offset": None, "epoch": None},
        }
        # Replayed after the welcome (published between the join and the connect), a duplicate, live.
        page.js(
            "fakeRecv(0, ...arguments)",
            msg(4),
            msg(5),
            msg(5),
            msg(6),
            msg(6),
            {"t": "ping"},
            {"t": "msg", "room": "plain", "data": "p"},
        )
        assert [m["offset"] for m in page.messages("r")] == [4, 5, 6]
        assert page.messages("plain") == [
            {"data": "p", "room": "plain", "offset": None, "epoch": None, "user": None, "all": False}
        ]
        # Offsets jump 6 -> 8: frames were lost; reconnect now from 6.
        page.js("fakeRecv(0, arguments[0])", msg(8))
        assert [m["offset"] for m in page.messages("r")] == [4, 5, 6], "the message after the gap is not delivered"
        assert page.js("return sockets[0].closed") == [1000, "reconnecting"]
        gap = page.of("disconnected")[0]
        assert (gap["local"], gap["willReconnect"], gap["delay"]) == (True, True, 0) and "offset 6 then 8" in gap[
            "reason"
        ]
        page.until(lambda: page.js("return sockets.length") == 2, "the immediate reconnect")
        page.js("fakeOpen(1)")
        assert page.js("return sockets[1].sent") == [
            {"t": "connect", "session": "S1", "positions": {"r": {"offset": 6, "epoch": "E"}}}
        ]
        page.js(
            "fakeRecv(1, ...arguments)",
            welcome({"r": {"offset": 8, "epoch": "E", "recovered": True}, "plain": {}}, session="S2", recovered=True),
            msg(7),
            msg(8),
            msg(8),
            msg(9),
        )
        assert [m["offset"] for m in page.messages("r")] == [4, 5, 6, 7, 8, 9]
        connected = page.of("connected")[-1]
        assert connected["reconnect"] is True and connected["recovered"] is True
        assert page.of("recovery") == [{"room": None, "recovered": True, "offset": None, "epoch": None, "failed": []}]
        # A second gap soon after the first: reconnect with the backoff, not at once (no tight loop).
        page.js("fakeRecv(1, arguments[0])", msg(11))
        assert page.of("disconnected")[-1]["delay"] >= FAST["minDelay"]
        # A join without a position (a cluster) takes the room's first message's; a leave forgets it.
        page.until(lambda: page.js("return sockets.length") == 3, "the reconnect")
        page.js("fakeOpen(2)")
        page.js(
            "fakeRecv(2, ...arguments)",
            welcome({"r": {"offset": 9, "epoch": "E", "recovered": True}}, session="S3", recovered=True),
            {"t": "join", "room": "j", "session": "S4"},
            msg(41, room="j", epoch="J"),
            msg(42, room="j", epoch="J"),
            {"t": "leave", "room": "r", "session": "S5"},
            {"t": "presence", "room": "j", "event": "join", "client": "c9", "user": "bob", "user_first": True},
        )
        assert page.js("return client.rooms") == {"j": {"offset": 42, "epoch": "J"}}
        assert page.js("return client.session") == "S5"
        assert page.of("join") == [{"room": "j", "offset": None, "epoch": None}] and page.of("leave") == [{"room": "r"}]
        assert page.of("presence") == [
            {"room": "j", "event": "join", "client": "c9", "user": "bob", "userFirst": True, "userLast": False}
        ]
        # A new epoch (the room's history was lost) is adopted, whatever its offsets.
        page.js("fakeRecv(2, ...arguments)", msg(1, room="j", epoch="J2"), msg(2, room="j", epoch="J2"))
        assert page.js("return client.rooms") == {"j": {"offset": 2, "epoch": "J2"}}
        assert page.js("return sockets.length") == 3 and page.js("return client.state") == "connected"


def test_fake_broker_backoff_wake_up_timeouts_and_refusals(browser: Any, pages: Pages):
    with running_broker() as br:
        page = fake_client(browser, pages, br.ws_port, minDelay=50, baseDelay=100, maxDelay=500, connectTimeout=300)
        # delay = minDelay + random() * min(maxDelay, baseDelay * 2 ** attempt), random() = 1 here.
        page.js("Math.random = () => 1")
        for i in range(5):
            page.until(lambda i=i: page.js("return sockets.length") == i + 1, f"attempt {i + 1}")
            page.js("fakeClose(arguments[0], 1006)", i)
        assert [d["delay"] for d in page.of("disconnected")] == [150, 250, 450, 550, 550]
        assert [d["attempt"] for d in page.of("disconnected")] == [1, 2, 3, 4, 5]
        # A welcome resets the attempts.
        page.until(lambda: page.js("return sockets.length") == 6, "attempt 6")
        page.js("fakeOpen(5); fakeRecv(5, arguments[0]); fakeClose(5, 1001, 'bye')", welcome({}))
        assert page.of("disconnected")[-1] == {
            "code": 1001,
            "reason": "bye",
            "wasClean": True,
            "local": False,
            "willReconnect": True,
            "delay": 150,
            "attempt": 1,
        }
        # No welcome within connectTimeout: dropped and retried.
        page.until(lambda: page.js("return sockets.length") == 7, "attempt 7")
        page.until(lambda: len(page.of("disconnected")) == 7, "the connect timeout", timeout=3)
        assert "no welcome within 300 ms" in page.of("disconnected")[-1]["reason"]
        # The server did not accept the subprotocol: an error, the socket dropped, retried.
        page.until(lambda: page.js("return sockets.length") == 8, "attempt 8")
        page.js("fakeOpen(7, '')")
        assert page.of("error")[-1]["type"] == "subprotocol" and page.js("return sockets[7].closed") is not None
        assert page.of("disconnected")[-1]["willReconnect"] is True
        # Waiting for a long delay: "online" and "visibilitychange" (visible) reconnect at once.
        page.until(lambda: page.js("return sockets.length") == 9, "attempt 9")
        page.js("Math.random = () => 0; client._o.minDelay = 60000; fakeClose(8, 1006)")
        assert page.of("disconnected")[-1]["delay"] == 60000 and page.js("return client.state") == "disconnected"
        page.js("window.dispatchEvent(new Event('online'))")
        assert page.js("return [sockets.length, client.state]") == [10, "connecting"]
        page.js("fakeClose(9, 1006)")
        assert page.js("return document.visibilityState") == "visible"
        page.js("document.dispatchEvent(new Event('visibilitychange'))")
        page.until(lambda: page.js("return sockets.length") == 11, "the reconnect on visibilitychange")
        # 4400 stops and forgets the session and positions (what the broker refused).
        page.js(
            "fakeOpen(10); fakeRecv(10, arguments[0], arguments[1])",
            welcome({"r": {"offset": 3, "epoch": "E"}}, session="S"),
            msg(4),
        )
        page.js("fakeClose(10, 4400, 'bad frame')")
        assert page.js("return [client.state, client.session, client.rooms]") == ["closed", None, {}]
        assert "closed" in page.js("try { client.send('x') } catch (e) { return String(e) }")
        page.js("client.connect()")
        page.until(lambda: page.js("return sockets.length") == 12, "connect() after the stop")
        page.js("fakeOpen(11)")
        assert page.js("return sockets[11].sent") == [{"t": "connect"}]
        # Recovery refused for a room the connection is no longer in: reported, not listed.
        page.js(
            "fakeRecv(11, arguments[0])",
            welcome(
                {"r": {"offset": 7, "epoch": "E", "recovered": False}, "gone": {"recovered": False}}, recovered=False
            ),
        )
        *per_room, overall = page.of("recovery")
        assert sorted(per_room, key=lambda ev: ev["room"]) == [
            {"room": "gone", "recovered": False, "offset": None, "epoch": None},
            {"room": "r", "recovered": False, "offset": 7, "epoch": "E"},
        ]
        assert overall["room"] is None and overall["recovered"] is False and sorted(overall["failed"]) == ["gone", "r"]
        assert page.js("return client.rooms") == {"r": {"offset": 7, "epoch": "E"}}
        page.js("fakeRecv(11, arguments[0])", msg(8))
        assert page.numbers("r") == [4, 8]
        # A listener that throws disturbs neither the client nor the other listeners.
        page.js(
            "client.on('message', () => { throw new Error('app bug') }); window.addEventListener('error', (e) => e.preventDefault())"
        )
        page.js("fakeRecv(11, arguments[0])", msg(9))
        assert page.numbers("r") == [4, 8, 9]
        # close() stops for good: no socket, no timer.
        page.js("client.close()")
        assert page.js("return [client.state, sockets[11].closed]") == ["closed", [1000, ""]]


def test_terminal_and_retryable_close_codes_from_a_backend(browser: Any, pages: Pages):
    """A backend's disconnect with 4500-4999 reconnects (and recovers); 4000-4499 stops."""
    with running_broker(history_size=100) as br, backend_on(br.tcp_port, br) as backend:
        page = open_page(browser, pages, module_url(br.ws_port), f"ws://127.0.0.1:{br.ws_port}/?cid=c1", **FAST)
        page.until(lambda: page.of("connected"), "the welcome")
        backend.send_room_message("feed", "1")
        page.until(lambda: page.messages(), "a message")
        backend.disconnect_client("c1", 4500, "try again")
        page.until(lambda: len(page.of("connected")) == 2, "the reconnect after 4500")
        assert page.of("disconnected")[0]["code"] == 4500 and page.of("disconnected")[0]["willReconnect"] is True
        assert page.of("connected")[1]["recovered"] is True
        backend.send_room_message("feed", "2")
        page.until(lambda: len(page.messages()) == 2, "the next message")
        backend.disconnect_client("c1", 4000, "banned")
        page.until(lambda: page.js("return window.client.state") == "closed", "the stop after 4000")
        last = page.of("disconnected")[-1]
        assert (last["code"], last["reason"], last["willReconnect"], last["delay"]) == (4000, "banned", False, None)
        assert len(backend.requests) == 2, "no reconnect after a terminal code"


def test_an_expired_signed_token_closes_with_4401_and_the_page_reconnects_with_a_fresh_one(browser: Any, pages: Pages):
    """Issue 18: the broker accepts the page on its JWT alone (no backend is asked), closes it
    with 4401 when the token expires, and the page asks its token provider again at once."""
    import jwt

    secret = "browser-test-secret-of-32-bytes-or-more"
    issued: list[float] = []

    def make_token() -> str:
        issued.append(time.time())
        return jwt.encode({"sub": "ann", "room": "feed", "exp": time.time() + 3.5}, secret, algorithm="HS256")

    pages.make_token = make_token
    with running_broker(history_size=100, jwt_secret=secret, jwt_leeway=0) as br, backend_on(br.tcp_port, br) as backend:
        page = open_page(browser, pages, module_url(br.ws_port), f"ws://127.0.0.1:{br.ws_port}/", token="jwt", **FAST)
        page.until(lambda: page.of("connected"), "the welcome")
        backend.send_room_message("feed", "1")
        page.until(lambda: page.numbers() == [1], "a message")
        page.until(lambda: len(page.of("connected")) == 2, "the reconnect after the token expired", timeout=DEADLINE + 4)
        first = page.of("disconnected")[0]
        assert (first["code"], first["reason"], first["willReconnect"], first["delay"]) == (4401, "token expired", True, 0)
        assert page.of("connected")[1]["recovered"] is True
        backend.send_room_message("feed", "2")
        page.until(lambda: page.numbers() == [1, 2], "the next message, once")
        assert len(issued) >= 2 and not backend.requests, "tokens: the backend was never asked"
        s = br.stats()
        assert s["tokens_expired"] >= 1 and s["token_connections"] >= 2


def test_a_dead_link_is_detected_from_the_missing_pings_and_recovered(browser: Any, pages: Pages):
    """The proxy freezes the connection (nothing flows, nothing closes): with ping_interval=1 the
    page gives up after 2 * 1 + 5 = 7 s of silence and reconnects, recovering what it missed."""
    with (
        running_broker(history_size=10_000, ping_interval=1.0) as br,
        backend_on(br.tcp_port, br) as backend,
        proxy_to(br.ws_port) as proxy,
    ):
        page = open_page(browser, pages, module_url(br.ws_port), f"ws://127.0.0.1:{proxy.port}/", **FAST)
        assert page.until(lambda: page.of("connected"), "the welcome")[0]["ping"] == 1
        publisher = Publisher(backend, interval=0.01)
        try:
            page.until(lambda: len(page.messages()) >= 10, "live messages")
            frozen_at = time.monotonic()
            proxy.freeze()
            disconnected = page.until(lambda: page.of("disconnected"), "the dead link noticed", timeout=20)[0]
            took = time.monotonic() - frozen_at
            assert disconnected["local"] is True and "dead link" in disconnected["reason"], disconnected
            assert 6 < took < 12, f"noticed after {took:.1f} s (expected about 7 s)"
            page.until(lambda: len(page.of("connected")) == 2, "the reconnect")
            assert page.of("connected")[1]["recovered"] is True
        finally:
            sent = publisher.stop()
        all_numbers_once_in_order(page, sent, "a dead link")


def test_the_example_chat_page(browser: Any):
    """examples/browser_chat: two people chat; presence shows them; the page uses the client
    the broker serves."""
    from selenium.webdriver.common.by import By

    ws_port, tcp_port, http_port = free_port(), free_port(), free_port()
    cmd = [
        sys.executable,
        str(EXAMPLES / "browser_chat" / "app.py"),
        "--ws-port",
        str(ws_port),
        "--tcp-port",
        str(tcp_port),
        "--http-port",
        str(http_port),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait(lambda: port_open(http_port) and port_open(ws_port), "the example to listen", timeout=20)
        browser.get(f"http://127.0.0.1:{http_port}/?name=ann")
        page = Page(browser)

        def text(element_id: str) -> str:
            return str(browser.find_element(By.ID, element_id).text)

        page.until(lambda: text("state") == "live", "the page to connect")
        page.until(lambda: "ann" in text("who"), "ann in the presence list")
        bob = Page(browser)
        browser.switch_to.new_window("tab")
        browser.get(f"http://127.0.0.1:{http_port}/?name=bob")
        bob.until(lambda: text("state") == "live", "bob's page to connect")
        browser.find_element(By.ID, "text").send_keys("hello from bob\n")
        bob.until(lambda: "#1bob: hello from bob" in text("log").replace("\n", ""), "bob's message in his log")
        browser.switch_to.window(browser.window_handles[0])
        page.until(lambda: "bob" in text("who"), "bob in ann's presence list")
        page.until(lambda: "bob: hello from bob" in text("log"), "bob's message at ann's")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------- cluster


class BrokerProcess:
    """A cluster node in a subprocess (`python -m pystrands server`) that can be SIGKILLed and
    started again on the same ports."""

    def __init__(self, redis_url: str, node_id: str) -> None:
        self.ws_port, self.tcp_port = free_port(), free_port()
        self.redis_url, self.node_id = redis_url, node_id
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pystrands",
                "server",
                "--host",
                "127.0.0.1",
                "--ws-port",
                str(self.ws_port),
                "--tcp-port",
                str(self.tcp_port),
                "--redis-url",
                self.redis_url,
                "--cluster-node-id",
                self.node_id,
                "--history-size",
                "1000",
                "--log-level",
                "warn",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait(lambda: port_open(self.ws_port) and port_open(self.tcp_port), f"node {self.node_id} to listen", timeout=20)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(DEADLINE)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_a_killed_and_restarted_cluster_node_recovers_from_the_redis_streams(
    browser: Any, pages: Pages, redis: RedisServer
):
    node = BrokerProcess(redis.url, "node-doomed")
    node.start()
    try:
        with ExitStack() as stack:
            other = stack.enter_context(
                running_broker(cluster_url=redis.url, cluster_node_id="node-b", history_size=1000)
            )
            # Accepts the page's connections on the doomed node (and reconnects to it after the restart).
            stack.enter_context(backend_on(node.tcp_port, reconnect_delay=0.05, max_reconnect_delay=0.2))
            publishing = stack.enter_context(backend_on(other.tcp_port, other))
            page = open_page(
                browser, pages, module_url(other.ws_port), f"ws://127.0.0.1:{node.ws_port}/?cid=reader", **FAST
            )
            page.until(lambda: page.of("connected"), "the welcome")
            publisher = Publisher(publishing, interval=0.005)
            try:
                page.until(lambda: len(page.messages()) >= 20, "live messages through Redis")
                node.kill()
                page.until(lambda: page.of("disconnected"), "the disconnect")
                page.until(lambda: len(page.of("disconnected")) >= 3, "two failed attempts while the node is down")
                node.start()
                page.until(lambda: len(page.of("connected")) == 2, "the reconnect to the restarted node", timeout=30)
                assert page.of("connected")[1]["recovered"] is True, page.of("connected")[1]
                at_restart = publisher.sent
                page.until(lambda: len(page.messages()) > at_restart, "live messages after the restart")
            finally:
                sent = publisher.stop()
            all_numbers_once_in_order(page, sent, "a node restart")
            assert page.of("recovery") == [
                {"room": None, "recovered": True, "offset": None, "epoch": None, "failed": []}
            ]
    finally:
        node.stop()


def test_a_reconnect_to_another_node_of_three_recovers_every_time(browser: Any, pages: Pages, redis: RedisServer):
    with ExitStack() as stack:
        nodes = [
            stack.enter_context(running_broker(cluster_url=redis.url, cluster_node_id=f"node-{n}", history_size=1000))
            for n in "abc"
        ]
        backends = [stack.enter_context(backend_on(n.tcp_port, n)) for n in nodes]
        proxy = stack.enter_context(proxy_to(nodes[0].ws_port))
        page = open_page(
            browser, pages, module_url(nodes[1].ws_port), f"ws://127.0.0.1:{proxy.port}/?cid=reader", **FAST
        )
        page.until(lambda: page.of("connected"), "the welcome")
        publisher = Publisher(backends[1], interval=0.005)
        try:
            page.until(lambda: len(page.messages()) >= 20, "live messages")
            for round_, node in enumerate([nodes[2], nodes[1], nodes[0]], start=1):
                proxy.upstream = node.ws_port
                cut_and_restore(page, proxy, publisher, round_)
                wait(lambda: node.stats()["clients"] == 1, f"the page on node {round_}")
        finally:
            sent = publisher.stop()
        all_numbers_once_in_order(page, sent, "three moves between nodes")
        assert sum(n.stats()["messages_replayed"] for n in nodes) > 0, "messages were missed and replayed"
        assert (
            page.of("recovery") == [{"room": None, "recovered": True, "offset": None, "epoch": None, "failed": []}] * 3
        )
