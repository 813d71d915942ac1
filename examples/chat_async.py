"""Complete example of the AsyncPyStrandsClient API reference: token-checked chat rooms.

Clients must send the header ``X-Token: secret``; the room is the URL path (default "lobby").
Needs a broker with its backend port on 8081.
"""
import asyncio
import logging
from pystrands import AsyncPyStrandsClient

logging.basicConfig(level=logging.INFO)

class ChatServer(AsyncPyStrandsClient):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.users = {} # client_id -> username

    async def on_connection_request(self, request):
        token = request.headers.get("X-Token", [None])[0]
        if token != "secret":
            return False
        request.context.room_id = request.url.strip("/") or "lobby"
        request.context.metadata = {"token": token}
        return True

    async def on_new_connection(self, context):
        self.users[context.client_id] = f"User_{context.client_id[:8]}"
        await self.send_room_message(
            context.room_id,
            f"{self.users[context.client_id]} joined"
        )

    async def on_message(self, message, context):
        username = self.users.get(context.client_id, "Unknown")
        formatted = f"{username}: {message}"
        await self.send_room_message(context.room_id, formatted)

    async def on_disconnect(self, context):
        username = self.users.pop(context.client_id, "Unknown")
        await self.send_room_message(
            context.room_id,
            f"{username} left"
        )

async def main():
    client = ChatServer(
        host="localhost",
        port=8081,
        auto_reconnect=True
    )
    await client.run_forever()

if __name__ == "__main__":
    asyncio.run(main())
