"""W1-style echo through the broker with different Python backends, measured in one run.

Starts our broker (release build, `python -m pystrands server`) on free loopback ports; for each
backend — our AsyncPyStrandsClient, our PyStrandsClient, and the PyStrands 1.0 clients from PyPI
(from `.venv-v1`) — starts it in its own process, lets the Rust load generator
(`benches/loadgen`) run N WebSocket clients doing ping-pong through broker and backend, and
records messages/s and latency percentiles. Writes benches/results/echo_backends.json and prints a
Markdown table with the ratios. Everything stops by itself.

    cargo build --release -p pystrands-loadgen
    python benches/echo_backends.py [--clients 100] [--seconds 10] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchutil import free_port, stop_process, wait_port

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "target" / "release" / "pystrands-loadgen"
V1_PYTHON = Path(os.environ.get("PYSTRANDS_V1_PYTHON", ROOT / ".venv-v1" / "bin" / "python"))

ASYNC_ECHO = """
import asyncio, sys
from pystrands import AsyncPyStrandsClient
class Echo(AsyncPyStrandsClient):
    async def on_message(self, message, context):
        await self.send_private_message(context.client_id, message)
asyncio.run(Echo(host="127.0.0.1", port=int(sys.argv[1])).run_forever())
"""

SYNC_ECHO = """
import sys
from pystrands import PyStrandsClient
class Echo(PyStrandsClient):
    def on_message(self, message, context):
        self.send_private_message(context.client_id, message)
try:
    Echo(host="127.0.0.1", port=int(sys.argv[1])).run_forever()
except KeyboardInterrupt:
    pass
"""

BACKENDS = [
    ("ours-async", sys.executable, ASYNC_ECHO),
    ("ours-sync", sys.executable, SYNC_ECHO),
    ("pystrands-1.0-async", str(V1_PYTHON), ASYNC_ECHO),
    ("pystrands-1.0-sync", str(V1_PYTHON), SYNC_ECHO),
]


def measure(name: str, python: str, source: str, tcp_port: int, ws_port: int, args: argparse.Namespace) -> dict:
    backend = subprocess.Popen([python, "-c", source, str(tcp_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # let the backend connect (the broker answers 503 until then)
        out = subprocess.run(
            [str(LOADGEN), "echo", "--url", f"ws://127.0.0.1:{ws_port}/bench", "--clients", str(args.clients),
             "--seconds", str(args.seconds), "--warmup", "1", "--size", str(args.size)],
            capture_output=True, text=True, timeout=args.seconds + 60,
        )
        result = json.loads(out.stdout)
        result["backend"] = name
        return result
    finally:
        stop_process(backend, timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description="echo through the broker with different Python backends")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if not LOADGEN.exists():
        sys.exit(f"build the load generator first: cargo build --release -p pystrands-loadgen ({LOADGEN} missing)")
    ws_port, tcp_port = free_port(), free_port()
    broker = subprocess.Popen([sys.executable, "-m", "pystrands", "server", "--host", "127.0.0.1", "--ws-port", str(ws_port), "--tcp-port", str(tcp_port), "--log-level", "error"])
    results = []
    try:
        wait_port(tcp_port)
        for run in range(args.runs):
            for name, python, source in BACKENDS:
                if not Path(python).exists():
                    continue
                r = measure(name, python, source, tcp_port, ws_port, args)
                r["run"] = run
                results.append(r)
                print(f"run {run} {name}: {r['msgs_per_sec']:.0f} msg/s p50 {r['latency_us']['p50']} us p99 {r['latency_us']['p99']} us errors {r['errors']}", file=sys.stderr)
    finally:
        stop_process(broker, timeout=30)
    best: dict[str, dict] = {}
    for r in results:
        if r["backend"] not in best or r["msgs_per_sec"] > best[r["backend"]]["msgs_per_sec"]:
            best[r["backend"]] = r
    summary = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": vars(args),
        "runs": results,
        "best": best,
    }
    out = ROOT / "benches" / "results" / "echo_backends.json"
    out.write_text(json.dumps(summary, indent=2))
    base = best.get("pystrands-1.0-async", {}).get("msgs_per_sec")
    print(f"| backend (best of {args.runs}, {args.clients} clients, {args.size} B) | msg/s | p50 ms | p99 ms | p99.9 ms | vs 1.0 async |")
    print("|---|---|---|---|---|---|")
    for name, r in best.items():
        lat = r["latency_us"]
        ratio = f"{r['msgs_per_sec'] / base:.2f}x" if base else "-"
        print(f"| {name} | {r['msgs_per_sec']:,.0f} | {lat['p50'] / 1000:.2f} | {lat['p99'] / 1000:.2f} | {lat['p999'] / 1000:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
