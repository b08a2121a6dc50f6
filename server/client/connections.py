"""One attempt on one transport: a task that reads the server and reports signals.

Each connection reports to the subscription's inbox as `(connection, signal)`, so
the subscription can ignore what an old or replaced connection still says. A
connection ends by reporting `Ended` with what kind of failure it was: low-level
errors (sockets, httpx, websockets) are translated here, once.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import logging
import os
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import certifi
import httpx
import websockets
from websockets.asyncio.client import ClientConnection, connect

from dualcast.client.model import AUTH_CODES, Event, Reset, Transport
from dualcast.client.sse import Lines, Message, SSEParser

log = logging.getLogger("dualcast.client")

#: The shortest time from one poll to the next when a poll asked to wait came back
#: empty (a server whose longest wait is shorter, or none).
SHORT_POLL = 1.0

#: Where each transport lives below the server's base URL.
PATHS: Mapping[Transport, str] = {
    Transport.WEBSOCKET: "/api/ws", Transport.SSE: "/api/sse", Transport.POLLING: "/api/events",
}

#: Refusals that name one room of the request (the server names the first it refuses);
#: the other rooms would be granted.
ROOM_CODES = frozenset({"forbidden_room", "bad_room"})


class Failure(enum.StrEnum):
    """Why a connection ended, which decides what the subscription does next."""

    TRANSPORT = "transport"      # this transport does not work (here, now): fall back
    UNREACHABLE = "unreachable"  # nobody answers at all: retry, another transport won't help
    AUTH = "auth"                # the token is no longer good: refresh it or give up
    FATAL = "fatal"              # the request itself is refused (a room, the cursor): give up


# What a connection tells its subscription: small immutable records.

class Welcome(NamedTuple):
    rooms: list[str]
    last_id: str | None


class Batch(NamedTuple):
    events: list[Event]
    #: A poll answer's cursor: where to continue even when no event was visible.
    last_id: str | None = None


class ErrorFrame(NamedTuple):
    code: str
    message: str


class Ended(NamedTuple):
    failure: Failure
    detail: str
    status: int | None = None
    code: str = ""
    message: str = ""


Signal = Welcome | Batch | Reset | ErrorFrame | Ended


@dataclass(frozen=True)
class Target:
    """Where and as whom to subscribe; `token` is read at each request."""

    http_base: str
    ws_base: str
    rooms: tuple[str, ...]
    token: Callable[[], str | None]
    poll_timeout: float
    idle_timeout: float
    http: httpx.AsyncClient = field(repr=False)
    #: What wss:// trusts: the very context the HTTP client verifies with (see `trust`).
    tls: ssl.SSLContext | None = field(default=None, repr=False)

    def headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        # A header, not `?token=`: proxies log URLs, not Authorization headers.
        headers = dict(extra or {})
        token = self.token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def query(self, **params: str | float | None) -> str:
        if self.rooms:
            params["rooms"] = ",".join(self.rooms)
        pairs = {k: str(v) for k, v in params.items() if v is not None and v != ""}
        return "?" + urlencode(pairs) if pairs else ""


class _Ends(Exception):
    """Raised inside a runner to end the connection with a given outcome."""

    def __init__(self, ended: Ended) -> None:
        super().__init__(ended.detail)
        self.ended = ended


def classify(status: int, body: Mapping[str, Any]) -> Failure:
    """What an HTTP refusal means for the subscription."""
    code = str(body.get("error") or body.get("code") or "")
    if status == 401 or code in AUTH_CODES:
        return Failure.AUTH
    text = f"{code} {body.get('message', '')}".lower()
    if status in (400, 403) and any(
        word in text for word in ("room", "cursor", "last_event_id", "after", "bad_request")
    ):
        return Failure.FATAL
    if status in (502, 503, 504):
        return Failure.UNREACHABLE  # restarting or draining: the same transport will be back
    return Failure.TRANSPORT


def no_endpoint(transport: Transport, ended: Ended) -> bool:
    """Whether a refusal says there is no dualcast endpoint at this path: a 404 (a
    dualcast server never answers its own paths so: a transport it turned off is a
    403 `transport_disabled`), a success that is not the transport's protocol (a web
    site's HTML page for every path), or a WebSocket upgrade refused without a
    dualcast error (how an ASGI app answers an upgrade on a path it has no route for)."""
    if ended.status is not None and (ended.status == 404 or 200 <= ended.status < 300):
        return True
    return transport is Transport.WEBSOCKET and ended.status == 403 and not ended.code


def refused_room(ended: Ended, rooms: tuple[str, ...]) -> str | None:
    """The room of `rooms` a refusal names (`not allowed in room 'admin'`), if it
    refuses one room rather than the request."""
    if ended.code not in ROOM_CODES:
        return None
    return next((room for room in rooms if repr(room[:80]) in ended.message), None)


def _refusal(status: int, raw: bytes | bytearray) -> _Ends:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    code = str(body.get("error") or body.get("code") or "")
    return _Ends(Ended(classify(status, body), f"HTTP {status}", status, code,
                       str(body.get("message", ""))))


def _not_protocol(response: httpx.Response, what: str) -> _Ends:
    """A success that is not what a dualcast server answers there (a web page)."""
    kind = response.headers.get("content-type", "").split(";")[0] or "no content type"
    return _Ends(Ended(Failure.TRANSPORT, f"HTTP {response.status_code} {kind}, {what}",
                       response.status_code))


def _event(item: Mapping[str, Any]) -> Event | None:
    event_id, name = item.get("id"), item.get("event")
    if not isinstance(event_id, str) or not isinstance(name, str):
        return None
    ts = item.get("ts")
    return Event(event_id, name, item.get("data"),
                 ts if isinstance(ts, int) and not isinstance(ts, bool) else None)


#: What `subscribe(tls=...)` takes: a context used as is, or a CA bundle (PEM) to trust.
TlsOption = ssl.SSLContext | str | os.PathLike[str] | None


def trust(option: TlsOption = None) -> ssl.SSLContext:
    """The one TLS context every transport of a subscription verifies the server with.

    websockets verified with the system's CAs and httpx with certifi's, so a server
    certificate one trusts and the other does not made a WebSocket fail where SSE
    worked (or the other way round). By default both trust the system's CAs (which
    honour SSL_CERT_FILE and SSL_CERT_DIR) and certifi's; a path trusts that bundle
    only, as curl's --cacert; a context is used as it is (client certificates,
    pinning). A bundle that cannot be read raises ValueError."""
    if isinstance(option, ssl.SSLContext):
        return option
    if option is not None:
        path = os.fspath(option)
        try:
            return ssl.create_default_context(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise ValueError(f"cannot use {path!r} as a CA bundle (PEM): {reason}") from None
    return _default_trust()


@functools.cache
def _default_trust() -> ssl.SSLContext:
    """The default context, made once per process: loading both CA sets takes 50-100 ms
    of CPU (measured on a loaded 2-core machine), on the event loop, at each `subscribe`
    otherwise. A context is safe to share; one changed by its user is not this one."""
    context = ssl.create_default_context()
    context.load_verify_locations(certifi.where())
    return context


def certificate_refused(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate check that failed under `exc` (httpx wraps it twice), if any."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _unreachable(exc: BaseException) -> bool:
    """Nobody listens (refused, no such host): every transport would fail alike."""
    return isinstance(exc, (ConnectionRefusedError, socket.gaierror, httpx.ConnectError))


def _https_upgrade(old: str, new: str) -> bool:
    """Whether `new` is `old`'s host moved from ws:// to wss:// on the default ports (nginx's
    `return 301 https://$host$request_uri`): the same server, as httpx judges it, which
    keeps the token on such a redirect."""
    before, after = urlsplit(old), urlsplit(new)
    return (before.scheme == "ws" and after.scheme == "wss"
            and before.hostname == after.hostname
            and before.port in (None, 80) and after.port in (None, 443))


class _Connect(connect):
    """websockets' `connect`, following redirects as the HTTP transports (httpx) do.

    A dualcast server behind a front that redirects (http:// to https://, a moved path)
    answers the upgrade with an http(s) `Location`, which websockets refused as no
    WebSocket URI, so the client fell back to SSE for ever. Such a Location is read
    as its ws(s) twin; the token is kept on the same origin and on an upgrade to TLS
    of the same host, and dropped elsewhere (websockets drops it on any change of
    scheme, host or port); at most websockets' MAX_REDIRECTS (10) are followed. The
    TLS context is the subscription's for every wss:// hop."""

    def __init__(self, uri: str, *, tls: ssl.SSLContext | None, **kwargs: Any) -> None:
        super().__init__(uri, **kwargs)
        self._tls = tls

    def process_redirect(self, exc: Exception) -> Exception | str:
        if isinstance(exc, websockets.InvalidStatus) and "Location" in exc.response.headers:
            location = urljoin(self.uri, exc.response.headers["Location"])
            parts = urlsplit(location)
            scheme = {"http": "ws", "https": "wss"}.get(parts.scheme.lower())
            if scheme is not None:
                del exc.response.headers["Location"]
                exc.response.headers["Location"] = urlunsplit(parts._replace(scheme=scheme))
        old, headers = self.uri, self.additional_headers
        outcome = super().process_redirect(exc)
        if isinstance(outcome, str) and _https_upgrade(old, outcome):
            self.additional_headers = headers
        return outcome

    async def open_tcp_connection(self) -> ClientConnection:
        if self.ws_uri.secure:
            self.create_connection_kwargs["ssl"] = self._tls or True
        else:
            self.create_connection_kwargs.pop("ssl", None)
        return await super().open_tcp_connection()


class Connection:
    def __init__(self, transport: Transport, target: Target, cursor: str | None,
                 inbox: asyncio.Queue[tuple[Connection, Signal]]) -> None:
        self.transport = transport
        self.target = target
        self.cursor = cursor
        self.inbox = inbox
        self.welcomed = False
        self._ws: ClientConnection | None = None
        self.task = asyncio.create_task(self._run(), name=f"dualcast-client-{transport}")

    def __repr__(self) -> str:
        return f"<Connection {self.transport} welcomed={self.welcomed}>"

    async def _emit(self, signal: Signal) -> None:
        if isinstance(signal, Welcome):
            self.welcomed = True
        await self.inbox.put((self, signal))

    async def _run(self) -> None:
        runner = {
            Transport.WEBSOCKET: self._websocket,
            Transport.SSE: self._sse,
            Transport.POLLING: self._poll,
        }[self.transport]
        try:
            await runner()
            ended = Ended(Failure.TRANSPORT, "the server ended the stream")
        except _Ends as ends:
            ended = ends.ended
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            ended = _refusal(status, exc.response.body or b"").ended
            if 200 <= status < 300:  # a web page where the upgrade should be
                kind = exc.response.headers.get("content-type", "").split(";")[0]
                ended = ended._replace(detail=f"HTTP {status} {kind or 'no content type'}"
                                       ", not a WebSocket upgrade")
        except (OSError, httpx.HTTPError, websockets.WebSocketException, ValueError) as exc:
            # (ValueError: a body that is not the JSON the protocol promises)
            kind = Failure.UNREACHABLE if _unreachable(exc) else Failure.TRANSPORT
            ended = Ended(kind, f"{type(exc).__name__}: {exc}".rstrip(": "))
            if (refused := certificate_refused(exc)) is not None:
                # Every transport trusts the same CAs (`trust`), so once each was tried
                # the subscription ends with this (see `Subscription`).
                reason = refused.verify_message or str(refused)
                ended = Ended(Failure.TRANSPORT, ended.detail, None, "tls_certificate",
                              f"the server's TLS certificate was not accepted ({reason}); "
                              "for a private CA, pass its bundle (tls=, dualcast tail "
                              "--cacert) or set SSL_CERT_FILE to a bundle that holds it")
        await self.inbox.put((self, ended))

    def close(self) -> None:
        """Stop reading (the task finishes on its own; the subscription awaits it)."""
        self.task.cancel()

    async def send(self, frame: Mapping[str, Any]) -> bool:
        """Send a frame on a welcomed WebSocket (a token refresh); False elsewhere."""
        ws = self._ws
        if ws is None or not self.welcomed:
            return False
        try:
            await ws.send(json.dumps(frame))
        except websockets.WebSocketException:
            return False  # the reader sees the close and ends the connection
        return True

    # -- WebSocket -------------------------------------------------------------

    async def _websocket(self) -> None:
        target = self.target
        url = target.ws_base + PATHS[Transport.WEBSOCKET] + target.query(last_event_id=self.cursor)
        # No open_timeout of its own: the subscription times out on `welcome`, which
        # covers a handshake a proxy holds as well as an upgrade that never answers.
        # No bound on a frame's size either, as in a browser: a replay page goes out as
        # one `batch` frame (500 events of 256 KiB are 128 MiB), and a frame refused
        # (1009) would be asked for again from the same cursor, for ever.
        async with _Connect(url, tls=target.tls, additional_headers=target.headers(),
                            open_timeout=None, max_size=None, compression=None,
                            close_timeout=2, user_agent_header="dualcast-client") as ws:
            self._ws = ws
            async for raw in ws:
                try:
                    frame = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(frame, dict):
                    await self._frame(frame)

    async def _frame(self, frame: Mapping[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "welcome":
            rooms = frame.get("rooms")
            await self._emit(Welcome(list(rooms) if isinstance(rooms, list) else [],
                                     _str(frame.get("last_id"))))
        elif kind == "event":
            event = _event(frame)
            if event is not None:
                await self._emit(Batch([event]))
        elif kind == "batch":
            run: list[Event] = []
            inner = frame.get("events")
            for item in inner if isinstance(inner, list) else []:
                if not isinstance(item, dict):
                    continue
                if item.get("type", "event") != "event":
                    if run:
                        await self._emit(Batch(run))
                        run = []
                    await self._frame(item)
                elif (event := _event(item)) is not None:
                    run.append(event)
            if run:
                await self._emit(Batch(run))
        elif kind == "reset":
            await self._emit(Reset(_str(frame.get("last_id"))))
        elif kind == "error":
            await self._emit(ErrorFrame(str(frame.get("code") or "error"),
                                        str(frame.get("message") or "")))
        # joined / left / pong: nothing to do

    # -- SSE -------------------------------------------------------------------

    async def _sse(self) -> None:
        target = self.target
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.cursor:
            headers["Last-Event-ID"] = self.cursor
        # The server pings an idle stream (every 15 s by default): a stream silent for
        # much longer than that is dead even if the socket does not say so.
        timeout = httpx.Timeout(10.0, read=target.idle_timeout)
        # `events=message`: each event's data is `{id, event, data, ts}`, so SSE carries
        # `ts` like the other transports; a server without that mode ignores it and
        # sends named events, which are read as well (their `ts` is then None).
        url = target.http_base + PATHS[Transport.SSE] + target.query(events="message")
        async with target.http.stream("GET", url, headers=target.headers(headers),
                                      timeout=timeout) as response:
            if response.status_code != 200:
                raise _refusal(response.status_code, await response.aread())
            kind = response.headers.get("content-type", "")
            if not kind.startswith("text/event-stream"):
                raise _not_protocol(response, "not an event stream")
            parser, lines = SSEParser(), Lines()
            async for chunk in response.aiter_text():
                for line in lines.feed(chunk):
                    message = parser.line(line)
                    if message is not None:
                        await self._message(message)

    async def _message(self, message: Message) -> None:
        """One SSE message: a control message (no `id`) or an event."""
        if message.event == "welcome":
            body = _json_object(message.data)
            rooms = body.get("rooms")
            await self._emit(Welcome(list(rooms) if isinstance(rooms, list) else [],
                                     _str(body.get("last_id"))))
        elif message.event == "reset" and not message.id:
            await self._emit(Reset(_str(_json_object(message.data).get("last_id"))))
        elif message.event == "error" and not message.id:
            body = _json_object(message.data)
            await self._emit(ErrorFrame(str(body.get("code") or "error"),
                                        str(body.get("message") or "")))
        elif message.id:
            await self._emit(Batch([sse_event(message)]))

    # -- long-polling ----------------------------------------------------------

    async def _poll(self) -> None:
        """Each answer's `last_id` is the next request's cursor (this connection's own,
        so it never asks again for what it has just been given)."""
        target = self.target
        cursor = self.cursor
        longest = target.poll_timeout
        endpoint = target.http_base + PATHS[Transport.POLLING]
        while True:
            # The first request answers at once (that answer is our `welcome`).
            wait = longest if self.welcomed else 0
            url = endpoint + target.query(after=cursor, timeout=wait)
            # A proxy that swallows the answer must not hang us: give up a while after.
            timeout = httpx.Timeout(10.0, read=wait + 15.0)
            asked = asyncio.get_running_loop().time()
            response = await target.http.get(
                url, headers=target.headers({"Accept": "application/json"}), timeout=timeout)
            if response.status_code != 200:
                refusal = _refusal(response.status_code, response.content)
                if refusal.ended.code == "bad_timeout" and wait >= 1:
                    # The server's limit is a setting below ours: ask for less.
                    longest = wait // 2
                    continue
                raise refusal
            try:
                body = response.json()
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise _not_protocol(response, "not a poll answer")
            last_id = _str(body.get("last_id"))
            if not self.welcomed:
                await self._emit(Welcome(list(target.rooms), last_id))
            if body.get("reset"):
                await self._emit(Reset(last_id))
            else:
                items = body.get("events")
                events = [e for item in (items if isinstance(items, list) else [])
                          if isinstance(item, dict) and (e := _event(item)) is not None]
                await self._emit(Batch(events, last_id))
                if wait and not events:
                    # Asked to wait, answered empty at once: the server's limit is short
                    # (DUALCAST_POLL_TIMEOUT_MAX=0 answers every poll so). No
                    # back-to-back polls: at most one a second.
                    await asyncio.sleep(SHORT_POLL + asked - asyncio.get_running_loop().time())
            cursor = last_id or cursor


def sse_event(message: Message) -> Event:
    """An SSE message with an id as an event: named (`event: deploy`), or unnamed with
    the whole event as its data (the `events=message` mode)."""
    try:
        data = json.loads(message.data)
    except ValueError:
        return Event(message.id or "", message.event, message.data, None)
    if (message.event == "message" and isinstance(data, dict) and data.get("id") == message.id
            and (event := _event(data)) is not None):
        return event  # an unnamed message carrying the whole event
    return Event(message.id or "", message.event, data, None)


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
