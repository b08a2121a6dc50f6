"""The whole bench path against real servers: fresh redis + server, workers, publisher.

Small counts: this checks that every target delivers every event to every client
through the lean clients (and that the broadcaster workaround works), not speed.
"""

from __future__ import annotations

import pytest

from bench import modes
from bench.clients import client_path
from bench.runner import Session, mint

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("kind", ["socketio-ws", "broadcaster-ws", "broadcaster-sse",
                                  "dualcast-ws", "dualcast-sse", "dualcast-poll"])
async def test_every_target_delivers_every_event(kind: str) -> None:
    async with Session(kind, modes.public_paths(kind, 20), workers=2) as s:
        assert s.info["connected"] == 20
        assert await s.warm_up()
        r = await s.step(rate=50, duration=1.0, drain=10)
    assert r["sent"] == 50
    assert r["deliveries"] == 20 * 50
    assert (r["lost"], r["duplicated"], r["out_of_order"], r["closed"]) == (0, 0, 0, 0)
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] + 0.05
    assert r["rss_per_conn_kb"] is not None


async def test_room_events_reach_only_that_room() -> None:
    subs = [str(i % 4) for i in range(16)]
    paths = [client_path("dualcast-ws", mint(sub), f"user-{sub}") for sub in subs]
    receivers = [[j for j, gi in enumerate(range(w, 16, 2)) if subs[gi] == "1"] for w in range(2)]
    async with Session("dualcast-ws", paths, workers=2) as s:
        assert s.info["connected"] == 16
        assert await s.warm_up(rooms=["user-1"], need=4)
        r = await s.step(rate=50, duration=1.0, rooms=["user-1"], receivers=receivers)
    assert r["deliveries"] == 4 * 50
    assert (r["lost"], r["misrouted"]) == (0, 0)
