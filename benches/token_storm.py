"""A reconnect storm of 10,000 token clients against a broker with a Python backend connected
(issue 18): counts what reached Python. The broker accepts every client on its signed token, so
the backend must see no `connection_request` at all, only the `new_connection` notifications.

    .venv/bin/python benches/token_storm.py [CLIENTS]

Needs the release load generator (`cargo build --release -p pystrands-loadgen`, in
$CARGO_TARGET_DIR or target/). Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import run as bench  # noqa: E402  (make_token, JWT_SECRET)
from pystrands import Broker, PyStrandsClient  # noqa: E402

calls = {"connection_request": 0, "new_connection": 0}


class Counting(PyStrandsClient):
    def on_connection_request(self, request: Any) -> bool:
        calls["connection_request"] += 1
        return True

    def on_new_connection(self, context: Any) -> None:
        calls["new_connection"] += 1


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="a reconnect storm of token clients: what reaches the Python backend")
    ap.add_argument("clients", type=int, nargs="?", default=10_000, help="token clients (default 10,000)")
    return ap


def main() -> None:
    clients = parser().parse_args().clients
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path(__file__).parents[1] / "target"))
    loadgen = target / "release" / "pystrands-loadgen"
    broker = Broker(host="127.0.0.1", ws_port=0, tcp_port=0, jwt_secret=bench.JWT_SECRET, log_level="warn")
    broker.start()
    try:
        backend = Counting("127.0.0.1", broker.tcp_port)
        threading.Thread(target=backend.run_forever, daemon=True).start()
        deadline = time.monotonic() + 10
        while broker.stats()["backends"] == 0:
            assert time.monotonic() < deadline, "the backend did not connect"
            time.sleep(0.05)
        url = f"ws://127.0.0.1:{broker.ws_port}/storm?token={bench.make_token('storm')}"
        out = subprocess.run(
            [str(loadgen), "connect", "--url", url, "--clients", str(clients), "--concurrency", "100"],
            capture_output=True, text=True, check=True, timeout=300,
        )  # fmt: skip
        result = json.loads(out.stdout.strip().splitlines()[-1])
        deadline = time.monotonic() + 60
        while calls["new_connection"] < clients and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = broker.stats()
        print(json.dumps({
            "clients": clients,
            "connected": result["connected"],
            "connects_per_sec": round(result["connects_per_sec"]),
            "errors": result["errors"]["count"],
            "broker": {k: stats[k] for k in ("token_connections", "connections_accepted", "tokens_refused")},
            "python_saw": calls,
        }, indent=1))  # fmt: skip
    finally:
        broker.stop(timeout=5)


if __name__ == "__main__":
    main()
