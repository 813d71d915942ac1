"""Quick start (async), from the PyStrands overview: echo every message to its room.

Needs a broker with its backend port on 8081.
"""
import asyncio
from pystrands import AsyncPyStrandsClient

class ChatBackend(AsyncPyStrandsClient):
    async def on_connection_request(self, request):
        request.context.room_id = request.url.strip("/")
        return True

    async def on_message(self, message, context):
        await self.send_room_message(context.room_id, f"echo: {message}")

client = ChatBackend(host="localhost", port=8081)
asyncio.run(client.run_forever())
