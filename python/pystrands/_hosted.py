"""A backend hosted by the broker's own process: start and stop, for each client flavour.

Why it exists: :class:`~pystrands.Broker` takes ``backend=`` as an instance of a
:class:`~pystrands.PyStrandsClient` subclass, an :class:`~pystrands.AsyncPyStrandsClient`
subclass or a :class:`~pystrands.PyStrands` app, and each needs its own way of running (its
threads, an event loop of its own, or the caller's running loop) and the same careful order of
shutdown. That order is what keeps "no message lost" true on a clean stop:

1. the broker closes its WebSocket clients (close 1001) and routes their last events;
2. the backend reads everything the broker sent it (``wait_drained``);
3. the backend disconnects: its handlers finish and their sends are carried out;
4. the broker finishes (cluster flush, runtime shutdown).

The transport itself (the link and its adapters) is :mod:`pystrands._inproc`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .app import PyStrands
from .async_client import AsyncPyStrandsClient
from .client import PyStrandsClient

if TYPE_CHECKING:
    from ._core import NativeBroker

logger = logging.getLogger("pystrands.broker")

__all__ = ["Backend", "Hosted"]

Backend = PyStrandsClient | AsyncPyStrandsClient | PyStrands
"""What ``Broker(...).serve(backend=...)`` and ``start(backend=...)`` accept."""

_START_TIMEOUT = 10.0


def kind_of(backend: object) -> str:
    """``"thread"``, ``"async"`` or ``"app"``; :class:`TypeError` for anything else."""
    if isinstance(backend, PyStrandsClient):
        return "thread"
    if isinstance(backend, AsyncPyStrandsClient):
        return "async"
    if isinstance(backend, PyStrands):
        return "app"
    raise TypeError(
        "backend must be an instance of a PyStrandsClient subclass, an AsyncPyStrandsClient "
        f"subclass or a PyStrands app, not {type(backend).__name__}"
    )


class Hosted:
    """One backend attached to one running native broker."""

    def __init__(self, native: NativeBroker, backend: Backend) -> None:
        self.kind = kind_of(backend)
        self.native = native
        self.backend = backend
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.client: AsyncPyStrandsClient | None = None
        self.task: asyncio.Task[None] | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self.stopped = threading.Event()  # set when the stop that claimed it has finished

    # ------------------------------------------------------------------ starting

    def start(self) -> None:
        """Attach from a thread with no loop of ours: threads, or a loop in a new thread."""
        if self.kind == "thread":
            client = self.backend
            assert isinstance(client, PyStrandsClient)
            client._inproc = self.native
            if not client.connect():
                client._inproc = None
                raise RuntimeError("the backend could not attach to the broker")
            return
        ready = threading.Event()
        failure: list[BaseException] = []

        async def body() -> None:
            try:
                await self.start_here()
            except BaseException as exc:
                failure.append(exc)
                raise
            finally:
                ready.set()
            assert self.task is not None
            await self.task

        def main() -> None:
            try:
                asyncio.run(body())
            except BaseException:  # reported through ``failure`` or already logged
                if not failure:
                    logger.exception("The in-process backend's event loop failed")

        self.thread = threading.Thread(target=main, name="pystrands-backend-loop", daemon=True)
        self.thread.start()
        if not ready.wait(_START_TIMEOUT):
            # The caller stops the broker; the loop thread's attach then fails and it ends.
            raise RuntimeError(f"the backend did not attach within {_START_TIMEOUT:.0f}s")
        if failure:
            raise failure[0]

    async def start_here(self) -> None:
        """Attach an asyncio backend on the running loop and start handling events."""
        loop = self.loop = asyncio.get_running_loop()
        backend = self.backend
        runner: Coroutine[Any, Any, None]
        if isinstance(backend, PyStrands):
            backend._inproc = self.native
            client = backend._begin_run()
        elif isinstance(backend, AsyncPyStrandsClient):
            client = backend
            client._inproc = self.native
        else:
            raise TypeError("a PyStrandsClient (threading) backend runs in threads, not on an event loop")
        if not await client.connect():
            client._inproc = None
            if isinstance(backend, PyStrands):
                backend._client = None
                backend._inproc = None
            raise RuntimeError("the backend could not attach to the broker")
        runner = backend._run_client(client) if isinstance(backend, PyStrands) else client.run_forever()
        self.client = client
        self.task = loop.create_task(runner, name="pystrands-inproc-backend")

    # ------------------------------------------------------------------ stopping

    def _claim_stop(self) -> bool:
        with self._lock:
            if self._stopping:
                return False
            self._stopping = True
            return True

    def in_handler_thread(self) -> bool:
        """True on a thread the backend runs handlers on: its loop, or a worker of its pool."""
        if self.on_loop_thread():
            return True
        pool = getattr(self.backend, "_pool", None)
        return bool(pool is not None and pool.in_worker())

    def on_loop_thread(self) -> bool:
        loop = self.loop
        if loop is None or loop.is_closed():
            return False
        try:
            return asyncio.get_running_loop() is loop
        except RuntimeError:
            return False

    def stop(self, timeout: float) -> None:
        """Stop broker and backend in order, from a thread that is not the backend's loop."""
        if not self._claim_stop():  # another thread is stopping: wait for it to finish
            self.stopped.wait(5 * timeout + 10.0)
            return
        try:
            self._stop(timeout)
        finally:
            self.stopped.set()

    def _stop(self, timeout: float) -> None:
        native = self.native
        native.stop_clients(timeout)
        if not native.wait_drained(timeout):
            logger.warning("the in-process backend did not read everything within %.1fs", timeout)
        if isinstance(self.backend, PyStrandsClient):
            self.backend.disconnect(timeout)
        else:
            loop, client = self.loop, self.client
            if loop is not None and client is not None and not loop.is_closed():
                try:
                    done = asyncio.run_coroutine_threadsafe(client.disconnect(timeout), loop)
                    done.result(timeout + 2.0)
                except Exception as exc:  # the loop ended meanwhile, or the deadline passed
                    logger.debug("disconnecting the in-process backend: %r", exc)
            if self.thread is not None:
                self.thread.join(timeout + 2.0)
        native.stop(timeout)
        self._forget()

    async def stop_here(self, timeout: float) -> None:
        """:meth:`stop`, awaited on the backend's own loop (which keeps running meanwhile)."""
        loop = asyncio.get_running_loop()
        if not self._claim_stop():  # another stop is under way: wait for it to finish
            await loop.run_in_executor(None, self.stopped.wait, 5 * timeout + 10.0)
            return
        try:
            await self._stop_here(timeout)
        finally:
            self.stopped.set()

    async def _stop_here(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        native = self.native
        await loop.run_in_executor(None, native.stop_clients, timeout)
        if not await loop.run_in_executor(None, native.wait_drained, timeout):
            logger.warning("the in-process backend did not read everything within %.1fs", timeout)
        if self.client is not None:
            await self.client.disconnect(timeout)
        task = self.task
        if task is not None and task is not asyncio.current_task():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout + 2.0)
            except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - logged, shutdown goes on
                logger.debug("the in-process backend's task: %r", exc)
        await loop.run_in_executor(None, native.stop, timeout)
        self._forget()

    def _forget(self) -> None:
        self.backend._inproc = None
        if self.client is not None:
            self.client._inproc = None
