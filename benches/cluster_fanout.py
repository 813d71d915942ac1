"""Cross-node room fan-out: 3 brokers over Redis vs one broker, 1 room x 3,000 clients.

Starts a real redis-server and the brokers (`python -m pystrands server`, so install a release
build first) on free loopback ports. The Rust load generator (`benches/loadgen`, workload
`cluster-fanout`) is the backend of every node and opens the WebSocket clients, spread evenly over the
nodes; the backend on the first node publishes to the room. For each setup it runs

* a closed loop (at most `--window` messages in flight): deliveries per second sustained;
* an open loop at `--rate` messages per second: delivery latency at a load both setups carry.

Runs alternate between the setups (`--runs`, default 3) and the best run of each counts (other
load on the machine only ever slows a run down); the load average is recorded. Writes
benches/results/cluster_fanout.json and prints a Markdown table with the 3-node/1-node ratios.
Everything runs on 127.0.0.1 and stops by itself (about 90 s with the defaults).

    maturin develop --release          # or: pip install .
    cargo build --release -p pystrands-loadgen
    python benches/cluster_fanout.py [--clients 3000] [--seconds 4] [--runs 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from benchutil import free_port, stop_process, wait_port

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "target" / "release" / "pystrands-loadgen"


def exited(proc: subprocess.Popen):
    """A `wait_port` check that fails once `proc` has exited."""

    def check() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")

    return check


@contextmanager
def process(cmd: list[str]) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        stop_process(proc)


@contextmanager
def setup(nodes: int, redis_url: str | None) -> Iterator[tuple[list[str], list[str]]]:
    """Starts `nodes` brokers; yields their WebSocket URLs and backend addresses."""
    with ExitStack() as stack:
        urls, backends = [], []
        for i in range(nodes):
            ws, tcp = free_port(), free_port()
            cmd = [sys.executable, "-m", "pystrands", "server", "--host", "127.0.0.1", "--ws-port", str(ws), "--tcp-port", str(tcp), "--log-level", "error"]
            if redis_url:
                cmd += ["--redis-url", redis_url, "--cluster-node-id", f"bench-{i}"]
            proc = stack.enter_context(process(cmd))
            wait_port(tcp, check=exited(proc))
            urls.append(f"ws://127.0.0.1:{ws}/bench")
            backends.append(f"127.0.0.1:{tcp}")
        yield urls, backends


def loadgen(urls: list[str], backends: list[str], args: argparse.Namespace, rate: float) -> dict:
    cmd = [str(LOADGEN), "cluster-fanout", "--urls", ",".join(urls), "--backends", ",".join(backends), "--clients", str(args.clients),
           "--seconds", str(args.seconds), "--warmup", "1", "--size", str(args.size), "--window", str(args.window), "--rate", str(rate)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 120)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return {"error": f"loadgen exited {out.returncode}: {out.stderr[-500:]}"}


def main() -> None:
    ap = argparse.ArgumentParser(description="cross-node fan-out: 3 brokers over Redis vs 1 broker")
    ap.add_argument("--clients", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--window", type=int, default=16, help="closed loop: messages in flight")
    ap.add_argument("--rate", type=float, default=20, help="open loop: messages per second for the latency run")
    ap.add_argument("--out", type=Path, default=ROOT / "benches" / "results" / "cluster_fanout.json")
    args = ap.parse_args()
    if not LOADGEN.exists():
        sys.exit(f"build the load generator first: cargo build --release -p pystrands-loadgen ({LOADGEN} missing)")
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")

    runs: list[dict] = []
    load_before = os.getloadavg()
    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    with process([redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]) as redis:
        wait_port(redis_port, check=exited(redis))
        for run in range(args.runs):
            for name, nodes, url in [("1 node", 1, None), ("3 nodes + Redis", 3, redis_url)]:
                with setup(nodes, url) as (urls, backends):
                    for mode, rate in [("throughput", 0.0), ("latency", args.rate)]:
                        r = loadgen(urls, backends, args, rate)
                        r.update(setup=name, measure=mode, run=run)
                        runs.append(r)
                        if "error" in r:
                            print(f"run {run} {name} {mode}: ERROR {r['error']}", file=sys.stderr)
                        else:
                            lat = r["latency_us"]
                            print(f"run {run} {name} {mode}: {r['deliveries_per_sec']:,.0f} deliveries/s, {r['messages_per_sec']:,.1f} msg/s, "
                                  f"p50 {lat['p50'] / 1000:.1f} ms p99 {lat['p99'] / 1000:.1f} ms, missing {r['missing']}, errors {r['errors']}", file=sys.stderr)

    # Best run per setup and measure: most deliveries/s, or lowest median latency.
    results: dict[str, dict] = {}
    for r in runs:
        key = f"{r['setup']} / {r['measure']}"
        if "error" in r:
            results.setdefault(key, r)
            continue
        best = results.get(key)
        if best is None or "error" in best:
            results[key] = r
        elif r["measure"] == "throughput" and r["deliveries_per_sec"] > best["deliveries_per_sec"]:
            results[key] = r
        elif r["measure"] == "latency" and r["latency_us"]["p50"] < best["latency_us"]["p50"]:
            results[key] = r

    summary = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_average_before_after": [load_before, os.getloadavg()],
        "settings": vars(args),
        "best": results,
        "runs": runs,
    }
    ok = all("error" not in r for r in results.values())
    if ok:
        one, three = results["1 node / throughput"], results["3 nodes + Redis / throughput"]
        summary["ratio_3_nodes_vs_1_throughput"] = three["deliveries_per_sec"] / one["deliveries_per_sec"]
        summary["ratio_3_nodes_vs_1_latency_p50"] = results["3 nodes + Redis / latency"]["latency_us"]["p50"] / results["1 node / latency"]["latency_us"]["p50"]
    args.out.write_text(json.dumps(summary, indent=2, default=str))

    print(f"| setup ({args.clients} clients in 1 room, {args.size} B, best of {args.runs}) | deliveries/s (window {args.window}) | p50 / p99 ms at {args.rate:g} msg/s | missing |")
    print("|---|---|---|---|")
    for name in ("1 node", "3 nodes + Redis"):
        t, l = results[f"{name} / throughput"], results[f"{name} / latency"]
        if "error" in t or "error" in l:
            print(f"| {name} | error | error | - |")
            continue
        print(f"| {name} | {t['deliveries_per_sec']:,.0f} | {l['latency_us']['p50'] / 1000:.1f} / {l['latency_us']['p99'] / 1000:.1f} | {t['missing'] + l['missing']} |")
    if ok:
        print(f"\nratio 3 nodes / 1 node: throughput {summary['ratio_3_nodes_vs_1_throughput']:.2f}x, p50 latency {summary['ratio_3_nodes_vs_1_latency_p50']:.2f}x")
    else:
        sys.exit(1)


if __name__ == "__main__":
    main()
