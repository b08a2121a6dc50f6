"""The README doctest: its command blocks, taken from README.md itself, run as written.

A fresh venv gets exactly the README's install (`pip install -e .`, no extras,
so a dependency only the tests pull in cannot hide), then the blocks run in
bash against real servers and a real redis-server. Every ```sh block carries
a `<!-- readme-test: NAME -->` line: a block this file knows how to check, or
`skip: <why>`; a new block without one fails here, so the README cannot drift
past its test. The only change made to a block: the README's ports (8000, and
Redis on 6379) become free ports of this test, never the machine's own.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import require_tool
from tests.harness.procs import ROOT, RedisProcess, free_port
from tests.harness.waits import wait_until

pytestmark = [pytest.mark.readme, pytest.mark.timeout(240)]

README = ROOT / "README.md"
MARK = re.compile(r"<!-- readme-test: (?P<name>[a-z-]+)(?::\s*(?P<why>.+?))? -->\n```sh\n"
                  r"(?P<body>.*?)\n```", re.DOTALL)
KNOWN = {"quick-start", "using-it", "redis-cli"}


@dataclass
class Block:
    name: str
    body: str
    why: str | None


def readme_blocks() -> list[Block]:
    text = README.read_text()
    blocks = [Block(m["name"], m["body"], m["why"]) for m in MARK.finditer(text)]
    unmarked = text.count("```sh\n") - len(blocks)
    assert unmarked == 0, f"{unmarked} ```sh block(s) in README.md without a readme-test mark"
    for block in blocks:
        assert block.name in KNOWN or (block.name == "skip" and block.why), block
    return blocks


def block(name: str) -> str:
    [found] = [b.body for b in readme_blocks() if b.name == name]
    return found


def ported(body: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in body, f"the README block no longer says {old!r}: update this test"
        body = body.replace(old, new)
    return body


class Shell:
    """One README block running in bash, in its own process group, output to a file."""

    def __init__(self, script: str, env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(["bash", "-ec", script], cwd=ROOT, env=env,
                                     stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        def seen() -> re.Match[str] | None:
            if self.proc.poll() not in (None, 0):
                raise AssertionError(f"the block failed ({self.proc.returncode}):\n"
                                     f"{self.output()[-3000:]}")
            return re.search(pattern, self.output(), re.MULTILINE)
        try:
            return wait_until(seen, timeout=timeout, interval=0.1, what=pattern)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- output:\n{self.output()[-3000:]}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the block's group: bash, its server
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._out.close()


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty venv; the quick-start block installs dualcast into it, as a newcomer does."""
    path = tmp_path_factory.mktemp("readme") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    return path


def block_env(venv: Path, **extra: str) -> dict[str, str]:
    """The environment of a newcomer's shell: the fresh venv first on PATH, nothing of
    this project's .venv, no dualcast settings."""
    ours = str(ROOT / ".venv" / "bin")
    path = [str(venv / "bin"), *(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                 if p and p != ours)]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DUALCAST_", "PYTHON", "VIRTUAL_ENV")) and k != "REDIS_URL"}
    env.update(PATH=os.pathsep.join(path), VIRTUAL_ENV=str(venv), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.fixture
def shells() -> Iterator[list[Shell]]:
    started: list[Shell] = []
    yield started
    for shell in started:
        shell.stop()


def test_every_sh_block_is_marked() -> None:
    names = [b.name for b in readme_blocks()]
    assert {"quick-start", "using-it", "redis-cli"} <= set(names)


def test_the_quick_start_says_which_python_and_where_to_install() -> None:
    """`python3 -m pip install -e .` as the first command on a fresh Debian or Ubuntu
    ended in `externally-managed-environment` (their Python refuses pip outside a venv),
    and on Python 3.10 in pip's "requires a different Python"; the README said neither."""
    text = README.read_text()
    before = " ".join(text[text.index("## Quick start"):
                           text.index("<!-- readme-test: quick-start -->")].split())
    pyproject = (ROOT / "pyproject.toml").read_text()
    least = re.search(r'requires-python = ">=(\d+\.\d+)"', pyproject)
    assert least is not None
    assert f"Python {least[1]} or newer" in before
    assert "python3 -m venv .venv && . .venv/bin/activate" in before


def test_readme_blocks_on_a_plain_install(venv: Path, fresh_redis: RedisProcess,
                                          shells: list[Shell], tmp_path: Path) -> None:
    require_tool("curl", "the README's commands use it")
    require_tool("redis-cli", "the README's XADD example uses it")

    # Quick start: the install itself, then `dualcast serve --demo` (on a free port).
    port = free_port()
    quick = Shell(block("quick-start"), block_env(venv, DUALCAST_PORT=str(port)),
                  tmp_path / "quick-start.log")
    shells.append(quick)
    link = quick.wait_for(rf"open the dashboard as admin: (http://127\.0\.0\.1:{port}/\?token=\S+)",
                          timeout=170)[1]
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list"],
                               capture_output=True, text=True, timeout=60).stdout
    assert "pytest" not in installed and "hypothesis" not in installed  # no extras
    login = httpx.get(link, follow_redirects=False, timeout=5)
    assert login.status_code == 303 and "dualcast_token=" in login.headers["set-cookie"]
    admin = link.split("?token=", 1)[1]
    with httpx.stream("GET", f"http://127.0.0.1:{port}/api/sse?token={admin}", timeout=10) as sse:
        names = []
        for line in sse.iter_lines():
            if line.startswith("event: "):
                names.append(line.removeprefix("event: "))
            if len(names) >= 2:
                break
    assert names[0] == "welcome" and names[1] != "welcome"  # the demo's traffic arrives
    # the Quick start's own publish, through the server (the memory engine is inside it)
    said = re.search(r"`(dualcast publish hello '[^`]+' --url http://127\.0\.0\.1:8000)`",
                     README.read_text())
    assert said is not None, "the Quick start no longer says how to publish: update this test"
    command = ported(said[1], {"127.0.0.1:8000": f"127.0.0.1:{port}"})
    published = subprocess.run(["bash", "-ec", command], env=block_env(venv),
                               capture_output=True, text=True, timeout=60)
    assert published.returncode == 0, published.stderr
    assert re.fullmatch(r"\d+-\d+\n", published.stdout), published.stdout
    poll = httpx.get(f"http://127.0.0.1:{port}/api/events",
                     params={"after": "0", "timeout": "0"}, timeout=10).json()
    assert ("hello", {"n": 1}) in [(e["event"], e["data"]) for e in poll["events"]], poll
    quick.stop()

    # Using it: Redis, tokens, publish both ways, a long-poll, an SSE stream.
    port = free_port()
    script = ported(block("using-it"), {
        "127.0.0.1:6379": f"127.0.0.1:{fresh_redis.port}",
        "127.0.0.1:8000": f"127.0.0.1:{port}",
        "--port 8000": f"--port {port}",
    })
    using = Shell(script, block_env(venv), tmp_path / "using-it.log")
    shells.append(using)
    using.wait_for(r"^event: welcome$", timeout=60)
    out = using.output()
    ids = re.findall(r"^\d+-\d+$", out, re.MULTILINE)
    assert len(ids) >= 2, out  # both publishes printed their stream ids
    assert re.search(r'^\{"id":"\d+-\d+"\}', out, re.MULTILINE), out  # and curl's, over HTTP
    assert '"event":"deploy"' in out and '"v":2' in out  # the long-poll saw the public one
    assert '"user-456"' in out and '"ops"' in out  # the user's stream joined its rooms
    assert "Traceback" not in out and "ModuleNotFoundError" not in out

    # The XADD example, against this test's Redis (the README's is the one on 6379).
    redis_cli = shutil.which("redis-cli")
    shim = f'redis-cli() {{ "{redis_cli}" -p {fresh_redis.port} "$@"; }}\n'
    xadd = Shell(shim + block("redis-cli"), block_env(venv), tmp_path / "redis-cli.log")
    shells.append(xadd)
    assert xadd.proc.wait(30) == 0, xadd.output()
    assert re.fullmatch(r"\d+-\d+\n", xadd.output()), xadd.output()
    assert b"metrics_update" in fresh_redis.command("XREVRANGE", "websocket-broadcast", "+",
                                                     "-", "COUNT", "1")
