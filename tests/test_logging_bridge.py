"""The native core's log records reach Python's `logging` (issue 16): on `pystrands.broker.*`
loggers, with their structured fields, through the application's own handlers; a flood of
records never stalls the broker and every record is either emitted or counted as dropped; the
CLI writes one JSON object per line with `--log-format json`.

Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pystrands import _core
from pystrands.testing import running_broker
from v1peer import DEADLINE, connect_backend, connect_client, wait_for


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def collecting(level: int) -> Iterator[Collect]:
    """A handler on `pystrands.broker` at `level` for the duration (restored afterwards)."""
    log = logging.getLogger("pystrands.broker")
    handler = Collect()
    old = log.level
    log.addHandler(handler)
    log.setLevel(level)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(old)


def test_native_warnings_arrive_on_pystrands_broker_loggers_with_their_fields():
    async def main() -> None:
        with collecting(logging.INFO) as got, running_broker(log_level="info") as br:
            await wait_for(lambda: any("listening" in r.getMessage() for r in got.records), what="the start record")
            started = next(r for r in got.records if "listening" in r.getMessage())
            assert started.name == "pystrands.broker" and started.levelno == logging.INFO
            assert started.pystrands_fields["websocket"] == f"127.0.0.1:{br.ws_port}"  # type: ignore[attr-defined]
            assert started.pystrands_message == "PyStrands broker listening"  # type: ignore[attr-defined]
            b = await connect_backend(br)
            await b.send_raw(b"{not json}\n")
            await wait_for(lambda: br.stats()["backend_errors"] == 1, what="the bad line counted")
            await wait_for(lambda: any("malformed json" in r.getMessage() for r in got.records), what="its warning")
            warning = next(r for r in got.records if "malformed json" in r.getMessage())
            assert warning.levelno == logging.ERROR and warning.name == "pystrands.broker.throttle"
            assert warning.pystrands_fields["cause"] == "malformed json"  # type: ignore[attr-defined]
            await b.close()

    run(main())


def test_a_flood_of_debug_records_neither_stalls_the_broker_nor_goes_unaccounted():
    n = 100_000

    async def main() -> None:
        with collecting(logging.DEBUG) as got, running_broker(log_level="debug") as br:
            b = await connect_backend(br)
            ws, _ = await connect_client(br.ws_port, b, client_id="c", room_id="r")
            dropped_before = _core.log_dropped()
            mark = len(got.records)
            # One debug record each: a private message for a client nobody has.
            line = b'{"action":"message_to_connection","params":{"conn_id":"ghost","message":"m"}}\n'
            started = time.monotonic()
            await b.send_raw(line * n)
            await b.send("message_to_connection", {"conn_id": "c", "message": "after the flood"})
            assert await asyncio.wait_for(ws.recv(), DEADLINE) == "after the flood"
            serving = time.monotonic() - started

            def accounted() -> int:
                emitted = sum(1 for r in got.records[mark:] if "ghost" in r.getMessage())
                return emitted + _core.log_dropped() - dropped_before

            await wait_for(lambda: accounted() == n, timeout=60, what="every record emitted or counted as dropped")
            assert br.stats()["no_route"] == n
            await ws.close()
            await b.close()
            assert serving < 30, f"the broker took {serving:.1f} s to get past the flood"

    run(main())


def test_cli_json_log_lines_parse():
    proc = subprocess.Popen(
        [sys.executable, "-m", "pystrands", "server", "--host", "127.0.0.1", "--ws-port", "0", "--tcp-port", "0", "--log-format", "json", "--log-level", "info"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + DEADLINE
        lines = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(json.loads(line))
            if "listening" in lines[-1]["message"]:
                break
        started = lines[-1]
        assert set(started) == {"time", "level", "logger", "message", "fields"}, started
        assert started["level"] == "INFO" and started["logger"] == "pystrands.broker"
        assert started["message"] == "PyStrands broker listening" and "websocket" in started["fields"]
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=DEADLINE)
        for line in rest.splitlines():
            json.loads(line)  # every line is one JSON object
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
