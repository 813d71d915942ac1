"""The sans-I/O protocol session of a backend client: the one place the wire rules live.

Both clients (:mod:`pystrands.client` with threads, :mod:`pystrands.async_client`
with asyncio) and every later transport drive one :class:`Session`; they only move
bytes and run handlers. The session never touches a socket, a thread or an event
loop: bytes go in (:meth:`Session.receive_data`), events for handlers come out,
and :meth:`Session.data_to_send` says what to write next. Time comes from the
``clock`` it was given, so tests drive it with bytes and a fake clock only.

Rules kept here (``docs/protocol.md``):

* **Negotiation**: every link opens with a ``hello`` (with the backend secret when
  one is set), written before anything else and not waited for. The link speaks
  v1 until a hello reply with ``ok: true`` arrives, then v2 until it ends; a reply
  with ``ok: false`` marks the session :attr:`~Session.refused` and the shell
  closes the link.
* **Control frames** never reach handlers: heartbeats are answered (v2 only),
  ``seq``-carrying frames no handler sees count as handled.
* **Acknowledgements** (v2): events are acknowledged cumulatively once their
  handlers returned or raised, in any order (:class:`AckTracker`); the due ``ack``
  rides on the next write, or waits ``ack_delay`` seconds to cover more
  completions (the threading client), but a heartbeat reply always carries it.
* **Silence**: in v2, ``SILENCE_FACTOR`` heartbeat intervals with no byte from
  the broker mean the link is dead (:meth:`Session.check_silence`).
* **Sends while the link is down** are kept in a bounded buffer
  (``max_buffered_sends``, ``buffer_policy``) and written in order right after
  the next link's hello; what the bound drops is counted in
  :attr:`Session.dropped_sends` and logged once per down period. Replies to
  connection requests are never kept: they mean nothing on another link.
* **Rooms, users, presence and moderation** (the v2 feature ``rooms``): the
  hello answer's ``features`` and ``limits`` say whether the link has it
  (:attr:`Session.features`, :attr:`Session.limits`). Commands
  (:meth:`Session.join_room`, ...) are checked here (ids, close code and
  reason), raise :class:`~pystrands.errors.UnsupportedFeature` on a link
  without the feature, are kept like any send while the link is down, and wait
  (with every send made after them, so the order holds) until the hello is
  answered on a link where that is not known yet; kept ones are dropped, with
  one warning, when the next broker lacks the feature. Queries
  (:meth:`Session.query_room_members`, :meth:`Session.query_room_count`) get a
  unique ``request_id``; ``reply`` lines are matched to them here and
  interpreted (members, count, or the broker's error), and a link that ends
  fails them with :class:`~pystrands.errors.BrokerUnavailable`. The shells only
  wait, with their own deadline. ``command_error`` lines are logged.
* **History and room settings** (the v2 feature ``history``): the same rules, for
  its own feature: :meth:`Session.room_config` is a command (checked here: sizes,
  TTL, presence), :meth:`Session.query_room_history` a query whose reply becomes a
  :class:`~pystrands.history.RoomHistory`. A link whose broker does not announce
  ``history`` raises :class:`~pystrands.errors.UnsupportedFeature` for them, whatever
  it says about ``rooms`` (and the other way round).

Each link gets a number (:attr:`Session.link`); completions reported for an event
of an earlier link are ignored, so a handler finishing late never corrupts the
acknowledgements of the next link.

Codec: the native ``pystrands._core.LineDecoder`` (framing and decoding in
Rust, same events, malformed lines decoded by the Python reference) and the
native send encoders (:attr:`Session.encoders`, same bytes) when the extension
has them, else :class:`~pystrands._protocol.LineFramer` +
:func:`~pystrands._protocol.decode_event` and the ``encode_*`` functions. ``PYSTRANDS_PURE_PYTHON=1`` in the
environment forces the pure-Python codec; :attr:`Session.codec` says which one a
session uses. A native decoder that does not keep a ``room_history`` reply's keys (the
one of this release) is bypassed while such a reply is awaited: the reference codec
frames and decodes from the end of the line in progress until no history query waits
(:meth:`Session.receive_data`).

Not thread-safe: the threading client calls it under its lock, the asyncio
client from the loop thread only.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Generic, NamedTuple, TypeVar

from ._protocol import (
    DEFAULT_MAX_LINE_SIZE,
    HEARTBEAT_REPLY,
    HISTORY_FEATURE,
    MAX_CLOSE_REASON_BYTES,
    ROOMS_FEATURE,
    SILENCE_FACTOR,
    CommandError,
    Event,
    Heartbeat,
    HelloReply,
    LineFramer,
    QueryReply,
    Skipped,
    decode_event,
    encode_ack,
    encode_broadcast,
    encode_disconnect,
    encode_hello,
    encode_join_room,
    encode_leave_room,
    encode_private_message,
    encode_room_config,
    encode_room_count,
    encode_room_history,
    encode_room_members,
    encode_room_message,
    encode_user_message,
)
from .context import Context
from .errors import BrokerUnavailable, QueryError, QueryTimeout, UnsupportedFeature
from .history import HistoryMessage, RoomHistory

PURE_PYTHON_ENV = "PYSTRANDS_PURE_PYTHON"
"""Environment variable: set (to anything but ``0`` or empty) to force the pure-Python codec."""


def native_decoder() -> Any | None:
    """The native ``LineDecoder`` class, or ``None`` (no extension, or ``PYSTRANDS_PURE_PYTHON`` set)."""
    if os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
        return None
    try:
        from ._core import LineDecoder
    except ImportError:  # no native extension (or an older one): the pure-Python codec
        return None
    return LineDecoder


@functools.cache
def native_keeps_history(decoder: Any) -> bool:
    """Whether the native ``LineDecoder`` class ``decoder`` keeps a ``room_history`` reply's
    keys (``epoch``, ``offset``, ``messages``); the one that knows only the ``rooms`` replies
    drops them. Asked once per class, by decoding one such reply."""
    probe = b'{"request_id":"q","action":"reply","params":{"epoch":"e","offset":1,"messages":[],"complete":true}}\n'
    try:
        replies = list(decoder().feed(probe))
    except Exception:  # noqa: BLE001 - an odd extension: do not trust it with these replies
        return False
    return len(replies) == 1 and isinstance(replies[0], QueryReply) and "messages" in replies[0].params


class Encoders(NamedTuple):
    """The encoders of the three sends: the session's codec picks the native or the Python ones."""

    room: Callable[[str, str], bytes]
    private: Callable[[str, str], bytes]
    broadcast: Callable[[str], bytes]


PYTHON_ENCODERS = Encoders(encode_room_message, encode_private_message, encode_broadcast)


def native_encoders() -> Encoders | None:
    """The native send encoders, or ``None`` (as :func:`native_decoder`)."""
    if native_decoder() is None:
        return None
    try:
        from ._core import encode_broadcast as broadcast
        from ._core import encode_private_message as private
        from ._core import encode_room_message as room
    except ImportError:  # an extension without them
        return None
    return Encoders(room, private, broadcast)


__all__ = [
    "BUFFER_POLICIES",
    "DEFAULT_MAX_BUFFERED_SENDS",
    "DEFAULT_QUERY_TIMEOUT",
    "HELLO_WAIT",
    "MAX_HISTORY_SIZE",
    "MAX_OFFSET",
    "PURE_PYTHON_ENV",
    "AckTracker",
    "Encoders",
    "Query",
    "Session",
    "check_close",
    "check_history_range",
    "check_id",
    "check_room_config",
    "check_timeout",
    "native_decoder",
    "native_keeps_history",
    "validate_buffer_settings",
]

logger = logging.getLogger("pystrands.session")

DEFAULT_MAX_BUFFERED_SENDS = 10_000
"""Sends kept while the link to the broker is down (per client)."""

BUFFER_POLICIES = ("drop_oldest", "drop_newest")
"""What a full send buffer drops: the oldest kept send, or the new one."""


def validate_buffer_settings(max_buffered_sends: object, buffer_policy: object) -> tuple[int, str]:
    """Check the two buffer settings; a ``ValueError``/``TypeError`` names the bad one."""
    if isinstance(max_buffered_sends, bool) or not isinstance(max_buffered_sends, int):
        raise TypeError(f"max_buffered_sends must be an int, not {max_buffered_sends!r}")
    if not 0 <= max_buffered_sends <= 10_000_000:
        raise ValueError(
            f"max_buffered_sends={max_buffered_sends!r}: must be between 0 and 10000000 "
            "(0 drops every send made while disconnected)"
        )
    if buffer_policy not in BUFFER_POLICIES:
        raise ValueError(f"buffer_policy={buffer_policy!r}: must be 'drop_oldest' or 'drop_newest'")
    return max_buffered_sends, str(buffer_policy)


# ------------------------------------------------------------------ rooms: checks

DEFAULT_QUERY_TIMEOUT = 5.0
"""Seconds a query waits for the broker's reply unless told otherwise."""

HELLO_WAIT = 2.0
"""Seconds after a link came up within which the broker's hello answer is expected. Room
commands made before the answer wait for it (with every later send); when none came in
this time and nothing else either, the link is taken for one without the ``rooms`` and
``history`` features."""

MAX_HISTORY_SIZE = 100_000
"""Largest ``history_size`` of a room and largest ``limit`` of a ``room_history`` query."""

MAX_OFFSET = 2**64 - 1
"""Largest offset the wire carries (an unsigned 64-bit integer)."""


def check_id(what: str, value: object, max_length: int | None = None) -> str:
    """``value`` if it is a usable id: ``TypeError`` unless a str, ``ValueError`` if empty or
    (``max_length`` known) longer than ``max_length`` UTF-8 bytes."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if max_length is not None and len(value) * 4 > max_length:  # else it fits in any encoding
        size = len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
        if size > max_length:
            raise ValueError(
                f"{what} {value[:40]!r}{'...' if len(value) > 40 else ''} is {size} bytes long; "
                f"the broker's max_id_length is {max_length}"
            )
    return value


def check_close(code: object, reason: object) -> tuple[int, str]:
    """A WebSocket close ``code`` (1000 or 4000-4999; a bool is not one) and ``reason``
    (a str of at most 123 UTF-8 bytes) for ``disconnect_client``; ``ValueError`` /
    ``TypeError`` name the bad one."""
    if isinstance(code, bool) or not isinstance(code, int) or not (code == 1000 or 4000 <= code <= 4999):
        raise ValueError(f"code={code!r}: a close code must be the int 1000 or 4000-4999")
    code = int(code)  # an IntEnum close code as the plain number
    if not isinstance(reason, str):
        raise TypeError(f"reason must be a str, not {type(reason).__name__}")
    try:
        size = len(reason.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"reason={reason!r} is not valid UTF-8 text") from None
    if size > MAX_CLOSE_REASON_BYTES:
        raise ValueError(
            f"reason is {size} bytes of UTF-8; a WebSocket close reason holds at most "
            f"{MAX_CLOSE_REASON_BYTES}: {reason[:40]!r}..."
        )
    return code, reason


def _seconds(what: str, value: object) -> float:
    """``value`` as a positive finite number of seconds (an int or a float; a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond any float
        seconds = float("inf")
    if not 0.0 < seconds < float("inf"):
        raise ValueError(f"{what}={value!r}: must be a positive number of seconds")
    return seconds


def check_timeout(timeout: object) -> float:
    """A query ``timeout``: a positive finite number of seconds."""
    return _seconds("timeout", timeout)


def _int_in(what: str, value: object, low: int, high: int, hint: str = "") -> int:
    """``value`` if it is an int (not a bool) between ``low`` and ``high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{what}={value!r}: must be between {low} and {high}{hint}")
    return int(value)  # an IntEnum as the plain number


def check_room_config(history_size: object = None, history_ttl: object = None, presence: object = None) -> dict[str, Any]:
    """The params a ``room_config`` sets: only the given ones (``None``: leave it as it is),
    at least one. ``history_size`` an int 0-100000 (0 turns the room's history off),
    ``history_ttl`` a positive finite number of seconds, ``presence`` a bool; ``TypeError`` /
    ``ValueError`` name the bad one."""
    settings: dict[str, Any] = {}
    if history_size is not None:
        settings["history_size"] = _int_in(
            "history_size", history_size, 0, MAX_HISTORY_SIZE, " (0 turns the room's history off)"
        )
    if history_ttl is not None:
        settings["history_ttl"] = _seconds("history_ttl", history_ttl)
    if presence is not None:
        if not isinstance(presence, bool):
            raise TypeError(f"presence must be a bool, not {type(presence).__name__}")
        settings["presence"] = presence
    if not settings:
        raise ValueError("room_config needs at least one of history_size, history_ttl, presence")
    return settings


def check_history_range(since: object, limit: object) -> tuple[int, int | None]:
    """``since`` (an offset: an int >= 0) and ``limit`` (``None``: every message, or an int
    1-100000) of a ``room_history`` query; ``TypeError`` / ``ValueError`` name the bad one."""
    since = _int_in("since", since, 0, MAX_OFFSET, " (an offset of the room's stream)")
    if limit is not None:
        limit = _int_in("limit", limit, 1, MAX_HISTORY_SIZE, " (None: every message)")
    return since, limit


def _exclude_list(exclude: object) -> list[str]:
    """``exclude`` of ``send_room_message`` (a client id or an iterable of them) as a list
    without duplicates, in order. Client ids have no length limit (``max_id_length`` is for
    room and user ids)."""
    if exclude is None:
        return []
    if isinstance(exclude, str):
        return [check_id("exclude", exclude)]
    if isinstance(exclude, (bytes, bytearray)) or not isinstance(exclude, Iterable):
        raise TypeError(f"exclude must be a client id (str) or an iterable of them, not {type(exclude).__name__}")
    ids = [check_id("exclude client id", item) for item in exclude]
    return list(dict.fromkeys(ids)) if len(ids) > 1 else ids


class _FeatureFrame(bytes):
    """A frame of a negotiated feature: only for a link whose broker announced :attr:`feature`."""

    feature = ROOMS_FEATURE
    query = False  # a query's frame belongs to its link (never kept for another)


class _RoomsFrame(_FeatureFrame):
    """A command of the ``rooms`` feature."""


class _QueryFrame(_FeatureFrame):
    """A query of the ``rooms`` feature."""

    query = True


class _HistoryFrame(_FeatureFrame):
    """A command of the ``history`` feature."""

    feature = HISTORY_FEATURE


class _HistoryQueryFrame(_FeatureFrame):
    """A query of the ``history`` feature."""

    feature = HISTORY_FEATURE
    query = True


_COMMAND_FRAMES: dict[str, type[_FeatureFrame]] = {ROOMS_FEATURE: _RoomsFrame, HISTORY_FEATURE: _HistoryFrame}
_QUERY_FRAMES: dict[str, type[_FeatureFrame]] = {ROOMS_FEATURE: _QueryFrame, HISTORY_FEATURE: _HistoryQueryFrame}

_COMMANDS = {
    ROOMS_FEATURE: "room/user command(s) (join_room, leave_room, send_room_message with exclude, "
    "send_user_message, disconnect_client)",
    HISTORY_FEATURE: "room_config command(s)",
}
"""What the kept commands of each feature are, for the warning that drops them."""

_LACKS = {
    ROOMS_FEATURE: "does not support rooms/users (a 1.0 broker?)",
    HISTORY_FEATURE: "does not keep room history (no 'history' feature: a 1.0 or older broker?)",
}
"""How a broker without each feature is described in errors and warnings."""


T = TypeVar("T")

_query_ids = itertools.count(1)


class Query(Generic[T]):
    """One query waiting for the broker's ``reply`` (made by :meth:`Session.query_room_members`,
    :meth:`Session.query_room_count` or :meth:`Session.query_room_history`, resolved by the
    session). :attr:`feature` is the protocol feature it needs.

    :attr:`done` turns true when the reply came or the query failed; ``on_done``
    (given by the shell) is called then, from wherever the session is driven.
    :meth:`result` returns the value or raises the error.
    """

    __slots__ = (
        "request_id",
        "action",
        "room_id",
        "timeout",
        "feature",
        "done",
        "on_done",
        "_value",
        "_error",
        "_interpret",
    )

    def __init__(
        self,
        action: str,
        room_id: str,
        timeout: float,
        interpret: Callable[[Query[T], dict[str, Any]], T],
        on_done: Callable[[], None] | None,
        feature: str = ROOMS_FEATURE,
    ) -> None:
        """A pending query with a fresh unique ``request_id``."""
        self.request_id = f"q{next(_query_ids)}"
        self.action = action
        self.room_id = room_id
        self.timeout = timeout
        self.feature = feature
        self.done = False
        self.on_done = on_done
        self._value: T | None = None
        self._error: BaseException | None = None
        self._interpret = interpret

    def __repr__(self) -> str:
        return f"{self.action}({self.room_id!r})"

    def result(self) -> T:
        """The answer; raises the query's error (or ``RuntimeError`` if it is not done)."""
        if self._error is not None:
            raise self._error
        if not self.done:
            raise RuntimeError(f"{self!r}: no answer yet")
        return self._value  # type: ignore[return-value]

    def _finish(self, value: T | None = None, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.done = True
        self._value = value
        self._error = error
        callback = self.on_done
        if callback is not None:
            callback()

    def _answer(self, params: dict[str, Any]) -> None:
        """Interpret the reply's params (the broker's error, or the answer)."""
        error = params.get("error")
        if error is not None:
            self._finish(error=QueryError(f"{self!r}: the broker answered: {error}"))
            return
        try:
            value = self._interpret(self, params)
        except QueryError as exc:
            self._finish(error=exc)
        else:
            self._finish(value)


def _members(query: Query[list[Context]], params: dict[str, Any], log: logging.Logger) -> list[Context]:
    raw = params.get("members")
    if not isinstance(raw, list):
        raise QueryError(f"{query!r}: malformed reply from the broker (no members list)")
    members = []
    bad = 0
    for item in raw:  # Contexts, None for a malformed one (decoded so by either codec)
        if isinstance(item, Context):
            members.append(item)
        else:
            bad += 1
    if bad:
        log.warning("%r: skipped %d malformed member context(s) in the broker's reply", query, bad)
    if params.get("complete") is False:
        missing = params.get("missing")
        nodes = ", ".join(str(n) for n in missing) if isinstance(missing, list) and missing else "unknown"
        log.warning(
            "%r is incomplete: broker node(s) %s did not answer in time; returning the %d member(s) "
            "of the nodes that did",
            query,
            nodes,
            len(members),
        )
    return members


def _count(query: Query[int], params: dict[str, Any]) -> int:
    count = params.get("count")
    if type(count) is not int or count < 0:
        raise QueryError(f"{query!r}: malformed reply from the broker (count={count!r})")
    return count


def _history(query: Query[RoomHistory], params: dict[str, Any]) -> RoomHistory:
    """A ``room_history`` reply as a :class:`RoomHistory`. Strict: a reply with a message that
    is not ``{"offset": int > 0, "data": str}`` fails the query as a whole (skipping one would
    be a silent gap in a history its caller relies on)."""
    epoch = params.get("epoch")
    offset = params.get("offset")
    raw = params.get("messages")
    complete = params.get("complete")
    if not isinstance(epoch, str) or type(offset) is not int or offset < 0 or not isinstance(raw, list) or type(complete) is not bool:
        raise QueryError(
            f"{query!r}: malformed reply from the broker (epoch={epoch!r}, offset={offset!r}, "
            f"complete={complete!r}, messages of type {type(raw).__name__})"
        )
    messages = []
    for item in raw:
        if isinstance(item, dict):
            at = item.get("offset")
            data = item.get("data")
            if type(at) is int and at > 0 and isinstance(data, str):
                messages.append(HistoryMessage(at, data))
                continue
        text = repr(item)
        raise QueryError(
            f"{query!r}: malformed reply from the broker (message {text[:80]}{'...' if len(text) > 80 else ''})"
        )
    return RoomHistory(epoch, offset, messages, complete)


# --------------------------------------------------------------- acknowledgements


class AckTracker:
    """Cumulative acknowledgement watermark of one v2 link.

    :meth:`dispatch` is called for every event handed to a handler, in arrival
    order (so in ``seq`` order), :meth:`skip` for ``seq``-carrying frames no
    handler sees. Handlers of different WebSocket clients finish in any order;
    each completion calls :meth:`done`. :attr:`watermark` is the highest ``seq``
    such that every event at or below it was handled (a ``seq`` never received,
    e.g. lost in an undecodable line, counts as handled). :attr:`sent` is the
    last watermark written in an ``ack``; :meth:`take` moves it.

    O(1) per event when handlers finish in order; a completion ahead of an
    unfinished event is parked in a set until the watermark reaches it.
    """

    __slots__ = ("_inflight", "_finished", "_top", "watermark", "sent")

    def __init__(self) -> None:
        """Start a link's tracking: nothing dispatched, nothing acknowledged."""
        self._inflight: deque[int] = deque()  # dispatched, not yet behind the watermark
        self._finished: set[int] = set()  # done, but behind an unfinished event
        self._top = 0  # highest seq seen
        self.watermark = 0
        self.sent = 0

    @property
    def due(self) -> bool:
        """True when the watermark moved past the last ``ack`` sent."""
        return self.watermark > self.sent

    @property
    def pending(self) -> int:
        """Events dispatched and not yet behind the watermark."""
        return len(self._inflight)

    def dispatch(self, seq: int) -> bool:
        """Record that the event ``seq`` goes to a handler.

        Returns ``False`` (the event must then not be acknowledged) for a ``seq``
        not above every one seen before: duplicates or reordering by the broker.
        """
        top = self._top
        if seq <= top:
            logger.warning("Event seq %d arrived after seq %d; it will not be acknowledged", seq, top)
            return False
        if seq != top + 1:
            logger.warning(
                "Events seq %d..%d were not received intact; acknowledging them as skipped",
                top + 1,
                seq - 1,
            )
        self._top = seq
        self._inflight.append(seq)
        return True

    def skip(self, seq: int) -> bool:
        """Record a ``seq`` that no handler will see; ``True`` if the watermark moved."""
        if seq <= self._top:
            return False
        self._top = seq
        if self._inflight:
            return False
        self.watermark = seq
        return True

    def done(self, seq: int) -> bool:
        """Record that the handler of ``seq`` finished; ``True`` if the watermark moved."""
        inflight = self._inflight
        if not inflight or inflight[0] != seq:
            self._finished.add(seq)
            return False
        inflight.popleft()
        finished = self._finished
        if finished:
            while inflight and inflight[0] in finished:
                finished.discard(inflight.popleft())
        self.watermark = inflight[0] - 1 if inflight else self._top
        return True

    def take(self) -> int:
        """Return the watermark to acknowledge now (``0``: nothing new) and mark it sent."""
        watermark = self.watermark
        if watermark <= self.sent:
            return 0
        self.sent = watermark
        return watermark


# ------------------------------------------------------------------------ session


class Session:
    """Protocol state of one backend client, across all its links to the broker.

    The shell calls :meth:`connection_made` when a link is up,
    :meth:`receive_data` with every chunk read, :meth:`event_done` when a
    handler finished, :meth:`send` for every outgoing frame,
    :meth:`data_to_send` whenever it can write, :meth:`check_silence` at
    :meth:`next_deadline`, and :meth:`connection_lost` when the link is gone.

    Args:
        backend_secret: Sent in every ``hello``; never logged.
        max_line_size: Largest inbound line; longer ones are dropped and the
            stream resyncs at the next newline.
        max_buffered_sends: Sends kept while the link is down (``0``: none).
        buffer_policy: ``"drop_oldest"`` (default) or ``"drop_newest"``: what a
            full buffer drops.
        ack_delay: Seconds a due ``ack`` may wait to cover more completions
            (``0``: it goes with the next write).
        clock: Monotonic time source in seconds.
        peer: ``host:port`` of the broker, named in log lines.
        codec: ``"native"`` or ``"python"`` for the inbound codec; ``None``
            (default): native when available and ``PYSTRANDS_PURE_PYTHON`` is unset.
        log: Where broker ``command_error`` lines and incomplete query answers
            are logged (the client's logger); default ``pystrands.session``.

    :attr:`codec` is the inbound codec in use; :attr:`framer` is its framer
    (a ``LineFramer``, or the native ``LineDecoder``), with ``dropped_lines``,
    ``buffered``, ``max_line_size`` and ``reset()`` either way. (While a native
    session awaits a ``room_history`` reply that its ``LineDecoder`` would not keep,
    a ``LineFramer`` of its own reads instead: see :meth:`receive_data`.)
    """

    __slots__ = (
        "_secret",
        "peer",
        "_max_buffered",
        "_drop_oldest",
        "_ack_delay",
        "_clock",
        "codec",
        "_native",
        "encoders",
        "framer",
        "link",
        "open",
        "acks",
        "refused",
        "heartbeat_interval",
        "silence_limit",
        "last_read",
        "_out",
        "out_bytes",
        "_hello",
        "_ack_at",
        "_ack_now",
        "_backlog",
        "dropped_sends",
        "_period_dropped",
        "_log",
        "features",
        "limits",
        "_held",
        "_hello_at",
        "_queries",
        "_lossy_replies",
        "_reference",
        "_on_reference",
        "_mid_line",
    )

    def __init__(
        self,
        *,
        backend_secret: str | None = None,
        max_line_size: int = DEFAULT_MAX_LINE_SIZE,
        max_buffered_sends: int = DEFAULT_MAX_BUFFERED_SENDS,
        buffer_policy: str = "drop_oldest",
        ack_delay: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        peer: str = "",
        codec: str | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        """Create a session with no link yet (sends are kept until one is up)."""
        self._max_buffered, policy = validate_buffer_settings(max_buffered_sends, buffer_policy)
        self._drop_oldest = policy == "drop_oldest"
        self._secret = backend_secret
        self.peer = peer  # "host:port" of the broker, for log lines
        self._ack_delay = max(0.0, float(ack_delay))
        self._clock = clock
        if codec not in (None, "native", "python"):
            raise ValueError(f"codec must be 'native', 'python' or None, not {codec!r}")
        decoder = None if codec == "python" else native_decoder()
        if codec == "native" and decoder is None:
            raise RuntimeError("the native codec is not available (no pystrands._core.LineDecoder, or PYSTRANDS_PURE_PYTHON set)")
        self._native = decoder is not None
        self.codec = "native" if self._native else "python"
        self.framer: Any = LineFramer(max_line_size) if decoder is None else decoder(max_line_size)
        self.encoders = (native_encoders() if self._native else None) or PYTHON_ENCODERS
        self.link = 0  # number of the current (or last) link; 0: none yet
        self.open = False
        self.acks: AckTracker | None = None  # set while the link speaks v2
        self.refused = False  # the broker refused our hello on the current link
        self.heartbeat_interval = 0.0
        self.silence_limit = 0.0
        self.last_read = 0.0
        self._out: list[bytes] = []  # frames for the current link, in order
        self.out_bytes = 0
        self._hello = b""  # the hello still to write on the current link
        self._ack_at = 0.0  # when a delayed ack becomes due (ack_delay > 0)
        self._ack_now = False  # the next write carries the due ack whatever the delay
        self._backlog: deque[bytes] = deque()  # sends made while the link is down
        self.dropped_sends = 0
        self._period_dropped = 0
        self._log = log or logger
        self.features: frozenset[str] | None = None  # the current link's; None: not known (yet)
        self.limits: dict[str, int] = {}  # the last limits a broker announced
        self._held: list[bytes] = []  # sends waiting for the hello answer (after a room command)
        self._hello_at = 0.0  # when the hello answer is given up on (HELLO_WAIT after link up)
        self._queries: dict[str, Query[Any]] = {}  # request_id -> query waiting for its reply
        # The native decoder drops a history reply's keys: the reference codec reads meanwhile.
        self._lossy_replies = decoder is not None and not native_keeps_history(decoder)
        self._reference: LineFramer | None = None  # its framer, made on first use
        self._on_reference = False  # the reference codec reads the link now
        self._mid_line = False  # the last bytes read did not end with a newline

    def use_clock(self, clock: Callable[[], float]) -> None:
        """Take time from ``clock`` from now on (the asyncio client passes its loop's)."""
        self._clock = clock
        self.last_read = clock()

    # ------------------------------------------------------------------ the link

    @property
    def version(self) -> int:
        """``2`` once the broker accepted the hello on the current link, else ``1``."""
        return 2 if self.acks is not None else 1

    @property
    def buffered(self) -> int:
        """Sends kept for the next link."""
        return len(self._backlog)

    def connection_made(self) -> int:
        """A new link is up: the hello goes first, then every kept send, in order.

        Returns the link's number (hand it back to :meth:`event_done`).
        """
        self.link += 1
        self.open = True
        self.framer.reset()
        self._on_reference = False
        self._mid_line = False
        self.acks = None
        self.refused = False
        self.heartbeat_interval = 0.0
        self.silence_limit = 0.0
        self.last_read = self._clock()
        self._ack_at = 0.0
        self._ack_now = False
        self._hello = encode_hello(self._secret)
        self.features = None
        self._held = []
        self._hello_at = self.last_read + HELLO_WAIT
        backlog = self._backlog
        if self._period_dropped:
            logger.warning(
                "%d send(s) were dropped while disconnected (max_buffered_sends=%d)",
                self._period_dropped,
                self._max_buffered,
            )
            self._period_dropped = 0
        if backlog:
            logger.info("Sending %d message(s) kept while disconnected", len(backlog))
            self._out = list(backlog)
            backlog.clear()
            for i, frame in enumerate(self._out):
                if isinstance(frame, _FeatureFrame):  # it and what follows wait for the hello answer
                    self._held = self._out[i:]
                    del self._out[i:]
                    break
            self.out_bytes = sum(len(frame) for frame in self._out)
        else:
            self._out = []
            self.out_bytes = 0
        return self.link

    def connection_lost(self, quiet: bool = False) -> int:
        """The link is gone; returns how many queued frames it never wrote (lost, and
        logged unless ``quiet``: an intentional close)."""
        lost = len(self._out) + (1 if self._hello else 0)
        if lost and not quiet:
            logger.warning("Connection closed with %d frame(s) not written", lost)
        self.open = False
        self.acks = None
        self._out = []
        self.out_bytes = 0
        self._hello = b""
        self._ack_now = False
        self._ack_at = 0.0
        self.features = None
        held, self._held = self._held, []
        for frame in held:  # never written: kept for the next link like any send made now
            if not (isinstance(frame, _FeatureFrame) and frame.query):
                self._keep(frame, "send")
        self.fail_queries(f"the connection to the broker at {self.peer or '?'} was lost before the reply")
        return lost

    # --------------------------------------------------------------------- input

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the link; returns the events for handlers, in order.

        Control frames are handled here. After a refused hello the rest is
        ignored and :attr:`refused` is set: the shell closes the link.
        """
        self.last_read = self._clock()
        events: list[Event] = []
        if not self.open:
            return events
        decoded: Iterable[Event | None]
        if self._lossy_replies:
            decoded = self._feed_lossy(data)
        elif self._native:  # frames and decodes; falls back to decode_event for odd lines
            decoded = self.framer.feed(data)
        else:
            decoded = map(decode_event, self.framer.feed(data))
        for event in decoded:
            if event is None:
                continue
            if self.features is None and type(event) is not HelloReply:
                self._decide(frozenset(), "it sent something else before answering the hello (a v1 broker)")
            if event.control:
                self._control(event)
                if self.refused:
                    break
                continue
            if event.seq:
                acks = self.acks
                if acks is None or not acks.dispatch(event.seq):
                    event.seq = 0  # v1 link, or out of order: never acknowledged
            events.append(event)
        return events

    def _feed_lossy(self, data: bytes) -> Iterable[Event | None]:
        """Frame and decode ``data`` on a native session whose decoder drops the keys of a
        ``room_history`` reply: with the native decoder, except while a history query waits
        for its reply, when the reference codec (``LineFramer`` + ``decode_event``) reads.

        A switch happens at a line boundary: the codec that holds the start of the line in
        progress (the last bytes read did not end with a newline) reads up to its end, the
        other one from there. The reply of a query starts after the query was made, so it
        is never in a line begun before that.
        """
        on_reference = self._on_reference
        mid_line = self._mid_line
        if data:
            self._mid_line = data[-1] != 0x0A  # b"\n"
        queries = self._queries
        want = bool(queries) and any(q.feature == HISTORY_FEATURE for q in queries.values())
        if want == on_reference:
            return self._decode(on_reference, data)
        head = b""
        if mid_line:  # the current codec ends the line it holds
            newline = data.find(b"\n")
            if newline < 0:
                return self._decode(on_reference, data)
            head, data = data[: newline + 1], data[newline + 1 :]
        before = self._decode(on_reference, head) if head else ()
        self._on_reference = want
        if want:
            if self._reference is None:
                self._reference = LineFramer(self.framer.max_line_size)
            self._reference.reset()
        else:
            self.framer.reset()
        return itertools.chain(before, self._decode(want, data))

    def _decode(self, reference: bool, data: bytes) -> Iterable[Event | None]:
        """The events of ``data`` read by the reference codec, or by the native decoder."""
        if reference and self._reference is not None:
            return map(decode_event, self._reference.feed(data))
        decoded: Iterable[Event | None] = self.framer.feed(data)
        return decoded

    def _control(self, event: Event) -> None:
        acks = self.acks
        if type(event) is Heartbeat:
            if acks is not None:
                self._out.append(HEARTBEAT_REPLY)
                self.out_bytes += len(HEARTBEAT_REPLY)
                self._ack_now = True  # the reply carries the due ack
        elif type(event) is Skipped:
            if acks is not None and acks.skip(event.seq):
                self._ack_moved()
        elif isinstance(event, HelloReply):
            if not event.ok:
                logger.error(
                    "The broker at %s refused this backend: %s (check backend_secret / "
                    "PYSTRANDS_BACKEND_SECRET); closing the connection",
                    self.peer or "?",
                    event.error or "no reason given",
                )
                self.refused = True
            elif acks is None:
                self.acks = AckTracker()
                self.heartbeat_interval = event.heartbeat_interval
                self.silence_limit = SILENCE_FACTOR * event.heartbeat_interval
                if event.limits:
                    self.limits = dict(event.limits)
                logger.info(
                    "Protocol v2 with the broker (acks, heartbeats every %ss%s)",
                    event.heartbeat_interval or "?",
                    "".join(f", {f}" for f in (ROOMS_FEATURE, HISTORY_FEATURE) if f in event.features),
                )
                self._decide(frozenset(event.features), "its hello answer does not list '{feature}'")
        elif isinstance(event, QueryReply):
            query = self._queries.pop(event.request_id, None)
            if query is None:
                logger.debug("Ignoring a reply to no pending query (request_id %r)", event.request_id)
            else:
                query._answer(event.params)
        elif isinstance(event, CommandError):
            self._log.warning(
                "The broker refused %s (request_id %r): %s", event.command, event.request_id, event.error
            )

    def event_done(self, link: int, seq: int) -> bool:
        """The handler of event ``seq`` of link ``link`` returned or raised.

        Returns ``True`` when an ``ack`` became due (the shell arranges a write).
        """
        acks = self.acks
        if acks is None or link != self.link or not acks.done(seq):
            return False
        self._ack_moved()
        return True

    def _ack_moved(self) -> None:
        if self._ack_delay and not self._ack_at:
            self._ack_at = self._clock() + self._ack_delay

    # -------------------------------------------------------------------- output

    def send(self, frame: bytes, what: str = "send", keep: bool = True, link: int = 0) -> bool:
        """Queue one frame; ``True`` if it goes on the live link (the shell writes it).

        While the link is down the frame is kept for the next link (``keep``
        false: dropped), within ``max_buffered_sends``. A frame that belongs to
        one link (``link``: a reply to a connection request) is dropped unless
        that link is the live one.
        """
        if self.open and (not link or link == self.link):
            if self._held and not link:  # behind a room command waiting for the hello answer
                self._held.append(frame)
                return False
            self._out.append(frame)
            self.out_bytes += len(frame)
            return True
        if link:  # its link is gone: the broker already failed that request
            self.dropped_sends += 1
            logger.debug("Dropping %s: its connection is closed", what)
            return False
        if keep:
            self._keep(frame, what)
        else:
            self._dropped(what)
        return False

    def _keep(self, frame: bytes, what: str) -> None:
        """Keep ``frame`` for the next link, within ``max_buffered_sends``."""
        if self._max_buffered:
            backlog = self._backlog
            if len(backlog) < self._max_buffered:
                backlog.append(frame)
                return
            if self._drop_oldest:
                backlog.popleft()
                backlog.append(frame)
            what = f"{what} (buffer of {self._max_buffered} full, policy {'drop_oldest' if self._drop_oldest else 'drop_newest'})"
        self._dropped(what)

    def _dropped(self, what: str) -> None:
        self.dropped_sends += 1
        self._period_dropped += 1
        if self._period_dropped == 1:
            logger.warning(
                "Not connected to the broker: dropping %s (further drops are counted "
                "until the connection is back)",
                what,
            )

    def ack_now(self) -> None:
        """Let the next write carry the due ``ack`` whatever ``ack_delay`` says."""
        self._ack_now = True

    def wants_write(self, now: float | None = None) -> bool:
        """True when :meth:`data_to_send` has something for the link now."""
        if not self.open:
            return False
        if self._hello or self._out:
            return True
        return self._ack_ready(now)

    def _ack_ready(self, now: float | None) -> bool:
        acks = self.acks
        if acks is None or acks.watermark <= acks.sent:
            return False
        if not self._ack_delay or self._ack_now:
            return True
        return (self._clock() if now is None else now) >= self._ack_at

    def data_to_send(self, now: float | None = None) -> bytes:
        """Everything to write now, in wire order: hello, frames, the due ack."""
        if not self.open:
            return b""
        out = self._out
        acks = self.acks
        if acks is not None and self._ack_ready(now):
            out.append(encode_ack(acks.take()))
            self._ack_at = 0.0
        self._ack_now = False
        hello = self._hello
        if hello:
            self._hello = b""
            out.insert(0, hello)
        if not out:
            return b""
        self._out = []
        self.out_bytes = 0
        if len(out) == 1:
            frame = out[0]
            return frame if type(frame) is bytes else bytes(frame)
        return b"".join(out)

    # ---------------------------------------------------------------------- rooms

    @property
    def rooms(self) -> bool | None:
        """Whether the current link has the ``rooms`` feature: ``None`` while that is not
        known (no link, or the hello is not answered yet)."""
        features = self.features
        if not self.open or features is None:
            return None
        return ROOMS_FEATURE in features

    @property
    def history(self) -> bool | None:
        """Whether the current link has the ``history`` feature (as :attr:`rooms`)."""
        features = self.features
        if not self.open or features is None:
            return None
        return HISTORY_FEATURE in features

    @property
    def max_id_length(self) -> int | None:
        """The broker's ``max_id_length`` (UTF-8 bytes of an id), when one announced it."""
        return self.limits.get("max_id_length")

    @property
    def hello_deadline(self) -> float:
        """When the shell must call :meth:`check_hello` (``0.0``: no need): sends wait for
        the hello answer on this link."""
        return self._hello_at if self._held and self.features is None and self.open else 0.0

    def check_hello(self, now: float | None = None) -> bool:
        """At :attr:`hello_deadline`: without a hello answer by then, the link is taken for
        one without ``rooms`` or ``history`` and the sends that waited go out (the commands
        of those features among them are dropped, logged). ``True`` when frames were
        released (the shell writes)."""
        if not self._held or self.features is not None or not self.open:
            return False
        if (self._clock() if now is None else now) < self._hello_at:
            return False
        self._decide(frozenset(), f"it did not answer the hello within {HELLO_WAIT:g}s")
        return bool(self._out)

    def _decide(self, features: frozenset[str], why: str) -> None:
        """The link's features are known now: release or drop what waited for them
        (``why``, logged, may name the missing feature as ``{feature}``)."""
        self.features = features
        held = self._held
        if held:
            self._held = []
            out = self._out
            dropped: dict[str, int] = {}
            for frame in held:
                if isinstance(frame, _FeatureFrame) and frame.feature not in features:
                    if not frame.query:
                        dropped[frame.feature] = dropped.get(frame.feature, 0) + 1
                    continue
                out.append(frame)
                self.out_bytes += len(frame)
            for feature, count in dropped.items():
                logger.warning(
                    "Dropping %d %s: the broker at %s %s: %s",
                    count,
                    _COMMANDS[feature],
                    self.peer or "?",
                    _LACKS[feature],
                    why.format(feature=feature),
                )
        queries = self._queries
        if queries and not all(q.feature in features for q in queries.values()):
            for query in list(queries.values()):
                if query.feature not in features:
                    del queries[query.request_id]
                    query._finish(error=UnsupportedFeature(self._unsupported(repr(query), query.feature)))

    def _unsupported(self, what: str, feature: str = ROOMS_FEATURE) -> str:
        return f"{what} needs the '{feature}' feature, and the broker at {self.peer or '?'} {_LACKS[feature]}"

    def _link_features(self) -> frozenset[str] | None:
        """The live link's features; ``None`` while its hello answer may still come. Past
        :data:`HELLO_WAIT` with nothing held, the link counts as one without features (what is
        held is released by the shell's timer)."""
        if self.features is None and not self._held and self._clock() >= self._hello_at:
            self._decide(frozenset(), f"it did not answer the hello within {HELLO_WAIT:g}s")
        return self.features

    def command(self, frame: bytes, what: str, feature: str = ROOMS_FEATURE) -> bool:
        """Queue the frame of a command of ``feature`` (``rooms``, ``history``); ``True`` if it
        goes on the live link now (the shell writes it). Kept while the link is down; waits
        (with later sends) for the hello answer; raises :class:`UnsupportedFeature` on a link
        without the feature."""
        if not self.open:
            self._keep(_COMMAND_FRAMES[feature](frame), what)
            return False
        features = self._link_features()
        if features is None:
            self._held.append(_COMMAND_FRAMES[feature](frame))
            return False
        if feature not in features:
            raise UnsupportedFeature(self._unsupported(what, feature))
        self._out.append(frame)
        self.out_bytes += len(frame)
        return True

    def join_room(self, client_id: str, room_id: str) -> bool:
        """Queue ``join_room`` (checked first; see :meth:`command`)."""
        limit = self.max_id_length
        frame = encode_join_room(check_id("client_id", client_id), check_id("room_id", room_id, limit))
        return self.command(frame, "join_room")

    def leave_room(self, client_id: str, room_id: str) -> bool:
        """Queue ``leave_room`` (checked first; see :meth:`command`)."""
        limit = self.max_id_length
        frame = encode_leave_room(check_id("client_id", client_id), check_id("room_id", room_id, limit))
        return self.command(frame, "leave_room")

    def room_message(self, room_id: str, message: Any, exclude: object) -> bool:
        """Queue ``message_to_room`` with ``exclude`` (a client id or several; see
        :meth:`command`). Without any id to exclude it is the plain v1 send."""
        limit = self.max_id_length
        ids = _exclude_list(exclude)
        if not ids:
            return self.send(self.encoders.room(room_id, message), "message_to_room")
        return self.command(encode_room_message(check_id("room_id", room_id, limit), message, None, ids), "message_to_room")

    def user_message(self, user_id: str, message: Any) -> bool:
        """Queue ``message_to_user`` (checked first; see :meth:`command`)."""
        frame = encode_user_message(check_id("user_id", user_id, self.max_id_length), message)
        return self.command(frame, "message_to_user")

    def disconnect_client(self, client_id: str, code: int = 1000, reason: str = "") -> bool:
        """Queue ``disconnect`` (checked first; see :meth:`command`)."""
        client_id = check_id("client_id", client_id)
        code, reason = check_close(code, reason)
        return self.command(encode_disconnect(client_id, code, reason), "disconnect")

    def room_config(
        self,
        room_id: str,
        *,
        history_size: int | None = None,
        history_ttl: float | None = None,
        presence: bool | None = None,
    ) -> bool:
        """Queue ``room_config`` (``history`` feature) with the given settings only (checked
        first, see :func:`check_room_config`; then as :meth:`command`)."""
        room_id = check_id("room_id", room_id, self.max_id_length)
        settings = check_room_config(history_size, history_ttl, presence)
        return self.command(encode_room_config(room_id, settings), "room_config", HISTORY_FEATURE)

    # -------------------------------------------------------------------- queries

    @property
    def pending_queries(self) -> int:
        """Queries waiting for their reply."""
        return len(self._queries)

    def query_room_members(
        self, room_id: str, timeout: float = DEFAULT_QUERY_TIMEOUT, on_done: Callable[[], None] | None = None
    ) -> Query[list[Context]]:
        """Start a ``room_members`` query (see :meth:`_query`)."""
        log = self._log
        return self._query("room_members", room_id, timeout, lambda q, p: _members(q, p, log), on_done)

    def query_room_count(
        self, room_id: str, timeout: float = DEFAULT_QUERY_TIMEOUT, on_done: Callable[[], None] | None = None
    ) -> Query[int]:
        """Start a ``room_count`` query (see :meth:`_query`)."""
        return self._query("room_count", room_id, timeout, _count, on_done)

    def query_room_history(
        self,
        room_id: str,
        since: int = 0,
        limit: int | None = None,
        timeout: float = DEFAULT_QUERY_TIMEOUT,
        on_done: Callable[[], None] | None = None,
    ) -> Query[RoomHistory]:
        """Start a ``room_history`` query (``history`` feature): the room's messages after
        offset ``since``, the newest ``limit`` of them (``None``: all). See :meth:`_query`;
        ``since`` and ``limit`` are checked first (:func:`check_history_range`)."""
        since, limit = check_history_range(since, limit)
        return self._query(
            "room_history",
            room_id,
            timeout,
            _history,
            on_done,
            HISTORY_FEATURE,
            lambda room, _timeout, request_id: encode_room_history(room, since, limit, request_id),
        )

    def _query(
        self,
        action: str,
        room_id: str,
        timeout: float,
        interpret: Callable[[Query[T], dict[str, Any]], T],
        on_done: Callable[[], None] | None,
        feature: str = ROOMS_FEATURE,
        encode: Callable[[str, float, str], bytes] | None = None,
    ) -> Query[T]:
        """Check the arguments, register the query and queue its frame (the shell writes
        when :meth:`wants_write`). Raises :class:`BrokerUnavailable` without a link and
        :class:`UnsupportedFeature` on a link without ``feature``; on a link whose hello is
        not answered yet the frame waits for the answer. ``encode(room_id, timeout,
        request_id)`` makes the frame (default: the ``rooms`` queries').

        ``timeout`` goes in the ``rooms`` queries too: the broker answers within a part of it
        (80%), with what it has, so that a partial answer arrives before the caller gives up.
        """
        room_id = check_id("room_id", room_id, self.max_id_length)
        timeout = check_timeout(timeout)
        query = Query(action, room_id, timeout, interpret, on_done, feature)
        if not self.open:
            raise BrokerUnavailable(f"{query!r}: not connected to the broker at {self.peer or '?'}")
        features = self._link_features()
        if features is not None and feature not in features:
            raise UnsupportedFeature(self._unsupported(repr(query), feature))
        if encode is None:
            encode = encode_room_members if action == "room_members" else encode_room_count
        frame = encode(room_id, timeout, query.request_id)
        self._queries[query.request_id] = query
        if features is None:
            self._held.append(_QUERY_FRAMES[feature](frame))
        else:
            self._out.append(frame)
            self.out_bytes += len(frame)
        return query

    def query_timed_out(self, query: Query[Any]) -> QueryTimeout:
        """The shell's deadline passed: forget ``query`` (a later reply is ignored) and
        return the error to raise."""
        self.forget_query(query)
        return QueryTimeout(f"{query!r}: no answer from the broker at {self.peer or '?'} within {query.timeout:g}s")

    def forget_query(self, query: Query[Any]) -> None:
        """Stop waiting for ``query`` (its caller gave up or was cancelled)."""
        if self._queries.get(query.request_id) is query:
            del self._queries[query.request_id]

    def fail_queries(self, reason: str, error: type[Exception] = BrokerUnavailable) -> None:
        """Fail every pending query with ``error`` (default :class:`BrokerUnavailable`):
        their replies cannot come (the link ended, or reading stopped)."""
        queries = self._queries
        if not queries:
            return
        pending = list(queries.values())
        queries.clear()
        for query in pending:
            query._finish(error=error(f"{query!r}: {reason}"))

    # --------------------------------------------------------------------- timers

    def next_deadline(self) -> float | None:
        """When :meth:`check_silence` or a delayed ack next needs the shell, or ``None``."""
        deadline = None
        if self.silence_limit and self.open:
            deadline = self.last_read + self.silence_limit
        hello_at = self.hello_deadline
        if hello_at:
            deadline = hello_at if deadline is None else min(deadline, hello_at)
        acks = self.acks
        if self._ack_at and acks is not None and acks.watermark > acks.sent:
            deadline = self._ack_at if deadline is None else min(deadline, self._ack_at)
        return deadline

    def check_silence(self, now: float | None = None) -> bool:
        """True (logged) when a v2 link heard nothing for ``SILENCE_FACTOR`` heartbeats."""
        if not self.silence_limit or not self.open:
            return False
        silent = (self._clock() if now is None else now) - self.last_read
        if silent < self.silence_limit:
            return False
        logger.warning(
            "Nothing received from the broker for %.1fs (3 heartbeat intervals); "
            "closing the connection",
            silent,
        )
        return True
