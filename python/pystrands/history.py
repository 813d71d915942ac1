"""The answer of a ``room_history`` query (the ``history`` feature, ``docs/protocol.md``).

Both types are exported from :mod:`pystrands`. They are plain named tuples: compare,
unpack and print them like tuples::

    history = client.room_history("lobby", since=last_seen)
    for offset, data in history.messages:
        ...
    if not history.complete:  # messages after `since` were evicted: reload from your store
        ...
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["HistoryMessage", "RoomHistory"]


class HistoryMessage(NamedTuple):
    """One message of a room's history."""

    offset: int
    """Its position in the room's stream: 1, 2, 3, ... within one epoch."""
    data: str
    """The message, as the room's members received it."""


class RoomHistory(NamedTuple):
    """A room's history after a given offset, as the broker answered ``room_history``."""

    epoch: str
    """The name of the room's stream; ``""`` when the room has none (no history kept, or none
    yet). A new epoch (the broker restarted, or the room was quiet beyond its ``history_ttl``)
    starts again at offset 1: offsets of different epochs cannot be compared."""
    offset: int
    """The room's last offset (``0`` when it has none), whether or not it is among ``messages``."""
    messages: list[HistoryMessage]
    """The messages after ``since``, oldest first: the newest ``limit`` of them when a limit
    was given."""
    complete: bool
    """``False`` when messages after ``since`` are not all in ``messages``: evicted by the
    room's ``history_size`` or its TTL, or (as this broker answers) left out by ``limit``."""
