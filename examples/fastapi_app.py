"""FastAPI integration of the AsyncPyStrandsClient API reference.

Run with e.g. ``uvicorn examples.fastapi_app:app``; the backend connects to the broker's
backend port 8081 at startup and disconnects at shutdown.
"""
from fastapi import FastAPI
from pystrands import AsyncPyStrandsClient
import asyncio

app = FastAPI()

class FastAPIBackend(AsyncPyStrandsClient):
    async def on_message(self, message, context):
        await self.send_room_message(context.room_id, f"echo: {message}")

backend = FastAPIBackend()

@app.on_event("startup")
async def startup():
    asyncio.create_task(backend.run_forever())

@app.on_event("shutdown")
async def shutdown():
    await backend.disconnect()

@app.get("/")
async def root():
    return {"status": "running", "connected": backend.connected}
