"""A stand-in for the Python app threadchat ports, for interoperability checks.

It behaves like the tutorial's FastAPI + redis.asyncio server: one room on
Redis channel `global_room`, clients at /chat/{nickname}; what a client sends
is PUBLISHed as-is; a reader json-decodes each payload and forwards the raw
text unless its "nickname" equals the connection's own.

Run: python original_app.py --port 8001 --redis 127.0.0.1:6379
Needs: pip install fastapi "uvicorn[standard]" redis

The tutorial's app takes a host. This stand-in also takes a URL
(--redis-url), so that the same check runs against a Redis that speaks only
TLS: rediss://127.0.0.1:6380?ssl_ca_certs=/path/ca.pem (redis-py reads the
CA from the query).
"""

import argparse
import asyncio
import json

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

ROOM = "global_room"
app = FastAPI()


async def forward_room(pubsub, websocket: WebSocket, nickname: str) -> None:
    while True:
        item = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if item is None:
            continue
        text = item["data"].decode()
        data = json.loads(text)
        if data["nickname"] != nickname:
            await websocket.send_text(text)


async def publish_client(client, websocket: WebSocket) -> None:
    while True:
        await client.publish(ROOM, await websocket.receive_text())


@app.websocket("/chat/{nickname}")
async def chat(websocket: WebSocket, nickname: str) -> None:
    client = aioredis.from_url(app.state.redis_url or f"redis://{app.state.redis}")
    await websocket.accept()
    try:
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(ROOM)
            await asyncio.gather(
                forward_room(pubsub, websocket, nickname),
                publish_client(client, websocket),
            )
    except WebSocketDisconnect:
        pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--redis", default="localhost")
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()
    app.state.redis = args.redis
    app.state.redis_url = args.redis_url
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
