"""Signed connection tokens (JWT, issue 18) against the real broker with real WebSocket clients:
a valid token is accepted by the broker itself (no backend needed, none asked), its claims
become the connection's context; every bad token (forged, expired, not yet valid, wrong or
`none` algorithm, a claim of the wrong type, malformed, 100 KB) gets its documented HTTP answer
before any upgrade and the broker keeps serving; a token that expires on an open connection
closes it with 4401.

Tokens are made with PyJWT; keys with `cryptography`. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pystrands.testing import running_broker
from test_browser_protocol import expect_skipping
from v1peer import DEADLINE, connect_v2_backend, wait_for

SECRET = "token-test-secret-of-at-least-32-bytes"


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


def hs(claims: dict[str, Any], key: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode({"exp": time.time() + 300, **claims}, key, algorithm=alg)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hmac_signed(claims: dict[str, Any], key: bytes) -> str:
    """An HS256 token made by hand (PyJWT refuses a PEM key as an HMAC secret)."""
    import hashlib
    import hmac

    signing = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
    return signing + "." + b64(hmac.new(key, signing.encode(), hashlib.sha256).digest())


def unsigned(claims: dict[str, Any]) -> str:
    """An `alg: none` token (what PyJWT refuses to make)."""
    head = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{head}.{b64(json.dumps(claims).encode())}."


async def refused(url: str, **kw: Any) -> tuple[int, str]:
    """Opens `url` and expects an HTTP refusal; returns its status and body."""
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(url, open_timeout=DEADLINE, max_size=None, **kw):
            pass
    resp = info.value.response
    return resp.status_code, (resp.body or b"").decode(errors="replace").strip()


async def closed_with(ws: Any) -> tuple[int, str]:
    try:
        while True:
            await asyncio.wait_for(ws.recv(), DEADLINE)
    except ConnectionClosed as e:
        assert e.rcvd is not None, "closed without a close frame"
        return int(e.rcvd.code), e.rcvd.reason


def test_a_valid_token_connects_with_no_backend_and_its_claims_become_the_context():
    async def main() -> None:
        with running_broker(jwt_secret=SECRET) as br:
            token = hs({"sub": "ann", "room": "lobby", "meta": {"plan": "pro"}, "cid": "c-ann"})
            # No backend is connected at all: the broker accepts on the token alone.
            ws = await websockets.connect(f"ws://127.0.0.1:{br.ws_port}/chat?token={token}", open_timeout=DEADLINE)
            # Now a backend: it gets the connection's events with the token's claims.
            backend = await connect_v2_backend(br)
            await ws.send("hello")
            ev = await expect_skipping(backend, "new_message")
            ctx = ev["params"]["context"]
            assert ctx == {"client_id": "c-ann", "room_id": "lobby", "metadata": {"plan": "pro"}, "user_id": "ann"}
            await backend.send("message_to_room", {"room_id": "lobby", "message": "to lobby"})
            await backend.send("message_to_user", {"user_id": "ann", "message": "to ann"})
            assert [await asyncio.wait_for(ws.recv(), DEADLINE) for _ in range(2)] == ["to lobby", "to ann"]
            # The room defaults to the request path, the client id to a fresh UUID; the
            # Authorization header works as well as the query.
            ws2 = await websockets.connect(
                f"ws://127.0.0.1:{br.ws_port}/room/7",
                additional_headers={"Authorization": f"Bearer {hs({'sub': 'bob'})}"},
                open_timeout=DEADLINE,
            )
            await ws2.send("hi")
            ev = await expect_skipping(backend, "new_message")
            ctx = ev["params"]["context"]
            assert ctx["room_id"] == "/room/7" and ctx["user_id"] == "bob" and ctx["metadata"] == {}
            assert len(ctx["client_id"]) == 36
            s = br.stats()
            assert s["token_connections"] == 2 and s["tokens_refused"] == 0
            await ws.close()
            await ws2.close()
            await backend.close()

    run(main())


def test_without_a_token_the_backend_decides_as_before():
    async def main() -> None:
        with running_broker(jwt_secret=SECRET) as br:
            backend = await connect_v2_backend(br)
            task = asyncio.ensure_future(websockets.connect(f"ws://127.0.0.1:{br.ws_port}/x?a=1", open_timeout=DEADLINE))
            req = await backend.expect("connection_request")
            assert (req["params"]["url"], req["params"]["query"]) == ("/x", "a=1")
            await backend.answer(req, True, client_id="by-backend")
            ws = await asyncio.wait_for(task, DEADLINE)
            assert br.stats()["token_connections"] == 0
            await ws.close()
            await backend.close()

    run(main())


def test_every_bad_token_gets_its_documented_answer_and_the_broker_keeps_serving():
    now = time.time()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases: list[tuple[str, str, int, str]] = [
        ("forged", hs({"sub": "a"}, key="not-the-secret-but-as-long-as-one-32"), 401, "invalid token signature"),
        ("expired", hs({"sub": "a", "exp": now - 3600}), 401, "token expired"),
        ("not yet valid", hs({"sub": "a", "nbf": now + 3600}), 401, "not yet valid"),
        ("no exp", jwt.encode({"sub": "a"}, SECRET, algorithm="HS256"), 401, "no exp"),
        ("wrong algorithm", jwt.encode({"sub": "a", "exp": now + 60}, rsa_key, algorithm="RS256"), 401, "not accepted"),
        ("alg none", unsigned({"sub": "a", "exp": now + 60}), 401, "malformed"),
        ("sub not a string", hs({"sub": 42}), 401, "claims"),
        ("meta not an object", hs({"meta": ["x"]}), 401, "claims"),
        ("room not a string", hs({"room": {"r": 1}}), 401, "claims"),
        ("exp not a number", jwt.encode({"exp": "tomorrow"}, SECRET, algorithm="HS256"), 401, "claims"),
        ("empty sub", hs({"sub": ""}), 401, "must not be empty"),
        ("garbage", "abc.def", 401, "malformed"),
        ("three garbage parts", "a.b.c", 401, "malformed"),
        ("100 KB", "a" * 100_000, 431, "too large"),
    ]

    async def main() -> None:
        with running_broker(jwt_secret=SECRET, max_id_length=64) as br:
            for name, token, status, why in cases:
                code, body = await refused(f"ws://127.0.0.1:{br.ws_port}/?token={token}")
                assert (code, why in body) == (status, True), (name, code, body)
            # The same through the Authorization header.
            code, body = await refused(f"ws://127.0.0.1:{br.ws_port}/", additional_headers={"Authorization": "Bearer " + cases[0][1]})
            assert code == 401 and "signature" in body
            code, _ = await refused(f"ws://127.0.0.1:{br.ws_port}/", additional_headers={"Authorization": "Bearer " + "b" * 100_000})
            assert code == 431
            code, body = await refused(f"ws://127.0.0.1:{br.ws_port}/?token={hs({'room': 'r' * 65})}")
            assert code == 401 and "max_id_length" in body
            assert br.stats()["tokens_refused"] == sum(1 for c in cases if c[2] == 401) + 2
            # The broker still serves.
            async with websockets.connect(f"ws://127.0.0.1:{br.ws_port}/?token={hs({'sub': 'ok'})}", open_timeout=DEADLINE) as ws:
                await ws.ping()

    run(main())


def test_public_keys_rs256_and_es256_from_a_file_or_pem_text(tmp_path: Path):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())

    def public_pem(key: Any) -> str:
        return str(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        )

    rsa_file = tmp_path / "rsa.pem"
    rsa_file.write_text(public_pem(rsa_key))

    async def main() -> None:
        exp = time.time() + 60
        with running_broker(jwt_public_key=str(rsa_file)) as br:
            url = f"ws://127.0.0.1:{br.ws_port}/?token="
            async with websockets.connect(url + jwt.encode({"sub": "r", "exp": exp}, rsa_key, algorithm="RS256")):
                pass
            other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            assert (await refused(url + jwt.encode({"exp": exp}, other, algorithm="RS256")))[0] == 401
            # An HMAC token keyed with the public key itself (the classic confusion) is refused.
            confused = hmac_signed({"exp": exp}, public_pem(rsa_key).encode())
            code, body = await refused(url + confused)
            assert code == 401 and "no jwt_secret" in body
        with running_broker(jwt_public_key=public_pem(ec_key), jwt_secret=SECRET) as br:
            url = f"ws://127.0.0.1:{br.ws_port}/?token="
            async with websockets.connect(url + jwt.encode({"sub": "e", "exp": exp}, ec_key, algorithm="ES256")):
                pass
            async with websockets.connect(url + hs({"sub": "h"})):
                pass
            assert (await refused(url + jwt.encode({"exp": exp}, rsa_key, algorithm="RS256")))[0] == 401
            # With both keys, an HMAC token keyed with the public key meets the secret: refused.
            code, body = await refused(url + hmac_signed({"exp": exp}, public_pem(ec_key).encode()))
            assert code == 401 and "signature" in body
            assert br.stats()["token_connections"] == 2

    run(main())


def test_audience_and_issuer_when_configured():
    async def main() -> None:
        with running_broker(jwt_secret=SECRET, jwt_audience="chat", jwt_issuer="auth.example") as br:
            url = f"ws://127.0.0.1:{br.ws_port}/?token="
            async with websockets.connect(url + hs({"aud": "chat", "iss": "auth.example"})):
                pass
            assert (await refused(url + hs({"aud": "billing", "iss": "auth.example"})))[1] == "token audience (aud) not accepted"
            assert "iss" in (await refused(url + hs({"aud": "chat"})))[1]

    run(main())


def test_a_token_that_expires_on_an_open_connection_closes_it_with_4401():
    async def main() -> None:
        with running_broker(jwt_secret=SECRET, jwt_leeway=0) as br:
            backend = await connect_v2_backend(br)
            token = jwt.encode({"sub": "ann", "exp": time.time() + 3.5}, SECRET, algorithm="HS256")
            ws = await websockets.connect(f"ws://127.0.0.1:{br.ws_port}/?token={token}", open_timeout=DEADLINE)
            long_lived = await websockets.connect(f"ws://127.0.0.1:{br.ws_port}/?token={hs({'sub': 'bob'})}")
            await backend.expect("new_connection")
            assert await closed_with(ws) == (4401, "token expired")
            await wait_for(lambda: br.stats()["tokens_expired"] == 1, what="tokens_expired counted")
            # The backend hears that the client left; the other connection is untouched.
            await long_lived.send("still here")
            seen = []
            while (ev := await backend.recv())["action"] != "new_message":
                seen.append((ev["action"], ev["params"]["context"]["user_id"]))
            assert ev["params"]["message"] == "still here"
            assert ("disconnected", "ann") in seen, seen
            await long_lived.close()
            await backend.close()

    run(main())


def test_a_storm_of_token_connections_needs_no_backend():
    """2,000 token connections (100 at a time) with no backend connected: every one accepted."""

    async def main() -> None:
        with running_broker(jwt_secret=SECRET, queue_size=10) as br:
            url = f"ws://127.0.0.1:{br.ws_port}/storm?token={hs({'sub': 'u'})}"
            for _ in range(20):
                batch = await asyncio.gather(*(websockets.connect(url, open_timeout=DEADLINE) for _ in range(100)))
                await asyncio.gather(*(ws.close() for ws in batch))
            s = br.stats()
            assert s["token_connections"] == 2000 and s["connections_accepted"] == 2000
            assert s["connections_unavailable"] == 0 and s["tokens_refused"] == 0

    run(main())
