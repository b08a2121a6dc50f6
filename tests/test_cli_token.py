"""`dualcast token`, the admin URL of a secret-less `dualcast serve`, `dualcast publish --url`.

The CLI runs as a real subprocess (`python -m dualcast ...`), as a user would run it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import jwt
import pytest
import redis

from tests.conftest import SECRET, token
from tests.harness.procs import ROOT, DualcastProcess, RedisProcess
from tests.harness.waits import wait_until


def cli(*args: str, secret: str | None = SECRET,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    given = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALCAST_")}
    env.pop("REDIS_URL", None)
    if secret is not None:
        env["DUALCAST_SECRET"] = secret
    env.update(given)
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def decode(tok: str, secret: str = SECRET) -> dict[str, object]:
    return dict(jwt.decode(tok, secret, algorithms=["HS256"]))


def test_token_carries_the_claims_asked_for() -> None:
    before = time.time()
    done = cli("token", "--sub", "456", "--room", "R", "--room", "team-x", "--admin",
               "--publish", "--ttl", "1h")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    claims = decode(lines[0])
    assert claims["sub"] == "456"
    assert claims["rooms"] == ["R", "team-x"]
    assert claims["admin"] is True and claims["publish"] is True
    assert before + 3600 - 5 <= float(claims["exp"]) <= time.time() + 3600 + 5  # type: ignore[arg-type]


@pytest.mark.parametrize(("ttl", "seconds"), [("90s", 90), ("30m", 1800), ("7d", 7 * 86400),
                                              ("120", 120)])
def test_token_ttl_units(ttl: str, seconds: int) -> None:
    done = cli("token", "--sub", "7", "--ttl", ttl)
    assert done.returncode == 0, done.stderr
    claims = decode(done.stdout.strip())
    assert abs(float(claims["exp"]) - time.time() - seconds) < 10  # type: ignore[arg-type]
    assert claims["admin"] is False and claims["publish"] is False and claims["rooms"] == []


def test_token_with_explicit_secret_and_errors() -> None:
    other = "cli-secret-" + "z" * 24
    done = cli("token", "--sub", "1", "--secret", other, secret=None)
    assert done.returncode == 0, done.stderr
    assert decode(done.stdout.strip(), other)["sub"] == "1"

    missing = cli("token", "--sub", "1", secret=None)
    assert missing.returncode == 2 and missing.stdout == ""
    assert "DUALCAST_SECRET" in missing.stderr

    bad_ttl = cli("token", "--sub", "1", "--ttl", "soon")
    assert bad_ttl.returncode == 2 and "--ttl" in bad_ttl.stderr and bad_ttl.stdout == ""

    no_sub = cli("token")
    assert no_sub.returncode == 2 and "--sub" in no_sub.stderr


@pytest.mark.parametrize(("args", "flag"), [
    (["--sub", "1", "--ttl", "0"], "--ttl"), (["--sub", "1", "--ttl", "0s"], "--ttl"),
    (["--sub", "1", "--ttl", "0.0h"], "--ttl"), (["--sub", ""], "--sub"),
])
def test_token_refuses_what_every_server_refuses(args: list[str], flag: str) -> None:
    """`--ttl 0` printed a token already expired and `--sub ''` one without a subject,
    with exit 0: every server answered them token_expired / invalid_token."""
    done = cli("token", *args)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"argument {flag}:" in lines[0], done.stderr


@pytest.mark.parametrize("room", ["ops team", "", "a,b"])
def test_token_refuses_a_room_no_event_could_reach(room: str) -> None:
    """`--room 'ops team'` made a token for a room that `dualcast publish --room` and
    POST /api/publish refuse by the same pattern: a subscription nothing could reach."""
    done = cli("token", "--sub", "1", "--room", "ops", "--room", room)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dualcast token: --room: ")
    assert repr(room) in lines[0] and "DUALCAST_ROOM_PATTERN" in lines[0]
    wider = cli("token", "--sub", "1", "--room", "ops/team",
                env={"DUALCAST_ROOM_PATTERN": "^[a-z/]{1,64}$"})
    assert wider.returncode == 0 and decode(wider.stdout.strip())["rooms"] == ["ops/team"]


def test_minted_token_works_against_a_server(dualcast: Callable[..., DualcastProcess]) -> None:
    server = dualcast()
    tok = cli("token", "--sub", "456", "--room", "team-x", "--ttl", "10m").stdout.strip()
    me = httpx.get(server.url + "/api/me", headers={"Authorization": f"Bearer {tok}"}).json()
    assert me["sub"] == "456" and set(me["rooms"]) == {"team-x", "user-456"}


def test_serve_without_secret_prints_a_working_admin_url(tmp_path: Path) -> None:
    proc = DualcastProcess(tmp_path / "nosecret")  # no DUALCAST_SECRET in its environment
    try:
        proc.start()
        match = wait_until(
            lambda: re.search(r"(http://\S+/\?token=(\S+))", proc.log()), timeout=10,
            what="the admin URL in the output",
        )
        assert match is not None
        url, tok = match.group(1), match.group(2)
        assert url.startswith(f"http://127.0.0.1:{proc.port}/?token=")
        claims = jwt.decode(tok, options={"verify_signature": False})
        # what the README's Quick start says of it
        assert "The link's token is good for 7 days" in (ROOT / "README.md").read_text()
        assert claims["exp"] - claims["iat"] == 7 * 86400
        text = proc.log()
        assert "DUALCAST_SECRET" in text and "instances" in text  # the warning
        with httpx.Client(timeout=10) as client:
            login = client.get(url)
            assert login.status_code == 303 and login.headers["location"] == "/"
            assert "dualcast_token" in client.cookies
            me = client.get(proc.url + "/api/me").json()
            assert me["admin"] is True and me["anonymous"] is False
            # The process secret is not a fixed one: tests' tokens do not work here.
            refused = client.get(proc.url + "/api/me",
                                 headers={"Authorization": f"Bearer {token()}"})
            assert refused.status_code == 401
            published = client.post(proc.url + "/api/publish",
                                     headers={"Authorization": f"Bearer {tok}"},
                                     json={"event": "hello", "data": 1, "rooms": ["admin"]})
            assert published.status_code == 202
    finally:
        proc.stop()


def test_serve_with_a_secret_says_how_to_get_the_admin_link(
    dualcast: Callable[..., DualcastProcess],
) -> None:
    """With DUALCAST_SECRET set (the README's "Using it") the quick start's admin link
    was simply not printed, and nothing said why or how to open the dashboard: now one
    line says which command makes the token, and never prints a token itself."""
    server = dualcast()  # DUALCAST_SECRET set
    wait_until(lambda: "no admin link" in server.log(), timeout=15, what="the no-link line")
    [line] = [ln for ln in server.log().splitlines() if "no admin link" in ln]
    assert "DUALCAST_SECRET is set" in line and "token=ey" not in server.log()
    assert "`dualcast token --sub admin --admin`" in line
    assert line.endswith(f"open {server.url}/?token=<token>"), line
    minted = cli("token", "--sub", "admin", "--admin")  # the command it names, as named
    assert minted.returncode == 0, minted.stderr
    with httpx.Client(timeout=10) as browser:
        login = browser.get(f"{server.url}/?token={minted.stdout.strip()}")
        assert login.status_code == 303 and "dualcast_token" in browser.cookies
        assert browser.get(server.url + "/api/me").json()["admin"] is True


def test_publish_url_without_a_scheme_is_refused_in_one_line(tmp_path: Path) -> None:
    """`--url 127.0.0.1:8000` said "--url needs a publish token" with no secret at hand,
    and with one "127.0.0.1:8000 is not reachable: Request URL is missing an 'http://'
    ...": neither said the URL itself was the trouble."""
    for secret in (None, SECRET):
        done = cli("publish", "x", "{}", "--url", "127.0.0.1:9", secret=secret,
                   env={"XDG_STATE_HOME": str(tmp_path)})
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        assert done.stderr == ("dualcast publish: --url '127.0.0.1:9' is not a server's base "
                               "URL: give it with its scheme, e.g. http://127.0.0.1:8000\n")


def test_publish_url_refused_for_the_secret_it_signed_with_says_which(
    dualcast: Callable[..., DualcastProcess], tmp_path: Path,
) -> None:
    """The quick start's server signs with the secret it keeps; a shell that exported the
    README's DUALCAST_SECRET then got "401: ... signature does not match this server"
    from `dualcast publish --url`, with no word of which secret the command had used."""
    server = dualcast()  # signs with SECRET
    other = "o" * 40
    exported = cli("publish", "x", "{}", "--url", server.url, secret=other)
    assert exported.returncode == 1 and "invalid_token" in exported.stderr
    assert exported.stderr.rstrip().endswith(
        "(the token this command made was signed with DUALCAST_SECRET: give the server's "
        "own secret, or --token)"), exported.stderr
    kept = tmp_path / "dualcast" / "secret"
    kept.parent.mkdir()
    kept.write_text(other + "\n")
    from_file = cli("publish", "x", "{}", "--url", server.url, secret=None,
                    env={"XDG_STATE_HOME": str(tmp_path)})
    assert from_file.returncode == 1
    assert f"signed with the secret kept in {kept}:" in from_file.stderr, from_file.stderr
    given = cli("publish", "x", "{}", "--url", server.url, "--token", token("p", publish=True),
                secret=other)  # a token given is not this command's to explain
    assert given.returncode == 0, given.stderr


def test_publish_url_mints_a_token_from_the_secret(
    dualcast: Callable[..., DualcastProcess], tmp_path: Path,
) -> None:
    server = dualcast()
    done = cli("publish", "note", '{"n": 1}', "--room", "user-456", "--url", server.url)
    assert done.returncode == 0, done.stderr
    entry_id = done.stdout.strip()
    answer = httpx.get(server.url + "/api/events",
                       params={"after": "0", "timeout": "0", "token": token("456")}).json()
    assert [(e["id"], e["event"], e["data"]) for e in answer["events"]] == [
        (entry_id, "note", {"n": 1})]
    hidden = httpx.get(server.url + "/api/events",
                       params={"after": "0", "timeout": "0", "token": token("789")}).json()
    assert hidden["events"] == []

    # no secret here and none kept: no token to send, said before any request (it was
    # the server's bare 401 back)
    anonymous = cli("publish", "note", "{}", "--url", server.url, secret=None,
                    env={"XDG_STATE_HOME": str(tmp_path)})
    assert anonymous.returncode == 2 and anonymous.stdout == ""
    assert anonymous.stderr.startswith("dualcast publish: --url needs a publish token: pass "
                                       "--token"), anonymous.stderr
    plain = cli("publish", "note", "{}", "--url", server.url, "--token", token("456"),
                secret=None)
    assert plain.returncode == 1 and "403" in plain.stderr
    given = cli("publish", "note", "{}", "--url", server.url,
                "--token", token("p", publish=True), secret=None)
    assert given.returncode == 0, given.stderr


def test_publish_says_why_redis_did_not_take_the_event(redis_server: RedisProcess) -> None:
    """Not "unreachable" for a Redis that answered: its own reason, in one line."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.set("cli-clash", "a string, not a stream")
    finally:
        client.close()
    done = cli("publish", "note", "{}", "--redis-url", redis_server.url,
               env={"DUALCAST_STREAM": "cli-clash"})
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not take the event" in lines[0], done.stderr
    assert "WRONGTYPE" in lines[0]


def test_publish_to_a_redis_that_wants_a_password_says_so(fresh_redis: RedisProcess) -> None:
    """Without a password in the URL the line quoted Redis's answer to redis-py's own
    handshake ("HELLO must be called with the client already authenticated ..."), a
    command the person never ran; it now says the URL lacks the password."""
    assert b"+OK" in fresh_redis.command("CONFIG", "SET", "requirepass", "pw-of-this-test")
    done = cli("publish", "note", "{}", "--redis-url", fresh_redis.url)
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert "did not take the event" in line and "HELLO" not in line
    assert "requires a password and the URL has none: redis://:PASSWORD@host" in line
    given = cli("publish", "note", "{}", "--redis-url",
                f"redis://:pw-of-this-test@127.0.0.1:{fresh_redis.port}/0")
    assert given.returncode == 0, given.stderr


def test_demo_to_a_redis_that_wants_a_password_says_so(fresh_redis: RedisProcess) -> None:
    """`dualcast demo`'s outage warning quoted the same HELLO sentence; a Redis that
    refuses it at the start now ends the demo in one line, exit 1."""
    assert b"+OK" in fresh_redis.command("CONFIG", "SET", "requirepass", "pw-of-this-test")
    done = cli("demo", "--redis-url", fresh_redis.url, secret=None)
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert "HELLO" not in line
    assert "requires a password and the URL has none" in line


def test_publish_url_that_is_no_dualcast_server_is_one_line(
    dualcast: Callable[..., DualcastProcess],
) -> None:
    """`--url` at another web server printed its whole HTML error page, and `--url
    http://host:port/api` a bare "405: method_not_allowed"; both are one line saying
    what to check."""
    import http.server
    import threading

    class Other(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_error(404, "Not Found")  # a page of HTML over several lines

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{other.server_address[1]}"
        done = cli("publish", "note", "{}", "--url", url)
    finally:
        other.shutdown()
        other.server_close()
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line == (f"dualcast publish: {url}/api/publish answered 404 Not Found, which is no "
                    "dualcast answer: is --url a dualcast server (or is a proxy in the way)?")

    server = dualcast()
    wrong = cli("publish", "note", "{}", "--url", server.url + "/api")
    assert wrong.returncode == 1
    [line] = wrong.stderr.strip().splitlines()
    assert line.startswith(f"dualcast publish: {server.url}/api/api/publish answered 405 "
                           "method_not_allowed: no publish endpoint there; --url is the "
                           "server's base URL")


def test_publish_url_behind_a_redirect_names_the_url_to_give() -> None:
    """`--url http://push.example.com` where nginx sends http:// to https:// answered
    "301 Moved Permanently, which is no dualcast answer"; the line now names the URL
    to give (the redirect is not followed: a 301 turns a POST into a GET, and another
    origin would not get the token)."""
    import http.server
    import threading

    class Front(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(301)
            self.send_header("Location", f"https://push.example.com{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Front)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{front.server_address[1]}"
        done = cli("publish", "note", "{}", "--url", url, "--token", "t")
    finally:
        front.shutdown()
        front.server_close()
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line == (f"dualcast publish: {url}/api/publish redirects (301) to "
                    "https://push.example.com/api/publish: give --url https://push.example.com")


def test_publish_url_over_https_with_a_private_ca(
    dualcast: Callable[..., DualcastProcess], tmp_path: Path,
) -> None:
    """An https:// --url whose certificate a private CA signed was "not reachable" (it
    answered), and no CA could be given but through SSL_CERT_FILE: the line now says the
    certificate was not accepted, and --cacert FILE trusts that CA, as for tail."""
    import ssl

    from tests.conftest import require_tool
    from tests.harness.tcpproxy import TCPProxy
    from tests.harness.tls import make_throwaway_ca

    require_tool("openssl", "the test makes a throwaway CA")
    files = make_throwaway_ca(tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert, files.key)
    server = dualcast()
    with TCPProxy(int(server.url.rsplit(":", 1)[1]), tls=context) as front:
        url = f"https://127.0.0.1:{front.port}"
        refused = cli("publish", "note", "{}", "--url", url)
        given = cli("publish", "note", "{}", "--url", url, "--cacert", str(files.ca))
    assert refused.returncode == 1 and refused.stdout == ""
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith(f"dualcast publish: the TLS certificate of {url} was not accepted")
    assert line.endswith("for a private CA, pass its bundle with --cacert FILE")
    assert given.returncode == 0, given.stderr
    assert re.fullmatch(r"\d+-\d+\n", given.stdout)


def test_every_option_of_every_command_says_what_it_is() -> None:
    """`dualcast token --help` listed --sub, --room, --ttl and --secret bare: nothing said
    that --ttl takes 90s/30m/8h/7d or that it defaults to an hour."""
    import argparse

    from dualcast.cli import build_parser

    done = cli("token", "--help")
    assert done.returncode == 0
    assert re.search(r"--ttl TTL\s+lifetime: seconds, or e\.g\. 90s, 30m, 8h, 7d\s+\(default\s+1h\)",
                     done.stdout), done.stdout
    [commands] = [a for a in build_parser()._actions
                  if isinstance(a, argparse._SubParsersAction)]
    bare = [f"{name} {action.option_strings or action.dest}"
            for name, parser in commands.choices.items() for action in parser._actions
            if not action.help]
    assert bare == []


def test_a_library_warning_is_one_line() -> None:
    """HS512 with a 32-byte secret (allowed; the README says PyJWT warns): the warning
    came as PyJWT's file and line number and then a line of its source code."""
    done = cli("token", "--sub", "1", env={"DUALCAST_JWT_ALGORITHMS": "HS512"})
    assert done.returncode == 0, done.stderr
    assert jwt.get_unverified_header(done.stdout.strip())["alg"] == "HS512"
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("dualcast: warning: The HMAC key is ") and "SHA512" in line


def test_a_kept_secret_file_that_is_unusable_is_named(tmp_path: Path) -> None:
    """`dualcast serve` refuses a kept secret file that is too short ("delete it to make a
    new one"), but `dualcast token` said "no secret: set DUALCAST_SECRET", and publish
    --url sent no token at all (401)."""
    kept = tmp_path / "dualcast" / "secret"
    kept.parent.mkdir()
    kept.write_text("short\n")
    env = {"XDG_STATE_HOME": str(tmp_path)}
    for args in (["token", "--sub", "1"], ["publish", "x", "{}", "--url", "http://127.0.0.1:9"]):
        done = cli(*args, secret=None, env=env)
        assert done.returncode == 2 and done.stdout == ""
        [line] = done.stderr.strip().splitlines()
        assert line == (f"dualcast {args[0]}: the secret file {kept} holds fewer than 32 "
                        "bytes: delete it to make a new one, or set DUALCAST_SECRET")
    kept.unlink()
    missing = cli("token", "--sub", "1", secret=None, env=env)
    assert missing.returncode == 2 and "no secret: set DUALCAST_SECRET" in missing.stderr
    # where `dualcast serve` keeps one: it may have run as another user, or not yet
    assert f"`dualcast serve` keeps one on this machine, in {kept}" in missing.stderr


def test_a_key_is_never_ignored_for_a_secret_algorithm(tmp_path: Path) -> None:
    """`--alg HS256 --key @k1.pem` signed with the shared secret and dropped the key
    without a word: the token was not the one asked for."""
    made = subprocess.run([sys.executable, "-m", "dualcast", "keys", "--kid", "k1", "--dir",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    done = cli("token", "--sub", "a", "--alg", "HS256", "--key", f"@{tmp_path / 'k1.pem'}")
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("dualcast token: --alg HS256 signs with the shared secret, not --key")
    keyed = cli("token", "--sub", "a", "--alg", "ES256", "--key", f"@{tmp_path / 'k1.pem'}")
    assert keyed.returncode == 0 and jwt.get_unverified_header(keyed.stdout.strip())["alg"] == "ES256"
    # and the other way round: --secret beside a key was dropped as silently
    both = cli("token", "--sub", "a", "--key", f"@{tmp_path / 'k1.pem'}", "--secret", SECRET)
    assert both.returncode == 2 and both.stdout == ""
    assert both.stderr.strip().startswith("dualcast token: ES256 signs with --key, not --secret")


@pytest.mark.parametrize(("args", "says"), [
    (["serve", "--prot", "8000"], "dualcast serve: unrecognized arguments: --prot 8000; did "
                                  "you mean --port? (see dualcast serve --help)"),
    (["token", "--sub", "1", "--rooms", "ops"], "dualcast token: unrecognized arguments: "
                                                "--rooms ops; did you mean --room? (see "
                                                "dualcast token --help)"),
    (["serve", "8000"], "dualcast serve: unrecognized arguments: 8000 (see dualcast serve "
                        "--help)"),
])
def test_a_mistyped_flag_is_named_with_the_command_and_the_flag_meant(
        args: list[str], says: str) -> None:
    """`dualcast serve --prot 8000` said "(see dualcast --help)", whose help lists no flag
    of serve's, and not which flag was meant."""
    done = cli(*args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == says


def test_a_redis_url_at_a_port_that_is_no_redis_says_so(
    dualcast: Callable[..., DualcastProcess],
) -> None:
    """A Redis URL with dualcast's own HTTP port (8000 for 6379) was answered "InvalidResponse:
    Protocol error, got "H" as reply type byte", for publish and in the server's log."""
    http = dualcast()
    port = http.url.rsplit(":", 1)[1]
    url = f"redis://127.0.0.1:{port}/0"
    done = cli("publish", "note", "{}", "--redis-url", url)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert "does not speak Redis (an HTTP server, dualcast's own port?)" in line, line
    served = dualcast(url)
    wait_until(lambda: "does not speak Redis" in served.log(), timeout=20,
               what="the consumer's error with the hint")


@pytest.mark.parametrize(("args", "says"), [
    (["--url", "http://127.0.0.1:9", "--redis-url", "redis://127.0.0.1:9/0"],
     "dualcast publish: --url and --redis-url are two ways to publish"),
    (["--token", "t", "--redis-url", "redis://127.0.0.1:9/0"],
     "dualcast publish: --token is for --url (POST /api/publish)"),
])
def test_publish_refuses_a_flag_its_path_would_ignore(args: list[str], says: str) -> None:
    """`--url` with `--redis-url` went through the server and dropped the Redis URL, and
    `--token` without `--url` went straight to Redis and dropped the token: each without
    a word, so the event did not go the way the person asked."""
    done = cli("publish", "note", "{}", *args)
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(says), line


def test_publish_with_rediss_to_a_plain_text_port_says_nothing_was_sent(
    redis_server: RedisProcess,
) -> None:
    """`rediss://` at a Redis without TLS: the handshake is never answered, and the call's
    own bound cut it, so the line said Redis "may or may not have taken the event" (the
    words for a command sent and not answered). A handshake that never finished sent
    nothing: the connection now has its own, shorter bound, and the line says so."""
    url = f"rediss://127.0.0.1:{redis_server.port}/0"
    done = cli("publish", "note", "{}", "--redis-url", url)
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"dualcast publish: Redis at {url} did not take the event: "
                           "TimeoutError: Timeout connecting to server"), line
    assert "no TLS handshake: is that a TLS port?" in line


def _key_files(folder: Path, name: str, algorithm: str) -> tuple[Path, Path]:
    from dualcast.keys import generate, private_pem, public_pem

    key = generate(algorithm)
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(private_pem(key))
    public.write_bytes(public_pem(key.public_key()))
    return private, public


def test_token_refuses_what_this_machines_server_refuses(tmp_path: Path) -> None:
    """`--alg HS512` where DUALCAST_JWT_ALGORITHMS says HS256 (and a wrong --issuer,
    --audience, a key that is not DUALCAST_PUBLIC_KEY's) printed a token with exit 0 that
    the server with the same settings answered 401: found only when it was used."""
    es1, es1_pub = _key_files(tmp_path, "es1", "ES256")
    es2, _ = _key_files(tmp_path, "es2", "ES256")
    rsa, _ = _key_files(tmp_path, "rsa", "RS256")
    keyed = {"DUALCAST_JWT_ALGORITHMS": "HS256,ES256", "DUALCAST_PUBLIC_KEY": f"@{es1_pub}"}
    iss_aud = {"DUALCAST_JWT_ISSUER": "https://id.example.test/",
               "DUALCAST_JWT_AUDIENCE": "dualcast,ops"}
    for args, env, setting in [
        (["--alg", "HS512"], {}, "DUALCAST_JWT_ALGORITHMS"),
        (["--alg", "HS256"], {"DUALCAST_JWT_ALGORITHMS": "HS384"}, "DUALCAST_JWT_ALGORITHMS"),
        (["--key", f"@{rsa}", "--alg", "RS256"], keyed, "DUALCAST_JWT_ALGORITHMS"),
        (["--key", f"@{es2}"], keyed, "DUALCAST_PUBLIC_KEY"),
        (["--issuer", "https://evil.test/"], iss_aud, "DUALCAST_JWT_ISSUER"),
        (["--audience", "billing"], iss_aud, "DUALCAST_JWT_AUDIENCE"),
        (["--audience", "billing"], {}, "DUALCAST_JWT_AUDIENCE is unset"),
    ]:
        done = cli("token", "--sub", "a", *args, env=env)
        assert done.returncode == 2 and done.stdout == "", (args, done.stdout)
        [line] = done.stderr.strip().splitlines()
        assert line.startswith("dualcast token: ") and setting in line, (args, line)
        assert "would refuse" in line, line

    # What the same settings accept is still minted, and that server takes it.
    hs384 = cli("token", "--sub", "a", "--alg", "HS384",
                env={"DUALCAST_JWT_ALGORITHMS": "HS256,HS384"})
    assert hs384.returncode == 0, hs384.stderr
    es = cli("token", "--sub", "a", "--key", f"@{es1}", env=keyed)
    assert es.returncode == 0, es.stderr
    assert jwt.decode(es.stdout.strip(), es1_pub.read_text(), algorithms=["ES256"])["sub"] == "a"
    ops = cli("token", "--sub", "a", "--audience", "ops", "--issuer",
              "https://id.example.test/", env=iss_aud)
    assert ops.returncode == 0, ops.stderr
    # A key pair's token where this machine takes none is for another server: as before.
    other = cli("token", "--sub", "a", "--key", f"@{rsa}", "--alg", "RS256")
    assert other.returncode == 0, other.stderr


def test_a_token_its_server_refuses_is_never_minted(
    dualcast: Callable[..., DualcastProcess],
) -> None:
    """The same settings on both sides: what the command refuses, the server refuses."""
    server = dualcast()
    elsewhere = cli("token", "--sub", "a", "--alg", "HS512",
                    env={"DUALCAST_JWT_ALGORITHMS": "HS512"})  # (for an HS512 server)
    assert elsewhere.returncode == 0, elsewhere.stderr
    refused = httpx.get(server.url + "/api/me",
                        headers={"Authorization": f"Bearer {elsewhere.stdout.strip()}"})
    assert refused.status_code == 401
    done = cli("token", "--sub", "a", "--alg", "HS512")
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("dualcast token: --alg HS512: this server accepts only HS256 ")


@pytest.mark.parametrize(("ttl", "says"), [("0.5", "at least 1 s"), ("0.9s", "at least 1 s"),
                                           ("9" * 400, "too long")])
def test_token_refuses_a_lifetime_no_server_can_use(ttl: str, says: str) -> None:
    """`--ttl 0.5` printed a token that had expired when it was made (`exp` is in whole
    seconds); 400 digits ended in an OverflowError traceback."""
    done = cli("token", "--sub", "1", "--ttl", ttl)
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert "argument --ttl:" in line and says in line, line


def test_token_too_long_for_any_server_or_for_a_login_link_is_said(
    dualcast: Callable[..., DualcastProcess],
) -> None:
    """A token over 8192 bytes (hundreds of --room) was printed with exit 0 and every
    server answered it "the token is too long"; one over the cookie limit made a login
    link that signed nobody in. The first is refused, the second printed with a note."""
    rooms = [arg for n in range(800) for arg in ("--room", f"r{n:04d}")]
    huge = cli("token", "--sub", "a", *rooms)
    assert huge.returncode == 2 and huge.stdout == ""
    [line] = huge.stderr.strip().splitlines()
    assert line.startswith("dualcast token: the token is ") and "over 8192" in line, line

    long = cli("token", "--sub", "a", *rooms[:800])
    assert long.returncode == 0, long.stderr
    minted = long.stdout.strip()
    assert 4082 < len(minted) <= 8192
    [note] = long.stderr.strip().splitlines()
    assert note == (f"dualcast token: note: the token is {len(minted)} bytes, too long for a "
                    "login link (/?token=: browsers keep no cookie over 4082); it works as "
                    "Authorization: Bearer")
    server = dualcast()
    me = httpx.get(server.url + "/api/me", headers={"Authorization": f"Bearer {minted}"})
    assert me.status_code == 200 and me.json()["sub"] == "a"

    short = cli("token", "--sub", "a", "--room", "ops")
    assert short.returncode == 0 and short.stderr == ""
