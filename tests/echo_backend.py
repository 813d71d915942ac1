"""A backend process for fault tests: accepts every client (client id and room from the path)
and echoes each message privately as "<pid> <message>". Run: python echo_backend.py TCP_PORT."""

from __future__ import annotations

import asyncio
import os
import sys

from pystrands import AsyncPyStrandsClient

PID = str(os.getpid())


class Echo(AsyncPyStrandsClient):
    async def on_connection_request(self, request):
        name = request.url.strip("/") or "anon"
        request.context.client_id = name
        request.context.room_id = name
        return True

    async def on_message(self, message, context):
        await self.send_private_message(context.client_id, f"{PID} {message}")


if __name__ == "__main__":
    port = int(sys.argv[1])
    asyncio.run(Echo(host="127.0.0.1", port=port, reconnect_delay=0.05, max_reconnect_delay=0.2).run_forever())
