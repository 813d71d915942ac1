"""Type stubs of the native extension ``pystrands._core`` (``rust/py``).

Everything the binding exports is here; ``tests/test_settings_table.py`` compares these names with
``dir(pystrands._core)``, :class:`BrokerSettings` with ``settings_table()`` and
:class:`BrokerStats` with the ``stats()`` of a running broker. The settings themselves are
documented in ``docs/broker.md`` (generated from the same table).
"""

from collections.abc import Callable, Iterator
from typing import Any, Literal, TypedDict

from typing_extensions import Unpack

__version__: str
"""The version of the native extension: the Cargo workspace version (``CARGO_PKG_VERSION``)."""

class BrokerSettings(TypedDict, total=False):
    """Keyword settings of :class:`NativeBroker` (every key optional; ``None`` means the default)."""

    ws_host: str
    ws_port: int
    tcp_host: str
    tcp_port: int
    queue_size: int
    request_timeout: float
    heartbeat_interval: float
    ping_interval: float
    max_message_size: int
    max_line_size: int
    client_queue_size: int
    slow_client_policy: Literal["close", "drop"]
    allowed_origins: list[str]
    max_connections: int
    handshake_timeout: float
    workers: int
    log_level: str
    backend_secret: str | None
    max_unacked: int
    client_rate_limit: float
    client_rate_burst: int
    rate_limit_policy: Literal["close", "drop"]
    cluster_url: str | None
    cluster_required: bool
    cluster_name: str
    cluster_node_id: str | None
    inproc_queue_size: int
    max_rooms_per_client: int
    max_id_length: int
    metrics_bind: str | None
    admin_token: str | None
    history_size: int
    history_ttl: float
    history_meta_ttl: float
    presence_max_members: int
    session_secret: str | None
    tls_cert: str | None
    tls_key: str | None
    backend_tls_cert: str | None
    backend_tls_key: str | None
    backend_tls_client_ca: str | None
    redis_tls_ca: str | None
    jwt_secret: str | None
    jwt_public_key: str | None
    jwt_leeway: float
    jwt_audience: str | None
    jwt_issuer: str | None

class SettingInfo(TypedDict):
    """One row of :func:`settings_table`."""

    name: str
    """The setting: the ``Broker`` keyword and the settings dict key."""
    type: str
    """For humans: ``int``, ``float seconds``, ``float``, ``str``, ``bool``, ``str|None``,
    ``list[str]`` or ``'close'|'drop'``."""
    kind: Literal["int", "seconds", "float", "str", "optional_str", "bool", "list", "policy", "secret"]
    """How a value is written (what the CLI parses a flag or variable as)."""
    default: int | float | str | bool | list[str] | None
    """The default, as :func:`default_settings` gives it."""
    default_text: str
    """The default for humans, e.g. ``10 s``, ``4194304 (4 MiB)``, ``unset``."""
    help: str
    """What the setting does (the CLI help and the docs)."""
    env: str
    """The documented environment variable, ``PYSTRANDS_<NAME>``."""
    envs: list[str]
    """Every environment variable the CLI reads for it (the documented one first)."""
    flag: str
    """The documented CLI flag, e.g. ``--ws-port``."""
    flags: list[str]
    """Every CLI flag of it (the documented one first)."""
    secret: bool
    """The value is a secret: never echoed in errors; better passed in the environment."""

class BrokerStats(TypedDict, total=False):
    """What :meth:`NativeBroker.stats` returns while running (an empty dict when stopped): every
    key, except that the five under "Only in a cluster" are there only with ``cluster_url`` set."""

    clients: int
    """WebSocket clients connected to this node."""
    rooms: int
    """Rooms with members on this node."""
    users: int
    """Distinct users with a connection on this node."""
    memberships: int
    """Room memberships on this node (a client in three rooms counts three)."""
    backends: int
    """Backends connected to this node."""
    queued_events: int
    """Events waiting in the no-backend queue."""
    pending_requests: int
    """Connection requests waiting for a backend's response."""
    unacked_events: int
    """Events sent to v2 backends and not yet acknowledged (kept for redelivery)."""
    history_rooms: int
    """Rooms with a history stream in this node's memory (alone; a cluster keeps them in Redis)."""
    history_messages: int
    """Messages kept in this node's room history streams."""
    # Counters (``rust/core/src/stats.rs``), all since start.
    connections_accepted: int
    connections_rejected: int
    connections_unavailable: int
    handshakes_failed: int
    connections_replaced: int
    messages_in: int
    deliveries: int
    events_to_backends: int
    queue_dropped: int
    slow_client_drops: int
    slow_clients_closed: int
    no_route: int
    backend_errors: int
    client_protocol_errors: int
    backends_lost: int
    events_lost: int
    events_redelivered: int
    unacked_overflow: int
    backends_refused: int
    rate_limited: int
    cluster_published: int
    cluster_publish_dropped: int
    cluster_received: int
    cluster_missed: int
    cluster_decode_errors: int
    cluster_reconnects: int
    cluster_query_timeouts: int
    rooms_joined: int
    rooms_left: int
    clients_disconnected: int
    commands_unmatched: int
    commands_refused: int
    presence_events: int
    presence_suppressed: int
    history_appended: int
    recoveries: int
    recoveries_failed: int
    messages_replayed: int
    browser_protocol_errors: int
    token_connections: int
    tokens_refused: int
    tokens_expired: int
    tls_handshakes_failed: int
    tls_reloads: int
    tls_reload_failures: int
    # Only in a cluster.
    cluster_node_id: str
    """This node's id."""
    cluster_connected: bool
    """Both connections to Redis are up."""
    cluster_nodes: int
    """Live nodes, this one included."""
    cluster_clients: int
    """Clients on every live node."""
    cluster_rooms: int
    """Distinct rooms with members on any live node."""

def default_settings() -> BrokerSettings:
    """The default of every broker setting (every key present)."""

def settings_table() -> list[SettingInfo]:
    """Every broker setting with its type, default, help, environment variable and CLI flag, in
    the order of the table in ``rust/core/src/config.rs``."""

class NativeBroker:
    """The native broker: ``NativeBroker(**settings)``, then ``start()``, ``stats()``, ``stop()``.

    Raises ``ValueError`` naming the setting and the value for an invalid one, ``TypeError`` for
    an unknown name. ``pystrands.Broker`` is the documented wrapper.
    """

    def __init__(self, **settings: Unpack[BrokerSettings]) -> None: ...
    def start(self) -> None:
        """Binds both listeners and starts serving in background threads; returns once bound.

        Raises ``RuntimeError`` if already running, ``OSError`` if a port cannot be bound,
        ``ConnectionError`` if a required cluster's Redis is unreachable."""
    def stop(self, timeout: float = 5.0) -> None:
        """Stops serving: close 1001 to clients, flush backends; waits at most ``timeout`` seconds."""
    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
    @property
    def ws_port(self) -> int | None:
        """The bound WebSocket port, or None when not running."""
    @property
    def tcp_port(self) -> int | None:
        """The bound backend (TCP) port, or None when not running."""
    def stats(self) -> BrokerStats:
        """Clients, rooms, backends, queued events, pending requests and every counter (empty
        when not running); in a cluster also the ``cluster_*`` figures."""
    def room_members(self) -> dict[str, int]:
        """Room → members, cluster-wide in a cluster (empty when not running)."""
    def attach(self) -> InprocLink:
        """A link for a backend running in this process (``RuntimeError`` when not running)."""
    def stop_clients(self, timeout: float = 5.0) -> None:
        """First half of ``stop`` for in-process backends: clients are closed (1001) and their
        last events routed, then routing stops; the links then drain and close, ``stop`` finishes."""
    def wait_drained(self, timeout: float = 5.0) -> bool:
        """After ``stop_clients``: waits (GIL released) until every in-process link has taken all
        it was sent, at most ``timeout`` seconds; true when all did."""

class InprocLink:
    """An in-process backend's link to its broker (made by :meth:`NativeBroker.attach`).

    The broker queues the backend's lines here; :meth:`fileno` becomes readable once per batch.
    ``pystrands._inproc`` adapts it to a socket (threading client) and a transport (asyncio).
    """

    @property
    def id(self) -> int:
        """The backend id the broker's logs use for this link."""
    @property
    def closed(self) -> bool:
        """True once the link is over: shortly after :meth:`close` (the broker finishes what was
        written first), or when the broker stopped."""
    def fileno(self) -> int:
        """The descriptor that becomes readable when :meth:`read` has lines (for ``add_reader``)."""
    def read(self, max_lines: int = 4096) -> bytes | None:
        """Up to ``max_lines`` waiting lines as one ``bytes`` without blocking: ``b""`` when there
        are none, ``None`` at the end of the stream."""
    def recv(self, timeout: float | None = None, max_lines: int = 4096) -> bytes | None:
        """Blocks (GIL released) until lines arrive and returns them; ``b""`` at the end of the
        stream; ``None`` when ``timeout`` passed first."""
    def write(self, data: bytes) -> None:
        """Hands the backend's lines (sends, answers, acks) to the broker. Never blocks, unless
        64 MiB of this link's lines are still to be carried out (then it waits, GIL released)."""
    def shutdown(self) -> None:
        """Ends the stream for readers; writing still works."""
    def close(self) -> None:
        """Closes the link; the broker redelivers what was not acknowledged to other backends."""
    def wait_drained(self, timeout: float) -> bool:
        """After the broker began stopping: waits (GIL released) until every line was read."""

def encode_room_message(room_id: str, message: str, request_id: str | None = None) -> bytes:
    """Native ``pystrands._protocol.encode_room_message`` (same bytes; other argument types are
    handed to the Python encoder)."""

def encode_private_message(client_id: str, message: str, request_id: str | None = None) -> bytes:
    """Native ``pystrands._protocol.encode_private_message`` (same bytes)."""

def encode_broadcast(message: str, request_id: str | None = None) -> bytes:
    """Native ``pystrands._protocol.encode_broadcast`` (same bytes)."""

class LineDecoder:
    """The native inbound codec of the backend clients: ``LineFramer`` + ``decode_event`` in one.

    ``LineDecoder(max_line_size, decode_fallback=None)`` frames like
    :class:`pystrands._protocol.LineFramer` and decodes each complete line into the same event objects
    :func:`pystrands._protocol.decode_event` returns. A line it does not fully understand is handed to
    ``decode_fallback`` (default: ``decode_event``), so malformed input behaves exactly as in Python.
    """

    def __init__(
        self, max_line_size: int = 67108864, decode_fallback: Callable[[bytes], Any] | None = None
    ) -> None: ...
    @property
    def max_line_size(self) -> int:
        """Largest accepted line; longer lines are dropped and the stream resyncs."""
    @property
    def dropped_lines(self) -> int:
        """Overlong lines dropped so far."""
    @property
    def fallbacks(self) -> int:
        """Lines handed to the Python decoder so far."""
    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete line."""
    def reset(self) -> None:
        """Drop any partial line and any line not yet iterated."""
    def feed(self, data: bytes | bytearray | memoryview) -> LineDecoder:
        """Frame ``data``; returns this decoder, an iterator over the events of the lines completed
        (decoded lazily, in order; lines that decode to nothing are skipped)."""
    def __iter__(self) -> Iterator[Any]: ...
    def __next__(self) -> Any: ...

def log_records(timeout: float = 0.5) -> list[tuple[int, str, str, dict[str, str]]]:
    """Up to 1,024 queued native log records as ``(levelno, logger name, message, fields)``,
    waiting at most ``timeout`` seconds (GIL released) for the first; empty without a broker
    started in this process (see ``pystrands._logbridge``)."""

def log_dropped() -> int:
    """Native log records dropped because Python fell behind (queue of 16,384 full)."""
