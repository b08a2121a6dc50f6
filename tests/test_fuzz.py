"""Property tests (hypothesis): random input never breaks the server or its healthy clients.

Random WebSocket frames, room names, cursors, query strings and publish bodies are
thrown at one running server. Each must be answered with a 2xx/4xx JSON answer
or, on a WebSocket, with frames of the protocol (an `error` frame for what is
wrong; a close only with 1008/1009): never a 5xx, never a traceback in the log.
Meanwhile a healthy WebSocket subscriber keeps receiving every canary event
published between examples, and is never dropped. What producers write to the
stream itself is fuzzed in tests/test_fuzz_entries.py (raw bytes, values that
decode but do not encode, against every transport).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.conftest import token
from tests.harness.procs import DualcastProcess
from tests.harness.waits import wait_until

MAX_FRAME = 8192
MAX_BODY = 4096
MAX_BAD = 10

ADMIN = token("root", admin=True)
PUBLISHER = token("producer", publish=True)
USER = token("456")
IDENTITIES = [None, USER, token("789"), ADMIN, token("555", rooms=["team-x"])]
WS_FRAME_TYPES = {"welcome", "event", "batch", "joined", "left", "pong", "error", "reset"}

#: 5 properties x 60 examples keeps the file under ~30 s; FUZZ_EXAMPLES=1000 digs deeper.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow])


class Healthy:
    """A well-behaved WS subscriber on a thread, counting what reaches it."""

    def __init__(self, ws_url: str) -> None:
        self._opened = connect(f"{ws_url}/api/ws?token={USER}", max_size=2**22, open_timeout=10)
        self.conn = self._opened.__enter__()
        first = json.loads(self.conn.recv(timeout=10))
        assert first["type"] == "welcome"
        self.canaries: set[int] = set()
        self.bad: list[Any] = []
        self.closed: int | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for raw in self.conn:
                frame = json.loads(raw)
                for item in frame["events"] if frame.get("type") == "batch" else [frame]:
                    if item.get("type") not in WS_FRAME_TYPES or item.get("type") == "error":
                        self.bad.append(item)
                    elif item.get("event") == "canary":
                        self.canaries.add(int(item["data"]["n"]))
        except ConnectionClosed:
            pass
        finally:
            self.closed = self.conn.close_code or 1006

    def close(self) -> None:
        self._opened.__exit__(None, None, None)
        self.thread.join(5)


class Target:
    """The server under fuzz, its healthy client and the canaries sent so far."""

    def __init__(self, proc: DualcastProcess) -> None:
        self.proc = proc
        self.http = httpx.Client(base_url=proc.url, timeout=10)
        self.healthy = Healthy(proc.ws_url)
        self.sent = 0

    def canary(self) -> None:
        self.http.cookies.clear()  # a fuzzed `GET /?token=` may have logged the client in
        self.sent += 1
        response = self.http.post("/api/publish", headers={"Authorization": f"Bearer {ADMIN}"},
                                  json={"event": "canary", "data": {"n": self.sent},
                                        "rooms": ["user-456"]})
        assert response.status_code == 202, response.text
        assert self.healthy.closed is None, f"healthy client dropped ({self.healthy.closed})"

    def check(self) -> None:
        """After a property: every canary arrived, the client is open, nothing crashed."""
        want = set(range(1, self.sent + 1))
        wait_until(lambda: want <= self.healthy.canaries, timeout=10,
                   what=f"{len(want - self.healthy.canaries)} canaries to arrive")
        assert self.healthy.closed is None and not self.healthy.bad, self.healthy.bad
        assert self.http.get("/healthz").status_code == 200
        log = self.proc.log()
        assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]
        assert "eyJ" not in log, "a token reached the log"


@pytest.fixture(scope="module")
def target(server_with: Callable[..., DualcastProcess]) -> Iterator[Target]:
    proc = server_with(
        {"DUALCAST_MAX_FRAME_BYTES": str(MAX_FRAME), "DUALCAST_MAX_BODY_BYTES": str(MAX_BODY),
         "DUALCAST_MAX_BAD_FRAMES": str(MAX_BAD), "DUALCAST_MAX_ROOMS": "5",
         "DUALCAST_POLL_TIMEOUT_MAX": "1"},
        name="fuzz",
    )
    t = Target(proc)
    yield t
    t.healthy.close()
    t.http.close()


# --- strategies ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
room_names = st.one_of(
    st.sampled_from(["admin", "user-456", "user-789", "team-x", "public", "a" * 64, "a" * 65]),
    st.text(max_size=70),
    st.from_regex(r"[A-Za-z0-9_.:@-]{1,64}", fullmatch=True),
)
tokens = st.one_of(st.sampled_from([t for t in IDENTITIES if t] + [token("456", ttl=-5)]),
                   st.text(max_size=40), st.integers())
stream_ids = st.one_of(
    st.from_regex(r"[0-9]{1,22}(-[0-9]{1,22})?", fullmatch=True),
    st.text(max_size=30),
    st.sampled_from(["0", "0-0", "$", "-", "+", "1-", "-1", "18446744073709551616-0"]),
)
frame_dicts = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["join", "leave", "ping", "auth"]), st.text(max_size=8),
                       json_values)},
    optional={"room": st.one_of(room_names, json_values), "token": tokens},
)
ws_frames = st.one_of(
    frame_dicts.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200),
    st.integers(MAX_FRAME - 64, MAX_FRAME * 2).map(
        lambda n: '{"type":"ping","p":"' + "x" * n + '"}'),
)
#: What an HTTP client can put in a header (h11 refuses surrounding whitespace).
ascii_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
    str.strip)


def json_answer(response: httpx.Response, allowed: set[int]) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    assert response.status_code in allowed, (response.status_code, response.text)
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body["error"], str) and isinstance(body["message"], str)


def sse_status(http: httpx.Client, params: Any, headers: dict[str, str] | None = None,
               ) -> httpx.Response:
    """Open an SSE request and leave after the headers (and the body, for an error)."""
    with http.stream("GET", "/api/sse", params=params, headers=headers) as response:
        if response.status_code != 200:
            response.read()
        else:
            assert response.headers["content-type"].startswith("text/event-stream")
        return response


# --- properties ------------------------------------------------------------------------


def _until_pong(conn: ClientConnection, most: int) -> None:
    for _ in range(most):
        reply = json.loads(conn.recv(timeout=10))
        for item in reply["events"] if reply.get("type") == "batch" else [reply]:
            assert item.get("type") in WS_FRAME_TYPES, item
            if item["type"] == "error":
                assert isinstance(item["code"], str) and isinstance(item["message"], str)
        if reply == {"type": "pong"}:
            return
    raise AssertionError("no pong")


def ws_exchange(target: Target, query: str, frames: list[str | bytes]) -> None:
    """Send frames then a ping; every answer must be a protocol frame until pong or close."""
    with connect(f"{target.proc.ws_url}/api/ws?{query}", max_size=2**22,
                 open_timeout=10) as conn:
        welcome = json.loads(conn.recv(timeout=10))
        assert welcome["type"] in ("welcome", "error"), welcome
        oversize = False
        try:
            for frame in frames:
                oversize = oversize or len(frame if isinstance(frame, bytes) else
                                           frame.encode()) > MAX_FRAME
                conn.send(frame)
            conn.send('{"type":"ping"}')
            _until_pong(conn, len(frames) * 3 + 20)
        except ConnectionClosed:
            # Fewer frames than MAX_BAD: a close is only for an oversize frame (1009; 1006
            # when our next send hit the socket the server had already closed) or a
            # refused token at connect (error frame instead of welcome, then 1008).
            code = conn.close_code
            assert (oversize and code in (1009, 1006)) or (
                code == 1008 and welcome["type"] == "error"), (code, welcome)
    target.canary()


@FUZZ
@given(frames=st.lists(ws_frames, min_size=1, max_size=4),
       who=st.sampled_from(IDENTITIES))
def test_random_ws_frames(target: Target, frames: list[str | bytes], who: str | None) -> None:
    ws_exchange(target, f"token={who}" if who else "", frames)


@FUZZ
@given(rooms=st.lists(room_names, max_size=7), who=st.sampled_from(IDENTITIES),
       cursor=st.none() | stream_ids)
def test_random_rooms_and_cursors_on_every_transport(
    target: Target, rooms: list[str], who: str | None, cursor: str | None,
) -> None:
    raw_rooms = ",".join(rooms)
    params: dict[str, str] = {"rooms": raw_rooms}
    if who:
        params["token"] = who
    poll = target.http.get("/api/events", params={**params, "timeout": "0",
                                                  **({"after": cursor} if cursor else {})})
    json_answer(poll, {200, 400, 403})
    sse = sse_status(target.http, {**params, **({"last_event_id": cursor} if cursor else {})})
    json_answer(sse, {200, 400, 403})
    overview = target.http.get("/api/overview", params=params)
    json_answer(overview, {200, 400, 403})
    query = "&".join(f"{k}={quote(v)}" for k, v in params.items())
    if cursor is not None:
        query += f"&last_event_id={quote(cursor)}"
    if poll.status_code == 400 and poll.json()["error"] == "bad_cursor":
        # A malformed cursor is refused before anything streams, WebSocket included.
        with pytest.raises(InvalidStatus) as refused:
            connect(f"{target.proc.ws_url}/api/ws?{query}", open_timeout=10)
        assert refused.value.response.status_code == 400
        target.canary()
        return
    ws_exchange(target, query, [])


@FUZZ
@given(cursor=ascii_text, who=st.sampled_from(IDENTITIES))
def test_random_last_event_id_headers(target: Target, cursor: str, who: str | None) -> None:
    headers = {"Last-Event-ID": cursor}
    if who:
        headers["Authorization"] = f"Bearer {who}"
    json_answer(sse_status(target.http, {}, headers), {200, 400})
    target.canary()


paths = st.sampled_from(["/api/events", "/api/sse", "/api/overview", "/api/me", "/",
                         "/api/publish", "/healthz", "/nope"])
params_strategy = st.dictionaries(
    st.one_of(st.sampled_from(["token", "rooms", "after", "timeout", "last_event_id"]),
              st.text(max_size=10)),
    st.one_of(st.text(max_size=50), tokens.map(str), stream_ids, room_names),
    max_size=5,
)


@FUZZ
@given(path=paths, params=params_strategy, raw=st.none() | st.text(max_size=80))
def test_random_query_strings(
    target: Target, path: str, params: dict[str, str], raw: str | None,
) -> None:
    query: Any = raw if raw is not None else params
    if path == "/api/sse":
        response = sse_status(target.http, query)
    else:
        response = target.http.get(path, params=query)
    assert response.status_code < 500, (path, query, response.status_code, response.text)
    if response.status_code >= 400 and path != "/nope":
        assert response.status_code in (400, 401, 403, 404, 405), response.text
    target.canary()


bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"event": st.one_of(st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True),
                            st.text(max_size=70), json_values)},
        optional={"data": json_values, "rooms": st.one_of(st.lists(room_names, max_size=3),
                                                           json_values),
                  "extra": json_values},
    ).map(lambda v: json.dumps(v).encode()),
    st.integers(MAX_BODY - 50, MAX_BODY * 3).map(
        lambda n: json.dumps({"event": "big", "data": "x" * n}).encode()),
)


@FUZZ
@given(body=bodies, who=st.sampled_from([PUBLISHER, ADMIN, USER, None]))
def test_random_publish_bodies(target: Target, body: bytes, who: str | None) -> None:
    headers = {"Content-Type": "application/json"}
    if who:
        headers["Authorization"] = f"Bearer {who}"
    response = target.http.post("/api/publish", content=body, headers=headers)
    if who is None:
        json_answer(response, {401})
    elif who == USER:
        json_answer(response, {403})
    else:
        json_answer(response, {202, 400, 413, 422})
        if len(body) > MAX_BODY:
            assert response.status_code == 413
        if response.status_code == 422:
            assert response.json()["field"]
    target.canary()


def test_zz_healthy_client_got_every_canary(target: Target) -> None:
    """Runs last in the module: the healthy client saw every canary, and nothing crashed."""
    assert target.sent > 0
    target.check()
