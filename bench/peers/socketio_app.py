"""python-socketio peer: `AsyncServer` + `AsyncRedisManager`, served by uvicorn as ASGI.

Publishers reach it the way python-socketio documents for external processes:
`AsyncRedisManager(url, write_only=True).emit("bench", data)`. Every client is in
the default namespace, so an emit with no room goes to all of them.
"""

from __future__ import annotations

import os

import socketio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def healthz(_: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def create_app(redis_url: str) -> socketio.ASGIApp:
    manager = socketio.AsyncRedisManager(redis_url)
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager, cors_allowed_origins="*")
    other = Starlette(routes=[Route("/healthz", healthz)])
    return socketio.ASGIApp(sio, other_asgi_app=other)


app = create_app(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
