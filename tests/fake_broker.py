"""A local fake broker for client unit tests: a real threaded TCP server speaking lines.

This is the mocked side of the client unit tests (the tests are about the clients).
It accepts backend connections, records every line a backend sends (decoded JSON) and
lets the test push frames (or raw bytes) to the latest connection. It acts as a v1
broker (ignores the backend's ``hello``) or, with ``version=2``, as a v2 broker
(answers the hello, numbers events with ``seq``, records acks and heartbeat replies;
see docs/protocol.md). Every wait has a deadline: a client bug fails the test instead
of hanging it.
"""

from __future__ import annotations

import json
import queue
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from pystrands._tls import TLSSocket

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


V2_FEATURES = ["ack", "heartbeat"]


class _Peer:
    """One backend connection as the fake broker sees it.

    Control frames from the backend are recorded here, not put in the inbox: the
    ``hello`` (:attr:`hello`), ``ack`` seqs (:attr:`acks`) and heartbeat replies
    (:attr:`heartbeat_replies`). Everything else goes to the broker's inbox.
    """

    def __init__(self, sock: socket.socket | TLSSocket, broker: FakeBroker) -> None:
        self.sock = sock
        self.broker = broker
        self.inbox = broker.inbox
        self.closed = threading.Event()
        self.raw_lines: list[bytes] = []
        self.hello: dict[str, Any] | None = None
        self.answered = threading.Event()  # a v2 hello reply (ok or not) was sent
        self.v2 = False  # the fake accepted the hello: events get a seq
        self.acks: list[int] = []
        self.heartbeat_replies = 0
        self.changed = threading.Condition()
        self._send_lock = threading.Lock()
        self._next_seq = 1
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
                        self._frame(json.loads(line))
        except OSError:
            pass
        finally:
            if isinstance(self.sock, TLSSocket):
                self.close()  # as TLS servers do (a TLS client's close waits for it)
            self.closed.set()
            with self.changed:
                self.changed.notify_all()

    def _frame(self, obj: dict[str, Any]) -> None:
        action = obj.get("action")
        if action == "hello":
            with self.changed:
                self.hello = obj
                self.changed.notify_all()
            self.broker._got_hello(self, obj)
        elif action == "ack":
            with self.changed:
                self.acks.append(obj["params"]["seq"])
                self.changed.notify_all()
        elif action == "heartbeat":
            with self.changed:
                self.heartbeat_replies += 1
                self.changed.notify_all()
        else:
            self.inbox.put(obj)

    # -- waiting ----------------------------------------------------------------------

    def wait(self, predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition") -> Any:
        """Wait (with a deadline) until ``predicate()`` holds; it is re-checked on every recorded frame."""
        end = time.monotonic() + timeout
        with self.changed:
            while True:
                value = predicate()
                if value:
                    return value
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
                self.changed.wait(left)

    def wait_hello(self, timeout: float = DEADLINE) -> dict[str, Any]:
        return self.wait(lambda: self.hello, timeout, "the hello")

    def wait_ack(self, seq: int, timeout: float = DEADLINE) -> list[int]:
        """Wait until an ack of at least ``seq`` arrived; return all acks so far."""
        self.wait(lambda: self.acks and self.acks[-1] >= seq, timeout, f"ack {seq} (have {self.acks})")
        return list(self.acks)

    def wait_heartbeat_replies(self, n: int, timeout: float = DEADLINE) -> None:
        self.wait(lambda: self.heartbeat_replies >= n, timeout, f"{n} heartbeat replies")

    # -- sending ----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def send_obj(self, obj: dict[str, Any]) -> None:
        self.send(json.dumps(obj).encode() + b"\n")

    def event_frame(
        self,
        action: str,
        params: dict[str, Any],
        request_id: str | None = None,
        seq: int | None = None,
        redelivered: bool = False,
    ) -> dict[str, Any]:
        """Build an event frame; on an accepted v2 connection it gets the next seq (or ``seq``)."""
        frame: dict[str, Any] = {"request_id": request_id or str(uuid.uuid4()), "action": action, "params": params}
        if self.broker.version >= 2 and self.broker.refuse is None:
            self.answered.wait(DEADLINE)
        if self.v2 and action != "connection_request":
            if seq is None:
                seq = self._next_seq
            self._next_seq = seq + 1
            frame = {"seq": seq, **frame}
            if redelivered:
                frame["redelivered"] = True
        return frame

    def send_event(self, action: str, params: dict[str, Any], request_id: str | None = None, **kw: Any) -> dict[str, Any]:
        frame = self.event_frame(action, params, request_id, **kw)
        self.send_obj(frame)
        return frame

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class FakeBroker:
    """Threaded fake broker on 127.0.0.1 (a free port unless given).

    ``version=1`` (default) acts as a v1 broker: a backend's ``hello`` is recorded
    and never answered, events carry no ``seq``. ``version=2`` answers the hello
    with ``ok: true`` and ``heartbeat_interval``, then numbers events (``seq``
    1, 2, ... per connection); with ``secret`` set it refuses a hello without that
    secret, with ``refuse`` set it refuses every hello with that error, closing the
    connection after the refusal as the real broker does (unless
    ``close_on_refuse=False``, to test that the backend stops by itself).
    With ``tls`` (a server :class:`ssl.SSLContext`) it speaks TLS: a connection
    whose handshake fails is never a peer; its error goes to :attr:`tls_failures`.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        version: int = 1,
        heartbeat_interval: float = 15.0,
        secret: str | None = None,
        refuse: str | None = None,
        close_on_refuse: bool = True,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.tls = tls
        self.tls_failures: list[Exception] = []
        self.peers: list[_Peer] = []
        self.hellos: list[dict[str, Any]] = []
        self.version = version
        self.heartbeat_interval = heartbeat_interval
        self.secret = secret
        self.refuse = refuse
        self.close_on_refuse = close_on_refuse
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._listener: socket.socket | None = None
        self.port = port
        self.listen()

    def _got_hello(self, peer: _Peer, hello: dict[str, Any]) -> None:
        with self._lock:
            self.hellos.append(hello)
        if self.version < 2:
            return  # a v1 broker ignores the unknown action
        error = self.refuse
        if error is None and self.secret is not None and hello.get("params", {}).get("secret") != self.secret:
            error = "wrong backend secret"
        if error is not None:
            peer.send_obj({"request_id": "hello", "action": "hello", "params": {"ok": False, "error": error}})
            peer.answered.set()
            if self.close_on_refuse:
                peer.close()
            return
        with peer.changed:
            peer.v2 = True
            peer.changed.notify_all()
        peer.send_obj(
            {
                "request_id": "hello",
                "action": "hello",
                "params": {"ok": True, "version": 2, "features": V2_FEATURES, "heartbeat_interval": self.heartbeat_interval},
            }
        )
        with peer.changed:
            peer.answered.set()
            peer.changed.notify_all()

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
            if self.tls is None:
                self._add_peer(sock)
            else:
                threading.Thread(target=self._handshake, args=(sock, self.tls), daemon=True).start()

    def _add_peer(self, sock: socket.socket | TLSSocket) -> None:
        with self._cond:
            self.peers.append(_Peer(sock, self))
            self._cond.notify_all()

    def _handshake(self, sock: socket.socket, tls: ssl.SSLContext) -> None:
        try:
            wrapped = TLSSocket.connect(sock, tls, None, DEADLINE, server_side=True)
        except OSError as exc:
            sock.close()
            with self._cond:
                self.tls_failures.append(exc)
                self._cond.notify_all()
            return
        self._add_peer(wrapped)

    def wait_tls_failures(self, count: int, timeout: float = DEADLINE) -> list[Exception]:
        """Wait until ``count`` TLS handshakes failed in total; return their errors."""
        end = time.monotonic() + timeout
        with self._cond:
            while len(self.tls_failures) < count:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out waiting for failed TLS handshake #{count} (have {self.tls_failures})"
                    )
                self._cond.wait(remaining)
            return list(self.tls_failures)

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

    def wait_v2(self, count: int, timeout: float = DEADLINE) -> _Peer:
        """Wait for backend connection #``count`` and until its hello was accepted."""
        peer = self.wait_connections(count, timeout)
        peer.wait(lambda: peer.v2 and peer.answered.is_set(), timeout, "the hello to be accepted")
        return peer

    def send(self, obj: dict[str, Any]) -> None:
        """Send one frame to the latest backend connection."""
        self.peer.send_obj(obj)

    def send_raw(self, data: bytes) -> None:
        self.peer.send(data)

    def send_event(self, action: str, params: dict[str, Any], request_id: str | None = None, **kw: Any) -> str:
        """Send an event to the latest connection (``seq``/``redelivered`` keywords for v2)."""
        return self.peer.send_event(action, params, request_id, **kw)["request_id"]

    def heartbeat(self) -> None:
        self.send({"request_id": "heartbeat", "action": "heartbeat", "params": {}})

    def message(self, client_id: str, text: str, room: str = "room", **kw: Any) -> str:
        return self.send_event("new_message", {"message": text, "context": ctx(client_id, room)}, **kw)

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
