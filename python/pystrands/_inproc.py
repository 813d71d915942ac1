"""The in-process transport: a backend client talking to a broker in its own process.

Why it exists: a backend embedded next to the broker should not pay for loopback TCP (two
kernels' worth of syscalls, a second event loop's socket machinery) on every message. The
native side gives each in-process backend an :class:`~pystrands._core.InprocLink`: the broker
queues the backend's lines there and makes one file descriptor readable per batch; the backend
drains a batch in one call and hands its own lines back in one call. Everything above the bytes
— the sans-I/O :class:`~pystrands._session.Session`, the dispatchers, the callbacks — is the
code the TCP clients run, unchanged. This module only adapts the link to what each client
shell expects from a connection:

* :class:`LinkSocket`: the blocking socket the threading client's reader and writer use.
* :class:`LinkTransport`: the :class:`asyncio.Transport` the asyncio client's protocol gets;
  reading is an ``add_reader`` on the link's descriptor (asyncio and uvloop alike).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._core import InprocLink

logger = logging.getLogger("pystrands.inproc")

__all__ = ["LinkSocket", "LinkTransport"]

READ_BATCH = 4096
"""Most lines taken from the link in one read."""


class LinkSocket:
    """The part of a blocking socket the threading client uses, over an in-process link."""

    __slots__ = ("_link",)

    def __init__(self, link: InprocLink) -> None:
        self._link = link

    def recv(self, _bufsize: int) -> bytes:
        """The next batch of lines, blocking with the GIL released; ``b""`` at the end."""
        data = self._link.recv(None, READ_BATCH)
        return b"" if data is None else data

    def sendall(self, data: bytes) -> None:
        self._link.write(data)

    def shutdown(self, how: int) -> None:
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            self._link.shutdown()

    def close(self) -> None:
        self._link.close()


class LinkTransport(asyncio.Transport):
    """An :class:`asyncio.Transport` over an in-process link, driven by ``add_reader``.

    Writes go straight to the broker (no buffer, so writing never pauses); reading is one
    batch per readiness of the link's descriptor, handed to the protocol's ``data_received``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, link: InprocLink, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._loop = loop
        self._link = link
        self._protocol = protocol
        self._fd = link.fileno()
        self._reading = False
        self._closing = False

    def start(self) -> None:
        """Tell the protocol it is connected, then start reading."""
        self._protocol.connection_made(self)
        if not self._closing:
            self.resume_reading()

    def _readable(self) -> None:
        if self._closing:
            return
        data = self._link.read(READ_BATCH)
        if data is None:  # the link ended (the broker stopped or the link was shut)
            self._finish(None)
        elif data:
            self._protocol.data_received(data)

    # -- asyncio.ReadTransport ------------------------------------------------------

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._readable)

    # -- asyncio.WriteTransport -----------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            self._link.write(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # nothing is buffered: writes are carried out at once

    # -- asyncio.BaseTransport ------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return "in-process" if name == "peername" else default

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]

    def close(self) -> None:
        self._finish(None)

    def abort(self) -> None:
        self._finish(None)

    def _finish(self, exc: Exception | None) -> None:
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        self._link.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)
