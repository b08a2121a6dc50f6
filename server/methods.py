"""405 with `Allow` for a known path asked with the wrong method.

Starlette's router answers 405 itself, but only when no other route matches
the path fully; the dashboard's static files are mounted at `/` and match
every path, so `GET /api/publish` used to be a 404 from the static folder.
This guard sits in front of that mount and answers for the routes' own paths.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send


class WrongMethods:
    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.allowed: dict[str, str] = {
            route.path: ", ".join(sorted(route.methods))
            for route in routes if isinstance(route, Route) and route.methods
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            allow = self.allowed.get(scope["path"])
            if allow is not None and scope["method"] not in allow.split(", "):
                raise HTTPException(405, headers={"Allow": allow})  # answered by the app
        await self.app(scope, receive, send)
