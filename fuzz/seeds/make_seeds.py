#!/usr/bin/env python3
"""Writes the committed seed inputs of the fuzz targets (fuzz/seeds/<target>/): real upgrade
requests, real backend lines (docs/protocol.md), encoded cluster envelopes (the layout of
rust/core/src/cluster/envelope.rs) and HS256 JWTs signed with the secret "fuzz-secret".
Deterministic; stdlib only. Run it again after changing it: `python3 fuzz/seeds/make_seeds.py`."""

import base64
import hashlib
import hmac
import json
import pathlib
import struct

HERE = pathlib.Path(__file__).resolve().parent


def write(target, name, data):
    d = HERE / target
    d.mkdir(exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


# http_head: the first byte is the read size the target uses (0 → 1 byte per read, 0x7f → 128,
# 0x80 → 256), the rest is what the client sent.
UPGRADE = (
    "GET /ws/chat?room=lobby&proto=pystrands.1 HTTP/1.1\r\nHost: localhost:8765\r\n"
    "Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://localhost:8000\r\n"
    "Sec-WebSocket-Protocol: pystrands.1\r\nX-Token: secret\r\n\r\n"
)
write("http_head", "upgrade", b"\x80" + UPGRADE.encode())
write("http_head", "upgrade_bytewise_with_frame", b"\x00" + UPGRADE.encode() + b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58")
write("http_head", "health", b"\x07GET /health?x=1 HTTP/1.0\r\nHost: x\r\n\r\n")
write("http_head", "admin_bearer", b"\x03GET /admin/stats HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n\r\n")
write("http_head", "post", b"\x80POST /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")

# backend_line: lines a backend sends (docs/protocol.md), one per file, and a few in one stream.
LINES = [
    {"request_id": "hello", "action": "hello",
     "params": {"version": 2, "features": ["ack", "heartbeat", "rooms", "history"], "secret": "...",
                "client": "pystrands-python/2.0.0"}},
    {"request_id": "c1", "action": "response",
     "params": {"accepted": True, "client_id": "alice", "room_id": "lobby", "metadata": {"n": 1},
                "user_id": "u1", "reason": None}},
    {"request_id": "2", "action": "message_to_room",
     "params": {"room_id": "lobby", "message": "hi", "exclude": ["alice"]}},
    {"request_id": "3", "action": "message_to_connection", "params": {"conn_id": "alice", "message": {"k": [1, 2.5]}}},
    {"request_id": "4", "action": "broadcast", "params": {"message": "to all"}},
    {"request_id": "ack", "action": "ack", "params": {"seq": 41}},
    {"request_id": "heartbeat", "action": "heartbeat", "params": {}},
    {"request_id": "5", "action": "message_to_user", "params": {"user_id": "u1", "message": "psst"}},
    {"request_id": "6", "action": "join_room", "params": {"client_id": "c1", "room_id": "r2"}},
    {"request_id": "7", "action": "leave_room", "params": {"client_id": "c1", "room_id": "r2"}},
    {"request_id": "8", "action": "disconnect", "params": {"client_id": "c1", "code": 4000, "reason": "bye"}},
    {"request_id": "q7", "action": "room_members", "params": {"room_id": "lobby", "timeout": 2.0}},
    {"request_id": "q8", "action": "room_count", "params": {"room_id": "lobby"}},
    {"request_id": "9", "action": "room_config",
     "params": {"room_id": "lobby", "history_size": 50, "history_ttl": 300.0, "presence": True}},
    {"request_id": "q9", "action": "room_history", "params": {"room_id": "lobby", "since": 3, "limit": 10}},
]
for i, line in enumerate(LINES):
    write("backend_line", f"{i:02}_{line['action']}", json.dumps(line, separators=(",", ":")))
write("backend_line", "stream", "\n".join(json.dumps(x) for x in LINES[:6]) + "\r\n{\"action\":")

# cluster_envelope: payload := version:u8 origin_len:u8 origin first_seq:u64be count:u32be record*
# record := kind:u8 target_len:u32be target body_len:u32be body


def record(kind, target, body):
    t = target.encode()
    return kind.encode() + struct.pack(">I", len(t)) + t + struct.pack(">I", len(body)) + body


def payload(origin, first_seq, records):
    o = origin.encode()
    return bytes([1, len(o)]) + o + struct.pack(">QI", first_seq, len(records)) + b"".join(records)


def except_body(ids, message):
    out = struct.pack(">I", len(ids))
    for i in ids:
        out += struct.pack(">I", len(i.encode())) + i.encode()
    return out + message.encode()


RECORDS = [
    record("R", "lobby", b"hello \"world\"\n"),
    record("X", "lobby", except_body(["alice", "b\u00fc"], "not for them")),
    record("P", "alice", b"private"),
    record("U", "u1", b"to the user"),
    record("B", "", "\u00df\u2202".encode()),
    record("C", "alice", struct.pack(">Q", 1700000000000)),
    record("J", "alice", b"room2"),
    record("L", "alice", b"room2"),
    record("K", "alice", struct.pack(">H", 4000) + b"bye"),
    record("Q", "lobby", struct.pack(">Q", 77)),
    record("A", "n-1", struct.pack(">Q", 77) + b'[{"client_id":"a","room_id":"lobby","metadata":{}}]'),
    record("E", "lobby", b'{"type":"presence","room":"lobby","join":["a"]}'),
    record("G", "lobby", b'{"history_size":50}'),
]
write("cluster_envelope", "payload_all_kinds", payload("n-0123456789ab", 7, RECORDS))
write("cluster_envelope", "payload_empty", payload("node-a", 1, []))
write("cluster_envelope", "record_room", RECORDS[0])
write("cluster_envelope", "except_body", except_body(["a", "b\u0000c"], "hi"))
write("cluster_envelope", "kick_body", struct.pack(">H", 4001) + "replaced \u00fc".encode())

# jwt: HS256 tokens signed with "fuzz-secret" (the target verifies with that secret), good and bad.
SECRET = b"fuzz-secret"


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(header, claims, secret=SECRET):
    signing_input = b64(json.dumps(header, separators=(",", ":")).encode()) + "." + b64(
        json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(sig)


HS256 = {"alg": "HS256", "typ": "JWT"}
FAR = 4102444800  # 2100-01-01
# The claims token.rs reads: sub (user id), room, meta (object), cid (client id), exp (required).
FULL = {"sub": "alice", "room": "lobby", "meta": {"role": "admin", "n": 1}, "cid": "c-1", "exp": FAR,
        "iat": 1700000000}
write("jwt", "valid", jwt(HS256, FULL))
write("jwt", "valid_minimal", jwt(HS256, {"sub": "bob", "exp": FAR}))
write("jwt", "valid_hs512", jwt({"alg": "HS512"}, {"exp": FAR, "room": "r"}))
write("jwt", "expired", jwt(HS256, {"sub": "alice", "exp": 1000000000}))
write("jwt", "not_yet", jwt(HS256, {"sub": "alice", "exp": FAR, "nbf": FAR - 10}))
write("jwt", "aud_iss", jwt(HS256, {"sub": "carol", "exp": FAR, "aud": ["pystrands", "x"], "iss": "auth"}))
write("jwt", "wrong_secret", jwt(HS256, {"sub": "alice", "exp": FAR}, secret=b"other-secret"))
write("jwt", "alg_none", b64(b'{"alg":"none","typ":"JWT"}') + "." + b64(b'{"sub":"alice","exp":4102444800}') + ".")
write("jwt", "rs256_header", jwt({"alg": "RS256", "typ": "JWT"}, {"sub": "alice", "exp": FAR}))
# The target also signs an input as the claims of an HS256 token, and looks for a token in
# "<query>\n<Authorization value>".
write("jwt", "claims_full.json", json.dumps(FULL))
write("jwt", "claims_aud_iss.json", json.dumps({"exp": FAR, "nbf": 1, "aud": "pystrands", "iss": "auth",
                                               "sub": "u", "meta": {}}))
write("jwt", "claims_wrong_types.json", json.dumps({"exp": 1.5e9, "sub": 5, "meta": [1], "cid": ""}))
write("jwt", "request", "room=lobby&token=" + jwt(HS256, {"sub": "bob", "exp": FAR}) + "\nBearer  x.y.z ")
