"""`dualcast serve` and the open-file limit: raised to the hard limit at start (every worker
inherits it), and one WARNING line when even that is below DUALCAST_MAX_CONNECTIONS.

Real `python -m dualcast serve` children started with the limit set in the child
(`resource.setrlimit` before exec), as a shell's `ulimit -n` would.
"""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.harness.procs import ROOT, RedisProcess, clean_env, free_port
from tests.harness.waits import wait_until

pytestmark = pytest.mark.timeout(60)

HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def limited(soft: int, hard: int) -> Callable[[], None]:
    def apply() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return apply


class Started:
    """A serve child and its output so far (stdout and stderr in one file)."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Started]]:
    """Start `dualcast serve` with a given open-file limit; wait until it serves."""
    started: list[Started] = []

    def start(soft: int, hard: int, env: dict[str, str], args: tuple[str, ...] = (),
              ready: str = "Application startup complete") -> Started:
        log = tmp_path / f"serve-{len(started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dualcast", "serve", "--port", str(free_port()), *args],
                cwd=ROOT, env=clean_env({"DUALCAST_LOG_LEVEL": "info", **env}),
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=limited(soft, hard),
            )
        child = Started(proc, log)
        started.append(child)
        wait_until(lambda: ready in child.output() or proc.poll() is not None, timeout=30,
                   what=f"serve started ({log})")
        assert proc.poll() is None, child.output()
        return child

    yield start
    for child in started:
        child.proc.terminate()
        try:
            child.proc.wait(15)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait(5)


def warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if " WARNING " in line]


def test_a_limit_below_the_cap_is_one_warning_naming_the_setting_and_the_fix(
    serve: Callable[..., Started],
) -> None:
    child = serve(512, 512, {"DUALCAST_MAX_CONNECTIONS": "2000"})
    [line] = warnings(child.output())
    assert "RLIMIT_NOFILE" in line and " 512 " in line
    assert "DUALCAST_MAX_CONNECTIONS=2000" in line
    assert "ulimit -n 2100" in line and "LimitNOFILE=2100" in line


def test_no_cap_under_a_low_limit_is_a_warning_too(serve: Callable[..., Started]) -> None:
    """DUALCAST_MAX_CONNECTIONS=0 under a low limit: past it accept() fails (EMFILE), the
    failure the unset cap's WARNING is about; it was one INFO line."""
    child = serve(512, 512, {"DUALCAST_MAX_CONNECTIONS": "0"})
    [line] = warnings(child.output())
    assert "RLIMIT_NOFILE" in line and " 512 " in line and "about 412 connections" in line
    assert "DUALCAST_MAX_CONNECTIONS=0" in line and "ulimit -n" in line
    if HARD >= 4_100:  # (LOW + RESERVE: an ample limit) no cap is no warning there
        assert warnings(serve(HARD, HARD, {"DUALCAST_MAX_CONNECTIONS": "0"}).output()) == []


def test_an_ample_limit_is_no_warning(serve: Callable[..., Started]) -> None:
    child = serve(HARD, HARD, {"DUALCAST_MAX_CONNECTIONS": str(HARD - 200)})
    assert warnings(child.output()) == []


def test_the_soft_limit_is_raised_to_the_hard_one_for_every_worker(
    serve: Callable[..., Started], redis_server: RedisProcess,
) -> None:
    """A low soft limit under an ample hard one (a login shell's usual 1,024) is no
    warning: the server raises it, and the workers it starts hold the raised limit."""
    child = serve(512, HARD, {"DUALCAST_MAX_CONNECTIONS": "1000",
                              "DUALCAST_REDIS_URL": redis_server.url}, ("--workers", "2"),
                  ready="starting 2 workers")
    def workers() -> list[psutil.Process]:
        return [c for c in psutil.Process(child.proc.pid).children()
                if "resource_tracker" not in " ".join(c.cmdline())]

    wait_until(lambda: len(workers()) == 2, timeout=30, what="2 workers")
    assert warnings(child.output()) == []
    assert f"open-file limit raised from 512 to {HARD}" in child.output()
    for worker in workers():
        assert worker.rlimit(psutil.RLIMIT_NOFILE) == (HARD, HARD)


def test_unset_the_cap_follows_the_open_file_limit(serve: Callable[..., Started]) -> None:
    """No DUALCAST_MAX_CONNECTIONS: a process under a low limit says in one WARNING how
    many connections it will hold, then holds that many and answers the next with 503
    (not an accept() that fails with EMFILE)."""
    child = serve(300, 300, {"DUALCAST_MAX_CONNECTIONS_PER_ADDRESS": "0"})
    [line] = warnings(child.output())
    assert "RLIMIT_NOFILE" in line and " 300 " in line and "at most 200 connections" in line
    assert "ulimit -n" in line
    port = int(child.proc.args[child.proc.args.index("--port") + 1])  # type: ignore[union-attr]
    held: list[socket.socket] = []
    try:
        for _ in range(200):
            held.append(open_stream(port))
        wait_until(lambda: status_of_next_stream(port) == 503, timeout=20,
                   what="the 201st stream refused with 503")
    finally:
        for sock in held:
            sock.close()
    # a stream that ends gives its slot back
    wait_until(lambda: status_of_next_stream(port) == 200, timeout=20,
               what="a slot back once the streams closed")


def test_a_limit_at_the_reserve_says_the_one_connection_it_holds(
    serve: Callable[..., Started],
) -> None:
    """At 100 open files or fewer the process still holds one connection (0 would mean no
    cap); its warning said "at most 0 connections"."""
    child = serve(100, 100, {})
    [line] = warnings(child.output())
    assert "at most 1 connections" in line, line


def open_stream(port: int) -> socket.socket:
    """An SSE stream held open on a raw socket (its 200 head read)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /api/sse HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
    head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return sock


def status_of_next_stream(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /api/sse HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
                     b"Connection: close\r\n\r\n")
        return int(sock.recv(4096).split(b" ", 2)[1])
