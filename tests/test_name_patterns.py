"""A deployment's own name patterns (DUALCAST_ROOM_PATTERN, DUALCAST_EVENT_PATTERN).

A wider pattern is honoured everywhere a name is checked: joining, the publish
API, the stream decoder (so an XADD is delivered), polls and replays. Whatever
the pattern, the protocol's fixed limits hold: checked at start for the usual
too-wide patterns, and per name for the rest.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from dualcast.events import Malformed, MalformedEntry, NameRules, decode_entry, use_names
from dualcast.names import (
    EVENT_NAME_PATTERN,
    MAX_NAME_LENGTH,
    ROOM_NAME_PATTERN,
    Kind,
    NameRule,
    protocol_safe,
)
from tests.conftest import token
from tests.harness.clients import Transport, WSClient, subscribe
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.waits import wait_for

ROOMS = r"^[a-z0-9/-]{1,64}$"
EVENTS = r"^[a-z0-9/_]{1,64}$"
STREAM = f"names-{uuid.uuid4().hex}"
PUBLISHER = token("producer", publish=True)
MEMBER = token("u1", rooms=["team/a", "team/b"])


@pytest.fixture(scope="module")
def server(server_with: Callable[..., DualcastProcess]) -> DualcastProcess:
    return server_with({"DUALCAST_ROOM_PATTERN": ROOMS, "DUALCAST_EVENT_PATTERN": EVENTS,
                        "DUALCAST_STREAM": STREAM}, name="names")


def publish(server: DualcastProcess, body: dict[str, object]) -> httpx.Response:
    return httpx.post(server.url + "/api/publish", json=body, timeout=10,
                      headers={"Authorization": f"Bearer {PUBLISHER}"})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["ws", "sse", "poll"])
async def test_a_wider_pattern_gets_working_rooms(
    server: DualcastProcess, redis_server: RedisProcess, transport: Transport
) -> None:
    """Before, `team/a` could be joined but POST /api/publish answered 422 quoting the
    default pattern, and an XADD naming it was dropped by the decoder as malformed."""
    tag = uuid.uuid4().hex
    sub = await subscribe(transport, server.url, token=MEMBER, rooms="team/a")
    try:
        answer = publish(server, {"event": "build/done", "data": {"via": "api", "tag": tag},
                                  "rooms": ["team/a"]})
        assert answer.status_code == 202, answer.text
        redis_server.command("XADD", STREAM, "*", "data", json.dumps(
            {"event": "deploy", "data": {"via": "xadd", "tag": tag}, "rooms": ["team/a"]}))
        await wait_for(lambda: [e["data"].get("via") for e in sub.seen.events
                                if e["data"].get("tag") == tag] == ["api", "xadd"],
                       15, "both events in team/a")
        assert [e["event"] for e in sub.seen.events if e["data"].get("tag") == tag] == [
            "build/done", "deploy"]
    finally:
        await sub.close()
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'dualcast_malformed_entries_total{reason="bad_rooms"} 0.0' in metrics
    assert 'dualcast_malformed_entries_total{reason="bad_event"} 0.0' in metrics


@pytest.mark.timeout(60)
async def test_a_websocket_joins_a_room_of_the_wider_pattern(server: DualcastProcess) -> None:
    async with WSClient(server.ws_url, token=MEMBER, rooms="team/a") as ws:
        await ws.send({"type": "join", "room": "team/b"})
        await wait_for(lambda: any(f.get("type") == "joined" for f in ws.seen.frames), 10,
                       "joined")
        assert [f["room"] for f in ws.seen.frames if f.get("type") == "joined"] == ["team/b"]
        assert not ws.seen.errors


@pytest.mark.timeout(30)
def test_the_publish_api_refuses_with_the_configured_pattern(server: DualcastProcess) -> None:
    answer = publish(server, {"event": "deploy", "rooms": ["Team A"]})
    assert answer.status_code == 422
    assert ROOMS in answer.json()["message"]
    assert ROOM_NAME_PATTERN not in answer.json()["message"]


# The protocol's limits, whatever the pattern -------------------------------------------

@pytest.fixture
def restore_names() -> Iterator[None]:
    yield
    use_names(NameRules.of(EVENT_NAME_PATTERN, ROOM_NAME_PATTERN))


@pytest.mark.parametrize(("kind", "pattern", "unsafe"), [
    ("room", r"^(x|p,q)$", "p,q"),        # a comma would split `?rooms=`
    ("room", r"^(x|p q)$", "p q"),
    ("room", r"^(x|p\u2029q)$", "p\u2029q"),
    ("room", r"^(x|y{300})$", "y" * 300),
    ("event", r"^(x|p\nq)$", "p\nq"),     # a line break would split the SSE frame
    ("event", r"^(x|p\x0bq)$", "p\x0bq"),
])
def test_names_a_pattern_admits_still_keep_the_protocol_limits(
    kind: Kind, pattern: str, unsafe: str, restore_names: None
) -> None:
    """No probe at start catches these patterns; the per-name check still refuses."""
    rule = NameRule(kind, pattern)
    assert rule.accepts("x")
    assert not rule.accepts(unsafe)
    with pytest.raises(ValueError, match="does not match"):
        rule.check(unsafe)
    if kind == "room":
        use_names(NameRules.of(EVENT_NAME_PATTERN, pattern))
        body = {"event": "e", "rooms": [unsafe]}
        reason = Malformed.BAD_ROOMS
    else:
        use_names(NameRules.of(pattern, ROOM_NAME_PATTERN))
        body = {"event": unsafe}
        reason = Malformed.BAD_EVENT
    with pytest.raises(MalformedEntry) as info:
        decode_entry("1-0", {b"data": json.dumps(body).encode()})
    assert info.value.reason is reason


@pytest.mark.parametrize(("kind", "pattern"), [
    ("event", EVENT_NAME_PATTERN), ("room", ROOM_NAME_PATTERN),
])
def test_the_default_patterns_admit_only_protocol_safe_names(kind: Kind, pattern: str) -> None:
    """Their hot path skips the fixed check: every character they admit is safe."""
    rule = NameRule(kind, pattern)
    admitted = [chr(c) for c in range(0x110000) if rule.accepts(chr(c))]
    assert admitted and all(protocol_safe(kind, c) for c in admitted)
    assert rule.accepts("a" * 64) and not rule.accepts("a" * 65) and not rule.accepts("")
    assert 64 <= MAX_NAME_LENGTH
