"""Context objects handed to PyStrands backend callbacks.

* :class:`Context` identifies one WebSocket client: ``client_id``, ``room_id`` and
  ``metadata`` (exactly the value the backend set when it accepted the connection),
  and the optional ``user_id`` (``None`` unless a backend set one on accept).
* :class:`ConnectionRequestContext` describes a pending WebSocket connection: the
  request ``headers``, ``url``, ``remote_addr``, ``query`` and a mutable
  :class:`Context` the backend fills in before accepting.
* :class:`Headers` is a case-insensitive mapping of header name to the list of its
  values, so ``request.headers.get("X-Token", [None])[0]`` and
  ``request.headers.get("x-token")`` both work.

All three have ``from_json`` / ``to_json`` converting from and to the plain JSON
shapes of wire protocol v1 (a context's ``user_id`` appears in its JSON form only
when it is set, so a context without one is exactly the 1.0 shape). :class:`JSONModel`, the base class of the two context
types in PyStrands 1.0, is kept with its 1.0 behaviour (keyword construction over
the annotated fields, missing ones ``None``) for code that subclasses it; as in
1.0, ``from_json`` gives ``None`` for fields missing from its input.

A :class:`Context` handed to an event callback by a client connected to a v2 broker
also carries the event's delivery facts, :attr:`Context.event_id` and
:attr:`Context.redelivered` (see ``docs/protocol.md``); they are not part of the
JSON form.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Dict, List  # noqa: F401, UP035 - public names of this module in PyStrands 1.0

__all__ = ["Context", "ConnectionRequestContext", "Headers", "JSONModel"]


def _as_str(value: Any, default: str = "") -> str:
    """Return ``value`` if it is a string, ``default`` if it is ``None``, else ``str(value)``."""
    if isinstance(value, str):
        return value
    if value is None:
        return default
    return str(value)


def new_client_id() -> str:
    """A random (version 4) UUID string, as ``str(uuid.uuid4())`` gives, from the same
    source (``os.urandom``) at a fraction of the cost."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class JSONModel:
    """A plain model over the annotated fields of its class (PyStrands 1.0's base class).

    ``Model(**fields)`` sets every annotated field (``None`` when not given),
    :meth:`from_json` builds from a dict, :meth:`to_json` returns the fields as a
    dict. :class:`Context` and :class:`ConnectionRequestContext` derive from it
    and refine it; a user model subclassing it behaves as it did in 1.0.
    """

    def __init__(self, **kwargs: Any) -> None:
        """Set each annotated field from ``kwargs`` (``None`` when missing)."""
        for name in self._get_annotations():
            setattr(self, name, kwargs.get(name))

    @classmethod
    def _get_annotations(cls) -> dict[str, Any]:
        """The annotated fields of the class and its bases, base classes first."""
        fields: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            # each class's own annotations, also where they are computed lazily (Python 3.14)
            fields.update(inspect.get_annotations(klass))
        return fields

    @classmethod
    def from_json(cls, data: Any) -> Any:
        """Build from a dict of fields; missing fields are ``None``."""
        return cls(**data)

    def to_json(self) -> Any:
        """Return the fields as a dict."""
        return {name: getattr(self, name) for name in self._get_annotations()}


class Headers(MutableMapping[str, list[str]]):
    """Case-insensitive mapping of HTTP header names to lists of values.

    Iteration yields the names as they were received (canonical MIME form from the
    broker, e.g. ``X-Token``); look-ups ignore case. Values are always lists of
    strings: a single string value given to the constructor is wrapped in a list.

    Example::

        token = request.headers.get("X-Token", [None])[0]
        same = request.headers.get("x-token")        # ['secret'] or None
        first = request.headers.first("authorization")  # 'Bearer ...' or None
    """

    __slots__ = ("_store",)

    def __init__(
        self,
        data: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
    ) -> None:
        """Build from a mapping or an iterable of ``(name, value)`` pairs."""
        # lower-cased name -> (name as received, values)
        self._store: dict[str, tuple[str, list[str]]] = {}
        if data is None:
            return
        items: Iterable[tuple[str, Any]]
        if type(data) is dict:  # checked first: isinstance() against the ABCs is slow
            items = data.items()
        elif isinstance(data, Headers):
            items = [(name, list(values)) for name, values in data.items()]
        elif isinstance(data, Mapping):
            items = data.items()
        else:
            items = data
        store = self._store
        for name, value in items:
            if (
                type(name) is str
                and type(value) is list
                and all(type(v) is str for v in value)
            ):
                values = value.copy()  # the wire form: taken as is (fast path)
            else:
                name = _as_str(name)
                values = self._values(value)
            key = name.lower()
            entry = store.get(key)
            if entry is not None:  # same header in another case: merge the values
                entry[1].extend(values)
            else:
                store[key] = (name, values)

    @staticmethod
    def _values(value: Any) -> list[str]:
        if isinstance(value, list):
            return [_as_str(v) for v in value]
        if isinstance(value, (tuple, set, frozenset)):
            return [_as_str(v) for v in value]
        if value is None:
            return []
        return [_as_str(value)]

    def __getitem__(self, name: str) -> list[str]:
        return self._store[name.lower()][1]

    def __setitem__(self, name: str, value: Any) -> None:
        self._store[name.lower()] = (name, self._values(value))

    def __delitem__(self, name: str) -> None:
        del self._store[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._store

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._store.values())

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"Headers({self.to_json()!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return {k: v for k, (_, v) in self._store.items()} == {
                k: v for k, (_, v) in other._store.items()
            }
        if isinstance(other, Mapping):
            try:
                return self == Headers(other)
            except Exception:
                return False
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def first(self, name: str, default: str | None = None) -> str | None:
        """Return the first value of header ``name`` (any case), or ``default``."""
        entry = self._store.get(name.lower())
        if entry is None or not entry[1]:
            return default
        return entry[1][0]

    def copy(self) -> Headers:
        """Return an independent copy."""
        return Headers(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Headers:
        """Build from the wire form ``{name: [values]}`` (``None`` gives no headers)."""
        return cls(data)

    def to_json(self) -> dict[str, list[str]]:
        """Return the plain ``{name: [values]}`` dict, names as received."""
        return {name: list(values) for name, values in self._store.values()}


class Context(JSONModel):
    """Identity of one WebSocket client as seen by the backend.

    Attributes:
        client_id: Unique id of the WebSocket connection.
        room_id: The room the client is in.
        metadata: Exactly the value the backend set in ``on_connection_request``
            (a dict unless the backend chose otherwise; ``{}`` by default).
        user_id: The user this connection belongs to, or ``None`` (the default).
            Set it on ``request.context`` in ``on_connection_request`` to tie the
            connection to a user (a broker with the ``rooms`` feature then carries
            it on every context of that connection, and ``send_user_message``
            reaches every connection of that user). See :attr:`user_id`.
        event_id: Read only. The id of the event this context came with, when the
            broker speaks protocol v2 (``None`` otherwise). See :attr:`event_id`.
        redelivered: Read only. ``True`` when a v2 broker marks the event as a
            redelivery. See :attr:`redelivered`.

    ``event_id`` and ``redelivered`` are delivery facts, not identity: they are
    not part of :meth:`to_json`, :meth:`from_json` or equality.
    """

    __slots__ = ("client_id", "room_id", "metadata", "_event_id", "_redelivered", "_user_id")

    if TYPE_CHECKING:  # declared for type checkers only: not fields of the model
        _event_id: str | None  # set only by the clients, for events from a v2 broker
        _redelivered: bool
        _user_id: str | None  # unset (read as None) unless a user id was given

    @classmethod
    def _get_annotations(cls) -> dict[str, Any]:
        return {"client_id": str, "room_id": str, "metadata": dict}

    def __init__(
        self,
        client_id: str = "",
        room_id: str = "",
        metadata: Any = None,
        user_id: str | None = None,
        **_ignored: Any,
    ) -> None:
        """Create a context; unknown keyword arguments are ignored (as in 1.0)."""
        self.client_id: str = client_id
        self.room_id: str = room_id
        self.metadata: Any = {} if metadata is None else metadata
        if user_id is not None:
            self.user_id = user_id
        # _event_id / _redelivered / _user_id stay unset (read as None / False / None)
        # unless set: nothing to pay per v1 event.

    @property
    def user_id(self) -> str | None:
        """The user this connection belongs to (``None``: none, the default).

        Set it in ``on_connection_request`` (``request.context.user_id = "u1"``):
        the ``response`` then carries it, and a broker with the ``rooms`` feature
        puts it on every context of that connection. Several connections may share
        a user id. Part of :meth:`to_json` and equality only when set.
        """
        try:
            return self._user_id
        except AttributeError:
            return None

    @user_id.setter
    def user_id(self, value: str | None) -> None:
        if value is not None and not isinstance(value, str):
            raise TypeError(f"user_id must be a str or None, not {type(value).__name__}")
        self._user_id = value

    @property
    def event_id(self) -> str | None:
        """Id of the event this context arrived with (``None`` unless the broker speaks v2).

        A v2 broker delivers events **at least once**: after a backend's connection
        dies, its unacknowledged events are delivered again, with the same
        ``event_id`` and :attr:`redelivered` set, possibly to another backend. A
        handler whose effects must not repeat can deduplicate on this id (unique
        within one broker run). ``None`` for contexts built by hand, for
        connection requests, and for events from a v1 broker (at most once).
        """
        try:
            return self._event_id
        except AttributeError:
            return None

    @property
    def redelivered(self) -> bool:
        """``True`` if a v2 broker marked this event as a redelivery (it may have been handled before)."""
        try:
            return self._redelivered
        except AttributeError:
            return False

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | Context | None) -> Context:
        """Build from the wire form ``{"client_id", "room_id", "metadata"}`` (and
        ``"user_id"`` when present).

        A :class:`Context` is returned unchanged; ``None`` gives an empty context.
        Extra keys are ignored; a missing key gives ``None`` (as in 1.0), a
        ``null`` metadata gives ``{}``, a missing or ``null`` ``user_id`` none.
        """
        if isinstance(data, Context):
            return data
        if data is None:
            return cls()
        self = cls.__new__(cls)
        client_id = data.get("client_id")
        room_id = data.get("room_id")
        # a missing id is None, as in 1.0 (the attributes are typed for received contexts)
        self.client_id = client_id if client_id is None else _as_str(client_id)  # type: ignore[assignment]
        self.room_id = room_id if room_id is None else _as_str(room_id)  # type: ignore[assignment]
        if "metadata" in data:
            metadata = data["metadata"]
            self.metadata = {} if metadata is None else metadata
        else:
            self.metadata = None
        user_id = data.get("user_id")
        if user_id is not None:
            self._user_id = _as_str(user_id)
        return self

    def to_json(self) -> dict[str, Any]:
        """Return ``{"client_id", "room_id", "metadata"}``, plus ``"user_id"`` when set."""
        data = {
            "client_id": self.client_id,
            "room_id": self.room_id,
            "metadata": self.metadata,
        }
        user_id = self.user_id
        if user_id is not None:
            data["user_id"] = user_id
        return data

    def __repr__(self) -> str:
        user_id = self.user_id
        user = "" if user_id is None else f", user_id={user_id!r}"
        return (
            f"Context(client_id={self.client_id!r}, room_id={self.room_id!r}, "
            f"metadata={self.metadata!r}{user})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Context):
            return NotImplemented
        return (
            self.client_id == other.client_id
            and self.room_id == other.room_id
            and self.metadata == other.metadata
            and self.user_id == other.user_id
        )

    __hash__ = None  # type: ignore[assignment]


class ConnectionRequestContext(JSONModel):
    """A WebSocket connection waiting for the backend's decision.

    Attributes:
        headers: Request headers, a case-insensitive :class:`Headers` mapping of
            name to list of values.
        url: Request path, e.g. ``/ws/chat``.
        remote_addr: ``ip:port`` of the WebSocket client.
        context: Mutable :class:`Context` for the new client; set ``room_id``,
            ``client_id``, ``metadata`` and (optionally) ``user_id`` here.
            Defaults: a fresh uuid4, the ``url``, ``{}`` and no user id.
        accepted: The decision, ``True`` by default. ``on_connection_request`` may
            return a bool instead of setting it.
        query: The query string without ``?`` (``""`` when absent or when the
            broker does not send it).
    """

    __slots__ = (
        "_headers",
        "_wire_headers",
        "url",
        "remote_addr",
        "context",
        "accepted",
        "query",
    )

    @classmethod
    def _get_annotations(cls) -> dict[str, Any]:
        return {
            "headers": dict[str, list[str]],
            "url": str,
            "remote_addr": str,
            "context": Context,
            "accepted": bool,
            "query": str,
        }

    def __init__(
        self,
        headers: Mapping[str, Any] | None = None,
        url: str = "",
        remote_addr: str = "",
        context: Context | Mapping[str, Any] | None = None,
        accepted: bool | None = True,
        query: str = "",
        **_ignored: Any,
    ) -> None:
        """Create a request context; unknown keyword arguments are ignored."""
        self._wire_headers: dict[str, Any] | None = None
        self._headers: Headers | None = headers if type(headers) is Headers else Headers(headers)
        self.url: str = _as_str(url)
        self.remote_addr: str = _as_str(remote_addr)
        if context is None:
            context = Context(client_id=new_client_id(), room_id=self.url, metadata={})
        self.context: Context = Context.from_json(context)
        self.accepted: bool = True if accepted is None else bool(accepted)
        self.query: str = _as_str(query)

    @classmethod
    def _from_wire(
        cls, headers: dict[str, Any] | None, url: str, remote_addr: str, query: str
    ) -> ConnectionRequestContext:
        """Build from a decoded ``connection_request`` (the clients' hot path).

        The fields are already checked to be strings, and ``headers`` is the dict
        the decoder created and nobody else holds: the case-insensitive
        :class:`Headers` view is only built if a handler reads :attr:`headers`.
        """
        self = cls.__new__(cls)
        self._wire_headers = headers
        self._headers = None
        self.url = url
        self.remote_addr = remote_addr
        self.query = query
        self.context = Context(new_client_id(), url, {})
        self.accepted = True
        return self

    @property
    def headers(self) -> Headers:
        """Request headers: a case-insensitive :class:`Headers` mapping of name to
        list of values."""
        headers = self._headers
        if headers is None:
            headers = self._headers = Headers(self._wire_headers)
            self._wire_headers = None
        return headers

    @headers.setter
    def headers(self, value: Mapping[str, Any] | None) -> None:
        self._wire_headers = None
        self._headers = value if type(value) is Headers else Headers(value)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConnectionRequestContext:
        """Build from the ``params`` of a ``connection_request`` (or :meth:`to_json`).

        Missing ``url`` / ``remote_addr`` are ``None`` (as in 1.0); missing
        ``headers`` give an empty :class:`Headers`, a missing ``context`` the v1
        defaults (fresh uuid4, room = url, ``{}``) and a missing ``accepted``
        ``True``, so a handler can work on the request as on a real one.
        """
        headers = data.get("headers")
        url = data.get("url")
        remote_addr = data.get("remote_addr")
        self = cls(
            headers=headers if isinstance(headers, Mapping) else None,
            url=_as_str(url),
            remote_addr=_as_str(remote_addr),
            context=data.get("context"),
            accepted=data.get("accepted", True),
            query=_as_str(data.get("query")),
        )
        if "url" not in data:
            self.url = None  # type: ignore[assignment]
        if "remote_addr" not in data:
            self.remote_addr = None  # type: ignore[assignment]
        return self

    def to_json(self) -> dict[str, Any]:
        """Return the plain dict form (headers as a plain dict, context as a dict)."""
        return {
            "headers": self.headers.to_json(),
            "url": self.url,
            "remote_addr": self.remote_addr,
            "query": self.query,
            "context": self.context.to_json(),
            "accepted": self.accepted,
        }

    def __repr__(self) -> str:
        return (
            f"ConnectionRequestContext(url={self.url!r}, remote_addr={self.remote_addr!r}, "
            f"query={self.query!r}, context={self.context!r}, accepted={self.accepted!r})"
        )
