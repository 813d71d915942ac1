#!/usr/bin/env python3
"""Micro-benchmark of the backend clients' inbound codec: native `LineDecoder` vs pure Python.

Decodes N `new_message` lines (v2 frames with `seq`, about 220 bytes each) fed in 256 KiB chunks,
as a client's session does, and prints the best of several rounds in µs per event for each codec.
Usage: python benches/codec_decode.py [--events 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import time

from pystrands._session import Session

CHUNK = 256 * 1024


def stream(n: int) -> bytes:
    lines = []
    for i in range(1, n + 1):
        frame = {
            "request_id": f"e{i}",
            "action": "new_message",
            "seq": i,
            "params": {
                "message": "x" * 64,
                "context": {"client_id": f"client-{i % 100}", "room_id": "bench", "metadata": {"user": "alice", "n": i}},
            },
        }
        lines.append(json.dumps(frame, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode()


def best_us_per_event(codec: str, data: bytes, n: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        s = Session(codec=codec)
        s.connection_made()
        count = 0
        t0 = time.perf_counter()
        for i in range(0, len(data), CHUNK):
            count += len(s.receive_data(data[i : i + CHUNK]))
        elapsed = time.perf_counter() - t0
        assert count == n, (codec, count)
        best = min(best, elapsed / n * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    data = stream(args.events)
    print(f"{args.events} new_message lines, {len(data) / args.events:.0f} B each, best of {args.rounds}")
    for codec in ("python", "native"):
        print(f"{codec:>7}: {best_us_per_event(codec, data, args.events, args.rounds):.2f} µs per event")


if __name__ == "__main__":
    main()
