"""Shared fixtures: real redis-server and real dualcast processes on free loopback ports."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dualcast.auth import mint_token
from tests.harness.clients import TRANSPORTS, Transport
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.tools import require_tool  # noqa: F401  (tests import it from here)

SECRET = "test-secret-" + "x" * 24


def token(sub: str = "456", rooms: list[str] | None = None, admin: bool = False,
          publish: bool = False, ttl: float = 3600) -> str:
    return mint_token(SECRET, sub, rooms=rooms, admin=admin, publish=publish, ttl=ttl)


def token_of_length(limit: int, *, over: bool) -> str:
    """A valid token for sub 456 as long as it may be within `limit` characters
    (`over=False`: the longest within), or just past it (the shortest over)."""
    within = ""
    for pad in range(limit):
        made = token("456", rooms=["ops", "x" * pad])
        if len(made) > limit:
            return made if over else within
        within = made
    raise AssertionError("never reached the limit")


@pytest.fixture
def make_token() -> Callable[..., str]:
    return token


@pytest.fixture(autouse=True)
def own_state_home(tmp_path_factory: pytest.TempPathFactory,
                   monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test its own XDG_STATE_HOME (inherited by the processes it starts): a server
    without a secret keeps one there, never in the real home, never shared by tests."""
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One redis-server for the session (tests use their own stream keys or cursors)."""
    proc = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield proc
    proc.stop()


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test's own, for tests that kill or restart it."""
    proc = RedisProcess(tmp_path / "redis").start()
    yield proc
    proc.stop()


@pytest.fixture
def dualcast(tmp_path: Path) -> Iterator[Callable[..., DualcastProcess]]:
    """Factory: start dualcast processes that are stopped when the test ends."""
    started: list[DualcastProcess] = []

    def start(redis_url: str | None = None, env: dict[str, str] | None = None,
              args: list[str] | None = None, wait: bool = True,
              port: int | None = None) -> DualcastProcess:
        merged = {"DUALCAST_SECRET": SECRET, **(env or {})}
        proc = DualcastProcess(tmp_path / f"dc{len(started)}", redis_url=redis_url,
                               env=merged, args=args, port=port)
        started.append(proc)
        return proc.start(wait=wait)

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def server_with(redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory,
                ) -> Iterator[Callable[..., DualcastProcess]]:
    """Factory for a module's servers: `server_with({"DUALCAST_MAX_ROOMS": "5"})`.

    Each runs on the session's Redis with the test secret and, unless `env` names
    one, a stream key of its own (so modules never see each other's events); all
    are stopped when the module ends. Several servers given one DUALCAST_STREAM
    form a cluster.
    """
    started: list[DualcastProcess] = []

    def start(env: dict[str, str] | None = None, name: str = "server") -> DualcastProcess:
        merged = {"DUALCAST_SECRET": SECRET, "DUALCAST_STREAM": f"{name}-{uuid.uuid4().hex}",
                  **(env or {})}
        proc = DualcastProcess(tmp_path_factory.mktemp(name), redis_url=redis_server.url,
                               env=merged)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> Transport:
    """Each subscriber transport in turn, for behaviour that is the same on all three
    (use with `tests.harness.clients.subscribe`)."""
    value: Transport = request.param
    return value
