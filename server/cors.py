"""Cross-origin reads of the subscriber API, and the browser client served to any page.

A page on another origin reads `/api/sse`, `/api/events`, `/api/me` and
`/api/overview` with `fetch()`, which the browser allows only when the answer
names its origin. The origins come from `DUALCAST_ALLOWED_ORIGINS`, the same list
the WebSocket `Origin` check reads, so one setting says which pages may use this
server. Credentials are never allowed across origins: such a request is stripped
of its cookie here and authenticates with its token (Bearer or `?token=`), so a
listed page can never act with a visitor's dashboard login.

Same-origin requests carry no `Origin` on GET and pass through untouched: the
only cost they pay is one scan of their headers. SSE and long-poll are served in
front of Starlette's middleware (see `DualcastApp`), so this is an ASGI wrapper
that adds headers to `http.response.start`, not a Starlette middleware.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from dualcast.headers import PAGE_HEADERS
from dualcast.protocol import ErrorCode

#: The endpoints a page on another origin may read.
CORS_PATHS = frozenset({"/api/sse", "/api/events", "/api/me", "/api/overview"})

#: How long a browser may reuse a preflight answer: one preflight per page, not per poll.
PREFLIGHT_MAX_AGE = 600
ALLOW_METHODS = b"GET, OPTIONS"
# Authorization: the token; Last-Event-ID: the SSE cursor (neither is CORS-safelisted).
ALLOW_HEADERS = b"authorization, last-event-id, accept, cache-control"


class Verdict(enum.Enum):
    SAME_ORIGIN = "same-origin"  # no Origin header, or this very host
    ALLOWED = "allowed"
    REFUSED = "refused"


def refusal(status: int, code: ErrorCode, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status,
                        headers={"Cache-Control": "no-store", "Vary": "Origin"})


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def origin_netloc(origin: str) -> str | None:
    """The `host[:port]` an Origin header names, lowercased; None when it names none.

    `null` has no netloc, and a value `urlsplit` refuses (`http://[::1` raises
    ValueError: "Invalid IPv6 URL") names none either: every Origin check (CORS,
    the WebSocket guard, CSRF) goes through here, so a malformed header is a
    refusal, never a 500 with a traceback in the log.
    """
    try:
        return urlsplit(origin.strip()).netloc.lower() or None
    except ValueError:
        return None


def judge(origin: bytes | None, host: bytes | None, allowed: Iterable[str]) -> Verdict:
    """Where a request comes from, as the WebSocket Origin check sees it.

    `allowed` holds origins as browsers serialise them (settings normalise each one
    once, `config.canonical_origin`), so the header is compared as sent."""
    if origin is None:
        return Verdict.SAME_ORIGIN
    text = origin.decode("latin-1")
    if host and origin_netloc(text) == host.decode("latin-1").lower():
        return Verdict.SAME_ORIGIN
    listed = set(allowed)
    return Verdict.ALLOWED if "*" in listed or text in listed else Verdict.REFUSED


def without_cookie(scope: Scope) -> Scope:
    """A copy of `scope` without its `Cookie` header: what a caller on another origin is
    authenticated by (its token), never by the visitor's dashboard login."""
    stripped = dict(scope)
    stripped["headers"] = [(k, v) for k, v in scope["headers"] if k != b"cookie"]
    return stripped


class Cors:
    """Serves one cross-origin request to a CORS path: refusal, preflight or the real thing."""

    def __init__(self, allowed: list[str]) -> None:
        self.allowed = list(allowed)

    def verdict(self, scope: Scope) -> Verdict:
        return judge(header(scope, b"origin"), header(scope, b"host"), self.allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send,
                       app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        origin = header(scope, b"origin") or b""
        if self.verdict(scope) is Verdict.REFUSED:
            answer = refusal(
                403, ErrorCode.BAD_ORIGIN, "this origin is not in DUALCAST_ALLOWED_ORIGINS"
            )
            await answer(scope, receive, send)
            return
        common = [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS":
            await send({"type": "http.response.start", "status": 204, "headers": [
                *common,
                (b"access-control-allow-methods", ALLOW_METHODS),
                (b"access-control-allow-headers", ALLOW_HEADERS),
                (b"access-control-max-age", str(PREFLIGHT_MAX_AGE).encode()),
            ]})
            await send({"type": "http.response.body", "body": b""})
            return
        # Cross-origin callers authenticate with their token, never the cookie. Without
        # its Origin the request then goes through the app as any token-only request.
        stripped = dict(scope)
        stripped["headers"] = [
            (k, v) for k, v in scope["headers"] if k != b"cookie" and k != b"origin"
        ]

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *common]}
            await send(message)

        await app(stripped, receive, send_with_cors)


#: The browser client, served to pages on any origin (module scripts are CORS requests).
CLIENT_FILES = {
    "/dualcast.js": ("dualcast.js", "text/javascript; charset=utf-8"),
    "/dualcast.d.ts": ("dualcast.d.ts", "application/typescript; charset=utf-8"),
}


def client_endpoint(folders: list[Path]) -> Callable[[Request], Awaitable[Response]]:
    """GET /dualcast.js and /dualcast.d.ts, from the first folder that has them."""

    async def endpoint(request: Request) -> Response:
        name, media_type = CLIENT_FILES[request.url.path]
        for folder in folders:
            path = folder / name
            if path.is_file():
                # (the dashboard's own module too: the same headers as its other files,
                # nosniff above all, as nginx serves it)
                return FileResponse(path, media_type=media_type, headers={
                    **PAGE_HEADERS, "Access-Control-Allow-Origin": "*",
                    "Cache-Control": "no-cache",
                })
        return refusal(404, ErrorCode.NO_DASHBOARD, f"{name} is not installed")

    return endpoint
