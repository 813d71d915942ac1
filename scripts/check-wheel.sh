#!/usr/bin/env bash
# Installs the wheel from dist/ into a fresh virtual environment with no Rust toolchain on PATH
# and runs the broker from it: proof that users get a prebuilt package that works as it is.
#
#   bash scripts/check-wheel.sh [WHEEL]
set -euo pipefail
cd "$(dirname "$0")/.."
wheel=${1:-$(ls dist/*.whl | head -n 1)}
PY=${PYTHON:-python3}
PY=$(command -v "$PY")
env_dir=$(mktemp -d /tmp/pystrands-wheel-check.XXXXXX)
trap 'rm -rf "$env_dir"' EXIT

# A PATH with no cargo or rustc on it (rustup puts them in ~/.cargo/bin).
clean_path=$(printf '%s' "$PATH" | tr ':' '\n' | grep -v -e '\.cargo' -e 'rustup' | paste -sd: -)
if PATH=$clean_path command -v cargo >/dev/null || PATH=$clean_path command -v rustc >/dev/null; then
    echo "a Rust toolchain is still on PATH; cannot check the wheel without one" >&2
    exit 1
fi
PATH=$clean_path "$PY" -m venv "$env_dir"
PATH=$clean_path "$env_dir/bin/python" -m pip install -q --only-binary=:all: "$wheel"
PATH=$clean_path "$env_dir/bin/pystrands-broker" --version
PATH=$clean_path "$env_dir/bin/python" - <<'PY'
import asyncio
import pystrands
from pystrands import AsyncPyStrandsClient, Broker

class Echo(AsyncPyStrandsClient):
    async def on_message(self, message, context):
        await self.send_private_message(context.client_id, "echo: " + message)

async def main() -> None:
    broker = Broker(host="127.0.0.1", ws_port=0, tcp_port=0, log_level="warn")
    async with broker.serving(Echo()):
        reader, writer = await asyncio.open_connection("127.0.0.1", broker.ws_port)
        writer.write(
            b"GET /lobby HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        writer.write(bytes([0x81, 0x82, 1, 2, 3, 4]) + bytes(b ^ k for b, k in zip(b"hi", (1, 2))))
        frame = await asyncio.wait_for(reader.readexactly(2 + len("echo: hi")), 10)
        assert frame[2:] == b"echo: hi", frame
        writer.close()
    print(f"pystrands {pystrands.__version__} from the wheel: broker and in-process backend work")

asyncio.run(main())
PY
