"""Child processes of the benchmark: redis-server and the servers under test.

Every server starts fresh on a free loopback port with its own redis-server, and
is stopped by the PID we started: nothing here looks processes up by name, and
nothing touches a Redis that may run on 6379.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar

import psutil

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

SECRET = "bench-secret-0123456789abcdef-0123456789"  # HS256 key of the bench tokens (>= 32 B)


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE to its hard limit here; children inherit it (not set in the server)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], T], timeout: float, what: str) -> T:
    """Poll `condition` until it is truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # a process that is starting may refuse for a while
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}: {last!r}")


def http_ok(port: int, path: str) -> bool:
    """A minimal GET that needs no HTTP library: True on a 200 status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        sock.sendall(request.encode())
        return sock.recv(64).startswith(b"HTTP/1.1 200")


@dataclass
class Child:
    """A child process started by the bench, stopped by its PID.

    `Child.live` lets the CLI stop every server and redis-server it started even when
    it is interrupted in the middle of a run (load workers exit on their own when
    their stdin closes).
    """

    live: ClassVar[set[Child]] = set()

    args: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path = ROOT
    proc: subprocess.Popen[bytes] | None = None
    _log: object = field(default=None, repr=False)

    def start(self) -> Child:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.args, cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        Child.live.add(self)
        return self

    def __hash__(self) -> int:
        return id(self)

    @classmethod
    def stop_all(cls) -> None:
        for child in list(cls.live):
            child.stop(timeout=5)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None
        Child.live.discard(self)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def redis_binary() -> str:
    for name in ("redis-server", "valkey-server"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("neither redis-server nor valkey-server is installed")


def redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


class Stack:
    """One server under test and its own redis-server, both fresh, in a temp dir."""

    def __init__(self, target: str, workdir: Path | None = None, env: dict[str, str] | None = None):
        self.target = target
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"bench-{target}-"))
        self.redis_port = free_port()
        self.port = free_port()
        self.extra_env = env or {}
        self.redis: Child | None = None
        self.server: Child | None = None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start(self) -> Stack:
        self.redis = Child(
            [redis_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--dir", str(self.workdir), "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--maxclients", "20000"],
            dict(os.environ), self.workdir / "redis.log",
        ).start()
        wait_until(lambda: redis_ping(self.redis_port), 10, f"redis-server on {self.redis_port}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DUALCAST_")}
        env.pop("REDIS_URL", None)
        env["PYTHONUNBUFFERED"] = "1"
        if self.target == "dualcast":
            env.update({"DUALCAST_REDIS_URL": self.redis_url, "DUALCAST_LOG_LEVEL": "warning",
                        "DUALCAST_SECRET": SECRET})
            args = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1",
                    "--port", str(self.port)]
            health = "/healthz"
            # A/B runs: BENCH_DUALCAST_ROOT=<another checkout> serves that tree's `server`
            # (`python -m` puts the working directory first on sys.path).
            cwd = Path(os.environ.get("BENCH_DUALCAST_ROOT") or ROOT)
        else:
            module = {"socketio": "bench.peers.socketio_app:app",
                      "broadcaster": "bench.peers.broadcaster_app:app"}[self.target]
            env["BENCH_REDIS_URL"] = self.redis_url
            args = [sys.executable, "-m", "uvicorn", module, "--host", "127.0.0.1",
                    "--port", str(self.port), "--log-level", "warning"]
            health = "/healthz"
            cwd = ROOT
        env.update(self.extra_env)
        if self.target == "dualcast":
            # A/B runs of a setting: BENCH_SERVER_ENV="DUALCAST_QUEUE_SIZE=500,..."
            for pair in filter(None, os.environ.get("BENCH_SERVER_ENV", "").split(",")):
                name, _, value = pair.partition("=")
                env[name.strip()] = value.strip()
        self.server = Child(args, env, self.workdir / f"{self.target}.log", cwd).start()

        def healthy() -> bool:
            assert self.server is not None
            if not self.server.alive():
                raise RuntimeError(f"{self.target} exited: {self.server.log_tail()}")
            return http_ok(self.port, health)

        try:
            wait_until(healthy, 30, f"{self.target} on {self.port}")
        except BaseException:
            self.stop()
            raise
        return self

    def version(self) -> str:
        """What is being served: the git commit of dualcast's tree (+dirty), or peer versions."""
        if self.target != "dualcast":
            from importlib.metadata import version

            dist = {"socketio": "python-socketio", "broadcaster": "broadcaster"}[self.target]
            return f"{dist} {version(dist)}"
        root = Path(os.environ.get("BENCH_DUALCAST_ROOT") or ROOT)
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
            self.server.stop()
        if self.redis is not None:
            self.redis.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # measurements -----------------------------------------------------------------
    def server_procs(self) -> list[psutil.Process]:
        """The server and any children it spawned (a single-process server has none)."""
        assert self.server is not None
        main = psutil.Process(self.server.pid)
        return [main, *main.children(recursive=True)]

    def server_rss(self) -> int:
        return sum(p.memory_info().rss for p in self.server_procs())

    def server_cpu(self) -> float:
        return sum(_cpu(p) for p in self.server_procs())

    def redis_cpu(self) -> float:
        assert self.redis is not None
        return _cpu(psutil.Process(self.redis.pid))


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
