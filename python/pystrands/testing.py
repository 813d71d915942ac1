"""Helpers for testing applications built on PyStrands: your handlers on a real broker.

Why it exists: the honest test of a backend is the real thing: the native broker's handshake
(accept → 101, reject → 403, no answer → 503), its routing and its close codes, driven by real
WebSocket clients. Setting that up by hand means free ports, a broker, a backend connected to
it, WebSocket clients with deadlines on every wait, and a clean stop. :class:`BrokerHarness`
does all of it in one ``with``: it runs your backend *in-process* (``Broker.start(backend=...)``:
the same classes, callbacks and send methods as over TCP, no socket between broker and
handlers) on a broker bound to free ``127.0.0.1`` ports, and hands out WebSocket test clients
whose every wait has a deadline and fails with a message that says what was expected. It plays
the role of an in-memory transport, but through the real broker.

Example test (pytest; no plugin needed)::

    import asyncio

    from pystrands import PyStrandsClient
    from pystrands.testing import BrokerHarness


    class Echo(PyStrandsClient):
        def on_connection_request(self, request):
            request.context.room_id = request.url.strip("/")
            return request.headers.get("X-Token", [None])[0] == "secret"

        def on_message(self, message, context):
            self.send_room_message(context.room_id, f"echo: {message}")


    def test_echo_and_auth():
        async def main():
            async with BrokerHarness(Echo()) as h:
                async with h.client("/room", headers={"X-Token": "secret"}) as ws:
                    await ws.send("hi")
                    assert await ws.receive() == "echo: hi"
                assert await h.connect_status("/room", headers={"X-Token": "wrong"}) == 403

        asyncio.run(main())

The same without asyncio in the test: ``with BrokerHarness(Echo()) as h:`` and
``with h.sync_client("/room", headers=...) as ws:`` (methods of the same names, not
coroutines), ``h.connect_status_sync(...)``.

The test clients use the ``websockets`` package (``pip install websockets``, part of the
``pystrands[test]`` extra), imported only when a client is made. :func:`running_broker` and
:func:`ws_url` start a bare broker for tests that connect their own (TCP) backends.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

from .broker import Broker

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection
    from websockets.sync.client import ClientConnection as SyncClientConnection

    from ._hosted import Backend

__all__ = [
    "BrokerHarness",
    "ClientClosed",
    "HandshakeRefused",
    "ReceiveTimeout",
    "SyncWebSocketClient",
    "WebSocketClient",
    "running_broker",
    "ws_url",
]

Headers = Mapping[str, str] | Iterable[tuple[str, str]]
"""Request headers for a test client: a mapping, or ``(name, value)`` pairs to repeat a name."""


# ---------------------------------------------------------------------------- errors


class ReceiveTimeout(AssertionError, TimeoutError):
    """Nothing (or not the expected thing) arrived within the deadline.

    An :class:`AssertionError`, so pytest reports it as a test failure with its message, and a
    :class:`TimeoutError` for code that catches timeouts.
    """


class ClientClosed(AssertionError):
    """The connection closed while the test waited for a message; ``code``/``reason`` say how."""

    def __init__(self, message: str, code: int | None, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class HandshakeRefused(AssertionError):
    """The broker answered the WebSocket handshake with an HTTP error (``status``, ``body``)."""

    def __init__(self, message: str, status: int, body: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


# ---------------------------------------------------------------------------- websockets


def _websockets() -> ModuleType:
    """The ``websockets`` package, with a clear message when it is missing or too old."""
    try:
        import websockets
        import websockets.asyncio.client
        import websockets.sync.client
    except ImportError as exc:
        raise ImportError(
            "pystrands.testing's WebSocket test clients need the 'websockets' package (13 or newer): "
            "pip install websockets  (or: pip install 'pystrands[test]')"
        ) from exc
    return websockets


def _headers_list(headers: Headers | None) -> list[tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return [(str(k), str(v)) for k, v in headers.items()]
    return [(str(k), str(v)) for k, v in headers]


def _describe_close(code: int | None, reason: str) -> str:
    if code is None:
        return "closed without a close frame"
    return f"closed with code {code}" + (f" ({reason})" if reason else "")


class _ClientState:
    """What both test clients keep: path, history, backlog and the harness' error report."""

    def __init__(self, harness: BrokerHarness, path: str, timeout: float) -> None:
        self.harness = harness
        self.path = path
        self.timeout = timeout
        self.received: list[str] = []
        """Every message this client received, oldest first (also those read by ``wait_closed``)."""
        self._backlog: deque[str] = deque()  # read by wait_closed, not yet returned by receive
        self.ws: Any = None  # the websockets connection (asyncio or sync), set by the subclass

    @property
    def close_code(self) -> int | None:
        """The close code once the connection is closed (the broker's, if it closed it)."""
        code: int | None = self.ws.close_code
        return code

    @property
    def close_reason(self) -> str:
        """The close reason once closed, else ``""``."""
        return self.ws.close_reason or ""

    @property
    def closed(self) -> bool:
        """True once the closing handshake is over."""
        return self.ws.close_code is not None

    def _deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _took(self, data: str | bytes) -> str:
        """A message just received: checked to be text and kept in :attr:`received`."""
        text = self._text(data)
        self.received.append(text)
        return text

    def _text(self, data: str | bytes) -> str:
        if isinstance(data, bytes):
            raise AssertionError(f"{self.path}: expected a text message, got {len(data)} bytes of binary data")
        return data

    def _timeout_error(self, what: str, timeout: float) -> ReceiveTimeout:
        tail = self.received[-5:]
        got = f"; last messages received: {tail!r}" if tail else "; nothing received so far"
        return ReceiveTimeout(f"{self.path}: {what} within {timeout:g}s{got}{self.harness._error_note()}")

    def _closed_error(self, what: str, code: int | None, reason: str) -> ClientClosed:
        msg = f"{self.path}: {_describe_close(code, reason)} while waiting for {what}{self.harness._error_note()}"
        return ClientClosed(msg, code, reason)


# ---------------------------------------------------------------------------- async client


class WebSocketClient(_ClientState):
    """A WebSocket test client for asyncio tests (from :meth:`BrokerHarness.client`).

    Every wait has a deadline (the harness' ``timeout`` unless given) and fails with
    :class:`ReceiveTimeout` or :class:`ClientClosed`, both :class:`AssertionError`\\ s whose
    message names the path, what was awaited and the last messages received.
    """

    def __init__(self, harness: BrokerHarness, path: str, timeout: float, ws: ClientConnection) -> None:
        super().__init__(harness, path, timeout)
        self.ws = ws
        """The underlying ``websockets`` connection, for anything not wrapped here."""

    async def send(self, message: str | bytes) -> None:
        """Send a text frame (``str``) or a binary frame (``bytes``)."""
        await self.ws.send(message)

    async def send_json(self, obj: Any) -> None:
        """Send ``obj`` as a JSON text frame."""
        await self.ws.send(json.dumps(obj))

    async def _recv(self, what: str, timeout: float) -> str:
        if self._backlog:
            return self._backlog.popleft()
        exc_closed = _websockets().exceptions.ConnectionClosed
        try:
            data = await asyncio.wait_for(self.ws.recv(), timeout)
        except asyncio.TimeoutError:
            raise self._timeout_error(f"no {what}", timeout) from None
        except exc_closed:
            raise self._closed_error(what, self.close_code, self.close_reason) from None
        return self._took(data)

    async def receive(self, timeout: float | None = None) -> str:
        """The next text message; :class:`ReceiveTimeout` after ``timeout`` seconds."""
        return await self._recv("message", self._deadline(timeout))

    async def receive_json(self, timeout: float | None = None) -> Any:
        """The next message, parsed as JSON."""
        return json.loads(await self.receive(timeout))

    async def receive_many(self, count: int, timeout: float | None = None) -> list[str]:
        """The next ``count`` messages, all within ``timeout`` seconds in total."""
        limit = self._deadline(timeout)
        end = time.monotonic() + limit
        out: list[str] = []
        while len(out) < count:
            try:
                out.append(await self._recv("message", max(0.0, end - time.monotonic())))
            except ReceiveTimeout:
                raise self._timeout_error(f"only {len(out)} of {count} messages", limit) from None
        return out

    async def assert_no_message(self, within: float = 0.2) -> None:
        """Fail if a message arrives within ``within`` seconds (e.g. one meant for others).

        This waits the whole time on success: keep ``within`` short.
        """
        if self._backlog:
            raise AssertionError(f"{self.path}: unexpected message {self._backlog[0]!r}")
        exc_closed = _websockets().exceptions.ConnectionClosed
        try:
            data = await asyncio.wait_for(self.ws.recv(), within)
        except (asyncio.TimeoutError, exc_closed):
            return
        self._took(data)
        raise AssertionError(f"{self.path}: unexpected message {data!r} within {within:g}s")

    async def ping(self, timeout: float | None = None) -> None:
        """Send a WebSocket ping and wait for the broker's pong."""
        limit = self._deadline(timeout)
        pong = await self.ws.ping()
        try:
            await asyncio.wait_for(pong, limit)
        except asyncio.TimeoutError:
            raise self._timeout_error("no pong", limit) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection (closing handshake) and wait until it is closed."""
        await self.ws.close(code, reason)

    async def wait_closed(self, timeout: float | None = None) -> int | None:
        """Wait until the broker closes the connection; returns its close code.

        Messages arriving meanwhile are kept: :meth:`receive` still returns them afterwards.
        """
        limit = self._deadline(timeout)
        end = time.monotonic() + limit
        exc_closed = _websockets().exceptions.ConnectionClosed
        while True:
            try:
                data = await asyncio.wait_for(self.ws.recv(), max(0.0, end - time.monotonic()))
            except asyncio.TimeoutError:
                raise self._timeout_error("the connection was not closed", limit) from None
            except exc_closed:
                return self.close_code
            self._backlog.append(self._took(data))

    async def __aenter__(self) -> WebSocketClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.ws.close()


class _Connecting:
    """``h.client(...)``: ``await`` it for a client, or ``async with`` it to close it after."""

    def __init__(self, open_client: Callable[[], Awaitable[WebSocketClient]]) -> None:
        self._open = open_client
        self._client: WebSocketClient | None = None

    def __await__(self) -> Generator[Any, None, WebSocketClient]:
        return self._connect().__await__()

    async def _connect(self) -> WebSocketClient:
        self._client = await self._open()
        return self._client

    async def __aenter__(self) -> WebSocketClient:
        return await self._connect()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            await self._client.ws.close()


# ---------------------------------------------------------------------------- sync client


class SyncWebSocketClient(_ClientState):
    """:class:`WebSocketClient` for tests without asyncio (from :meth:`BrokerHarness.sync_client`):
    the same methods, blocking instead of coroutines."""

    def __init__(self, harness: BrokerHarness, path: str, timeout: float, ws: SyncClientConnection) -> None:
        super().__init__(harness, path, timeout)
        self.ws = ws
        """The underlying ``websockets.sync`` connection."""

    def send(self, message: str | bytes) -> None:
        """Send a text frame (``str``) or a binary frame (``bytes``)."""
        self.ws.send(message)

    def send_json(self, obj: Any) -> None:
        """Send ``obj`` as a JSON text frame."""
        self.ws.send(json.dumps(obj))

    def _recv(self, what: str, timeout: float) -> str:
        if self._backlog:
            return self._backlog.popleft()
        exc_closed = _websockets().exceptions.ConnectionClosed
        try:
            data = self.ws.recv(timeout=timeout)
        except TimeoutError:
            raise self._timeout_error(f"no {what}", timeout) from None
        except exc_closed:
            raise self._closed_error(what, self.close_code, self.close_reason) from None
        return self._took(data)

    def receive(self, timeout: float | None = None) -> str:
        """The next text message; :class:`ReceiveTimeout` after ``timeout`` seconds."""
        return self._recv("message", self._deadline(timeout))

    def receive_json(self, timeout: float | None = None) -> Any:
        """The next message, parsed as JSON."""
        return json.loads(self.receive(timeout))

    def receive_many(self, count: int, timeout: float | None = None) -> list[str]:
        """The next ``count`` messages, all within ``timeout`` seconds in total."""
        limit = self._deadline(timeout)
        end = time.monotonic() + limit
        out: list[str] = []
        while len(out) < count:
            try:
                out.append(self._recv("message", max(0.0, end - time.monotonic())))
            except ReceiveTimeout:
                raise self._timeout_error(f"only {len(out)} of {count} messages", limit) from None
        return out

    def assert_no_message(self, within: float = 0.2) -> None:
        """Fail if a message arrives within ``within`` seconds (waits the whole time on success)."""
        if self._backlog:
            raise AssertionError(f"{self.path}: unexpected message {self._backlog[0]!r}")
        exc_closed = _websockets().exceptions.ConnectionClosed
        try:
            data = self.ws.recv(timeout=within)
        except (TimeoutError, exc_closed):
            return
        self._took(data)
        raise AssertionError(f"{self.path}: unexpected message {data!r} within {within:g}s")

    def ping(self, timeout: float | None = None) -> None:
        """Send a WebSocket ping and wait for the broker's pong."""
        limit = self._deadline(timeout)
        if not self.ws.ping().wait(limit):
            raise self._timeout_error("no pong", limit)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection (closing handshake) and wait until it is closed."""
        self.ws.close(code, reason)

    def wait_closed(self, timeout: float | None = None) -> int | None:
        """Wait until the broker closes the connection; returns its close code (messages arriving
        meanwhile are kept for :meth:`receive`)."""
        limit = self._deadline(timeout)
        end = time.monotonic() + limit
        exc_closed = _websockets().exceptions.ConnectionClosed
        while True:
            try:
                data = self.ws.recv(timeout=max(0.0, end - time.monotonic()))
            except TimeoutError:
                raise self._timeout_error("the connection was not closed", limit) from None
            except exc_closed:
                return self.close_code
            self._backlog.append(self._took(data))

    def __enter__(self) -> SyncWebSocketClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.ws.close()


# ---------------------------------------------------------------------------- harness


class _ErrorCapture(logging.Handler):
    """Keeps the ``pystrands`` log records that carry an exception: a handler raised."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is not None and record.exc_info[0] is not None:
            with self._guard:
                self.records.append(record)


class BrokerHarness:
    """A real broker on free ``127.0.0.1`` ports running ``backend`` in-process, plus test clients.

    Use it as a context manager: ``with BrokerHarness(backend) as h:`` (starts in background
    threads; the backend runs as with ``Broker.start(backend=...)``) or
    ``async with BrokerHarness(backend) as h:`` (the same, started and stopped without blocking
    the test's event loop). Leaving the block stops backend and broker; open test clients get
    close code 1001.

    Args:
        backend: An instance of a :class:`~pystrands.PyStrandsClient` subclass, an
            :class:`~pystrands.AsyncPyStrandsClient` subclass or a :class:`~pystrands.PyStrands`
            app; ``None`` runs a bare broker (every handshake gets 503 until a TCP backend
            connects to :attr:`tcp_port`).
        timeout: Default deadline in seconds of every wait of the test clients (connect,
            receive, pong, close) and of :meth:`wait_until`.
        share_loop: With ``async with`` and an asyncio backend: run the handlers on the test's
            own event loop (``Broker.serving``), as a FastAPI lifespan would. By default they run
            on an event loop of their own, so a test that blocks does not stall them.
        raise_handler_errors: When a handler raised during the block (logged by the client with
            its traceback and passed to ``on_error``), fail at the end of the block with an
            :class:`AssertionError` listing them. Set it to False in tests that make handlers
            raise on purpose; :attr:`handler_errors` has them either way. Errors are collected
            from the ``pystrands`` loggers of the whole process.
        **settings: Broker settings (``request_timeout=0.5``, ``max_message_size=...``, ...);
            ``host`` defaults to ``127.0.0.1``, the ports to 0 (free ports), ``log_level`` to
            ``warn``.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        timeout: float = 5.0,
        share_loop: bool = False,
        raise_handler_errors: bool = True,
        **settings: Any,
    ) -> None:
        settings.setdefault("host", "127.0.0.1")
        settings.setdefault("ws_port", 0)
        settings.setdefault("tcp_port", 0)
        settings.setdefault("log_level", "warn")
        self.backend = backend
        self.timeout = float(timeout)
        self.share_loop = share_loop
        self.raise_handler_errors = raise_handler_errors
        self._settings = settings
        self._broker: Broker | None = None
        self._serving: Any = None  # the Broker.serving() context manager with share_loop
        self._capture = _ErrorCapture()
        self._log = logging.getLogger("pystrands")

    # ------------------------------------------------------------------ properties

    @property
    def broker(self) -> Broker:
        """The running :class:`~pystrands.Broker`."""
        if self._broker is None:
            raise RuntimeError("the harness is not running: use it as `with BrokerHarness(...) as h:`")
        return self._broker

    @property
    def ws_port(self) -> int:
        """The broker's WebSocket port."""
        return self.broker.ws_port

    @property
    def tcp_port(self) -> int:
        """The broker's backend (TCP) port, for TCP backends connecting alongside."""
        return self.broker.tcp_port

    @property
    def handler_errors(self) -> list[logging.LogRecord]:
        """Log records of handler exceptions seen since the harness started (with tracebacks)."""
        return list(self._capture.records)

    def url(self, path: str = "/") -> str:
        """The WebSocket URL of ``path`` (which may carry a query string)."""
        return f"ws://127.0.0.1:{self.ws_port}{_slash(path)}"

    def stats(self) -> dict[str, Any]:
        """The broker's :meth:`~pystrands.Broker.stats`."""
        return self.broker.stats()

    # ------------------------------------------------------------------ lifecycle

    def _make(self) -> Broker:
        if self._broker is not None:
            raise RuntimeError("this harness is already running")
        self._capture.records.clear()
        self._log.addHandler(self._capture)
        try:
            return Broker(**self._settings)
        except BaseException:
            self._log.removeHandler(self._capture)
            raise

    def start(self) -> BrokerHarness:
        """Start broker and backend (what ``with`` does); returns the harness."""
        broker = self._make()
        try:
            broker.start(backend=self.backend)
        except BaseException:
            self._log.removeHandler(self._capture)
            raise
        self._broker = broker
        return self

    def stop(self) -> None:
        """Stop backend and broker (what leaving ``with`` does); safe to call twice."""
        broker, self._broker = self._broker, None
        try:
            if broker is not None:
                broker.stop(timeout=self.timeout)
        finally:
            self._log.removeHandler(self._capture)

    def _error_note(self) -> str:
        records = self._capture.records
        if not records:
            return ""
        return f"\n(handler errors so far: {'; '.join(_one_line(r) for r in records[-3:])})"

    def _check_errors(self) -> None:
        records = self._capture.records
        if self.raise_handler_errors and records:
            formatter = logging.Formatter()
            details = "\n\n".join(f"{r.getMessage()}\n{formatter.formatException(r.exc_info)}" for r in records if r.exc_info)
            raise AssertionError(
                f"{len(records)} handler error(s) while the harness ran (pass raise_handler_errors=False "
                f"if they are expected):\n{details}"
            )

    def __enter__(self) -> BrokerHarness:
        if self.share_loop:
            raise RuntimeError("share_loop=True needs `async with BrokerHarness(...)`")
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if exc_type is None:
            self._check_errors()

    async def __aenter__(self) -> BrokerHarness:
        if not self.share_loop:
            await asyncio.get_running_loop().run_in_executor(None, self.start)
            return self
        if self.backend is None:
            raise ValueError("share_loop=True needs an asyncio backend")
        broker = self._make()
        serving = broker.serving(self.backend, drain_timeout=self.timeout)
        try:
            await serving.__aenter__()
        except BaseException:
            self._log.removeHandler(self._capture)
            raise
        self._broker, self._serving = broker, serving
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        serving, self._serving = self._serving, None
        if serving is None:
            broker, self._broker = self._broker, None
            try:
                if broker is not None:
                    await broker.stop_async(timeout=self.timeout)
            finally:
                self._log.removeHandler(self._capture)
        else:
            self._broker = None
            try:
                await serving.__aexit__(None, None, None)
            finally:
                self._log.removeHandler(self._capture)
        if exc_type is None:
            self._check_errors()

    # ------------------------------------------------------------------ clients

    def client(self, path: str = "/", headers: Headers | None = None, *, timeout: float | None = None) -> _Connecting:
        """Connect a WebSocket test client to ``path`` (asyncio).

        ``ws = await h.client(...)``, or ``async with h.client(...) as ws:`` to close it at the
        end of the block. A refused handshake raises :class:`HandshakeRefused` (its ``status``
        is the HTTP status); to assert a refusal use :meth:`connect_status`.
        """
        limit = self.timeout if timeout is None else timeout
        url = self.url(path)

        async def open_client() -> WebSocketClient:
            ws = _websockets()
            try:
                conn = await ws.asyncio.client.connect(
                    url, additional_headers=_headers_list(headers), open_timeout=limit, ping_interval=None, max_size=None
                )
            except ws.exceptions.InvalidStatus as exc:
                raise _refused(path, exc) from None
            except asyncio.TimeoutError:
                raise ReceiveTimeout(f"{_slash(path)}: the WebSocket handshake did not finish within {limit:g}s") from None
            return WebSocketClient(self, _slash(path), self.timeout, conn)

        return _Connecting(open_client)

    def sync_client(
        self, path: str = "/", headers: Headers | None = None, *, timeout: float | None = None
    ) -> SyncWebSocketClient:
        """:meth:`client` for tests without asyncio: a connected :class:`SyncWebSocketClient`
        (``with h.sync_client(...) as ws:`` closes it at the end of the block)."""
        limit = self.timeout if timeout is None else timeout
        ws = _websockets()
        connect = ws.sync.client.connect
        # websockets 17.1+ wants legacy=True to return a connection directly (older: no flag).
        extra: dict[str, Any] = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}
        try:
            conn = connect(
                self.url(path), additional_headers=_headers_list(headers), open_timeout=limit, max_size=None, **extra
            )
        except ws.exceptions.InvalidStatus as exc:
            raise _refused(path, exc) from None
        except TimeoutError:
            raise ReceiveTimeout(f"{_slash(path)}: the WebSocket handshake did not finish within {limit:g}s") from None
        return SyncWebSocketClient(self, _slash(path), self.timeout, conn)

    async def connect_status(self, path: str = "/", headers: Headers | None = None, *, timeout: float | None = None) -> int:
        """The HTTP status the broker answers a handshake to ``path`` with: 101 when accepted
        (the connection is closed again at once), else e.g. 403 (rejected) or 503 (no backend,
        or no answer within ``request_timeout``)."""
        try:
            client = await self.client(path, headers, timeout=timeout)
        except HandshakeRefused as exc:
            return exc.status
        await client.close()
        return 101

    def connect_status_sync(self, path: str = "/", headers: Headers | None = None, *, timeout: float | None = None) -> int:
        """:meth:`connect_status` for tests without asyncio."""
        try:
            client = self.sync_client(path, headers, timeout=timeout)
        except HandshakeRefused as exc:
            return exc.status
        client.close()
        return 101

    # ------------------------------------------------------------------ waiting

    async def wait_until(self, predicate: Callable[[], Any], *, timeout: float | None = None, what: str = "") -> None:
        """Poll a cheap ``predicate`` (e.g. on :meth:`stats`) until it is true; fails with
        :class:`ReceiveTimeout` naming ``what`` after ``timeout`` seconds."""
        limit = self.timeout if timeout is None else timeout
        end = time.monotonic() + limit
        while not predicate():
            if time.monotonic() > end:
                raise ReceiveTimeout(f"{what or 'condition'} not met within {limit:g}s{self._error_note()}")
            await asyncio.sleep(0.005)

    def wait_until_sync(self, predicate: Callable[[], Any], *, timeout: float | None = None, what: str = "") -> None:
        """:meth:`wait_until` for tests without asyncio."""
        limit = self.timeout if timeout is None else timeout
        end = time.monotonic() + limit
        while not predicate():
            if time.monotonic() > end:
                raise ReceiveTimeout(f"{what or 'condition'} not met within {limit:g}s{self._error_note()}")
            time.sleep(0.005)


def _slash(path: str) -> str:
    return path if path.startswith("/") else "/" + path


def _one_line(record: logging.LogRecord) -> str:
    exc = record.exc_info[1] if record.exc_info else None
    return f"{record.getMessage()}: {exc!r}" if exc is not None else record.getMessage()


def _refused(path: str, exc: Any) -> HandshakeRefused:
    response = exc.response
    status = int(response.status_code)
    body = bytes(response.body or b"").decode("utf-8", "replace").strip()
    detail = f": {body}" if body else ""
    return HandshakeRefused(f"{_slash(path)}: the broker refused the handshake with HTTP {status}{detail}", status, body)


# ---------------------------------------------------------------------------- bare broker


@contextmanager
def running_broker(**settings: Any) -> Iterator[Broker]:
    """Start a broker on 127.0.0.1 with free ports (unless given) and stop it afterwards.

    For tests that connect their own TCP backends to ``broker.tcp_port``; to run a backend
    in-process with test clients, use :class:`BrokerHarness`.
    """
    settings.setdefault("host", "127.0.0.1")
    settings.setdefault("ws_port", 0)
    settings.setdefault("tcp_port", 0)
    settings.setdefault("log_level", "warn")
    broker = Broker(**settings)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop(timeout=5.0)


def ws_url(broker: Broker, path: str = "/") -> str:
    """The WebSocket URL of a running broker for ``path``."""
    if not path.startswith("/"):
        path = "/" + path
    return f"ws://127.0.0.1:{broker.ws_port}{path}"
