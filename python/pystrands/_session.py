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

Each link gets a number (:attr:`Session.link`); completions reported for an event
of an earlier link are ignored, so a handler finishing late never corrupts the
acknowledgements of the next link.

Codec: the native ``pystrands._core.LineDecoder`` (framing and decoding in
Rust, same events, malformed lines decoded by the Python reference) and the
native send encoders (:attr:`Session.encoders`, same bytes) when the extension
has them, else :class:`~pystrands._protocol.LineFramer` +
:func:`~pystrands._protocol.decode_event` and the ``encode_*`` functions. ``PYSTRANDS_PURE_PYTHON=1`` in the
environment forces the pure-Python codec; :attr:`Session.codec` says which one a
session uses.

Not thread-safe: the threading client calls it under its lock, the asyncio
client from the loop thread only.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from ._protocol import (
    DEFAULT_MAX_LINE_SIZE,
    HEARTBEAT_REPLY,
    SILENCE_FACTOR,
    Event,
    Heartbeat,
    HelloReply,
    LineFramer,
    Skipped,
    decode_event,
    encode_ack,
    encode_broadcast,
    encode_hello,
    encode_private_message,
    encode_room_message,
)

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
    "PURE_PYTHON_ENV",
    "AckTracker",
    "Encoders",
    "Session",
    "native_decoder",
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

    :attr:`codec` is the inbound codec in use; :attr:`framer` is its framer
    (a ``LineFramer``, or the native ``LineDecoder``), with ``dropped_lines``,
    ``buffered``, ``max_line_size`` and ``reset()`` either way.
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
    ) -> None:
        """Create a session with no link yet (sends are kept until one is up)."""
        self._max_buffered, policy = validate_buffer_settings(max_buffered_sends, buffer_policy)
        self._drop_oldest = policy == "drop_oldest"
        self._secret = backend_secret
        self.peer = peer  # "host:port" of the broker, for log lines
        self._ack_delay = max(0.0, float(ack_delay))
        self._clock = clock
        decoder = None if codec == "python" else native_decoder()
        if codec not in (None, "native", "python"):
            raise ValueError(f"codec must be 'native', 'python' or None, not {codec!r}")
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
        self.acks = None
        self.refused = False
        self.heartbeat_interval = 0.0
        self.silence_limit = 0.0
        self.last_read = self._clock()
        self._ack_at = 0.0
        self._ack_now = False
        self._hello = encode_hello(self._secret)
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
            self.out_bytes = sum(len(frame) for frame in backlog)
            backlog.clear()
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
        if self._native:  # frames and decodes; falls back to decode_event for odd lines
            decoded = self.framer.feed(data)
        else:
            decoded = map(decode_event, self.framer.feed(data))
        for event in decoded:
            if event is None:
                continue
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
                logger.info(
                    "Protocol v2 with the broker (acks, heartbeats every %ss)",
                    event.heartbeat_interval or "?",
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
            self._out.append(frame)
            self.out_bytes += len(frame)
            return True
        if link:  # its link is gone: the broker already failed that request
            self.dropped_sends += 1
            logger.debug("Dropping %s: its connection is closed", what)
            return False
        if keep and self._max_buffered:
            backlog = self._backlog
            if len(backlog) < self._max_buffered:
                backlog.append(frame)
                return False
            if self._drop_oldest:
                backlog.popleft()
                backlog.append(frame)
            what = f"{what} (buffer of {self._max_buffered} full, policy {'drop_oldest' if self._drop_oldest else 'drop_newest'})"
        self.dropped_sends += 1
        self._period_dropped += 1
        if self._period_dropped == 1:
            logger.warning(
                "Not connected to the broker: dropping %s (further drops are counted "
                "until the connection is back)",
                what,
            )
        return False

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
        return out[0] if len(out) == 1 else b"".join(out)

    # --------------------------------------------------------------------- timers

    def next_deadline(self) -> float | None:
        """When :meth:`check_silence` or a delayed ack next needs the shell, or ``None``."""
        deadline = None
        if self.silence_limit and self.open:
            deadline = self.last_read + self.silence_limit
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
