"""Complete example of the PyStrandsClient API reference: token-checked chat rooms.

Clients must send the header ``X-Token: secret``; the room is the URL path (default "lobby").
Needs a broker with its backend port on 8081.
"""
import logging
from pystrands import PyStrandsClient

logging.basicConfig(level=logging.INFO)

class ChatServer(PyStrandsClient):
    def on_connection_request(self, request):
        # Simple auth check
        token = request.headers.get("X-Token", [None])[0]
        if token != "secret":
            return False

        # Set room from URL
        request.context.room_id = request.url.strip("/") or "lobby"
        request.context.metadata = {"token": token}
        return True

    def on_new_connection(self, context):
        self.send_room_message(
            context.room_id,
            f"User {context.client_id} joined"
        )

    def on_message(self, message, context):
        formatted = f"{context.client_id}: {message}"
        self.send_room_message(context.room_id, formatted)

    def on_disconnect(self, context):
        self.send_room_message(
            context.room_id,
            f"User {context.client_id} left"
        )

if __name__ == "__main__":
    client = ChatServer(
        host="localhost",
        port=8081,
        auto_reconnect=True
    )
    client.run_forever()
