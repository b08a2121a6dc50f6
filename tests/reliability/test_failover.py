"""Redis failovers with real processes: Sentinel and Cluster promote a replica under load,
and TLS carries the whole path.

The primary is SIGKILLed while dualcast's own Python publisher appends ~100 events/s
through the same URL dualcast reads. dualcast must follow the new primary without a
restart, `/readyz` must dip and come back, and every WebSocket, SSE and long-poll
client must end with exactly the events of the surviving stream (XRANGE on the new
primary), in order, none twice. Events the dead primary acknowledged but never
replicated are gone; a client that saw one is told `reset` when its cursor is ahead
of the new head, never left silent. Each test prints the seconds from the kill to
the first event delivered from the new primary (docs/reliability.md quotes them).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import redis.asyncio as aioredis

from dualcast.publisher import Outcome, Publisher, PublishResult, SyncPublisher
from tests.conftest import token
from tests.harness.follow import Follower, start_followers
from tests.harness.probes import log_problems, readyz
from tests.harness.procs import DualcastProcess, RedisProcess, clean_env, free_port
from tests.harness.redis_ha import ClusterSet, SentinelSet
from tests.harness.stream import STREAM, check_exact, id_key
from tests.harness.tls import make_throwaway_ca
from tests.harness.tools import require_tool
from tests.harness.waits import cancel, wait_for
from tests.reliability.conftest import FAST

pytestmark = pytest.mark.timeout(90)

RATE = 100  # events/s, through dualcast's publisher
T = TypeVar("T")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterSet]:
    require_tool("redis-cli", "the Cluster failover test builds the cluster with it")
    ha = ClusterSet(tmp_path / "cluster")
    try:
        yield ha.start()
    finally:
        ha.stop()


@dataclass
class Load:
    """dualcast's own publisher appending at RATE through the HA URL, and what it was told."""

    url: str
    acked: list[str] = field(default_factory=list)
    misses: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with Publisher(self.url, stream=STREAM, timeout=0.5, cooldown=0.1,
                             cooldown_max=0.5) as pub:
            seq = 0
            next_at = time.monotonic()
            while not self._stop.is_set():
                entry_id = await pub.publish("ha", {"seq": seq})
                seq += 1
                if entry_id is None:
                    self.misses += 1
                else:
                    self.acked.append(entry_id)
                next_at += 1 / RATE
                try:  # pace the load; the stop event ends the wait early
                    await asyncio.wait_for(self._stop.wait(), max(0.0, next_at - time.monotonic()))
                except TimeoutError:
                    pass
                next_at = max(next_at, time.monotonic() - 0.1)

    def start(self) -> Load:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)


class ReadySampler:
    """/readyz every 50 ms: the codes seen after `mark()` tell whether it dipped."""

    def __init__(self, dc: DualcastProcess) -> None:
        self.dc = dc
        self.codes: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.codes.append((time.monotonic(), await readyz(self.dc)))
            await asyncio.sleep(0.05)

    def start(self) -> ReadySampler:
        self._task = asyncio.create_task(self._run())
        return self

    def since(self, t: float) -> list[int]:
        return [code for at, code in self.codes if at >= t]

    async def stop(self) -> None:
        await cancel(self._task)


async def _clients(dc: DualcastProcess) -> dict[Follower, str]:
    """Two WebSocket, two SSE and two long-poll clients, each with the id it starts after."""
    tok = token("ha")
    followers = [Follower(kind, "127.0.0.1", dc.port, token=tok)
                 for kind in ("ws", "sse") for _ in range(2)]
    await start_followers(followers)
    starts = {f: f.record.first_welcome for f in followers}
    head = followers[0].record.last_id
    assert head is not None
    for _ in range(2):
        starts[Follower("poll", "127.0.0.1", dc.port, token=tok, last_id=head,
                        poll_wait=2).start()] = head
    return {f: start for f, start in starts.items() if start is not None}


async def _off_loop(probe: Callable[[], T]) -> T:
    """A blocking probe of the Redis processes, run where it cannot stall the clients."""
    return await asyncio.to_thread(probe)


async def _surviving(port: int, after: str) -> list[str]:
    """XRANGE on the new primary after `after`: the ground truth."""
    client = aioredis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    try:
        entries = await client.xrange(STREAM, min=f"({after}", max="+")
        return [str(entry_id) for entry_id, _ in entries]
    finally:
        await client.aclose()


def _check(clients: dict[Follower, str], stream: list[str]) -> tuple[int, int]:
    """Every client saw the surviving stream after its start exactly; (events seen that did
    not survive, resets). A seen event that did not survive must be followed by a reset or
    by later ids: never by silence."""
    keep = set(stream)
    phantoms = resets = 0
    for client, start in clients.items():
        expected = [i for i in stream if id_key(i) > id_key(start)]
        seen = client.ids
        assert len(seen) == len(set(seen)), f"{client.kind}: an event arrived twice"
        problem = check_exact([i for i in seen if i in keep], expected)
        assert problem is None, f"{client.kind} client: {problem}"
        lost = [i for i in seen if i not in keep]
        phantoms += len(lost)
        resets += len(client.record.resets)
        if lost:
            after = seen[seen.index(lost[-1]) + 1:]
            assert client.record.resets or after, (
                f"{client.kind}: saw {len(lost)} events lost in the promotion and then nothing")
    return phantoms, resets


async def _failover(dc: DualcastProcess, load: Load, kill: Callable[[], None],
                    new_primary: Callable[[], int | None], label: str) -> None:
    sampler = ReadySampler(dc).start()
    try:
        await wait_for(lambda: len(load.acked) >= 50, 15, what="events before the clients")
        starts = await _clients(dc)
        clients = list(starts)
        start = min(starts.values(), key=id_key)
        n = len(load.acked)
        await wait_for(lambda: len(load.acked) >= n + 200, 15, what="200 events before the kill")

        kill()
        t_kill = time.monotonic()
        seen_ids = [i for c in clients for i in c.ids]
        cut = max(id_key(i) for i in [*load.acked, *seen_ids])

        def from_new_primary() -> bool:
            return any(id_key(c.ids[-1]) > cut for c in clients[:4] if c.ids)

        await wait_for(from_new_primary, 40, what="an event from the new primary", interval=0.005)
        first = time.monotonic() - t_kill
        port = await wait_for(lambda: _off_loop(new_primary), 20, what="the new primary")
        await wait_for(lambda: sampler.since(t_kill)[-1:] == [200], 20,
                       what="/readyz 200 again")
        n = len(load.acked)
        await wait_for(lambda: len(load.acked) >= n + 200, 20, what="200 events after failover")
        await load.stop()

        expected = await _surviving(port, start)
        survived = set(expected)
        lost = [i for i in load.acked if id_key(i) > id_key(start) and i not in survived]
        await wait_for(lambda: all(c.ids and c.ids[-1] == expected[-1] for c in clients), 30,
                       what=f"every client to reach {expected[-1]}")
        phantoms, resets = _check(starts, expected)
        codes = sampler.since(t_kill)
        assert 503 in codes, f"/readyz never dipped after the kill: {sorted(set(codes))}"
        closes = sum(len(c.record.closes) for c in clients)
        print(f"\n{label} failover: first event from the new primary {first:.2f}s after the kill; "
              f"{len(expected)} events, {len(clients)} clients, {len(lost)} acknowledged events "
              f"lost in the promotion, {phantoms} seen-then-lost, {resets} resets, "
              f"{closes} reconnects, publisher misses {load.misses}")
        await asyncio.gather(*(c.stop() for c in clients))
        assert log_problems(dc) == []
    finally:
        await sampler.stop()
        await load.stop()


async def test_sentinel_failover_is_followed_without_restart(
    sentinels: SentinelSet, dualcast: Callable[..., DualcastProcess]
) -> None:
    dc = dualcast(sentinels.url, env=FAST)
    load = Load(sentinels.url).start()
    replica = sentinels.replica.port

    def promoted() -> int | None:
        port = sentinels.primary_port()
        return port if port == replica else None

    def sync_publish(wait_replicas: int) -> PublishResult:
        with SyncPublisher(sentinels.url, stream=STREAM, wait_replicas=wait_replicas,
                           wait_timeout_ms=2000, cooldown=0.1, cooldown_max=0.5) as pub:
            return pub.publish_result("sync", wait_replicas)

    # the blocking publisher (its own Sentinel pool) writes and waits for the replica
    before = await asyncio.to_thread(sync_publish, 1)
    assert (before.outcome, before.replicas) == (Outcome.PUBLISHED, 1), before
    await _failover(dc, load, sentinels.primary.kill, promoted, "Sentinel")
    after = await asyncio.to_thread(sync_publish, 0)  # and finds the new primary
    assert after.outcome is Outcome.PUBLISHED, after
    assert after.id in await _surviving(replica, "0-0")


async def test_cluster_failover_of_the_streams_slot_is_followed(
    cluster: ClusterSet, dualcast: Callable[..., DualcastProcess]
) -> None:
    owner = await asyncio.to_thread(cluster.owner, STREAM)
    assert owner is not None
    replica = await asyncio.to_thread(cluster.replica_of, owner)
    dc = dualcast(cluster.url, env=FAST)
    load = Load(cluster.url).start()

    def promoted() -> int | None:
        port = cluster.owner(STREAM)
        return port if port == replica else None

    await _failover(dc, load, cluster.node(owner).kill, promoted, "Cluster")
    # the publish API appends through the cluster client too, to the new primary
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.post(f"{dc.url}/api/publish", json={"event": "api", "data": 1},
                                 headers={"Authorization": f"Bearer {token('app', publish=True)}"})
    assert answer.status_code == 202, answer.text
    assert answer.json()["id"] in await _surviving(replica, "0-0")


@pytest.fixture
def lossy_sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    require_tool("redis-server", "the Sentinel failover test runs it as primary, replica and "
                 "Sentinel")
    ha = SentinelSet(tmp_path / "sentinel", link=True)
    try:
        yield ha.start()
    finally:
        ha.stop()


async def _publish(pub: Publisher, n: int, within: float = 20) -> list[str]:
    """`n` events acknowledged by whatever primary the publisher reaches now."""
    acked: list[str] = []
    deadline = time.monotonic() + within
    while len(acked) < n:
        assert time.monotonic() < deadline, f"only {len(acked)} of {n} events acknowledged"
        entry_id = await pub.publish("ha", {"n": len(acked)})
        if entry_id is None:
            await asyncio.sleep(0.05)  # the breaker is open: Redis is being probed
        else:
            acked.append(entry_id)
    return acked


async def _lossy_promotion(dc: DualcastProcess, url: str, cut_off: Callable[[], Awaitable[None]],
                           kill: Callable[[], None], promoted: Callable[[], bool],
                           new_primary: int, label: str) -> None:
    """Clients follow the stream; `cut_off` stops replication, so the next 20 events exist
    on the primary alone; `kill` kills the primary and the replica is promoted without
    them: every client saw them, is told `reset`, then gets the new primary's stream."""
    async with Publisher(url, stream=STREAM, timeout=0.5, cooldown=0.1,
                         cooldown_max=0.5) as pub:
        await _publish(pub, 20)
        starts = await _clients(dc)
        clients = list(starts)
        await _publish(pub, 50)
        await cut_off()
        doomed = await _publish(pub, 20)
        await wait_for(lambda: all(doomed[-1] in c.ids for c in clients), 15,
                       what="every client to see the events only the primary has")
        kill()
        t_kill = time.monotonic()
        await wait_for(lambda: _off_loop(promoted), 30, what="the replica to be promoted")
        await wait_for(lambda: all(c.record.resets for c in clients), 30,
                       what="every client to be told reset (its cursor is past the new head)")
        t_reset = time.monotonic() - t_kill
        after = await _publish(pub, 50)
    await wait_for(lambda: all(after[-1] in c.ids for c in clients), 20,
                   what="every client to receive the events after the promotion")
    expected = await _surviving(new_primary, min(starts.values(), key=id_key))
    assert not set(doomed) & set(expected), "the cut-off writes reached the replica after all"
    phantoms, resets = _check(starts, expected)
    for client in clients:
        assert [i for i in client.ids if i in set(doomed)] == doomed, client.kind
    print(f"\n{label} promotion with {len(doomed)} unreplicated events: every client told "
          f"reset {t_reset:.2f}s after the kill ({resets} resets, {phantoms} seen-then-lost)")
    await asyncio.gather(*(c.stop() for c in clients))
    assert log_problems(dc) == []


async def test_events_lost_in_a_promotion_show_as_reset_never_silence(
    lossy_sentinels: SentinelSet, dualcast: Callable[..., DualcastProcess]
) -> None:
    ha = lossy_sentinels
    link = ha.link
    assert link is not None

    async def cut_off() -> None:
        link.stall()  # the replica hears nothing more

    await _lossy_promotion(dualcast(ha.url, env=FAST), ha.url, cut_off, ha.primary.kill,
                           lambda: ha.primary_port() == ha.replica.port, ha.replica.port,
                           "Sentinel")


async def test_events_lost_in_a_cluster_promotion_show_as_reset_never_silence(
    cluster: ClusterSet, dualcast: Callable[..., DualcastProcess]
) -> None:
    """The Cluster case of the test above: the replica of the stream's slot is frozen
    (SIGSTOP) and cut off, so the events after it exist on the primary alone; the primary
    is killed and the replica, thawed, is promoted without them."""
    owner = await asyncio.to_thread(cluster.owner, STREAM)
    assert owner is not None
    primary = cluster.node(owner)
    replica_port = await asyncio.to_thread(cluster.replica_of, owner)
    replica = cluster.node(replica_port)
    # its data will be seconds old when it is elected: let it stand all the same
    await asyncio.to_thread(replica.command, "CONFIG", "SET",
                            "cluster-replica-validity-factor", "0")

    async def cut_off() -> None:
        synced = await asyncio.to_thread(primary.command, "WAIT", "1", "5000")
        assert synced == b":1\r\n", f"the replica did not confirm the writes: {synced!r}"
        # Frozen, and its link cut on the primary's side: a frozen process's kernel would
        # still take in the writes that follow and hand them over once it is thawed.
        replica.signal(signal.SIGSTOP)
        cut = await asyncio.to_thread(primary.command, "CLIENT", "KILL", "TYPE", "replica")
        assert cut == b":1\r\n", f"the replica's link was not cut: {cut!r}"

    def kill() -> None:
        primary.kill()
        replica.signal(signal.SIGCONT)

    try:
        await _lossy_promotion(dualcast(cluster.url, env=FAST), cluster.url, cut_off, kill,
                               lambda: cluster.owner(STREAM) == replica_port, replica_port,
                               "Cluster")
    finally:
        replica.signal(signal.SIGCONT)


def _client_cert(folder: Path, ca: Path, ca_key: Path) -> tuple[Path, Path]:
    """A client certificate the throwaway CA signs (Redis asks for one: tls-auth-clients)."""
    key, csr, cert, ext = (folder / n for n in ("client.key", "client.csr", "client.pem",
                                                "client.ext"))
    ext.write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    for args in (
        ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(csr), "-subj", "/CN=dualcast test client"],
        ["x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext)],
    ):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)
    return cert, key


async def test_tls_redis_connects_publishes_and_delivers(
    tmp_path: Path, dualcast: Callable[..., DualcastProcess]
) -> None:
    require_tool("openssl", "the TLS test makes a throwaway CA with it")
    files = make_throwaway_ca(tmp_path / "pki")
    cert, key = _client_cert(tmp_path / "pki", files.ca, tmp_path / "pki" / "ca.key")
    tls_port = free_port()
    password = "s3cret-tls-pass"
    redis_tls = RedisProcess(tmp_path / "redis", args=[
        "--tls-port", str(tls_port), "--tls-cert-file", str(files.cert),
        "--tls-key-file", str(files.key), "--tls-ca-cert-file", str(files.ca),
        "--tls-auth-clients", "yes",
    ])
    try:
        redis_tls.start()
    except Exception:  # a redis-server built without TLS refuses --tls-port at start
        log = redis_tls.log() + (tmp_path / "redis" / "redis.log").read_text(errors="replace")
        message = f"this redis-server has no TLS support: {log[-500:]}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        redis_tls.command("CONFIG", "SET", "requirepass", password)
        url = f"rediss://:{password}@127.0.0.1:{tls_port}/0"
        env = {"DUALCAST_REDIS_TLS_CA": str(files.ca), "DUALCAST_REDIS_TLS_CERT": str(cert),
               "DUALCAST_REDIS_TLS_KEY": str(key)}
        dc = dualcast(url, env={**FAST, **env})
        await wait_for(dc.ready, 15, what="dualcast ready over TLS")
        follower = Follower("ws", "127.0.0.1", dc.port, token=token("tls"))
        await start_followers([follower])

        def publish(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "dualcast", "publish", "over-tls", '{"ok": true}'],
                env=clean_env({"DUALCAST_REDIS_URL": url, "DUALCAST_REDIS_TIMEOUT": "2",
                               **extra}), capture_output=True, text=True, timeout=60)

        done = await asyncio.to_thread(publish, env)
        assert done.returncode == 0, done.stderr
        entry_id = done.stdout.strip()
        await wait_for(lambda: entry_id in follower.ids, 10, what="the event over TLS")
        # Without the client certificate the server refuses the handshake: TLS is really
        # in use, and the error names the address but never the password.
        refused = await asyncio.to_thread(publish, {"DUALCAST_REDIS_TLS_CA": str(files.ca)})
        assert refused.returncode != 0
        assert password not in refused.stderr + refused.stdout
        assert f"127.0.0.1:{tls_port}" in refused.stderr
        await follower.stop()
        assert password not in dc.log()
        assert log_problems(dc) == []
    finally:
        redis_tls.stop()
