"""PondSocket peer for benches/rooms.py: PondSocket (PyPI `pondsocket` + `pondsocket-asgi`) on
uvicorn (uvloop, httptools, websockets), doing what our backend does with rooms.

PondSocket's own model is client-driven: a client sends `JOIN_CHANNEL` and the channel's join
handler accepts it. Our broker's rooms are driven by the backend (`join_room(client_id, room)`),
so this server gives the benchmark's driver the same server-side operations, as events on a
control channel `ctl` that the driver's own connection joins (PondSocket's JSON protocol:
`{"action":"BROADCAST","channelName":"ctl","event":…,"requestId":…,"payload":{…}}`); each is
answered with a `SYSTEM` event carrying the same requestId (`EventContext.reply`):

    join     {"c": user id, "ch": room}  Lobby.get_or_create_channel("r/" + room) + Channel.add_user(transport)
    leave    {"c": user id, "ch": room}  Channel.remove_user(user id)
    members  {"ch": room}                Channel.get_assigns(): every member, local and (in a cluster) remote
    count    {"ch": room}                the same, counted
    publish  {"ch": room, "d": {…}}      Channel.broadcast("m", d)

Members are the channel's users (its assigns store, which PondSocket replicates to every node
of a cluster); presence tracking (`track`) is not used: it pushes the whole presence list to
every member at each join. A connection's user id (PondSocket's connection id) is sent to it
in the `CONNECT` event on connection. With `--redis URL` the nodes share channels through
PondSocket's RedisPubSub (cluster); without, one node in memory.

Usage: python pondsocket_server.py --port P [--redis redis://127.0.0.1:6379/0 --node-id X]
"""

from __future__ import annotations

import argparse

import uvicorn
from pondsocket import ConnectionContext, EventContext, JoinContext, Options, PondSocket
from pondsocket_asgi import PondASGIApp


def build(redis_url: str | None, node_id: str) -> PondASGIApp:
    pubsub = None
    if redis_url:
        import redis.asyncio as aioredis
        from pondsocket.distributed.redis_pubsub import RedisPubSub

        pubsub = RedisPubSub(aioredis.Redis.from_url(redis_url), owns_client=True)
    pond = PondSocket(options=Options(node_id=node_id), pubsub=pubsub)

    async def on_connect(ctx: ConnectionContext) -> None:
        ctx.accept()

    endpoint = pond.create_endpoint("/socket", on_connect)

    async def accept_join(ctx: JoinContext) -> None:
        await ctx.accept()

    rooms = endpoint.create_channel("r/:room", accept_join)
    ctl = endpoint.create_channel("ctl", accept_join)

    async def join(ctx: EventContext) -> None:
        p = ctx.get_payload()
        transport = await endpoint.get_transport(p["c"])
        if transport is None:
            await ctx.reply("error", {"error": f"unknown user {p['c']}"})
            return
        channel = await rooms.get_or_create_channel("r/" + p["ch"])
        if not await channel.has_user(p["c"]):
            await channel.add_user(transport)
        await ctx.reply("ok", {})

    async def leave(ctx: EventContext) -> None:
        p = ctx.get_payload()
        channel = await rooms.get_channel("r/" + p["ch"])
        if channel is not None:
            await channel.remove_user(p["c"])
        await ctx.reply("ok", {})

    async def members(ctx: EventContext) -> None:
        channel = await rooms.get_channel("r/" + ctx.get_payload()["ch"])
        ids = list((await channel.get_assigns()).keys()) if channel is not None else []
        await ctx.reply("ok", {"members": ids})

    async def count(ctx: EventContext) -> None:
        channel = await rooms.get_channel("r/" + ctx.get_payload()["ch"])
        n = len(await channel.get_assigns()) if channel is not None else 0
        await ctx.reply("ok", {"count": n})

    async def publish(ctx: EventContext) -> None:
        p = ctx.get_payload()
        channel = await rooms.get_or_create_channel("r/" + p["ch"])
        await channel.broadcast("m", p["d"])
        await ctx.reply("ok", {})

    for name, handler in [("join", join), ("leave", leave), ("members", members), ("count", count), ("publish", publish)]:
        ctl.on_message(name, handler)
    return PondASGIApp(pond)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--redis", default="", help="Redis URL: run as one node of a cluster")
    ap.add_argument("--node-id", default="pond-0")
    args = ap.parse_args()
    app = build(args.redis or None, args.node_id)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="error", loop="uvloop", http="httptools", ws="websockets",
                backlog=4096)


if __name__ == "__main__":
    main()
