"""TLS for the threading client: a blocking socket's interface over an :class:`ssl.SSLObject`.

Why it exists: the threading client reads its connection in one thread (a blocking ``recv``)
while other threads write to it (``sendall``). An :class:`ssl.SSLSocket` cannot be used that
way: OpenSSL forbids using one ``SSL`` object from two threads at once (``SSL_read`` and
``SSL_write`` share state; CPython does not serialize them), and doing it anyway corrupts the
TLS stream now and then. :meth:`ssl.SSLSocket.shutdown` also drops the TLS layer, so a
``shutdown(SHUT_RD)`` (what ``disconnect()`` uses to wake the reader) would make later writes
go out unencrypted.

:class:`TLSSocket` keeps the plain TCP socket for the I/O, which blocks, and the TLS state in
an ``SSLObject`` over memory buffers, which never blocks and is only touched under a lock. So
the reader can wait in ``recv`` while a writer encrypts and sends, as with a plain socket;
``shutdown`` acts on the TCP socket (with a best-effort TLS ``close_notify`` before the write
side closes). The asyncio client needs none of this: asyncio's own TLS transport is used.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

__all__ = ["TLSSocket"]

_HANDSHAKE_READ = 16 * 1024
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)  # 0 where missing (Windows): no close_notify there


class TLSSocket:
    """The part of a blocking socket the threading client uses (``recv``, ``sendall``,
    ``shutdown``, ``close``), speaking TLS over a connected TCP socket.

    Made by :meth:`connect`, which runs the handshake. ``recv`` may block in one thread while
    ``sendall`` runs in others; encrypted bytes go out in the order they were made.
    """

    __slots__ = ("_sock", "_obj", "_in", "_out", "_tls", "_send", "_eof", "_error", "_notified", "closed_cleanly")

    def __init__(self, sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        self._sock = sock
        self._obj = obj
        self._in = incoming
        self._out = outgoing
        self._tls = threading.Lock()  # every use of _obj, _in and _out (never held while blocking)
        self._send = threading.Lock()  # taking bytes from _out and writing them: keeps their order
        self._eof = False  # the TLS stream ended (close_notify, or the TCP stream without one)
        self._error: OSError | None = None  # a TLS error met after data that was returned first
        self._notified = False  # close_notify was queued
        self.closed_cleanly = False
        """True once the peer's ``close_notify`` was read (not a bare end of the TCP stream)."""

    @classmethod
    def connect(
        cls,
        sock: socket.socket,
        context: ssl.SSLContext,
        server_hostname: str | None,
        timeout: float | None,
        *,
        server_side: bool = False,
    ) -> TLSSocket:
        """Run the TLS handshake on the connected ``sock`` within ``timeout`` seconds.

        ``sock`` gets its previous timeout back afterwards. ``server_side`` is for tests.

        Raises:
            ssl.SSLError: The handshake failed (e.g. :class:`ssl.SSLCertVerificationError`).
            TimeoutError: It took longer than ``timeout``.
            OSError: The connection failed or the peer closed it during the handshake.
        """
        incoming = ssl.MemoryBIO()
        outgoing = ssl.MemoryBIO()
        obj = context.wrap_bio(
            incoming, outgoing, server_side=server_side, server_hostname=None if server_side else server_hostname
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        previous = sock.gettimeout()

        def remaining() -> float | None:
            if deadline is None:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("TLS handshake timed out")
            return left

        try:
            while True:
                try:
                    obj.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                except ssl.SSLError:
                    data = outgoing.read()  # the alert telling the peer why, if any
                    if data:
                        try:
                            sock.settimeout(0.5)
                            sock.sendall(data)
                        except OSError:
                            pass
                    raise
                data = outgoing.read()
                if data:
                    sock.settimeout(remaining())
                    sock.sendall(data)
                if done:
                    break
                sock.settimeout(remaining())
                data = sock.recv(_HANDSHAKE_READ)
                if not data:
                    raise ConnectionResetError("the peer closed the connection during the TLS handshake")
                incoming.write(data)
        except TimeoutError:  # the socket's own timeouts say only "timed out"
            raise TimeoutError("TLS handshake timed out") from None
        finally:
            sock.settimeout(previous)
        return cls(sock, obj, incoming, outgoing)

    @property
    def version(self) -> str | None:
        """The TLS version negotiated (``"TLSv1.3"``, ...)."""
        return self._obj.version()

    # ------------------------------------------------------------------ reading

    def recv(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` decrypted bytes, blocking until some arrive; ``b""`` at the end
        of the stream (a ``close_notify``, or the TCP stream closing without one).

        Raises:
            ssl.SSLError: A TLS error, e.g. the broker's alert refusing our client certificate.
            OSError: The TCP connection failed.
        """
        while True:
            parts: list[bytes] = []
            size = 0
            with self._tls:
                if self._error is not None:
                    raise self._error
                while size < bufsize and not self._eof:
                    try:
                        part = self._obj.read(bufsize - size)
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLZeroReturnError:
                        self._eof = self.closed_cleanly = True
                        break
                    except ssl.SSLError as exc:
                        if not parts:
                            raise
                        self._error = exc  # raised on the next call, after these bytes
                        break
                    if not part:  # close_notify
                        self._eof = self.closed_cleanly = True
                        break
                    parts.append(part)
                    size += len(part)
                made = self._out.pending  # e.g. the answer to a TLS 1.3 KeyUpdate
            if made:
                self._pump(blocking=False)
            if parts:
                return b"".join(parts)
            if self._eof:
                return b""
            data = self._sock.recv(bufsize)  # blocking, outside the lock
            if not data:
                # Not handed to the TLS object: for OpenSSL an end without close_notify is a
                # fatal error (it would queue an alert and refuse to send our close_notify),
                # and after our own shutdown(SHUT_RD) it is no error at all.
                self._eof = True
                return b""
            with self._tls:
                self._in.write(data)

    # ------------------------------------------------------------------ writing

    def sendall(self, data: bytes) -> None:
        """Encrypt ``data`` and write it all (blocking until the socket took it)."""
        with self._tls:
            view = memoryview(data)
            while view:
                view = view[self._obj.write(view) :]
        self._pump(blocking=True)

    def _pump(self, blocking: bool) -> None:
        """Write what the TLS object made, in order. Without ``blocking``, a thread already
        writing is left to it (it checks again after letting go)."""
        while self._send.acquire(blocking):
            try:
                while True:
                    with self._tls:
                        data = self._out.read()
                    if not data:
                        break
                    self._sock.sendall(data)
            finally:
                self._send.release()
            with self._tls:
                if not self._out.pending:
                    return
            blocking = False  # made meanwhile by a thread that found us writing

    # ------------------------------------------------------------------ closing

    def shutdown(self, how: int) -> None:
        """Shut the TCP socket down (``recv`` in another thread returns ``b""``); the TLS
        state stays, so writing goes on after ``SHUT_RD``. Before the write side closes a
        ``close_notify`` is sent when that cannot block."""
        if how != socket.SHUT_RD:
            self._close_notify()
        self._sock.shutdown(how)

    def _close_notify(self) -> None:
        if self._notified:
            return
        self._notified = True
        with self._tls:
            try:
                self._obj.unwrap()  # queues close_notify; the peer's is not waited for
            except (ssl.SSLError, ValueError):
                pass
        if not _DONTWAIT or not self._send.acquire(blocking=False):
            return  # a writer is sending: it takes the close_notify along
        try:
            with self._tls:
                data = self._out.read()
            if data:
                self._sock.send(data, _DONTWAIT)
        except OSError:
            pass
        finally:
            self._send.release()

    def close(self) -> None:
        """Close the TCP socket."""
        self._sock.close()
