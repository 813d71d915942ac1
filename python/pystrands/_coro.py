"""Stepping a coroutine by hand: run it up to its first real wait without a Task.

The asyncio client runs a handler's coroutine right where the event is
dispatched and makes it a Task only if it really suspends (most handlers only
queue sends and finish at once); the decorator app steps its sends the same
way. These two functions are that mechanism, shared by both.
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Generator
from typing import Any

__all__ = ["first_step", "resume"]


def first_step(awaitable: Awaitable[Any]) -> tuple[Any, Any]:
    """Run ``awaitable`` up to its first suspension, right here.

    Returns ``(None, result)`` if it finished, else ``(iterator, yielded)``: what
    :func:`resume` needs to go on awaiting it.
    """
    it: Any = awaitable if type(awaitable) is types.CoroutineType else awaitable.__await__()
    try:
        return it, it.send(None)
    except StopIteration as stop:
        return None, stop.value


@types.coroutine
def resume(it: Any, pending: Any) -> Generator[Any, Any, Any]:
    """Go on awaiting the iterator ``it`` of an awaitable that already yielded
    ``pending`` to the event loop: from there on, exactly what ``await`` does."""
    while True:
        try:
            value = yield pending
        except GeneratorExit:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the awaited coroutine (cancellation included)
            try:
                pending = it.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                pending = it.send(value)
            except StopIteration as stop:
                return stop.value
