"""Emits the native broker's log records through Python's :mod:`logging`.

Why it exists: an embedded broker should log where the application logs — through its handlers,
levels and formatters (``dictConfig``, JSON formatters, ...) — not straight to stderr. The native
core queues each record it keeps (see ``rust/py/src/logbridge.rs``; tokio threads never take the
GIL for it), and one daemon thread here takes them in batches, waiting with the GIL released, and
emits them on loggers named after the core's modules: ``pystrands.broker.ws``,
``pystrands.broker.backend``, ``pystrands.broker.cluster.subscriber``, ...; other crates' records
on ``pystrands.broker.deps.<crate>``. A record's structured fields are appended to its message as
``key=value`` and kept in ``record.pystrands_fields`` (the bare message in
``record.pystrands_message``). Nothing is configured here: with no handler
set up, Python's last-resort handler prints WARNING and above to stderr, as before.
"""

from __future__ import annotations

import atexit
import logging
import threading

__all__ = ["ensure_running"]

_lock = threading.Lock()
_thread: threading.Thread | None = None
_stop = threading.Event()
logger = logging.getLogger("pystrands.broker")
_WAIT = 0.2
"""Longest wait of one native call: how soon the thread sees a stop request."""


def ensure_running() -> None:
    """Start the bridge thread once per process (before the first broker starts)."""
    global _thread
    with _lock:
        if _thread is not None and _thread.is_alive():
            return
        _stop.clear()
        _thread = threading.Thread(target=_pump, name="pystrands-log-bridge", daemon=True)
        _thread.start()
        atexit.register(_shutdown)


def _shutdown() -> None:
    """At interpreter exit: end the thread while the interpreter still runs (a daemon thread
    woken inside the native call during finalization would be torn down in native code)."""
    _stop.set()
    thread = _thread
    if thread is not None:
        thread.join(timeout=_WAIT * 5)


def _pump() -> None:
    from . import _core

    dropped_seen = 0
    while True:
        stopping = _stop.is_set()  # at exit: take what is queued (the broker's last lines), then end
        try:
            records = _core.log_records(0.0 if stopping else _WAIT)
        except Exception:  # noqa: BLE001 - the interpreter is finalizing: stop quietly
            return
        if stopping and not records:
            return
        for levelno, name, message, fields in records:
            target = logging.getLogger(name)
            if target.isEnabledFor(levelno):
                text = message + "".join(f" {key}={value}" for key, value in fields.items())
                target.log(levelno, text, extra={"pystrands_fields": fields, "pystrands_message": message})
        dropped = _core.log_dropped()
        if dropped > dropped_seen:
            logger.warning("%d native log record(s) dropped: Python logging fell behind", dropped - dropped_seen)
            dropped_seen = dropped
