"""`create_app(settings)`: routes, the dashboard, and a lifespan that owns every task."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from dualcast import api
from dualcast.admission import error_response
from dualcast.collector import FreezeAfterFullCollections
from dualcast.config import Settings
from dualcast.cors import (
    CLIENT_FILES,
    CORS_PATHS,
    Cors,
    Verdict,
    client_endpoint,
    header,
    judge,
    without_cookie,
)
from dualcast.headers import PAGE_HEADERS, WithPageHeaders
from dualcast.methods import WrongMethods
from dualcast.metrics import Metrics
from dualcast.protocol import ErrorCode
from dualcast.runtime import Runtime
from dualcast.transports.poll import poll_endpoint
from dualcast.transports.poll_conn import take_over
from dualcast.transports.sse import sse_endpoint
from dualcast.transports.ws import websocket_endpoint

log = logging.getLogger("dualcast")

BUNDLED_STATIC = Path(__file__).resolve().parent.parent / "static"


def static_dir(settings: Settings) -> Path:
    return Path(settings.static_dir) if settings.static_dir else BUNDLED_STATIC


HttpEndpoint = Callable[[Request], Awaitable[ASGIApp]]


class DualcastApp(Starlette):
    """Starlette, with the subscriber endpoints (and the overview) served in front of its
    middleware.

    An endless stream keeps every ASGI frame it was called through alive for the
    connection's life: Starlette's error and exception middleware, the router and
    the route wrappers hold about 5 KB per idle subscriber (tracemalloc, issue 8),
    and every long-poll pays for them again. These endpoints handle their own
    errors, so they are dispatched here directly; everything else (and any method
    but GET, for the 405) goes through the full stack.
    """

    def __init__(self, *args: Any, http_fast: dict[str, HttpEndpoint],
                 ws_fast: dict[str, Callable[[WebSocket, Send], Awaitable[None]]],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http_fast = http_fast
        self._ws_fast = ws_fast

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" and scope["path"] in CORS_PATHS and header(scope, b"origin"):
            # A page on another origin (server/cors.py): refused, preflight answered, or
            # served back through here without Origin and cookie, with CORS headers.
            cors = Cors(self.state.dualcast.settings.allowed_origins)
            if cors.verdict(scope) is not Verdict.SAME_ORIGIN:
                await cors(scope, receive, send, self)
                return
        if kind == "http" and scope["method"] == "GET":
            endpoint = self._http_fast.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self
                response = await endpoint(Request(scope, receive))
                await response(scope, receive, send)
                if endpoint is poll_endpoint:
                    # The poller's next requests on this connection skip uvicorn's
                    # request path (server/transports/poll_conn.py).
                    take_over(scope, send, poll_endpoint)
                return
        elif kind == "websocket":
            ws_endpoint = self._ws_fast.get(scope["path"])
            if ws_endpoint is not None:
                scope["app"] = self
                if header(scope, b"cookie") and judge(
                    header(scope, b"origin"), header(scope, b"host"),
                    self.state.dualcast.settings.allowed_origins,
                ) is Verdict.ALLOWED and header(scope, b"sec-fetch-site") != b"same-origin":
                    # A listed page on another origin (a sibling subdomain: the same
                    # site, so SameSite=Strict sends the cookie along) connects on its
                    # token, as over CORS: never with the visitor's dashboard login,
                    # nor with the cookie the auth hook would be asked about. (The
                    # browser's own same-origin verdict keeps it: the dashboard behind
                    # a proxy that rewrites Host, its origin listed to let it in.)
                    scope = without_cookie(scope)
                await ws_endpoint(WebSocket(scope, receive, send), send)
                return
        await super().__call__(scope, receive, send)


_HTTP_ERRORS = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such path or file, a method a route does not take)
    as the JSON errors every other refusal is, with `nosniff`: its plain-text answers
    carried none of the page headers, since the static files raise past their wrapper."""
    assert isinstance(exc, HTTPException)
    response = error_response(exc.status_code, _HTTP_ERRORS[exc.status_code], exc.detail)
    response.headers.update({**(exc.headers or {}), "X-Content-Type-Options": "nosniff"})
    return response


def create_app(settings: Settings, secret: str | None = None) -> Starlette:
    """Build one dualcast app. `secret` overrides settings.secret (the CLI's process secret)."""
    runtime = Runtime(settings, secret if secret is not None else settings.secret)
    folder = static_dir(settings)

    async def index(request: Request) -> Response:
        redirect = await api.login_redirect(request)
        if redirect is not None:
            return redirect
        page = folder / "index.html"
        if not page.is_file():
            return error_response(404, "no_dashboard", f"no dashboard at {folder}")
        return FileResponse(page, headers={"Cache-Control": "no-cache", **PAGE_HEADERS})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start()
        # Full collections skip what the last one kept (server/collector.py): a
        # pass over 10,000 connections stopped every stream for 0.8 s.
        collector = FreezeAfterFullCollections(settings.gc_refresh) if settings.gc_refresh else None
        if collector is not None:
            collector.install()
        try:
            yield
        finally:
            if collector is not None:
                collector.uninstall()
            await runtime.stop()

    routes = [
        Route("/", index, methods=["GET", "HEAD"]),
        *(Route(path, client_endpoint([folder, BUNDLED_STATIC]), methods=["GET", "HEAD"])
          for path in CLIENT_FILES),
        WebSocketRoute("/api/ws", websocket_endpoint),
        Route("/api/sse", sse_endpoint),
        Route("/api/events", poll_endpoint),
        Route("/api/overview", api.overview),
        Route("/api/me", api.me),
        Route("/api/publish", api.publish, methods=["POST"]),
        Route("/api/logout", api.logout, methods=["POST"]),
        Route("/healthz", api.healthz),
        Route("/readyz", api.readyz),
        Route("/metrics", api.metrics),
    ]
    if folder.is_dir():
        static = WithPageHeaders(StaticFiles(directory=folder, html=True))
        routes.append(Mount("/", WrongMethods(static, routes), name="static"))
    app = DualcastApp(
        routes=routes, lifespan=lifespan,
        exception_handlers=dict.fromkeys(_HTTP_ERRORS, _http_error),
        # (the overview too: anyone may call it often; the full stack cost 139 us a
        # call in-process, this 60 us, the fold's part of either a few us)
        http_fast={"/api/sse": sse_endpoint, "/api/events": poll_endpoint,
                   "/api/overview": api.overview},
        ws_fast={"/api/ws": websocket_endpoint},
    )
    app.state.dualcast = runtime
    app.state.metrics = Metrics(runtime)
    return app
