"""Wire protocol v1 core shared by the sync and async PyStrands clients.

Everything both clients need lives here once:

* the JSON codec (orjson, with a stdlib fallback),
* :class:`LineFramer`, an incremental linear-time splitter of newline-delimited
  frames with a maximum line size,
* encoders for the backend -> broker actions (``message_to_room``,
  ``message_to_connection``, ``broadcast``, ``response``) with cheap counter
  request ids,
* :func:`decode_event`, turning one inbound line into a typed event (or ``None``
  for heartbeats, unknown actions and malformed input, which is logged, never
  raised),
* :class:`Backoff`, the reconnect delay schedule with jitter,
* :class:`DropTracker`, which logs sends dropped while disconnected once per
  disconnected period and counts them,
* small helpers for connection-request replies.

The per-client ordering key of an event is :attr:`Event.key`: the ``client_id`` of
its context; connection requests have ``key = None`` and may run concurrently.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .context import ConnectionRequestContext, Context

logger = logging.getLogger("pystrands.protocol")

__all__ = [
    "DEFAULT_MAX_LINE_SIZE",
    "READ_CHUNK_SIZE",
    "Backoff",
    "ConnectionRequest",
    "Disconnected",
    "DropTracker",
    "ErrorEvent",
    "Event",
    "LineFramer",
    "NewConnection",
    "NewMessage",
    "decode_event",
    "dumps",
    "encode",
    "encode_broadcast",
    "encode_private_message",
    "encode_reject",
    "encode_response",
    "encode_room_message",
    "loads",
    "resolve_accepted",
]

DEFAULT_MAX_LINE_SIZE = 64 * 1024 * 1024
"""Largest accepted inbound line (64 MiB); longer lines are dropped and the stream resyncs."""

READ_CHUNK_SIZE = 256 * 1024
"""Bytes asked for per ``recv``."""

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


class LineFramer:
    """Incremental splitter of a byte stream into ``\\n``-terminated lines.

    Feed it whatever ``recv`` returned; it returns the complete lines (without the
    terminator, trailing ``\\r`` stripped, blank lines skipped). Work is linear in
    the bytes fed: each byte is scanned for a newline once, and consumed bytes are
    released once per :meth:`feed`.

    A line longer than ``max_line_size`` is dropped with a warning; the framer then
    discards input up to the next newline and carries on (resync).
    """

    __slots__ = ("_buf", "_scan", "_discarding", "max_line_size", "dropped_lines")

    def __init__(self, max_line_size: int = DEFAULT_MAX_LINE_SIZE) -> None:
        """Create an empty framer accepting lines of at most ``max_line_size`` bytes."""
        if max_line_size <= 0:
            raise ValueError("max_line_size must be positive")
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf already known to contain no newline
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
        self._scan = 0
        self._discarding = False

    def _drop(self, size: int) -> None:
        self.dropped_lines += 1
        logger.warning(
            "Dropping an inbound line of at least %d bytes (max_line_size=%d); resyncing "
            "at the next newline",
            size,
            self.max_line_size,
        )

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add ``data`` and return the complete non-blank lines it finished."""
        buf = self._buf
        lines: list[bytes] = []
        if isinstance(data, memoryview):
            data = data.tobytes()
        if self._discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return lines
            self._discarding = False
            data = data[nl + 1 :]
        buf += data
        limit = self.max_line_size
        start = 0
        pos = self._scan
        find = buf.find
        nl = find(b"\n", pos)
        if nl >= 0:
            view = memoryview(buf)
            try:
                while nl >= 0:
                    end = nl
                    if end > start and buf[end - 1] == 13:  # "\r"
                        end -= 1
                    if end - start > limit:
                        self._drop(end - start)
                    elif end > start:
                        line = bytes(view[start:end])
                        if not line.isspace():
                            lines.append(line)
                    start = nl + 1
                    nl = find(b"\n", start)
            finally:
                view.release()
            del buf[:start]
        self._scan = len(buf)
        if len(buf) > limit:
            self._drop(len(buf))
            buf.clear()
            self._scan = 0
            self._discarding = True
        return lines


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


def encode_room_message(room_id: str, message: str) -> bytes:
    """Frame a ``message_to_room``."""
    return encode("message_to_room", {"room_id": room_id, "message": message})


def encode_private_message(client_id: str, message: str) -> bytes:
    """Frame a ``message_to_connection`` (``conn_id`` is the client id)."""
    return encode("message_to_connection", {"conn_id": client_id, "message": message})


def encode_broadcast(message: str) -> bytes:
    """Frame a ``broadcast``."""
    return encode("broadcast", {"message": message})


def encode_response(request_id: Any, accepted: bool, context: Context) -> bytes:
    """Frame the ``response`` to a ``connection_request`` (same ``request_id``)."""
    return encode(
        "response",
        {
            "accepted": bool(accepted),
            "client_id": context.client_id,
            "room_id": context.room_id,
            "metadata": context.metadata,
        },
        request_id,
    )


def encode_reject(request_id: Any) -> bytes:
    """Frame the bare rejection sent when deciding a connection request failed."""
    return encode("response", {"accepted": False}, request_id)


def resolve_accepted(result: Any, request: ConnectionRequestContext) -> bool:
    """Return the decision: ``result`` if it is a bool, else ``request.accepted``."""
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
    """Base of the inbound events. ``key`` orders handling: same key, same order."""

    __slots__ = ("key",)
    kind: str = ""

    def __init__(self, key: str | None) -> None:
        self.key = key


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


def _snippet(line: bytes | bytearray) -> str:
    text = bytes(line[:200]).decode("utf-8", "replace")
    return text + ("..." if len(line) > 200 else "")


def _context(
    params: dict[str, Any], action: str, line: bytes | bytearray, required: bool = True
) -> Context | None:
    raw = params.get("context")
    if raw is None and not required:
        return Context()
    if not isinstance(raw, dict):
        logger.warning("Skipping %s without a valid context: %s", action, _snippet(line))
        return None
    client_id = raw.get("client_id", "")
    room_id = raw.get("room_id", "")
    if not isinstance(client_id, str) or not isinstance(room_id, str):
        logger.warning("Skipping %s with a malformed context: %s", action, _snippet(line))
        return None
    metadata = raw.get("metadata")
    return Context(client_id, room_id, {} if metadata is None else metadata)


def decode_event(line: bytes | bytearray) -> Event | None:
    """Decode one inbound line into an :class:`Event`.

    Returns ``None`` (never raises) for heartbeats, unknown actions (debug log)
    and malformed input: invalid JSON or UTF-8, non-object frames, wrong field
    types (warning log).
    """
    try:
        frame = loads(line)
    except (ValueError, TypeError, RecursionError) as exc:
        logger.warning("Skipping an undecodable line (%s): %s", exc, _snippet(line))
        return None
    if not isinstance(frame, dict):
        logger.warning("Skipping a frame that is not a JSON object: %s", _snippet(line))
        return None
    action = frame.get("action")
    params = frame.get("params")
    if params is None:
        params = {}
    elif not isinstance(params, dict):
        logger.warning("Skipping a frame whose params is not an object: %s", _snippet(line))
        return None

    if action == "new_message":
        message = params.get("message")
        if not isinstance(message, str):
            logger.warning("Skipping new_message without a string message: %s", _snippet(line))
            return None
        ctx = _context(params, action, line)
        return None if ctx is None else NewMessage(message, ctx)
    if action == "heartbeat":
        return None
    if action == "connection_request":
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
        try:
            request = ConnectionRequestContext(
                headers=headers, url=url, remote_addr=remote_addr, query=query or ""
            )
        except Exception as exc:  # defensive: odd header values
            logger.warning("Skipping a malformed connection_request (%s): %s", exc, _snippet(line))
            return None
        return ConnectionRequest(request_id, request)
    if action == "new_connection":
        ctx = _context(params, action, line)
        return None if ctx is None else NewConnection(ctx)
    if action == "disconnected":
        ctx = _context(params, action, line)
        return None if ctx is None else Disconnected(ctx)
    if action == "error":
        error = params.get("error", "")
        ctx = _context(params, action, line, required=False)
        if ctx is None:
            return None
        return ErrorEvent(error if isinstance(error, str) else str(error), ctx)
    if isinstance(action, str):
        logger.debug("Ignoring unknown action %r", action)
    else:
        logger.warning("Skipping a frame without an action: %s", _snippet(line))
    return None


# ------------------------------------------------------------------------- backoff


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


# ------------------------------------------------------------------ dropped sends


class DropTracker:
    """Counts sends dropped while disconnected; warns once per disconnected period."""

    __slots__ = ("_lock", "_logger", "period_dropped", "total_dropped")

    def __init__(self, log: logging.Logger) -> None:
        """Report through ``log``."""
        self._lock = threading.Lock()
        self._logger = log
        self.period_dropped = 0
        self.total_dropped = 0

    def drop(self, what: str = "send") -> None:
        """Record one dropped send; the first of a period logs a warning."""
        with self._lock:
            self.period_dropped += 1
            self.total_dropped += 1
            first = self.period_dropped == 1
        if first:
            self._logger.warning(
                "Not connected to the broker: dropping %s (further drops are counted "
                "until the connection is back)",
                what,
            )

    def connected(self) -> None:
        """Close the disconnected period, logging how many sends it dropped."""
        with self._lock:
            count, self.period_dropped = self.period_dropped, 0
        if count:
            self._logger.warning("%d send(s) were dropped while disconnected", count)
