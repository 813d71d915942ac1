"""Benchmark system: our broker with the benchmark backend running in the broker's own process.

The same handlers as `pystrands_backend.py` (the `Bench` class is imported from it), hosted
in-process: no TCP between broker and handlers. asyncio runs them through
`Broker(...).serve(backend=...)`; uvloop through `async with broker.serving(...)` on a loop
uvloop made (the path a FastAPI lifespan takes). Usage:
python pystrands_inproc.py WS_PORT TCP_PORT [asyncio|uvloop]
"""

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pystrands_backend import Bench  # noqa: E402

from pystrands import Broker  # noqa: E402


def main() -> None:
    ws_port, tcp_port = int(sys.argv[1]), int(sys.argv[2])
    loop = sys.argv[3] if len(sys.argv) > 3 else "asyncio"
    broker = Broker(host="127.0.0.1", ws_port=ws_port, tcp_port=tcp_port, log_level="error")
    if loop == "asyncio":
        broker.serve(backend=Bench())
    elif loop == "uvloop":
        import uvloop

        async def run() -> None:
            async with broker.serving(Bench()):
                await asyncio.Event().wait()  # until the process is stopped

        uvloop.run(run())
    else:
        sys.exit(f"unknown event loop {loop!r}: asyncio or uvloop")


if __name__ == "__main__":
    main()
