"""What the threading and the asyncio backend clients share, written once.

:class:`ClientBase` holds the documented constructor arguments and attributes
(``host``, ``port``, ``connected``, ``auto_reconnect``, ``reconnect_delay``,
``max_reconnect_delay``, ``reconnect_backoff``), the PyStrands 1.0 attributes
that subclasses and tests of 1.0 touch (``_intentional_disconnect``), the
:class:`~pystrands._session.Session` that holds every wire rule, the frames of
the send methods and the bodies of the default callbacks. The two clients add
only I/O and concurrency: sockets and threads, or a transport and a dispatcher.

:class:`Backoff` is the reconnect schedule both clients follow.

The rooms/users/presence calls of both clients (``join_room``, ``leave_room``,
``send_room_message(..., exclude=...)``, ``send_user_message``, ``disconnect_client``,
``room_members``, ``room_count``) and the history calls (``room_config``,
``room_history``) have their rules in the session too; what the broker announced is
:attr:`ClientBase.broker_features` / :attr:`ClientBase.broker_limits`, and their errors
are in :mod:`pystrands.errors`.

:func:`resolve_tls` checks the ``ssl`` / ``server_hostname`` arguments every client flavour
takes (the decorator app too), so they fail the same way at construction.
"""

from __future__ import annotations

import logging
import random
import ssl as _ssl
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ._protocol import (
    DEFAULT_MAX_LINE_SIZE,
    ConnectionRequest,
    Disconnected,
    ErrorEvent,
    Event,
    NewConnection,
    NewMessage,
    resolve_backend_secret,
)
from ._session import DEFAULT_MAX_BUFFERED_SENDS, Session
from .context import ConnectionRequestContext, Context

if TYPE_CHECKING:
    from ._core import NativeBroker

__all__ = ["FAIRNESS_BATCH", "REPLY", "Backoff", "ClientBase", "legacy_log_handler", "resolve_tls"]

FAIRNESS_BATCH = 64
"""Events of one client handled in a row before others get a turn (and, asyncio: the loop)."""

REPLY = "response to a connection request"
"""What a reply to a connection request is called in log lines."""


def legacy_log_handler(label: str) -> tuple[logging.Formatter, logging.StreamHandler[Any]]:
    """The ``formatter`` / ``console_handler`` pair PyStrands 1.0 attached to its client loggers.

    They stay importable from the client modules for code that removed the handler, but
    they are never attached: a library adds no handlers.
    """
    formatter = logging.Formatter(f"%(asctime)s - [{label}] - %(levelname)s - %(message)s")
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    return formatter, handler


def resolve_tls(
    ssl: _ssl.SSLContext | bool | None, server_hostname: str | None
) -> tuple[_ssl.SSLContext | None, str | None]:
    """Check the ``ssl`` and ``server_hostname`` arguments; return ``(context, server_hostname)``.

    ``True`` becomes :func:`ssl.create_default_context` (system CAs, hostname checked);
    ``None`` and ``False`` mean plain TCP (``(None, None)``).

    Raises:
        TypeError: ``ssl`` is not an :class:`ssl.SSLContext`, a bool or ``None``, or
            ``server_hostname`` is not a str or ``None``.
        ValueError: ``server_hostname`` without ``ssl``, or a server-side context
            (``ssl.PROTOCOL_TLS_SERVER``), which cannot make client connections.
    """
    if server_hostname is not None and not isinstance(server_hostname, str):
        raise TypeError(f"server_hostname must be a str or None, not {type(server_hostname).__name__}")
    if ssl is None or ssl is False:
        if server_hostname is not None:
            raise ValueError("server_hostname is only meaningful with ssl")
        return None, None
    if ssl is True:
        return _ssl.create_default_context(), server_hostname
    if not isinstance(ssl, _ssl.SSLContext):
        raise TypeError(f"ssl must be an ssl.SSLContext, True, False or None, not {type(ssl).__name__}")
    if ssl.protocol == _ssl.PROTOCOL_TLS_SERVER:
        raise ValueError("ssl must be a client context (e.g. ssl.create_default_context()), not a PROTOCOL_TLS_SERVER one")
    return ssl, server_hostname


class Backoff:
    """Reconnect delay schedule: ``delay, delay*factor, ...`` capped at ``maximum``.

    Each returned delay is the nominal one times a random factor in
    ``[1 - jitter, 1 + jitter]``, then capped at ``maximum`` (so many backends
    restarting together do not reconnect in lock step, and the cap holds).
    """

    __slots__ = ("initial", "factor", "maximum", "jitter", "_nominal", "_random")

    def __init__(
        self,
        initial: float,
        factor: float,
        maximum: float,
        jitter: float = 0.15,
        rng: Callable[[], float] = random.random,
    ) -> None:
        """Create a schedule; negative values are clamped, ``factor`` to at least 1."""
        self.initial = max(0.0, float(initial))
        self.factor = max(1.0, float(factor))
        self.maximum = max(self.initial, float(maximum))
        self.jitter = min(max(0.0, float(jitter)), 1.0)
        self._random = rng
        self._nominal = self.initial

    def reset(self) -> None:
        """Start again from the initial delay (after a successful connect)."""
        self._nominal = self.initial

    def next(self) -> float:
        """Return the next delay in seconds and advance the schedule."""
        nominal = self._nominal
        self._nominal = min(nominal * self.factor, self.maximum)
        jittered = nominal * (1.0 + self.jitter * (2.0 * self._random() - 1.0))
        return min(max(0.0, jittered), self.maximum)

    def __iter__(self) -> Iterator[float]:
        while True:
            yield self.next()


class ClientBase:
    """The documented surface both backend clients share.

    Args:
        host: Broker host.
        port: Broker TCP port for backends.
        auto_reconnect: Reconnect with exponential backoff when the connection is
            lost (never after ``disconnect()``).
        reconnect_delay: First reconnect delay, seconds.
        max_reconnect_delay: Cap of the reconnect delay, seconds.
        reconnect_backoff: Multiplier applied to the delay after each failure.
        connect_timeout: Seconds allowed for one connect attempt (TCP connect and,
            with ``ssl``, the TLS handshake).
        max_line_size: Largest inbound frame in bytes; larger ones are dropped
            with a warning.
        backend_secret: Shared secret sent in the ``hello`` on every connection,
            for a broker started with a ``backend_secret``. ``None`` reads
            ``$PYSTRANDS_BACKEND_SECRET``; empty means none. Never logged.
        ssl: TLS to the broker's backend port (one started with
            ``backend_tls_cert``/``backend_tls_key``): an :class:`ssl.SSLContext`
            (for mutual TLS, one with ``load_cert_chain`` done), or ``True`` for
            :func:`ssl.create_default_context` (system CAs). ``None``/``False``:
            plain TCP.
        server_hostname: The name the broker's certificate is checked against
            (and sent as SNI); default ``host``. Only with ``ssl``.
        max_buffered_sends: Sends kept while the broker is unreachable or the
            client reconnects, written in order once the link is back (``0``:
            drop them, as PyStrands 1.0 did).
        buffer_policy: ``"drop_oldest"`` (default) or ``"drop_newest"``: what a
            full buffer drops. Drops are counted in :attr:`dropped_sends` and
            logged once per disconnected period.
        max_pending: Received events not yet handled above which reading pauses
            until half of them are done.
    """

    _ack_delay = 0.0  # seconds a due ack may wait (the threading client batches them)
    _logger = logging.getLogger("pystrands.client")  # each client logs under its own name

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
        max_line_size: int = DEFAULT_MAX_LINE_SIZE,
        backend_secret: str | None = None,
        max_buffered_sends: int = DEFAULT_MAX_BUFFERED_SENDS,
        buffer_policy: str = "drop_oldest",
        max_pending: int = 10_000,
        ssl: _ssl.SSLContext | bool | None = None,
        server_hostname: str | None = None,
    ) -> None:
        """Configure the client; nothing connects until ``connect()``/``run_forever()``."""
        self.ssl, self.server_hostname = resolve_tls(ssl, server_hostname)
        self.host = host
        self.port = port
        self.connected = False
        self.auto_reconnect = auto_reconnect
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.reconnect_backoff = reconnect_backoff
        self.connect_timeout = connect_timeout
        self.max_line_size = max_line_size
        self.max_buffered_sends = max_buffered_sends
        self.buffer_policy = buffer_policy
        self.max_pending = max(1, int(max_pending))
        self._backend_secret = resolve_backend_secret(backend_secret)
        # PyStrands 1.0: True after disconnect(); no reconnection while it is set.
        self._intentional_disconnect = False
        self._session = self._new_session()
        # Set by Broker.serve/start(backend=...): the in-process broker this client attaches to
        # instead of connecting to host:port (see pystrands._inproc).
        self._inproc: NativeBroker | None = None

    def _new_session(self) -> Session:
        return Session(
            backend_secret=self._backend_secret,
            max_line_size=self.max_line_size,
            max_buffered_sends=self.max_buffered_sends,
            buffer_policy=self.buffer_policy,
            ack_delay=self._ack_delay,
            peer=f"{self.host}:{self.port}",
            log=self._logger,
        )

    @property
    def protocol_version(self) -> int:
        """Protocol of the current connection: ``2`` once the broker accepted our hello, else ``1``."""
        session = self._session
        return 2 if session.open and session.acks is not None else 1

    @property
    def broker_features(self) -> frozenset[str]:
        """Protocol features the broker announced on the current connection (e.g. ``"rooms"``);
        empty when not connected, with a v1 broker, or before its hello answer came."""
        session = self._session
        return (session.features or frozenset()) if session.open else frozenset()

    @property
    def broker_limits(self) -> dict[str, int]:
        """The limits the last broker with the ``rooms`` feature announced
        (``max_rooms_per_client``, ``max_id_length``); ``{}`` if none did."""
        return dict(self._session.limits)

    @property
    def dropped_sends(self) -> int:
        """Sends dropped because the client was not connected and its buffer was full
        (or ``max_buffered_sends`` is 0), since creation."""
        return self._session.dropped_sends

    @property
    def buffered_sends(self) -> int:
        """Sends kept while disconnected, waiting for the next connection."""
        return self._session.buffered

    @property
    def _tls_hostname(self) -> str:
        """The name the broker's certificate is checked against (``server_hostname`` or ``host``)."""
        return self.server_hostname or self.host

    @property
    def _where(self) -> str:
        """Where the broker is, for log lines."""
        return "in-process" if self._inproc is not None else f"{self.host}:{self.port}"

    def _backoff(self) -> Backoff:
        return Backoff(self.reconnect_delay, self.reconnect_backoff, self.max_reconnect_delay)

    # ------------------------------------------------------------------- routing

    def _route(self, event: Event) -> tuple[str, Callable[..., Any], tuple[Any, ...]]:
        """The callback an event goes to: ``(name, bound method, arguments)``.

        Control events never get here (the session handles them).
        """
        cls = type(event)
        if cls is NewMessage:
            return "on_message", self.on_message, (event.message, event.context)  # type: ignore[attr-defined]
        if cls is ConnectionRequest:
            return "on_connection_request", self.on_connection_request, (event.request,)  # type: ignore[attr-defined]
        if cls is NewConnection:
            return "on_new_connection", self.on_new_connection, (event.context,)  # type: ignore[attr-defined]
        if cls is Disconnected:
            return "on_disconnect", self.on_disconnect, (event.context,)  # type: ignore[attr-defined]
        if cls is ErrorEvent:
            return "on_error", self.on_error, (event.error, event.context)  # type: ignore[attr-defined]
        raise TypeError(f"no callback for {cls.__name__}")  # pragma: no cover - a bug, not input

    # Declared for the type checker; each client defines them (plain or async functions).
    on_message: Callable[..., Any]
    on_connection_request: Callable[..., Any]
    on_new_connection: Callable[..., Any]
    on_disconnect: Callable[..., Any]
    on_error: Callable[..., Any]

    # ------------------------------------------------------ default callback bodies

    def _default_connection_request(self, request: ConnectionRequestContext) -> bool:
        self._logger.debug("Connection request %s -> room %s", request.context.client_id, request.context.room_id)
        return True

    def _default_new_connection(self, context: Context) -> None:
        self._logger.debug("New connection %s in room %s", context.client_id, context.room_id)

    def _default_message(self, message: str, context: Context) -> None:
        self._logger.debug("Message from %s in room %s", context.client_id, context.room_id)

    def _default_disconnect(self, context: Context) -> None:
        self._logger.debug("Client %s left room %s", context.client_id, context.room_id)

    def _default_error(self, error: str, context: Context) -> None:
        self._logger.error("Error for client %s: %s", context.client_id, error)
