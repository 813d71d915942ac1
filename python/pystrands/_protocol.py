"""The wire codec of the backend link (protocol v1 and the negotiated v2): bytes <-> frames.

No state beyond one stream's framing and no rules about when to send what:
those live in :mod:`pystrands._session`, which drives this module.

* the JSON codec (orjson, with a stdlib fallback),
* :class:`LineFramer`, an incremental linear-time splitter of newline-delimited
  frames with a maximum line size,
* encoders for the backend -> broker frames (``message_to_room``,
  ``message_to_connection``, ``broadcast``, ``response``, the v2 ``hello``,
  ``ack`` and heartbeat reply, and the commands and queries of the ``rooms``
  and ``history`` features) with cheap counter request ids,
* :func:`decode_event`, turning one inbound line into a typed :class:`Event` (or
  ``None`` for unknown actions and malformed input, which is logged, never
  raised); control events (hello replies, heartbeats, skipped frames, query
  replies and command errors) have :attr:`Event.control` set and never reach
  user callbacks.

The per-client ordering key of an event is :attr:`Event.key`: the ``client_id`` of
its context; connection requests have ``key = None`` and may run concurrently. An
event from a v2 broker carries its sequence number in :attr:`Event.seq` (``0``
when it has none) and its id / redelivery flag on its context
(:attr:`Context.event_id`, :attr:`Context.redelivered`).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any

from .context import ConnectionRequestContext, Context

logger = logging.getLogger("pystrands.protocol")

__all__ = [
    "BACKEND_SECRET_ENV",
    "DEFAULT_MAX_LINE_SIZE",
    "MAX_CLOSE_REASON_BYTES",
    "HISTORY_FEATURE",
    "ROOMS_FEATURE",
    "HEARTBEAT",
    "HEARTBEAT_REPLY",
    "PROTOCOL_VERSION",
    "READ_CHUNK_SIZE",
    "SILENCE_FACTOR",
    "V2_FEATURES",
    "CommandError",
    "ConnectionRequest",
    "Disconnected",
    "ErrorEvent",
    "Event",
    "Heartbeat",
    "HelloReply",
    "LineFramer",
    "NewConnection",
    "NewMessage",
    "QueryReply",
    "Skipped",
    "client_name",
    "context_from_wire",
    "decode_event",
    "dumps",
    "encode",
    "encode_ack",
    "encode_broadcast",
    "encode_disconnect",
    "encode_hello",
    "encode_join_room",
    "encode_leave_room",
    "encode_private_message",
    "encode_reject",
    "encode_response",
    "encode_room_config",
    "encode_room_count",
    "encode_room_history",
    "encode_room_members",
    "encode_room_message",
    "encode_user_message",
    "loads",
    "resolve_accepted",
    "resolve_backend_secret",
    "secret_from_env",
    "response_for",
]

DEFAULT_MAX_LINE_SIZE = 64 * 1024 * 1024
"""Largest accepted inbound line (64 MiB); longer lines are dropped and the stream resyncs."""

READ_CHUNK_SIZE = 256 * 1024
"""Bytes asked for per ``recv``."""

PROTOCOL_VERSION = 2
"""Highest protocol version the clients speak (announced in the ``hello``)."""

ROOMS_FEATURE = "rooms"
"""The v2 feature of rooms, users, presence and moderation (``docs/protocol.md``)."""

HISTORY_FEATURE = "history"
"""The v2 feature of room history and room settings: ``room_config``, ``room_history``."""

V2_FEATURES = ("ack", "heartbeat", ROOMS_FEATURE, HISTORY_FEATURE)
"""v2 features the clients announce."""

MAX_CLOSE_REASON_BYTES = 123
"""Longest WebSocket close reason (UTF-8 bytes) a ``disconnect`` may carry."""

BACKEND_SECRET_ENV = "PYSTRANDS_BACKEND_SECRET"
"""Environment variable read when no ``backend_secret`` is given (empty = none)."""

SILENCE_FACTOR = 3.0
"""In v2, this many announced heartbeat intervals without any byte from the broker
mean the connection is dead."""

# --------------------------------------------------------------------------- codec

try:  # pragma: no branch - orjson is a declared dependency
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised only without orjson
    _orjson = None  # type: ignore[assignment]

if _orjson is not None:
    _ORJSON_OPTS = _orjson.OPT_NON_STR_KEYS

    def dumps(obj: Any) -> bytes:
        """Serialize ``obj`` to compact UTF-8 JSON bytes (orjson)."""
        return _orjson.dumps(obj, option=_ORJSON_OPTS)

    def loads(data: bytes | bytearray | memoryview | str) -> Any:
        """Parse JSON (orjson); invalid JSON or UTF-8 raises ``ValueError``."""
        return _orjson.loads(data)

else:  # pragma: no cover - exercised only without orjson
    import json as _json

    def dumps(obj: Any) -> bytes:
        """Serialize ``obj`` to compact UTF-8 JSON bytes (stdlib fallback)."""
        return _json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def loads(data: bytes | bytearray | memoryview | str) -> Any:
        """Parse JSON (stdlib fallback); invalid JSON or UTF-8 raises ``ValueError``."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data).decode("utf-8")
        return _json.loads(data)


# ------------------------------------------------------------------------- framing


def _warn_dropped_line(size: int, max_line_size: int) -> None:
    """Log a dropped overlong line (the native ``LineDecoder`` calls this too)."""
    logger.warning(
        "Dropping an inbound line of at least %d bytes (max_line_size=%d); resyncing at the next newline",
        size,
        max_line_size,
    )


class LineFramer:
    """Incremental splitter of a byte stream into ``\\n``-terminated lines.

    Feed it whatever ``recv`` returned; it returns the complete lines (without the
    terminator, trailing ``\\r`` stripped, blank lines skipped). Work is linear in
    the bytes fed: each byte is scanned for a newline once, and consumed bytes are
    released once per :meth:`feed`.

    A line longer than ``max_line_size`` is dropped with a warning; the framer then
    discards input up to the next newline and carries on (resync).
    """

    __slots__ = ("_buf", "_discarding", "max_line_size", "dropped_lines")

    def __init__(self, max_line_size: int = DEFAULT_MAX_LINE_SIZE) -> None:
        """Create an empty framer accepting lines of at most ``max_line_size`` bytes."""
        if max_line_size <= 0:
            raise ValueError("max_line_size must be positive")
        self._buf = bytearray()  # an incomplete line, without a newline
        self._discarding = False
        self.max_line_size = max_line_size
        self.dropped_lines = 0

    @property
    def buffered(self) -> int:
        """Number of bytes held for an incomplete line."""
        return len(self._buf)

    def reset(self) -> None:
        """Drop any partial line (e.g. after the connection was lost)."""
        self._buf.clear()
        self._discarding = False

    def _drop(self, size: int) -> None:
        self.dropped_lines += 1
        _warn_dropped_line(size, self.max_line_size)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add ``data`` and return the complete non-blank lines it finished."""
        if not isinstance(data, bytes):
            data = bytes(data)
        if self._discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return []
            self._discarding = False
            data = data[nl + 1 :]
        buf = self._buf
        limit = self.max_line_size
        if buf:
            if data.find(b"\n") < 0:  # the pending line goes on
                buf += data
                if len(buf) > limit + 1:  # + 1: room for the CR of a CRLF
                    self._overflow()
                return []
            buf += data
            data = bytes(buf)
            buf.clear()
        parts = data.split(b"\n")  # one C-level split instead of a find() per line
        tail = parts.pop()  # the incomplete last line (b"" when data ended with a newline)
        if tail:
            buf += tail
            if len(buf) > limit + 1:
                self._overflow()
        if b"\r" in data:
            parts = [p[:-1] if p.endswith(b"\r") else p for p in parts]
        if len(data) > limit:
            kept = []
            for line in parts:
                if len(line) > limit:
                    self._drop(len(line))
                else:
                    kept.append(line)
            parts = kept
        return [line for line in parts if line and not line.isspace()]

    def _overflow(self) -> None:
        """The pending line outgrew the limit: drop it and skip to the next newline."""
        self._drop(len(self._buf))
        self._buf.clear()
        self._discarding = True


# ------------------------------------------------------------------------ encoding

_request_ids: Iterator[int] = itertools.count(1)


def next_request_id() -> str:
    """Return a new request id: a process-wide counter (cheap, unique per process)."""
    return str(next(_request_ids))


def encode(action: str, params: dict[str, Any], request_id: str | None = None) -> bytes:
    """Encode one backend -> broker frame, newline included.

    Raises ``TypeError`` if ``params`` holds something JSON cannot represent.
    """
    if request_id is None:
        request_id = str(next(_request_ids))
    return dumps({"request_id": request_id, "action": action, "params": params}) + b"\n"


def encode_room_message(
    room_id: str, message: str, request_id: str | None = None, exclude: list[str] | None = None
) -> bytes:
    """Frame a ``message_to_room``; ``exclude`` (client ids, ``rooms`` feature) only when non-empty."""
    params: dict[str, Any] = {"room_id": room_id, "message": message}
    if exclude:
        params["exclude"] = exclude
    return encode("message_to_room", params, request_id)


def encode_join_room(client_id: str, room_id: str, request_id: str | None = None) -> bytes:
    """Frame a ``join_room`` (``rooms`` feature)."""
    return encode("join_room", {"client_id": client_id, "room_id": room_id}, request_id)


def encode_leave_room(client_id: str, room_id: str, request_id: str | None = None) -> bytes:
    """Frame a ``leave_room`` (``rooms`` feature)."""
    return encode("leave_room", {"client_id": client_id, "room_id": room_id}, request_id)


def encode_user_message(user_id: str, message: str, request_id: str | None = None) -> bytes:
    """Frame a ``message_to_user`` (``rooms`` feature)."""
    return encode("message_to_user", {"user_id": user_id, "message": message}, request_id)


def encode_disconnect(client_id: str, code: int, reason: str, request_id: str | None = None) -> bytes:
    """Frame a ``disconnect`` of one WebSocket client (``rooms`` feature)."""
    return encode("disconnect", {"client_id": client_id, "code": code, "reason": reason}, request_id)


def encode_room_members(room_id: str, timeout: float, request_id: str) -> bytes:
    """Frame a ``room_members`` query (``rooms`` feature); ``request_id`` must be unique."""
    return encode("room_members", {"room_id": room_id, "timeout": timeout}, request_id)


def encode_room_count(room_id: str, timeout: float, request_id: str) -> bytes:
    """Frame a ``room_count`` query (``rooms`` feature); ``request_id`` must be unique."""
    return encode("room_count", {"room_id": room_id, "timeout": timeout}, request_id)


def encode_room_config(room_id: str, settings: dict[str, Any], request_id: str | None = None) -> bytes:
    """Frame a ``room_config`` (``history`` feature): ``settings`` holds only the fields to set
    (``history_size``, ``history_ttl``, ``presence``), already checked."""
    return encode("room_config", {"room_id": room_id, **settings}, request_id)


def encode_room_history(room_id: str, since: int, limit: int | None, request_id: str) -> bytes:
    """Frame a ``room_history`` query (``history`` feature); ``limit`` only when given,
    ``request_id`` must be unique."""
    params: dict[str, Any] = {"room_id": room_id, "since": since}
    if limit is not None:
        params["limit"] = limit
    return encode("room_history", params, request_id)


def encode_private_message(client_id: str, message: str, request_id: str | None = None) -> bytes:
    """Frame a ``message_to_connection`` (``conn_id`` is the client id)."""
    return encode("message_to_connection", {"conn_id": client_id, "message": message}, request_id)


def encode_broadcast(message: str, request_id: str | None = None) -> bytes:
    """Frame a ``broadcast``."""
    return encode("broadcast", {"message": message}, request_id)


def encode_response(request_id: Any, accepted: bool, context: Context) -> bytes:
    """Frame the ``response`` to a ``connection_request`` (same ``request_id``).

    ``user_id`` is included only when the context has one (``rooms`` feature), so a
    response without it is byte for byte the v1 one.
    """
    params: dict[str, Any] = {
        "accepted": bool(accepted),
        "client_id": context.client_id,
        "room_id": context.room_id,
        "metadata": context.metadata,
    }
    user_id = context.user_id
    if user_id is not None:
        params["user_id"] = user_id
    return encode("response", params, request_id)


def encode_reject(request_id: Any) -> bytes:
    """Frame the bare rejection sent when deciding a connection request failed."""
    return encode("response", {"accepted": False}, request_id)


HEARTBEAT_REPLY = b'{"request_id":"heartbeat","action":"heartbeat","params":{}}\n'
"""A v2 backend's answer to a broker ``heartbeat``."""


def encode_ack(seq: int) -> bytes:
    """Frame a cumulative ``ack``: every event with ``seq`` <= ``seq`` was handled."""
    return b'{"request_id":"ack","action":"ack","params":{"seq":%d}}\n' % seq


def client_name() -> str:
    """The ``client`` announced in the hello: ``pystrands-python/<version>``."""
    from . import __version__  # late: the package is fully imported by connect time

    return f"pystrands-python/{__version__}"


def encode_hello(secret: str | None = None) -> bytes:
    """Frame the ``hello`` a backend sends first on every connection.

    ``secret`` (the backend secret) is included only when given. The returned
    bytes contain the secret: never log them.
    """
    params: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "features": list(V2_FEATURES),
        "client": client_name(),
    }
    if secret:
        params["secret"] = secret
    return encode("hello", params, "hello")


def secret_from_env(env: str) -> str | None:
    """A secret from the environment: ``$ENV``, else the contents of the file named by
    ``$ENV_FILE`` (one trailing line break removed), as container secrets are mounted.

    Raises ``ValueError`` naming the variable when that file cannot be read.
    """
    value = os.environ.get(env)
    if value is not None:
        return value
    path = os.environ.get(env + "_FILE")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"{env}_FILE={path!r}: cannot read the secret file ({e.strerror})") from None
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def resolve_backend_secret(secret: str | None) -> str | None:
    """The backend secret to use: ``secret``, else ``$PYSTRANDS_BACKEND_SECRET``, else the
    contents of the file ``$PYSTRANDS_BACKEND_SECRET_FILE``.

    An empty string (given or from the environment) means none.
    """
    if secret is None:
        secret = secret_from_env(BACKEND_SECRET_ENV)
    elif not isinstance(secret, str):
        raise TypeError(f"backend_secret must be a str or None, not {type(secret).__name__}")
    return secret or None


def resolve_accepted(result: Any, request: ConnectionRequestContext) -> bool:
    """The decision: ``result`` if it is a bool, else ``request.accepted``."""
    if isinstance(result, bool):
        return result
    return bool(request.accepted)


def response_for(request_id: Any, result: Any, request: ConnectionRequestContext) -> bytes:
    """Encode the reply to a decided connection request.

    Falls back to a rejection (logged) if the context cannot be encoded, e.g. the
    metadata holds a value JSON cannot represent.
    """
    accepted = resolve_accepted(result, request)
    try:
        return encode_response(request_id, accepted, request.context)
    except (TypeError, ValueError) as exc:
        logger.error(
            "Cannot encode the response to connection request %r (%s); rejecting it",
            request_id,
            exc,
        )
        return encode_reject(request_id)


# ------------------------------------------------------------------------ decoding


class Event:
    """Base of the inbound events. ``key`` orders handling: same key, same order.

    ``seq`` is the v2 sequence number (``0``: none, never acknowledged).
    ``control`` is true for frames about the connection itself (hello replies,
    heartbeats, skipped frames), which the clients handle inline.
    """

    __slots__ = ("key", "seq")
    kind: str = ""
    control: bool = False

    def __init__(self, key: str | None) -> None:
        self.key = key
        self.seq = 0


class ConnectionRequest(Event):
    """``connection_request``: the broker asks whether to accept a WebSocket."""

    __slots__ = ("request_id", "request")
    kind = "connection_request"

    def __init__(self, request_id: Any, request: ConnectionRequestContext) -> None:
        super().__init__(None)
        self.request_id = request_id
        self.request = request


class NewConnection(Event):
    """``new_connection``: a WebSocket client was accepted and is connected."""

    __slots__ = ("context",)
    kind = "new_connection"

    def __init__(self, context: Context) -> None:
        super().__init__(context.client_id)
        self.context = context


class NewMessage(Event):
    """``new_message``: a WebSocket client sent ``message``."""

    __slots__ = ("message", "context")
    kind = "new_message"

    def __init__(self, message: str, context: Context) -> None:
        super().__init__(context.client_id)
        self.message = message
        self.context = context


class Disconnected(Event):
    """``disconnected``: a WebSocket client went away."""

    __slots__ = ("context",)
    kind = "disconnected"

    def __init__(self, context: Context) -> None:
        super().__init__(context.client_id)
        self.context = context


class ErrorEvent(Event):
    """``error``: the broker reports ``error`` about a client."""

    __slots__ = ("error", "context")
    kind = "error"

    def __init__(self, error: str, context: Context) -> None:
        super().__init__(context.client_id)
        self.error = error
        self.context = context


class HelloReply(Event):
    """The broker's answer to our ``hello`` (control).

    ``ok`` true: the connection is v2 from now on; ``heartbeat_interval`` is the
    announced interval in seconds (``0.0`` if absent or invalid); ``features`` the
    features the broker has; ``limits`` what it announced of its limits
    (``max_rooms_per_client``, ``max_id_length``: only positive integers are kept,
    ``{}`` if none). ``ok`` false: refused (``error`` says why) and the broker closes
    the connection.

    ``limits`` is given as the raw JSON value of the frame's ``limits`` and checked
    here (so both codecs keep the same values).
    """

    __slots__ = ("ok", "error", "version", "features", "heartbeat_interval", "limits")
    kind = "hello"
    control = True

    def __init__(
        self,
        ok: bool,
        error: str = "",
        version: int = 0,
        features: tuple[str, ...] = (),
        heartbeat_interval: float = 0.0,
        limits: Any = None,
    ) -> None:
        super().__init__(None)
        self.ok = ok
        self.error = error
        self.version = version
        self.features = features
        self.heartbeat_interval = heartbeat_interval
        self.limits: dict[str, int] = (
            {k: v for k, v in limits.items() if isinstance(k, str) and type(v) is int and v > 0}
            if isinstance(limits, dict)
            else {}
        )


class Heartbeat(Event):
    """A broker ``heartbeat`` (control): answered in v2, ignored in v1."""

    __slots__ = ()
    kind = "heartbeat"
    control = True

    def __init__(self) -> None:
        super().__init__(None)


HEARTBEAT = Heartbeat()
"""The (stateless) heartbeat event :func:`decode_event` returns for every heartbeat."""


class QueryReply(Event):
    """The broker's ``reply`` to one of our queries (control; ``rooms`` and ``history`` features).

    ``request_id`` is the query's; ``params`` the reply's known params
    (``members``/``complete``/``missing``, ``count``, ``epoch``/``offset``/``messages``/``complete``,
    or ``error``) with the members already :class:`Context` objects (``None`` for a malformed
    one): the session matches and interprets them. Replies carry no ``seq`` and are never
    acknowledged.

    The native ``LineDecoder`` builds this class too, but the one of this release keeps only the
    ``rooms`` keys (``members``, ``complete``, ``missing``, ``count``, ``error``): while a
    ``room_history`` reply is awaited the session decodes with :func:`decode_event` instead
    (see :meth:`pystrands._session.Session.receive_data`).
    """

    __slots__ = ("request_id", "params")
    kind = "reply"
    control = True

    def __init__(self, request_id: str, params: dict[str, Any]) -> None:
        super().__init__(None)
        self.request_id = request_id
        self.params = params


class CommandError(Event):
    """The broker refused one of our commands (control; ``rooms`` feature).

    ``command`` is the command's action, ``error`` why, ``request_id`` the
    command's. The session logs it; nothing else happens.
    """

    __slots__ = ("request_id", "command", "error")
    kind = "command_error"
    control = True

    def __init__(self, request_id: str, command: str, error: str) -> None:
        super().__init__(None)
        self.request_id = request_id
        self.command = command
        self.error = error


class Skipped(Event):
    """A frame carrying a v2 ``seq`` that no handler will see (control).

    Unknown actions and malformed events are logged and skipped as in v1; when
    they carry a ``seq`` it still counts as handled, so acknowledgements do not
    stall behind it.
    """

    __slots__ = ()
    kind = "skipped"
    control = True

    def __init__(self, seq: int) -> None:
        super().__init__(None)
        self.seq = seq


def _snippet(line: bytes | bytearray) -> str:
    text = bytes(line[:200]).decode("utf-8", "replace")
    return text + ("..." if len(line) > 200 else "")


_REPLY_KEYS = ("members", "complete", "missing", "count", "epoch", "offset", "messages", "error")


def _reply_params(params: dict[str, Any]) -> dict[str, Any]:
    """A reply's known params; ``members`` (when a list) as :class:`Context` objects, ``None``
    for a malformed one (the session counts those)."""
    out = {key: params[key] for key in _REPLY_KEYS if key in params}
    members = out.get("members")
    if isinstance(members, list):
        out["members"] = [context_from_wire(m) for m in members]
    return out


def context_from_wire(raw: Any) -> Context | None:
    """A :class:`Context` from a wire ``context`` object, or ``None`` when it is malformed.

    ``client_id`` / ``room_id`` must be strings (missing: ``""``), ``user_id`` a
    string or absent/``null`` (none); a ``null`` or missing ``metadata`` gives ``{}``.
    """
    if not isinstance(raw, dict):
        return None
    client_id = raw.get("client_id", "")
    room_id = raw.get("room_id", "")
    if not isinstance(client_id, str) or not isinstance(room_id, str):
        return None
    metadata = raw.get("metadata")
    ctx = Context(client_id, room_id, {} if metadata is None else metadata)
    user_id = raw.get("user_id")
    if user_id is not None:
        if not isinstance(user_id, str):
            return None
        ctx._user_id = user_id
    return ctx


def _context(
    params: dict[str, Any], action: str, line: bytes | bytearray, required: bool = True
) -> Context | None:
    raw = params.get("context")
    if raw is None and not required:
        return Context()
    if not isinstance(raw, dict):
        logger.warning("Skipping %s without a valid context: %s", action, _snippet(line))
        return None
    ctx = context_from_wire(raw)
    if ctx is None:
        logger.warning("Skipping %s with a malformed context: %s", action, _snippet(line))
    return ctx


def _hello_reply(params: dict[str, Any], line: bytes | bytearray) -> HelloReply | None:
    ok = params.get("ok")
    if not isinstance(ok, bool):
        # not a reply (e.g. a peer echoing a hello): harmless, ignore it
        logger.debug("Ignoring a hello frame without a boolean ok: %s", _snippet(line))
        return None
    error = params.get("error")
    version = params.get("version")
    features = params.get("features")
    interval = params.get("heartbeat_interval")
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not (
        0.0 < interval < float("inf")
    ):
        interval = 0.0
    return HelloReply(
        ok,
        error if isinstance(error, str) else ("" if error is None else str(error)),
        version if type(version) is int else 0,
        tuple(f for f in features if isinstance(f, str)) if isinstance(features, list) else (),
        float(interval),
        params.get("limits"),
    )


def _event_facts(event: Event, frame: dict[str, Any], seq: int) -> None:
    """Attach the v2 delivery facts of ``frame`` to ``event`` (it has a context)."""
    event.seq = seq
    context = event.context  # type: ignore[attr-defined]
    rid = frame.get("request_id")
    context._event_id = rid if isinstance(rid, str) or rid is None else str(rid)
    context._redelivered = frame.get("redelivered") is True


def decode_event(line: bytes | bytearray) -> Event | None:
    """Decode one inbound line into an :class:`Event`.

    Returns ``None`` (never raises) for unknown actions (debug log) and malformed
    input: invalid JSON or UTF-8, non-object frames, wrong field types (warning
    log); such a frame that carries a valid v2 ``seq`` comes back as
    :class:`Skipped` instead. Heartbeats return :data:`HEARTBEAT`, hello
    replies a :class:`HelloReply`, query replies a :class:`QueryReply` and
    command errors a :class:`CommandError` (control events; the last two carry no
    ``seq`` and are never acknowledged, a ``seq`` on them is ignored). Events with a top-level
    positive integer ``seq`` get it in :attr:`Event.seq`, and their context gets
    ``event_id`` (the ``request_id``) and ``redelivered``.
    """
    try:
        frame = loads(line)
    except (ValueError, TypeError, RecursionError) as exc:
        logger.warning("Skipping an undecodable line (%s): %s", exc, _snippet(line))
        return None
    if not isinstance(frame, dict):
        logger.warning("Skipping a frame that is not a JSON object: %s", _snippet(line))
        return None
    seq = frame.get("seq")
    if seq is not None and (type(seq) is not int or seq <= 0):
        logger.warning("Ignoring an invalid seq in: %s", _snippet(line))
        seq = None
    action = frame.get("action")
    params = frame.get("params")
    if params is None:
        params = {}
    elif not isinstance(params, dict):
        logger.warning("Skipping a frame whose params is not an object: %s", _snippet(line))
        return None if seq is None else Skipped(seq)

    event: Event | None
    if action == "new_message":
        message = params.get("message")
        if not isinstance(message, str):
            logger.warning("Skipping new_message without a string message: %s", _snippet(line))
            event = None
        else:
            ctx = _context(params, action, line)
            event = None if ctx is None else NewMessage(message, ctx)
    elif action == "heartbeat":
        return HEARTBEAT if seq is None else Skipped(seq)
    elif action == "connection_request":
        request_id = frame.get("request_id")
        if request_id is None or isinstance(request_id, (dict, list)):
            logger.warning("Skipping connection_request without a request_id: %s", _snippet(line))
            return None
        headers = params.get("headers")
        if headers is not None and not isinstance(headers, dict):
            logger.warning("connection_request headers is not an object; ignoring them")
            headers = None
        url = params.get("url", "")
        remote_addr = params.get("remote_addr", "")
        query = params.get("query", "")
        if not isinstance(url, str) or not isinstance(remote_addr, str) or not isinstance(
            query, (str, type(None))
        ):
            logger.warning("Skipping a malformed connection_request: %s", _snippet(line))
            return None
        request = ConnectionRequestContext._from_wire(headers, url, remote_addr, query or "")
        # connection requests carry no seq (the spec): one that does is not acknowledged
        return ConnectionRequest(request_id, request)
    elif action == "new_connection":
        ctx = _context(params, action, line)
        event = None if ctx is None else NewConnection(ctx)
    elif action == "disconnected":
        ctx = _context(params, action, line)
        event = None if ctx is None else Disconnected(ctx)
    elif action == "error":
        error = params.get("error", "")
        ctx = _context(params, action, line, required=False)
        event = None if ctx is None else ErrorEvent(error if isinstance(error, str) else str(error), ctx)
    elif action == "hello":
        return _hello_reply(params, line) if seq is None else Skipped(seq)
    elif action == "reply":  # a query's answer: no seq by the spec, never acknowledged
        request_id = frame.get("request_id")
        if not isinstance(request_id, str):
            logger.warning("Skipping a reply without a string request_id: %s", _snippet(line))
            return None
        return QueryReply(request_id, _reply_params(params))
    elif action == "command_error":  # control, like a reply: no seq, never acknowledged
        command = params.get("command")
        error = params.get("error")
        rid = frame.get("request_id")
        return CommandError(
            rid if isinstance(rid, str) else ("" if rid is None else str(rid)),
            command if isinstance(command, str) else ("?" if command is None else str(command)),
            error if isinstance(error, str) else ("no reason given" if error is None else str(error)),
        )
    else:
        if isinstance(action, str):
            logger.debug("Ignoring unknown action %r", action)
        else:
            logger.warning("Skipping a frame without an action: %s", _snippet(line))
        event = None
    if seq is None:
        return event
    if event is None:
        return Skipped(seq)
    _event_facts(event, frame, seq)
    return event
