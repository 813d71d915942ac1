"""Helpers for testing applications built on PyStrands: a broker on free loopback ports.

Example::

    from pystrands.testing import running_broker, ws_url

    with running_broker() as broker:
        backend = MyBackend(port=broker.tcp_port)
        ...  # connect WebSocket clients to ws_url(broker, "/room")
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .broker import Broker

__all__ = ["running_broker", "ws_url"]


@contextmanager
def running_broker(**settings: Any) -> Iterator[Broker]:
    """Start a broker on 127.0.0.1 with free ports (unless given) and stop it afterwards."""
    settings.setdefault("host", "127.0.0.1")
    settings.setdefault("ws_port", 0)
    settings.setdefault("tcp_port", 0)
    settings.setdefault("log_level", "warn")
    broker = Broker(**settings)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop(timeout=5.0)


def ws_url(broker: Broker, path: str = "/") -> str:
    """The WebSocket URL of a running broker for ``path``."""
    if not path.startswith("/"):
        path = "/" + path
    return f"ws://127.0.0.1:{broker.ws_port}{path}"
