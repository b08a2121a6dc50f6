"""The Dualcast class itself, driven from a blank page on ANOTHER origin in a real Chromium.

docs/examples exercise the happy path; these tests call the API as an embedding app
would (join/leave, stop/start, token functions, transport subsets) and watch what it
emits. The page only imports the module; everything else runs through page.evaluate.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from tests.conftest import SECRET, token
from tests.e2e.conftest import Page, Stack, wait_js
from tests.harness.pages import QuietLog, page_servers, send_html

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

# Loads the module from the server given in ?server= and records everything it emits.
BLANK = r"""<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,">
<script type="module">
const server = new URLSearchParams(location.search).get('server');
const mod = await import(`${server}/dualcast.js`);
window.mod = mod;
window.make = (opts = {}, url = server) => {
  const dc = new mod.Dualcast(url, opts);
  dc.seen = { event: [], state: [], error: [], reset: [], welcome: [] };
  for (const name of Object.keys(dc.seen)) dc.on(name, (v) => dc.seen[name].push(v));
  return dc;
};
// HS256 tokens minted in the page (the tests' secret), for token functions that must
// answer while the test's Python side is busy waiting
const key = await crypto.subtle.importKey('raw', new TextEncoder().encode(SECRET),
  { name: 'HMAC', hash: 'SHA-256' }, false, ['sign']);
const b64 = (bytes) => btoa(String.fromCharCode(...new Uint8Array(bytes)))
  .replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
const part = (v) => b64(new TextEncoder().encode(JSON.stringify(v)));
window.mint = async (sub, ttl, claims = {}) => {
  const now = Math.floor(Date.now() / 1000);
  const body = `${part({ alg: 'HS256', typ: 'JWT' })}.${part({
    sub, rooms: [], admin: false, publish: false, iat: now, exp: now + ttl, ...claims })}`;
  const sig = await crypto.subtle.sign('HMAC', key, new TextEncoder().encode(body));
  return `${body}.${b64(sig)}`;
};
window.ready = true;
</script>"""


class BlankHandler(QuietLog, BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        send_html(self, BLANK.replace("SECRET", json.dumps(SECRET)))


@pytest.fixture
def page_origin() -> Iterator[Callable[[], str]]:
    with page_servers() as start:
        yield lambda: start(BlankHandler)


@pytest.fixture
def embed(stack: Callable[..., Stack], open_page: Callable[..., Page],
          page_origin: Callable[[], str]) -> Callable[..., tuple[Stack, Any]]:
    """A server listing a fresh page origin, and that blank page, module loaded."""

    def start(env: dict[str, str] | None = None) -> tuple[Stack, Any]:
        origin = page_origin()
        s = stack(env={"DUALCAST_ALLOWED_ORIGINS": origin, **(env or {})})
        p = open_page(f"{origin}/?server={s.base_url}")
        wait_js(p.page, "window.ready === true", timeout=20)
        return s, p.page

    return start


def start_client(page: Any, **options: Any) -> None:
    """`window.dc = make(options); dc.start()` in the page."""
    page.evaluate("(o) => { window.dc = make(o); dc.start(); }", options)


def wait_event(page: Any, entry_id: str, timeout: float = 15) -> None:
    wait_js(page, f"dc.seen.event.some((e) => e.id === {entry_id!r})", timeout)


@pytest.mark.parametrize("transport", ["websocket", "sse", "polling"])
def test_joining_a_forbidden_room_is_an_error_and_the_feed_carries_on(
    transport: str, embed: Callable[..., tuple[Stack, Any]],
) -> None:
    """On SSE and polling a join reconnects with the new set, which the server refuses
    (403 forbidden_room) as a whole: the client stopped for good, though the token may
    still read every room it had. As on a WebSocket: one error, the room dropped, live."""
    s, page = embed()
    start_client(page, token=token("456", rooms=["ops"]), rooms=["ops"],
                 transports=[transport])
    wait_js(page, "dc.state === 'live'", 20)
    page.evaluate("dc.join('admin')")
    wait_js(page, "dc.seen.error.length > 0 && dc.state === 'live'", 20)
    errors = page.evaluate("dc.seen.error")
    assert [(e["code"], e["kind"]) for e in errors] == [("forbidden_room", "frame")], errors
    assert page.evaluate("dc.rooms") == ["ops"]
    entry = s.publish("x", {"n": 1}, rooms=["ops"])
    wait_event(page, entry)
    assert page.evaluate("dc.seen.event.map((e) => e.id)") == [entry]
    assert page.evaluate("dc.transport") == transport
    assert page.evaluate("dc.seen.error.length") == 1


def test_an_origin_not_on_the_list_gets_an_error_event_not_a_silent_offline(
    stack: Callable[..., Stack], open_page: Callable[..., Page],
    page_origin: Callable[[], str],
) -> None:
    """Every transport refused (the upgrade's Origin check, the preflights of SSE and
    polls): the browser shows the page one network error for each and the client went
    offline and retried for ever without an `error`, so an app had nothing to show.
    Now one `error` (code `unreachable`, kind 'transport') says what to check."""
    listed, unlisted = page_origin(), page_origin()
    s = stack(env={"DUALCAST_ALLOWED_ORIGINS": listed})
    p = open_page(f"{unlisted}/?server={s.base_url}")
    wait_js(p.page, "window.ready === true", timeout=20)
    start_client(p.page, token=token("ops", admin=True))
    wait_js(p.page, "dc.seen.error.length > 0", timeout=30)
    error = p.page.evaluate("dc.seen.error[0]")
    assert error["code"] == "unreachable", error
    assert error["kind"] == "transport"
    assert "DUALCAST_ALLOWED_ORIGINS" in error["message"]
    assert p.page.evaluate("dc.state") == "offline"
    assert p.page.evaluate("dc.seen.event.length") == 0
    assert s.gauge("websocket") == 0 and s.gauge("sse") == 0
    p.page.evaluate("dc.stop()")


def test_start_after_a_refused_token_asks_the_token_function_again(
    embed: Callable[..., tuple[Stack, Any]],
) -> None:
    """The token function gave an expired token: `token_expired`, offline, as it should.
    The app's retry (stop(), start()) then reused the refused token without calling the
    function, and failed the same way for as long as the app kept trying."""
    s, page = embed()
    page.evaluate("""window.calls = 0;
        window.dc = make({ token: async () => {
          window.calls += 1;
          return mint('456', window.calls === 1 ? -100 : 3600);
        } });
        dc.start();""")
    wait_js(page, "dc.seen.error.length === 1 && dc.state === 'offline'", 20)
    assert page.evaluate("dc.seen.error[0].code") == "token_expired"
    page.evaluate("dc.stop(); dc.start()")
    wait_js(page, "dc.state === 'live'", 20)
    assert page.evaluate("window.calls") == 2
    entry = s.publish("x", {"n": 1})
    wait_event(page, entry)
    assert page.evaluate("dc.seen.error.length") == 1


@pytest.mark.parametrize("transport", ["websocket", "sse", "polling"])
def test_a_token_refresh_that_fails_once_does_not_end_the_feed(
    transport: str, embed: Callable[..., tuple[Stack, Any]],
) -> None:
    """The token function threw once at a refresh ahead of `exp` (the app's token
    endpoint had a blip): the client stopped for good (token_unavailable, offline),
    though the token it held had seconds to live. Now it asks again while it holds."""
    s, page = embed()
    page.evaluate("""(transport) => {
        window.calls = 0;
        window.dc = make({ transports: [transport], token: async () => {
          window.calls += 1;
          if (window.calls === 2) throw new Error('token endpoint down');
          const t = await mint('456', window.calls === 1 ? 8 : 3600);
          if (window.calls === 1) window.firstExp = JSON.parse(atob(t.split('.')[1])).exp;
          return t;
        } });
        dc.start();
    }""", transport)
    wait_js(page, "dc.state === 'live'", 20)
    wait_js(page, "window.calls >= 3", 20)
    # past the first token's exp: still live, on the same transport, and delivering
    wait_js(page, "Date.now() > window.firstExp * 1000 + 500", 20)
    entry = s.publish("x", {"n": 1})
    wait_event(page, entry)
    assert page.evaluate("dc.seen.error") == []
    assert page.evaluate("[dc.state, dc.transport]") == ["live", transport]


def test_a_token_refresh_on_sse_does_not_flicker_to_connecting(
    embed: Callable[..., tuple[Stack, Any]],
) -> None:
    """An SSE stream holds the token it connected with, so a refresh reconnects from the
    cursor: planned, yet each one said `connecting` then `live` again, and a page that
    shows a 'reconnecting' banner flashed it at every refresh (every half-life of a short
    token). As on WebSocket and polling, the state now stays `live` across it."""
    s, page = embed()
    page.evaluate("""window.calls = 0;
        window.dc = make({ transports: ['sse'], token: async () => {
          window.calls += 1;
          return mint('456', 4);
        } });
        dc.start();""")
    wait_js(page, "dc.state === 'live'", 20)
    first = s.publish("x", {"n": 1})
    wait_js(page, "window.calls >= 3", 20)  # two refreshes: two reconnects
    second = s.publish("x", {"n": 2})
    wait_event(page, second)
    assert page.evaluate("dc.seen.event.map((e) => e.id)") == [first, second]
    states = page.evaluate("dc.seen.state.map((s) => `${s.transport}/${s.state}`)")
    assert states == ["sse/connecting", "sse/live"], states
    assert page.evaluate("dc.seen.error") == []


@pytest.mark.parametrize("transport", ["websocket", "sse", "polling"])
def test_join_and_leave_before_start_change_the_default_rooms(
    transport: str, embed: Callable[..., tuple[Stack, Any]],
) -> None:
    """Without `rooms` the server joins the token's default rooms (here user-ops and
    admin). dc.join('team') before start() (or before the first welcome) asked for
    `rooms=team` alone, so the page silently lost its default rooms; dc.leave('admin')
    then did nothing at all. Both now apply to the default set once a welcome names it."""
    s, page = embed()
    tok = token("ops", admin=True)
    page.evaluate("""([tok, transport]) => {
        window.joiner = make({ token: tok, transports: [transport] });
        joiner.join('team');
        joiner.start();
        window.leaver = make({ token: tok, transports: [transport] });
        leaver.leave('admin');
        leaver.start();
    }""", [tok, transport])
    wait_js(page, "joiner.state === 'live' && leaver.state === 'live'", 20)
    wait_js(page, "joiner.rooms.includes('team') && !leaver.rooms.includes('admin')", 20)
    wait_js(page, "joiner.state === 'live' && leaver.state === 'live'", 20)
    team = s.publish("x", {"to": "team"}, rooms=["team"])
    admin = s.publish("x", {"to": "admin"}, rooms=["admin"])
    mine = s.publish("x", {"to": "me"}, rooms=["user-ops"])
    wait_js(page, f"joiner.seen.event.some((e) => e.id === {mine!r})", 15)
    wait_js(page, f"leaver.seen.event.some((e) => e.id === {mine!r})", 15)
    assert page.evaluate("joiner.seen.event.map((e) => e.id)") == [team, admin, mine]
    assert page.evaluate("leaver.seen.event.map((e) => e.id)") == [mine]
    assert sorted(page.evaluate("joiner.rooms")) == ["admin", "team", "user-ops"]
    assert page.evaluate("[joiner.seen.error, leaver.seen.error]") == [[], []]


def test_the_state_is_connecting_while_the_token_function_works(
    embed: Callable[..., tuple[Stack, Any]],
) -> None:
    """start() with a token function that takes its time (the app's token endpoint):
    the client said `offline` and emitted no `state` at all until the function returned,
    so a page showed 'offline' for every slow login. It is `connecting` meanwhile."""
    _, page = embed()
    page.evaluate("""window.dc = make({ token: () => new Promise((resolve) => {
          window.release = () => mint('456', 3600).then(resolve);
        }) });
        dc.start();""")
    wait_js(page, "typeof window.release === 'function'", 10)
    assert page.evaluate("dc.state") == "connecting"
    assert page.evaluate("dc.seen.state.map((s) => s.state)") == ["connecting"]
    page.evaluate("window.release()")
    wait_js(page, "dc.state === 'live'", 20)
    assert page.evaluate("dc.seen.state.map((s) => s.state)") == ["connecting", "live"]
    assert page.evaluate("dc.seen.error") == []


def test_a_token_function_that_returns_no_string_is_an_error_not_anonymous(
    embed: Callable[..., tuple[Stack, Any]],
) -> None:
    """A token function that resolves to the token endpoint's JSON ({access_token}) or
    to undefined (a forgotten return) was taken for "no token": the page connected
    anonymously, got public events only, and nothing said why. It is a
    `token_unavailable` error, and nothing connects."""
    s, page = embed()
    page.evaluate("""(tok) => {
        window.dc = make({ token: async () => ({ access_token: tok }) });
        dc.start();
    }""", token("456"))
    wait_js(page, "dc.seen.error.length > 0", 20)
    error = page.evaluate("dc.seen.error[0]")
    assert (error["code"], error["kind"]) == ("token_unavailable", "auth"), error
    assert "object" in error["message"]
    assert page.evaluate("dc.state") == "offline"
    assert s.gauge("websocket") == 0


def test_join_on_polling_adds_to_the_default_rooms(
    embed: Callable[..., tuple[Stack, Any]],
) -> None:
    """A poll answer names no rooms, so on polling the client never knew the server's
    default set: dc.join('team') asked for `rooms=team` alone and the page lost
    user-<sub> and admin for good. It now learns the set from /api/me."""
    s, page = embed()
    start_client(page, token=token("ops", admin=True), transports=["polling"])
    wait_js(page, "dc.state === 'live'", 20)
    assert sorted(page.evaluate("dc.seen.welcome[0].rooms")) == ["admin", "user-ops"]
    page.evaluate("dc.join('team')")
    wait_js(page, "dc.seen.welcome.length === 2 && dc.state === 'live'", 20)
    team = s.publish("x", {"to": "team"}, rooms=["team"])
    admin = s.publish("x", {"to": "admin"}, rooms=["admin"])
    mine = s.publish("x", {"to": "me"}, rooms=["user-ops"])
    wait_event(page, mine)
    assert page.evaluate("dc.seen.event.map((e) => e.id)") == [team, admin, mine]
    assert sorted(page.evaluate("dc.rooms")) == ["admin", "team", "user-ops"]
    assert page.evaluate("dc.seen.error") == []


def test_a_refreshed_token_for_another_user_reconnects_on_websocket(
    embed: Callable[..., tuple[Stack, Any]],
) -> None:
    """The app switched users and its token function now returns the new user's token.
    SSE and polling reconnect with it; on a WebSocket the client sent it in an `auth`
    frame, which the server refuses for another subject (invalid_token): the feed
    stopped for good. A token for another subject now reconnects there too."""
    s, page = embed()
    page.evaluate("""window.calls = 0;
        window.dc = make({ transports: ['websocket'], token: async () => {
          window.calls += 1;
          return window.calls === 1 ? mint('456', 4) : mint('789', 3600);
        } });
        dc.start();""")
    wait_js(page, "dc.state === 'live'", 20)
    wait_js(page, "window.calls >= 2 && dc.seen.welcome.length === 2", 20)
    wait_js(page, "dc.state === 'live'", 20)
    assert page.evaluate("dc.seen.welcome[1].rooms") == ["user-789"]
    entry = s.publish("x", {"to": "789"}, rooms=["user-789"])
    wait_event(page, entry)
    assert page.evaluate("dc.seen.error") == []


def test_a_room_a_refreshed_token_loses_is_not_asked_for_again(
    embed: Callable[..., tuple[Stack, Any]],
) -> None:
    """A refreshed token that may no longer read a room: the WebSocket server leaves it
    (a `left` frame), but the client kept it in dc.rooms and asked for it again on the
    next connect, which on SSE is refused (403 forbidden_room). It drops it at once."""
    s, page = embed()
    page.evaluate("""window.calls = 0;
        window.dc = make({ rooms: ['ops', 'dev'], transports: ['websocket', 'sse'],
          token: async () => {
            window.calls += 1;
            return mint('456', window.calls === 1 ? 4 : 3600,
              { rooms: window.calls === 1 ? ['ops', 'dev'] : ['ops'] });
          } });
        dc.start();""")
    wait_js(page, "dc.state === 'live'", 20)
    wait_js(page, "window.calls >= 2 && !dc.rooms.includes('dev')", 20)
    assert page.evaluate("dc.rooms") == ["ops"]
    # the next connect (here: a forced switch to SSE) asks for what is left, and is let in
    page.evaluate("dc.manager.level = dc.manager.home = 1; dc.manager.restart({})")
    wait_js(page, "dc.transport === 'sse' && dc.state === 'live'", 20)
    entry = s.publish("x", {"n": 1}, rooms=["ops"])
    wait_event(page, entry)
    assert page.evaluate("dc.seen.error") == []
