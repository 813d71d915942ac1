"""PyStrands: Python backends for a real-time WebSocket messaging broker.

Clients (wire protocol v1, compatible with PyStrands 1.0; protocol v2 - acknowledgements,
at-least-once redelivery, heartbeats, backend secret - when the broker accepts their ``hello``):

* :class:`PyStrandsClient` - threading client,
* :class:`AsyncPyStrandsClient` - asyncio client,
* :class:`PyStrands` - decorator app on top of the asyncio client,

the context types :class:`Context`, :class:`ConnectionRequestContext`,
:class:`Headers`, the answer of a history query (:class:`RoomHistory` of
:class:`HistoryMessage`; see :mod:`pystrands.history`), and the errors of the rooms/users/presence calls
(:class:`BrokerUnavailable`, :class:`QueryTimeout`, :class:`QueryError`,
:class:`UnsupportedFeature`; see :mod:`pystrands.errors`). ``pystrands.Broker`` (the native broker) is imported lazily, so
the clients work even where the native extension is not available.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import context
from .app import PyStrands
from .async_client import AsyncPyStrandsClient
from .client import PyStrandsClient
from .context import ConnectionRequestContext, Context, Headers
from .errors import BrokerUnavailable, QueryError, QueryTimeout, UnsupportedFeature
from .history import HistoryMessage, RoomHistory

if TYPE_CHECKING:  # pragma: no cover
    from .broker import Broker

    __version__: str

__all__ = [
    "AsyncPyStrandsClient",
    "Broker",
    "BrokerUnavailable",
    "ConnectionRequestContext",
    "Context",
    "Headers",
    "HistoryMessage",
    "PyStrands",
    "PyStrandsClient",
    "QueryError",
    "QueryTimeout",
    "RoomHistory",
    "UnsupportedFeature",
    "__version__",
    "context",
]


def _version() -> str:
    """The installed distribution's version (maturin takes it from the Cargo workspace version);
    without package metadata (e.g. run from a source tree), the native extension's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pystrands")
    except PackageNotFoundError:
        try:
            from . import _core
        except ImportError:
            return "0+unknown"
        return str(_core.__version__)


def __getattr__(name: str) -> Any:
    """Import ``Broker`` on first use (it needs the native ``_core`` extension); look
    ``__version__`` up on first use."""
    if name == "Broker":
        from .broker import Broker

        globals()["Broker"] = Broker
        return Broker
    if name == "__version__":
        globals()["__version__"] = v = _version()
        return v
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"Broker", "__version__"})
