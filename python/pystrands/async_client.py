"""Asyncio PyStrands backend client: a transport and a dispatcher around the session.

Subclass :class:`AsyncPyStrandsClient`, override the ``async def on_*`` callbacks
and run :meth:`AsyncPyStrandsClient.run_forever`::

    class ChatBackend(AsyncPyStrandsClient):
        async def on_message(self, message, context):
            await self.send_room_message(context.room_id, f"echo: {message}")

    asyncio.run(ChatBackend(host="localhost", port=8081).run_forever())

Every wire rule (hello and version negotiation, control frames, acknowledgements,
the silence deadline, sends kept while disconnected) lives in
:mod:`pystrands._session`; this module only does I/O and concurrency:

* reading uses an :class:`asyncio.Protocol` (no read timeouts, no polling) and
  runs on any asyncio event loop, uvloop included;
* one dispatcher task handles the decoded events in arrival order, each callback
  up to its first real wait; a callback that waits keeps that task (with the
  later events of its client, so they stay in order) and a new dispatcher takes
  over the others, so a slow handler delays only its own client;
* sends are coalesced: frames queued during one loop iteration go to the socket
  in one ``transport.write``, with the due ``ack`` (v2); a send only waits when
  the transport's buffer is above its high-water mark;
* a ``loop.call_later`` timer asks the session whether the broker went silent
  (another one, whether a hello answer that sends wait for is overdue);
* queries (:meth:`AsyncPyStrandsClient.room_members`, :meth:`AsyncPyStrandsClient.room_history`,
  ...) are futures the
  session resolves when ``data_received`` hands it the reply; reading goes on
  while queries wait even when handlers fell behind (up to twice ``max_pending``).
* with ``ssl`` the connection is asyncio's TLS transport (``loop.create_connection(...,
  ssl=...)``), the rest unchanged.

No asyncio object is created in ``__init__``: a client may be constructed at import
time, outside any running loop (e.g. a FastAPI module), and is bound to the loop
that first calls :meth:`connect` / :meth:`run_forever`. Delivery from a v2
broker is at least once: see :attr:`Context.event_id`.
"""

from __future__ import annotations

import asyncio
import inspect
import json  # noqa: F401 - a public name of this module in PyStrands 1.0
import logging
import ssl as _ssl
import threading
import types
import uuid  # noqa: F401 - a public name of this module in PyStrands 1.0
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from typing import Any, TypeVar, cast

from ._base import FAIRNESS_BATCH, REPLY, ClientBase, legacy_log_handler
from ._coro import first_step as _first_step
from ._coro import resume as _resume
from ._inproc import LinkTransport
from ._protocol import (
    DEFAULT_MAX_LINE_SIZE,
    ConnectionRequest,
    ErrorEvent,
    Event,
    encode_reject,
    response_for,
)
from ._session import DEFAULT_MAX_BUFFERED_SENDS, DEFAULT_QUERY_TIMEOUT, Query, Session
from .context import ConnectionRequestContext, Context
from .errors import BrokerUnavailable
from .history import RoomHistory

T = TypeVar("T")

logger = logging.getLogger("pystrands.async_client")

formatter, console_handler = legacy_log_handler("AsyncPyStrandsClient")  # 1.0 names, never attached

__all__ = ["AsyncPyStrandsClient"]



class _Run:
    """One dispatcher task's state: the key of the event it is handling, and
    whether that event's handler suspended and took the task over."""

    __slots__ = ("handed_off", "key")

    def __init__(self) -> None:
        self.key: str | None = None
        self.handed_off = False


def _is_awaitable(value: Any) -> bool:
    return type(value) is types.CoroutineType or inspect.isawaitable(value)


@types.coroutine
def _watched(
    client: AsyncPyStrandsClient, awaitable: Awaitable[Any], run: _Run | None
) -> Generator[Any, Any, Any]:
    """Await a handler's result; at its first real suspension, hand the task to it.

    Equivalent to ``await awaitable``, except that when the awaitable first yields
    to the event loop while a dispatcher (``run``) is running it,
    :meth:`AsyncPyStrandsClient._hand_off` is called before the task suspends.
    """
    it, value = _first_step(awaitable)
    if it is None:
        return value
    client._hand_off(run)
    return (yield from _resume(it, value))


_FLUSH_NOW_BYTES = 256 * 1024  # coalesced bytes that trigger an immediate write
_WRITE_HIGH_WATER = 4 * 1024 * 1024
_WRITE_LOW_WATER = 1024 * 1024


class _AsyncConnection(asyncio.Protocol):
    """One broker connection: feeds the session what it reads, writes what it queues.

    The link becomes the client's current one in :meth:`connection_made`
    (synchronously, so nothing read can arrive before), or closes itself there
    when the client already has one or is disconnecting.
    """

    def __init__(self, client: AsyncPyStrandsClient, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._session = client._session
        self._loop = loop
        self.link = 0  # the session's link number, once adopted
        self.refused = False
        self.heard = False  # something was read from it
        self._watchdog: asyncio.TimerHandle | None = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.flush_scheduled = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.closed = False  # no further writes accepted
        self.closing = False  # intentional close under way
        self.reading_paused = False
        self.lost: asyncio.Future[None] = loop.create_future()

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: other event loops' stream transports (uvloop's) implement
        # the asyncio.Transport interface without deriving from the class.
        stream = self.transport = cast(asyncio.Transport, transport)
        stream.set_write_buffer_limits(high=_WRITE_HIGH_WATER, low=_WRITE_LOW_WATER)
        if not self._client._adopt(self):
            self.closing = True
            self.abort()
            return
        self.link = self._session.connection_made()
        self.flush()  # the hello, then the sends kept while disconnected
        self.watch_hello()

    def data_received(self, data: bytes) -> None:
        self.heard = True
        session = self._session
        if self.closed or session.link != self.link:
            return
        events = session.receive_data(data)
        if session.refused:
            self.refused = True
            self.closing = True
            self.abort()
            return
        if self._watchdog is None and session.silence_limit:
            self._watchdog = self._loop.call_later(session.silence_limit, self._check_silence)
        dispatch = self._client._dispatch
        for event in events:
            dispatch(self, event)
        if not self.flush_scheduled and session.wants_write():  # heartbeat replies, acks
            self.schedule_flush()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_closed()
        if isinstance(exc, _ssl.SSLError):
            # e.g. the broker's alert refusing our client certificate, which TLS 1.3 sends
            # after the handshake: keep backing off as after a failed connect (a TLS error
            # after the broker spoke is a broken link: reconnect as usual)
            if not self.heard:
                self.refused = True
            if not self.closing:
                logger.warning("TLS connection to the broker at %s failed: %s", self._client._where, exc)
        elif not self.closing:
            if exc is None:
                logger.warning("The broker closed the connection")
            else:
                logger.warning("Connection to the broker lost: %s", exc)
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drainers()

    # -- timers -----------------------------------------------------------------

    def _check_silence(self) -> None:
        """Timer: close the connection when the session says the broker went silent."""
        self._watchdog = None
        session = self._session
        if self.closed or session.link != self.link:
            return
        now = self._loop.time()
        if session.check_silence(now):
            self.closing = True  # connection_lost stays quiet; reconnecting follows
            self.abort()
            return
        deadline = session.next_deadline()
        delay = session.silence_limit if deadline is None else max(0.0, deadline - now)
        self._watchdog = self._loop.call_later(delay, self._check_silence)

    def watch_hello(self) -> None:
        """Sends wait for the broker's hello answer: release them at the session's
        deadline if it does not come."""
        if self._hello_timer is None and not self.closed:
            deadline = self._session.hello_deadline
            if deadline:
                self._hello_timer = self._loop.call_at(deadline, self._hello_overdue)

    def _hello_overdue(self) -> None:
        self._hello_timer = None
        session = self._session
        if self.closed or session.link != self.link:
            return
        if session.check_hello(self._loop.time()):
            if not self.flush_scheduled:
                self.schedule_flush()
        else:
            self.watch_hello()

    # -- writing ----------------------------------------------------------------

    def schedule_flush(self) -> None:
        self.flush_scheduled = True
        self._loop.call_soon(self.flush)

    def _wake_drainers(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def flush(self) -> None:
        """Hand everything the session queued (and the due ack) to the transport in one write."""
        self.flush_scheduled = False
        if self.closed or self.transport is None or self._session.link != self.link:
            return
        data = self._session.data_to_send()
        if data:
            self.transport.write(data)

    def drain_future(self) -> asyncio.Future[None] | None:
        """A future resolved when writing may continue, or ``None`` if it may now."""
        if not self.write_paused or self.closed:
            return None
        if self._drain_waiter is None or self._drain_waiter.done():
            self._drain_waiter = self._loop.create_future()
        return self._drain_waiter

    # -- control ----------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            try:
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):  # pragma: no cover - closing transport
                pass

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            try:
                self.transport.resume_reading()
            except (RuntimeError, AttributeError):  # pragma: no cover
                pass

    def _mark_closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        session = self._session
        if self.link and session.open and session.link == self.link:
            session.connection_lost(quiet=self.closing)
        self._wake_drainers()

    def close(self) -> None:
        """Flush and close gracefully (the transport sends its buffer first)."""
        self.flush()
        self._mark_closed()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close at once, discarding unsent data."""
        self._mark_closed()
        if self.transport is not None:
            self.transport.abort()


class AsyncPyStrandsClient(ClientBase):
    """Asyncio backend client for the PyStrands broker (wire protocol v1, v2 when offered).

    Override the ``async def`` callbacks :meth:`on_connection_request`,
    :meth:`on_new_connection`, :meth:`on_message`, :meth:`on_disconnect` and
    :meth:`on_error` (plain functions work too); send with the coroutines
    :meth:`send_room_message`, :meth:`send_private_message` and
    :meth:`broadcast_message`. Sending while disconnected never raises: the send
    is kept (up to ``max_buffered_sends``) and written once the connection is
    back. With a broker that has the ``rooms`` feature: the coroutines
    :meth:`join_room`, :meth:`leave_room`, ``send_room_message(..., exclude=...)``,
    :meth:`send_user_message`, :meth:`disconnect_client`, :meth:`room_members` and
    :meth:`room_count` (``docs/broker.md``). With one that has the ``history`` feature:
    :meth:`room_config` and :meth:`room_history`.

    Delivery: from a v1 broker every event arrives at most once. A v2 broker
    (negotiated automatically, see ``docs/protocol.md``) delivers **at least
    once**: events not yet acknowledged when a connection dies are delivered
    again (to this or another backend) with the same
    :attr:`Context.event_id` and :attr:`Context.redelivered` set, so handlers
    with effects that must not repeat can deduplicate on ``context.event_id``.
    An event is acknowledged once its handler returned or raised; handlers
    cancelled by :meth:`disconnect` are not.

    Args:
        host: Broker host.
        port: Broker TCP port for backends.
        auto_reconnect: Reconnect with exponential backoff when the connection is
            lost (never after :meth:`disconnect`).
        reconnect_delay: First reconnect delay, seconds.
        max_reconnect_delay: Cap of the reconnect delay, seconds.
        reconnect_backoff: Multiplier applied to the delay after each failure.
        connect_timeout: Seconds allowed for one connect attempt: the TCP connect and,
            with ``ssl``, the TLS handshake (keyword only).
        max_pending: Received events not yet handled above which reading pauses
            (TCP backpressure to the broker) until half of them are done
            (keyword only).
        max_line_size: Largest inbound frame in bytes; larger ones are dropped
            with a warning (keyword only).
        backend_secret: Shared secret sent in the ``hello`` on every connection,
            for a broker started with a ``backend_secret`` (keyword only).
            ``None`` reads ``$PYSTRANDS_BACKEND_SECRET``; empty means none. It is
            never logged.
        max_buffered_sends: Sends kept while the broker is unreachable or the
            client reconnects (keyword only; ``0`` drops them).
        buffer_policy: ``"drop_oldest"`` or ``"drop_newest"``: what a full
            buffer drops, counted in :attr:`dropped_sends` (keyword only).
        ssl: TLS to the broker's backend port, for a broker started with
            ``backend_tls_cert``/``backend_tls_key`` (keyword only): an
            :class:`ssl.SSLContext` trusting the broker's CA (for mutual TLS, with
            the backend's certificate loaded by ``load_cert_chain``), or ``True``
            for :func:`ssl.create_default_context` (system CAs). ``None`` or
            ``False``: plain TCP. A failed handshake (untrusted certificate, wrong
            name) is a failed connect: logged and retried as configured; so is a
            broker refusing the client certificate, which TLS 1.3 reports just
            after connecting. Anything else raises ``TypeError``.
        server_hostname: The name the broker's certificate must carry (and the SNI
            sent), when it is not ``host``, e.g. ``"broker.internal"`` while
            connecting to an IP address (keyword only; only with ``ssl``).
    """

    _logger = logger

    def __init__(
        self,
        host: str = "localhost",
        port: int = 8081,
        auto_reconnect: bool = True,
        reconnect_delay: float = 1.0,
        max_reconnect_delay: float = 30.0,
        reconnect_backoff: float = 2.0,
        *,
        connect_timeout: float = 10.0,
        max_pending: int = 10_000,
        max_line_size: int = DEFAULT_MAX_LINE_SIZE,
        backend_secret: str | None = None,
        max_buffered_sends: int = DEFAULT_MAX_BUFFERED_SENDS,
        buffer_policy: str = "drop_oldest",
        ssl: _ssl.SSLContext | bool | None = None,
        server_hostname: str | None = None,
    ) -> None:
        """Configure the client; no asyncio object is created until it runs."""
        super().__init__(
            host,
            port,
            auto_reconnect,
            reconnect_delay,
            max_reconnect_delay,
            reconnect_backoff,
            connect_timeout=connect_timeout,
            max_line_size=max_line_size,
            backend_secret=backend_secret,
            max_buffered_sends=max_buffered_sends,
            buffer_policy=buffer_policy,
            max_pending=max_pending,
            ssl=ssl,
            server_hostname=server_hostname,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._conn: _AsyncConnection | None = None
        self._manager: asyncio.Task[None] | None = None
        self._done: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._disconnect_lock: asyncio.Lock | None = None
        self._queues: dict[str, deque[tuple[_AsyncConnection, Event]]] = {}
        self._ready: deque[tuple[_AsyncConnection, Event]] = deque()
        self._dispatcher: _Run | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending = 0
        self._abandoned = False

    # ------------------------------------------------------------------ lifecycle

    def _arm(self) -> asyncio.AbstractEventLoop:
        """Bind to the running loop (creating asyncio objects lazily) and arm the client."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._done = asyncio.Event()
            self._wake = asyncio.Event()
            self._disconnect_lock = asyncio.Lock()
            self._conn = None
            self._manager = None
            self._queues = {}
            self._ready = deque()
            self._dispatcher = None
            self._tasks = set()
            self._pending = 0
            self.connected = False
            # the session's clock is the loop's (uvloop keeps its own); kept sends stay, a link
            # of a loop that died without disconnect() is over
            if self._session.open:
                self._session.connection_lost()
            self._session.use_clock(loop.time)
        self._loop_thread = threading.get_ident()
        if self._intentional_disconnect:  # a new session after disconnect(): start from a clean slate
            self._pending = 0
        self._intentional_disconnect = False
        self._abandoned = False
        assert self._done is not None
        self._done.clear()
        return loop

    def _adopt(self, conn: _AsyncConnection) -> bool:
        """``conn`` just connected: make it the current link, unless the client already
        has one or is disconnecting (then ``conn`` closes itself)."""
        if self._intentional_disconnect or self._conn is not None:
            return False
        self._conn = conn
        self.connected = True
        logger.info("Connected to the broker at %s", self._where)
        return True

    async def _open(self, log: Callable[..., None]) -> _AsyncConnection | None:
        """Open a connection; it is the current link if it returns one that is not closed."""
        loop = asyncio.get_running_loop()
        if self._inproc is not None:
            try:
                link = self._inproc.attach()
            except RuntimeError as exc:
                log("Cannot attach to the in-process broker: %s", exc)
                return None
            proto = _AsyncConnection(self, loop)
            LinkTransport(loop, link, proto).start()
            return proto
        made: list[_AsyncConnection] = []

        def factory() -> _AsyncConnection:
            made.append(_AsyncConnection(self, loop))
            return made[-1]

        tls = self.ssl
        connecting = (
            loop.create_connection(factory, self.host, self.port)
            if tls is None
            else loop.create_connection(factory, self.host, self.port, ssl=tls, server_hostname=self._tls_hostname)
        )
        try:
            _, conn = await asyncio.wait_for(connecting, timeout=self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            if isinstance(exc, _ssl.SSLError):  # e.g. an untrusted certificate
                log("Cannot connect to the broker at %s:%s: TLS handshake failed: %s", self.host, self.port, exc)
            else:
                log("Cannot connect to the broker at %s:%s: %s", self.host, self.port, exc or "timeout")
            for proto in made:  # timed out after connection_made: undo the adoption
                proto.closing = True
                proto.abort()
                if self._conn is proto:
                    self._conn = None
                    self.connected = False
            return None
        return conn

    def _start_manager(self, conn: _AsyncConnection | None) -> None:
        assert self._loop is not None and self._wake is not None
        self._wake.clear()
        self._manager = self._loop.create_task(self._manage(conn), name="pystrands-connection")

    async def connect(self) -> bool:
        """Connect to the broker and start reading.

        Returns:
            ``True`` if connected (or already connected), ``False`` if the attempt failed.
        """
        self._arm()
        if self.connected and self._conn is not None:
            return True
        conn = await self._open(logger.error)
        if conn is None:
            return False
        if self._conn is not conn:  # disconnect() was called meanwhile, or someone else connected
            return self._conn is not None and not self._intentional_disconnect
        if self._manager is None or self._manager.done():
            self._start_manager(conn)
        else:  # a reconnect loop is sleeping: let it adopt this connection
            assert self._wake is not None
            self._wake.set()
        return True

    async def _manage(self, conn: _AsyncConnection | None) -> None:
        """Watch the current connection and reconnect as configured."""
        assert self._wake is not None and self._done is not None
        wake = self._wake
        backoff = self._backoff()
        terminal = False
        try:
            while True:
                if conn is not None:
                    await asyncio.shield(conn.lost)
                    self._lost(conn)
                    # a refused hello keeps backing off; so does a TLS link that ended before the
                    # broker said anything (it refused our certificate, the alert lost to a reset)
                    if not conn.refused and (conn.heard or self.ssl is None):
                        backoff.reset()
                    conn = None
                if self._intentional_disconnect:
                    break
                if self._conn is not None:
                    conn = self._conn  # connect() installed one
                    continue
                if not self.auto_reconnect:
                    terminal = True
                    break
                delay = backoff.next()
                logger.info("Reconnecting to %s in %.2fs", self._where, delay)
                try:
                    await asyncio.wait_for(wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                else:
                    wake.clear()
                    continue
                new = await self._open(logger.warning)
                if new is None:
                    continue
                conn = self._conn  # ``new`` if it was adopted
        finally:
            if self._manager is asyncio.current_task():
                self._manager = None
        if terminal:
            logger.info("Connection lost and auto_reconnect is off; stopping")
            self._done.set()

    def _lost(self, conn: _AsyncConnection) -> None:
        if self._conn is conn:
            self._conn = None
            self.connected = False

    async def disconnect(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly; no reconnect follows.

        Stops reading, waits up to ``timeout`` seconds for in-flight (and already
        received) events to be handled, flushes sends, then closes the connection.
        Handler tasks still running after the deadline are cancelled. Safe to call
        from a handler and more than once.
        """
        self._intentional_disconnect = True
        self.connected = False
        if self._loop is None or self._loop is not asyncio.get_running_loop():
            return  # never ran on this loop: nothing to close
        assert self._disconnect_lock is not None and self._wake is not None
        assert self._done is not None
        loop = self._loop
        deadline = loop.time() + max(0.0, timeout)
        async with self._disconnect_lock:
            self._intentional_disconnect = True
            self.connected = False
            conn = self._conn
            self._wake.set()
            if conn is not None:
                conn.closing = True
                conn.pause_reading()
                # nothing more is read: no query reply can come
                self._session.fail_queries("disconnect() stopped reading before the reply")
            current = asyncio.current_task()
            while True:  # handlers may start others (a dispatcher taking over): wait for all
                tasks = {t for t in self._tasks if t is not current and not t.done()}
                if not tasks:
                    break
                remaining = deadline - loop.time()
                if remaining > 0:
                    await asyncio.wait(tasks, timeout=remaining)
                    continue
                logger.warning(
                    "disconnect: %d handler task(s) still running after %.1fs; cancelling",
                    len(tasks),
                    timeout,
                )
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks, timeout=1.0)
                break
            if conn is not None:
                conn.close()
                try:
                    await asyncio.wait_for(asyncio.shield(conn.lost), timeout=max(0.05, deadline - loop.time()))
                except asyncio.TimeoutError:
                    logger.warning("disconnect: unsent data dropped after %.1fs", timeout)
                    conn.abort()
            manager = self._manager
            if manager is not None and manager is not current and not manager.done():
                _, pending_m = await asyncio.wait({manager}, timeout=max(0.1, deadline - loop.time()))
                for task in pending_m:
                    task.cancel()
            if self._conn is conn:
                self._conn = None
            self._abandoned = True
            for task in self._tasks:
                if task is not current and not task.done():
                    task.cancel()
            self._queues.clear()
            self._ready.clear()
            self._dispatcher = None
            self._pending = 0
            if conn is not None:
                logger.info("Disconnected from the broker")
            self._done.set()

    async def run_forever(self) -> None:
        """Connect if needed and wait until :meth:`disconnect` is called.

        With ``auto_reconnect`` a failed first connect is retried with backoff;
        without it, a failed connect or a lost connection makes this return.
        Cancelling the task (e.g. Ctrl-C under ``asyncio.run``) disconnects,
        waiting for in-flight handlers, and returns normally, as PyStrands 1.0
        did, so ``asyncio.run(client.run_forever())`` exits cleanly on Ctrl-C.
        """
        self._arm()
        if not self.connected:
            if not await self.connect():
                if self._intentional_disconnect or not self.auto_reconnect:
                    logger.error("Not connected and auto_reconnect is off; run_forever returns")
                    await self.disconnect(0)
                    return
                if self._conn is None and (self._manager is None or self._manager.done()):
                    self._start_manager(None)
        assert self._done is not None
        try:
            await self._done.wait()
        except asyncio.CancelledError:
            logger.info("run_forever cancelled; disconnecting")
            await self.disconnect()
            return
        await self.disconnect()

    # ---------------------------------------------------------------------- sends

    def _submit(self, data: bytes, what: str, link: int = 0) -> _AsyncConnection | None:
        """Queue one frame (loop thread only); returns the link that will write it."""
        if not self._session.send(data, what, link=link):
            return None
        conn = self._conn
        if conn is None:  # pragma: no cover - the session is open only while a link is adopted
            return None
        if self._session.out_bytes >= _FLUSH_NOW_BYTES:
            conn.flush()
        elif not conn.flush_scheduled:
            conn.schedule_flush()
        return conn

    @staticmethod
    async def _drained(conn: _AsyncConnection) -> None:
        """Wait until the transport's buffer is below its low-water mark again."""
        waiter = conn.drain_future()
        if waiter is not None:
            await waiter

    def _command(self, queue: Callable[[Session], bool]) -> _AsyncConnection | None:
        """Queue a ``rooms`` command with the session (``queue`` checks and queues it; its
        errors propagate); returns the link that will write it, as :meth:`_submit`."""
        queued = queue(self._session)
        conn = self._conn
        if conn is None:
            return None
        if not queued:
            conn.watch_hello()
            return None
        if not conn.flush_scheduled:
            conn.schedule_flush()
        return conn

    async def _ask(self, start: Callable[[Session, Callable[[], None]], Query[T]]) -> T:
        """Run a query: register it with the session, let the link write it, wait for
        the reply (or the deadline, or the connection's end)."""
        loop = asyncio.get_running_loop()
        conn = self._conn
        if conn is None or not self.connected or self._intentional_disconnect or loop is not self._loop:
            if conn is not None and loop is not self._loop:
                raise RuntimeError("queries (room_members(), room_count(), room_history()) must be awaited on the client's event loop")
            raise BrokerUnavailable(f"not connected to the broker at {self._where}")
        answered: asyncio.Future[None] = loop.create_future()

        def done() -> None:
            if not answered.done():
                answered.set_result(None)

        query = start(self._session, done)
        if not conn.flush_scheduled:
            conn.schedule_flush()
        conn.watch_hello()
        if conn.reading_paused and not conn.closing and self._pending < 2 * self.max_pending:
            conn.resume_reading()  # handlers fell behind, but this reply must be read
        try:
            await asyncio.wait((answered,), timeout=query.timeout)
        finally:
            if not query.done:
                self._session.forget_query(query)
        if not query.done:
            raise self._session.query_timed_out(query)
        return query.result()

    # The three sends inline the fast path: no nested coroutine per message.

    async def broadcast_message(self, message: str) -> None:
        """Send ``message`` to every connected WebSocket client."""
        conn = self._submit(self._session.encoders.broadcast(message), "broadcast")
        if conn is not None and conn.write_paused:
            await self._drained(conn)

    async def send_room_message(
        self, room_id: str, message: str, exclude: str | Iterable[str] | None = None
    ) -> None:
        """Send ``message`` to every client in room ``room_id``.

        ``exclude``: a client id, or several, that must not get it (e.g. the sender;
        needs a broker with the ``rooms`` feature, see :meth:`join_room` for the
        errors). Without it (or with none to exclude) this is the 1.0 send.
        """
        if exclude is None:
            conn = self._submit(self._session.encoders.room(room_id, message), "message_to_room")
        else:
            conn = self._command(lambda s: s.room_message(room_id, message, exclude))
        if conn is not None and conn.write_paused:
            await self._drained(conn)

    async def send_private_message(self, client_id: str, message: str) -> None:
        """Send ``message`` to the client ``client_id`` only."""
        conn = self._submit(self._session.encoders.private(client_id, message), "message_to_connection")
        if conn is not None and conn.write_paused:
            await self._drained(conn)

    # ------------------------------------------------- rooms, users and moderation

    async def join_room(self, client_id: str, room_id: str) -> None:
        """Add the connection ``client_id`` to the room ``room_id`` (it stays in its others).

        Needs a broker with the ``rooms`` feature. Raises ``TypeError`` for a non-str id,
        ``ValueError`` for an empty one or a room id longer than the broker's
        ``max_id_length``, :class:`~pystrands.UnsupportedFeature` when the connected
        broker lacks the feature. An unknown client is not an error (the broker ignores
        it). While disconnected it is kept like any send (and dropped, logged, if the
        next broker lacks the feature). A refusal by the broker (e.g. beyond
        ``max_rooms_per_client``) is logged as a warning.
        """
        conn = self._command(lambda s: s.join_room(client_id, room_id))
        if conn is not None and conn.write_paused:
            await self._drained(conn)

    async def leave_room(self, client_id: str, room_id: str) -> None:
        """Remove the connection ``client_id`` from the room ``room_id`` (its first room too).

        Errors and buffering as :meth:`join_room`.
        """
        conn = self._command(lambda s: s.leave_room(client_id, room_id))
        if conn is not None and conn.write_paused:
            await self._drained(conn)

    async def send_user_message(self, user_id: str, message: str) -> None:
        """Send ``message`` to every connection of the user ``user_id``, on every node.

        A connection has a user id when ``on_connection_request`` set
        ``request.context.user_id``. Errors and buffering as :meth:`join_room`.
        """
        conn = self._command(lambda s: s.user_message(user_id, message))
        if conn is not None and conn.write_paused:
            await self._drained(conn)

    async def disconnect_client(self, client_id: str, code: int = 1000, reason: str = "") -> None:
        """Close the WebSocket of ``client_id`` with close ``code`` and ``reason``.

        ``code`` must be 1000 or 4000-4999 and ``reason`` at most 123 UTF-8 bytes
        (``ValueError`` otherwise). The client's backend then gets ``on_disconnect``
        as for any close. Other errors and buffering as :meth:`join_room`.
        """
        conn = self._command(lambda s: s.disconnect_client(client_id, code, reason))
        if conn is not None and conn.write_paused:
            await self._drained(conn)

    async def room_members(self, room_id: str, timeout: float = DEFAULT_QUERY_TIMEOUT) -> list[Context]:
        """The contexts of every member of ``room_id``, on every live broker node.

        Waits at most ``timeout`` seconds. Raises :class:`~pystrands.BrokerUnavailable`
        when not connected or when the connection ends before the reply,
        :class:`~pystrands.QueryTimeout` after ``timeout``,
        :class:`~pystrands.QueryError` when the broker answers with an error,
        :class:`~pystrands.UnsupportedFeature` when the broker lacks the ``rooms``
        feature, and ``TypeError``/``ValueError`` for a bad ``room_id`` or
        ``timeout``. When a node did not answer in time the members of the others are
        returned and a warning names the missing nodes.
        """
        return await self._ask(lambda s, done: s.query_room_members(room_id, timeout, done))

    async def room_count(self, room_id: str, timeout: float = DEFAULT_QUERY_TIMEOUT) -> int:
        """How many connections are in ``room_id`` on every live broker node.

        Answered from each node's last presence report (at most about a second old).
        Waiting and errors as :meth:`room_members`.
        """
        return await self._ask(lambda s, done: s.query_room_count(room_id, timeout, done))

    # ------------------------------------------------- history and room settings

    async def room_config(
        self,
        room_id: str,
        *,
        history_size: int | None = None,
        history_ttl: float | None = None,
        presence: bool | None = None,
    ) -> None:
        """Set the room's own settings; the ones left out (``None``) keep their value.

        ``history_size``: messages of the room the broker keeps (an int 0-100000; 0 turns its
        history off); ``history_ttl``: seconds the history is kept after the room's last
        message (a positive number); ``presence``: whether its ``pystrands.1`` members get
        presence frames. Give at least one.

        Needs a broker with the ``history`` feature. Raises ``TypeError``/``ValueError`` for a
        bad argument (naming it) or room id, :class:`~pystrands.UnsupportedFeature` when the
        connected broker lacks the feature. Kept while disconnected like any send (and
        dropped, logged, if the next broker lacks the feature). A refusal by the broker is
        logged as a warning.
        """
        conn = self._command(
            lambda s: s.room_config(room_id, history_size=history_size, history_ttl=history_ttl, presence=presence)
        )
        if conn is not None and conn.write_paused:
            await self._drained(conn)

    async def room_history(
        self, room_id: str, since: int = 0, limit: int | None = None, timeout: float = DEFAULT_QUERY_TIMEOUT
    ) -> RoomHistory:
        """The messages of ``room_id`` after offset ``since`` (an int >= 0), oldest first: the
        newest ``limit`` of them (an int 1-100000; ``None``: all the broker keeps).

        Returns a :class:`~pystrands.RoomHistory`: the room's ``epoch`` and last ``offset``,
        the ``messages`` (:class:`~pystrands.HistoryMessage` ``(offset, data)``) and
        ``complete``, false when messages after ``since`` are missing (evicted, or left out
        by ``limit``). A room without history answers ``RoomHistory("", 0, [], True)``.

        Needs a broker with the ``history`` feature. Waiting and errors as
        :meth:`room_members` (:class:`~pystrands.UnsupportedFeature` when the broker lacks
        ``history``), plus ``TypeError``/``ValueError`` for a bad ``since`` or ``limit``.
        """
        return await self._ask(lambda s, done: s.query_room_history(room_id, since, limit, timeout, done))

    # ------------------------------------------------------------------- dispatch

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _dispatch(self, conn: _AsyncConnection, event: Event) -> None:
        """Queue one decoded event for the dispatcher (called from ``data_received``)."""
        loop = self._loop
        if loop is None or self._abandoned:
            return
        self._pending += 1
        self._ready.append((conn, event))
        if self._dispatcher is None:
            self._start_dispatcher(loop)
        if self._pending >= self.max_pending and not (
            self._session.pending_queries and self._pending < 2 * self.max_pending
        ):  # handlers fell behind: stop reading (unless a query waits for its reply)
            conn.pause_reading()

    def _start_dispatcher(self, loop: asyncio.AbstractEventLoop) -> None:
        run = _Run()
        self._dispatcher = run
        self._track(loop.create_task(self._dispatch_ready(run)))

    def _hand_off(self, run: _Run | None) -> None:
        """The handler being run by dispatcher ``run`` suspended: that task keeps it.

        Later events of the same client queue up behind it, and a new task takes
        over the ready events, so a slow handler never stalls other clients.
        """
        if run is None or run.handed_off:  # not run by a dispatcher, or already handed over
            return
        run.handed_off = True
        key = run.key
        if key is not None and key not in self._queues:
            self._queues[key] = deque()
        if self._dispatcher is run:
            self._dispatcher = None
            loop = self._loop
            if self._ready and loop is not None and not self._abandoned:
                self._start_dispatcher(loop)

    def _finished(self, count: int = 1) -> None:
        self._pending = max(0, self._pending - count)
        conn = self._conn
        if (
            conn is not None
            and conn.reading_paused
            and not self._intentional_disconnect
            and self._pending <= self.max_pending // 2
        ):
            conn.resume_reading()

    async def _dispatch_ready(self, run: _Run) -> None:
        """Handle the ready events in arrival order, in this task, one after the other.

        A handler that completes without suspending (the common case: it only
        queues sends) costs no task and no loop iteration of its own. The first
        time a handler really waits, :meth:`_hand_off` leaves this task to it and
        starts another dispatcher; this task then finishes that handler, handles
        what its client sent meanwhile, and ends. Handlers therefore always run
        inside a task (``asyncio.timeout``, ``TaskGroup`` work in them), events of
        one client never overlap, and events of different clients run concurrently
        whenever one of them waits.
        """
        ready = self._ready
        queues = self._queues
        begin = self._begin
        budget = FAIRNESS_BATCH
        try:
            while ready and not self._abandoned:
                conn, event = ready.popleft()
                key = event.key
                if key is not None:
                    dq = queues.get(key)
                    if dq is not None:  # that client's handler is still running elsewhere
                        dq.append((conn, event))
                        continue
                run.key = key
                try:
                    rest = begin(conn, event, run)
                    if rest is not None:
                        await rest
                    if event.seq:  # handled (returned or raised); not when cancelled
                        self._event_done(conn, event.seq)
                finally:
                    self._finished()
                if run.handed_off:
                    if key is not None:
                        await self._drain_client(key)
                    return
                budget -= 1
                if budget <= 0 and ready:
                    budget = FAIRNESS_BATCH
                    await asyncio.sleep(0)  # let the loop read and write meanwhile
        finally:
            if self._dispatcher is run:
                self._dispatcher = None

    async def _drain_client(self, key: str) -> None:
        """Handle, in this task and in order, what client ``key`` sent while its
        handler was running; then release the client to the dispatcher."""
        dq = self._queues.get(key)
        if dq is None:
            return
        begin = self._begin
        budget = FAIRNESS_BATCH
        try:
            while dq and not self._abandoned:
                conn, event = dq.popleft()
                try:
                    rest = begin(conn, event, None)
                    if rest is not None:
                        await rest
                    if event.seq:
                        self._event_done(conn, event.seq)
                finally:
                    self._finished()
                budget -= 1
                if budget <= 0 and dq:
                    budget = FAIRNESS_BATCH
                    await asyncio.sleep(0)
        finally:
            if self._queues.get(key) is dq:
                del self._queues[key]

    async def _call(self, result: Any, run: _Run | None = None) -> Any:
        if result is None or not _is_awaitable(result):
            return result
        return await _watched(self, result, run)

    def _begin(
        self, conn: _AsyncConnection, event: Event, run: _Run | None
    ) -> Coroutine[Any, Any, None] | None:
        """Run the callback for ``event`` up to its first real wait, right here.

        Returns ``None`` when it is done (the common case: a handler that only
        queues sends finishes without waiting), else the coroutine that finishes
        it, for the caller to await in the same task. A callback that waits hands
        the dispatcher's task over first (:meth:`_hand_off`). The reply to a
        connection request is written as soon as it is decided; an exception goes
        to :meth:`_handler_failed`.
        """
        name, call, args = self._route(event)
        try:
            result = call(*args)
            if result is not None and _is_awaitable(result):
                it, result = _first_step(result)
                if it is not None:  # it waits: ``result`` is what it yielded
                    self._hand_off(run)
                    return self._finish(conn, event, name, _resume(it, result), run)
        except Exception as exc:
            return self._failed(conn, event, name, exc, run)
        if type(event) is ConnectionRequest:
            self._reply(conn, response_for(event.request_id, result, event.request))
        return None

    async def _finish(
        self, conn: _AsyncConnection, event: Event, name: str, rest: Awaitable[Any], run: _Run | None
    ) -> None:
        """The rest of a callback that waited (see :meth:`_begin`)."""
        try:
            result = await rest
        except Exception as exc:
            await self._failed(conn, event, name, exc, run)
            return
        if type(event) is ConnectionRequest:
            self._reply(conn, response_for(event.request_id, result, event.request))

    async def _failed(
        self, conn: _AsyncConnection, event: Event, name: str, exc: Exception, run: _Run | None
    ) -> None:
        """A callback raised: a connection request is rejected, the error is reported."""
        if type(event) is ConnectionRequest:
            self._reply(conn, encode_reject(event.request_id))
            context = event.request.context
        elif type(event) is ErrorEvent:  # reporting the failure would call on_error again
            logger.error("on_error raised", exc_info=exc)
            return
        else:
            context = event.context  # type: ignore[attr-defined]
        await self._handler_failed(name, exc, context, run)

    def _reply(self, conn: _AsyncConnection, data: bytes) -> None:
        """Write the reply to a connection request on the link it came from."""
        self._submit(data, REPLY, conn.link)

    def _event_done(self, conn: _AsyncConnection, seq: int) -> None:
        """The handler of event ``seq`` of ``conn`` returned or raised (v2)."""
        if self._session.event_done(conn.link, seq) and not conn.flush_scheduled and not conn.closed:
            conn.schedule_flush()

    async def _handler_failed(
        self, name: str, exc: Exception, context: Context, run: _Run | None = None
    ) -> None:
        logger.error("%s raised for client %r", name, context.client_id, exc_info=exc)
        try:
            await self._call(self.on_error(str(exc), context), run)
        except Exception:
            logger.exception("on_error raised while reporting an error")

    # ------------------------------------------------------------------ callbacks

    async def on_connection_request(self, request: ConnectionRequestContext) -> bool | None:
        """Decide whether to accept a WebSocket connection (default: accept).

        Set ``request.context.room_id`` / ``client_id`` / ``metadata`` as needed and
        return ``True`` or ``False``; returning anything else uses
        ``request.accepted``. An exception rejects the connection.
        """
        return self._default_connection_request(request)

    async def on_new_connection(self, context: Context) -> None:
        """Called when a WebSocket client has connected."""
        self._default_new_connection(context)

    async def on_message(self, message: str, context: Context) -> None:
        """Called for every message a WebSocket client sends."""
        self._default_message(message, context)

    async def on_disconnect(self, context: Context) -> None:
        """Called when a WebSocket client has disconnected."""
        self._default_disconnect(context)

    async def on_error(self, error: str, context: Context) -> None:
        """Called for broker error events and for exceptions raised by handlers."""
        self._default_error(error, context)
