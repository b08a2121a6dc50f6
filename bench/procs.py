"""Child processes of the benchmark: redis-server and the servers under test.

Every server starts fresh on a free loopback port with its own redis-server, and
is stopped by the PID we started: nothing here looks processes up by name, and
nothing touches a Redis that may run on 6379.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from bench.clients import checkouts
from tests.harness import http_ok
from tests.harness.procs import ROOT, Child, DualcastProcess, RedisProcess, clean_env, free_port
from tests.harness.waits import wait_until

SECRET = "bench-secret-0123456789abcdef-0123456789"  # HS256 key of the bench tokens (>= 32 B)


class Stack:
    """One server under test and its own redis-server, both fresh, in a temp dir."""

    def __init__(self, target: str, workdir: Path | None = None,
                 env: dict[str, str] | None = None, peer_workers: int = 1) -> None:
        self.target = target
        self.peer_workers = peer_workers  # a peer's uvicorn --workers (dualcast: the env)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"bench-{target}-"))
        self.redis_port = free_port()
        self.port = free_port()
        self.extra_env = env or {}
        self.redis: RedisProcess | None = None
        self.server: Child | None = None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start(self) -> Stack:
        self.redis = RedisProcess(self.workdir / "redis", port=self.redis_port,
                                  args=["--maxclients", "20000"]).start()
        if self.target == "dualcast" or self.target in checkouts():
            env = {"DUALCAST_LOG_LEVEL": "warning", "DUALCAST_SECRET": SECRET, **self.extra_env}
            # A/B runs of a setting: BENCH_SERVER_ENV="DUALCAST_QUEUE_SIZE=500,..."
            for pair in filter(None, os.environ.get("BENCH_SERVER_ENV", "").split(",")):
                name, _, value = pair.partition("=")
                env[name.strip()] = value.strip()
            root = self.root()
            # A tree from before the package imported as `dualcast` is run as `-m server`.
            main = (root / "server" / "__main__.py").read_text()
            entry = ["-m", "server"] if "from server." in main else None
            self.server = DualcastProcess(self.workdir / "dualcast", self.redis.url, self.port,
                                          env=env, root=root, entry=entry)
            try:
                self.server.start()
            except BaseException:
                self.stop()
                raise
            return self
        module = {"socketio": "bench.peers.socketio_app:app",
                  "broadcaster": "bench.peers.broadcaster_app:app"}[self.target]
        env = clean_env({"BENCH_REDIS_URL": self.redis_url, **self.extra_env})
        args = [sys.executable, "-m", "uvicorn", module, "--host", "127.0.0.1",
                "--port", str(self.port), "--log-level", "warning"]
        if self.peer_workers > 1:
            args += ["--workers", str(self.peer_workers)]
        self.server = Child(args, env, self.workdir / f"{self.target}.log")
        self.server.spawn()

        def healthy() -> bool:
            assert self.server is not None
            if not self.server.alive():
                raise RuntimeError(f"{self.target} exited: {self.server.log_tail()}")
            return http_ok(self.port, "/healthz")

        try:
            wait_until(healthy, 30, what=f"{self.target} on {self.port}")
        except BaseException:
            self.stop()
            raise
        return self

    def root(self) -> Path:
        """The checkout whose `server/` is served: a BENCH_TREES label's tree, else
        BENCH_DUALCAST_ROOT (an A/B run of another checkout), else this one."""
        tree = checkouts().get(self.target)
        return Path(tree or os.environ.get("BENCH_DUALCAST_ROOT") or ROOT)

    def version(self) -> str:
        """What is being served: the git commit of dualcast's tree (+dirty), or peer versions."""
        if self.target != "dualcast" and self.target not in checkouts():
            from importlib.metadata import version

            dist = {"socketio": "python-socketio", "broadcaster": "broadcaster"}[self.target]
            return f"{dist} {version(dist)}"
        root = self.root()
        try:
            head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                  capture_output=True, text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "server"], cwd=root,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "unknown"
        return f"dualcast {head}{'+dirty' if dirty else ''}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(10)
            _show_errors(self.server.log_path)
        if self.redis is not None:
            self.redis.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # measurements -----------------------------------------------------------------
    def server_procs(self) -> list[psutil.Process]:
        """The server and any children it spawned (a single-process server has none)."""
        assert self.server is not None
        main = psutil.Process(self.server.pid)
        return [main, *main.children(recursive=True)]

    def clients_per_process(self) -> list[int]:
        """Connections each server process holds on the served port, most first (with
        `--workers N` and spares asleep, the first holds them all)."""
        counts = [sum(1 for c in p.net_connections("tcp")
                      if c.laddr and c.laddr.port == self.port
                      and c.status == psutil.CONN_ESTABLISHED)
                  for p in self.server_procs()]
        return sorted((n for n in counts if n), reverse=True) or [0]

    def cpu_by_process(self) -> dict[int, float]:
        """CPU seconds of each server process so far, by PID."""
        return {p.pid: _cpu(p) for p in self.server_procs()}

    def server_rss(self) -> int:
        return sum(p.memory_info().rss for p in self.server_procs())

    def server_cpu(self) -> float:
        return sum(_cpu(p) for p in self.server_procs())

    def redis_cpu(self) -> float:
        assert self.redis is not None
        return _cpu(psutil.Process(self.redis.pid))


def _show_errors(log: Path, last: int = 60) -> None:
    """A server that logged an error or a traceback shows the end of its log on stderr
    before its temp dir goes: a run's figures alone do not say why clients were refused."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return
    if any("ERROR" in line or line.startswith("Traceback") for line in lines):
        print(f"--- the server logged errors; the last {last} lines of {log.name}:",
              *lines[-last:], "---", sep="\n", file=sys.stderr)


def _cpu(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (0 when it is gone)."""
    try:
        return _cpu(psutil.Process(pid))
    except psutil.Error:
        return 0.0


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system
