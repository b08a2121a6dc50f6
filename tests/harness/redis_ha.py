"""Highly available Redis on loopback: a primary, a replica and three Sentinels, or a
six-node Redis Cluster, each process started here on a free port in its own folder.

Timeouts are short (a node is declared down after one second) so a failover takes
a few seconds. Only Debian's `redis-server` is needed: it runs as a Sentinel with
`--sentinel`, and `redis-cli --cluster create` builds the cluster.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import redis

from tests.harness.procs import Child, RedisProcess, free_port, redis_binary
from tests.harness.tcpproxy import TCPProxy
from tests.harness.waits import wait_until

__all__ = ["ClusterSet", "SentinelProcess", "SentinelSet"]

SERVICE = "dualcast-ha"


def _client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2,
                       decode_responses=True)


def _ask(port: int, *args: Any) -> Any:
    """One command to the node on `port`; None when it cannot answer."""
    client = _client(port)
    try:
        return client.execute_command(*args)  # type: ignore[no-untyped-call]
    except (redis.RedisError, OSError):
        return None
    finally:
        client.close()


class SentinelProcess(Child):
    """`redis-server <conf> --sentinel` watching one primary, with a writable config of its own."""

    def __init__(self, workdir: Path, primary_port: int, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 4000) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = self.workdir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {self.workdir}\n"
            f"logfile {self.workdir / 'sentinel.log'}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n"
            f"sentinel failover-timeout {SERVICE} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        super().__init__([redis_binary(), str(conf), "--sentinel"], {},
                         self.workdir / "stdout.log")

    def start(self) -> SentinelProcess:
        self.spawn()
        wait_until(lambda: _ask(self.port, "PING") is True, timeout=10,
                   what=f"sentinel on {self.port}")
        return self

    def primary_port(self) -> int | None:
        """The port of the primary this Sentinel names now (None: it cannot answer)."""
        reply = _ask(self.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(reply[1]) if reply else None

    def known(self) -> tuple[int, int]:
        """(other Sentinels, replicas) this Sentinel has discovered."""
        state = _ask(self.port, "SENTINEL", "MASTER", SERVICE)
        if not state:
            return 0, 0
        return int(state["num-other-sentinels"]), int(state["num-slaves"])


class SentinelSet:
    """A primary, one replica and three Sentinels (quorum 2).

    With `link`, the replica reaches its primary through a TCP proxy of ours, which a
    test stalls to make writes the primary acknowledged that never reach the replica.
    """

    def __init__(self, workdir: Path, link: bool = False) -> None:
        self.primary = RedisProcess(workdir / "primary")
        self.link = TCPProxy(self.primary.port) if link else None
        upstream = self.link.port if self.link else self.primary.port
        self.replica = RedisProcess(workdir / "replica", args=[
            "--replicaof", "127.0.0.1", str(upstream)])
        self.sentinels = [SentinelProcess(workdir / f"sentinel{i}", self.primary.port)
                          for i in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> SentinelSet:
        self.primary.start()
        if self.link is not None:
            self.link.start()
        self.replica.start()
        wait_until(lambda: (_ask(self.replica.port, "INFO", "replication") or {}).get(
            "master_link_status") == "up", timeout=15, what="the replica to sync")
        for sentinel in self.sentinels:
            sentinel.start()
        wait_until(lambda: all(s.known() == (2, 1) for s in self.sentinels), timeout=30,
                   what="every Sentinel to know the two others and the replica")
        return self

    def primary_port(self) -> int | None:
        """The primary a majority of the Sentinels name (None while they disagree)."""
        ports = [s.primary_port() for s in self.sentinels]
        for port in set(ports):
            if port is not None and ports.count(port) >= 2:
                return port
        return None

    def stop(self) -> None:
        for child in (*self.sentinels, self.replica, self.primary):
            child.stop(5)
        if self.link is not None:
            self.link.close()


class ClusterSet:
    """Six cluster nodes, three primaries and a replica each, built by `redis-cli --cluster`."""

    def __init__(self, workdir: Path, node_timeout_ms: int = 1000,
                 appendonly: bool = False) -> None:
        """`appendonly`: every node keeps its data across a restart (an outage of the
        whole cluster, `stop`/`start` of every node)."""
        self.nodes = [
            RedisProcess(workdir / f"node{i}", appendonly=appendonly, args=[
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(workdir / f"node{i}" / "nodes.conf"),
                "--cluster-node-timeout", str(node_timeout_ms),
                # the bus is port + 10000 unless named: past 55535 that is no port at all
                "--cluster-port", str(free_port()),
            ])
            for i in range(6)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def start(self) -> ClusterSet:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed (Debian: redis-tools)")
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        result = subprocess.run([cli, "--cluster", "create", *addresses, "--cluster-replicas",
                                 "1", "--cluster-yes"], capture_output=True, text=True,
                                timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {result.stdout[-2000:]}"
                               f"{result.stderr[-2000:]}")
        wait_until(self.healthy, timeout=30, what="cluster_state:ok on every node")
        # a replica that never finished its first sync cannot be elected: wait for all three
        wait_until(lambda: sum(
            (_ask(n.port, "INFO", "replication") or {}).get("master_link_status") == "up"
            for n in self.nodes) == 3, timeout=30, what="every replica in sync")
        return self

    def healthy(self) -> bool:
        return all("cluster_state:ok" in str(_ask(n.port, "CLUSTER", "INFO"))
                   for n in self.nodes if n.alive())

    def owner(self, key: str) -> int | None:
        """The port of the primary serving `key`'s slot, as a live node sees it now."""
        for node in self.nodes:
            if not node.alive():
                continue
            slot = _ask(node.port, "CLUSTER", "KEYSLOT", key)
            slots = _ask(node.port, "CLUSTER", "SLOTS")
            if slot is None or not slots:
                continue
            for first, last, primary, *_ in slots:
                if int(first) <= int(slot) <= int(last):
                    return int(primary[1])
        return None

    def node(self, port: int) -> RedisProcess:
        return next(n for n in self.nodes if n.port == port)

    def replica_of(self, port: int) -> int:
        """The port of the replica of the primary on `port`."""
        info = _ask(port, "INFO", "replication") or {}
        replica = info.get("slave0")
        if not isinstance(replica, dict):
            raise AssertionError(f"no replica of 127.0.0.1:{port}: {info}")
        return int(replica["port"])

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(5)

