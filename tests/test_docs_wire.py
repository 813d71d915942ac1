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
from collections.abc import Callable
from typing import Any

import websockets

from docblocks import background, base_env, broker_ports, http_get, signed_token, texts
from pystrands.testing import running_broker
from v1peer import DEADLINE, RawBackend, wait_for

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


async def next_line(backend: RawBackend, accept: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The next line the broker sends the backend that `accept` takes (heartbeats and others skipped)."""
    while True:
        message = await backend.recv()
        if accept(message):
            return message


async def send_line(backend: RawBackend, message: Any) -> None:
    await backend.send_raw(json.dumps(message, separators=(",", ":")).encode() + b"\n")


def token(**claims: Any) -> str:
    return signed_token(JWT_SECRET, **claims)


def test_protocol_lines_are_what_the_broker_speaks():
    hello, answer, event, ack, command_error, query, reply = protocol_lines()

    async def main() -> None:
        with running_broker(backend_secret=SECRET, jwt_secret=JWT_SECRET) as broker:
            backend = await RawBackend.connect(broker.tcp_port)
            try:
                # The backend's hello, as written but for the secret; the broker's answer.
                assert hello["params"]["secret"] is ANY
                await send_line(backend, {**hello, "params": {**hello["params"], "secret": SECRET}})
                like(answer, await next_line(backend, lambda m: m["action"] == "hello"))

                # A client sends "hi": the event, then the documented cumulative ack clears it.
                client = await websockets.connect(f"ws://127.0.0.1:{broker.ws_port}/r?token={token(cid='c1')}", open_timeout=DEADLINE)
                await client.send(event["params"]["message"])
                got = await next_line(backend, lambda m: m["action"] == "new_message")
                like(event, got, examples=frozenset({"seq", "request_id"}))
                assert broker.stats()["unacked_events"] == 2  # new_connection and new_message
                assert set(ack["params"]) == {"seq"}  # the line as written, with the seq just received
                await send_line(backend, {**ack, "params": {"seq": got["seq"]}})
                await wait_for(lambda: broker.stats()["unacked_events"] == 0, what="the ack to clear both events")

                # A join beyond max_rooms_per_client (c1 is in its first room "r" and 99 more).
                for n in range(99):
                    await send_line(backend, {"request_id": f"j{n}", "action": "join_room", "params": {"client_id": "c1", "room_id": f"room{n}"}})
                join = {"request_id": "j-over", "action": "join_room", "params": {"client_id": "c1", "room_id": "one-too-many"}}
                await send_line(backend, join)
                got = await next_line(backend, lambda m: m["action"] == "command_error")
                like(command_error, got)
                assert got["request_id"] == "j-over"

                # The room_members query as written, and its reply once client "a" is in "lobby".
                member = await websockets.connect(f"ws://127.0.0.1:{broker.ws_port}/?token={token(cid='a', room='lobby')}", open_timeout=DEADLINE)
                await send_line(backend, query)
                like(reply, await next_line(backend, lambda m: m["action"] == "reply"))
                await member.close()
                await client.close()
            finally:
                backend.writer.close()

    asyncio.run(main())


def test_json_log_line_block(tmp_path):
    """The log line of the operations guide is what `--log-format json` prints at start."""
    [block] = texts("guides/operations.md", "json")
    doc = json.loads(block)
    ws, tcp, _ = broker_ports()
    with background(f"pystrands-broker --log-format json --ws-port {ws} --tcp-port {tcp}", tmp_path, base_env()) as proc:
        line = proc.wait_line(lambda line: json.loads(line).get("message") == doc["message"], "the start line in the JSON log")
    record = json.loads(line)
    assert set(record) == set(doc) and record["level"] == doc["level"] and record["logger"] == doc["logger"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", record["time"]), record["time"]
    ports = {"0.0.0.0:8080": f"0.0.0.0:{ws}", "0.0.0.0:8081": f"0.0.0.0:{tcp}"}
    assert record["fields"] == {key: ports.get(value, value) for key, value in doc["fields"].items()}


def test_kubernetes_probe_block():
    """The probes' paths on the WebSocket port: liveness 200; readiness 503 until a backend is
    connected, then 200."""
    import yaml

    [block] = texts("guides/operations.md", "yaml")
    probes = yaml.safe_load(block)
    assert {p["httpGet"]["port"] for p in probes.values()} == {8080}

    def status(port: int, probe: str) -> int:
        return http_get(f"http://127.0.0.1:{port}{probes[probe]['httpGet']['path']}")[0]

    async def main() -> None:
        with running_broker() as broker:
            assert status(broker.ws_port, "livenessProbe") == 200
            assert status(broker.ws_port, "readinessProbe") == 503
            backend = await RawBackend.connect(broker.tcp_port)
            await wait_for(lambda: status(broker.ws_port, "readinessProbe") == 200, what="ready once a backend is connected")
            assert status(broker.ws_port, "livenessProbe") == 200
            backend.writer.close()

    asyncio.run(main())
