"""A Redis Cluster away and back, and a connection cut under an append.

Every node is frozen (SIGSTOP: connections stay open, replies never come), then
killed and restarted on its ports with its data (AOF). dualcast must say it is
unready and refuse publishes with a clear 503 while the cluster is away, then come
back without a restart: /readyz 200, the first publish 202 (no pooled connection of
before the outage may fail it; nor may it fail the Python publisher's), and every WebSocket, SSE and long-poll client ends
with exactly the stream's events, in order, none twice.

Then the node holding the stream is reached through a TCP proxy of ours (its
announced port) that cuts the connection after an XADD went out: the answer must say
the event may have been appended, and the event must be in the stream once, never
appended a second time behind the producer's back.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from dualcast.publisher import Outcome, Publisher
from tests.conftest import token
from tests.harness.follow import one_of_each
from tests.harness.probes import log_problems, readyz
from tests.harness.procs import DualcastProcess
from tests.harness.redis_ha import ClusterSet
from tests.harness.stream import STREAM, check_exact, stream_ids
from tests.harness.tcpproxy import TCPProxy
from tests.harness.tools import require_tool
from tests.harness.waits import wait_for
from tests.reliability.conftest import FAST

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterSet]:
    require_tool("redis-cli", "the Cluster outage test builds the cluster with it")
    ha = ClusterSet(tmp_path / "cluster", appendonly=True)
    try:
        yield ha.start()
    finally:
        for node in ha.nodes:
            node.signal(signal.SIGCONT)
        ha.stop()


async def test_cluster_outage_and_a_cut_append(
    cluster: ClusterSet, dualcast: Callable[..., DualcastProcess]
) -> None:
    owner = await asyncio.to_thread(cluster.owner, STREAM)
    assert owner is not None
    dc = dualcast(cluster.url, env=FAST)
    auth = {"Authorization": f"Bearer {token('app', publish=True)}"}
    async with httpx.AsyncClient(base_url=dc.url, timeout=10, headers=auth) as http:

        async def publish(n: int, event: str = "e") -> list[str]:
            ids = []
            for i in range(n):
                answer = await http.post("/api/publish", json={"event": event, "data": i})
                assert answer.status_code == 202, answer.text
                ids.append(answer.json()["id"])
            return ids

        async def readiness(code: int, what: str) -> None:
            async def hit() -> bool:
                return await readyz(dc) == code
            await wait_for(hit, 30, what=what, interval=0.05)

        # dualcast's own Python publisher too, its pooled connections made before the outages
        producer = Publisher(cluster.url, stream=STREAM, timeout=1)
        assert (await producer.publish_result("lib", 0)).outcome is Outcome.PUBLISHED
        start = (await publish(3))[-1]
        clients = await one_of_each(dc.port, token("c"), start)
        await publish(5)

        for phase in ("frozen", "restarted"):
            for node in cluster.nodes:
                if phase == "frozen":
                    node.signal(signal.SIGSTOP)
                else:
                    node.kill()
            await readiness(503, f"/readyz 503 with the cluster {phase}")
            away = await http.post("/api/publish", json={"event": "away"})
            assert away.status_code == 503, away.text
            assert away.json()["error"] == "log_unavailable", away.text
            for node in cluster.nodes:
                if phase == "frozen":
                    node.signal(signal.SIGCONT)
                else:
                    await asyncio.to_thread(node.start)
            await wait_for(lambda: asyncio.to_thread(cluster.healthy), 30,
                           what=f"the {phase} cluster to be whole again")
            await readiness(200, f"/readyz 200 once the {phase} cluster is back")
            await publish(5)  # the first one included: no dead pooled connection fails it
            result = await producer.publish_result("lib", phase)
            assert result.outcome is Outcome.PUBLISHED, result

        # the stream's node, reached through our proxy from now on
        with TCPProxy(owner) as proxy:
            node = redis.Redis(port=owner)
            node.config_set("cluster-announce-port", proxy.port)

            def announced() -> bool:
                for other in cluster.nodes:
                    with redis.Redis(port=other.port) as client:
                        if not any(int(s[2][1]) == proxy.port for s in client.cluster("SLOTS")):
                            return False
                return True

            await wait_for(lambda: asyncio.to_thread(announced), 15,
                           what="every node to name the proxy for the stream's slot")
            # dualcast reads the slot map again after an error: cut its connections once
            node.client_kill_filter(_type="normal", skipme=True)

            async def through_proxy() -> bool:
                answer = await http.post("/api/publish", json={"event": "via-proxy"})
                return answer.status_code == 202 and proxy.accepted >= 2  # reader and writer

            await wait_for(through_proxy, 15, what="publishes through the proxy", interval=0.1)
            before = node.xlen(STREAM)
            proxy.delay_replies(30)
            cut = asyncio.create_task(http.post("/api/publish", json={"event": "cut"}))
            await wait_for(lambda: node.xlen(STREAM) > before, 5, what="the XADD to arrive")
            proxy.drop()  # the connection is reset under the XADD
            proxy.delay_replies(0)
            answer = await asyncio.wait_for(cut, 10)
            node.config_set("cluster-announce-port", owner)
        cuts = [entry_id for entry_id, fields in node.xrange(STREAM)
                if json.loads(fields[b"data"])["event"] == "cut"]
        node.close()
        assert len(cuts) == 1, f"the cut XADD was appended {len(cuts)} times ({answer.text})"
        assert answer.status_code == 503 and answer.json().get("maybe_appended"), answer.text

        expected = await stream_ids(f"redis://127.0.0.1:{owner}/0", after=start)
        await wait_for(lambda: all(c.ids[-1:] == expected[-1:] for c in clients), 20,
                       what="every client to reach the head")
        for client in clients:
            problem = check_exact(client.ids, expected)
            assert problem is None, f"{client.kind} client: {problem}"
        await asyncio.gather(*(c.stop() for c in clients))
        await producer.aclose()
    assert log_problems(dc) == []
