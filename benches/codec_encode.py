#!/usr/bin/env python3
"""Micro-benchmark of the backend clients' send encoders: native vs pure Python.

Encodes N sends of each kind (`message_to_room`, `message_to_connection`, `broadcast`) with a
64-byte message through the encoders a session picks (`Session(codec=...).encoders`), and prints
the best of several rounds in µs per send for each codec. Usage:
python benches/codec_encode.py [--sends 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import time

from pystrands._session import Session


def best_us_per_send(codec: str, n: int, rounds: int) -> dict[str, float]:
    enc = Session(codec=codec).encoders
    message, room, client = "x" * 64, "bench", "client-42"
    kinds = {
        "room": lambda: enc.room(room, message),
        "private": lambda: enc.private(client, message),
        "broadcast": lambda: enc.broadcast(message),
    }
    out = {}
    for name, call in kinds.items():
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(n):
                call()
            best = min(best, time.perf_counter() - t0)
        out[name] = best / n * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sends", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    for codec in ("native", "python"):
        r = best_us_per_send(codec, args.sends, args.rounds)
        print(codec, "  ".join(f"{k} {v:.3f} µs" for k, v in r.items()))


if __name__ == "__main__":
    main()
