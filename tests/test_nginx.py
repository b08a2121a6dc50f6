"""dualcast behind a real nginx: the production config and the proxies that break transports.

Every test here runs Debian's nginx (rendered from nginx/templates/, checked with
`nginx -t`) as a child on a free loopback port, in front of two real dualcast
instances that share one real redis-server. Clients are real: websockets for
WebSocket, httpx streaming for SSE and long-polls.

nginx missing: the tests skip with a loud reason (and fail under CI=true).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from dualcast.auth import Authenticator, mint_token
from dualcast.config import load_settings
from dualcast.cors import CLIENT_FILES
from tests.conftest import SECRET, require_tool, token
from tests.harness.clients import SSEClient
from tests.harness.nginx import MODES, NginxError, NginxProcess, render, require_nginx
from tests.harness.procs import ROOT, DualcastProcess, RedisProcess, free_port
from tests.harness.stream import xadd
from tests.harness.tls import make_throwaway_ca
from tests.harness.waits import wait_for

pytestmark = pytest.mark.nginx

UPSTREAM_HEADER = "x-dualcast-upstream"


# ---- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    return require_nginx()


@pytest.fixture
def pair(
    nginx_binary: str, redis_server: RedisProcess, dualcast: Callable[..., DualcastProcess]
) -> list[DualcastProcess]:
    """Two dualcast instances on one redis with one shared secret, as a deployment runs them."""
    return [dualcast(redis_server.url), dualcast(redis_server.url)]


@pytest.fixture
def proxy(tmp_path: Path, pair: list[DualcastProcess]) -> Iterator[Callable[..., NginxProcess]]:
    """Factory: nginx in front of `pair` in a mode, stopped when the test ends."""
    started: list[NginxProcess] = []

    def start(mode: str = "plain", static_dir: Path | None = None) -> NginxProcess:
        proc = NginxProcess(
            tmp_path / f"nginx{len(started)}", [p.port for p in pair], mode, static_dir
        )
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


def port_of(upstream: str | None) -> int:
    """The instance port in an X-Dualcast-Upstream value such as `127.0.0.1:40123`."""
    assert upstream, "nginx named no upstream"
    return int(upstream.rsplit(":", 1)[1])


def open_connections(instance: DualcastProcess, transport: str) -> int:
    """The instance's own count of open subscribers (its /metrics, read directly)."""
    text = httpx.get(instance.url + "/metrics", timeout=5).text
    match = re.search(rf'^dualcast_connections\{{transport="{transport}"\}} (\S+)$', text, re.M)
    return int(float(match.group(1))) if match else 0


def start_marker(redis: RedisProcess) -> str:
    """Append a marker event and return its id: the cursor every client of a test starts
    after, so each sees exactly the events the test publishes (the redis is shared)."""
    return xadd(redis, "test_start", {"at": time.time()})


# ---- lean clients that also report which instance nginx chose ---------------------------


@dataclass
class SseStream:
    """One SSE response read event by event from a background task."""

    response: httpx.Response
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    ended: bool = False

    @property
    def upstream(self) -> str | None:
        value: str | None = self.response.headers.get(UPSTREAM_HEADER)
        return value

    async def pump(self) -> None:
        block: dict[str, str] = {}
        try:
            async for line in self.response.aiter_lines():
                if line == "":
                    if "data" in block:
                        data = json.loads(block["data"])
                        await self.queue.put(
                            {"id": block.get("id"), "event": block.get("event", "message"),
                             "data": data, "received": time.perf_counter()}
                        )
                    block = {}
                elif not line.startswith(":"):
                    key, _, value = line.partition(":")
                    block[key] = value.removeprefix(" ")
        except (httpx.HTTPError, OSError):
            pass  # the connection broke (e.g. its instance died): the stream has ended
        finally:
            self.ended = True
            await self.queue.put(None)

    async def next(self, within: float = 10) -> dict[str, Any] | None:
        """The next event, None when the stream ended; TimeoutError when nothing came."""
        return await asyncio.wait_for(self.queue.get(), within)


@asynccontextmanager
async def sse(base: str, last_event_id: str | None = None) -> AsyncIterator[SseStream]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client,
        client.stream("GET", base + "/api/sse", headers=headers) as response,
    ):
        stream = SseStream(response)
        task = asyncio.create_task(stream.pump())
        try:
            yield stream
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class Resuming:
    """A subscriber that does what the dashboard does: when its connection drops it
    reconnects through nginx with the last id it saw, and carries on."""

    def __init__(self, kind: str, base: str, ws_base: str, after: str) -> None:
        self.kind = kind
        self.base = base
        self.ws_base = ws_base
        self.last_id = after
        self.ids: list[str] = []
        self.upstreams: list[int] = []
        self.connected = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def _seen(self, event_id: str) -> None:
        self.ids.append(event_id)
        self.last_id = event_id

    async def _run(self) -> None:
        for _attempt in range(20):  # bounded: a test never loops forever
            try:
                if self.kind == "ws":
                    await self._ws_once()
                else:
                    await self._sse_once()
            except (OSError, httpx.HTTPError, websockets.ConnectionClosed, InvalidStatus):
                pass
            self.connected.clear()
            await asyncio.sleep(0.1)  # reconnect backoff, as a client would

    async def _ws_once(self) -> None:
        url = f"{self.ws_base}/api/ws?last_event_id={self.last_id}"
        async with websockets.connect(url, open_timeout=10) as conn:
            assert conn.response is not None
            self.upstreams.append(port_of(conn.response.headers.get(UPSTREAM_HEADER)))
            async for raw in conn:
                frame = json.loads(raw)
                frames = frame["events"] if frame["type"] == "batch" else [frame]
                for item in frames:
                    if item["type"] == "welcome":
                        self.connected.set()
                    elif item["type"] == "event":
                        self._seen(item["id"])

    async def _sse_once(self) -> None:
        async with sse(self.base, last_event_id=self.last_id) as stream:
            assert stream.response.status_code == 200
            self.upstreams.append(port_of(stream.upstream))
            while (event := await stream.next(within=60)) is not None:
                if event["event"] == "welcome":
                    self.connected.set()
                elif event["id"]:
                    self._seen(event["id"])


# ---- configs: render, nginx -t (no instance needed) ------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_renders_and_passes_nginx_t(
    tmp_path: Path, nginx_binary: str, mode: str
) -> None:
    proc = NginxProcess(tmp_path, [free_port(), free_port()], mode)
    proc.render()  # raises NginxError with nginx's message if `nginx -t` refuses it
    text = proc.site_conf.read_text()
    assert "{{" not in text
    assert ("return 403;" in text) is (mode != "plain")


def test_the_shipped_production_config_is_the_rendered_template() -> None:
    shipped = (ROOT / "nginx" / "dualcast.conf").read_text()
    assert shipped == render.render_production(), (
        "nginx/dualcast.conf is out of date: python nginx/render.py > nginx/dualcast.conf"
    )


def test_the_shipped_production_config_passes_nginx_t(tmp_path: Path, nginx_binary: str) -> None:
    # Its access log would be /var/log/nginx/... and its certificate Let's Encrypt's:
    # point them into the prefix (nginx -t loads the certificate) for the check.
    require_tool("openssl", "the TLS tests make a throwaway CA with it")
    tls = make_throwaway_ca(tmp_path / "tls")
    site = (ROOT / "nginx" / "dualcast.conf").read_text()
    for shipped, here in ((render.PRODUCTION["access_log"], tmp_path / "logs" / "access.log"),
                          (render.PRODUCTION["ssl_certificate"], tls.cert),
                          (render.PRODUCTION["ssl_certificate_key"], tls.key)):
        assert shipped in site
        site = site.replace(shipped, str(here))
    (tmp_path / "dualcast.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        render.render_main(prefix=tmp_path, site_conf=tmp_path / "dualcast.conf")
    )
    NginxProcess(tmp_path, [1]).validate()


def documented_main_settings(doc: Path) -> str:
    """The nginx main-config lines the deployment steps of `doc` tell a user to set."""
    found = re.search(r"<!-- nginx-main -->\n```nginx\n(.*?)```", doc.read_text(), re.DOTALL)
    assert found, f"{doc.name}: no main-config block (<!-- nginx-main -->)"
    return found.group(1)


def directive(text: str, name: str) -> str:
    found = re.search(rf"^\s*{name}\s+([^;]+);", text, re.M)
    assert found, f"no {name} in:\n{text}"
    return found.group(1).strip()


def test_the_deployment_steps_set_the_main_config_the_tests_run_nginx_with(
    tmp_path: Path, nginx_binary: str
) -> None:
    """Every test runs nginx with worker_connections 4096 and worker_shutdown_timeout 10s,
    but a user following the steps kept Debian's main file: 768 connections a worker
    (about 380 clients, each needing two), and after every reload old workers holding
    WebSocket and SSE clients with the old config for hours. The steps now say what to
    set there; nginx takes it."""
    settings = documented_main_settings(ROOT / "docs" / "nginx.md")  # the steps live there
    tested = (ROOT / "nginx" / "templates" / "nginx.conf.tmpl").read_text()
    assert directive(settings, "worker_shutdown_timeout") == directive(
        tested, "worker_shutdown_timeout")
    connections = int(directive(settings, "worker_connections"))
    assert connections >= int(directive(tested, "worker_connections"))
    assert int(directive(settings, "worker_rlimit_nofile")) >= connections
    # nginx -t on a main file holding exactly these lines, around the production site
    main = render.render_main(prefix=tmp_path, site_conf=tmp_path / "dualcast.conf")
    main = re.sub(r"worker_shutdown_timeout [^;]+;", "", main)
    main = re.sub(r"events \{[^}]*\}", settings, main)
    proc = NginxProcess(tmp_path, [free_port()])
    proc.render()  # the site (and a main file, replaced next)
    proc.conf.write_text(main)
    proc.validate()


def test_a_poll_is_never_cut_off_by_nginx_before_the_app_answers() -> None:
    shipped = (ROOT / "nginx" / "dualcast.conf").read_text()
    block = shipped.split("location = /api/events {", 1)[1].split("}", 1)[0]
    seconds = int(re.search(r"proxy_read_timeout (\d+)s;", block).group(1))  # type: ignore[union-attr]
    assert seconds > load_settings().poll_timeout_max + 5


def test_a_config_nginx_refuses_fails_loudly_with_its_message(
    tmp_path: Path, nginx_binary: str
) -> None:
    proc = NginxProcess(tmp_path, [free_port()])
    proc.render()
    proc.site_conf.write_text(proc.site_conf.read_text().replace("least_conn;", "least_conn"))
    with pytest.raises(NginxError, match="nginx -t refused"):
        proc.validate()
    with pytest.raises(render.TemplateError, match="missing values"):
        render.fill("listen {{listen}};", {})


def render_py(*args: str) -> subprocess.CompletedProcess[str]:
    """`python nginx/render.py ARGS`, as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "nginx" / "render.py"), *args],
                          capture_output=True, text=True, timeout=30)


def check_rendered(tmp_path: Path, site: str) -> None:
    """`nginx -t` on a site config render.py printed (raises NginxError with its words)."""
    (tmp_path / "dualcast.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        render.render_main(prefix=tmp_path, site_conf=tmp_path / "dualcast.conf")
    )
    NginxProcess(tmp_path, [1]).validate()


@pytest.mark.parametrize(("args", "says"), [
    (["--limit-conn", "0"], "argument --limit-conn: 0: nginx needs at least 1"),
    (["--static-root", "/srv/$host/static"], "static root '/srv/$host/static': nginx cannot"),
    (["--access-log", "/var/log/a\nb.log"], "access log '/var/log/a\\nb.log': nginx cannot"),
    (["--upstream", "127.0.0.1 8001"], "upstream '127.0.0.1 8001': not a single word"),
    (["--server-name", "push.example.com;"], "server name 'push.example.com;': not a single"),
    # nginx -t failed on these (a scheme, a port past 65535), or read port 80 (no port)
    (["--upstream", "http://127.0.0.1:8001"], "upstream 'http://127.0.0.1:8001': not host:port"),
    (["--upstream", "127.0.0.1:99999"], "upstream '127.0.0.1:99999': not host:port"),
    (["--upstream", "127.0.0.1"], "upstream '127.0.0.1': not host:port"),
    (["--real-ip-from", "lb.example"], "real ip from 'lb.example': not an address"),
    # nginx read these from its own prefix: the dashboard was a 404, the log elsewhere
    (["--static-root", "static"], "static root 'static' is relative: nginx would look"),
    (["--access-log", "logs/a.log"], "access log 'logs/a.log' is relative: nginx would"),
])
def test_render_py_refuses_what_nginx_would_refuse_in_one_line(
    args: list[str], says: str
) -> None:
    """One line, as docs/nginx.md says (it was argparse's usage, six lines, then the error)."""
    result = render_py(*args)
    assert result.returncode == 2, result.stdout
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"render.py: error: {says}"), result.stderr


def test_render_py_help_says_what_every_flag_is() -> None:
    """docs/nginx.md sends readers to `render.py --help` for the flags; --listen,
    --server-name and --ssl-certificate-key were listed there bare, with no word of what
    they set or of their defaults (80, dualcast.example.com)."""
    result = render_py("--help")
    assert result.returncode == 0, result.stderr
    options = result.stdout.split("options:", 1)[1]
    entries = re.findall(r"^  (-.*?)(?=^  -|\Z)", options, re.MULTILINE | re.DOTALL)
    assert len(entries) > 10, options
    for entry in entries:
        words = [w for w in entry.split()
                 if not re.fullmatch(r"-[-\w]+,?|\[?[A-Z_:]+\]?", w)]
        assert words, f"a flag without help in render.py --help: {entry.strip()!r}"
    assert "(default 80)" in options and "(default dualcast.example.com)" in options


def test_render_py_quotes_paths_with_spaces_and_nginx_takes_them(
    tmp_path: Path, nginx_binary: str
) -> None:
    static = tmp_path / "my static"
    static.mkdir()
    logs = tmp_path / "my logs"
    logs.mkdir()
    require_tool("openssl", "the TLS tests make a throwaway CA with it")
    tls = make_throwaway_ca(tmp_path / "tls dir")
    result = render_py("--upstream", "127.0.0.1:8001", "--listen", "127.0.0.1:18080",
                       "--static-root", str(static), "--access-log", str(logs / "a.log"),
                       "--ssl-certificate", str(tls.cert), "--ssl-certificate-key", str(tls.key))
    assert result.returncode == 0, result.stderr
    assert f'    root "{static}";' in result.stdout
    assert f'    access_log "{logs / "a.log"}" dualcast;' in result.stdout
    check_rendered(tmp_path, result.stdout)


def test_a_static_root_with_a_space_is_served(tmp_path: Path, nginx_binary: str) -> None:
    static = tmp_path / "my static"
    static.mkdir()
    (static / "index.html").write_text("<!doctype html><title>from a folder with a space</title>")
    with NginxProcess(tmp_path / "nginx", [free_port()], static_dir=static) as nginx:
        with nginx.http_client(timeout=10) as client:
            page = client.get("/")
    assert page.status_code == 200 and "folder with a space" in page.text


def test_render_py_access_log_off_means_no_access_log(tmp_path: Path, nginx_binary: str) -> None:
    result = render_py("--upstream", "127.0.0.1:8001", "--tls-listen", "",
                       "--listen", "127.0.0.1:18080", "--static-root", str(tmp_path),
                       "--access-log", "off")
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    logs = [line for line in lines if line.startswith("access_log")]
    assert logs == ["access_log off;"] * 3  # the server's, and the two locations' own
    check_rendered(tmp_path, result.stdout)


def ipv6_loopback() -> bool:
    """Whether this host can listen on ::1 (a kernel with IPv6 off cannot)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_render_py_ipv6_listens_beside_each_port_and_only_when_asked(
    tmp_path: Path, nginx_binary: str
) -> None:
    """The shipped config listens on IPv4 alone (nginx would refuse to start where IPv6
    is off); --ipv6 adds [::] beside both servers' ports, and nginx takes it."""
    shipped = [line.strip() for line in (ROOT / "nginx" / "dualcast.conf").read_text()
               .splitlines() if line.strip().startswith("listen")]
    assert shipped == ["listen 80;", "listen 443 ssl http2;"]
    result = render_py("--ipv6")
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()
             if line.strip().startswith("listen")]
    assert lines == ["listen 80;", "listen [::]:80;", "listen 443 ssl http2;",
                     "listen [::]:443 ssl http2;"]
    for args, says in ((["--ipv6", "nope"], "ipv6 'nope': not an IPv6 address"),
                       (["--ipv6", "--listen", "[::]:80"], "listen '[::]:80': --ipv6 needs")):
        refused = render_py(*args)
        assert refused.returncode == 2 and refused.stderr.startswith(
            f"render.py: error: {says}"), refused.stderr


def test_with_ipv6_both_servers_answer_on_ipv6_and_on_ipv4(
    tmp_path: Path, nginx_binary: str, redis_server: RedisProcess,
    dualcast: Callable[..., DualcastProcess],
) -> None:
    if not ipv6_loopback():
        pytest.skip("this host cannot listen on ::1 (IPv6 is off)")
    require_tool("openssl", "the TLS tests make a throwaway CA with it")
    tls = make_throwaway_ca(tmp_path / "tls")
    instance = dualcast(redis_server.url)
    with NginxProcess(tmp_path / "nginx", [instance.port], tls=tls, ipv6="::1") as nginx:
        with httpx.Client(timeout=10, verify=False) as client:  # the cert names 127.0.0.1
            for host in ("127.0.0.1", "[::1]"):
                redirect = client.get(f"http://{host}:{nginx.port}/x")
                assert redirect.status_code == 301, (host, redirect)
                assert client.get(f"https://{host}:{nginx.tls_port}/healthz").status_code == 200


# ---- the production config, end to end ---------------------------------------------------


async def test_static_files_come_from_nginx_and_login_links_from_dualcast(
    tmp_path: Path, proxy: Callable[..., NginxProcess]
) -> None:
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<!doctype html><title>served by nginx</title>")
    (static / "app.js").write_text("export const where = 'nginx';\n")
    nginx = proxy("plain", static_dir=static)
    alice = token("alice")
    async with httpx.AsyncClient(base_url=nginx.url, timeout=10) as client:
        page = await client.get("/")
        assert page.status_code == 200 and "served by nginx" in page.text
        assert UPSTREAM_HEADER not in page.headers  # no instance was woken for it
        assert page.headers["cache-control"] == "no-cache"
        script = await client.get("/app.js")
        assert script.headers["content-type"].startswith("application/javascript")

        login = await client.get("/", params={"token": alice})
        assert login.status_code in (302, 303, 307), login.text
        assert UPSTREAM_HEADER in login.headers  # dualcast answered, not the static files
        assert "token=" not in login.headers["location"]
        assert "dualcast_token" in login.cookies
        me = await client.get("/api/me")  # the cookie alone now says who we are
        assert me.status_code == 200 and me.json()["sub"] == "alice"

        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        assert "dualcast_connections" in (await client.get("/metrics")).text


@pytest.mark.timeout(60)
async def test_the_browser_client_and_its_types_come_from_nginx_as_from_dualcast(
    pair: list[DualcastProcess], proxy: Callable[..., NginxProcess]
) -> None:
    """`/dualcast.js` and `/dualcast.d.ts` (the README: "types at /dualcast.d.ts") are
    fetched by pages and tools of other origins: nginx serves them from disk with the
    type and the Access-Control-Allow-Origin dualcast gives them. The types came as
    `video/mp2t` (mime.types' .ts) without CORS, so a page of another origin could
    not read them."""
    nginx = proxy("plain")
    async with httpx.AsyncClient(timeout=10) as client:
        for path in CLIENT_FILES:
            direct = await client.get(pair[0].url + path, headers={"Origin": "https://app.example"})
            through = await client.get(nginx.url + path, headers={"Origin": "https://app.example"})
            assert direct.status_code == through.status_code == 200, path
            assert UPSTREAM_HEADER not in through.headers, f"{path}: nginx serves it from disk"
            assert through.content == direct.content, path
            media = {direct.headers["content-type"].split(";")[0]}
            if media == {"text/javascript"}:  # the same type by its older name
                media.add("application/javascript")
            assert through.headers["content-type"] in media, path
            assert through.headers.get("access-control-allow-origin") == "*", path
            assert through.headers["x-content-type-options"] == "nosniff", path
            assert direct.headers["x-content-type-options"] == "nosniff", path


def longest_token(sub: str = "alice") -> str:
    """A valid token as long as dualcast takes (Authenticator.MAX_TOKEN): a user in many
    rooms, as an issuer's token with a long group list is."""
    count = 0
    while True:
        rooms = [f"team-{n:04d}" for n in range(count + 1)]
        longer = mint_token(SECRET, sub, rooms=rooms)
        if len(longer) > Authenticator.MAX_TOKEN:
            break
        count += 1
    tok = mint_token(SECRET, sub, rooms=[f"team-{n:04d}" for n in range(count)])
    assert Authenticator.MAX_TOKEN - 20 < len(tok) <= Authenticator.MAX_TOKEN
    return tok


@pytest.mark.timeout(60)
async def test_a_token_as_long_as_dualcast_takes_passes_nginx(
    pair: list[DualcastProcess], proxy: Callable[..., NginxProcess]
) -> None:
    """dualcast takes tokens of up to 8,192 characters and request heads of up to 64 KiB,
    but nginx's default head buffers are 8 KiB a line: such a token in the
    `Authorization` header of an SSE stream or a poll, or in the login cookie, got
    nginx's HTML 400 (Request Header Or Cookie Too Large). (In a WebSocket URL dualcast
    itself takes a request line of at most 8 KiB.)"""
    nginx = proxy("plain")
    tok = longest_token()
    async with httpx.AsyncClient(base_url=nginx.url, timeout=10) as client:
        async with client.stream("GET", "/api/sse", headers={"Authorization": f"Bearer {tok}"}
                                 ) as stream:
            assert stream.status_code == 200, await stream.aread()
        poll = await client.get("/api/events", params={"timeout": "0", "rooms": "team-0000"},
                                headers={"Authorization": f"Bearer {tok}"})
        assert poll.status_code == 200, poll.text
        me = await client.get("/api/me", headers={"Cookie": f"dualcast_token={tok}"})
        assert me.status_code == 200 and me.json()["sub"] == "alice", me.text


async def test_browser_origin_and_body_limits_survive_the_proxy(
    proxy: Callable[..., NginxProcess],
) -> None:
    """nginx passes the Host with its port, so a page's own Origin is accepted and a foreign
    one refused; a body over the app's limit gets the app's JSON answer, a huge one nginx's."""
    nginx = proxy("plain")
    async with websockets.connect(
        nginx.ws_url + "/api/ws", origin=nginx.url, open_timeout=10  # type: ignore[arg-type]
    ) as conn:
        assert json.loads(await asyncio.wait_for(conn.recv(), 10))["type"] == "welcome"
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(
            nginx.ws_url + "/api/ws", origin="http://evil.example", open_timeout=10  # type: ignore[arg-type]
        )
    assert refused.value.response.status_code == 403

    headers = {"Authorization": f"Bearer {token('producer', publish=True)}"}
    big = {"event": "big", "data": "x" * 300_000}  # over DUALCAST_MAX_BODY_BYTES (256 KiB)
    async with httpx.AsyncClient(base_url=nginx.url, timeout=10) as client:
        answer = await client.post("/api/publish", json=big, headers=headers)
        assert answer.status_code == 413
        assert answer.json()["error"] == "too_large"  # the app's own error, as JSON
        huge = await client.post("/api/publish", content=b"x" * 2_000_000, headers=headers)
        assert huge.status_code == 413
        assert UPSTREAM_HEADER not in huge.headers  # nginx stopped it; no instance read it


async def test_ws_sse_and_poll_through_nginx_reach_both_instances(
    redis_server: RedisProcess, pair: list[DualcastProcess], proxy: Callable[..., NginxProcess]
) -> None:
    nginx = proxy("plain")
    after = start_marker(redis_server)
    ports = {p.port for p in pair}
    async with httpx.AsyncClient(base_url=nginx.url, timeout=40) as client:
        # least_conn: the second connection of each kind goes to the other instance
        sockets = [
            await websockets.connect(f"{nginx.ws_url}/api/ws?last_event_id={after}")
            for _ in range(2)
        ]
        try:
            ws_ports = {port_of(s.response.headers.get(UPSTREAM_HEADER)) for s in sockets}  # type: ignore[union-attr]
            assert ws_ports == ports
            async with sse(nginx.url, last_event_id=after) as s1, sse(
                nginx.url, last_event_id=after
            ) as s2:
                assert {port_of(s1.upstream), port_of(s2.upstream)} == ports
                polls = [
                    asyncio.create_task(
                        client.get("/api/events", params={"after": after, "timeout": "20"})
                    )
                    for _ in range(2)
                ]
                # the instances themselves count one subscriber of each kind
                for instance in pair:
                    for transport in ("websocket", "sse", "polling"):
                        await wait_for(
                            lambda i=instance, t=transport: open_connections(i, t) == 1,
                            timeout=10, what=f"one {transport} subscriber on {instance.port}",
                        )
                published = await client.post(
                    "/api/publish",
                    json={"event": "hello", "data": {"via": "nginx"}},
                    headers={"Authorization": f"Bearer {token('producer', publish=True)}"},
                )
                assert published.status_code == 202, published.text
                event_id = published.json()["id"]

                for stream in (s1, s2):
                    welcome = await stream.next()
                    assert welcome is not None and welcome["event"] == "welcome"
                    event = await stream.next()
                    assert event is not None
                    assert (event["id"], event["data"]) == (event_id, {"via": "nginx"})
                answers = await asyncio.gather(*polls)
                assert {port_of(a.headers.get(UPSTREAM_HEADER)) for a in answers} == ports
                for answer in answers:
                    assert [e["id"] for e in answer.json()["events"]] == [event_id]
                for sock in sockets:
                    assert json.loads(await sock.recv())["type"] == "welcome"
                    frame = json.loads(await asyncio.wait_for(sock.recv(), 10))
                    events = frame["events"] if frame["type"] == "batch" else [frame]
                    assert [e["id"] for e in events] == [event_id]
        finally:
            for sock in sockets:
                await sock.close()


async def test_sse_events_pass_nginx_while_the_stream_stays_open(
    redis_server: RedisProcess, pair: list[DualcastProcess], proxy: Callable[..., NginxProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each event arrives while the response is still open (a buffering proxy would hold it
    until the end); the latency is reported, not asserted (it goes to docs/performance.md)."""
    nginx = proxy("plain")
    samples = 30
    results: dict[str, list[float]] = {}
    for label, base in (("SSE through nginx", nginx.url), ("SSE direct", pair[0].url)):
        latencies: list[float] = []
        async with sse(base) as stream:
            welcome = await stream.next()
            assert welcome is not None and welcome["event"] == "welcome"
            for n in range(samples):
                sent = time.perf_counter()
                event_id = xadd(redis_server, "tick", {"n": n})
                event = await stream.next(within=10)
                assert event is not None, "the stream ended instead of delivering"
                assert (event["id"], event["data"]) == (event_id, {"n": n})
                latencies.append((event["received"] - sent) * 1000)
            assert not stream.ended  # still open after every event went through
        results[label] = latencies
    for label, ws_base in (("WS through nginx", nginx.ws_url), ("WS direct", pair[0].ws_url)):
        latencies = []
        # Resume after the last event sent: "live from now" is the instance's own now, and
        # an instance whose consumer is a few events behind would hand those over first.
        async with websockets.connect(f"{ws_base}/api/ws?last_event_id={event_id}",
                                      open_timeout=10) as conn:
            assert json.loads(await asyncio.wait_for(conn.recv(), 10))["type"] == "welcome"
            for n in range(samples):
                sent = time.perf_counter()
                event_id = xadd(redis_server, "tick", {"n": n})
                frame = json.loads(await asyncio.wait_for(conn.recv(), 10))
                received = time.perf_counter()
                events = frame["events"] if frame["type"] == "batch" else [frame]
                assert [e["id"] for e in events] == [event_id]
                latencies.append((received - sent) * 1000)
        results[label] = latencies
    with capsys.disabled():
        print(f"\npublish-to-receive latency (raw XADD -> client parsed the event), {samples} "
              "events one at a time, one subscriber, two instances on one redis:")
        for label, values in results.items():
            ordered = sorted(values)
            print(f"  {label:>17}: median {statistics.median(ordered):.2f} ms, "
                  f"p90 {ordered[int(len(ordered) * 0.9) - 1]:.2f} ms, max {ordered[-1]:.2f} ms")


async def test_clients_of_a_killed_instance_resume_on_the_other_and_lose_nothing(
    redis_server: RedisProcess, pair: list[DualcastProcess], proxy: Callable[..., NginxProcess]
) -> None:
    nginx = proxy("plain")
    after = start_marker(redis_server)
    kinds = ("ws", "ws", "sse", "sse")
    clients = [Resuming(kind, nginx.url, nginx.ws_url, after) for kind in kinds]
    published: list[str] = []

    def publish(count: int) -> None:
        for _ in range(count):
            published.append(xadd(redis_server, "step", {"n": len(published)}))

    def everyone_has_all() -> bool:
        return all(c.ids[-1:] == published[-1:] for c in clients)

    try:
        for client in clients:
            client.start()
            await asyncio.wait_for(client.connected.wait(), 10)
        victim = next(p for p in pair if p.port == clients[0].upstreams[0])
        survivor = next(p for p in pair if p is not victim)
        on_victim = [c for c in clients if c.upstreams == [victim.port]]
        # least_conn spread them: one WebSocket and one SSE client on each instance
        assert sorted(c.kind for c in on_victim) == ["sse", "ws"]

        publish(5)
        await wait_for(everyone_has_all, timeout=10, what="the first 5 events everywhere")

        victim.kill()  # SIGKILL: no goodbye, the connections just break
        publish(5)  # while its clients are away (or reconnecting)
        await wait_for(
            lambda: all(c.upstreams[-1] == survivor.port and c.connected.is_set()
                        for c in on_victim),
            timeout=15, what="the victim's clients reconnected through nginx to the survivor",
        )
        publish(5)
        await wait_for(everyone_has_all, timeout=10, what="all 15 events everywhere")
        for client in clients:
            assert client.ids == published, f"{client.kind} via {client.upstreams}"
        for client in on_victim:
            assert client.upstreams == [victim.port, survivor.port]
    finally:
        for client in clients:
            await client.stop()


def unread_bytes_at(port: int) -> int:
    """Bytes waiting unread in the receive queues of the connections accepted on local
    `port` (/proc/net/tcp{,6}: what a stopped process has not read yet)."""
    waiting = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] != "0A":  # 0A: the listening socket
                waiting += int(fields[4].split(":")[1], 16)
    return waiting


async def post_until_one_sits_unread(
    nginx: NginxProcess, victim: DualcastProcess,
    post: Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]], expected: int,
) -> tuple[httpx.Response, int]:
    """With `victim` stopped (SIGSTOP), send `post(client, attempt)` through nginx until
    one sits unread in the victim's socket (the others: answered `expected` by the other
    instance), then kill the victim: nginx's answer to that one, and its attempt."""
    victim.signal(signal.SIGSTOP)
    try:
        async with httpx.AsyncClient(base_url=nginx.url, timeout=30) as client:
            for attempt in range(6):  # least_conn alternates: one of two goes to the victim
                task = asyncio.create_task(post(client, attempt))
                await wait_for(lambda t=task: t.done() or unread_bytes_at(victim.port) > 0,
                               timeout=10, what="an answer, or the request unread at the victim")
                if task.done():  # the other instance took it
                    assert task.result().status_code == expected, task.result().text
                    continue
                victim.kill()  # it goes away with the request unread
                return await asyncio.wait_for(task, 20), attempt
    finally:
        if victim.alive():
            victim.signal(signal.SIGCONT)
    raise AssertionError("no request was ever sent to the stopped instance")


@pytest.mark.timeout(90)
async def test_a_publish_an_instance_never_read_is_retried_on_the_other(
    redis_server: RedisProcess, pair: list[DualcastProcess], proxy: Callable[..., NginxProcess]
) -> None:
    """A producer's POST that nginx has sent to an instance which then goes away without
    reading it (a stopping instance closes nginx's idle keep-alive connections, one of
    which nginx has just used; or it dies) was answered with nginx's HTML 502, although
    no instance ever saw the event and the other one was up. Here the race is made
    certain: the victim is stopped (SIGSTOP) until the publish sits unread in its
    socket, then killed."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux's /proc/net/tcp to see a request waiting unread")
    nginx = proxy("plain")
    victim, survivor = pair
    run = f"unread-{time.time_ns()}"
    headers = {"Authorization": f"Bearer {token('producer', publish=True)}"}

    def publish(client: httpx.AsyncClient, attempt: int) -> Awaitable[httpx.Response]:
        body = {"event": "unread", "data": {"marker": f"{run}-{attempt}"}}
        return client.post("/api/publish", json=body, headers=headers)

    answer, attempt = await post_until_one_sits_unread(nginx, victim, publish, 202)
    assert answer.status_code == 202, f"{answer.status_code}: {answer.text[:200]}"
    assert port_of(answer.headers.get(UPSTREAM_HEADER)) == survivor.port
    stored = redis_server.command("XREVRANGE", "websocket-broadcast", "+", "-", "COUNT", "50")
    assert stored.count(f"{run}-{attempt}".encode()) == 1, "the retried publish is stored once"


@pytest.mark.timeout(90)
async def test_a_sign_out_an_instance_never_read_is_retried_on_the_other(
    pair: list[DualcastProcess], proxy: Callable[..., NginxProcess]
) -> None:
    """The same race for the dashboard's Sign out (POST /api/logout): nginx answered 502,
    the dashboard showed its login screen all the same (it does not look at the answer),
    and the HttpOnly cookie stayed: the next visit was still signed in."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux's /proc/net/tcp to see a request waiting unread")
    nginx = proxy("plain")
    victim, survivor = pair
    cookie = {"Cookie": f"dualcast_token={token('alice', admin=True)}",
              "Sec-Fetch-Site": "same-origin"}

    def sign_out(client: httpx.AsyncClient, attempt: int) -> Awaitable[httpx.Response]:
        return client.post("/api/logout", headers=cookie)

    answer, _ = await post_until_one_sits_unread(nginx, victim, sign_out, 200)
    assert answer.status_code == 200, f"{answer.status_code}: {answer.text[:200]}"
    assert port_of(answer.headers.get(UPSTREAM_HEADER)) == survivor.port
    assert 'dualcast_token=""' in answer.headers["set-cookie"] or (
        "max-age=0" in answer.headers["set-cookie"].lower()), answer.headers["set-cookie"]


# ---- proxies that break real-time transports ----------------------------------------------


async def test_a_proxy_without_websocket_makes_ws_fail_and_sse_work(
    redis_server: RedisProcess, proxy: Callable[..., NginxProcess]
) -> None:
    nginx = proxy("no-websocket")
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(nginx.ws_url + "/api/ws", open_timeout=10)
    assert refused.value.response.status_code == 403

    after = start_marker(redis_server)
    async with SSEClient(nginx.url, last_event_id=after) as client:
        event_id = xadd(redis_server, "over_sse", {"ok": True})
        await wait_for(lambda: client.seen.ids == [event_id], timeout=10, what="the SSE event")
        assert not client.ended.is_set()


async def test_a_buffering_proxy_holds_sse_back_while_polls_answer(
    redis_server: RedisProcess, proxy: Callable[..., NginxProcess]
) -> None:
    nginx = proxy("buffering")
    after = start_marker(redis_server)
    with pytest.raises(InvalidStatus):
        await websockets.connect(nginx.ws_url + "/api/ws", open_timeout=10)

    async with sse(nginx.url, last_event_id=after) as stream:
        # the headers pass (a browser's EventSource would fire onopen) ...
        assert stream.response.status_code == 200
        event_id = xadd(redis_server, "held", {"n": 1})
        # ... but neither the welcome nor the event come through
        with pytest.raises(TimeoutError):
            await stream.next(within=3)

        async with httpx.AsyncClient(base_url=nginx.url, timeout=40) as client:
            answer = await client.get("/api/events", params={"after": after, "timeout": "5"})
        assert answer.status_code == 200
        assert [e["id"] for e in answer.json()["events"]] == [event_id]


async def test_reload_switches_the_proxy_behaviour_live(
    redis_server: RedisProcess, proxy: Callable[..., NginxProcess]
) -> None:
    """How a test lifts the blocking: same port, new mode, `nginx -s reload` semantics."""
    nginx = proxy("no-websocket")
    with pytest.raises(InvalidStatus):
        await websockets.connect(nginx.ws_url + "/api/ws", open_timeout=10)
    port = nginx.port
    nginx.reload("plain")
    assert nginx.port == port
    async with websockets.connect(nginx.ws_url + "/api/ws", open_timeout=10) as conn:
        assert json.loads(await asyncio.wait_for(conn.recv(), 10))["type"] == "welcome"
    nginx.reload("buffering")
    async with sse(nginx.url) as stream:
        with pytest.raises(TimeoutError):
            await stream.next(within=2)

