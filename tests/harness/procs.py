"""Real processes on free loopback ports: redis-server and dualcast, for tests and bench.

Every child is started by this module, writes its output to a log file in its own
folder, and is stopped by the PID we started: nothing here looks processes up by
name, and nothing touches a Redis that may run on 6379.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO, ClassVar

import httpx
import psutil

from tests.harness.waits import wait_until

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE to its hard limit here; children inherit it.

    Thousands of clients, or a server holding them, need more than the usual 1,024 fds.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def http_ok(port: int, path: str) -> bool:
    """A minimal GET that needs no HTTP library: True on a 200 status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        sock.sendall(request.encode())
        return sock.recv(64).startswith(b"HTTP/1.1 200")


def redis_binary() -> str:
    for name in ("redis-server", "valkey-server"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("neither redis-server nor valkey-server is installed")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any dualcast setting, plus `extra`.

    A child must see only the settings its owner chose, never the caller's shell.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALCAST_")}
    env.pop("REDIS_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Child:
    """A child process started here and stopped by its PID, its output in `log_path`.

    `Child.live` holds every child still running, so a command interrupted in the
    middle of a run can stop all it started (`Child.stop_all()`).
    """

    live: ClassVar[set[Child]] = set()

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path,
                 cwd: Path = ROOT) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log is not None:
            self._log.close()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, cwd=self.cwd, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        Child.live.add(self)

    @classmethod
    def stop_all(cls) -> None:
        for child in list(cls.live):
            child.stop(timeout=5)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        Child.live.discard(self)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 3000) -> str:
        return self.log()[-n:]


class RedisProcess(Child):
    """A redis-server child on a free loopback port; can be killed and restarted on that port."""

    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = False,
                 args: list[str] | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = args or []
        super().__init__([], dict(os.environ), self.workdir / "redis-stdout.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, wipe: bool = False) -> RedisProcess:
        if wipe:
            for child in self.workdir.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        self.args = [
            redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.workdir), "--save", "", "--daemonize", "no",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always", "--logfile", str(self.workdir / "redis.log"),
            *self.extra_args,
        ]
        self.spawn()
        wait_until(self.ping, timeout=10, what=f"redis-server on {self.port}")
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Send one command in RESP without a client library; returns the raw reply."""
        payload = b"*%d\r\n" % len(args) + b"".join(
            b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(payload)
            return sock.recv(1 << 20)

    def stop(self, timeout: float = 10) -> int | None:
        return super().stop(timeout)


class DualcastProcess(Child):
    """`python -m dualcast serve` as a child process on a free port, with its own env.

    `root` serves another checkout's `server/` folder (A/B benchmark runs): the child
    then finds `dualcast` through a link in its work folder, ahead of the installed one.
    `entry` replaces `-m dualcast` (a wrapper module that serves with extra sampling).
    """

    def __init__(
        self, workdir: Path, redis_url: str | None = None, port: int | None = None,
        env: dict[str, str] | None = None, args: list[str] | None = None,
        root: Path | None = None, entry: list[str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.redis_url = redis_url
        self.extra_env = env or {}
        self.serve_args = args or []
        self.root = root or ROOT
        self.entry = entry or ["-m", "dualcast"]
        super().__init__([], {}, self.workdir / f"dualcast-{self.port}.log", cwd=self.root)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> DualcastProcess:
        env = clean_env({"DUALCAST_LOG_LEVEL": "info"})
        if self.redis_url:
            env["DUALCAST_REDIS_URL"] = self.redis_url
        if self.root != ROOT:
            link_dir = self.workdir / "pythonpath"
            link_dir.mkdir(exist_ok=True)
            link = link_dir / "dualcast"
            if not link.exists():
                link.symlink_to(self.root / "server")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(link_dir),
                                                              env.get("PYTHONPATH")]))
        env.update(self.extra_env)
        self.env = env
        self.args = [sys.executable, *self.entry, "serve", "--host", "127.0.0.1",
                     "--port", str(self.port), *self.serve_args]
        self.spawn()
        if wait:
            try:
                wait_until(self.healthy, timeout=30, what=f"dualcast on {self.port} ({self.log_path})")
            except BaseException:
                self.stop(5)
                raise
        return self

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"dualcast exited {self.proc.returncode}: {self.log_tail(2000)}")
        try:
            return http_ok(self.port, "/healthz") and self._listens_itself()
        except OSError:
            return False

    def _listens_itself(self) -> bool:
        """This process holds the listening socket on its port. A port from free_port() can
        be taken by another test's server before this one binds it: that server's /healthz
        answered for ours, and the test then met a refused connection once it had gone (an
        e2e test, once, in a parallel run)."""
        if self.proc is None:
            return True
        try:
            me = psutil.Process(self.proc.pid)
            # (with --workers, the workers listen: the supervisor's socket only binds)
            family = [me, *me.children(recursive=True)]
        except psutil.Error:
            return False
        for process in family:
            try:
                # (net_connections since psutil 6; connections before)
                held = getattr(process, "net_connections", process.connections)(kind="tcp")
            except psutil.Error:
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr[1] == self.port
                   for c in held):
                return True
        return False

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
