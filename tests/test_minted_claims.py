"""Tokens the CLI mints itself carry the issuer and audience the server checks.

With DUALCAST_JWT_ISSUER / DUALCAST_JWT_AUDIENCE set, the server refuses any token
without the matching `iss` and `aud`; the admin link `serve` prints and the token
`dualcast publish --url` makes for itself must carry them, or a person following the
README gets a link that does not sign in and a publish that answers 401.
Real processes: `python -m dualcast serve` children, `python -m dualcast publish`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import httpx

from tests.conftest import SECRET
from tests.harness.procs import ROOT, DualcastProcess
from tests.harness.waits import wait_until

CLAIMS = {"DUALCAST_JWT_ISSUER": "https://id.example.test",
          "DUALCAST_JWT_AUDIENCE": "dualcast-dashboard,dualcast-api"}


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m dualcast ARGS` with only the dualcast settings given here."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DUALCAST_")}
    return subprocess.run([sys.executable, "-m", "dualcast", *args], cwd=ROOT, text=True,
                          env={**clean, **env}, capture_output=True, timeout=30)


def printed_link(proc: DualcastProcess) -> str:
    wait_until(lambda: "dashboard as admin: http://" in proc.log(), timeout=15,
               what="the admin link")
    line = [ln for ln in proc.log().splitlines() if "dashboard as admin" in ln][-1]
    return line.rsplit(" ", 1)[1]


def test_the_printed_admin_link_signs_in(dualcast: Callable[..., DualcastProcess]) -> None:
    proc = dualcast(None, env={"DUALCAST_SECRET": "", **CLAIMS})  # the kept secret signs
    link = printed_link(proc)
    with httpx.Client(timeout=5) as browser:  # as a browser does: the link, then the page
        landing = browser.get(link, follow_redirects=True)
        assert landing.status_code == 200, landing.text
        me = browser.get(proc.url + "/api/me")
    assert me.status_code == 200, me.text
    assert me.json()["admin"] is True and me.json()["anonymous"] is False

    # `dualcast publish --url` on the same machine signs with that kept secret, too
    done = cli("publish", "usage_log_added", '{"n": 1}', "--url", proc.url, **CLAIMS)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().count("-") == 1, done.stdout


def test_publish_url_mints_what_the_server_accepts(
    dualcast: Callable[..., DualcastProcess],
) -> None:
    proc = dualcast(None, env=CLAIMS)  # the fixture gives it DUALCAST_SECRET=SECRET
    done = cli("publish", "session_created", '{"sessionId": "s1"}', "--url", proc.url,
               DUALCAST_SECRET=SECRET, **CLAIMS)
    assert done.returncode == 0, done.stderr
    entry = done.stdout.strip()
    polled = httpx.get(proc.url + "/api/events", params={"after": "0-0", "timeout": 0},
                       timeout=5)  # public: the event went to no room
    assert entry in [e["id"] for e in polled.json()["events"]], polled.text

    # without the claims the server still refuses a token minted the old way
    bare = cli("publish", "session_created", "{}", "--url", proc.url, DUALCAST_SECRET=SECRET)
    assert bare.returncode == 1 and "401" in bare.stderr
