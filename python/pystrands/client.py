"""Threading PyStrands backend client.

Subclass :class:`PyStrandsClient`, override the ``on_*`` callbacks and call
:meth:`PyStrandsClient.run_forever`::

    class ChatBackend(PyStrandsClient):
        def on_message(self, message, context):
            self.send_room_message(context.room_id, f"echo: {message}")

    ChatBackend(host="localhost", port=8081).run_forever()

Threads: one reader thread per client does blocking ``recv`` calls (no polling
timeouts), splits lines and decodes events; a bounded pool of worker threads runs
the callbacks. Events of one WebSocket client (same ``client_id``) are handled one
after the other, in arrival order; events of different clients run concurrently,
so a slow handler only delays its own client. Connection requests run on any free
worker. Writes from any thread are coalesced: whichever thread finds the socket
idle sends everything queued so far with one ``sendall``.

Protocol v2 (``docs/protocol.md``): every connection opens with a ``hello``
(carrying ``backend_secret`` when one is configured); reading does not wait for
the answer. When a v2 broker accepts it, the client acknowledges handled events
cumulatively, answers heartbeats, and treats 3 heartbeat intervals of silence
from the broker as a dead connection. A small per-connection housekeeping thread
sends the due ``ack`` :data:`~pystrands._protocol.ACK_DELAY` after it became due
(inside the running ``sendall`` when there is one), so there is at most one ack
per ``ACK_DELAY`` whatever the event rate, and does the silence check; it sleeps
until there is work. Delivery from a v2 broker is at least once: see
:attr:`Context.event_id`.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ._protocol import (
    ACK_DELAY,
    DEFAULT_MAX_LINE_SIZE,
    HEARTBEAT_REPLY,
    READ_CHUNK_SIZE,
    SILENCE_FACTOR,
    AckTracker,
    Backoff,
    ConnectionRequest,
    Disconnected,
    DropTracker,
    ErrorEvent,
    Event,
    Heartbeat,
    HelloReply,
    LineFramer,
    NewConnection,
    NewMessage,
    Skipped,
    decode_event,
    encode_ack,
    encode_broadcast,
    encode_hello,
    encode_private_message,
    encode_reject,
    encode_room_message,
    log_refusal,
    resolve_backend_secret,
    response_for,
)
from .context import ConnectionRequestContext, Context

logger = logging.getLogger("pystrands.client")

__all__ = ["PyStrandsClient"]

_FAIRNESS_BATCH = 64  # events of one client handled before other clients get a turn


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


class _Connection:
    """One broker connection: the socket, its coalescing writer and its v2 state.

    v2 state (``acks`` is ``None`` while the session is v1): the acknowledgement
    tracker, guarded by the writer lock, and the silence limit. The housekeeping
    thread (:meth:`housekeep`) sends the due ack ``ACK_DELAY`` after it became
    due, in the running ``sendall`` if there is one (so at most one ack per
    ``ACK_DELAY``, never a syscall per event), and watches for silence.
    """

    __slots__ = (
        "sock",
        "_lock",
        "_cond",
        "_tick",
        "_pending",
        "_sending",
        "_closed",
        "closing",
        "acks",
        "_ack_now",
        "_hk_idle",
        "last_read",
        "silence_limit",
        "refused",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # writer idle (flush waits)
        self._tick = threading.Condition(self._lock)  # wakes the housekeeping thread
        self._pending: list[bytes] = []
        self._sending = False
        self._closed = False  # no further writes accepted
        self.closing = False  # an intentional close is under way (quieter logs)
        self.acks: AckTracker | None = None  # set when the broker accepted our hello
        self._ack_now = False  # the next pump iteration appends the due ack
        self._hk_idle = False  # housekeeper waits for an ack to become due
        self.last_read = time.monotonic()
        self.silence_limit = 0.0
        self.refused = False  # the broker refused our hello

    @property
    def writable(self) -> bool:
        return not self._closed

    @property
    def v2(self) -> bool:
        """True once the broker accepted our hello on this connection."""
        return self.acks is not None

    def write(self, data: bytes) -> bool:
        """Queue ``data``; send it now unless another thread is sending.

        Returns ``False`` if the connection no longer accepts writes.
        """
        with self._lock:
            if self._closed:
                return False
            self._pending.append(data)
            if self._sending:
                return True
            self._sending = True
        self._pump()
        return True

    def _pump(self) -> None:
        """Send queued data (and a due ack) until there is none (called by the sending thread)."""
        sendall = self.sock.sendall
        while True:
            with self._lock:
                chunks = self._pending
                if self._ack_now:
                    self._ack_now = False
                    acks = self.acks
                    if acks is not None and acks.watermark > acks.sent:
                        chunks.append(encode_ack(acks.take()))
                if not chunks:
                    self._sending = False
                    self._cond.notify_all()
                    return
                self._pending = []
            try:
                sendall(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            except OSError as exc:
                with self._lock:
                    lost = len(chunks) + len(self._pending)
                    self._pending = []
                    self._closed = True
                    self._sending = False
                    self._cond.notify_all()
                    self._tick.notify_all()
                log = logger.debug if self.closing else logger.warning
                log("Send failed (%s); %d frame(s) lost", exc, lost)
                self.abort()
                return

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until everything queued was sent."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            while (self._pending or self._sending) and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return not self._pending

    # -- v2 ---------------------------------------------------------------------

    def start_v2(self, heartbeat_interval: float) -> bool:
        """Switch this connection to v2; ``False`` if it already was."""
        with self._lock:
            if self.acks is not None:
                return False
            self.acks = AckTracker()
            self.silence_limit = SILENCE_FACTOR * heartbeat_interval
            return True

    def track(self, seq: int) -> bool:
        """Record that event ``seq`` goes to a handler; ``False``: do not acknowledge it."""
        with self._lock:
            acks = self.acks
            return acks is not None and acks.dispatch(seq)

    def complete(self, seq: int) -> None:
        """Record that the handler of event ``seq`` finished (returned or raised)."""
        with self._lock:
            acks = self.acks
            if acks is None or self._closed or not acks.done(seq):
                return
            if self._hk_idle:
                self._hk_idle = False
                self._tick.notify()

    def skip(self, seq: int) -> None:
        """Record a ``seq`` no handler sees (it counts as handled)."""
        with self._lock:
            acks = self.acks
            if acks is None or self._closed or not acks.skip(seq):
                return
            if self._hk_idle:
                self._hk_idle = False
                self._tick.notify()

    def flush_ack(self) -> None:
        """Send the due ack now (with anything queued, or in the running send)."""
        with self._lock:
            acks = self.acks
            if acks is None or self._closed or acks.watermark <= acks.sent:
                return
            self._ack_now = True
            if self._sending:
                return  # the running send appends it before it stops
            self._sending = True
        self._pump()

    def answer_heartbeat(self) -> None:
        """Queue a heartbeat reply; the due ack, if any, goes in the same send."""
        with self._lock:
            if self._closed:
                return
            self._pending.append(HEARTBEAT_REPLY)
            self._ack_now = True
            if self._sending:
                return
            self._sending = True
        self._pump()

    def housekeep(self) -> bool:
        """v2 housekeeping thread body: delayed acks and the silence watchdog.

        Sleeps until an ack becomes due, then sends it ``ACK_DELAY`` later
        (appended to the running send, or by itself), covering every
        completion of that period; or until the silence limit could be
        reached. Returns ``True`` if the broker was silent for
        ``silence_limit`` seconds, ``False`` once the connection is closed.
        """
        lock = self._lock
        tick = self._tick
        acks = self.acks
        assert acks is not None
        limit = self.silence_limit
        ack_at = 0.0
        lock.acquire()
        try:
            while not self._closed:
                now = time.monotonic()
                if limit and now - self.last_read >= limit:
                    return True
                timeout: float | None = None
                if acks.watermark > acks.sent:
                    if not ack_at:
                        ack_at = now + ACK_DELAY
                    elif now >= ack_at:
                        ack_at = 0.0
                        self._ack_now = True
                        if not self._sending:  # else the running send appends the ack
                            self._sending = True
                            lock.release()
                            try:
                                self._pump()
                            finally:
                                lock.acquire()
                        continue
                    timeout = ack_at - now
                else:
                    ack_at = 0.0
                    self._hk_idle = True
                if limit:
                    silent_in = self.last_read + limit - now
                    timeout = silent_in if timeout is None else min(timeout, silent_in)
                tick.wait(timeout)
                self._hk_idle = False
            return False
        finally:
            self._hk_idle = False
            lock.release()

    # -- closing ----------------------------------------------------------------

    def close_writes(self) -> None:
        """Refuse further writes (queued data is dropped if not yet sent)."""
        with self._lock:
            self._closed = True
            self._pending = []
            self._tick.notify_all()

    def shutdown_read(self) -> None:
        """Stop reading: a blocked ``recv`` returns EOF; writing still works."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def abort(self) -> None:
        """Shut both directions down (wakes blocked ``recv``/``sendall`` calls)."""
        self.close_writes()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Abort and release the socket."""
        self.abort()
        try:
            self.sock.close()
        except OSError:  # pragma: no cover
            pass


_STOP = object()


class _KeyedWorkerPool:
    """Fixed pool of threads running items; items with the same key run in order.

    Each key with pending work owns a deque and has exactly one entry in the shared
    run queue (or is being run); any free worker picks the next entry. Keyless
    items (connection requests) are independent entries. After ``_FAIRNESS_BATCH``
    items of one key the worker requeues the key so other keys get a turn.
    """

    def __init__(self, size: int, run: Callable[[Any], None], name: str = "pystrands-worker") -> None:
        self._run = run
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queues: dict[str, deque[Any]] = {}
        self._runq: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._inflight = 0
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
        if self._inflight <= 1:
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
            budget = _FAIRNESS_BATCH
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


class PyStrandsClient:
    """Threading backend client for the PyStrands broker (wire protocol v1, v2 when offered).

    Override :meth:`on_connection_request`, :meth:`on_new_connection`,
    :meth:`on_message`, :meth:`on_disconnect` and :meth:`on_error`; send with
    :meth:`send_room_message`, :meth:`send_private_message` and
    :meth:`broadcast_message` from any thread. Sending while disconnected never
    raises: the send is dropped, counted, and logged once per disconnected period.

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
        connect_timeout: Seconds allowed for one TCP connect attempt (keyword only).
        max_line_size: Largest inbound frame in bytes; larger ones are dropped
            with a warning (keyword only).
        backend_secret: Shared secret sent in the ``hello`` on every connection,
            for a broker started with a ``backend_secret`` (keyword only).
            ``None`` reads ``$PYSTRANDS_BACKEND_SECRET``; empty means none. It is
            never logged.
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
        workers: int = 16,
        connect_timeout: float = 10.0,
        max_line_size: int = DEFAULT_MAX_LINE_SIZE,
        backend_secret: str | None = None,
    ) -> None:
        """Configure the client; nothing connects until :meth:`connect`/:meth:`run_forever`."""
        self.host = host
        self.port = port
        self.connected = False
        self.auto_reconnect = auto_reconnect
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.reconnect_backoff = reconnect_backoff
        self.workers = max(1, int(workers))
        self.connect_timeout = connect_timeout
        self.max_line_size = max_line_size
        self._backend_secret = resolve_backend_secret(backend_secret)

        self._lifecycle = threading.RLock()
        self._disconnect_lock = threading.Lock()
        self._conn: _Connection | None = None
        self._manager: threading.Thread | None = None
        self._pool: _KeyedWorkerPool | None = None
        self._stopping = False
        self._done = threading.Event()
        self._wake = threading.Event()
        self._drops = DropTracker(logger)

    # ------------------------------------------------------------------ lifecycle

    def _ensure_session(self) -> None:
        # caller holds self._lifecycle
        self._stopping = False
        self._done.clear()

    def _open(self, log: Callable[..., None]) -> _Connection | None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            log("Cannot connect to the broker at %s:%s: %s", self.host, self.port, exc)
            return None
        _configure_socket(sock)
        conn = _Connection(sock)
        # The hello goes first on every connection; nobody waits for its answer.
        conn.write(encode_hello(self._backend_secret))
        return conn

    @property
    def protocol_version(self) -> int:
        """Protocol of the current connection: ``2`` once the broker accepted our hello, else ``1``."""
        conn = self._conn
        return 2 if conn is not None and conn.v2 else 1

    def _install(self, conn: _Connection) -> None:
        # caller holds self._lifecycle
        if self._pool is None:
            self._pool = _KeyedWorkerPool(self.workers, self._handle)
        self._conn = conn
        self.connected = True
        logger.info("Connected to the broker at %s:%s", self.host, self.port)
        self._drops.connected()

    def _start_manager(self, conn: _Connection | None) -> None:
        # caller holds self._lifecycle
        self._wake.clear()
        thread = threading.Thread(
            target=self._manage, args=(conn,), name="pystrands-reader", daemon=True
        )
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
            self._ensure_session()
        conn = self._open(logger.error)
        if conn is None:
            return False
        with self._lifecycle:
            if self._stopping:  # disconnect() was called meanwhile
                conn.close()
                return False
            if self._conn is not None:  # someone else connected meanwhile
                conn.close()
                return True
            self._install(conn)
            if self._manager is None:
                self._start_manager(conn)
            else:  # a reconnect loop is waiting: it adopts this connection
                self._wake.set()
        return True

    def _manage(self, conn: _Connection | None) -> None:
        """Reader thread: read the current connection, then reconnect as configured."""
        backoff = Backoff(self.reconnect_delay, self.reconnect_backoff, self.max_reconnect_delay)
        terminal = False
        while True:
            if conn is not None:
                self._read_loop(conn)
                self._lost(conn)
                if not conn.refused:  # a refused hello keeps backing off
                    backoff.reset()
                conn = None
            with self._lifecycle:
                if self._stopping:
                    self._manager = None
                    break
                if self._conn is not None:
                    conn = self._conn  # connect() installed one
                    continue
                if not self.auto_reconnect:
                    self._manager = None
                    terminal = True
                    break
            delay = backoff.next()
            logger.info("Reconnecting to %s:%s in %.2fs", self.host, self.port, delay)
            if self._wake.wait(delay):
                self._wake.clear()
                continue
            new = self._open(logger.warning)
            if new is None:
                continue
            with self._lifecycle:
                if self._stopping:
                    new.close()
                    self._manager = None
                    break
                if self._conn is not None:
                    new.close()
                    conn = self._conn
                else:
                    self._install(new)
                    conn = new
        if terminal:
            logger.info("Connection lost and auto_reconnect is off; stopping")
            self._done.set()

    def _read_loop(self, conn: _Connection) -> None:
        framer = LineFramer(self.max_line_size)
        recv = conn.sock.recv
        feed = framer.feed
        decode = decode_event
        monotonic = time.monotonic
        while True:
            try:
                data = recv(READ_CHUNK_SIZE)
            except OSError as exc:
                if not conn.closing and conn.writable:
                    logger.warning("Connection to the broker lost: %s", exc)
                return
            if not data:
                if not conn.closing:
                    logger.warning("The broker closed the connection")
                return
            conn.last_read = monotonic()
            pool = self._pool
            if pool is None:  # pragma: no cover - disconnect raced us
                return
            for line in feed(data):
                event = decode(line)
                if event is None:
                    continue
                if event.control:
                    if not self._control(conn, event):
                        return
                    continue
                if event.seq and not conn.track(event.seq):
                    event.seq = 0  # v1 session or out of order: never acknowledged
                pool.submit(event.key, (conn, event))

    def _control(self, conn: _Connection, event: Event) -> bool:
        """Handle a control frame on the reader thread; ``False`` stops reading."""
        if isinstance(event, Heartbeat):
            if conn.v2:
                conn.answer_heartbeat()
        elif isinstance(event, Skipped):
            conn.skip(event.seq)
        elif isinstance(event, HelloReply):
            if not event.ok:
                log_refusal(logger, event, f"{self.host}:{self.port}")
                conn.refused = True
                conn.closing = True
                conn.abort()
                return False
            if conn.start_v2(event.heartbeat_interval):
                logger.info(
                    "Protocol v2 with the broker (acks, heartbeats every %ss)",
                    event.heartbeat_interval or "?",
                )
                threading.Thread(
                    target=self._housekeep, args=(conn,), name="pystrands-v2", daemon=True
                ).start()
        return True

    def _housekeep(self, conn: _Connection) -> None:
        """Per-connection v2 thread: delayed acks; closes the connection on silence."""
        try:
            silent = conn.housekeep()
        except Exception:  # pragma: no cover - defensive: never die silently
            logger.exception("v2 housekeeping failed")
            return
        if silent and not conn.closing:
            logger.warning(
                "Nothing received from the broker for %.1fs (3 heartbeat intervals); "
                "closing the connection",
                conn.silence_limit,
            )
            conn.closing = True  # the reader ends quietly; reconnecting follows
            conn.abort()

    def _lost(self, conn: _Connection) -> None:
        with self._lifecycle:
            if self._stopping:
                return  # disconnect() closes it after draining handlers
            if self._conn is conn:
                self._conn = None
                self.connected = False
        conn.close()

    def disconnect(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly; no reconnect follows.

        Stops reading, waits up to ``timeout`` seconds for in-flight (and already
        received) events to be handled and their sends flushed, then closes the
        socket. Handlers still running after the deadline are abandoned (their
        later sends are dropped). Safe to call from a handler and more than once.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        with self._disconnect_lock:
            with self._lifecycle:
                self._stopping = True
                self.connected = False
                conn = self._conn
                manager = self._manager
                pool = self._pool
            self._wake.set()
            if conn is not None:
                conn.closing = True
                conn.shutdown_read()
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
                conn.flush_ack()  # acknowledge what was handled before closing (v2)
            if conn is not None and not conn.flush(deadline - time.monotonic()):
                logger.warning("disconnect: unsent data dropped after %.1fs", timeout)
            if conn is not None:
                conn.abort()
            if manager is not None and manager is not threading.current_thread():
                try:
                    manager.join(max(0.1, deadline - time.monotonic()))
                except RuntimeError:  # interrupted while it was being started
                    pass
            if conn is not None:
                conn.close()
            with self._lifecycle:
                if self._conn is conn:
                    self._conn = None
                if self._pool is pool:
                    self._pool = None
            if pool is not None:
                pool.stop(abandon=not idle)
            if conn is not None:
                logger.info("Disconnected from the broker")
            self._done.set()

    def run_forever(self) -> None:
        """Connect if needed and block until :meth:`disconnect` (or Ctrl-C).

        With ``auto_reconnect`` a failed first connect is retried with backoff;
        without it, a failed connect or a lost connection makes this return.
        """
        try:
            if not self.connected and not self.connect():
                with self._lifecycle:
                    give_up = self._stopping or not self.auto_reconnect
                    if not give_up:
                        self._ensure_session()
                        if self._manager is None and self._conn is None:
                            self._start_manager(None)
                if give_up:
                    logger.error("Not connected and auto_reconnect is off; run_forever returns")
                    return
            self._done.wait()
        except KeyboardInterrupt:
            logger.info("Interrupted; disconnecting")
        finally:
            self.disconnect()

    # ---------------------------------------------------------------------- sends

    def _send(self, data: bytes, what: str) -> None:
        conn = self._conn
        if conn is None or not conn.write(data):
            self._drops.drop(what)

    def broadcast_message(self, message: str) -> None:
        """Send ``message`` to every connected WebSocket client."""
        self._send(encode_broadcast(message), "broadcast")

    def send_room_message(self, room_id: str, message: str) -> None:
        """Send ``message`` to every client in room ``room_id``."""
        self._send(encode_room_message(room_id, message), "message_to_room")

    def send_private_message(self, client_id: str, message: str) -> None:
        """Send ``message`` to the client ``client_id`` only."""
        self._send(encode_private_message(client_id, message), "message_to_connection")

    @property
    def dropped_sends(self) -> int:
        """Sends dropped because the client was not connected (since creation)."""
        return self._drops.total_dropped

    # ------------------------------------------------------------------- dispatch

    def _handle(self, item: tuple[_Connection, Event]) -> None:
        conn, event = item
        try:
            if isinstance(event, NewMessage):
                try:
                    self.on_message(event.message, event.context)
                except Exception as exc:
                    self._handler_failed("on_message", exc, event.context)
            elif isinstance(event, ConnectionRequest):
                self._decide(conn, event)
            elif isinstance(event, NewConnection):
                try:
                    self.on_new_connection(event.context)
                except Exception as exc:
                    self._handler_failed("on_new_connection", exc, event.context)
            elif isinstance(event, Disconnected):
                try:
                    self.on_disconnect(event.context)
                except Exception as exc:
                    self._handler_failed("on_disconnect", exc, event.context)
            elif isinstance(event, ErrorEvent):
                try:
                    self.on_error(event.error, event.context)
                except Exception:
                    logger.exception("on_error raised")
        finally:
            if event.seq:  # v2: handled (returned or raised) -> acknowledgeable
                conn.complete(event.seq)

    def _decide(self, conn: _Connection, event: ConnectionRequest) -> None:
        request = event.request
        try:
            result = self.on_connection_request(request)
        except Exception as exc:
            self._reply(conn, encode_reject(event.request_id))
            self._handler_failed("on_connection_request", exc, request.context)
            return
        self._reply(conn, response_for(event.request_id, result, request))

    def _reply(self, conn: _Connection, data: bytes) -> None:
        if not conn.write(data):
            self._drops.drop("response to a connection request")

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
        logger.debug(
            "Connection request %s -> room %s", request.context.client_id, request.context.room_id
        )
        return True

    def on_new_connection(self, context: Context) -> None:
        """Called when a WebSocket client has connected."""
        logger.debug("New connection %s in room %s", context.client_id, context.room_id)

    def on_message(self, message: str, context: Context) -> None:
        """Called for every message a WebSocket client sends."""
        logger.debug("Message from %s in room %s", context.client_id, context.room_id)

    def on_disconnect(self, context: Context) -> None:
        """Called when a WebSocket client has disconnected."""
        logger.debug("Client %s left room %s", context.client_id, context.room_id)

    def on_error(self, error: str, context: Context) -> None:
        """Called for broker error events and for exceptions raised by handlers."""
        logger.error("Error for client %s: %s", context.client_id, error)
