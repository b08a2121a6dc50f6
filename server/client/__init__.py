"""A Python subscriber for a dualcast server, with the browser client's fallback.

    from dualcast.client import Reset, subscribe

    async with subscribe("https://push.example.com", token=get_token, rooms=["ops"],
                         last_event_id=saved) as events:
        async for item in events:
            if isinstance(item, Reset):
                reload_state()        # events before item.last_id may be missing
                continue
            handle(item.id, item.event, item.data, item.ts)
            saved = item.id           # or events.last_event_id

Each id arrives once, in order, whatever the transport (WebSocket, else SSE,
else long-polling, climbing back when it can) and across reconnects. A cursor
that is gone arrives as a `Reset` item (an in-band marker, not an exception, so
the subscription carries on from the head). A room the token may not join is
reported once to `on_error` (a `ServerError`, code `forbidden_room`, on every
transport) and left out of every later connection, while the other rooms keep
flowing. The iteration raises `Refused` when none of the rooms asked for may be
joined, when the server refuses the request itself (a bad cursor, too many rooms),
and when nothing at the URL's path is a dualcast server (404s, or a web page on
every path: code `not_found`); it raises `AuthFailed` when the token is not good
and cannot be refreshed. `token` may be a string or a callable (sync or async)
returning one: it is called at the start, shortly before each token's `exp` (at
most once a second), and after the server says `token_expired`; a fresh token
refused as well ends the iteration with `AuthFailed`, as does a source that fails
there (a source that has not answered within `Timing.token`, 10 s, failed; a plain
function runs in a thread of its own, so one that blocks holds up neither the event loop
nor the subscription past that).

This package imports neither starlette nor the server's modules: it needs only
httpx and websockets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

# The vocabulary is re-exported whole, as asyncio's package re-exports its modules:
# one list of public names (model.__all__), not a second copy of it here.
from dualcast.client import model
from dualcast.client.connections import TlsOption, trust
from dualcast.client.model import *  # noqa: F403
from dualcast.client.model import TRANSPORTS, ServerError, Status, Transport, id_key
from dualcast.client.subscription import Subscription, Timing
from dualcast.client.tokens import Tokens, TokenSource

__all__ = [*model.__all__, "Subscription", "Timing", "TlsOption", "TokenSource", "bases",
           "subscribe"]


def bases(url: str) -> tuple[str, str]:
    """The HTTP and WebSocket bases of a server URL (`http(s)://` or `ws(s)://`, with an
    optional path prefix when dualcast is mounted below one)."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    http = {"http": "http", "https": "https", "ws": "http", "wss": "https"}.get(scheme)
    if http is None or not parts.netloc:
        raise ValueError(f"not a dualcast server URL: {url!r} (use http://host:port)")
    if parts.query or parts.fragment:
        # Dropped quietly, the dashboard's `/?token=…` link would subscribe anonymously.
        raise ValueError("a dualcast server URL has no query or fragment: give the token "
                         "with token= (dualcast tail: --token or DUALCAST_TOKEN), not in the "
                         f"URL {urlunsplit((parts.scheme, parts.netloc, parts.path, '', ''))}")
    ws = "wss" if http == "https" else "ws"
    path = parts.path.rstrip("/")
    return (urlunsplit((http, parts.netloc, path, "", "")),
            urlunsplit((ws, parts.netloc, path, "", "")))


def room_list(rooms: Iterable[str]) -> tuple[str, ...]:
    """The rooms asked for, in order. A single string is refused rather than read as a
    list of one-letter rooms (`rooms="ops"` would ask for o, p and s)."""
    if isinstance(rooms, (str, bytes)):
        raise ValueError("rooms must be a list of room names, not a single string")
    names = tuple(dict.fromkeys(rooms))
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"rooms must be room names (strings), not {repr(name)[:60]}")
        if not name.strip() or "," in name:
            # `rooms=[""]` went out as no rooms at all, which means every room the token
            # allows; a comma would split one name into two
            raise ValueError(f"rooms: {name!r} is no room name")
    return names


def transport_order(transports: Iterable[Transport | str]) -> tuple[Transport, ...]:
    """The transports to use, best first, each once."""
    if isinstance(transports, (str, bytes)):
        raise ValueError("transports must be a list of transport names "
                         "(websocket, sse, polling), not a single string")
    names = ", ".join(TRANSPORTS)
    order: dict[Transport, None] = {}
    for name in transports:
        try:
            order[Transport(name)] = None
        except ValueError:
            raise ValueError(f"unknown transport {name!r}: name {names}") from None
    if not order:
        raise ValueError(f"transports: name at least one of {names}")
    return tuple(order)


@asynccontextmanager
async def subscribe(
    url: str,
    *,
    token: TokenSource = None,
    rooms: Iterable[str] = (),
    last_event_id: str | None = None,
    transports: Iterable[Transport | str] = TRANSPORTS,
    timing: Timing | None = None,
    on_status: Callable[[Status], None] | None = None,
    on_error: Callable[[ServerError], None] | None = None,
    buffer: int = 1000,
    tls: TlsOption = None,
) -> AsyncIterator[Subscription]:
    """Subscribe until the `async with` block ends (the connections close with it).

    `rooms` (a list) empty = the rooms the token allows; a room the token may not
    join is reported to `on_error` and dropped; `last_event_id` None = live from now,
    `"0"` = from the oldest retained event; `transports` = which to use, best first.
    `on_status` hears every transport or state change; `on_error` hears the server's
    non-fatal errors (by default they are logged). At most `buffer` (>= 1) events wait for
    the caller; past that the client stops reading and the server may cut it off,
    which costs nothing: it resumes from its cursor. `tls`: what every transport
    trusts for https/wss, an `ssl.SSLContext` or the path of a CA bundle (PEM) to
    trust instead of the defaults, the system's CAs and certifi's (see `trust`).
    """
    http_base, ws_base = bases(url)
    if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
        # asyncio.Queue(0) has no bound at all: buffer=0 held every event unread
        raise ValueError(f"buffer must be a whole number of events >= 1, not {buffer!r}")
    if last_event_id and id_key(last_event_id) is None:
        raise ValueError(f"last_event_id must be a stream id like 1732550000000-0, "
                         f"not {last_event_id[:40]!r}")
    order = transport_order(transports)
    timing = timing or Timing()
    subscription = Subscription(
        http_base, ws_base, tokens=Tokens(token, timing.token), rooms=room_list(rooms),
        last_event_id=last_event_id or None, transports=order, timing=timing,
        on_status=on_status, on_error=on_error, buffer=buffer, tls=trust(tls),
    )
    await subscription.start()
    try:
        yield subscription
    finally:
        await subscription.close()
