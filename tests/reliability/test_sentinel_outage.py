"""Every Sentinel away while the primary stays up, then back.

dualcast keeps using the connections it holds to the primary while no Sentinel
answers. When it loses those too, it has no way to find the primary again: it must
say so at once (/readyz 503, a publish refused with a clear 503 that does not claim
the event may be in the stream, a long-poll answered 503 within its wait) and come
back by itself once the Sentinels return, every client ending with exactly the
stream's events, in order, none twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import token
from tests.harness.follow import one_of_each
from tests.harness.probes import log_problems, readyz
from tests.harness.procs import DualcastProcess
from tests.harness.redis_ha import SentinelSet
from tests.harness.stream import check_exact, stream_ids
from tests.harness.waits import wait_for
from tests.reliability.conftest import FAST

pytestmark = pytest.mark.timeout(90)


async def test_every_sentinel_away_is_survived_and_said_clearly(
    sentinels: SentinelSet, dualcast: Callable[..., DualcastProcess]
) -> None:
    dc = dualcast(sentinels.url, env=FAST)
    auth = {"Authorization": f"Bearer {token('app', publish=True)}"}
    async with httpx.AsyncClient(base_url=dc.url, timeout=10, headers=auth) as http:

        async def publish(n: int) -> list[str]:
            ids = []
            for i in range(n):
                answer = await http.post("/api/publish", json={"event": "e", "data": i})
                assert answer.status_code == 202, answer.text
                ids.append(answer.json()["id"])
            return ids

        start = (await publish(3))[-1]
        clients = await one_of_each(dc.port, token("c"), start)
        await publish(5)

        for sentinel in sentinels.sentinels:
            sentinel.stop(5)
        await publish(5)  # the connections held to the primary still serve

        # Every connection to the primary is cut: nothing can find it again for now.
        sentinels.primary.command("CLIENT", "KILL", "TYPE", "normal")

        async def unready() -> bool:
            return await readyz(dc) == 503

        await wait_for(unready, 10, what="/readyz 503 with no Sentinel to ask", interval=0.05)
        t0 = time.monotonic()
        refused = await http.post("/api/publish", json={"event": "e", "data": "nowhere"})
        took = time.monotonic() - t0
        assert refused.status_code == 503, refused.text
        assert "maybe_appended" not in refused.json(), refused.text  # it never went out
        assert took < 2, f"the publish took {took:.1f}s to be refused"
        t0 = time.monotonic()
        behind = await http.get("/api/events", params={"after": "0", "timeout": 1})
        took = time.monotonic() - t0
        assert behind.status_code == 503, behind.text
        assert took < 3, f"a long-poll of 1 s was answered after {took:.1f}s"

        for sentinel in sentinels.sentinels:
            await asyncio.to_thread(sentinel.start)

        async def ready() -> bool:
            return await readyz(dc) == 200

        await wait_for(ready, 15, what="/readyz 200 once the Sentinels are back", interval=0.05)
        await publish(5)
        expected = await stream_ids(sentinels.primary.url, after=start)
        await wait_for(lambda: all(c.ids[-1:] == expected[-1:] for c in clients), 15,
                       what="every client to reach the head")
        for client in clients:
            problem = check_exact(client.ids, expected)
            assert problem is None, f"{client.kind} client: {problem}"
        for follower in clients[:2]:  # the WebSocket and the SSE stream were never cut
            assert follower.record.closes == [], follower.record.closes
        await asyncio.gather(*(c.stop() for c in clients))
    assert log_problems(dc) == []
