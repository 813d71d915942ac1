"""A local fake broker for client unit tests: a real threaded TCP server speaking v1 lines.

This is the mocked side of the client unit tests (the tests are about the clients).
It accepts backend connections, records every line a backend sends (decoded JSON) and
lets the test push frames (or raw bytes) to the latest connection. Every wait has a
deadline: a client bug fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

DEADLINE = 5.0


def wait_for(predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition") -> Any:
    """Poll ``predicate`` until truthy or fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def ctx(client_id: str, room_id: str = "room", metadata: Any = None) -> dict[str, Any]:
    """A wire context."""
    return {"client_id": client_id, "room_id": room_id, "metadata": metadata or {}}


class _Peer:
    def __init__(self, sock: socket.socket, inbox: queue.Queue[dict[str, Any]]) -> None:
        self.sock = sock
        self.inbox = inbox
        self.closed = threading.Event()
        self.raw_lines: list[bytes] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        buf = b""
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        self.raw_lines.append(line)
                        self.inbox.put(json.loads(line))
        except OSError:
            pass
        finally:
            self.closed.set()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class FakeBroker:
    """Threaded v1 fake broker on 127.0.0.1 (a free port unless given)."""

    def __init__(self, port: int = 0) -> None:
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.peers: list[_Peer] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._listener: socket.socket | None = None
        self.port = port
        self.listen()

    # -- server lifecycle -----------------------------------------------------------

    def listen(self) -> None:
        """(Re)start listening on ``self.port``."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(16)
        self.port = sock.getsockname()[1]
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                self.peers.append(_Peer(sock, self.inbox))
                self._cond.notify_all()

    def stop_listening(self) -> None:
        """Close the listening socket (new connects are refused)."""
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None

    def drop_connections(self) -> None:
        """Close every backend connection from the broker side."""
        with self._lock:
            peers = list(self.peers)
        for peer in peers:
            peer.close()

    def close(self) -> None:
        """Stop everything."""
        self.stop_listening()
        self.drop_connections()

    # -- connections ------------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self.peers)

    def wait_connections(self, count: int, timeout: float = DEADLINE) -> _Peer:
        """Wait until ``count`` connections were accepted in total; return the latest."""
        end = time.monotonic() + timeout
        with self._cond:
            while len(self.peers) < count:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out waiting for backend connection #{count} (have {len(self.peers)})"
                    )
                self._cond.wait(remaining)
            return self.peers[-1]

    @property
    def peer(self) -> _Peer:
        with self._lock:
            assert self.peers, "no backend connected"
            return self.peers[-1]

    # -- traffic ------------------------------------------------------------------------

    def send(self, obj: dict[str, Any]) -> None:
        """Send one frame to the latest backend connection."""
        self.peer.send(json.dumps(obj).encode() + b"\n")

    def send_raw(self, data: bytes) -> None:
        self.peer.send(data)

    def send_event(self, action: str, params: dict[str, Any], request_id: str | None = None) -> str:
        rid = request_id or str(uuid.uuid4())
        self.send({"request_id": rid, "action": action, "params": params})
        return rid

    def message(self, client_id: str, text: str, room: str = "room") -> None:
        self.send_event("new_message", {"message": text, "context": ctx(client_id, room)})

    def connection_request(
        self,
        url: str = "/ws/chat",
        headers: dict[str, list[str]] | None = None,
        remote_addr: str = "127.0.0.1:5555",
        **extra: Any,
    ) -> str:
        params: dict[str, Any] = {
            "headers": headers if headers is not None else {"X-Token": ["secret"]},
            "url": url,
            "remote_addr": remote_addr,
        }
        params.update(extra)
        return self.send_event("connection_request", params)

    def recv(self, timeout: float = DEADLINE) -> dict[str, Any]:
        """Next frame any backend sent."""
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no frame from the backend within {timeout}s") from None

    def recv_n(self, n: int, timeout: float = DEADLINE) -> list[dict[str, Any]]:
        end = time.monotonic() + timeout
        return [self.recv(max(0.0, end - time.monotonic())) for _ in range(n)]

    def expect_nothing(self, window: float = 0.2) -> None:
        """Assert no frame arrives within ``window`` seconds."""
        try:
            frame = self.inbox.get(timeout=window)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected frame {frame!r}")
