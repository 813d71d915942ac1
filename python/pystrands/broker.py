"""The native broker, run from Python.

`Broker` is a thin wrapper over the Rust core (`pystrands._core`): it passes the settings through
(validation happens in the core, so the CLI, this class and the Rust tests share one set of rules),
starts the broker in background threads with the GIL released, and owns signal handling and waiting.
With ``backend=`` it also hosts the application's handlers in this process (`pystrands._hosted`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from . import _logbridge

if TYPE_CHECKING:
    from ._hosted import Backend, Hosted

logger = logging.getLogger("pystrands.broker")

__all__ = ["Broker"]


class Broker:
    """A PyStrands broker: WebSocket clients on ``ws_port``, Python backends on ``tcp_port``.

    Every argument is a setting of the native core; invalid values raise :class:`ValueError`
    naming the setting. Port 0 picks a free port; after :meth:`start` the :attr:`ws_port` and
    :attr:`tcp_port` properties give the ports actually bound.

    Args:
        host: Interface for both listeners (unless ``ws_host``/``tcp_host`` are given).
        ws_port: WebSocket port.
        tcp_port: Backend (TCP) port. Keep it private, it is a control plane.
        queue_size: Events kept while no backend is connected (drop-oldest; 0 disables).
        ws_host: Interface of the WebSocket listener.
        tcp_host: Interface of the backend listener.
        request_timeout: Seconds a connection request may wait for a backend (then HTTP 503).
        heartbeat_interval: Seconds between heartbeats to backends.
        ping_interval: Seconds between WebSocket pings; a client silent for two intervals is
            closed. 0 disables pings.
        max_message_size: Largest client message in bytes (close 1009 beyond it).
        max_line_size: Largest backend line in bytes (discarded and logged beyond it).
        client_queue_size: Messages that may wait for one client before the slow-client policy
            applies.
        slow_client_policy: ``"close"`` (close code 1013) or ``"drop"`` (drop and count).
        allowed_origins: Allowed ``Origin`` values; empty allows all.
        max_connections: Most simultaneous clients (0: no limit); beyond it HTTP 503.
        handshake_timeout: Seconds a client may take to send its upgrade request.
        workers: Native worker threads (0: one per CPU).
        log_level: ``error``, ``warn``, ``info``, ``debug`` or ``trace``: the most verbose native
            records kept (for the whole process). They are emitted through :mod:`logging` on
            ``pystrands.broker.*`` loggers, whose levels and handlers filter further.
        backend_secret: When set, a backend must present it in its protocol-v2 ``hello``
            (our clients' ``backend_secret`` argument) before anything it sends is accepted;
            PyStrands 1.0 backends cannot and are refused. Without it, anyone who reaches
            ``tcp_port`` controls the broker: keep that port private or set a secret.
        max_unacked: Events kept per v2 backend until it acknowledges them, for redelivery if
            it dies (the oldest beyond it are released, counted in ``unacked_overflow``).
        client_rate_limit: Messages per second one WebSocket client may send (token bucket;
            0 disables).
        client_rate_burst: Burst allowed by the rate limit (0: one second's worth).
        rate_limit_policy: ``"drop"`` (drop and count in ``rate_limited``) or ``"close"``
            (close code 1008).
        cluster_url: Redis URL (e.g. ``redis://127.0.0.1:6379/0``) of the cluster this broker
            joins: clients on any node receive what backends on any node send. ``None`` (the
            default) runs alone, with no Redis connection. See ``docs/deployment.md``.
        cluster_required: With ``cluster_url``: if Redis cannot be reached at start, fail with
            :class:`ConnectionError` (True, the default), or start with local delivery only
            and keep retrying (False). Losing Redis later never stops the broker.
        cluster_name: Prefix of the cluster's Redis keys and channel, so several clusters can
            share one Redis server.
        cluster_node_id: This node's id (unique per running broker); ``None`` picks a random one.
        inproc_queue_size: Events waiting for an in-process backend above which the broker stops
            reading the WebSocket clients feeding it until it catches up (backpressure, no loss).
        max_rooms_per_client: Rooms one connection may be in at once (its first room included);
            a ``join_room`` beyond it is refused and reported to the backend.
        max_id_length: Longest room or user id (bytes) a backend may set or name (client ids
            are not limited).
        metrics_bind: ``"host:port"`` of a separate listener for ``/health``, ``/ready``,
            ``/metrics``, ``/stats`` and ``/admin``; ``None`` serves them on the WebSocket port.
        admin_token: Token of the live admin page ``GET /admin``; ``None`` turns it off.
        history_size: Messages kept per room for recovery after a reconnect (browser protocol
            ``pystrands.1``) and for ``room_history``; 0 keeps none (``room_config`` sets it
            per room).
        history_ttl: Seconds a room's history is kept after its last message.
        history_meta_ttl: Seconds a room's stream position (offset, epoch) is kept after its
            last message, and how long a browser session token can restore rooms.
        presence_max_members: Presence events are not sent for rooms with more members than
            this on the node.
        session_secret: Key signing browser session tokens; ``None``: a random key per broker
            (shared through Redis in a cluster).
        tls_cert: PEM certificate chain file: with ``tls_key`` the WebSocket port serves
            ``wss://`` only (a plain request gets HTTP 400). Reloaded on SIGHUP or when the
            file changes.
        tls_key: PEM private key file of ``tls_cert``.
        backend_tls_cert: PEM certificate chain file of the backend port: with
            ``backend_tls_key`` backends connect over TLS (the clients' ``ssl`` argument).
        backend_tls_key: PEM private key file of ``backend_tls_cert``.
        backend_tls_client_ca: PEM CA file: backends must present a client certificate
            signed by it (mutual TLS).
        redis_tls_ca: PEM CA file trusted for a ``rediss://`` ``cluster_url`` (``None``: the
            system's CAs).
        jwt_secret: HMAC key of signed connection tokens (HS256/384/512): a client with a valid
            token (``?token=`` or ``Authorization: Bearer``) is accepted with no
            ``connection_request``; a bad token gets HTTP 401.
        jwt_public_key: Public key (PEM file path or PEM text) of signed connection tokens:
            RSA, EC (ES256/ES384) or Ed25519.
        jwt_leeway: Seconds of clock skew allowed on a token's ``exp`` and ``nbf``.
        jwt_audience: When set, tokens must carry this ``aud``.
        jwt_issuer: When set, tokens must carry this ``iss``.

    In-process backends: ``serve(backend=...)``, ``start(backend=...)`` and
    ``async with broker.serving(backend)`` run the handlers of a :class:`PyStrandsClient`
    subclass, an :class:`AsyncPyStrandsClient` subclass or a :class:`PyStrands` app in this
    process, with no socket between broker and handlers. TCP backends can connect at the same
    time; the router treats the in-process backend as one more backend.
    """

    def __init__(
        self,
        host: str = "0.0.0.0",
        ws_port: int = 8080,
        tcp_port: int = 8081,
        queue_size: int = 1000,
        *,
        ws_host: str | None = None,
        tcp_host: str | None = None,
        request_timeout: float = 10.0,
        heartbeat_interval: float = 15.0,
        ping_interval: float = 30.0,
        max_message_size: int = 4 * 1024 * 1024,
        max_line_size: int = 16 * 1024 * 1024,
        client_queue_size: int = 1024,
        slow_client_policy: str = "close",
        allowed_origins: Iterable[str] = (),
        max_connections: int = 0,
        handshake_timeout: float = 10.0,
        workers: int = 0,
        log_level: str = "info",
        backend_secret: str | None = None,
        max_unacked: int = 100_000,
        client_rate_limit: float = 0.0,
        client_rate_burst: int = 0,
        rate_limit_policy: str = "drop",
        cluster_url: str | None = None,
        cluster_required: bool = True,
        cluster_name: str = "pystrands",
        cluster_node_id: str | None = None,
        inproc_queue_size: int = 4096,
        max_rooms_per_client: int = 100,
        max_id_length: int = 256,
        metrics_bind: str | None = None,
        admin_token: str | None = None,
        history_size: int = 0,
        history_ttl: float = 300.0,
        history_meta_ttl: float = 86_400.0,
        presence_max_members: int = 100,
        session_secret: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        backend_tls_cert: str | None = None,
        backend_tls_key: str | None = None,
        backend_tls_client_ca: str | None = None,
        redis_tls_ca: str | None = None,
        jwt_secret: str | None = None,
        jwt_public_key: str | None = None,
        jwt_leeway: float = 5.0,
        jwt_audience: str | None = None,
        jwt_issuer: str | None = None,
    ) -> None:
        from . import _core

        if isinstance(allowed_origins, str):
            raise ValueError(f"invalid setting allowed_origins={allowed_origins!r}: must be a list of origins, not a string")
        self._settings: dict[str, Any] = {
            "ws_host": ws_host if ws_host is not None else host,
            "ws_port": ws_port,
            "tcp_host": tcp_host if tcp_host is not None else host,
            "tcp_port": tcp_port,
            "queue_size": queue_size,
            "request_timeout": request_timeout,
            "heartbeat_interval": heartbeat_interval,
            "ping_interval": ping_interval,
            "max_message_size": max_message_size,
            "max_line_size": max_line_size,
            "client_queue_size": client_queue_size,
            "slow_client_policy": slow_client_policy,
            "allowed_origins": list(allowed_origins),
            "max_connections": max_connections,
            "handshake_timeout": handshake_timeout,
            "workers": workers,
            "log_level": log_level,
            "backend_secret": backend_secret,
            "max_unacked": max_unacked,
            "client_rate_limit": client_rate_limit,
            "client_rate_burst": client_rate_burst,
            "rate_limit_policy": rate_limit_policy,
            "cluster_url": cluster_url,
            "cluster_required": cluster_required,
            "cluster_name": cluster_name,
            "cluster_node_id": cluster_node_id,
            "inproc_queue_size": inproc_queue_size,
            "max_rooms_per_client": max_rooms_per_client,
            "max_id_length": max_id_length,
            "metrics_bind": metrics_bind,
            "admin_token": admin_token,
            "history_size": history_size,
            "history_ttl": history_ttl,
            "history_meta_ttl": history_meta_ttl,
            "presence_max_members": presence_max_members,
            "session_secret": session_secret,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "backend_tls_cert": backend_tls_cert,
            "backend_tls_key": backend_tls_key,
            "backend_tls_client_ca": backend_tls_client_ca,
            "redis_tls_ca": redis_tls_ca,
            "jwt_secret": jwt_secret,
            "jwt_public_key": jwt_public_key,
            "jwt_leeway": jwt_leeway,
            "jwt_audience": jwt_audience,
            "jwt_issuer": jwt_issuer,
        }
        self._native = _core.NativeBroker(**self._settings)
        self._stop_requested = threading.Event()
        self._hosted: Hosted | None = None
        # Set while serve() runs: it owns the shutdown, stop() from elsewhere only asks for it.
        self._serve_done: threading.Event | None = None
        self._serve_thread: threading.Thread | None = None
        self._stopping_tasks: set[asyncio.Task[None]] = set()

    @property
    def settings(self) -> Mapping[str, Any]:
        """The settings this broker was created with."""
        return dict(self._settings)

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return bool(self._native.running)

    @property
    def ws_port(self) -> int:
        """The bound WebSocket port while running, else the configured one."""
        port = self._native.ws_port
        return int(port if port is not None else self._settings["ws_port"])

    @property
    def tcp_port(self) -> int:
        """The bound backend port while running, else the configured one."""
        port = self._native.tcp_port
        return int(port if port is not None else self._settings["tcp_port"])

    def start(self, backend: Backend | None = None) -> Broker:
        """Start serving in background threads; returns once both listeners are bound.

        Args:
            backend: Handlers to run in this process: an instance of a
                :class:`PyStrandsClient` subclass (its worker threads), an
                :class:`AsyncPyStrandsClient` subclass or a :class:`PyStrands` app (an event
                loop in a thread of its own). Returns once it is attached. To share an event
                loop that is already running (a FastAPI lifespan), use :meth:`serving`.

        Raises:
            ConnectionError: ``cluster_url`` is set, Redis cannot be reached and
                ``cluster_required`` is True.
            OSError: a port is in use or the address cannot be bound.
            RuntimeError: the broker is already running, or the backend could not attach.
            TypeError: ``backend`` is not one of the three kinds above.
        """
        self._stop_requested.clear()
        self._start(self._host(backend))
        return self

    def _host(self, backend: Backend | None) -> Hosted | None:
        if backend is None:
            return None
        from ._hosted import Hosted

        if self._hosted is not None and self.running:
            raise RuntimeError("this broker already hosts a backend")
        return Hosted(self._native, backend)

    def _start(self, hosted: Hosted | None) -> None:
        _logbridge.ensure_running()
        self._native.start()
        if hosted is not None:
            try:
                hosted.start()
            except BaseException:
                self._native.stop(1.0)
                raise
            self._hosted = hosted

    def stop(self, timeout: float = 5.0) -> None:
        """Stop: close 1001 to clients, flush what is queued to backends, close listeners.

        With an in-process backend: the clients' last events are handled, then the backend
        disconnects (its handlers finish, their sends go out), then the broker stops. Waits at
        most about ``timeout`` seconds per step. Safe to call twice and from any thread; it also
        ends a running :meth:`serve`. Called from one of the in-process backend's handlers (its
        event loop or a worker thread) it starts the stop and returns at once, since the stop
        waits for the handlers; ``await broker.stop_async()`` there waits for it.
        """
        self._stop_requested.set()
        hosted = self._hosted
        serving = self._serve_done
        if serving is not None and threading.current_thread() is not self._serve_thread:
            # serve() stops in its own thread; a handler asking for it must not wait for it
            if hosted is None or not hosted.in_handler_thread():
                serving.wait(5 * timeout + 10.0)
            return
        if hosted is None:
            self._native.stop(timeout)
            return
        if hosted.in_handler_thread():
            if hosted.on_loop_thread():
                task = asyncio.get_running_loop().create_task(self._stop_hosted_async(hosted, timeout))
                self._stopping_tasks.add(task)
                task.add_done_callback(self._stopping_tasks.discard)
            else:
                threading.Thread(target=self._stop_hosted, args=(hosted, timeout), name="pystrands-stop", daemon=True).start()
            return
        self._stop_hosted(hosted, timeout)

    def _stop_hosted(self, hosted: Hosted, timeout: float) -> None:
        hosted.stop(timeout)  # concurrent callers wait for the first one's stop to finish
        if self._hosted is hosted:
            self._hosted = None

    async def _stop_hosted_async(self, hosted: Hosted, timeout: float) -> None:
        await hosted.stop_here(timeout)
        if self._hosted is hosted:
            self._hosted = None

    async def stop_async(self, timeout: float = 5.0) -> None:
        """:meth:`stop` as a coroutine: on the event loop an in-process backend runs on, the loop
        keeps running meanwhile, so the backend can drain while the broker stops."""
        self._stop_requested.set()
        hosted = self._hosted
        if hosted is not None and hosted.on_loop_thread():
            await self._stop_hosted_async(hosted, timeout)
        elif hosted is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._stop_hosted, hosted, timeout)
        else:
            await asyncio.get_running_loop().run_in_executor(None, self._native.stop, timeout)

    @asynccontextmanager
    async def serving(self, backend: Backend, drain_timeout: float = 5.0) -> AsyncIterator[Broker]:
        """Run the broker with an asyncio ``backend`` on the event loop that is running now.

        The handlers share the application's loop (and its connection pools); nothing else
        runs Python. Made for a FastAPI/Starlette lifespan::

            @asynccontextmanager
            async def lifespan(app):
                async with Broker(ws_port=8080).serving(ChatBackend()):
                    yield

        ``backend`` is an :class:`AsyncPyStrandsClient` subclass instance or a
        :class:`PyStrands` app. Leaving the block stops backend and broker in order.
        """
        self._stop_requested.clear()
        async with self._serving(backend, drain_timeout):
            yield self

    @asynccontextmanager
    async def _serving(self, backend: Backend, drain_timeout: float) -> AsyncIterator[None]:
        hosted = self._host(backend)
        assert hosted is not None
        if hosted.kind == "thread":
            raise TypeError("serving() runs an asyncio backend; pass a PyStrandsClient to start()/serve()")
        _logbridge.ensure_running()
        self._native.start()
        try:
            await hosted.start_here()
        except BaseException:
            self._native.stop(1.0)
            raise
        self._hosted = hosted
        try:
            yield
        finally:
            await self._stop_hosted_async(hosted, drain_timeout)

    def serve(self, drain_timeout: float = 5.0, *, backend: Backend | None = None) -> None:
        """Run until Ctrl-C, SIGTERM or :meth:`stop` (from another thread), then stop cleanly.

        Without ``backend`` the broker runs in native threads and this thread only waits, with
        the GIL released. With ``backend`` (see :meth:`start`) its handlers run in this process:
        a :class:`PyStrandsClient` in its worker threads, an asyncio backend on an event loop
        run by this thread. A signal stops both: clients are closed, their last events handled,
        the backend disconnects, then the broker stops.
        """
        # Handlers go in before the listeners open, so a signal sent as soon as the broker
        # logs "listening" still stops it cleanly.
        from ._hosted import kind_of

        on_loop = backend is not None and kind_of(backend) != "thread"
        self._stop_requested.clear()
        restore: list[tuple[int, Any]] = []
        if threading.current_thread() is threading.main_thread():

            def _on_signal(signum: int, frame: FrameType | None) -> None:
                logger.info("received %s, stopping", signal.Signals(signum).name)
                self._stop_requested.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                restore.append((sig, signal.signal(sig, _on_signal)))
        self._serve_thread = threading.current_thread()
        self._serve_done = threading.Event()
        try:
            if on_loop:
                asyncio.run(self._serve_on_loop(backend, drain_timeout))  # type: ignore[arg-type]
                return
            self._start(self._host(backend))
            try:
                while not self._stop_requested.wait(1.0):
                    pass
            except KeyboardInterrupt:
                pass
            finally:
                hosted = self._hosted
                if hosted is not None:
                    self._stop_hosted(hosted, drain_timeout)
                else:
                    self._native.stop(drain_timeout)
        finally:
            for signum, handler in restore:
                signal.signal(signum, handler)
            done, self._serve_done = self._serve_done, None
            self._serve_thread = None
            done.set()

    async def _serve_on_loop(self, backend: Backend, drain_timeout: float) -> None:
        async with self._serving(backend, drain_timeout):
            await asyncio.get_running_loop().run_in_executor(None, self._stop_requested.wait)

    def stats(self) -> dict[str, Any]:
        """Clients, rooms, backends, queued events and every counter (empty when stopped).

        Counters include ``messages_in``, ``deliveries``, ``events_to_backends``,
        ``queue_dropped``, ``slow_client_drops``, ``slow_clients_closed``, ``no_route``,
        ``backend_errors``, ``events_lost`` and more; see ``docs/operations.md``.

        ``clients`` and ``rooms`` are this node's. In a cluster there are also
        ``cluster_node_id`` (str), ``cluster_connected`` (bool), ``cluster_nodes``,
        ``cluster_clients``, ``cluster_rooms`` (every live node; other nodes' figures are at
        most about a second old) and the counters ``cluster_published``,
        ``cluster_publish_dropped``, ``cluster_received``, ``cluster_missed``,
        ``cluster_decode_errors``, ``cluster_reconnects``; see ``docs/deployment.md``.
        """
        return dict(self._native.stats())

    def room_members(self) -> dict[str, int]:
        """Room id → number of members: on every live node in a cluster (other nodes' counts
        as of their last report, at most about a second old), else on this broker."""
        return dict(self._native.room_members())

    def __enter__(self) -> Broker:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Broker {state} ws={self._settings['ws_host']}:{self.ws_port} tcp={self._settings['tcp_host']}:{self.tcp_port}>"
