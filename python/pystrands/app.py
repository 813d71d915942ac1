"""The ``PyStrands`` decorator app: register handlers with decorators, then run.

Example::

    from pystrands import PyStrands

    app = PyStrands(host="localhost", port=8081)

    @app.on_connection_request
    def auth(request):
        request.context.room_id = request.url.strip("/") or "lobby"
        return request.headers.get("X-Token", [None])[0] == "secret"

    @app.on_message
    async def echo(message, context):
        await app.send_room_message(context.room_id, f"echo: {message}")

    @app.on_disconnect
    def left(context):
        app.send_room_message(context.room_id, f"{context.client_id} left")

    app.run()            # blocking; or: await app.run_async()

Design (the shape of the upstream decorator app, so code and tests written for it
keep working):

* ``app._handlers`` maps ``"connection_request"``, ``"new_connection"``,
  ``"message"``, ``"disconnect"`` and ``"error"`` to the registered functions;
  ``await app._call(event, *args)`` runs one and returns its result (``None``
  when none is registered); ``app._create_client()`` returns an
  :class:`~pystrands.AsyncPyStrandsClient` carrying the app's settings whose
  callbacks call the handlers; ``app._client`` is the running client (``None``
  while the app does not run). The app uses only the client's public methods.
* ``async def`` handlers run on the loop. Plain ``def`` handlers run in a thread
  pool (``max_threads`` threads) so blocking code never stalls the loop; the
  loop waits for each before handling that client's next event, so order still
  holds. Pass ``run_sync_in_thread=False`` to call them on the loop instead
  (fastest for trivial handlers; they must not block).
* ``send_room_message`` / ``send_private_message`` / ``broadcast`` queue the
  frame at once and return a :class:`SendResult`: ignore it in a sync handler,
  ``await`` it in an async one (it completes at once unless the socket buffer
  is full). They work from any thread, and do nothing while the app is not
  running; while it reconnects, the client keeps them for the next connection.
  The room and user commands (``join_room``, ``leave_room``,
  ``send_room_message(..., exclude=...)``, ``send_user_message``,
  ``disconnect_client``, ``room_config``) work the same way, except that their
  errors (bad arguments, a broker without the ``rooms`` / ``history`` feature)
  are raised in the caller, whichever thread it is on.
* ``room_members`` / ``room_count`` / ``room_history`` return a :class:`QueryResult`:
  ``await`` it in an async handler, call ``.result()`` in a sync one (which runs in
  the thread pool, so the loop stays free to read the reply).
* Protocol v2 (acknowledgements, heartbeats, ``backend_secret``) is the async
  client's: with a v2 broker delivery is at least once, and a handler can
  deduplicate on ``context.event_id`` (``context.redelivered`` marks
  redeliveries); an event counts as handled when its handler returned or raised.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import ssl as _ssl
import threading
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from ._base import resolve_tls
from ._coro import first_step, resume
from ._protocol import DEFAULT_MAX_LINE_SIZE
from ._session import DEFAULT_MAX_BUFFERED_SENDS, DEFAULT_QUERY_TIMEOUT
from .async_client import AsyncPyStrandsClient
from .context import ConnectionRequestContext, Context
from .errors import BrokerUnavailable
from .history import RoomHistory

if TYPE_CHECKING:
    from ._core import NativeBroker

logger = logging.getLogger("pystrands.app")

__all__ = ["PyStrands", "QueryResult", "SendResult"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

EVENTS = ("connection_request", "new_connection", "message", "disconnect", "error")
"""The keys of ``app._handlers``, one per decorator (``@app.on_<event>``)."""


class SendResult:
    """Awaitable outcome of an app send; the frame is already queued when you get it.

    ``await`` it in async code (waits only while the socket buffer is full);
    ignore it in sync code.
    """

    __slots__ = ("_waiter",)

    def __init__(self, waiter: asyncio.Future[Any] | None = None) -> None:
        """Wrap an optional waiter (``None``: nothing to wait for)."""
        self._waiter = waiter

    def done(self) -> bool:
        """True when awaiting would not wait."""
        return self._waiter is None or self._waiter.done()

    def __await__(self) -> Generator[Any, None, None]:
        if self._waiter is not None and not self._waiter.done():
            yield from self._waiter.__await__()

    def __repr__(self) -> str:
        return f"<SendResult {'done' if self.done() else 'waiting for room'}>"


_DONE = SendResult()


class QueryResult(Generic[T]):
    """The answer of an app query (:meth:`PyStrands.room_members`, :meth:`PyStrands.room_count`,
    :meth:`PyStrands.room_history`).

    ``await`` it in async code; call :meth:`result` in sync code (a plain ``def``
    handler, which runs in the app's thread pool). The query's errors
    (:class:`~pystrands.QueryTimeout`, :class:`~pystrands.BrokerUnavailable`, ...)
    are raised by either.
    """

    __slots__ = ("_future", "_timeout")

    def __init__(self, future: asyncio.Future[T] | concurrent.futures.Future[T], timeout: float) -> None:
        """Wrap the future of a query started on the app's loop, or from another thread."""
        self._future = future
        self._timeout = timeout

    def done(self) -> bool:
        """True when the answer (or the error) is there."""
        return self._future.done()

    def result(self) -> T:
        """Block until the answer and return it (from a thread other than the app's loop)."""
        future = self._future
        if isinstance(future, asyncio.Future):
            if future.done():
                return future.result()
            raise RuntimeError(
                "the query was made on the app's event loop: await it (calling .result() there "
                "would block the loop its reply must come through)"
            )
        try:
            return future.result(self._timeout + 1.0)  # the query itself ends by its timeout
        except concurrent.futures.TimeoutError:  # the builtin TimeoutError from 3.11 on, not on 3.10
            if not future.done():
                future.cancel()
                raise BrokerUnavailable("the app's event loop did not run the query (is it stopped?)") from None
        return future.result()  # done meanwhile, or it was the query's own QueryTimeout

    def __await__(self) -> Generator[Any, None, T]:
        future = self._future
        if isinstance(future, concurrent.futures.Future):
            return (yield from asyncio.wrap_future(future).__await__())
        return (yield from future.__await__())

    def __repr__(self) -> str:
        return f"<QueryResult {'done' if self.done() else 'waiting'}>"


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _finish(it: Any, pending: Any) -> Any:
    return await resume(it, pending)


async def _awaited(send: Awaitable[None]) -> None:
    await send


class _AppClient(AsyncPyStrandsClient):
    """The async client driving a :class:`PyStrands` app: each callback calls its handler."""

    def __init__(self, app: PyStrands, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._app = app

    async def on_connection_request(self, request: ConnectionRequestContext) -> bool | None:
        if "connection_request" not in self._app._handlers:
            return True
        result: bool | None = await self._app._call("connection_request", request)
        return result

    async def on_new_connection(self, context: Context) -> None:
        await self._app._call("new_connection", context)

    async def on_message(self, message: str, context: Context) -> None:
        await self._app._call("message", message, context)

    async def on_disconnect(self, context: Context) -> None:
        await self._app._call("disconnect", context)

    async def on_error(self, error: str, context: Context) -> None:
        if "error" not in self._app._handlers:
            logger.error("Error for client %s: %s", context.client_id, error)
            return
        await self._app._call("error", error, context)


class PyStrands:
    """Decorator-style PyStrands backend.

    Args:
        host: Broker host.
        port: Broker TCP port for backends.
        auto_reconnect: Reconnect with exponential backoff when the connection drops.
        reconnect_delay: First reconnect delay, seconds.
        max_reconnect_delay: Cap of the reconnect delay, seconds.
        reconnect_backoff: Multiplier applied to the delay after each failure.
        run_sync_in_thread: Run plain ``def`` handlers in a thread pool (default)
            instead of directly on the event loop (keyword only).
        max_threads: Size of that thread pool (keyword only).
        connect_timeout: Seconds allowed per connect attempt, TLS handshake included
            (keyword only).
        max_pending: Unhandled events above which reading pauses (keyword only).
        max_line_size: Largest inbound frame in bytes (keyword only).
        backend_secret: Secret sent in the ``hello`` to a broker that requires
            one (keyword only); ``None`` reads ``$PYSTRANDS_BACKEND_SECRET``.
            Never logged.
        max_buffered_sends: Sends kept while the client reconnects (keyword only).
        buffer_policy: ``"drop_oldest"`` or ``"drop_newest"`` (keyword only).
        ssl: TLS to the broker's backend port (keyword only): an
            :class:`ssl.SSLContext` (with ``load_cert_chain`` done for mutual TLS) or
            ``True`` for :func:`ssl.create_default_context`; ``None``/``False``:
            plain TCP. Handshake failures are logged and retried like failed
            connects. See :class:`~pystrands.AsyncPyStrandsClient`.
        server_hostname: The name the broker's certificate must carry, when it is
            not ``host`` (keyword only; only with ``ssl``).
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 8081,
        auto_reconnect: bool = True,
        reconnect_delay: float = 1.0,
        max_reconnect_delay: float = 30.0,
        reconnect_backoff: float = 2.0,
        *,
        run_sync_in_thread: bool = True,
        max_threads: int = 32,
        connect_timeout: float = 10.0,
        max_pending: int = 10_000,
        max_line_size: int = DEFAULT_MAX_LINE_SIZE,
        backend_secret: str | None = None,
        max_buffered_sends: int = DEFAULT_MAX_BUFFERED_SENDS,
        buffer_policy: str = "drop_oldest",
        ssl: _ssl.SSLContext | bool | None = None,
        server_hostname: str | None = None,
    ) -> None:
        """Create the app; nothing connects until :meth:`run` / :meth:`run_async`."""
        self.ssl, self.server_hostname = resolve_tls(ssl, server_hostname)
        self.host = host
        self.port = port
        self.auto_reconnect = auto_reconnect
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.reconnect_backoff = reconnect_backoff
        self.run_sync_in_thread = run_sync_in_thread
        self.max_threads = max(1, int(max_threads))
        self.connect_timeout = connect_timeout
        self.max_pending = max_pending
        self.max_line_size = max_line_size
        self.backend_secret = backend_secret
        self.max_buffered_sends = max_buffered_sends
        self.buffer_policy = buffer_policy
        self._handlers: dict[str, Callable[..., Any]] = {}
        self._client: AsyncPyStrandsClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inproc: NativeBroker | None = None  # set by Broker.serve/start(backend=app)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._stopping: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- properties

    @property
    def client(self) -> AsyncPyStrandsClient | None:
        """The running :class:`~pystrands.AsyncPyStrandsClient` (``None`` while not running)."""
        return self._client

    @property
    def connected(self) -> bool:
        """Whether the app is connected to the broker."""
        client = self._client
        return client is not None and client.connected

    # ---------------------------------------------------------------- decorators

    @overload
    def _register(self, event: str, func: F) -> F: ...

    @overload
    def _register(self, event: str, func: None) -> Callable[[F], F]: ...

    def _register(self, event: str, func: F | None) -> F | Callable[[F], F]:
        if func is None:
            return lambda f: self._register(event, f)
        if not callable(func):
            raise TypeError(f"@app.on_{event} needs a function, got {func!r}")
        self._handlers[event] = func
        return func

    @overload
    def on_connection_request(self, func: F) -> F: ...

    @overload
    def on_connection_request(self, func: None = None) -> Callable[[F], F]: ...

    def on_connection_request(self, func: F | None = None) -> F | Callable[[F], F]:
        """Register ``func(request) -> bool | None`` deciding connection requests.

        Return ``True``/``False`` or set ``request.accepted``; set
        ``request.context.room_id`` / ``client_id`` / ``metadata``. An exception
        rejects. Without a handler every connection is accepted with defaults.
        """
        return self._register("connection_request", func)

    @overload
    def on_new_connection(self, func: F) -> F: ...

    @overload
    def on_new_connection(self, func: None = None) -> Callable[[F], F]: ...

    def on_new_connection(self, func: F | None = None) -> F | Callable[[F], F]:
        """Register ``func(context)`` called when a WebSocket client connected."""
        return self._register("new_connection", func)

    @overload
    def on_message(self, func: F) -> F: ...

    @overload
    def on_message(self, func: None = None) -> Callable[[F], F]: ...

    def on_message(self, func: F | None = None) -> F | Callable[[F], F]:
        """Register ``func(message, context)`` called for each client message."""
        return self._register("message", func)

    @overload
    def on_disconnect(self, func: F) -> F: ...

    @overload
    def on_disconnect(self, func: None = None) -> Callable[[F], F]: ...

    def on_disconnect(self, func: F | None = None) -> F | Callable[[F], F]:
        """Register ``func(context)`` called when a WebSocket client left."""
        return self._register("disconnect", func)

    @overload
    def on_error(self, func: F) -> F: ...

    @overload
    def on_error(self, func: None = None) -> Callable[[F], F]: ...

    def on_error(self, func: F | None = None) -> F | Callable[[F], F]:
        """Register ``func(error, context)`` for broker errors and handler exceptions."""
        return self._register("error", func)

    # ------------------------------------------------------------------ dispatch

    def _get_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.max_threads, thread_name_prefix="pystrands-app"
                )
            return self._executor

    async def _call(self, event: str, *args: Any) -> Any:
        """Run the handler registered for ``event`` and return its result (``None``
        when there is none). A plain function runs in the thread pool unless
        ``run_sync_in_thread`` is false."""
        func = self._handlers.get(event)
        if func is None:
            return None
        if inspect.iscoroutinefunction(func):
            return await func(*args)
        if self.run_sync_in_thread:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._get_executor(), func, *args)
        else:
            result = func(*args)
        if inspect.isawaitable(result):
            result = await result
        return result

    def _create_client(self) -> AsyncPyStrandsClient:
        """A new :class:`~pystrands.AsyncPyStrandsClient` with the app's settings whose
        callbacks call the registered handlers."""
        return _AppClient(
            self,
            host=self.host,
            port=self.port,
            auto_reconnect=self.auto_reconnect,
            reconnect_delay=self.reconnect_delay,
            max_reconnect_delay=self.max_reconnect_delay,
            reconnect_backoff=self.reconnect_backoff,
            connect_timeout=self.connect_timeout,
            max_pending=self.max_pending,
            max_line_size=self.max_line_size,
            backend_secret=self.backend_secret,
            max_buffered_sends=self.max_buffered_sends,
            buffer_policy=self.buffer_policy,
            ssl=self.ssl,
            server_hostname=self.server_hostname,
        )

    # --------------------------------------------------------------------- sends

    def _send(self, send: Callable[..., Awaitable[None]] | None, *args: Any) -> SendResult:
        """Run one of the client's send coroutines from wherever the caller is."""
        if send is None:
            return _DONE
        loop = self._loop
        running = _running_loop()
        if loop is not None and running is not loop and not loop.is_closed():
            # another thread (a sync handler in the pool): the app's loop runs the send
            try:
                asyncio.run_coroutine_threadsafe(_awaited(send(*args)), loop)
            except RuntimeError:  # the loop closed meanwhile
                pass
            return _DONE
        it, value = first_step(send(*args))
        if it is None:
            return _DONE
        if running is None:  # pragma: no cover - only a send waiting for room suspends, on a loop
            it.close()
            return _DONE
        return SendResult(running.create_task(_finish(it, value)))

    def _command(self, send: Callable[..., Coroutine[Any, Any, None]] | None, *args: Any) -> SendResult:
        """Run one of the client's room/user commands: as :meth:`_send`, but from another
        thread the caller waits until the loop queued it, so its errors reach the caller."""
        if send is None:
            return _DONE
        loop = self._loop
        running = _running_loop()
        if loop is None or running is loop or loop.is_closed():
            return self._send(send, *args)
        outcome: concurrent.futures.Future[None] = concurrent.futures.Future()

        def start() -> None:
            try:
                it, value = first_step(send(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                outcome.set_exception(exc)
                return
            if it is not None:  # waits for room in the socket buffer: finish on the loop
                task = loop.create_task(_finish(it, value))
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
            outcome.set_result(None)

        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError:  # the loop closed meanwhile
            return _DONE
        while True:
            try:
                outcome.result(0.5)
                return _DONE
            except concurrent.futures.TimeoutError:  # the builtin TimeoutError from 3.11 on, not on 3.10
                if outcome.done():
                    outcome.result()  # done meanwhile: its own error, if any
                    return _DONE
                if loop.is_closed() or not loop.is_running():
                    return _DONE  # the app stopped: like a send of an app that does not run

    def _query(self, ask: Callable[..., Coroutine[Any, Any, T]] | None, room_id: str, timeout: float) -> QueryResult[T]:
        """Start one of the client's queries from wherever the caller is: ``ask(room_id,
        timeout=timeout)`` (the query's other arguments bound with ``functools.partial``)."""
        loop = self._loop
        if ask is None or loop is None or loop.is_closed():
            raise BrokerUnavailable("the app is not running")
        running = _running_loop()
        if running is not loop:  # another thread (a sync handler in the pool)
            return QueryResult(asyncio.run_coroutine_threadsafe(ask(room_id, timeout=timeout), loop), timeout)
        it, value = first_step(ask(room_id, timeout=timeout))  # argument and link errors raise here
        if it is None:
            done: asyncio.Future[T] = loop.create_future()
            done.set_result(value)
            return QueryResult(done, timeout)
        return QueryResult(loop.create_task(_finish(it, value)), timeout)

    def send_room_message(
        self, room_id: str, message: str, exclude: str | Iterable[str] | None = None
    ) -> SendResult:
        """Send ``message`` to every client in room ``room_id`` (await optional).

        ``exclude``: a client id, or several, that must not get it (needs a broker with
        the ``rooms`` feature; errors as :meth:`join_room`).
        """
        client = self._client
        if exclude is None:
            return self._send(None if client is None else client.send_room_message, room_id, message)
        return self._command(None if client is None else client.send_room_message, room_id, message, exclude)

    def join_room(self, client_id: str, room_id: str) -> SendResult:
        """Add the connection ``client_id`` to the room ``room_id`` (await optional).

        Needs a broker with the ``rooms`` feature: raises
        :class:`~pystrands.UnsupportedFeature` when the connected broker lacks it,
        ``TypeError``/``ValueError`` for a bad id. Kept while reconnecting; does
        nothing while the app is not running. Unknown ids are not an error.
        """
        client = self._client
        return self._command(None if client is None else client.join_room, client_id, room_id)

    def leave_room(self, client_id: str, room_id: str) -> SendResult:
        """Remove the connection ``client_id`` from the room ``room_id`` (as :meth:`join_room`)."""
        client = self._client
        return self._command(None if client is None else client.leave_room, client_id, room_id)

    def send_user_message(self, user_id: str, message: str) -> SendResult:
        """Send ``message`` to every connection of the user ``user_id`` (as :meth:`join_room`)."""
        client = self._client
        return self._command(None if client is None else client.send_user_message, user_id, message)

    def disconnect_client(self, client_id: str, code: int = 1000, reason: str = "") -> SendResult:
        """Close the WebSocket of ``client_id`` with ``code`` (1000 or 4000-4999) and
        ``reason`` (at most 123 UTF-8 bytes); otherwise as :meth:`join_room`."""
        client = self._client
        return self._command(None if client is None else client.disconnect_client, client_id, code, reason)

    def room_members(self, room_id: str, timeout: float = DEFAULT_QUERY_TIMEOUT) -> QueryResult[list[Context]]:
        """The contexts of every member of ``room_id`` on every live node: ``await`` the
        result, or call ``.result()`` in a sync handler.

        Errors as :meth:`AsyncPyStrandsClient.room_members`; also
        :class:`~pystrands.BrokerUnavailable` while the app does not run.
        """
        client = self._client
        return self._query(None if client is None else client.room_members, room_id, timeout)

    def room_count(self, room_id: str, timeout: float = DEFAULT_QUERY_TIMEOUT) -> QueryResult[int]:
        """How many connections are in ``room_id`` on every live node (as :meth:`room_members`)."""
        client = self._client
        return self._query(None if client is None else client.room_count, room_id, timeout)

    def room_config(
        self,
        room_id: str,
        *,
        history_size: int | None = None,
        history_ttl: float | None = None,
        presence: bool | None = None,
    ) -> SendResult:
        """Set the room's own settings (await optional); the ones left out keep their value.

        ``history_size`` (an int 0-100000; 0 turns the room's history off),
        ``history_ttl`` (seconds, > 0), ``presence`` (bool): give at least one. Needs a
        broker with the ``history`` feature: raises :class:`~pystrands.UnsupportedFeature`
        when the connected broker lacks it, ``TypeError``/``ValueError`` for a bad argument
        (in the caller, as :meth:`join_room`). Kept while reconnecting; does nothing while
        the app is not running.
        """
        client = self._client
        config = (
            None
            if client is None
            else functools.partial(
                client.room_config, history_size=history_size, history_ttl=history_ttl, presence=presence
            )
        )
        return self._command(config, room_id)

    def room_history(
        self, room_id: str, since: int = 0, limit: int | None = None, timeout: float = DEFAULT_QUERY_TIMEOUT
    ) -> QueryResult[RoomHistory]:
        """The messages of ``room_id`` after offset ``since``, the newest ``limit`` of them
        (``None``: all), as a :class:`~pystrands.RoomHistory`: ``await`` the result, or call
        ``.result()`` in a sync handler.

        Errors as :meth:`AsyncPyStrandsClient.room_history`; also
        :class:`~pystrands.BrokerUnavailable` while the app does not run.
        """
        client = self._client
        ask = None if client is None else functools.partial(client.room_history, since=since, limit=limit)
        return self._query(ask, room_id, timeout)

    def send_private_message(self, client_id: str, message: str) -> SendResult:
        """Send ``message`` to the client ``client_id`` only (await optional)."""
        client = self._client
        return self._send(None if client is None else client.send_private_message, client_id, message)

    def broadcast(self, message: str) -> SendResult:
        """Send ``message`` to every connected client (await optional)."""
        client = self._client
        return self._send(None if client is None else client.broadcast_message, message)

    broadcast_message = broadcast

    # ------------------------------------------------------------------- running

    async def run_async(self) -> None:
        """Connect and handle events until :meth:`disconnect` / :meth:`stop`."""
        await self._run_client(self._begin_run())

    def _begin_run(self) -> AsyncPyStrandsClient:
        """Bind the app to the running loop and make its client (not connected yet)."""
        self._loop = asyncio.get_running_loop()
        client = self._client = self._create_client()
        client._inproc = self._inproc
        return client

    async def _run_client(self, client: AsyncPyStrandsClient) -> None:
        """Run ``client`` until it disconnects, then release what the app held for it."""
        try:
            await client.run_forever()
        finally:
            if self._client is client:
                self._client = None
            with self._executor_lock:
                executor, self._executor = self._executor, None
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)

    def run(self) -> None:
        """Run the app in a new event loop until stopped (Ctrl-C stops cleanly)."""
        try:
            asyncio.run(self.run_async())
        except KeyboardInterrupt:
            logger.info("Interrupted; stopped")

    async def disconnect(self, timeout: float = 5.0) -> None:
        """Disconnect (waiting up to ``timeout`` for handlers); :meth:`run` returns."""
        client = self._client
        if client is not None:
            await client.disconnect(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask a running app to disconnect; callable from any thread or handler."""
        client = self._client
        loop = self._loop
        if client is None or loop is None or loop.is_closed():
            return
        running = _running_loop()
        if running is loop:
            task = loop.create_task(client.disconnect(timeout))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        else:
            try:
                asyncio.run_coroutine_threadsafe(client.disconnect(timeout), loop)
            except RuntimeError:  # loop closed meanwhile
                pass
