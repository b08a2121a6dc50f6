"""Cross-site request checks for the writes a browser's cookie can authorise.

SameSite=Strict does not stop a page on another port of the same host, or on a
sibling subdomain: those are the same *site*, so the browser sends the cookie
with their form posts and `no-cors` fetches. What such a page cannot forge is
the `Origin` and `Sec-Fetch-Site` headers the browser adds, so a state change
made with the cookie must come from this very origin when the browser says
where it comes from. Requests that carry their own credential (Bearer header,
`?token=`) are producers and cross-origin clients, not cookie requests: a page
cannot make a browser attach someone else's Bearer token.
"""

from __future__ import annotations

from enum import StrEnum

from starlette.requests import HTTPConnection

from dualcast.cors import origin_netloc
from dualcast.query import query_of


class FetchSite(StrEnum):
    """The values of `Sec-Fetch-Site`, as browsers send them."""

    SAME_ORIGIN = "same-origin"
    SAME_SITE = "same-site"
    CROSS_SITE = "cross-site"
    NONE = "none"  # the person started it: address bar, bookmark, another app


def fetch_site(conn: HTTPConnection) -> FetchSite | None:
    """What the browser says about where the request comes from; None when it says nothing.

    An unknown value is read as cross-site: a header we cannot read is not a pass.
    """
    raw = conn.headers.get("sec-fetch-site")
    if raw is None:
        return None
    try:
        return FetchSite(raw.strip().lower())
    except ValueError:
        return FetchSite.CROSS_SITE


def uses_cookie(conn: HTTPConnection) -> bool:
    """True unless the request brings its own token (Bearer header or `?token=`)."""
    header = conn.headers.get("authorization", "")
    if header.strip().lower().startswith("bearer"):
        return False
    return not query_of(conn).get("token")


def same_origin(conn: HTTPConnection) -> bool:
    """Whether the browser vouches that this request comes from a page of this origin.

    `Sec-Fetch-Site` wins when present (the browser's own verdict, right even
    behind a proxy that rewrites Host); else `Origin` must name this host (with
    its port). A request with neither (curl, a script, an old browser) is let
    through: it is not a page riding on someone's cookie.
    """
    site = fetch_site(conn)
    if site is not None:
        return site is FetchSite.SAME_ORIGIN
    origin = conn.headers.get("origin")
    if origin is None:
        return True
    host = conn.headers.get("host", "")
    # "null" (sandboxed frames, some redirects) has no netloc and never matches.
    return bool(host) and origin_netloc(origin) == host.lower()


def cross_site_cookie_write(conn: HTTPConnection) -> bool:
    """A state change riding on the cookie from a page of another origin: refuse it."""
    return uses_cookie(conn) and not same_origin(conn)
