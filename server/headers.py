"""Security headers of the dashboard's pages and files.

The dashboard runs no inline script or style and talks only to its own origin,
so the policy can be strict: a script injected into the page (if an event ever
slipped past `textContent`) would not run, and no other page may frame the
signed-in dashboard to trick clicks out of it. nginx serves the same files
itself in production: nginx/templates/dualcast.conf.tmpl repeats these values,
and a test keeps the two equal.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: `connect-src 'self'` covers the WebSocket too (CSP 3 matches ws:/wss: of the
#: page's own host); `img-src data:` is the empty favicon of index.html.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)

PAGE_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    # frame-ancestors for browsers that predate it
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # a login link's ?token= must never travel on in a Referer
    "Referrer-Policy": "no-referrer",
}


class WithPageHeaders:
    """Wraps an ASGI app (the static files) so each of its answers carries PAGE_HEADERS."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in PAGE_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
