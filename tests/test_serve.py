"""`dualcast serve` as a person runs it: flags reach every worker, failures are one line.

Real processes only: `python -m dualcast serve` children, a real redis-server,
psutil to look inside each worker process (its sockets, its connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import psutil
import pytest

from dualcast.config import load_settings
from dualcast.serve import DualcastServer, bind, uvicorn_config, worker_socket
from tests.conftest import SECRET, token
from tests.harness.clients import subscribe
from tests.harness.probes import log_problems
from tests.harness.procs import ROOT, DualcastProcess, RedisProcess, free_port
from tests.harness.waits import wait_until

PY = [sys.executable, "-m", "dualcast"]


#: These tests are about what every worker does: all of them serve from the start (the
#: spares asleep until the first is busy, the default, have their own tests below).
ALL_SERVE = {"DUALCAST_WORKERS_WAKE": "start"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALCAST_")}
    env.pop("REDIS_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(ALL_SERVE)
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """A command that must end by itself (a refusal), with its output."""
    return subprocess.run([*PY, *args], cwd=ROOT, env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def workers_of(proc: DualcastProcess) -> list[psutil.Process]:
    """The worker processes of a `--workers N` server (not multiprocessing's helper)."""
    children = psutil.Process(proc.pid).children()
    return [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]


def wait_workers(proc: DualcastProcess, count: int) -> list[psutil.Process]:
    return wait_until(lambda: len(workers_of(proc)) == count and workers_of(proc),
                      timeout=30, what=f"{count} workers")


def listens_on(worker: psutil.Process, host: str, port: int) -> bool:
    """The worker holds the listening socket and has called listen() on it."""
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.ip == host
               and c.laddr.port == port for c in worker.net_connections("tcp"))


def connected_to(worker: psutil.Process, port: int) -> bool:
    return any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
               for c in worker.net_connections("tcp"))


@pytest.fixture
def serve(dualcast: Callable[..., DualcastProcess]) -> Callable[..., DualcastProcess]:
    """`dualcast serve ARGS` children (conftest's `dualcast` owns and stops them)."""

    def start(args: list[str], env: dict[str, str] | None = None, wait: bool = True,
              redis_url: str | None = None) -> DualcastProcess:
        return dualcast(redis_url, env={**ALL_SERVE, **(env or {})}, args=args, wait=wait)

    return start


# Every flag reaches every worker, exactly as the variable does -----------------------

FLAG_OR_ENV = pytest.mark.parametrize("how", ["flag", "env"])


def _given(how: str, flag: str, env_name: str, value: str) -> tuple[list[str], dict[str, str]]:
    return ([flag, value], {}) if how == "flag" else ([], {env_name: value})


@FLAG_OR_ENV
def test_redis_url_and_workers_reach_every_worker(
    how: str, serve: Callable[..., DualcastProcess], fresh_redis: RedisProcess
) -> None:
    """Issue 19 item 7: `--workers 2 --redis-url` used to leave every worker on its own
    memory engine, and events added to Redis never arrived."""
    args, env = _given(how, "--redis-url", "DUALCAST_REDIS_URL", fresh_redis.url)
    more, env2 = _given(how, "--workers", "DUALCAST_WORKERS", "2")
    proc = serve(args + more, env={**env, **env2})
    workers = wait_workers(proc, 2)
    for worker in workers:
        wait_until(lambda w=worker: connected_to(w, fresh_redis.port), timeout=20,
                   what=f"worker {worker.pid} connected to redis")
    ready = httpx.get(proc.url + "/readyz", timeout=5).json()
    assert ready["engine"] == "redis"
    # An event XADDed straight to Redis reaches a subscriber (on whichever worker).
    with httpx.Client(timeout=10) as http, http.stream("GET", proc.url + "/api/sse") as stream:
        lines = stream.iter_lines()
        assert "event: welcome" in [next(lines) for _ in range(3)]
        fresh_redis.command("XADD", "websocket-broadcast", "*", "data",
                            '{"event":"via_redis","data":{"n":1}}')
        seen = [next(lines) for _ in range(3)]
        assert "event: via_redis" in seen, seen


@FLAG_OR_ENV
def test_port_and_host_reach_every_worker(
    how: str, serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    port = free_port()
    args, env = _given(how, "--host", "DUALCAST_HOST", "::1")
    more, env2 = _given(how, "--port", "DUALCAST_PORT", str(port))
    if how == "env":  # the harness passes --host/--port itself: keep them out of its way
        args = ["--host", "::1", "--port", str(port)]
        env, env2 = {"DUALCAST_HOST": "::1", "DUALCAST_PORT": str(port)}, {}
    proc = serve(args + more + ["--workers", "2"], env={**env, **env2},
                 redis_url=redis_server.url, wait=False)
    workers = wait_workers(proc, 2)
    for worker in workers:
        wait_until(lambda w=worker: listens_on(w, "::1", port), timeout=20,
                   what=f"worker {worker.pid} listening on [::1]:{port}")
    assert httpx.get(f"http://[::1]:{port}/healthz", timeout=5).status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_port_from_the_environment_alone(
    serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    """DUALCAST_PORT with no flag at all (the harness always passes --port, so run bare)."""
    port = free_port()
    env = clean_env(DUALCAST_PORT=str(port), DUALCAST_WORKERS="2", DUALCAST_SECRET=SECRET,
                    DUALCAST_REDIS_URL=redis_server.url)
    proc = subprocess.Popen([*PY, "serve"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                   .status_code == 200, timeout=30, what="the server on DUALCAST_PORT")
        children = [c for c in psutil.Process(proc.pid).children()
                    if "resource_tracker" not in " ".join(c.cmdline())]
        assert len(children) == 2
        for child in children:
            wait_until(lambda c=child: listens_on(c, "127.0.0.1", port), timeout=20,
                       what="each worker listening")
    finally:
        proc.terminate()
        proc.wait(30)


@FLAG_OR_ENV
def test_log_level_reaches_every_worker(
    how: str, serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    args, env = _given(how, "--log-level", "DUALCAST_LOG_LEVEL", "debug")
    proc = serve([*args, "--workers", "2"], env=env, redis_url=redis_server.url)
    workers = wait_workers(proc, 2)
    for worker in workers:
        wait_until(lambda w=worker: f"DEBUG dualcast.serve: process {w.pid} serving" in proc.log(),
                   timeout=20, what=f"worker {worker.pid}'s debug line")


def test_each_workers_lines_say_which_worker(
    serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    """N processes write one log: a worker's lines begin with its slot (the supervisor's
    do not), uvicorn's as well as dualcast's."""
    proc = serve(["--workers", "2"], redis_url=redis_server.url)
    wait_workers(proc, 2)
    wait_until(lambda: proc.log().count("Application startup complete") == 2
               and proc.log().count("dualcast.consumer: consuming") == 2, timeout=30,
               what="both workers started, each consumer with its first line")
    lines = proc.log().splitlines()
    started = sorted(line.split("]")[0] + "]" for line in lines
                     if "Application startup complete" in line)
    assert started == ["[worker 0]", "[worker 1]"], started
    consuming = [line for line in lines if "dualcast.consumer: consuming" in line]
    assert sorted(line[:10] for line in consuming) == ["[worker 0]", "[worker 1]"], consuming
    supervisor = next(line for line in lines if "starting 2 workers" in line)
    assert not supervisor.startswith("[worker"), supervisor


@FLAG_OR_ENV
def test_quiet_log_level_reaches_every_worker(
    how: str, serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    args, env = _given(how, "--log-level", "DUALCAST_LOG_LEVEL", "warning")
    proc = serve([*args, "--workers", "2"], env=env, redis_url=redis_server.url)
    wait_workers(proc, 2)
    wait_until(proc.ready, timeout=20, what="ready")
    proc.stop()
    log = proc.log()
    # At info each worker says "Application startup complete."; at warning none does.
    assert "Application startup complete" not in log
    assert "INFO dualcast" not in log


@FLAG_OR_ENV
def test_demo_flag_serves_demo_events(how: str, serve: Callable[..., DualcastProcess]) -> None:
    if how == "flag":
        proc = serve(["--demo", "--demo-speed", "20"])
    else:
        proc = serve([], env={"DUALCAST_DEMO": "true", "DUALCAST_DEMO_SPEED": "20"})
    with httpx.Client(timeout=10) as http, http.stream("GET", proc.url + "/api/sse") as stream:
        # public demo events (provider status) arrive; anonymous sees public ones only
        for line in stream.iter_lines():
            if line.startswith("event: ") and line != "event: welcome":
                break
    assert line.startswith("event: ")


def test_demo_with_several_workers_is_one_clear_line(redis_server: RedisProcess) -> None:
    done = run_cli("serve", "--demo", "--workers", "2", "--redis-url", redis_server.url,
                   "--port", str(free_port()))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--demo" in lines[0] or "DUALCAST_DEMO" in lines[0]


def test_demo_speed_without_the_demo_is_one_clear_line() -> None:
    """`dualcast serve --demo-speed 5` (without --demo) started a server with no demo at
    all, and nothing said the flag paced nothing."""
    done = run_cli("serve", "--port", str(free_port()), "--demo-speed", "5")
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("dualcast serve: --demo-speed paces the demo traffic: add --demo")


def test_memory_engine_refuses_several_workers_with_a_clear_line() -> None:
    done = run_cli("serve", "--workers", "2", "--port", str(free_port()))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "memory engine" in lines[0] and "DUALCAST_REDIS_URL" in lines[0]
    assert "--redis-url" in lines[0]  # (the flag it was started with is named too)


# Bad input: one line, naming the flag or the variable, never echoing a secret ----------

@pytest.mark.parametrize(("args", "env", "named"), [
    (["--port", "99999"], {}, "--port"),
    (["--port", "http"], {}, "--port"),
    # argparse's int() and float() read other scripts' digits, the variables did not
    (["--port", "\u0668\u0660\u0660\u0660"], {}, "--port"),
    (["--redis-url", "redis://127.0.0.1:9/0", "--workers", "\u0662"], {}, "--workers"),
    (["--demo", "--demo-speed", "\u0661"], {}, "--demo-speed"),
    (["--demo-speed", "0"], {}, "--demo-speed"),
    (["--log-level", "loud"], {}, "--log-level"),
    ([], {"DUALCAST_PORT": "99999"}, "DUALCAST_PORT"),
    ([], {"DUALCAST_REDIS_URL": "http://h/0"}, "DUALCAST_REDIS_URL"),
    ([], {"REDIS_URL": "mysql://h/0"}, "REDIS_URL"),
    (["--redis-url", "http://h/0"], {}, "--redis-url"),
    ([], {"DUALCAST_QUEUE_SIZE": "none"}, "DUALCAST_QUEUE_SIZE"),
    # a blank host bound every interface while the log said 127.0.0.1
    ([], {"DUALCAST_HOST": ""}, "DUALCAST_HOST"),
    ([], {"DUALCAST_HOST": "  "}, "DUALCAST_HOST"),
    (["--host", ""], {}, "--host"),
    ([], {"DUALCAST_ALLOWED_ORIGINS": "https://app.example.com/app"}, "DUALCAST_ALLOWED_ORIGINS"),
    # a folder that is not there: the server started and its dashboard link answered 404
    ([], {"DUALCAST_STATIC_DIR": "/nonexistent/dashboard"}, "DUALCAST_STATIC_DIR"),
    ([], {"DUALCAST_FORWARDED_ALLOW_IPS": "nginx"}, "DUALCAST_FORWARDED_ALLOW_IPS"),
])
def test_bad_settings_are_one_line_naming_it(args: list[str], env: dict[str, str],
                                             named: str) -> None:
    port = [] if "DUALCAST_PORT" in env else ["--port", str(free_port())]
    done = run_cli("serve", *port, *args, env=clean_env(**env))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert named in lines[0]
    assert "DUALCAST_DUALCAST" not in lines[0]


@pytest.mark.parametrize("value", ["hunter2-short", "p" * 31])
def test_a_short_secret_is_refused_and_never_echoed(value: str) -> None:
    done = run_cli("serve", "--port", str(free_port()), env=clean_env(DUALCAST_SECRET=value))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "DUALCAST_SECRET" in lines[0] and "32 bytes" in lines[0]
    assert value not in done.stderr and value not in done.stdout


def test_a_redis_password_is_never_echoed_in_a_bad_url() -> None:
    done = run_cli("serve", "--port", str(free_port()),
                   env=clean_env(DUALCAST_REDIS_URL="htp://user:pa55word-xyz@h:1/0"))
    assert done.returncode == 2
    assert "pa55word-xyz" not in done.stderr + done.stdout


def test_token_refuses_a_secret_the_server_would_refuse() -> None:
    """`dualcast token` and the server agree: 32 bytes at least (RFC 7518)."""
    short = "t" * 20
    done = run_cli("token", "--sub", "1", "--secret", short)
    assert done.returncode == 2 and done.stdout == ""
    assert short not in done.stderr


# The unreachable log at start -----------------------------------------------------------

def test_unreachable_log_at_start_is_a_loud_error(serve: Callable[..., DualcastProcess]) -> None:
    port = free_port()  # nothing listens there
    url = f"redis://dcuser:pw-never-logged@127.0.0.1:{port}/0"
    proc = serve(["--redis-url", url])
    ready = httpx.get(proc.url + "/readyz", timeout=5)
    assert ready.status_code == 503
    assert ready.json()["reason"] != "ok"
    wait_until(lambda: proc.log().count("unreachable since start") >= 2, timeout=20,
               what="the error repeated")
    errors = [line for line in proc.log().splitlines() if "unreachable since start" in line]
    assert all(" ERROR " in line and f"127.0.0.1:{port}" in line for line in errors)
    assert "pw-never-logged" not in proc.log()


def test_a_stream_key_of_another_type_is_said_to_be_refused_not_unreachable(
    serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    """DUALCAST_STREAM naming a key that holds a string (WRONGTYPE) was logged as "event
    log at ... unreachable since start", sending the operator to the network while Redis
    answered every call; the key it must fix was not named. Now the line says Redis
    refuses, and which key; the same when the key changes type while running. /readyz
    said `log_unreachable` all along: it says `log_refused` (and to an admin, the key)."""
    key = f"wrongtype-{free_port()}"
    redis_server.command("SET", key, "not a stream")
    proc = serve([], redis_url=redis_server.url, env={"DUALCAST_STREAM": key})
    wait_until(lambda: "since start" in proc.log(), timeout=20, what="the start-up error")
    line = next(line for line in proc.log().splitlines() if "since start" in line)
    assert " ERROR " in line and "unreachable" not in line, line
    assert f"refuses the stream key {key!r}" in line and "WRONGTYPE" in line, line
    _assert_readiness_says_refused(proc, key)
    redis_server.command("DEL", key)
    wait_until(proc.ready, timeout=20, what="ready once the key is gone")
    redis_server.command("SET", key, "not a stream")  # and again while running
    wait_until(lambda: "event log refuses" in proc.log(), timeout=20, what="the warning")
    line = next(line for line in proc.log().splitlines() if "event log refuses" in line)
    assert f"the stream key {key!r}" in line and "WRONGTYPE" in line, line
    _assert_readiness_says_refused(proc, key)
    redis_server.command("DEL", key)
    wait_until(proc.ready, timeout=20, what="ready once the key is gone again")


def _assert_readiness_says_refused(proc: DualcastProcess, key: str | None,
                                   error: str = "WRONGTYPE") -> None:
    ready = httpx.get(proc.url + "/readyz", timeout=5)
    assert ready.status_code == 503 and ready.json()["reason"] == "log_refused", ready.text
    assert "detail" not in ready.json(), ready.text  # (the key is for admins and the log)
    admin = httpx.get(proc.url + "/readyz", timeout=5,
                      headers={"Authorization": f"Bearer {token('ops', admin=True)}"}).json()
    what = "the connection" if key is None else f"the stream key {key!r}"
    assert f"refuses {what}: " in admin["detail"], admin
    assert error in admin["detail"], admin


def test_a_database_redis_does_not_have_is_said_to_refuse_the_connection_not_the_key(
    serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    """A URL naming a database past Redis' count (/99 of 16) was logged as "refuses the
    stream key 'websocket-broadcast'": the key was never asked for, the URL is what to fix."""
    proc = serve([], redis_url=redis_server.url.removesuffix("/0") + "/99")
    wait_until(lambda: "since start" in proc.log(), timeout=20, what="the start-up error")
    line = next(line for line in proc.log().splitlines() if "since start" in line)
    assert " ERROR " in line and "refuses the connection since start" in line, line
    assert "stream key" not in line and "DB index is out of range" in line, line
    _assert_readiness_says_refused(proc, None, "DB index is out of range")


def test_a_password_redis_does_not_take_is_said_to_refuse_the_connection(
    serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    """A wrong password (or user) was logged as "unreachable since start", sending the
    operator to the network while Redis answered and refused it; never the password."""
    url = f"redis://ghost:wrong-pass-never-logged@127.0.0.1:{redis_server.port}/0"
    proc = serve([], redis_url=url)
    wait_until(lambda: "since start" in proc.log(), timeout=20, what="the start-up error")
    line = next(line for line in proc.log().splitlines() if "since start" in line)
    assert " ERROR " in line and "refuses the connection since start" in line, line
    assert "unreachable" not in line and "stream key" not in line, line
    assert "wrong-pass-never-logged" not in proc.log()
    _assert_readiness_says_refused(proc, None, "AuthenticationError")


# The secret state file ------------------------------------------------------------------

def test_no_secret_keeps_one_reuses_it_and_token_finds_it(
    serve: Callable[..., DualcastProcess], own_state_home: Path
) -> None:
    proc = serve([], env={"DUALCAST_SECRET": ""})
    kept = own_state_home / "dualcast" / "secret"
    assert kept.is_file()
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    secret = kept.read_text().strip()
    assert len(secret.encode()) >= 32
    wait_until(lambda: "dashboard as admin: http://" in proc.log(), timeout=10, what="the link")
    link = [line for line in proc.log().splitlines() if "dashboard as admin" in line][-1]
    admin = link.rsplit("?token=", 1)[1]
    assert jwt.decode(admin, secret, algorithms=["HS256"])["admin"] is True
    assert secret not in proc.log()
    proc.stop()

    # The next start reuses it: the link printed before still logs in.
    again = serve([], env={"DUALCAST_SECRET": ""})
    assert kept.read_text().strip() == secret
    me = httpx.get(again.url + "/api/me", headers={"Authorization": f"Bearer {admin}"}, timeout=5)
    assert me.status_code == 200 and me.json()["admin"] is True

    # `dualcast token` on the same machine signs with it, with no setup.
    minted = run_cli("token", "--sub", "456")
    assert minted.returncode == 0, minted.stderr
    user = minted.stdout.strip()
    me = httpx.get(again.url + "/api/me", headers={"Authorization": f"Bearer {user}"}, timeout=5)
    assert me.status_code == 200 and me.json()["sub"] == "456"


def test_port_in_use_is_one_line_and_no_link(own_state_home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("serve", "--host", "127.0.0.1", "--port", str(port))
    assert done.returncode == 1
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0]
    assert "--port or DUALCAST_PORT" in lines[0] and "--host" not in lines[0]
    assert "token=" not in done.stderr


@pytest.mark.parametrize(("host", "bound"), [("localhost", "127.0.0.1"), ("::1", "[::1]")])
def test_the_log_names_the_address_bound(host: str, bound: str,
                                         serve: Callable[..., DualcastProcess]) -> None:
    """The log used to repeat the setting (and showed a blank host, which bound every
    interface, as 127.0.0.1): it now says what the socket is bound to."""
    proc = serve(["--host", host], wait=False)
    wait_until(lambda: "dualcast on " in proc.log(), timeout=20, what="the listening line")
    line = next(line for line in proc.log().splitlines() if "dualcast on " in line)
    assert f"dualcast on http://{bound}:{proc.port}: memory engine" in line


def test_a_name_with_only_an_ipv6_address_is_bound_on_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name that resolves to ::1 alone (Debian's /etc/hosts has `::1 ip6-localhost`) was
    looked up as IPv4 only: `--host ip6-localhost` was refused as "not a name or address of
    this machine". Here the resolver is given such a name."""
    real = socket.getaddrinfo
    name = "v6-only.dualcast.test"

    def resolve(host: str, port: object, family: int = 0, *args: object) -> list[Any]:
        if host != name:
            return real(host, port, family, *args)  # type: ignore[arg-type]
        if family == socket.AF_INET:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real("::1", port, socket.AF_INET6, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    for bound in (bind(name, 0), worker_socket(name, 0)):
        with bound:
            assert bound.family == socket.AF_INET6 and bound.getsockname()[0] == "::1"
    with bind("localhost", 0) as sock:  # a name with both stays on IPv4
        assert sock.getsockname()[0] == "127.0.0.1"


def test_a_dashboard_folder_without_its_page_is_a_warning_at_start(
    serve: Callable[..., DualcastProcess], tmp_path: Path
) -> None:
    """A DUALCAST_STATIC_DIR that exists but holds no index.html (the wrong folder, a build
    not yet run) started in silence and printed the admin link to a 404."""
    proc = serve([], env={"DUALCAST_STATIC_DIR": str(tmp_path)})
    assert httpx.get(proc.url + "/", timeout=5).status_code == 404
    wait_until(lambda: "holds no index.html" in proc.log(), timeout=10, what="the warning")
    line = next(line for line in proc.log().splitlines() if "holds no index.html" in line)
    assert " WARNING " in line and f"DUALCAST_STATIC_DIR {tmp_path}" in line, line
    (tmp_path / "index.html").write_text("<!doctype html><title>mine</title>")
    again = serve([], env={"DUALCAST_STATIC_DIR": str(tmp_path)})
    assert httpx.get(again.url + "/", timeout=5).status_code == 200
    assert "index.html" not in again.log()


def test_the_start_up_line_names_the_redis_and_the_stream_key_without_the_password(
    serve: Callable[..., DualcastProcess],
) -> None:
    """It said "redis engine" alone: with several Redis servers or keys, which one this
    instance reads was left to guess."""
    port = free_port()  # (nothing listens there: the line comes before any connect)
    proc = serve(["--redis-url", f"redis://dcuser:pw-never-logged@127.0.0.1:{port}/2"],
                 env={"DUALCAST_STREAM": "orders-events"})
    line = next(line for line in proc.log().splitlines() if "dualcast on " in line)
    assert (f": redis engine at redis://dcuser:***@127.0.0.1:{port}/2, stream "
            "'orders-events', 1 worker") in line, line
    assert "pw-never-logged" not in proc.log()


@pytest.mark.parametrize(("host", "hint"), [
    ("no.such.host.invalid", "--host or DUALCAST_HOST"),  # does not resolve (RFC 6761)
    ("192.0.2.1", "--host or DUALCAST_HOST"),  # an address of another machine (RFC 5737)
    ("[::1]", "without brackets: --host ::1, or DUALCAST_HOST=::1"),
])
def test_a_host_that_cannot_be_bound_gets_a_hint_about_the_host(
    host: str, hint: str, own_state_home: Path,
) -> None:
    """The hint names what to change: it was "(another server? choose a port with --port
    or DUALCAST_PORT)" for a host that does not resolve or is not this machine's."""
    done = run_cli("serve", "--host", host, "--port", str(free_port()))
    assert done.returncode == 1
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "cannot listen on" in lines[0] and hint in lines[0]
    assert "--port" not in lines[0] and "another server" not in lines[0]


def test_a_privileged_port_gets_a_hint_about_the_port(own_state_home: Path) -> None:
    start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if start.exists() and int(start.read_text()) <= 1:
        pytest.skip("this machine lets anybody bind port 1")
    without: list[str] = []  # root binds any port: run it without the capability that allows it
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root, and no setpriv to drop CAP_NET_BIND_SERVICE")
        without = ["setpriv", "--bounding-set=-net_bind_service",
                   "--inh-caps=-net_bind_service"]
    done = subprocess.run([*without, *PY, "serve", "--host", "127.0.0.1", "--port", "1"],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "permission denied" in lines[0] and "below 1024" in lines[0]
    assert "--port or DUALCAST_PORT" in lines[0] and "another server" not in lines[0]


def test_the_link_comes_after_the_server_listens(serve: Callable[..., DualcastProcess]) -> None:
    proc = serve([], env={"DUALCAST_SECRET": ""})
    wait_until(lambda: "dashboard as admin" in proc.log(), timeout=10, what="the link")
    log = proc.log()
    assert log.index("Application startup complete") < log.index("dashboard as admin")


# Stopping -----------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("grace", ["0", "0.5"])
async def test_a_sub_second_grace_stops_cleanly(
    grace: str, serve: Callable[..., DualcastProcess]
) -> None:
    """A grace below 1 s (allowed) reached uvicorn as int 0, and every SIGTERM logged
    "ERROR: Cancel 0 running task(s), timeout graceful shutdown exceeded"."""
    proc = serve([], env={"DUALCAST_SHUTDOWN_GRACE": grace})
    assert proc.proc is not None
    subscribers = [await subscribe(kind, proc.url) for kind in ("ws", "sse")]
    try:
        proc.signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(proc.proc.wait, 20)
    finally:
        for sub in subscribers:
            await sub.close()
    log = proc.log()
    assert exit_code in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log
    assert [line for line in log.splitlines() if "ERROR" in line] == []
    assert log_problems(proc) == []


@pytest.mark.timeout(60)
async def test_a_second_ctrl_c_stops_the_drain_at_once_without_a_traceback(
    serve: Callable[..., DualcastProcess]
) -> None:
    """Ctrl-C drains subscribers over half the grace; a person who pressed it again (as
    uvicorn's "CTRL+C to force quit" invites) waited all the same, then got a traceback
    (the app's lifespan, skipped by uvicorn's forced exit, cancelled with the loop)."""
    proc = serve([], env={"DUALCAST_SHUTDOWN_GRACE": "30"})  # a drain of 15 s
    assert proc.proc is not None
    subscribers = [await subscribe(kind, proc.url) for kind in ("ws", "sse") for _ in range(3)]
    try:
        proc.signal(signal.SIGINT)
        await asyncio.to_thread(wait_until, lambda: "draining 6 subscribers" in proc.log(),
                                timeout=10, what="the drain")
        proc.signal(signal.SIGINT)
        exit_code = await asyncio.to_thread(proc.proc.wait, 5)
    finally:
        for sub in subscribers:
            await sub.close()
    log = proc.log()
    assert exit_code == 0, log
    assert "Traceback" not in log and "ERROR" not in log, log
    assert "Application shutdown complete" in log


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sighup_drains_and_stops_every_process(
    workers: str, serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    """SIGHUP (the terminal or SSH session that started the server closing, or a
    `kill -HUP` meant as a reload) was left to its default: the process ended at once.
    One process cut its clients off without a drain; with --workers 2 the supervisor
    alone died and its workers went on serving the port, unsupervised, for good. It now
    stops as on SIGTERM: every client drained (1001), every process gone, a log line."""
    proc = serve(["--workers", workers], env={"DUALCAST_SHUTDOWN_GRACE": "1"},
                 redis_url=redis_server.url)
    assert proc.proc is not None
    served_by = wait_workers(proc, 2) if workers == "2" else [psutil.Process(proc.pid)]
    ws = await subscribe("ws", proc.url)
    try:
        proc.signal(signal.SIGHUP)
        exit_code = await asyncio.to_thread(proc.proc.wait, 30)
        await asyncio.wait_for(asyncio.shield(ws.conn.done), 10)  # type: ignore[union-attr]
    finally:
        await ws.close()
    log = proc.log()
    assert ws.seen.closed == 1001, (ws.seen.closed, log)
    await asyncio.to_thread(
        wait_until, lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                    for p in served_by),
        timeout=15, what="every serving process gone")
    assert exit_code in (0, -signal.SIGTERM), log
    assert "SIGHUP: stopping" in log, log
    assert "Traceback" not in log and "ERROR" not in log, log


@pytest.mark.timeout(90)
async def test_workers_stop_when_their_supervisor_is_killed(
    serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    """The supervisor of --workers 2 killed with SIGKILL (the OOM killer, a kill -9) left
    its workers serving the port for good: nobody replaced one that died, nobody stopped
    them, and `dualcast serve` started again on that port was refused "address in use".
    A worker now notices its supervisor is gone and stops, draining its clients."""
    proc = serve(["--workers", "2"], env={"DUALCAST_SHUTDOWN_GRACE": "1"},
                 redis_url=redis_server.url)
    workers = wait_workers(proc, 2)
    ws = await subscribe("ws", proc.url)
    try:
        proc.kill()
        await asyncio.wait_for(asyncio.shield(ws.conn.done), 20)  # type: ignore[union-attr]
        await asyncio.to_thread(
            wait_until, lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE
                                        for w in workers),
            timeout=20, what="the workers gone with their supervisor")
    finally:
        await ws.close()
        for worker in workers:  # (only where the test failed)
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
    assert ws.seen.closed == 1001, ws.seen.closed
    assert "supervisor" in proc.log() and "is gone" in proc.log(), proc.log_tail()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_under_nohup_a_hangup_is_still_ignored(
    workers: str, redis_server: RedisProcess, tmp_path: Path
) -> None:
    """`nohup dualcast serve` starts with SIGHUP ignored so that closing the terminal
    leaves it running: taking SIGHUP as a stop must not undo that."""
    port = free_port()
    env = clean_env(DUALCAST_SECRET=SECRET, DUALCAST_REDIS_URL=redis_server.url,
                    XDG_STATE_HOME=str(tmp_path))
    proc = subprocess.Popen(
        [*PY, "serve", "--port", str(port), "--workers", workers], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url + "/readyz", timeout=2).status_code == 200,
                   timeout=30, what="ready")
        children = psutil.Process(proc.pid).children(recursive=True)
        for pid in [proc.pid, *(c.pid for c in children)]:  # the hangup reaches them all
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        for _ in range(20):  # still serving, every worker still there
            assert httpx.get(url + "/healthz", timeout=5).status_code == 200
        assert proc.poll() is None
        assert all(c.is_running() for c in children)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.timeout(120)
def test_the_supervisor_waits_as_long_as_a_worker_may_take_to_stop(
    serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    """A worker holding a client that reads nothing takes up to 0.8 of the grace (the
    drain) plus the grace (uvicorn's wait for connections) to stop; the supervisor
    waited the grace plus 5 s, then killed it ("did not stop within 13s; killing it",
    at a grace of 8 s) just before it finished, its shutdown never run."""


    stream = f"stuck-at-stop-{free_port()}"
    proc = serve(["--workers", "2"], redis_url=redis_server.url,
                 env={"DUALCAST_SHUTDOWN_GRACE": "8", "DUALCAST_STREAM": stream})
    assert proc.proc is not None
    wait_workers(proc, 2)
    # (both started, not only spawned: one still starting when SIGTERM came exited before
    # its "Finished" line, and the count below failed once in CI)
    wait_until(lambda: proc.log().count("Application startup complete") == 2, timeout=30,
               what="both workers started")
    stuck = stuck_reader(proc.port)
    try:
        wait_until(lambda: sum(streams_held(w, proc.port) for w in workers_of(proc)) == 1,
                   timeout=10, what="the stream held by a worker")
        flood(redis_server.port, stream)
        proc.signal(signal.SIGTERM)
        exit_code = proc.proc.wait(60)
    finally:
        stuck.close()
    log = proc.log()
    assert "did not stop" not in log, log[-3000:]
    assert log.count("Finished server process") == 2, log[-3000:]
    assert exit_code == 0, log[-3000:]


@pytest.mark.timeout(90)
def test_clients_cut_at_the_end_of_the_grace_are_no_tracebacks(
    serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    """Streams still open when uvicorn's graceful shutdown times out (clients that read
    nothing) were each logged as "Exception in ASGI application" with a CancelledError
    traceback: one traceback per stuck client, for a cut-off uvicorn's own line already
    reports. That line stays; the tracebacks go."""


    stream = f"cut-at-stop-{free_port()}"
    proc = serve([], redis_url=redis_server.url,
                 env={"DUALCAST_SHUTDOWN_GRACE": "1", "DUALCAST_STREAM": stream})
    assert proc.proc is not None
    stuck = [stuck_reader(proc.port) for _ in range(3)]
    try:
        me = psutil.Process(proc.pid)
        wait_until(lambda: streams_held(me, proc.port) == 3, timeout=10, what="3 streams")
        flood(redis_server.port, stream)
        proc.signal(signal.SIGTERM)
        proc.proc.wait(60)
    finally:
        for sock in stuck:
            sock.close()
    log = proc.log()
    assert "timeout graceful shutdown exceeded" in log, log[-3000:]  # the one line
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


@pytest.mark.timeout(90)
def test_a_client_that_reads_nothing_holds_the_stop_no_longer_than_the_grace(
    serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    """DUALCAST_SHUTDOWN_GRACE is what an operator sets a service manager's stop timeout
    from. One stream whose client reads nothing held the stop to 1.8 times the grace
    (the drain's 0.8, then uvicorn's wait for connections given the whole grace again):
    7.2 s at a grace of 4, where systemd or Kubernetes may already have killed it."""


    grace = 4.0
    stream = f"held-at-stop-{free_port()}"
    proc = serve([], redis_url=redis_server.url,
                 env={"DUALCAST_SHUTDOWN_GRACE": str(grace), "DUALCAST_STREAM": stream})
    assert proc.proc is not None
    stuck = stuck_reader(proc.port)
    try:
        me = psutil.Process(proc.pid)
        wait_until(lambda: streams_held(me, proc.port) == 1, timeout=10, what="the stream")
        flood(redis_server.port, stream)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        proc.proc.wait(60)
        took = time.monotonic() - started
    finally:
        stuck.close()
    log = proc.log()
    assert "Finished server process" in log, log[-3000:]
    # the grace, and a second for the process's own exit on a loaded machine
    assert took < grace + 1.0, f"stopped after {took:.1f}s at a grace of {grace}s"


@pytest.mark.timeout(60)
def test_a_stop_begins_at_once_although_the_main_loop_looks_rarely() -> None:
    """The main loop looks at `should_exit` once a second (uvicorn: ten times a second);
    setting it, as a signal, the supervisor or a test does, wakes the loop. With an hour
    between two looks the server must still stop at once."""
    settings = load_settings(redis_url=None, host="127.0.0.1", port=0, secret=SECRET)
    server = DualcastServer(settings)
    server.TICK = 3600.0
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=20, what="the server to start")
    server.should_exit = True
    thread.join(20)
    assert not thread.is_alive(), "the server did not stop when asked"


def test_a_fractional_grace_is_kept_for_uvicorn() -> None:
    """int() made 3.9 s of grace 3 s of waiting for connections to close (uvicorn's
    wait is now the fifth of the grace the drain leaves: 0.2 of 9.7 s, not 1)."""
    config = uvicorn_config(load_settings(shutdown_grace=9.7, redis_url=None), app=None)
    assert config.timeout_graceful_shutdown == pytest.approx(1.94)


# HTTP details --------------------------------------------------------------------------

WRONG_METHODS = [
    ("GET", "/api/publish", "POST"),
    ("PUT", "/api/publish", "POST"),
    ("GET", "/api/logout", "POST"),
    ("POST", "/api/me", "GET, HEAD"),
    ("DELETE", "/healthz", "GET, HEAD"),
    ("POST", "/metrics", "GET, HEAD"),
    ("POST", "/api/sse", "GET, HEAD"),
]


def test_wrong_method_is_405_with_allow(serve: Callable[..., DualcastProcess]) -> None:
    proc = serve([])
    for method, path, allow in WRONG_METHODS:
        answer = httpx.request(method, proc.url + path, timeout=5)
        assert (answer.status_code, answer.headers.get("allow")) == (405, allow), (method, path)
        if method != "HEAD":
            assert answer.json()["error"] == "method_not_allowed", (method, path)
        assert answer.headers["x-content-type-options"] == "nosniff", (method, path)
    for path in ("/api/nothing-here", "/no-such-file.js"):
        missing = httpx.get(proc.url + path, timeout=5)
        assert missing.status_code == 404, path
        assert missing.json()["error"] == "not_found", path
        assert missing.headers["x-content-type-options"] == "nosniff", path
    assert httpx.get(proc.url + "/healthz", timeout=5).status_code == 200


# Logs never carry a token; a worker that dies is replaced ------------------------------

def test_a_refused_websocket_upgrade_is_one_line_not_two(
    serve: Callable[..., DualcastProcess],
) -> None:
    """Each refused upgrade wrote uvicorn's line (address, path, status) and then
    websockets' "connection rejected (403 Forbidden)", which says nothing more: a
    client retrying in a loop, or a crowd meeting a draining worker, wrote twice the
    lines. One line each now, the informative one."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    proc = serve([])
    for _ in range(10):
        with pytest.raises(InvalidStatus):
            connect(f"{proc.ws_url}/api/ws", origin="http://elsewhere.example",  # type: ignore[arg-type]
                    open_timeout=10)
    wait_until(lambda: proc.log().count('"WebSocket /api/ws" 403') == 10, timeout=10,
               what="uvicorn's line for each refusal")
    assert "connection rejected" not in proc.log(), proc.log_tail()


def test_tokens_never_reach_the_log(serve: Callable[..., DualcastProcess]) -> None:
    from websockets.sync.client import connect

    from tests.conftest import token

    proc = serve(["--log-level", "debug"], env={"DUALCAST_SECRET": ""})
    wait_until(lambda: "dashboard as admin" in proc.log(), timeout=10, what="the link")
    admin = proc.log().split("?token=", 1)[1].split()[0]
    user = token("42")  # signed with another secret: refused, and still not logged
    for tok in (admin, user):
        with connect(f"{proc.ws_url}/api/ws?token={tok}", open_timeout=10) as ws:
            ws.recv(timeout=10)
        httpx.get(f"{proc.url}/api/me?token={tok}", timeout=5)
    wait_until(lambda: proc.log().count("/api/ws?token=***") >= 2, timeout=10,
               what="uvicorn's lines about the upgrades, redacted")
    log = proc.log()
    link_line = [line for line in log.splitlines() if "dashboard as admin" in line]
    rest = log.replace(link_line[0], "")  # the link itself is printed for the person once
    assert admin not in rest and user not in rest


def test_a_worker_that_dies_is_replaced(
    serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    proc = serve(["--workers", "2"], redis_url=redis_server.url)
    first = wait_workers(proc, 2)
    first[0].kill()
    wait_until(lambda: len(workers_of(proc)) == 2
               and first[0].pid not in {w.pid for w in workers_of(proc)},
               timeout=30, what="a new worker in place of the killed one")
    assert "died" in proc.log()
    for _ in range(20):  # whichever worker answers, the server serves
        assert httpx.get(proc.url + "/healthz", timeout=5).status_code == 200
    assert proc.stop() in (0, -15)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in first[1:])


@pytest.mark.timeout(90)
async def test_counters_of_several_workers_never_go_down_between_scrapes(
    serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    """With --workers 2 each scrape of /metrics reaches whichever worker the kernel hands
    the connect. Unlabelled, a series showed one worker's count, then the other's: the
    counters went down and up (3, 2, 3...), which Prometheus reads as resets, so rate()
    counted a worker's whole total again at every switch. Each worker's series now
    carries its slot (`worker="0"`, `"1"`): each series is one process's, and never
    goes down."""
    from prometheus_client.parser import text_string_to_metric_families

    proc = serve(["--workers", "2"], redis_url=redis_server.url,
                 env={"DUALCAST_STREAM": f"workers-metrics-{free_port()}"})
    wait_workers(proc, 2)
    clients = [await subscribe("ws", proc.url) for _ in range(5)]  # never an even split
    try:
        seen: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        workers: set[str] = set()
        went_down: list[str] = []
        async with httpx.AsyncClient(
                timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            for _ in range(40):  # a connect each: the kernel picks a worker for each
                text = (await http.get(proc.url + "/metrics")).text
                for family in text_string_to_metric_families(text):
                    if family.type != "counter":
                        continue
                    for sample in family.samples:
                        workers.add(sample.labels.get("worker", "?"))
                        key = (sample.name, tuple(sorted(sample.labels.items())))
                        if sample.value < seen.get(key, 0):
                            went_down.append(f"{key}: {seen[key]} -> {sample.value}")
                        seen[key] = sample.value
    finally:
        for client in clients:
            await client.close()
    assert went_down == [], went_down[:5]
    assert workers == {"0", "1"}, workers  # 40 scrapes reached both, each labelled


def test_ctrl_c_reaching_a_starting_worker_is_no_traceback(
    serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    """The terminal sends Ctrl-C to the whole process group, workers included: a worker
    still importing in multiprocessing's spawn bootstrap printed a KeyboardInterrupt
    traceback. Here the signal goes to that worker alone (the parent's SIGTERM would
    otherwise race the traceback out of sight)."""
    proc = serve(["--workers", "2"], redis_url=redis_server.url, wait=False)

    def importing() -> psutil.Process | None:
        for worker in workers_of(proc):
            with contextlib.suppress(OSError, psutil.Error):
                if "hiredis" in Path(f"/proc/{worker.pid}/maps").read_text():
                    return worker
        return None

    worker = wait_until(importing, timeout=30, interval=0.001,
                        what="a worker importing in its bootstrap")
    worker.send_signal(signal.SIGINT)
    wait_until(lambda: len(workers_of(proc)) == 2 and worker.pid not in
               {w.pid for w in workers_of(proc)}, timeout=30,
               what="the worker gone and replaced")
    wait_until(lambda: httpx.get(proc.url + "/healthz", timeout=5).status_code == 200,
               timeout=30, what="the server serving")
    assert proc.stop() in (0, -15)
    log = proc.log()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log


# Each worker listens on a socket of its own (SO_REUSEPORT) --------------------------------

def open_stream(host: str, port: int) -> socket.socket:
    """A raw SSE subscriber, held open until closed: it is welcomed once a worker has it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(5)  # a connect or a welcome that hangs fails the test, never blocks it
    try:
        sock.connect((host, port))
        sock.sendall(b"GET /api/sse HTTP/1.1\r\nHost: dualcast\r\n\r\n")
        got = b""
        while b"event: welcome" not in got:
            chunk = sock.recv(4096)
            assert chunk, f"closed before the welcome: {got!r}"
            got += chunk
    except BaseException:
        sock.close()
        raise
    return sock


def stuck_reader(port: int) -> socket.socket:
    """An SSE client that never reads: a small receive buffer, so the server's writes to
    it soon block for good."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /api/sse HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # never read
    return sock


def flood(redis_port: int, stream: str) -> None:
    """12 MB of events: every write to a client that reads nothing blocks for good."""
    import json

    import redis

    raw = redis.Redis(port=redis_port)
    blob = "x" * 60_000
    for _ in range(200):
        raw.xadd(stream, {"data": json.dumps({"event": "big", "data": blob})})
    raw.close()


def streams_held(worker: psutil.Process, port: int) -> int:
    """Established connections a worker holds on the server's port."""
    return sum(1 for c in worker.net_connections("tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def held_by(workers: list[psutil.Process], port: int, total: int) -> list[int]:
    """Each worker's count of the `total` streams, once the workers hold them all."""
    def counts() -> list[int]:
        held = [streams_held(w, port) for w in workers]
        return held if sum(held) == total else []

    return wait_until(counts, timeout=10, what=f"{total} streams held")


@pytest.mark.parametrize(("host", "dial"), [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"),
                                            ("::1", "::1")])
def test_each_worker_listens_on_its_own_socket_and_takes_connects(
    host: str, dial: str, serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    """The kernel hands each connect to one worker's own listening socket; the parent,
    which bound the port first, listens on nothing (a copy of a listening socket there
    would take connects that nobody accepts)."""
    port = free_port()
    proc = serve(["--host", host, "--port", str(port), "--workers", "2"],
                 redis_url=redis_server.url, wait=False)
    workers = wait_workers(proc, 2)
    for worker in workers:
        wait_until(lambda w=worker: listens_on(w, host, port), timeout=30,
                   what=f"worker {worker.pid} listening on {host}:{port}")
    parent = psutil.Process(proc.pid)
    assert not any(c.status == psutil.CONN_LISTEN for c in parent.net_connections("tcp"))
    streams = []
    try:
        for _ in range(40):
            streams.append(open_stream(dial, port))
        held = held_by(workers, port, 40)
        assert all(count > 0 for count in held), held  # P(all 40 on one worker) = 2**-39
    finally:
        for stream in streams:
            stream.close()


def test_connects_after_a_worker_is_killed_go_to_the_others(
    serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    """kill -9 of a worker closes its listening socket with it: every connect made
    right after is served by the survivor (none waits in a dead queue), and the
    replacement, once it listens, takes its share again."""
    proc = serve(["--workers", "2"], redis_url=redis_server.url)
    victim, survivor = wait_workers(proc, 2)
    for worker in (victim, survivor):
        wait_until(lambda w=worker: listens_on(w, "127.0.0.1", proc.port), timeout=30,
                   what=f"worker {worker.pid} listening")
    victim.kill()
    wait_until(lambda: not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE,
               timeout=10, what="the killed worker gone")
    with httpx.Client(timeout=5, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        for _ in range(40):  # a new connection each: the kernel picks a worker for each
            assert http.get(proc.url + "/healthz").status_code == 200
    replacement = wait_until(
        lambda: [w for w in workers_of(proc) if w.pid not in (victim.pid, survivor.pid)
                 and listens_on(w, "127.0.0.1", proc.port)],
        timeout=30, what="a replacement worker listening")[0]
    streams = []
    try:
        for _ in range(40):
            streams.append(open_stream("127.0.0.1", proc.port))
        held = held_by([replacement, survivor], proc.port, 40)
        assert held[0] > 0, held
    finally:
        for stream in streams:
            stream.close()
    assert proc.stop() in (0, -15)


def test_with_every_worker_killed_a_connect_is_served_or_refused_never_left_hanging(
    serve: Callable[..., DualcastProcess], redis_server: RedisProcess
) -> None:
    """With no worker left, nothing listens (the parent's socket never does): a connect
    is refused at once, which a client retries, until a replacement listens."""
    proc = serve(["--workers", "2"], redis_url=redis_server.url)
    workers = wait_workers(proc, 2)
    for worker in workers:
        wait_until(lambda w=worker: listens_on(w, "127.0.0.1", proc.port), timeout=30,
                   what=f"worker {worker.pid} listening")
    for worker in workers:
        worker.kill()
    for worker in workers:
        wait_until(lambda w=worker: not w.is_running() or w.status() == psutil.STATUS_ZOMBIE,
                   timeout=10, what="the killed workers gone")
    try:
        answer = httpx.get(proc.url + "/healthz", timeout=3)
        assert answer.status_code == 200  # a replacement was already listening
    except httpx.ConnectError:
        pass  # refused: nobody listens, and nobody pretends to
    wait_until(lambda: httpx.get(proc.url + "/healthz", timeout=3).status_code == 200,
               timeout=30, what="the replacements serving")


def test_ctrl_c_while_starting_is_no_traceback(tmp_path: Path) -> None:
    """Ctrl-C in the first moments of `dualcast serve` (its imports, a quarter of a second
    or more) printed a KeyboardInterrupt traceback. Now: nothing, and exit 130."""
    env = clean_env(XDG_STATE_HOME=str(tmp_path))
    proc = subprocess.Popen([*PY, "serve", "--port", str(free_port())], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        maps = Path(f"/proc/{proc.pid}/maps")
        # mid-import: the settings' redis (hiredis) is loaded, the server far from listening
        # (not pydantic_core: a signal inside its own init turns into an ImportError)
        wait_until(lambda: "hiredis" in maps.read_text(), timeout=30, interval=0.001,
                   what="the settings being imported")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "Traceback" not in err, err
    assert proc.returncode == 130, (proc.returncode, err)
    assert "/?token=" not in out + err  # it never listened
