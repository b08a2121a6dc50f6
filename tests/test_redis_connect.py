"""The URL forms DUALCAST_REDIS_URL accepts, and that no message ever repeats a password.

(The clients themselves are exercised against real Sentinels, a real Cluster and a
real TLS Redis in tests/reliability/test_failover.py.)
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster

from dualcast.config import SettingsError, load_settings
from dualcast.publisher import Publisher
from dualcast.publisher.results import describe
from dualcast.redis_connect import (
    URL_OPTIONS,
    BadRedisUrl,
    Pooling,
    Topology,
    async_client,
    parse_redis_url,
    redact,
    sync_client,
)
from tests.harness.clients import subscribe
from tests.harness.procs import DualcastProcess, RedisProcess, clean_env, free_port
from tests.harness.waits import wait_for

PASSWORD = "hunter2-very-secret"


@pytest.mark.parametrize(("url", "topology", "tls", "nodes", "service", "db"), [
    ("redis://127.0.0.1:6379/0", Topology.STANDALONE, False, (), "", 0),
    ("rediss://h:6380/2", Topology.STANDALONE, True, (), "", 0),
    ("unix:///run/redis.sock?db=1", Topology.STANDALONE, False, (), "", 0),
    (f"redis+sentinel://u:{PASSWORD}@a:26379,b:26380,[::1]:26381/mymaster/3",
     Topology.SENTINEL, False, (("a", 26379), ("b", 26380), ("::1", 26381)), "mymaster", 3),
    ("redis+sentinel://a,b/svc", Topology.SENTINEL, False, (("a", 26379), ("b", 26379)),
     "svc", 0),
    ("rediss+sentinel://a:1/svc", Topology.SENTINEL, True, (("a", 1),), "svc", 0),
    ("redis+cluster://a:7000,b:7001", Topology.CLUSTER, False, (("a", 7000), ("b", 7001)), "", 0),
    ("rediss+cluster://a:7000/0", Topology.CLUSTER, True, (("a", 7000),), "", 0),
])
def test_url_forms(url: str, topology: Topology, tls: bool,
                   nodes: tuple[tuple[str, int], ...], service: str, db: int) -> None:
    target = parse_redis_url(url)
    assert (target.topology, target.tls, target.nodes, target.service, target.db) == (
        topology, tls, nodes, service, db)
    assert PASSWORD not in repr(target)
    assert PASSWORD not in target.where


def test_sentinel_credentials_are_the_data_nodes() -> None:
    target = parse_redis_url(f"redis+sentinel://app:{PASSWORD}@a:1/svc")
    assert (target.username, target.password) == ("app", PASSWORD)
    assert target.where == "redis+sentinel://app:***@a:1/svc"


@pytest.mark.parametrize("url", [
    f"http://u:{PASSWORD}@h:1/0",
    f"redis+sentinel://u:{PASSWORD}@a:1",  # no service
    f"redis+sentinel://u:{PASSWORD}@a:x/svc",
    f"redis+cluster://u:{PASSWORD}@a:1/3",  # a cluster has database 0 only
    f"redis+cluster://u:{PASSWORD}@/",
    f"redis+cluster://u:{PASSWORD}@a:1?password={PASSWORD}",
    f"redis://u:{PASSWORD}@h:notaport/0",
    f"redis://u:{PASSWORD}/x@h:1/0",  # an unencoded "/" ends the host part in the password
    f"redis://:{PASSWORD}?x@h:1/0?bogus=1",
    f"redis://u:{PASSWORD}@h:1/x?socket_keepalive=maybe",
    f"unix://u:{PASSWORD}@/run/r.sock?ssl_certfile=x",
])
def test_bad_urls_never_repeat_the_password(url: str) -> None:
    with pytest.raises(BadRedisUrl) as caught:
        parse_redis_url(url)
    assert PASSWORD not in str(caught.value)
    with pytest.raises(SettingsError) as setting:
        load_settings(redis_url=url)
    assert PASSWORD not in str(setting.value)
    assert "DUALCAST_REDIS_URL" in str(setting.value)


def test_redact_masks_userinfo_and_query_password() -> None:
    assert redact(f"redis://:{PASSWORD}@h:1/0") == "redis://:***@h:1/0"
    assert redact(f"redis://{PASSWORD}@h:1/0") == "redis://***@h:1/0"
    assert redact(f"redis://h:1/0?password={PASSWORD}&db=1") == "redis://h:1/0?password=***&db=1"
    assert redact(f"redis://u:{PASSWORD}/x@h:1/0") == "redis://u:***@h:1/0"


@pytest.mark.parametrize(("url", "reason"), [
    (f"redis://:{PASSWORD}@127.0.0.1:63790x/0",
     "Port could not be cast to integer value as '63790x'"),
    ("redis://127.0.0.1:99999/0", "Port out of range 0-65535"),
    ("redis://127.0.0.1:0/0", "port 0 is no port"),
    ("unix:///run/redis.sock?db=one", "Invalid value for 'db' in connection URL."),
    ("redis://h:1/0?socket_timeout=3s", "Invalid value for 'socket_timeout' in connection URL."),
    ("unix://", "name the socket: unix:///path/to/redis.sock"),
    ("unix://redis.sock", "name the socket: unix:///path/to/redis.sock"),  # a host, no path
    ("redis://h:1/abc", "the database must be a number, not 'abc'"),
    # str.isdigit() took these: redis-py then used database 0 for the superscript two,
    # and database 1 for an Arabic-Indic one
    ("redis://h:1/%C2%B2", "the database must be a number, not '%C2%B2'"),
    ("redis://h:1/\u00b2", "the database must be a number, not '\u00b2'"),
    ("redis://h:1/%D9%A1", "the database must be a number, not '%D9%A1'"),
    ("redis+sentinel://h:1/svc/%D9%A1", "the database must be a number"),
    ("redis://h:1/0/1", "too many path parts"),
    (f"redis://u:{PASSWORD}/x@h:1/0", "Port could not be cast to integer value as '***'"),
])
def test_a_bad_url_says_why(url: str, reason: str) -> None:
    """The reason redis-py (or dualcast) gives, after the URL with its password masked."""
    with pytest.raises(BadRedisUrl) as caught:
        parse_redis_url(url)
    assert str(caught.value) == f"{redact(url)}: {reason}"
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(("url", "reason"), [
    ("unix:///run/r.sock?socket_keepalive=true",
     "option 'socket_keepalive' does not apply to unix:// (only to redis://, rediss://)"),
    ("redis://h:1/0?ssl_cert_reqs=none",
     "option 'ssl_cert_reqs' does not apply to redis:// (only to rediss://)"),
    ("redis://h:1/0?bogus=1", "unknown option 'bogus'"),
    ("redis://h:1/0?socket_timout=1", "unknown option 'socket_timout' (did you mean 'socket_timeout'?)"),
    ("redis://h:1/0?timeout=5", "option 'timeout' is not supported: the wait for a free connection "
                                "is DUALCAST_REDIS_TIMEOUT; socket_timeout is the wait for a reply"),
    ("rediss://h:1/0?max_connections=2",
     "option 'max_connections' is not supported: dualcast sizes its connection pools itself"),
    ("redis://h:1/0?decode_responses=yes",
     "option 'decode_responses' is not supported: dualcast decodes replies itself"),
    ("redis://h:1/0?connection_class=x", "unknown option 'connection_class'"),
])
def test_a_query_option_the_connection_would_refuse_is_refused_at_once(url: str,
                                                                       reason: str) -> None:
    """redis-py's parser takes any name and passes it to the connection class, which then
    raises a TypeError on every connect: refused here, naming the option, before anything
    starts (the settings, the publisher and `dualcast serve` alike)."""
    with pytest.raises(BadRedisUrl, match=re.escape(f"{url}: {reason}")):
        parse_redis_url(url)
    with pytest.raises(SettingsError, match=re.escape(reason)):
        load_settings(redis_url=url)
    with pytest.raises(ValueError, match=re.escape(reason)):
        Publisher(url)


def test_serve_refuses_a_query_option_in_one_line() -> None:
    url = "unix:///run/dualcast-test.sock?socket_keepalive=true"
    done = subprocess.run(
        [sys.executable, "-m", "dualcast", "serve", "--port", "0", "--redis-url", url],
        env=clean_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"dualcast: bad --redis-url: {url}: option 'socket_keepalive' does not apply to unix:// "
        "(only to redis://, rediss://)"]


async def test_the_query_options_a_scheme_takes_reach_its_connections(
    redis_server: RedisProcess,
) -> None:
    url = (f"{redis_server.url}?socket_keepalive=true&socket_timeout=4&health_check_interval=5"
           "&client_name=from-the-url&retry_on_timeout=false")
    client = async_client(parse_redis_url(url), pooling=Pooling(4, wait=1.0))
    try:
        assert await client.client_getname() == "from-the-url"
    finally:
        await client.aclose()
    async with Publisher(url, stream="options-stream", timeout=5.0) as pub:
        assert await pub.publish("with-options", 1) is not None
    assert URL_OPTIONS["rediss"] > URL_OPTIONS["redis"] > URL_OPTIONS["unix"]


def test_tls_files_need_a_tls_url_and_exist(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    with pytest.raises(SettingsError, match="DUALCAST_REDIS_TLS_CA: TLS files need a rediss"):
        load_settings(redis_url="redis://h:1/0", redis_tls_ca=str(ca))
    # the variable that was set is named, not _CA for a client certificate and key alone
    with pytest.raises(SettingsError, match="DUALCAST_REDIS_TLS_CERT: TLS files need a rediss"):
        load_settings(redis_url="redis://h:1/0", redis_tls_cert=str(ca), redis_tls_key=str(ca))
    with pytest.raises(SettingsError, match="DUALCAST_REDIS_TLS_KEY: TLS files need a rediss"):
        load_settings(redis_tls_key=str(ca))
    with pytest.raises(SettingsError, match="DUALCAST_REDIS_TLS_CA: no such file"):
        load_settings(redis_url="rediss://h:1/0", redis_tls_ca=str(tmp_path / "missing.pem"))
    with pytest.raises(SettingsError, match="DUALCAST_REDIS_TLS_CERT"):
        load_settings(redis_url="rediss://h:1/0", redis_tls_cert=str(ca))
    settings = load_settings(redis_url="rediss+cluster://h:1", redis_tls_ca=str(ca))
    assert settings.redis_tls.kwargs()["ssl_ca_certs"] == str(ca)


async def test_clients_of_each_topology(redis_server: RedisProcess) -> None:
    plain = async_client(parse_redis_url(redis_server.url), pooling=Pooling(4, wait=1.0))
    assert isinstance(plain, aioredis.Redis)
    assert await plain.ping()
    await plain.aclose()
    single = async_client(parse_redis_url(redis_server.url), pooling=Pooling(single=True))
    assert await single.ping()
    await single.aclose()
    cluster = async_client(parse_redis_url("redis+cluster://127.0.0.1:1"))
    assert isinstance(cluster, aiocluster.RedisCluster)
    await cluster.aclose()


def test_wait_replicas_is_refused_on_a_cluster() -> None:
    """WAIT would run on other connections than the XADD's and claim replicas it never saw."""
    with pytest.raises(ValueError, match="Redis Cluster"):
        Publisher("redis+cluster://127.0.0.1:1", wait_replicas=1)
    Publisher("redis+cluster://127.0.0.1:1")  # without WAIT a cluster is fine
    done = subprocess.run(
        [sys.executable, "-m", "dualcast", "publish", "ev", "{}", "--wait-replicas", "1",
         "--redis-url", f"redis+cluster://u:{PASSWORD}@127.0.0.1:1"],
        env=clean_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "dualcast publish: wait_replicas is not available on a Redis Cluster (redis+cluster://)"]


async def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    proc = RedisProcess(tmp_path / "redis", args=["--unixsocket", str(sock),
                                                  "--unixsocketperm", "700"]).start()
    try:
        url = f"unix://{sock}?db=2"
        client = async_client(parse_redis_url(url), pooling=Pooling(4, wait=1.0))
        try:
            assert await client.ping()
        finally:
            await client.aclose()
        async with Publisher(url, stream="unix-stream") as pub:
            entry_id = await pub.publish("over-unix", 1)
        assert entry_id is not None
        check = redis.Redis(unix_socket_path=str(sock), db=2)
        try:
            assert check.xrange("unix-stream")[0][0].decode() == entry_id  # in database 2
        finally:
            check.close()
    finally:
        proc.stop()


@pytest.mark.timeout(60)
async def test_a_server_on_a_unix_socket_delivers_on_every_transport(
    tmp_path: Path, dualcast: Callable[..., DualcastProcess],
) -> None:
    """The whole server on `unix://`: its log's connections take no TCP options."""
    sock = tmp_path / "redis.sock"
    proc = RedisProcess(tmp_path / "redis", args=["--unixsocket", str(sock),
                                                  "--unixsocketperm", "700"]).start()
    try:
        url = f"unix://{sock}?db=3"
        server = dualcast(redis_url=url, env={"DUALCAST_STREAM": "unix-served"})
        clients = [await subscribe(kind, server.url) for kind in ("ws", "sse", "poll")]
        try:
            async with Publisher(url, stream="unix-served") as pub:
                ids = [await pub.publish("over-unix", {"n": n}) for n in range(5)]
            for client in clients:
                await wait_for(lambda c=client: len(c.seen.ids) >= 5, 10, "5 events")  # type: ignore[misc]
                assert client.seen.ids == ids
        finally:
            for client in clients:
                await client.close()
    finally:
        proc.stop()


async def test_no_primary_found_is_said_in_one_short_line() -> None:
    """With no Sentinel answering, redis-py's MasterNotFoundError quoted the whole repr of
    a client per Sentinel: every publish refused and every readiness detail was a 3 KB
    line of pools and connection options. It now names each Sentinel's address."""
    ports = [free_port() for _ in range(3)]
    target = parse_redis_url("redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in ports)
                             + "/svc")
    aclient = async_client(target, pooling=Pooling(single=True), socket_connect_timeout=1)
    sclient = sync_client(target, socket_connect_timeout=1)
    texts = []
    for ping in (aclient.ping, sclient.ping):
        with pytest.raises(redis.ConnectionError) as caught:
            result = ping()
            if not isinstance(result, bool):
                await result
        texts.append(describe(caught.value))
    await aclient.aclose()
    sclient.close()
    for text in texts:
        assert text.startswith("MasterNotFoundError: No master found for 'svc'"), text
        assert all(f"Sentinel 127.0.0.1:{port} (ConnectionError)" in text for port in ports), text
        assert len(text) < 300, text
