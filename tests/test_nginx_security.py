"""The shipped nginx config's security side, against a real nginx and real instances:
no token in its access log, TLS with HTTP/2 and HSTS (a throwaway CA made here,
`curl --http2`), the page headers, per-address connection caps, slow request
heads cut off, and no instance taken out of rotation by a Redis outage's 503s.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from dualcast.headers import PAGE_HEADERS
from tests.conftest import require_tool, token
from tests.harness.nginx import NginxProcess, render, require_nginx
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.tls import TlsFiles, make_throwaway_ca
from tests.harness.waits import wait_until

pytestmark = pytest.mark.timeout(120)

UPSTREAM_HEADER = "x-dualcast-upstream"


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    return require_nginx()


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    require_tool("openssl", "the TLS tests make a throwaway CA with it")
    return make_throwaway_ca(tmp_path / "tls")


@pytest.fixture
def curl() -> str:
    path = require_tool("curl", "the HTTP/2 checks use curl --http2")
    features = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=10).stdout
    assert "HTTP2" in features, f"this curl has no HTTP/2 support:\n{features}"
    return path


@pytest.fixture
def nginx(tmp_path: Path, nginx_binary: str) -> Iterator[Callable[..., NginxProcess]]:
    started: list[NginxProcess] = []

    def start(upstreams: list[int], **options: object) -> NginxProcess:
        proc = NginxProcess(tmp_path / f"nginx{len(started)}", upstreams, **options)  # type: ignore[arg-type]
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


def run_curl(curl: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([curl, "-sS", *args], capture_output=True, text=True, timeout=timeout)


def header_block(text: str) -> dict[str, str]:
    """The last response's headers from `curl -D -` output (names lower-cased)."""
    block = text.replace("\r\n", "\n").strip().split("\n\n")[-1]
    headers: dict[str, str] = {}
    for line in block.splitlines()[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


async def first_ws_frame(url: str, **options: object) -> str:
    async with asyncio.timeout(15):
        async with websockets.connect(url, open_timeout=10, **options) as ws:  # type: ignore[arg-type]
            return str(await ws.recv())


# ---- logs --------------------------------------------------------------------------------


def test_the_access_log_holds_paths_but_never_a_token(
    redis_server: RedisProcess, dualcast: Callable[..., DualcastProcess],
    nginx: Callable[..., NginxProcess],
) -> None:
    instance = dualcast(redis_server.url)
    proxy = nginx([instance.port])
    secret_part = (tok := token("alice", admin=True)).rsplit(".", 1)[1]
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        login = client.get("/", params={"token": tok})  # the login link
        assert login.status_code == 303 and UPSTREAM_HEADER in login.headers
        assert client.get("/api/me", params={"token": tok}).status_code == 200
        poll = client.get("/api/events", params={"token": tok, "after": "0", "timeout": "0"})
        assert poll.status_code == 200
        with client.stream("GET", "/api/sse", params={"token": tok, "rooms": "admin"}) as sse:
            assert sse.status_code == 200
            assert "welcome" in next(sse.iter_text())
    assert "welcome" in asyncio.run(first_ws_frame(f"{proxy.ws_url}/api/ws?token={tok}"))

    def logged() -> str | None:
        text = "\n".join(proxy.access_lines())
        return text if '"GET /api/ws HTTP/1.1" 101' in text and "/api/sse" in text else None

    text = wait_until(logged, timeout=15, what="nginx to log the closed streams")
    for path, status in (("/", 303), ("/api/me", 200), ("/api/events", 200)):
        assert f'"GET {path} HTTP/1.1" {status}' in text, text
    assert secret_part not in text and "token" not in text, text


# ---- TLS, HTTP/2, HSTS, redirects ------------------------------------------------------------


def test_tls_with_http2_hsts_and_a_redirect_from_plain_http(
    redis_server: RedisProcess, dualcast: Callable[..., DualcastProcess],
    nginx: Callable[..., NginxProcess], tls: TlsFiles, curl: str,
) -> None:
    instance = dualcast(redis_server.url)
    proxy = nginx([instance.port], tls=tls)
    ca = ("--cacert", str(tls.ca))
    tok = token("alice", admin=True)

    # HTTP/2 for the page, the API and an SSE stream
    health = run_curl(curl, "--http2", *ca, "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                      proxy.url + "/healthz")
    assert health.stdout == "2 200", health.stderr
    stream = run_curl(curl, "--http2", *ca, "-N", "--max-time", "3", "-w", "\nhttp %{http_version}",
                      f"{proxy.url}/api/sse?token={tok}", timeout=15)
    assert "event: welcome" in stream.stdout and stream.stdout.endswith("http 2"), stream

    # the page: HSTS and the same headers as dualcast's own
    page = run_curl(curl, "--http2", *ca, "-D", "-", "-o", "/dev/null", proxy.url + "/")
    headers = header_block(page.stdout)
    assert headers["strict-transport-security"] == render.HSTS
    for name, value in PAGE_HEADERS.items():
        assert headers[name.lower()] == value, name
    api = header_block(run_curl(curl, "--http2", *ca, "-D", "-", "-o", "/dev/null",
                                proxy.url + "/api/me").stdout)
    assert api["strict-transport-security"] == render.HSTS

    # the login link over https: the cookie is Secure
    login = header_block(run_curl(curl, "--http2", *ca, "-D", "-", "-o", "/dev/null",
                                  f"{proxy.url}/?token={tok}").stdout)
    assert "dualcast_token=" in login["set-cookie"] and "Secure" in login["set-cookie"]

    # plain HTTP only redirects, query (a login link) kept
    plain = header_block(run_curl(curl, "-D", "-", "-o", "/dev/null",
                                  f"{proxy.http_url}/?token={tok}").stdout)
    assert plain["location"] == f"{proxy.url}/?token={tok}"
    assert UPSTREAM_HEADER not in plain

    # WebSocket over TLS keeps its HTTP/1.1 upgrade
    frame = asyncio.run(first_ws_frame(f"{proxy.ws_url}/api/ws?token={tok}",
                                       ssl=tls.client_context()))
    assert '"welcome"' in frame
    text = wait_until(lambda: "\n".join(proxy.access_lines()) if "/api/ws" in
                      "\n".join(proxy.access_lines()) else None, timeout=15, what="the ws log line")
    assert tok.rsplit(".", 1)[1] not in text and "token" not in text


def test_behind_another_tls_terminator_the_login_cookie_is_still_secure(
    redis_server: RedisProcess, dualcast: Callable[..., DualcastProcess],
    nginx: Callable[..., NginxProcess],
) -> None:
    """The docs: "Behind another TLS terminator, render with --tls-listen ''". That
    layout (the tests' plain one) overwrote the terminator's `X-Forwarded-Proto: https`
    with its own `http`, so browsers on https got a login cookie without `Secure`.
    A claim of https is passed on; a claim of anything else is not (nginx's own scheme)."""
    instance = dualcast(redis_server.url)
    proxy = nginx([instance.port])
    assert proxy.tls is None  # the --tls-listen '' layout
    tok = token("alice", admin=True)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        def cookie(**headers: str) -> str:
            login = client.get("/", params={"token": tok}, headers=headers)
            assert login.status_code == 303 and UPSTREAM_HEADER in login.headers
            return login.headers["set-cookie"]

        assert "Secure" in cookie(**{"X-Forwarded-Proto": "https"})  # from the terminator
        assert "Secure" not in cookie()  # plain http, no terminator
        assert "Secure" not in cookie(**{"X-Forwarded-Proto": "gopher"})


# ---- what nginx says about itself -----------------------------------------------------------


def test_nginx_never_says_its_version(
    redis_server: RedisProcess, dualcast: Callable[..., DualcastProcess],
    nginx: Callable[..., NginxProcess], tls: TlsFiles,
) -> None:
    """Neither the Server header nor nginx's own error pages name nginx's version, on
    the https server (proxied answers, files, a 404, a 400) nor on the port-80 redirect."""
    instance = dualcast(redis_server.url)
    proxy = nginx([instance.port], tls=tls)
    with proxy.http_client(timeout=10) as client, httpx.Client(timeout=10) as plain:
        answers = [
            client.get("/healthz"), client.get("/"), client.get("/no-such-file.css"),
            client.get("/", headers={"Host": "a b"}),  # nginx's own 400 page
            plain.get(proxy.http_url + "/anything"),
        ]
    statuses = [a.status_code for a in answers]
    assert statuses == [200, 200, 404, 400, 301], statuses
    for answer in answers:
        assert answer.headers.get("server") == "nginx", (answer.url, answer.headers)
        assert "nginx/" not in answer.text, (answer.url, answer.text)


# ---- connection caps and slow heads ------------------------------------------------------------


def test_one_address_is_capped_in_open_connections(
    redis_server: RedisProcess, dualcast: Callable[..., DualcastProcess],
    nginx: Callable[..., NginxProcess],
) -> None:
    instance = dualcast(redis_server.url)
    proxy = nginx([instance.port], limit_conn=3)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        streams = [client.stream("GET", "/api/sse") for _ in range(3)]
        opened = [s.__enter__() for s in streams]
        try:
            assert [r.status_code for r in opened] == [200, 200, 200]
            refused = client.get("/api/me")
            assert refused.status_code == 429
        finally:
            for s in streams:
                s.__exit__(None, None, None)
        wait_until(lambda: client.get("/api/me").status_code == 200, timeout=10,
                   what="a slot to free up once the streams closed")


def test_a_request_head_sent_a_byte_at_a_time_is_cut_off(
    redis_server: RedisProcess, dualcast: Callable[..., DualcastProcess],
    nginx: Callable[..., NginxProcess],
) -> None:
    instance = dualcast(redis_server.url)
    proxy = nginx([instance.port])
    head = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 200
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as sock:
        closed = False
        for byte in head:  # bounded: 200-odd bytes, at most ~20 s
            try:
                sock.sendall(bytes([byte]))
                sock.settimeout(0.1)
                sock.recv(1024)  # an answer or EOF (b""): nginx gave up on us
                closed = True
                break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
            if time.monotonic() - started > 20:
                break
    elapsed = time.monotonic() - started
    assert closed, f"nginx still waited for the head after {elapsed:.1f} s"
    assert elapsed < 14, f"cut off only after {elapsed:.1f} s (client_header_timeout is 10 s)"


def test_behind_another_tls_terminator_each_client_has_its_own_caps(
    redis_server: RedisProcess, dualcast: Callable[..., DualcastProcess],
    nginx: Callable[..., NginxProcess],
) -> None:
    """Behind a TLS terminator on another host (here 127.0.0.9, which dualcast does not
    trust), every request reached nginx from the terminator's address: nginx's
    `limit_conn` and dualcast's per-address cap counted the whole site as one client,
    and the next user of the site got 429. `--real-ip-from` names the terminator: nginx
    takes the client's address from its X-Forwarded-For, and passes it on."""
    terminator = "127.0.0.9"
    instance = dualcast(redis_server.url, env={"DUALCAST_MAX_CONNECTIONS_PER_ADDRESS": "2"})
    proxy = nginx([instance.port], limit_conn=2, real_ip_from=[terminator])
    transport = httpx.HTTPTransport(local_address=terminator)
    with httpx.Client(base_url=proxy.url, timeout=10, transport=transport) as client:
        def sse(client_address: str) -> tuple[Any, httpx.Response]:
            stream = client.stream("GET", "/api/sse",
                                   headers={"X-Forwarded-For": client_address})
            return stream, stream.__enter__()

        opened = [sse("203.0.113.1"), sse("203.0.113.1")]
        try:
            assert [answer.status_code for _, answer in opened] == [200, 200]
            third = sse("203.0.113.1")
            opened.append(third)
            assert third[1].status_code == 429  # that client's cap still holds
            other = sse("198.51.100.7")
            opened.append(other)
            assert other[1].status_code == 200, other[1].read()  # another user of the site
        finally:
            for stream, _ in opened:
                stream.__exit__(None, None, None)


# ---- a Redis outage does not empty the upstream ---------------------------------------------


def test_polls_answering_503_during_a_redis_outage_leave_ws_and_sse_working(
    fresh_redis: RedisProcess, dualcast: Callable[..., DualcastProcess],
    nginx: Callable[..., NginxProcess],
) -> None:
    instances = [dualcast(fresh_redis.url), dualcast(fresh_redis.url)]
    proxy = nginx([i.port for i in instances])
    tok = token("alice", admin=True)
    fresh_redis.stop()
    with httpx.Client(base_url=proxy.url, timeout=15) as client:
        served_by: set[str] = set()
        for _ in range(6):  # least_conn spreads these over both instances
            poll = client.get("/api/events", params={"after": "0", "timeout": "0"})
            assert poll.status_code == 503, poll.text
            served_by.add(poll.headers.get(UPSTREAM_HEADER, ""))
        assert len(served_by) == 2, served_by
        # within the 5 s fail_timeout: nginx must still route WebSocket and SSE
        with client.stream("GET", "/api/sse", params={"token": tok}) as sse:
            assert sse.status_code == 200, sse.read()
    frame = asyncio.run(first_ws_frame(f"{proxy.ws_url}/api/ws?token={tok}"))
    assert '"welcome"' in frame


def test_nginx_repeats_exactly_the_apps_page_headers() -> None:
    """nginx serves the dashboard's files itself: its headers must be dualcast's."""
    assert render.PAGE_HEADERS == dict(PAGE_HEADERS)
    shipped = (Path(render.__file__).parent / "dualcast.conf").read_text()
    for name, value in PAGE_HEADERS.items():
        assert f'add_header {name} "{value}" always;' in shipped
