"""TLS on the backend link (``ssl=`` of the three client flavours, the broker's ``backend_tls_*``
settings, mutual TLS) and on the WebSocket port (``tls_cert``/``tls_key``: wss://, HTTP 400 for
plain requests, HTTPS for /health).

Two kinds of tests:

* against the local fake broker speaking TLS (tests/fake_broker.py with ``tls=``): the clients'
  side alone — the TLS socket of the threading client (full duplex from several threads, writes
  after ``shutdown(SHUT_RD)``, close_notify), handshake failures logged and retried with backoff,
  argument checks;
* against the real broker: end to end with real WebSocket clients (``websockets``).

Every certificate comes from the session's ``tls_files`` fixture (tests/tls_util.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import re
import ssl
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from fake_broker import FakeBroker
from pystrands import AsyncPyStrandsClient, PyStrands, PyStrandsClient
from pystrands.testing import running_broker
from tls_util import TLSFiles, client_context, server_context
from v1peer import DEADLINE, wait_for

NEEDS_UVLOOP = pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed")
LOOPS = ["asyncio", pytest.param("uvloop", marks=NEEDS_UVLOOP)]
FLAVOURS = ["sync", "async", "app"]
FAST = {"reconnect_delay": 0.05, "max_reconnect_delay": 1.0, "reconnect_backoff": 2.0}
RECONNECT = re.compile(r"Reconnecting to \S+ in ([0-9.]+)s")


def run(coro: Any, loop: str = "asyncio") -> Any:
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(coro, 90))


# ---------------------------------------------------------------------------- logs


class LogWatch(logging.Handler):
    """Keeps the messages of the clients' ``pystrands`` loggers (INFO and up) while a test runs
    (not the broker's, which its log bridge sends to ``pystrands.broker.*``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._lock = threading.Lock()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("pystrands.broker"):
            return
        with self._lock:
            self.messages.append(record.getMessage())

    def matching(self, text: str) -> list[str]:
        with self._lock:
            return [m for m in self.messages if text in m]

    def delays(self) -> list[float]:
        """The reconnect delays logged so far, in order."""
        with self._lock:
            return [float(m.group(1)) for m in map(RECONNECT.search, self.messages) if m]


@pytest.fixture
def logs() -> Iterator[LogWatch]:
    watch = LogWatch()
    logger = logging.getLogger("pystrands")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(watch)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)


def assert_backing_off(delays: list[float]) -> None:
    """Reconnect delays that grow (``FAST``: 0.05, 0.1, 0.2, ... with 15% jitter): the link
    failing is not taken for a good connection that later broke (which restarts at 0.05)."""
    assert len(delays) >= 3, delays
    assert delays[2] > 2 * delays[0], f"reconnect delays do not grow: {delays}"


# ---------------------------------------------------------------------------- backends


class SyncEcho(PyStrandsClient):
    def on_connection_request(self, request: Any) -> bool:
        request.context.room_id = "tls"
        return True

    def on_message(self, message: str, context: Any) -> None:
        self.send_private_message(context.client_id, f"echo: {message}")


class AsyncEcho(AsyncPyStrandsClient):
    async def on_connection_request(self, request: Any) -> bool:
        request.context.room_id = "tls"
        return True

    async def on_message(self, message: str, context: Any) -> None:
        await self.send_private_message(context.client_id, f"echo: {message}")


def echo_app(*args: Any, **kwargs: Any) -> PyStrands:
    app = PyStrands(*args, **kwargs)

    @app.on_connection_request
    def accept(request: Any) -> bool:
        request.context.room_id = "tls"
        return True

    @app.on_message
    async def echo(message: str, context: Any) -> None:
        await app.send_private_message(context.client_id, f"echo: {message}")

    return app


@contextlib.asynccontextmanager
async def backend(flavour: str, port: int, host: str = "127.0.0.1", **kwargs: Any) -> AsyncIterator[Any]:
    """Run an echo backend of ``flavour`` (reconnecting as configured) until the block ends."""
    kwargs = {**FAST, **kwargs}
    if flavour == "sync":
        client = SyncEcho(host, port, **kwargs)
        thread = threading.Thread(target=client.run_forever, daemon=True)
        thread.start()
        try:
            yield client
        finally:
            await asyncio.to_thread(client.disconnect)
            await asyncio.to_thread(thread.join, DEADLINE)
            assert not thread.is_alive(), "run_forever() did not return after disconnect()"
        return
    runner: Any
    if flavour == "async":
        runner = AsyncEcho(host, port, **kwargs)
        task = asyncio.create_task(runner.run_forever())
    else:
        runner = echo_app(host, port, **kwargs)
        task = asyncio.create_task(runner.run_async())
    await asyncio.sleep(0)  # the app makes its client at its first step
    try:
        yield runner
    finally:
        await runner.disconnect()
        await asyncio.wait_for(task, DEADLINE)


async def echo_round_trip(url: str, **connect: Any) -> None:
    async with websockets.connect(url, open_timeout=DEADLINE, **connect) as ws:
        await ws.send("hi")
        assert await asyncio.wait_for(ws.recv(), DEADLINE) == "echo: hi"


async def ws_status(url: str, **connect: Any) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(url, open_timeout=DEADLINE, **connect):
            pass
    return int(info.value.response.status_code)


def backend_tls(files: TLSFiles, mutual: bool = False) -> dict[str, str]:
    settings = {"backend_tls_cert": files.server_cert, "backend_tls_key": files.server_key}
    if mutual:
        settings["backend_tls_client_ca"] = files.ca
    return settings


# ---------------------------------------------------------------------------- arguments (d)


@pytest.fixture(params=FLAVOURS)
def make(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """A constructor of each flavour: ``make(host, port, **keywords)``."""
    return {"sync": PyStrandsClient, "async": AsyncPyStrandsClient, "app": PyStrands}[request.param]


@pytest.mark.parametrize("value", ["yes", 1, 0, b"ctx", object(), ssl.PROTOCOL_TLS_CLIENT])
def test_ssl_of_the_wrong_type_raises_type_error(make: Callable[..., Any], value: Any) -> None:
    with pytest.raises(TypeError, match=r"^ssl must be an ssl\.SSLContext, True, False or None"):
        make("localhost", 8081, ssl=value)


def test_server_hostname_is_checked(make: Callable[..., Any]) -> None:
    ctx = ssl.create_default_context()
    with pytest.raises(TypeError, match="^server_hostname must be a str"):
        make("localhost", 8081, ssl=ctx, server_hostname=b"localhost")
    with pytest.raises(ValueError, match="server_hostname is only meaningful with ssl"):
        make("localhost", 8081, server_hostname="localhost")
    with pytest.raises(ValueError, match="client context"):
        make("localhost", 8081, ssl=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))


def test_ssl_values(make: Callable[..., Any]) -> None:
    assert make("h", 1).ssl is None
    assert make("h", 1, ssl=None).ssl is None
    assert make("h", 1, ssl=False).ssl is None
    default = make("h", 1, ssl=True).ssl
    assert isinstance(default, ssl.SSLContext)
    assert default.verify_mode == ssl.CERT_REQUIRED and default.check_hostname
    ctx = ssl.create_default_context()
    made = make("h", 1, ssl=ctx, server_hostname="broker.internal")
    assert made.ssl is ctx and made.server_hostname == "broker.internal"
    assert make("h", 1, ssl=ctx).server_hostname is None  # the host is checked


def test_the_app_hands_ssl_to_its_client() -> None:
    ctx = ssl.create_default_context()
    client = PyStrands("h", 1, ssl=ctx, server_hostname="broker.internal")._create_client()
    assert client.ssl is ctx and client.server_hostname == "broker.internal"
    assert PyStrands("h", 1)._create_client().ssl is None


# ---------------------------------------------------------------------------- fake TLS broker


@pytest.fixture
def tls_broker(tls_files: TLSFiles) -> Iterator[FakeBroker]:
    b = FakeBroker(version=2, tls=server_context(tls_files.server_cert, tls_files.server_key))
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def mtls_broker(tls_files: TLSFiles) -> Iterator[FakeBroker]:
    b = FakeBroker(version=2, tls=server_context(tls_files.server_cert, tls_files.server_key, tls_files.ca))
    try:
        yield b
    finally:
        b.close()


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_sync_client_over_tls_and_close_notify(tls_broker: FakeBroker, tls_files: TLSFiles, host: str) -> None:
    client = SyncEcho(host, tls_broker.port, ssl=client_context(tls_files.ca), **FAST)
    assert client.connect()
    try:
        peer = tls_broker.wait_v2(1)
        assert client._conn is not None and client._conn.sock.version == "TLSv1.3"  # type: ignore[union-attr]
        tls_broker.message("c1", "hi")
        assert tls_broker.recv()["params"] == {"conn_id": "c1", "message": "echo: hi"}
    finally:
        client.disconnect()
    peer.closed.wait(DEADLINE)
    assert peer.sock.closed_cleanly  # type: ignore[union-attr] - the client sent close_notify


def test_sync_writes_after_shut_rd_stay_encrypted(tls_broker: FakeBroker, tls_files: TLSFiles) -> None:
    """disconnect() shuts the read side first, then flushes what handlers still send: with an
    ssl.SSLSocket that would go out in clear text (its shutdown() drops the TLS layer)."""
    release = threading.Event()
    started = threading.Event()

    class Slow(PyStrandsClient):
        def on_message(self, message: str, context: Any) -> None:
            started.set()
            assert release.wait(DEADLINE)
            self.send_private_message(context.client_id, f"late {message}")

    client = Slow("localhost", tls_broker.port, ssl=client_context(tls_files.ca), **FAST)
    assert client.connect()
    peer = tls_broker.wait_v2(1)
    reader = client._manager
    assert reader is not None
    tls_broker.message("c1", "a")
    assert started.wait(DEADLINE)
    stopping = threading.Thread(target=client.disconnect, args=(DEADLINE,))
    stopping.start()
    try:
        reader.join(DEADLINE)  # the read side is shut: the reader thread ended
        assert not reader.is_alive()
    finally:
        release.set()
        stopping.join(DEADLINE)
    assert not stopping.is_alive()
    assert tls_broker.recv()["params"] == {"conn_id": "c1", "message": "late a"}
    peer.closed.wait(DEADLINE)
    assert peer.sock.closed_cleanly  # type: ignore[union-attr]


def test_sync_full_duplex_from_many_threads(tls_broker: FakeBroker, tls_files: TLSFiles) -> None:
    """The reader decrypts while worker threads encrypt and the housekeeper writes acks: OpenSSL
    does not allow that on one SSL object at once, so the TLS socket must serialize it."""
    n = 2000
    client = SyncEcho("localhost", tls_broker.port, ssl=client_context(tls_files.ca), workers=8, **FAST)
    assert client.connect()
    try:
        peer = tls_broker.wait_v2(1)
        sender = threading.Thread(target=lambda: [tls_broker.message(f"c{i % 50}", str(i)) for i in range(n)])
        sender.start()
        got = {f["params"]["message"] for f in tls_broker.recv_n(n, timeout=60)}
        sender.join(DEADLINE)
        assert got == {f"echo: {i}" for i in range(n)}
        peer.wait_ack(n, timeout=DEADLINE)
        assert not peer.closed.is_set()
    finally:
        client.disconnect()


@pytest.mark.parametrize("loop", LOOPS)
def test_async_client_over_tls(tls_broker: FakeBroker, tls_files: TLSFiles, loop: str) -> None:
    async def main() -> None:
        client = AsyncEcho("localhost", tls_broker.port, ssl=client_context(tls_files.ca), **FAST)
        assert await client.connect()
        try:
            peer = await asyncio.to_thread(tls_broker.wait_v2, 1)
            tls_broker.message("c1", "hi")
            frame = await asyncio.to_thread(tls_broker.recv)
            assert frame["params"] == {"conn_id": "c1", "message": "echo: hi"}
        finally:
            await client.disconnect()
        await asyncio.to_thread(peer.closed.wait, DEADLINE)
        assert peer.sock.closed_cleanly  # type: ignore[union-attr]

    run(main(), loop)


def test_app_over_tls(tls_broker: FakeBroker, tls_files: TLSFiles) -> None:
    async def main() -> None:
        async with backend("app", tls_broker.port, "localhost", ssl=client_context(tls_files.ca)):
            await asyncio.to_thread(tls_broker.wait_v2, 1)
            tls_broker.message("c1", "hi")
            frame = await asyncio.to_thread(tls_broker.recv)
            assert frame["params"] == {"conn_id": "c1", "message": "echo: hi"}

    run(main())


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("trust", "server_hostname", "why"),
    [("rogue", None, "CERTIFICATE_VERIFY_FAILED"), ("ca", "wrong.example", "Hostname mismatch")],
)
def test_a_failed_handshake_is_a_failed_connect_retried_with_backoff(
    tls_broker: FakeBroker,
    tls_files: TLSFiles,
    logs: LogWatch,
    flavour: str,
    trust: str,
    server_hostname: str | None,
    why: str,
) -> None:
    ctx = client_context(tls_files.rogue_ca if trust == "rogue" else tls_files.ca)

    async def main() -> None:
        async with backend(flavour, tls_broker.port, ssl=ctx, server_hostname=server_hostname) as b:
            await wait_for(lambda: len(logs.delays()) >= 3, what="three reconnect attempts")
            assert not b.connected
        failures = logs.matching("TLS handshake failed")
        assert failures and why in failures[0], logs.messages
        assert not logs.matching("Connected to the broker")
        assert_backing_off(logs.delays())
        assert tls_broker.connection_count == 0

    run(main())


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("cert", ["rogue", "none"])
def test_a_refused_client_certificate_is_retried_with_backoff(
    mtls_broker: FakeBroker, tls_files: TLSFiles, logs: LogWatch, flavour: str, cert: str
) -> None:
    """TLS 1.3: the client's handshake is over before the server checked its certificate, so
    the refusal arrives as an alert on the first read; the client keeps backing off."""
    if cert == "rogue":
        ctx = client_context(tls_files.ca, tls_files.rogue_client_cert, tls_files.rogue_client_key)
    else:
        ctx = client_context(tls_files.ca)

    async def main() -> None:
        async with backend(flavour, mtls_broker.port, "localhost", ssl=ctx) as b:
            await wait_for(lambda: len(logs.delays()) >= 3, what="three reconnect attempts")
            await asyncio.to_thread(mtls_broker.wait_tls_failures, 2)
        assert not b.connected
        assert mtls_broker.connection_count == 0  # no hello ever reached the broker
        assert_backing_off(logs.delays())
        assert logs.matching("TLS connection to the broker") or logs.matching("Connection to the broker lost")

    run(main())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_mutual_tls_with_the_right_certificate(mtls_broker: FakeBroker, tls_files: TLSFiles, flavour: str) -> None:
    ctx = client_context(tls_files.ca, tls_files.client_cert, tls_files.client_key)

    async def main() -> None:
        async with backend(flavour, mtls_broker.port, "localhost", ssl=ctx):
            await asyncio.to_thread(mtls_broker.wait_v2, 1)
            mtls_broker.message("c1", "hi")
            frame = await asyncio.to_thread(mtls_broker.recv)
            assert frame["params"] == {"conn_id": "c1", "message": "echo: hi"}
        assert mtls_broker.tls_failures == []

    run(main())


def test_a_plain_client_does_not_get_into_a_tls_port(tls_broker: FakeBroker) -> None:
    client = SyncEcho("localhost", tls_broker.port, **FAST)
    thread = threading.Thread(target=client.run_forever, daemon=True)
    thread.start()
    try:
        tls_broker.wait_tls_failures(2)
        assert tls_broker.connection_count == 0
        assert client.broker_features == frozenset()
    finally:
        client.disconnect()
        thread.join(DEADLINE)
    assert not thread.is_alive()


# ---------------------------------------------------------------------------- the real broker


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_backends_over_tls_end_to_end(tls_files: TLSFiles, flavour: str) -> None:
    """(a) each flavour with ``ssl=`` a context trusting the CA, a real WebSocket client."""

    async def main() -> None:
        with running_broker(**backend_tls(tls_files)) as broker:
            async with backend(flavour, broker.tcp_port, ssl=client_context(tls_files.ca)):
                await wait_for(lambda: broker.stats()["backends"] == 1, what="the backend connected")
                await echo_round_trip(f"ws://127.0.0.1:{broker.ws_port}/")
            stats = broker.stats()
            assert stats["tls_handshakes_failed"] == 0 and stats["backends_refused"] == 0

    run(main())


def test_server_hostname_with_the_real_broker(tls_files: TLSFiles, logs: LogWatch) -> None:
    """Connecting to an address the certificate does not name works with ``server_hostname``."""

    async def main() -> None:
        with running_broker(**backend_tls(tls_files)) as broker:
            async with backend(
                "sync", broker.tcp_port, "127.0.0.1", ssl=client_context(tls_files.ca), server_hostname="localhost"
            ):
                await wait_for(lambda: broker.stats()["backends"] == 1, what="the backend connected")
                await echo_round_trip(f"ws://127.0.0.1:{broker.ws_port}/")
            async with backend(
                "async", broker.tcp_port, ssl=client_context(tls_files.ca), server_hostname="broker.example"
            ):
                await wait_for(lambda: len(logs.matching("TLS handshake failed")) >= 2, what="refused handshakes")
                assert broker.stats()["backends"] == 0
            assert "Hostname mismatch" in logs.matching("TLS handshake failed")[0]

    run(main())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_mutual_tls_end_to_end(tls_files: TLSFiles, flavour: str) -> None:
    """(b) with ``backend_tls_client_ca`` a backend presenting the CA's client certificate works."""
    ctx = client_context(tls_files.ca, tls_files.client_cert, tls_files.client_key)

    async def main() -> None:
        with running_broker(**backend_tls(tls_files, mutual=True)) as broker:
            async with backend(flavour, broker.tcp_port, ssl=ctx):
                await wait_for(lambda: broker.stats()["backends"] == 1, what="the backend connected")
                await echo_round_trip(f"ws://127.0.0.1:{broker.ws_port}/")
            assert broker.stats()["tls_handshakes_failed"] == 0

    run(main())


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("cert", ["rogue", "none"])
def test_mutual_tls_refuses_other_certificates(tls_files: TLSFiles, logs: LogWatch, flavour: str, cert: str) -> None:
    """(b) a client certificate of another CA, or none, does not get in; the client keeps
    retrying with backoff and the broker counts the refusals."""
    if cert == "rogue":
        ctx = client_context(tls_files.ca, tls_files.rogue_client_cert, tls_files.rogue_client_key)
    else:
        ctx = client_context(tls_files.ca)

    async def main() -> None:
        with running_broker(**backend_tls(tls_files, mutual=True)) as broker:
            async with backend(flavour, broker.tcp_port, ssl=ctx):
                await wait_for(lambda: broker.stats()["tls_handshakes_failed"] >= 2, what="two refused handshakes")
                await wait_for(lambda: len(logs.delays()) >= 3, what="three reconnect attempts")
                assert await ws_status(f"ws://127.0.0.1:{broker.ws_port}/") == 503  # no backend
                stats = broker.stats()
                assert stats["backends"] == 0
                assert stats["backends_refused"] >= 2
            assert_backing_off(logs.delays())

    run(main())


@NEEDS_UVLOOP
@pytest.mark.parametrize("flavour", ["async", "app"])
def test_mutual_tls_on_uvloop(tls_files: TLSFiles, logs: LogWatch, flavour: str) -> None:
    """uvloop's TLS transport: the right certificate gets in, another CA's is refused."""
    good = client_context(tls_files.ca, tls_files.client_cert, tls_files.client_key)
    rogue = client_context(tls_files.ca, tls_files.rogue_client_cert, tls_files.rogue_client_key)

    async def main() -> None:
        with running_broker(**backend_tls(tls_files, mutual=True)) as broker:
            async with backend(flavour, broker.tcp_port, ssl=rogue):
                await wait_for(lambda: len(logs.delays()) >= 3, what="three reconnect attempts")
                assert broker.stats()["backends"] == 0
            assert_backing_off(logs.delays())
            assert logs.matching("TLS connection to the broker")
            async with backend(flavour, broker.tcp_port, ssl=good):
                await wait_for(lambda: broker.stats()["backends"] == 1, what="the backend connected")
                await echo_round_trip(f"ws://127.0.0.1:{broker.ws_port}/")

    run(main(), "uvloop")


def test_a_plain_backend_does_not_get_into_a_tls_port(tls_files: TLSFiles) -> None:
    """(c) ``ssl=None`` against the broker's TLS backend port."""

    async def main() -> None:
        with running_broker(**backend_tls(tls_files)) as broker:
            async with backend("async", broker.tcp_port) as client:
                await wait_for(lambda: broker.stats()["tls_handshakes_failed"] >= 1, what="a refused handshake")
                assert await ws_status(f"ws://127.0.0.1:{broker.ws_port}/") == 503
                assert broker.stats()["backends"] == 0
                assert client.broker_features == frozenset()

    run(main())


def _https_get(url: str, ctx: ssl.SSLContext) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, context=ctx, timeout=DEADLINE) as response:
        return response.status, response.read()


def test_wss_and_https_on_the_websocket_port(tls_files: TLSFiles) -> None:
    """(e) with ``tls_cert``/``tls_key``: wss:// works, plain ws:// gets 400, /health over HTTPS;
    a client not trusting the CA fails its handshake."""
    ctx = client_context(tls_files.ca)

    async def main() -> None:
        with running_broker(tls_cert=tls_files.server_cert, tls_key=tls_files.server_key) as broker:
            async with backend("async", broker.tcp_port):
                await wait_for(lambda: broker.stats()["backends"] == 1, what="the backend connected")
                await echo_round_trip(f"wss://127.0.0.1:{broker.ws_port}/", ssl=ctx)
                await echo_round_trip(f"wss://localhost:{broker.ws_port}/", ssl=ctx)
                assert await ws_status(f"ws://127.0.0.1:{broker.ws_port}/") == 400
                status, body = await asyncio.to_thread(_https_get, f"https://127.0.0.1:{broker.ws_port}/health", ctx)
                assert (status, body) == (200, b"ok\n")
                with pytest.raises(ssl.SSLCertVerificationError):
                    await echo_round_trip(f"wss://127.0.0.1:{broker.ws_port}/", ssl=client_context(tls_files.rogue_ca))
                await echo_round_trip(f"wss://127.0.0.1:{broker.ws_port}/", ssl=ctx)  # still serving

    run(main())


def test_everything_over_tls(tls_files: TLSFiles) -> None:
    """wss:// for clients and mutual TLS for the backend on one broker."""
    settings = {**backend_tls(tls_files, mutual=True), "tls_cert": tls_files.server_cert, "tls_key": tls_files.server_key}
    backend_ctx = client_context(tls_files.ca, tls_files.client_cert, tls_files.client_key)

    async def main() -> None:
        with running_broker(**settings) as broker:
            async with backend("sync", broker.tcp_port, ssl=backend_ctx):
                await wait_for(lambda: broker.stats()["backends"] == 1, what="the backend connected")
                await echo_round_trip(f"wss://localhost:{broker.ws_port}/", ssl=client_context(tls_files.ca))

    run(main())

