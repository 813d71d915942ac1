"""The JSON and YAML blocks of the docs, checked against the real broker: each protocol line of
docs/protocol.md is sent as written by a raw TCP backend, or compared with the line the broker
really sends in that situation; the JSON log line of the operations guide with what
`pystrands-broker --log-format json` prints; the Kubernetes probes with the answers of the
routes they name.

In the documented lines, `"..."`, `{...}` and `"<…>"` stand for any value; everything else must be
what the broker sends, except in the event line, whose `seq` and event id are examples (only
their types must match)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import jwt
import websockets

from docblocks import background, texts, wait_http
from pystrands.testing import running_broker
from test_docs_commands import base_env, broker_ports
from v1peer import DEADLINE, wait_for

SECRET = "s3cret-backend"
JWT_SECRET = "jwt-" * 8
ANY = object()


def documented(text: str) -> Any:
    """A documented JSON line, its placeholders turned into ANY."""
    value = json.loads(text.replace("{...}", '"..."'))

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if v == "..." or (isinstance(v, str) and v.startswith("<") and v.endswith(">")):
            return ANY
        return v

    return walk(value)


def protocol_lines() -> list[Any]:
    return [documented(line) for block in texts("protocol.md", "json") for line in block.splitlines() if line.strip()]


def like(doc: Any, real: Any, examples: frozenset[str] = frozenset(), path: str = "") -> None:
    """`real` is what `doc` shows: same keys, same values, ANY matching anything; keys named in
    `examples` only need the same type."""
    if doc is ANY:
        return
    if isinstance(doc, dict):
        assert isinstance(real, dict) and set(doc) == set(real), f"{path or 'line'}: documented keys {sorted(doc)}, real {real}"
        for key, value in doc.items():
            if key in examples:
                assert type(real[key]) is type(value), f"{path}.{key}: {real[key]!r} is not a {type(value).__name__}"
            else:
                like(value, real[key], examples, f"{path}.{key}")
        return
    assert doc == real, f"{path}: documented {doc!r}, real {real!r}"


class RawBackend:
    """A backend that speaks the protocol line by line, as a test writes it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, message: Any) -> None:
        self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        await self.writer.drain()

    async def next(self, accept: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The next line the broker sends that `accept` takes (others are skipped)."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), DEADLINE)
            assert line, "the broker closed the backend connection"
            message = json.loads(line)
            if accept(message):
                return message


@asynccontextmanager
async def raw_backend(port: int) -> AsyncIterator[RawBackend]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield RawBackend(reader, writer)
    finally:
        writer.close()


def token(**claims: Any) -> str:
    return jwt.encode({"exp": time.time() + 60, **claims}, JWT_SECRET, algorithm="HS256")


def test_protocol_lines_are_what_the_broker_speaks():
    hello, answer, event, ack, command_error, query, reply = protocol_lines()

    async def main() -> None:
        with running_broker(backend_secret=SECRET, jwt_secret=JWT_SECRET) as broker:
            async with raw_backend(broker.tcp_port) as backend:
                # The backend's hello, as written but for the secret; the broker's answer.
                assert hello["params"]["secret"] is ANY
                await backend.send({**hello, "params": {**hello["params"], "secret": SECRET}})
                like(answer, await backend.next(lambda m: m["action"] == "hello"))

                # A client sends "hi": the event, then the documented cumulative ack clears it.
                client = await websockets.connect(f"ws://127.0.0.1:{broker.ws_port}/r?token={token(cid='c1')}", open_timeout=DEADLINE)
                await client.send(event["params"]["message"])
                got = await backend.next(lambda m: m["action"] == "new_message")
                like(event, got, examples=frozenset({"seq", "request_id"}))
                assert broker.stats()["unacked_events"] == 2  # new_connection and new_message
                like(ack, {**ack, "params": {"seq": got["seq"]}}, examples=frozenset({"seq"}))
                await backend.send({**ack, "params": {"seq": got["seq"]}})
                await wait_for(lambda: broker.stats()["unacked_events"] == 0, what="the ack to clear both events")

                # A join beyond max_rooms_per_client (c1 is in its first room "r" and 99 more).
                for n in range(99):
                    await backend.send({"request_id": f"j{n}", "action": "join_room", "params": {"client_id": "c1", "room_id": f"room{n}"}})
                join = {"request_id": "j-over", "action": "join_room", "params": {"client_id": "c1", "room_id": "one-too-many"}}
                await backend.send(join)
                got = await backend.next(lambda m: m["action"] == "command_error")
                like(command_error, got)
                assert got["request_id"] == "j-over"

                # The room_members query as written, and its reply once client "a" is in "lobby".
                member = await websockets.connect(f"ws://127.0.0.1:{broker.ws_port}/?token={token(cid='a', room='lobby')}", open_timeout=DEADLINE)
                await backend.send(query)
                like(reply, await backend.next(lambda m: m["action"] == "reply"))
                await member.close()
                await client.close()

    asyncio.run(main())


def test_json_log_line_block(tmp_path):
    """The log line of the operations guide is what `--log-format json` prints at start."""
    [block] = texts("guides/operations.md", "json")
    doc = json.loads(block)
    ws, tcp, _ = broker_ports()
    with background(f"pystrands-broker --log-format json --ws-port {ws} --tcp-port {tcp}", tmp_path, base_env()) as proc:
        wait_http(f"http://127.0.0.1:{ws}/health", proc)
        assert proc.stdout is not None
        end = time.monotonic() + DEADLINE
        while True:
            line = proc.stdout.readline()
            assert line and time.monotonic() < end, "no start line in the JSON log"
            record = json.loads(line)
            if record.get("message") == doc["message"]:
                break
    assert set(record) == set(doc) and record["level"] == doc["level"] and record["logger"] == doc["logger"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", record["time"]), record["time"]
    ports = {"0.0.0.0:8080": f"0.0.0.0:{ws}", "0.0.0.0:8081": f"0.0.0.0:{tcp}"}
    assert record["fields"] == {key: ports.get(value, value) for key, value in doc["fields"].items()}


def test_kubernetes_probe_block():
    """The probes' paths on the WebSocket port: liveness 200; readiness 503 until a backend is
    connected, then 200."""
    import urllib.error
    import urllib.request

    import yaml

    [block] = texts("guides/operations.md", "yaml")
    probes = yaml.safe_load(block)
    assert {p["httpGet"]["port"] for p in probes.values()} == {8080}

    def status(port: int, probe: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{probes[probe]['httpGet']['path']}", timeout=DEADLINE) as r:
                return int(r.status)
        except urllib.error.HTTPError as error:
            return error.code

    async def main() -> None:
        with running_broker() as broker:
            assert status(broker.ws_port, "livenessProbe") == 200
            assert status(broker.ws_port, "readinessProbe") == 503
            async with raw_backend(broker.tcp_port):
                await wait_for(lambda: status(broker.ws_port, "readinessProbe") == 200, what="ready once a backend is connected")
                assert status(broker.ws_port, "livenessProbe") == 200

    asyncio.run(main())


def test_protocol_blocks_are_all_checked():
    """Seven documented lines (hello, answer, event, ack, command_error, query, reply): a new line
    in protocol.md must be added to the test above."""
    assert len(protocol_lines()) == 7
