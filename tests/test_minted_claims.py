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
from pathlib import Path

import httpx
import jwt

from dualcast.keys import generate, private_pem, public_pem
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


# The algorithm: one DUALCAST_JWT_ALGORITHMS lists, or no token and one line saying why ------

def algorithm_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["alg"])


def me(proc: DualcastProcess, token: str) -> httpx.Response:
    return httpx.get(proc.url + "/api/me", headers={"Authorization": f"Bearer {token}"},
                     timeout=5)


def test_with_hs512_listed_the_cli_mints_hs512(
    dualcast: Callable[..., DualcastProcess],
) -> None:
    """Only HS512 accepted: the link, `publish --url` and `token` sign with HS512 (they
    were HS256, refused with "the token must be signed with HS512")."""
    algorithms = {"DUALCAST_JWT_ALGORITHMS": "HS512"}
    proc = dualcast(None, env={"DUALCAST_SECRET": "", **algorithms})  # the kept secret
    link = printed_link(proc)
    admin = link.split("?token=", 1)[1]
    assert algorithm_of(admin) == "HS512"
    assert me(proc, admin).json()["admin"] is True, me(proc, admin).text

    done = cli("publish", "usage_log_added", '{"n": 1}', "--url", proc.url, **algorithms)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().count("-") == 1, done.stdout

    minted = cli("token", "--sub", "alice", **algorithms)
    assert minted.returncode == 0, minted.stderr
    user = minted.stdout.strip()
    assert algorithm_of(user) == "HS512"
    assert me(proc, user).json()["sub"] == "alice", me(proc, user).text
    # the kept secret is long enough for HS512 (RFC 7518 3.2: 64 bytes): PyJWT stays quiet
    assert "InsecureKeyLengthWarning" not in minted.stderr + done.stderr
    assert "InsecureKeyLengthWarning" not in proc.log()


def test_with_hs256_after_a_key_algorithm_the_cli_mints_hs256(
    dualcast: Callable[..., DualcastProcess], tmp_path: Path,
) -> None:
    """`ES256,HS256`: the secret signs HS256, the first HS* listed (ES256 needs a key)."""
    public = tmp_path / "k.pub.pem"
    public.write_bytes(public_pem(generate("ES256").public_key()))
    env = {"DUALCAST_JWT_ALGORITHMS": "ES256,HS256", "DUALCAST_PUBLIC_KEY": f"@{public}"}
    proc = dualcast(None, env={"DUALCAST_SECRET": "", **env})
    admin = printed_link(proc).split("?token=", 1)[1]
    assert algorithm_of(admin) == "HS256"
    assert me(proc, admin).json()["admin"] is True, me(proc, admin).text


def test_with_only_a_key_algorithm_no_link_and_one_line_how(
    dualcast: Callable[..., DualcastProcess], tmp_path: Path,
) -> None:
    """docs/auth.md's ES256 recipe without DUALCAST_SECRET: the CLI holds no private key,
    so no link (it was an HS256 one the server refused) and no kept secret; one line
    says how to get a token, and `dualcast token` / `publish --url` refuse likewise."""
    key = generate("ES256")
    private, public = tmp_path / "k1.pem", tmp_path / "k1.pub.pem"
    private.write_bytes(private_pem(key))
    public.write_bytes(public_pem(key.public_key()))
    env = {"DUALCAST_JWT_ALGORITHMS": "ES256", "DUALCAST_PUBLIC_KEY": f"@{public}"}
    proc = dualcast(None, env={"DUALCAST_SECRET": "", **env})
    wait_until(lambda: "no admin link" in proc.log(), timeout=15, what="the no-link line")
    said = [ln for ln in proc.log().splitlines() if ln.startswith("dualcast:")]
    assert len(said) == 1, said
    assert "ES256" in said[0] and "dualcast token --key @private.pem --alg ES256" in said[0]
    assert "token=ey" not in proc.log()
    assert not (Path(os.environ["XDG_STATE_HOME"]) / "dualcast" / "secret").exists()

    refused = cli("token", "--sub", "alice", DUALCAST_SECRET=SECRET, **env)
    assert refused.returncode == 2 and refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "ES256" in lines[0] and "--key" in lines[0], refused.stderr

    no_token = cli("publish", "e", "{}", "--url", proc.url, DUALCAST_SECRET=SECRET, **env)
    assert no_token.returncode == 2 and no_token.stdout == ""
    lines = no_token.stderr.strip().splitlines()
    assert len(lines) == 1 and "--token" in lines[0] and "ES256" in lines[0], no_token.stderr

    # with the private key and no --alg: the algorithm the server lists
    minted = cli("token", "--sub", "alice", "--key", f"@{private}", **env)
    assert minted.returncode == 0, minted.stderr
    assert algorithm_of(minted.stdout.strip()) == "ES256"
    assert me(proc, minted.stdout.strip()).json()["sub"] == "alice"

    # a key of another kind than the server lists: refused, not a token it refuses
    other = tmp_path / "rsa.pem"
    other.write_bytes(private_pem(generate("RS256")))
    wrong = cli("token", "--sub", "alice", "--key", f"@{other}", **env)
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert len(wrong.stderr.strip().splitlines()) == 1 and "ES256" in wrong.stderr


def test_the_admin_link_is_on_stdout_and_said_once_in_a_terminal(tmp_path: Path) -> None:
    """The link was on stderr only, with the log: a script or supervisor reading the
    command's output (stdout) never saw it. It is on stdout now, and on stderr as well
    when that is another file; where both are one (a terminal, a journal), once."""
    from tests.harness.procs import clean_env, free_port

    env = clean_env({"XDG_STATE_HOME": str(tmp_path / "state")})
    for both_in_one in (False, True):
        out_path, err_path = tmp_path / f"out-{both_in_one}", tmp_path / f"err-{both_in_one}"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dualcast", "serve", "--host", "127.0.0.1",
                 "--port", str(free_port())],
                cwd=ROOT, env=env, stdout=out,
                stderr=subprocess.STDOUT if both_in_one else err)
            try:
                wait_until(lambda p=out_path: "dashboard as admin: http://" in p.read_text(),
                           timeout=20, what="the admin link on stdout")
            finally:
                proc.terminate()
                proc.wait(20)
        stdout, stderr = out_path.read_text(), err_path.read_text()
        if both_in_one:
            assert stdout.count("dashboard as admin: http://") == 1, stdout
        else:
            assert stdout.count("dashboard as admin: http://") == 1, stdout
            assert stderr.count("dashboard as admin: http://") == 1, stderr
            assert "Uvicorn" not in stdout and "INFO" not in stdout  # the log stays on stderr
