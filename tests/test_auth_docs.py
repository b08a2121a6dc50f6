"""docs/auth.md's recipes, run as written against real processes.

Each fenced block marked `<!-- recipe: NAME -->` is taken from the document as
it is; the test only swaps in its own ports, secret and keys. A recipe that
stops working fails here, not in a reader's project.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from tests.conftest import SECRET, require_tool
from tests.harness.procs import ROOT, DualcastProcess, free_port
from tests.harness.waits import wait_until
from tests.issuers import JwksServer, SigningKey
from tests.test_auth_issuers import EVERYWHERE, me, received_everywhere

pytestmark = pytest.mark.timeout(180)

Start = Callable[..., DualcastProcess]
DOC = ROOT / "docs" / "auth.md"


def recipe(name: str) -> str:
    """The body of the fenced block right after `<!-- recipe: name -->`."""
    match = re.search(
        rf"<!-- recipe: {re.escape(name)} -->\n```\w*\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert match is not None, f"docs/auth.md has no recipe {name!r}"
    return match.group(1)


def env_lines(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def plain_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALCAST_")}
    env.update(extra)
    return env


async def test_minting_recipe_in_python(dualcast: Start, tmp_path: Path) -> None:
    script = tmp_path / "mint.py"
    script.write_text(recipe("mint-python"))
    minted = subprocess.run(
        [sys.executable, str(script)], env=plain_env(DUALCAST_SECRET=SECRET),
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()
    server = dualcast()
    described = (await me(server.url, minted)).json()
    assert described["sub"] == "alice" and "ops" in described["rooms"], described
    assert await received_everywhere(server.url, "ops", bearer=minted) == EVERYWHERE


@pytest.fixture(scope="session")
def jose_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with `jose` installed from the npm registry, as the recipe says."""
    require_tool("node", "the Node recipe runs under node")
    npm = require_tool("npm", "the Node recipe installs jose with npm")
    folder = tmp_path_factory.mktemp("jose")
    subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "jose@6"],
        cwd=folder, check=True, capture_output=True, timeout=300,
    )
    return folder


async def test_minting_recipe_in_node(dualcast: Start, jose_dir: Path) -> None:
    script = jose_dir / "mint.mjs"
    script.write_text(recipe("mint-node"))
    minted = subprocess.run(
        ["node", str(script)], cwd=jose_dir, env=plain_env(DUALCAST_SECRET=SECRET),
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()
    server = dualcast()
    described = (await me(server.url, minted)).json()
    assert described["sub"] == "alice" and "ops" in described["rooms"], described
    assert await received_everywhere(server.url, "ops", bearer=minted) == EVERYWHERE


async def test_oidc_recipe(dualcast: Start) -> None:
    settings = env_lines(recipe("oidc-env"))
    provider_key = SigningKey.make("kc-2026", "RS256")
    provider = JwksServer(provider_key).start()
    try:
        server = dualcast(env={**settings, "DUALCAST_JWKS_URL": provider.url})
        claims = {"iss": settings["DUALCAST_JWT_ISSUER"], "aud": ["account", "dualcast"]}
        access = provider_key.token("alice", rooms=["ops"], **claims)
        producer = provider_key.token("billing", publish=True, **claims)
        assert await received_everywhere(
            server.url, "ops", bearer=access, publisher=producer) == EVERYWHERE
        # the same provider's token for another audience does not open dualcast
        other = provider_key.token("alice", iss=claims["iss"], aud="account")
        assert (await me(server.url, other)).status_code == 401
    finally:
        provider.stop()


class Nginx:
    """nginx with one recipe's `server` block, on free ports, run in the foreground."""

    def __init__(self, workdir: Path, site: str) -> None:
        self.workdir = workdir
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        conf = workdir / "nginx.conf"
        temp = " ".join(f"{k}_temp_path {workdir / v};" for k, v in (
            ("client_body", "body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"),
            ("uwsgi", "uwsgi"), ("scgi", "scgi")))
        conf.write_text(
            f"daemon off;\nworker_processes 1;\npid {workdir / 'nginx.pid'};\n"
            f"error_log {workdir / 'error.log'} warn;\nevents {{ worker_connections 256; }}\n"
            f"http {{\naccess_log off;\n{temp}\n{site}\n}}\n"
        )
        self.proc = subprocess.Popen([binary, "-p", str(workdir), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def hook_app(tmp_path: Path) -> Iterator[int]:
    """The recipe's hook, served by uvicorn on a free port; yields the port."""
    (tmp_path / "hook_app.py").write_text(recipe("hook-app"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(tmp_path), "hook_app:app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=plain_env(),
    )
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/auth/dualcast").status_code == 401,
                   timeout=20, what="the recipe's hook app")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def test_hook_recipe_behind_one_nginx_host(
    dualcast: Start, hook_app: int, tmp_path: Path,
) -> None:
    require_tool("nginx", "the recipe puts the app and dualcast behind one nginx host")
    auth_url = env_lines(
        re.search(r"```sh\n(DUALCAST_AUTH_URL=.*?)```", DOC.read_text(), re.DOTALL)
        .group(1)  # type: ignore[union-attr]
    )["DUALCAST_AUTH_URL"].replace(":3000", f":{hook_app}")
    server = dualcast(env={"DUALCAST_AUTH_URL": auth_url})
    port = free_port()
    site = (recipe("hook-nginx").replace("127.0.0.1:3000", f"127.0.0.1:{hook_app}")
            .replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
            .replace("listen 8080;", f"listen 127.0.0.1:{port};"))
    nginx = Nginx(tmp_path / "nginx", site)
    try:
        base = f"http://127.0.0.1:{port}/push"
        wait_until(lambda: httpx.get(base + "/healthz").status_code == 200, timeout=20,
                   what="nginx in front of dualcast")
        signed_in = {"Cookie": "session=s-3f9a"}
        began = time.monotonic()
        described = (await me(base, headers=signed_in)).json()
        assert described["sub"] == "alice" and "ops" in described["rooms"], described
        assert time.monotonic() - began < 5
        assert await received_everywhere(base, "ops", headers=signed_in) == EVERYWHERE
        # A browser's WebSocket names the page's origin, port included (the recipe's
        # 8080): a Host without the port made dualcast refuse it as cross-site (403),
        # and the page's client fell back to SSE.
        page = f"http://127.0.0.1:{port}"
        async with asyncio.timeout(15), websockets.connect(
            base.replace("http://", "ws://") + "/api/ws?rooms=ops", origin=page,  # type: ignore[arg-type]
            additional_headers=signed_in,
        ) as ws:
            welcome = json.loads(await ws.recv())
            assert welcome["type"] == "welcome" and "ops" in welcome["rooms"], welcome
        stranger = await me(base, headers={"Cookie": "session=forged"})
        assert stranger.status_code == 401 and stranger.json()["error"] == "session_refused"
        assert (await me(base)).json()["anonymous"] is True  # no cookie: not asked
    finally:
        nginx.stop()
