"""The HTTP API around the transports: publish, overview, me, login, health, metrics."""

from __future__ import annotations

import asyncio
import html
import logging
from urllib.parse import quote

import orjson
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from dualcast.admission import Refusal, error_response, identify, requested_rooms
from dualcast.auth import COOKIE_NAME, LONGEST_COOKIE_TOKEN, AuthError
from dualcast.bigints import past_64_bits
from dualcast.consumer import Readiness
from dualcast.csrf import FetchSite, cross_site_cookie_write, fetch_site
from dualcast.events import Envelope, StreamId, entry_fields
from dualcast.headers import PAGE_HEADERS
from dualcast.hub import Doorbell
from dualcast.log import LogNoAnswer, LogRefused, LogUnavailable
from dualcast.metrics import Metrics
from dualcast.protocol import ErrorCode
from dualcast.query import query_of
from dualcast.runtime import Runtime

log = logging.getLogger("dualcast.api")


def _rt(request: Request) -> Runtime:
    return request.app.state.dualcast  # type: ignore[no-any-return]


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _is_admin(request: Request, rt: Runtime) -> bool:
    """Whether the caller presents an admin token (a bad token is just not admin)."""
    try:
        return (await identify(request, rt)).admin
    except Refusal:
        return False


async def readyz(request: Request) -> Response:
    """Anyone gets a status word; the detail (Redis host, port, the error) only reaches the
    log and admin tokens, since a public probe would otherwise map the network behind it."""
    rt = _rt(request)
    status, detail = rt.consumer.readiness()
    reason = status.value
    ok = status is Readiness.OK
    if rt.draining:
        ok, reason, detail = False, "draining", "draining for shutdown"
    body: dict[str, object] = {
        "ready": ok, "reason": reason, "engine": rt.log.engine,
        "last_id": rt.hub.last_id, "seconds_since_read": round(rt.consumer.seconds_since_read, 3),
    }
    if not ok and await _is_admin(request, rt):
        body["detail"] = detail
    return JSONResponse(body, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(await registry.render(), media_type="text/plain; version=0.0.4")


async def me(request: Request) -> Response:
    rt = _rt(request)
    try:
        identity = await identify(request, rt)
    except Refusal as refusal:
        rt.stats.refused += 1
        return refusal.response()
    return JSONResponse(identity.describe(), headers={"Cache-Control": "no-store"})


async def overview(request: Request) -> Response:
    rt = _rt(request)
    try:
        identity = await identify(request, rt)
        rooms = requested_rooms(request, identity, rt.settings)
    except Refusal as refusal:
        rt.stats.refused += 1
        return refusal.response()
    folds = rt.consumer.overview
    if not await folds.wait_built(rt.settings.redis_timeout * 3):  # (only just after start)
        return error_response(503, "log_unavailable", "the event log is not read yet; retry soon")
    try:
        window = await rt.log_window(0.0)
        folds.trim_to(window)
        await _caught_up(rt, window.last_id, OVERVIEW_CATCH_UP)
    except LogUnavailable:
        pass  # answered from what was read; the stream cannot trim while Redis is away
    return Response(folds.answer(frozenset(rooms)), media_type="application/json",
                    headers={"Cache-Control": "no-store"})


#: Seconds an overview waits for this instance's consumer to reach the log's head.
OVERVIEW_CATCH_UP = 2.0


async def _caught_up(rt: Runtime, head: StreamId, within: float) -> None:
    """Until this instance's consumer has read up to `head`, for at most `within` seconds.

    Why: a page that is told `reset` by one instance reloads the overview, and behind a
    balancer that request may land on another instance whose consumer is behind the
    reset's position. Its overview then ended before that position while the page's
    stream went on after it: what came between was never folded (a session created then
    never showed). The log's head when the overview is asked for is at or after any
    position an instance has told before, so an overview folded up to it leaves no gap.
    One XINFO per overview (a page load or a reset), shared by concurrent callers.
    """
    consumer = rt.consumer
    if consumer.position is None or consumer.position >= head:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    bell = Doorbell()
    while consumer.position is not None and consumer.position < head:
        left = deadline - loop.time()
        if left <= 0:
            return  # answered as it is: a consumer this far behind has worse troubles
        # (rung by each batch; a batch of malformed entries alone rings nothing)
        await rt.hub.wait_for_events(min(left, 0.1), bell)


def _cross_site(action: str) -> Response:
    return error_response(
        403, "cross_site", f"{action} with the login cookie must come from this dashboard's "
        "own origin; other pages and producers send a token (Authorization: Bearer)")


def _json_body(request: Request) -> bool:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media == "application/json"


async def publish(request: Request) -> Response:
    """POST /api/publish; every answer 4xx counts in dualcast_refusals_total. Uncounted,
    a producer whose token had expired (401), lost `publish` (403) or sent what cannot
    be published (413, 415, 422) was refused on every call with no metric moving: not
    published, not a failure (those are the 503s), not a refusal."""
    response = await _publish(request)
    if 400 <= response.status_code < 500:
        _rt(request).stats.refused += 1
    return response


async def _publish(request: Request) -> Response:
    rt = _rt(request)
    settings = rt.settings
    # A same-site page (another port, a sibling subdomain) gets the cookie sent along
    # with its form posts and no-cors fetches; neither can claim this origin or send
    # application/json without a CORS preflight, which this endpoint never grants.
    if cross_site_cookie_write(request):
        return _cross_site("publishing")
    try:
        identity = await identify(request, rt)
    except Refusal as refusal:
        return refusal.response()
    if identity.anonymous:
        return error_response(401, "unauthenticated", "publishing needs a token with 'publish'")
    if not (identity.publish or identity.admin):
        return error_response(403, "forbidden", "this token may not publish (needs 'publish')")
    if not _json_body(request):
        return error_response(415, "unsupported_media_type",
                              "publish bodies must be sent as Content-Type: application/json")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
        return error_response(413, "too_large", f"body over {settings.max_body_bytes} bytes")
    body = b""
    try:
        # A token holder's body sent a byte at a time held a connection and its buffer
        # for as long as it liked (only a proxy in front bounded it).
        async with asyncio.timeout(settings.body_timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > settings.max_body_bytes:
                    return error_response(413, "too_large",
                                          f"body over {settings.max_body_bytes} bytes")
    except TimeoutError:
        return error_response(408, ErrorCode.BODY_TIMEOUT,
                              f"the body did not arrive within {settings.body_timeout:g} s")
    except ClientDisconnect:
        # The producer went away mid-body (killed, timed out, its network dropped):
        # nothing to publish and nobody to answer. Uncaught, this was an "Exception
        # in ASGI application" traceback in the log for every such producer.
        return Response(status_code=400)
    # Every body that cannot be published is 422, as pydantic's own parsing answers a
    # body that is not JSON: it was 400 here, and a producer written to "publish bodies
    # are validated with pydantic (422)" met a status it did not expect. The error code
    # still says which (`bad_json`, `invalid`, `unencodable`).
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return error_response(422, "bad_json", f"body is not JSON: {exc}", field="body")
    try:  # names are checked with this deployment's patterns (events.use_names)
        envelope = Envelope.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix to our own
        return error_response(422, "invalid", f"{where}: {message}", field=where)
    if (big_at := past_64_bits(body)) is not None:  # orjson read it as a float: refuse, not round
        return error_response(422, "invalid", f"{big_at}: an integer past 64 bits does not "
                              "fit (send it as a string)", field=big_at)
    try:
        fields = entry_fields(envelope)
    except (TypeError, ValueError):  # orjson: nested past 254 levels (deeper than it writes)
        return error_response(422, "unencodable", "data nests too deep to be delivered",
                              field="data")
    try:
        async with asyncio.timeout(settings.redis_timeout):
            entry_id = await rt.log.append(fields)
    except (LogUnavailable, TimeoutError) as exc:
        _publish_failed(rt, str(exc) or "timed out")
        if isinstance(exc, (LogNoAnswer, TimeoutError)):
            # The XADD went out and its reply did not come in time: a slow Redis may have
            # appended it, and "retry soon" had producers append it a second time.
            return error_response(
                503, "log_unavailable", "the event log did not answer in time: the event "
                "may have been appended; retrying may deliver it twice", maybe_appended=True)
        if isinstance(exc, LogRefused):  # trying again will not help: say what Redis said
            return error_response(503, "log_unavailable", f"the event log refused the event "
                                  f"({exc}); retrying will not help until that is fixed")
        return error_response(503, "log_unavailable", "the event log is unreachable; retry soon")
    rt.stats.published += 1
    return JSONResponse({"id": entry_id}, status_code=202)


def _publish_failed(rt: Runtime, why: str) -> None:
    """Count a failed publish; log the first, then one line per 30 s with the count. A
    line per failure wrote a producer's whole rate into the log while Redis was away
    (100 publishes a second, 100 lines a second)."""
    rt.stats.publish_failures += 1
    count = rt.publish_failing.due()
    if count is not None:
        more = f" ({count} failed publishes since the last such line)" if count > 1 else ""
        log.warning("publish failed, answered 503: %s%s; said at most every %gs, "
                    "dualcast_publish_failures_total counts each", why, more,
                    rt.publish_failing.every)


def _secure(request: Request, mode: str) -> bool:
    if mode != "auto":
        return mode == "always"
    proto = request.headers.get("x-forwarded-proto", request.url.scheme)
    return proto in ("https", "wss")


async def _may_switch_session(request: Request, rt: Runtime, arriving: str | None) -> bool:
    """Whether this login link could replace a signed-in session of another subject.

    A page of another site can send the browser to `/?token=<its own token>`; set
    silently, the victim would then watch (and publish into) the attacker's account.
    The dashboard's own login form navigates same-origin, and a client that is not
    a browser says nothing: both are taken at their word. On a cross-site
    navigation the SameSite=Strict cookie is not sent, so only the page (which
    asks /api/me with the cookie) can tell whether a session exists.
    """
    site = fetch_site(request)
    if site is None or site is FetchSite.SAME_ORIGIN:
        return False
    if site is FetchSite.CROSS_SITE:
        return True
    current = request.cookies.get(COOKIE_NAME)
    if not current:
        return False
    try:
        signed_in = await rt.auth.decode(current)
    except AuthError:
        return False  # an expired or foreign cookie is no session to protect
    return signed_in.sub != arriving


def _too_long_for_the_cookie(request: Request, size: int) -> Response:
    """The answer to a login link whose token no browser would keep: set anyway, the
    cookie was dropped and the dashboard opened signed out, with nothing to say why."""
    message = (f"the token is too long to keep as the login cookie ({size} bytes; a "
               f"browser keeps at most {LONGEST_COOKIE_TOKEN}): sign in with a "
               "shorter token (fewer rooms or claims); an API client can send this one as "
               "Authorization: Bearer")
    if "text/html" not in request.headers.get("accept", ""):
        return error_response(400, ErrorCode.TOO_LARGE, message)
    page = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>dualcast: token too long</title></head><body>"
            f"<h1>This login link cannot sign you in</h1><p>{html.escape(message)}.</p>"
            "<p><a href=\"/\">Open the dashboard</a></p></body></html>\n")
    return HTMLResponse(page, status_code=400,
                        headers={"Cache-Control": "no-store", **PAGE_HEADERS})


async def login_redirect(request: Request) -> Response | None:
    """`GET /?token=…`: validate, set the cookie, redirect so the token leaves the URL bar."""
    rt = _rt(request)
    token = query_of(request).get("token")
    if token is None:
        return None
    try:
        arriving = await rt.auth.decode(token)
    except AuthError as exc:
        if "text/html" in request.headers.get("accept", ""):
            # A person followed the link: show the dashboard's login screen and why
            # (static/app.js reads #login_error), not a JSON body.
            return RedirectResponse(f"/#login_error={exc.code}", status_code=303,
                                    headers={"Cache-Control": "no-store", **PAGE_HEADERS})
        return error_response(401, exc.code, exc.message)
    if len(token.encode()) > LONGEST_COOKIE_TOKEN:
        return _too_long_for_the_cookie(request, len(token.encode()))
    if await _may_switch_session(request, rt, arriving.sub):
        # The login screen asks first (static/app.js reads #login_confirm). The token
        # rides in the fragment, which no server, log or Referer ever sees.
        return RedirectResponse(f"/#login_confirm={quote(token, safe='')}", status_code=303,
                                headers={"Cache-Control": "no-store", **PAGE_HEADERS})
    response = RedirectResponse("/", status_code=303,
                                headers={"Cache-Control": "no-store", **PAGE_HEADERS})
    response.set_cookie(
        COOKIE_NAME, token, httponly=True, samesite="strict", path="/",
        secure=_secure(request, rt.settings.cookie_secure),
    )
    return response


async def logout(request: Request) -> Response:
    rt = _rt(request)
    if cross_site_cookie_write(request):
        return _cross_site("signing out")
    response = JSONResponse({"status": "logged out"})
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict",
                           secure=_secure(request, rt.settings.cookie_secure))
    return response
