"""The native broker, run from Python.

`Broker` is a thin wrapper over the Rust core (`pystrands._core`): it passes the settings through
(validation happens in the core, so the CLI, this class and the Rust tests share one set of rules),
starts the broker in background threads with the GIL released, and owns signal handling and waiting.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable, Mapping
from types import FrameType, TracebackType
from typing import Any

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
        log_level: ``error``, ``warn``, ``info``, ``debug`` or ``trace`` (native logs, stderr).
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
        }
        self._native = _core.NativeBroker(**self._settings)
        self._stop_requested = threading.Event()

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

    def start(self) -> Broker:
        """Start serving in background threads; returns once both listeners are bound.

        Raises:
            ConnectionError: ``cluster_url`` is set, Redis cannot be reached and
                ``cluster_required`` is True.
            OSError: a port is in use or the address cannot be bound.
            RuntimeError: the broker is already running.
        """
        self._stop_requested.clear()
        self._native.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop: close 1001 to clients, flush what is queued to backends, close listeners.

        Waits at most ``timeout`` seconds. Safe to call twice and from any thread; it also ends
        a running :meth:`serve`.
        """
        self._stop_requested.set()
        self._native.stop(timeout)

    def serve(self, drain_timeout: float = 5.0) -> None:
        """Run until Ctrl-C, SIGTERM or :meth:`stop` (from another thread), then stop cleanly.

        The broker runs in native threads; this thread only waits, with the GIL released.
        """
        # Handlers go in before the listeners open, so a signal sent as soon as the broker
        # logs "listening" still stops it cleanly.
        self._stop_requested.clear()
        restore: list[tuple[int, Any]] = []
        if threading.current_thread() is threading.main_thread():

            def _on_signal(signum: int, frame: FrameType | None) -> None:
                logger.info("received %s, stopping", signal.Signals(signum).name)
                self._stop_requested.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                restore.append((sig, signal.signal(sig, _on_signal)))
        try:
            self._native.start()
        except BaseException:
            for signum, handler in restore:
                signal.signal(signum, handler)
            raise
        try:
            while not self._stop_requested.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            for signum, handler in restore:
                signal.signal(signum, handler)
            self._native.stop(drain_timeout)

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
