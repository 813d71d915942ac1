"""Threading PyStrands backend client: sockets, locks and threads around the session.

Subclass :class:`PyStrandsClient`, override the ``on_*`` callbacks and call
:meth:`PyStrandsClient.run_forever`::

    class ChatBackend(PyStrandsClient):
        def on_message(self, message, context):
            self.send_room_message(context.room_id, f"echo: {message}")

    ChatBackend(host="localhost", port=8081).run_forever()

Every wire rule (hello and version negotiation, control frames, acknowledgements,
the silence deadline, sends kept while disconnected) lives in
:mod:`pystrands._session`; this module only does I/O and concurrency:

* one reader thread per client does blocking ``recv`` calls (no polling
  timeouts) and feeds the session; a bounded pool of worker threads runs the
  callbacks. Events of one WebSocket client (same ``client_id``) are handled one
  after the other, in arrival order; events of different clients run
  concurrently, so a slow handler only delays its own client. Connection
  requests run on any free worker.
* writes from any thread are coalesced: whichever thread finds the socket idle
  writes everything the session has queued so far with one ``sendall``.
* with a v2 broker a small housekeeping thread per connection writes the due
  ``ack`` :data:`ACK_DELAY` after it became due (inside the running ``sendall``
  when there is one), so there is at most one ack per ``ACK_DELAY`` whatever the
  event rate, and closes the connection when the session says the broker went
  silent. It sleeps until there is work. It also starts when sends wait for the
  broker's hello answer (a room command made right after connecting), to release
  them if that answer never comes.
* queries (:meth:`PyStrandsClient.room_members`, :meth:`PyStrandsClient.room_count`,
  :meth:`PyStrandsClient.room_history`) block the calling thread (a handler's worker) until the reader thread hands the
  session the reply, or the deadline passes. The reader never runs handlers, so
  it is always free to read the reply; while queries wait it keeps reading even
  when handlers fell behind (up to twice ``max_pending``).
* with ``ssl`` the socket is a :class:`~pystrands._tls.TLSSocket`: the same blocking
  reads and coalesced writes, with the TLS state kept apart from the I/O so the reader
  and a writer never use it at the same time (OpenSSL does not allow that).

Delivery from a v2 broker is at least once: see :attr:`Context.event_id`.
"""

from __future__ import annotations

import json  # noqa: F401 - a public name of this module in PyStrands 1.0
import logging
import queue
import socket
import ssl as _ssl
import threading
import time
import uuid  # noqa: F401 - a public name of this module in PyStrands 1.0
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ._base import FAIRNESS_BATCH, REPLY, ClientBase, legacy_log_handler
from ._inproc import LinkSocket
from ._protocol import (
    DEFAULT_MAX_LINE_SIZE,
    READ_CHUNK_SIZE,
    ConnectionRequest,
    ErrorEvent,
    Event,
    encode_reject,
    response_for,
)
from ._session import DEFAULT_MAX_BUFFERED_SENDS, DEFAULT_QUERY_TIMEOUT, Query, Session
from ._tls import TLSSocket
from .context import ConnectionRequestContext, Context
from .errors import BrokerUnavailable
from .history import RoomHistory

T = TypeVar("T")

logger = logging.getLogger("pystrands.client")

formatter, console_handler = legacy_log_handler("PyStrandsClient")  # 1.0 names, never attached

__all__ = ["ACK_DELAY", "PyStrandsClient"]

ACK_DELAY = 0.005
"""Longest time (seconds) a due ``ack`` is held back hoping to go out with other frames."""



def _configure_socket(sock: socket.socket) -> None:
    """Blocking mode, no Nagle delay (we batch ourselves), TCP keepalive."""
    sock.settimeout(None)
    for level, opt in (
        (socket.IPPROTO_TCP, socket.TCP_NODELAY),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    ):
        try:
            sock.setsockopt(level, opt, 1)
        except OSError:  # pragma: no cover - e.g. non-TCP sockets
            pass


class _Link:
    """One broker connection's socket and I/O flags (guarded by the client's ``_io`` lock)."""

    __slots__ = ("sock", "number", "closed", "closing", "sending", "refused", "heard", "hk_idle", "housekeeping")

    def __init__(self, sock: socket.socket | LinkSocket | TLSSocket) -> None:
        self.sock = sock
        self.number = 0  # the session's link number, set when installed
        self.closed = False  # no further writes
        self.closing = False  # an intentional close is under way (quieter logs)
        self.sending = False  # a thread is inside the write loop
        self.refused = False  # the broker refused our hello (or our TLS client certificate)
        self.heard = False  # something was read from it
        self.hk_idle = False  # the housekeeper waits for an ack to become due
        self.housekeeping = False  # the v2 housekeeper was started

    def shutdown(self, how: int) -> None:
        try:
            self.sock.shutdown(how)
        except OSError:
            pass


_STOP = object()


class _KeyedWorkerPool:
    """Fixed pool of threads running items; items with the same key run in order.

    Each key with pending work owns a deque and has exactly one entry in the shared
    run queue (or is being run); any free worker picks the next entry. Keyless
    items (connection requests) are independent entries. After ``FAIRNESS_BATCH``
    items of one key the worker requeues the key so other keys get a turn.
    """

    def __init__(self, size: int, run: Callable[[Any], None], name: str = "pystrands-worker") -> None:
        self._run = run
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queues: dict[str, deque[Any]] = {}
        self._runq: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._inflight = 0
        self._low_mark = -1  # a reader waits in wait_below() for _inflight to reach it
        self._abandon = False
        self._local = threading.local()
        self._threads = [
            threading.Thread(target=self._worker, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, size))
        ]
        for thread in self._threads:
            thread.start()

    @property
    def inflight(self) -> int:
        """Items submitted and not yet finished."""
        return self._inflight

    def in_worker(self) -> bool:
        """True when called from one of this pool's threads while it runs an item."""
        return bool(getattr(self._local, "running", False))

    def submit(self, key: str | None, item: Any) -> None:
        """Queue ``item``; ``key=None`` runs it on any free worker."""
        with self._lock:
            self._inflight += 1
            if key is None:
                self._runq.put((None, item))
                return
            dq = self._queues.get(key)
            if dq is None:
                self._queues[key] = deque((item,))
                self._runq.put((key, None))
            else:
                dq.append(item)

    def _call(self, item: Any) -> None:
        if self._abandon:
            return
        self._local.running = True
        try:
            self._run(item)
        except BaseException:  # never let a worker die
            logger.exception("Unhandled error in a handler worker")
        finally:
            self._local.running = False

    def _finished(self) -> None:
        # caller holds self._lock
        self._inflight -= 1
        if self._inflight <= 1 or self._inflight == self._low_mark:
            self._idle.notify_all()

    def _worker(self) -> None:
        get = self._runq.get
        lock = self._lock
        while True:
            entry = get()
            if entry is _STOP:
                return
            key, item = entry
            if key is None:
                self._call(item)
                with lock:
                    self._finished()
                continue
            with lock:
                dq = self._queues[key]
                item = dq.popleft()
            budget = FAIRNESS_BATCH
            while True:
                self._call(item)
                with lock:
                    self._finished()
                    if not dq:
                        del self._queues[key]
                        break
                    budget -= 1
                    if budget <= 0:
                        self._runq.put((key, None))
                        break
                    item = dq.popleft()

    def nudge(self) -> None:
        """Have a reader waiting in :meth:`wait_below` check ``give_up`` again now."""
        with self._lock:
            self._idle.notify_all()

    def wait_below(self, mark: int, give_up: Callable[[], bool]) -> None:
        """Block until at most ``mark`` items are in flight, or ``give_up()`` says so
        (checked at least every half second)."""
        with self._lock:
            self._low_mark = mark
            try:
                while self._inflight > mark and not self._abandon and not give_up():
                    self._idle.wait(0.5)
            finally:
                self._low_mark = -1

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every submitted item finished (the caller's own item excepted)."""
        target = 1 if self.in_worker() else 0
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            while self._inflight > target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
            return True

    def stop(self, abandon: bool = False) -> None:
        """Let the workers exit; with ``abandon`` queued items are discarded."""
        if abandon:
            self._abandon = True
        for _ in self._threads:
            self._runq.put(_STOP)


class PyStrandsClient(ClientBase):
    """Threading backend client for the PyStrands broker (wire protocol v1, v2 when offered).

    Override :meth:`on_connection_request`, :meth:`on_new_connection`,
    :meth:`on_message`, :meth:`on_disconnect` and :meth:`on_error`; send with
    :meth:`send_room_message`, :meth:`send_private_message` and
    :meth:`broadcast_message` from any thread. Sending while disconnected never
    raises: the send is kept (up to ``max_buffered_sends``) and written once
    the connection is back. With a broker that has the ``rooms`` feature:
    :meth:`join_room`, :meth:`leave_room`, ``send_room_message(..., exclude=...)``,
    :meth:`send_user_message`, :meth:`disconnect_client` and the blocking queries
    :meth:`room_members` and :meth:`room_count` (``docs/broker.md``). With one that has
    the ``history`` feature: :meth:`room_config` and the blocking query :meth:`room_history`.

    Delivery: from a v1 broker every event arrives at most once. A v2 broker
    (negotiated automatically, see ``docs/protocol.md``) delivers **at least
    once**: events not yet acknowledged when a connection dies are delivered
    again (to this or another backend) with the same
    :attr:`Context.event_id` and :attr:`Context.redelivered` set, so handlers
    with effects that must not repeat can deduplicate on ``context.event_id``.
    An event is acknowledged once its handler returned or raised; events whose
    handlers :meth:`disconnect` abandons are not.

    Args:
        host: Broker host.
        port: Broker TCP port for backends.
        auto_reconnect: Reconnect with exponential backoff when the connection is
            lost (never after :meth:`disconnect`).
        reconnect_delay: First reconnect delay, seconds.
        max_reconnect_delay: Cap of the reconnect delay, seconds.
        reconnect_backoff: Multiplier applied to the delay after each failure.
        workers: Number of handler threads (keyword only).
        connect_timeout: Seconds allowed for one connect attempt: the TCP connect and,
            with ``ssl``, the TLS handshake (keyword only).
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
        max_pending: Received events not yet handled above which reading pauses
            until half of them are done (keyword only): the broker then holds
            the rest, and with an in-process backend stops reading the clients.
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

    _ack_delay = ACK_DELAY

    def __init__(
        self,
        host: str = "localhost",
        port: int = 8081,
        auto_reconnect: bool = True,
        reconnect_delay: float = 1.0,
        max_reconnect_delay: float = 30.0,
        reconnect_backoff: float = 2.0,
        *,
        workers: int = 16,
        connect_timeout: float = 10.0,
        max_line_size: int = DEFAULT_MAX_LINE_SIZE,
        backend_secret: str | None = None,
        max_buffered_sends: int = DEFAULT_MAX_BUFFERED_SENDS,
        buffer_policy: str = "drop_oldest",
        max_pending: int = 10_000,
        ssl: _ssl.SSLContext | bool | None = None,
        server_hostname: str | None = None,
    ) -> None:
        """Configure the client; nothing connects until :meth:`connect`/:meth:`run_forever`."""
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
        self.workers = max(1, int(workers))
        self._lifecycle = threading.RLock()
        self._disconnect_lock = threading.Lock()
        self._io = threading.Lock()  # guards the session and the links' I/O flags
        self._cond = threading.Condition(self._io)  # writer idle / ack due / link closed
        self._conn: _Link | None = None
        self._manager: threading.Thread | None = None
        self._pool: _KeyedWorkerPool | None = None
        self._disconnecting = False  # disconnect() is draining and closing the link
        # PyStrands 1.0: the Event run_forever() waits on and disconnect() sets.
        self._stop_event = threading.Event()
        self._wake = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def _arm(self) -> None:
        # caller holds self._lifecycle
        self._intentional_disconnect = False
        self._stop_event.clear()

    def _open(self, log: Callable[..., None]) -> _Link | None:
        if self._inproc is not None:
            try:
                return _Link(LinkSocket(self._inproc.attach()))
            except RuntimeError as exc:
                log("Cannot attach to the in-process broker: %s", exc)
                return None
        started = time.monotonic()
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            log("Cannot connect to the broker at %s:%s: %s", self.host, self.port, exc)
            return None
        _configure_socket(sock)
        if self.ssl is None:
            return _Link(sock)
        left = max(0.001, self.connect_timeout - (time.monotonic() - started))
        try:
            return _Link(TLSSocket.connect(sock, self.ssl, self._tls_hostname, left))
        except OSError as exc:  # ssl.SSLError (e.g. an untrusted certificate) is one
            sock.close()
            log("Cannot connect to the broker at %s:%s: TLS handshake failed: %s", self.host, self.port, exc)
            return None

    def _install(self, conn: _Link) -> None:
        """Make ``conn`` the current link (caller holds ``_lifecycle``); the caller then
        calls :meth:`_write` to send the hello and the kept sends."""
        if self._pool is None:
            self._pool = _KeyedWorkerPool(self.workers, self._handle)
        self._conn = conn
        self.connected = True
        logger.info("Connected to the broker at %s", self._where)
        with self._io:
            conn.number = self._session.connection_made()
            conn.sending = True  # claimed for the hello, written by the caller
            self._watch_hello(conn)

    def _watch_hello(self, conn: _Link) -> None:
        """Sends wait for the broker's hello answer: have the housekeeper release them at
        the session's deadline if it does not come (caller holds ``_io``)."""
        if self._session.hello_deadline and not conn.housekeeping and not conn.closed:
            conn.housekeeping = True
            threading.Thread(target=self._housekeep, args=(conn,), name="pystrands-v2", daemon=True).start()

    def _start_manager(self, conn: _Link | None) -> None:
        # caller holds self._lifecycle
        self._wake.clear()
        thread = threading.Thread(target=self._manage, args=(conn,), name="pystrands-reader", daemon=True)
        self._manager = thread
        thread.start()

    def connect(self) -> bool:
        """Connect to the broker and start reading.

        Returns:
            ``True`` if connected (or already connected), ``False`` if the attempt failed.
        """
        with self._lifecycle:
            if self.connected and self._conn is not None:
                return True
            if self._disconnecting:
                logger.warning("connect() called while disconnect() is closing the connection; not connecting")
                return False
            self._arm()
        conn = self._open(logger.error)
        if conn is None:
            return False
        with self._lifecycle:
            if self._intentional_disconnect:  # disconnect() was called meanwhile
                conn.sock.close()
                return False
            if self._conn is not None:  # someone else connected meanwhile
                conn.sock.close()
                return True
            self._install(conn)
            if self._manager is None:
                self._start_manager(conn)
            else:  # a reconnect loop is waiting: it adopts this connection
                self._wake.set()
        self._write(conn)
        return True

    def _manage(self, conn: _Link | None) -> None:
        """Reader thread: read the current connection, then reconnect as configured."""
        backoff = self._backoff()
        terminal = False
        while True:
            if conn is not None:
                self._read_loop(conn)
                self._lost(conn)
                # a refused hello keeps backing off; so does a TLS link that ended before the
                # broker said anything (it refused our certificate, the alert lost to a reset)
                if not conn.refused and (conn.heard or self.ssl is None):
                    backoff.reset()
                conn = None
            with self._lifecycle:
                if self._intentional_disconnect:
                    self._manager = None
                    break
                if self._conn is not None and not self._conn.closed:
                    conn = self._conn  # connect() installed one
                    continue
                if not self.auto_reconnect:
                    self._manager = None
                    terminal = True
                    break
            delay = backoff.next()
            logger.info("Reconnecting to %s in %.2fs", self._where, delay)
            if self._wake.wait(delay):
                self._wake.clear()
                continue
            new = self._open(logger.warning)
            if new is None:
                continue
            with self._lifecycle:
                if self._intentional_disconnect:
                    new.sock.close()
                    self._manager = None
                    break
                if self._conn is not None:
                    new.sock.close()
                    conn = self._conn
                    continue
                self._install(new)
                conn = new
            self._write(new)
        if terminal:
            logger.info("Connection lost and auto_reconnect is off; stopping")
            self._stop_event.set()

    def _read_loop(self, conn: _Link) -> None:
        recv = conn.sock.recv
        session = self._session
        io = self._io
        while True:
            try:
                data = recv(READ_CHUNK_SIZE)
            except _ssl.SSLError as exc:
                # e.g. the broker's alert refusing our client certificate, which TLS 1.3
                # sends after the handshake: keep backing off as after a failed connect (a TLS
                # error after the broker spoke is a broken link: reconnect as usual)
                if not conn.heard:
                    conn.refused = True
                if not conn.closing and not conn.closed:
                    logger.warning("TLS connection to the broker at %s failed: %s", self._where, exc)
                return
            except OSError as exc:
                if not conn.closing and not conn.closed:
                    logger.warning("Connection to the broker lost: %s", exc)
                return
            if not data:
                if not conn.closing:
                    logger.warning("The broker closed the connection")
                return
            conn.heard = True
            pool = self._pool
            if pool is None:  # pragma: no cover - disconnect raced us
                return
            with io:
                if conn.closed:
                    return
                events = session.receive_data(data)
                refused = session.refused
                start_v2 = session.acks is not None and not conn.housekeeping
                if start_v2:
                    conn.housekeeping = True
                write = not conn.sending and session.wants_write()
                if write:
                    conn.sending = True
                elif conn.hk_idle and session.acks is not None and session.acks.due:
                    conn.hk_idle = False  # a skipped seq made an ack due: the housekeeper times it
                    self._cond.notify_all()
            if write:
                self._write(conn)
            if refused:
                conn.refused = True
                conn.closing = True
                self._abort(conn)
                return
            if start_v2:
                threading.Thread(target=self._housekeep, args=(conn,), name="pystrands-v2", daemon=True).start()
            for event in events:
                pool.submit(event.key, (conn, event))
            if pool.inflight >= self.max_pending:  # handlers fell behind: stop reading for now
                # ... unless handlers wait for query replies, which only this thread can read
                pool.wait_below(
                    self.max_pending // 2,
                    lambda: conn.closed
                    or conn.closing
                    or (session.pending_queries > 0 and pool.inflight < 2 * self.max_pending),
                )

    def _housekeep(self, conn: _Link) -> None:
        """Per-connection v2 thread: writes delayed acks; closes the connection on silence;
        releases the sends that waited for a hello answer that did not come in time."""
        session = self._session
        cond = self._cond
        silent = False
        with cond:
            while not conn.closed:
                now = time.monotonic()
                if session.check_silence(now):
                    silent = True
                    break
                released = session.check_hello(now)  # no hello answer in time: sends go out
                ready = session.acks is not None and session.acks.due
                if (ready or released) and session.wants_write(now):
                    if conn.sending:  # the running write takes it along, or we get woken
                        cond.wait(ACK_DELAY)
                        continue
                    conn.sending = True
                    cond.release()
                    try:
                        self._write(conn)
                    finally:
                        cond.acquire()
                    continue
                conn.hk_idle = not ready
                deadline = session.next_deadline()
                cond.wait(None if deadline is None else min(max(0.0, deadline - now), threading.TIMEOUT_MAX))
                conn.hk_idle = False
        if silent and not conn.closing:
            conn.closing = True  # the reader ends quietly; reconnecting follows
            self._abort(conn)

    def _lost(self, conn: _Link) -> None:
        with self._io:  # nothing more is read from it: no query reply can come
            if self._session.link == conn.number:
                self._session.fail_queries("the connection to the broker ended before the reply")
        with self._lifecycle:
            if self._conn is conn:
                self.connected = False
                if self._disconnecting:
                    return  # disconnect() flushes and closes it after draining handlers
                self._abort(conn)  # the session's link ends before another can start
                self._conn = None
        self._close(conn)

    def disconnect(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly; no reconnect follows.

        Stops reading, waits up to ``timeout`` seconds for in-flight (and already
        received) events to be handled and their sends flushed, then closes the
        socket. Handlers still running after the deadline are abandoned (their
        later sends are kept for a later connection). Safe to call from a
        handler and more than once.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        with self._disconnect_lock:
            try:
                self._disconnect(deadline, timeout)
            finally:
                with self._lifecycle:
                    self._disconnecting = False

    def _disconnect(self, deadline: float, timeout: float) -> None:
        with self._lifecycle:
            self._intentional_disconnect = True
            self._disconnecting = True
            self.connected = False
            conn = self._conn
            manager = self._manager
            pool = self._pool
        self._wake.set()
        if conn is not None:
            conn.closing = True
            conn.shutdown(socket.SHUT_RD)  # a blocked recv returns EOF; writing goes on
        idle = True
        if pool is not None:
            idle = pool.wait_idle(deadline - time.monotonic())
            if not idle:
                logger.warning(
                    "disconnect: %d event(s) still being handled after %.1fs; force-closing",
                    pool.inflight,
                    timeout,
                )
        if conn is not None:
            with self._io:
                self._session.ack_now()  # acknowledge what was handled before closing (v2)
            self._kick(conn)
            if not self._flush(conn, deadline - time.monotonic()):
                logger.warning("disconnect: unsent data dropped after %.1fs", timeout)
            self._abort(conn)
        if manager is not None and manager is not threading.current_thread():
            try:
                manager.join(max(0.1, deadline - time.monotonic()))
            except RuntimeError:  # interrupted while it was being started
                pass
        if conn is not None:
            self._close(conn)
        with self._lifecycle:
            if self._conn is conn:
                self._conn = None
            if self._pool is pool:
                self._pool = None
        if pool is not None:
            pool.stop(abandon=not idle)
        if conn is not None:
            logger.info("Disconnected from the broker")
        self._stop_event.set()

    def run_forever(self) -> None:
        """Connect if needed and block until :meth:`disconnect` (or Ctrl-C).

        With ``auto_reconnect`` a failed first connect is retried with backoff;
        without it, a failed connect or a lost connection makes this return.
        """
        try:
            if not self.connected and not self.connect():
                with self._lifecycle:
                    give_up = self._intentional_disconnect or not self.auto_reconnect
                    if not give_up:
                        self._arm()
                        if self._manager is None and self._conn is None:
                            self._start_manager(None)
                if give_up:
                    logger.error("Not connected and auto_reconnect is off; run_forever returns")
                    return
            self._stop_event.wait()
        except KeyboardInterrupt:
            logger.info("Interrupted; disconnecting")
        finally:
            self.disconnect()

    # ------------------------------------------------------------------- writing

    def _write(self, conn: _Link) -> None:
        """Write what the session has queued until it has nothing more (the caller
        claimed ``conn.sending``); one ``sendall`` per round."""
        session = self._session
        cond = self._cond
        sendall = conn.sock.sendall
        while True:
            with cond:
                data = b"" if conn.closed or conn.number != session.link else session.data_to_send()
                if not data:
                    conn.sending = False
                    cond.notify_all()
                    return
            try:
                sendall(data)
            except OSError as exc:
                with cond:
                    conn.sending = False
                    cond.notify_all()
                # quiet when the reader already reported why the link ended (a refusal)
                log = logger.debug if conn.closing or conn.refused else logger.warning
                log("Send failed (%s); unsent frames are lost", exc)
                self._abort(conn)
                return

    def _kick(self, conn: _Link) -> None:
        """Write now if the session has output and no thread is writing."""
        with self._io:
            session = self._session
            if conn.sending or conn.closed or conn.number != session.link or not session.wants_write():
                return
            conn.sending = True
        self._write(conn)

    def _flush(self, conn: _Link, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until everything queued was written."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while not conn.closed and (conn.sending or self._session.wants_write()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return not conn.closed or not self._session.wants_write()

    def _abort(self, conn: _Link) -> None:
        """Stop writing to ``conn`` and shut both directions (wakes blocked calls)."""
        with self._cond:
            if not conn.closed:
                conn.closed = True
                if self._session.open and self._session.link == conn.number:
                    self._session.connection_lost(quiet=conn.closing)
                self._cond.notify_all()
        conn.shutdown(socket.SHUT_RDWR)

    def _close(self, conn: _Link) -> None:
        self._abort(conn)
        try:
            conn.sock.close()
        except OSError:  # pragma: no cover
            pass

    # ---------------------------------------------------------------------- sends

    def _submit(self, frame: bytes, what: str, link: int = 0) -> None:
        """Queue one frame (``link``: only for that link); the thread that finds
        the socket idle writes it."""
        with self._io:
            if not self._session.send(frame, what, link=link):
                return
            conn = self._conn
            if conn is None or conn.sending or conn.closed:
                return
            conn.sending = True
        self._write(conn)

    def _command(self, queue: Callable[[Session], bool]) -> None:
        """Queue a ``rooms`` command with the session (``queue`` checks and queues it;
        its errors propagate), then write as :meth:`_submit` does."""
        with self._io:
            session = self._session
            if not queue(session):
                conn = self._conn
                if conn is not None:
                    self._watch_hello(conn)
                return
            conn = self._conn
            if conn is None or conn.sending or conn.closed:
                return
            conn.sending = True
        self._write(conn)

    def _ask(self, start: Callable[[Session, Callable[[], None]], Query[T]]) -> T:
        """Run a query: register it with the session, write it, block until the reply
        (or the deadline, or the connection's end)."""
        if threading.current_thread() is self._manager:
            raise RuntimeError(
                "queries (room_members(), room_count(), room_history()) cannot run on the client's reader thread: "
                "it would wait for a reply only that thread can read"
            )
        answered = threading.Event()
        with self._io:
            if not self.connected or self._disconnecting:
                raise BrokerUnavailable(f"not connected to the broker at {self._where}")
            session = self._session
            query = start(session, answered.set)
            conn = self._conn
            write = conn is not None and not conn.sending and not conn.closed and session.wants_write()
            if conn is not None:
                if write:
                    conn.sending = True
                self._watch_hello(conn)
        if write and conn is not None:
            self._write(conn)
        pool = self._pool
        if pool is not None:
            pool.nudge()  # a reader paused for backpressure reads on while the query waits
        if not answered.wait(query.timeout):
            with self._io:
                if not query.done:
                    raise self._session.query_timed_out(query)
        return query.result()

    def broadcast_message(self, message: str) -> None:
        """Send ``message`` to every connected WebSocket client."""
        self._submit(self._session.encoders.broadcast(message), "broadcast")

    def send_room_message(self, room_id: str, message: str, exclude: str | Iterable[str] | None = None) -> None:
        """Send ``message`` to every client in room ``room_id``.

        ``exclude``: a client id, or several, that must not get it (e.g. the sender;
        needs a broker with the ``rooms`` feature, see :meth:`join_room` for the
        errors). Without it (or with none to exclude) this is the 1.0 send.
        """
        if exclude is None:
            self._submit(self._session.encoders.room(room_id, message), "message_to_room")
        else:
            self._command(lambda s: s.room_message(room_id, message, exclude))

    def send_private_message(self, client_id: str, message: str) -> None:
        """Send ``message`` to the client ``client_id`` only."""
        self._submit(self._session.encoders.private(client_id, message), "message_to_connection")

    # ------------------------------------------------- rooms, users and moderation

    def join_room(self, client_id: str, room_id: str) -> None:
        """Add the connection ``client_id`` to the room ``room_id`` (it stays in its others).

        Needs a broker with the ``rooms`` feature. Raises ``TypeError`` for a non-str id,
        ``ValueError`` for an empty one or a room id longer than the broker's
        ``max_id_length``, :class:`~pystrands.UnsupportedFeature` when the connected
        broker lacks the feature. An unknown client is not an error (the broker ignores
        it). While disconnected it is kept like any send (and dropped, logged, if the
        next broker lacks the feature). A refusal by the broker (e.g. beyond
        ``max_rooms_per_client``) is logged as a warning.
        """
        self._command(lambda s: s.join_room(client_id, room_id))

    def leave_room(self, client_id: str, room_id: str) -> None:
        """Remove the connection ``client_id`` from the room ``room_id`` (its first room too).

        Errors and buffering as :meth:`join_room`.
        """
        self._command(lambda s: s.leave_room(client_id, room_id))

    def send_user_message(self, user_id: str, message: str) -> None:
        """Send ``message`` to every connection of the user ``user_id``, on every node.

        A connection has a user id when ``on_connection_request`` set
        ``request.context.user_id``. Errors and buffering as :meth:`join_room`.
        """
        self._command(lambda s: s.user_message(user_id, message))

    def disconnect_client(self, client_id: str, code: int = 1000, reason: str = "") -> None:
        """Close the WebSocket of ``client_id`` with close ``code`` and ``reason``.

        ``code`` must be 1000 or 4000-4999 and ``reason`` at most 123 UTF-8 bytes
        (``ValueError`` otherwise). The client's backend then gets ``on_disconnect``
        as for any close. Other errors and buffering as :meth:`join_room`.
        """
        self._command(lambda s: s.disconnect_client(client_id, code, reason))

    def room_members(self, room_id: str, timeout: float = DEFAULT_QUERY_TIMEOUT) -> list[Context]:
        """The contexts of every member of ``room_id``, on every live broker node.

        Blocks the calling thread (call it from handlers, which run on worker
        threads) for at most ``timeout`` seconds. Raises
        :class:`~pystrands.BrokerUnavailable` when not connected or when the
        connection ends before the reply, :class:`~pystrands.QueryTimeout` after
        ``timeout``, :class:`~pystrands.QueryError` when the broker answers with an
        error, :class:`~pystrands.UnsupportedFeature` when the broker lacks the
        ``rooms`` feature, and ``TypeError``/``ValueError`` for a bad ``room_id`` or
        ``timeout``. When a node did not answer in time the members of the others are
        returned and a warning names the missing nodes.
        """
        return self._ask(lambda s, done: s.query_room_members(room_id, timeout, done))

    def room_count(self, room_id: str, timeout: float = DEFAULT_QUERY_TIMEOUT) -> int:
        """How many connections are in ``room_id`` on every live broker node.

        Answered from each node's last presence report (at most about a second old).
        Blocking and errors as :meth:`room_members`.
        """
        return self._ask(lambda s, done: s.query_room_count(room_id, timeout, done))

    # ------------------------------------------------- history and room settings

    def room_config(
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
        self._command(
            lambda s: s.room_config(room_id, history_size=history_size, history_ttl=history_ttl, presence=presence)
        )

    def room_history(
        self, room_id: str, since: int = 0, limit: int | None = None, timeout: float = DEFAULT_QUERY_TIMEOUT
    ) -> RoomHistory:
        """The messages of ``room_id`` after offset ``since`` (an int >= 0), oldest first: the
        newest ``limit`` of them (an int 1-100000; ``None``: all the broker keeps).

        Returns a :class:`~pystrands.RoomHistory`: the room's ``epoch`` and last ``offset``,
        the ``messages`` (:class:`~pystrands.HistoryMessage` ``(offset, data)``) and
        ``complete``, false when messages after ``since`` are missing (evicted, or left out
        by ``limit``). A room without history answers ``RoomHistory("", 0, [], True)``.

        Needs a broker with the ``history`` feature. Blocking and errors as
        :meth:`room_members` (:class:`~pystrands.UnsupportedFeature` when the broker lacks
        ``history``), plus ``TypeError``/``ValueError`` for a bad ``since`` or ``limit``.
        """
        return self._ask(lambda s, done: s.query_room_history(room_id, since, limit, timeout, done))

    # ------------------------------------------------------------------- dispatch

    def _handle(self, item: tuple[_Link, Event]) -> None:
        conn, event = item
        name, call, args = self._route(event)
        try:
            result = call(*args)
        except Exception as exc:
            if type(event) is ConnectionRequest:
                self._submit(encode_reject(event.request_id), REPLY, conn.number)
                self._handler_failed(name, exc, event.request.context)
            elif type(event) is ErrorEvent:  # reporting the failure would call on_error again
                logger.exception("on_error raised")
            else:
                self._handler_failed(name, exc, event.context)  # type: ignore[attr-defined]
        else:
            if type(event) is ConnectionRequest:
                self._submit(response_for(event.request_id, result, event.request), REPLY, conn.number)
        finally:
            if event.seq:  # v2: handled (returned or raised) -> acknowledgeable
                with self._io:
                    if self._session.event_done(conn.number, event.seq) and conn.hk_idle:
                        conn.hk_idle = False
                        self._cond.notify_all()

    def _handler_failed(self, name: str, exc: Exception, context: Context) -> None:
        logger.error("%s raised for client %r", name, context.client_id, exc_info=exc)
        try:
            self.on_error(str(exc), context)
        except Exception:
            logger.exception("on_error raised while reporting an error")

    # ------------------------------------------------------------------ callbacks

    def on_connection_request(self, request: ConnectionRequestContext) -> bool | None:
        """Decide whether to accept a WebSocket connection (default: accept).

        Set ``request.context.room_id`` / ``client_id`` / ``metadata`` as needed and
        return ``True`` or ``False``; returning anything else uses
        ``request.accepted``. An exception rejects the connection.
        """
        return self._default_connection_request(request)

    def on_new_connection(self, context: Context) -> None:
        """Called when a WebSocket client has connected."""
        self._default_new_connection(context)

    def on_message(self, message: str, context: Context) -> None:
        """Called for every message a WebSocket client sends."""
        self._default_message(message, context)

    def on_disconnect(self, context: Context) -> None:
        """Called when a WebSocket client has disconnected."""
        self._default_disconnect(context)

    def on_error(self, error: str, context: Context) -> None:
        """Called for broker error events and for exceptions raised by handlers."""
        self._default_error(error, context)
