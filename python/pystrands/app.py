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

Design:

* The app runs on :class:`~pystrands.AsyncPyStrandsClient` (one event loop).
  Per-client ordering and cross-client concurrency are the async client's.
* ``async def`` handlers run on the loop. Plain ``def`` handlers run in a thread
  pool (``max_threads`` threads) so blocking code never stalls the loop; the
  loop waits for each before handling that client's next event, so order still
  holds. Pass ``run_sync_in_thread=False`` to call them on the loop instead
  (fastest for trivial handlers; they must not block).
* ``send_room_message`` / ``send_private_message`` / ``broadcast`` queue the
  frame immediately and return a :class:`SendResult`: ignore it in a sync
  handler, ``await`` it in an async one (it completes at once unless the
  socket buffer is full, in which case it waits for room). They work from any
  thread; sends while disconnected are dropped (logged once per period) and
  never raise.
* Protocol v2 (acknowledgements, heartbeats, ``backend_secret``) is the async
  client's: with a v2 broker delivery is at least once, and a handler can
  deduplicate on ``context.event_id`` (``context.redelivered`` marks
  redeliveries); an event counts as handled when its handler returned or raised.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
from collections.abc import Callable, Generator
from typing import Any, TypeVar, overload

from ._protocol import DEFAULT_MAX_LINE_SIZE, encode_broadcast, encode_private_message, encode_room_message
from .async_client import AsyncPyStrandsClient
from .context import ConnectionRequestContext, Context

logger = logging.getLogger("pystrands.app")

__all__ = ["PyStrands", "SendResult"]

F = TypeVar("F", bound=Callable[..., Any])

_MISSING: Any = object()


class SendResult:
    """Awaitable outcome of an app send; the frame is already queued when you get it.

    ``await`` it in async code (waits only while the socket buffer is full);
    ignore it in sync code.
    """

    __slots__ = ("_waiter",)

    def __init__(self, waiter: asyncio.Future[None] | None = None) -> None:
        """Wrap an optional drain waiter (``None``: nothing to wait for)."""
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


class _AppClient(AsyncPyStrandsClient):
    """The async client driving a :class:`PyStrands` app."""

    def __init__(self, app: PyStrands, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._app = app

    async def on_connection_request(self, request: ConnectionRequestContext) -> bool | None:
        result = await self._app._invoke("on_connection_request", request)
        return True if result is _MISSING else result

    async def on_new_connection(self, context: Context) -> None:
        await self._app._invoke("on_new_connection", context)

    async def on_message(self, message: str, context: Context) -> None:
        await self._app._invoke("on_message", message, context)

    async def on_disconnect(self, context: Context) -> None:
        await self._app._invoke("on_disconnect", context)

    async def on_error(self, error: str, context: Context) -> None:
        if await self._app._invoke("on_error", error, context) is _MISSING:
            logger.error("Error for client %s: %s", context.client_id, error)


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
        connect_timeout: Seconds allowed per TCP connect attempt (keyword only).
        max_pending: Unhandled events above which reading pauses (keyword only).
        max_line_size: Largest inbound frame in bytes (keyword only).
        backend_secret: Secret sent in the ``hello`` to a broker that requires
            one (keyword only); ``None`` reads ``$PYSTRANDS_BACKEND_SECRET``.
            Never logged.
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
    ) -> None:
        """Create the app; nothing connects until :meth:`run` / :meth:`run_async`."""
        self.run_sync_in_thread = run_sync_in_thread
        self.max_threads = max(1, int(max_threads))
        self._handlers: dict[str, tuple[Callable[..., Any], bool]] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._client = _AppClient(
            self,
            host=host,
            port=port,
            auto_reconnect=auto_reconnect,
            reconnect_delay=reconnect_delay,
            max_reconnect_delay=max_reconnect_delay,
            reconnect_backoff=reconnect_backoff,
            connect_timeout=connect_timeout,
            max_pending=max_pending,
            max_line_size=max_line_size,
            backend_secret=backend_secret,
        )

    # ---------------------------------------------------------------- properties

    @property
    def client(self) -> AsyncPyStrandsClient:
        """The underlying :class:`~pystrands.AsyncPyStrandsClient`."""
        return self._client

    @property
    def connected(self) -> bool:
        """Whether the app is connected to the broker."""
        return self._client.connected

    @property
    def host(self) -> str:
        """Broker host."""
        return self._client.host

    @property
    def port(self) -> int:
        """Broker TCP port."""
        return self._client.port

    # ---------------------------------------------------------------- decorators

    @overload
    def _register(self, name: str, func: F) -> F: ...

    @overload
    def _register(self, name: str, func: None) -> Callable[[F], F]: ...

    def _register(self, name: str, func: F | None) -> F | Callable[[F], F]:
        if func is None:
            return lambda f: self._register(name, f)
        if not callable(func):
            raise TypeError(f"@app.{name} needs a function, got {func!r}")
        self._handlers[name] = (func, inspect.iscoroutinefunction(func))
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
        return self._register("on_connection_request", func)

    @overload
    def on_new_connection(self, func: F) -> F: ...

    @overload
    def on_new_connection(self, func: None = None) -> Callable[[F], F]: ...

    def on_new_connection(self, func: F | None = None) -> F | Callable[[F], F]:
        """Register ``func(context)`` called when a WebSocket client connected."""
        return self._register("on_new_connection", func)

    @overload
    def on_message(self, func: F) -> F: ...

    @overload
    def on_message(self, func: None = None) -> Callable[[F], F]: ...

    def on_message(self, func: F | None = None) -> F | Callable[[F], F]:
        """Register ``func(message, context)`` called for each client message."""
        return self._register("on_message", func)

    @overload
    def on_disconnect(self, func: F) -> F: ...

    @overload
    def on_disconnect(self, func: None = None) -> Callable[[F], F]: ...

    def on_disconnect(self, func: F | None = None) -> F | Callable[[F], F]:
        """Register ``func(context)`` called when a WebSocket client left."""
        return self._register("on_disconnect", func)

    @overload
    def on_error(self, func: F) -> F: ...

    @overload
    def on_error(self, func: None = None) -> Callable[[F], F]: ...

    def on_error(self, func: F | None = None) -> F | Callable[[F], F]:
        """Register ``func(error, context)`` for broker errors and handler exceptions."""
        return self._register("on_error", func)

    # ------------------------------------------------------------------ dispatch

    def _get_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.max_threads, thread_name_prefix="pystrands-app"
                )
            return self._executor

    async def _invoke(self, name: str, *args: Any) -> Any:
        """Run the handler registered as ``name``; ``_MISSING`` if there is none."""
        entry = self._handlers.get(name)
        if entry is None:
            return _MISSING
        func, is_async = entry
        if is_async:
            return await func(*args)
        if self.run_sync_in_thread:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._get_executor(), func, *args)
        else:
            result = func(*args)
        if inspect.isawaitable(result):
            result = await result
        return result

    # --------------------------------------------------------------------- sends

    def _send(self, data: bytes, what: str) -> SendResult:
        client = self._client
        loop = client._loop
        if (
            loop is not None
            and client._loop_thread == threading.get_ident()
            and loop.is_running()
        ):
            conn = client._send_nowait(data, what)
            if conn is not None and conn.write_paused:
                waiter = conn.drain_future()
                if waiter is not None:
                    return SendResult(waiter)
            return _DONE
        client._send_threadsafe(data, what)
        return _DONE

    def send_room_message(self, room_id: str, message: str) -> SendResult:
        """Send ``message`` to every client in room ``room_id`` (await optional)."""
        return self._send(encode_room_message(room_id, message), "message_to_room")

    def send_private_message(self, client_id: str, message: str) -> SendResult:
        """Send ``message`` to the client ``client_id`` only (await optional)."""
        return self._send(encode_private_message(client_id, message), "message_to_connection")

    def broadcast(self, message: str) -> SendResult:
        """Send ``message`` to every connected client (await optional)."""
        return self._send(encode_broadcast(message), "broadcast")

    broadcast_message = broadcast

    # ------------------------------------------------------------------- running

    async def run_async(self) -> None:
        """Connect and handle events until :meth:`disconnect` / :meth:`stop`."""
        try:
            await self._client.run_forever()
        finally:
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
        await self._client.disconnect(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask a running app to disconnect; callable from any thread or handler."""
        client = self._client
        loop = client._loop
        if loop is None or loop.is_closed():
            return
        if client._loop_thread == threading.get_ident() and loop.is_running():
            task = loop.create_task(client.disconnect(timeout))
            client._track(task)
        else:
            try:
                asyncio.run_coroutine_threadsafe(client.disconnect(timeout), loop)
            except RuntimeError:  # loop closed meanwhile
                pass
