"""A real nginx in front of dualcast instances, as a child process a test owns.

The config comes from nginx/templates/ through nginx/render.py, in one of the
modes there (``plain`` = production, ``no-websocket``, ``buffering``). Every
rendered config is checked with ``nginx -t`` before nginx starts or reloads, so a
broken template fails loudly with nginx's own message instead of a hung test.

nginx runs from its own prefix folder (pid, logs, temp dirs) on a free loopback
port, never as a daemon, and is stopped by its PID.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import psutil

from tests.harness.procs import ROOT, free_port
from tests.harness.tls import TlsFiles
from tests.harness.tools import missing
from tests.harness.waits import wait_until

MODES = ("plain", "no-websocket", "buffering")


def _load_render() -> ModuleType:
    """nginx/render.py is a standalone script (not a package): load it by path."""
    path = ROOT / "nginx" / "render.py"
    spec = importlib.util.spec_from_file_location("dualcast_nginx_render", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render()


def nginx_binary() -> str | None:
    """Debian's /usr/sbin/nginx (not on a normal user's PATH), else whatever PATH has."""
    for candidate in ("/usr/sbin/nginx", shutil.which("nginx")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_nginx() -> str:
    """The nginx binary, or skip the test loudly; in CI (CI=true) a missing nginx fails."""
    binary = nginx_binary()
    if binary is None:
        missing("nginx is not installed: apt-get install nginx (these tests need a real nginx)")
    return binary


def _listening(process: psutil.Process) -> bool:
    """Whether a (worker) process still holds a listening TCP socket."""
    try:
        return any(c.status == psutil.CONN_LISTEN for c in process.net_connections("tcp"))
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


class NginxError(RuntimeError):
    """nginx refused a config or did not come up; the message carries its output."""


class NginxProcess:
    """nginx in front of the dualcast instances on `upstreams` (loopback ports)."""

    def __init__(
        self,
        workdir: Path,
        upstreams: list[int],
        mode: str = "plain",
        static_dir: Path | None = None,
        port: int | None = None,
        tls: TlsFiles | None = None,
        limit_conn: int | None = None,
        real_ip_from: list[str] | None = None,
        ipv6: str | None = None,
    ) -> None:
        """With `tls`, the production layout: https + HTTP/2 on `tls_port` (then `url`),
        and `port` only redirects there (`http_url`). `limit_conn` overrides the
        production per-address connection cap; `real_ip_from` names TLS terminators in
        front (render.py's --real-ip-from); `ipv6` an IPv6 address to listen on too, on the
        same ports (render.py's --ipv6)."""
        if mode not in MODES:
            raise ValueError(f"unknown nginx mode {mode!r}; one of {', '.join(MODES)}")
        self.prefix = workdir
        self.upstreams = list(upstreams)
        self.mode = mode
        self.static_dir = static_dir or ROOT / "static"
        self.port = port or free_port()
        self.tls = tls
        self.tls_port = free_port() if tls is not None else None
        self.limit_conn = limit_conn
        self.real_ip_from = list(real_ip_from or [])
        self.ipv6 = ipv6
        self.generation = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary = nginx_binary() or "nginx"
        self.conf = self.prefix / "nginx.conf"
        self.site_conf = self.prefix / "dualcast.conf"
        self.error_log = self.prefix / "logs" / "error.log"
        self.access_log = self.prefix / "logs" / "access.log"

    @property
    def url(self) -> str:
        if self.tls_port is not None:
            return f"https://127.0.0.1:{self.tls_port}"
        return self.http_url

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        if self.tls_port is not None:
            return f"wss://127.0.0.1:{self.tls_port}"
        return f"ws://127.0.0.1:{self.port}"

    def http_client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client for `url` that trusts the test CA when there is one."""
        if self.tls is not None:
            kwargs.setdefault("verify", self.tls.client_context())
        return httpx.Client(base_url=self.url, **kwargs)

    # -- config ----------------------------------------------------------------

    def render(self) -> None:
        """Write the main and site configs for the current mode and generation, then `nginx -t`."""
        self.site_conf.parent.mkdir(parents=True, exist_ok=True)
        self.site_conf.write_text(
            render.render_site(
                upstreams=[f"127.0.0.1:{port}" for port in self.upstreams],
                listen=f"127.0.0.1:{self.port}",
                server_name="localhost",
                static_root=self.static_dir,
                access_log=self.access_log,
                mode=self.mode,
                test_hooks=True,
                generation=self.generation,
                relay_socket=self.prefix / "relay.sock",
                **self._tls_and_limits(),
            )
        )
        self.conf.write_text(
            render.render_main(
                prefix=self.prefix, site_conf=self.site_conf, run_as_root=os.geteuid() == 0
            )
        )
        self.validate()

    def _tls_and_limits(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.tls is not None:
            extra.update(tls_listen=f"127.0.0.1:{self.tls_port}",
                         ssl_certificate=self.tls.cert, ssl_certificate_key=self.tls.key)
        if self.limit_conn is not None:
            extra["limit_conn"] = self.limit_conn
        if self.real_ip_from:
            extra["real_ip_from"] = self.real_ip_from
        if self.ipv6 is not None:
            extra["ipv6"] = self.ipv6
        return extra

    def _base_args(self) -> list[str]:
        # -e: the error log from the very start, before the config is read
        # (otherwise nginx first opens Debian's /var/log/nginx/error.log).
        return [
            self.binary, "-p", str(self.prefix), "-c", str(self.conf), "-e", str(self.error_log),
        ]

    def validate(self) -> None:
        """`nginx -t` on the main config, raising NginxError with nginx's own words."""
        for sub in ("logs", "temp"):  # nginx creates temp/* itself, not their parent
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [*self._base_args(), "-t", "-q"], capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            raise NginxError(
                f"nginx -t refused {self.conf} (mode {self.mode}):\n{result.stderr}{result.stdout}"
            )

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> NginxProcess:
        self.generation += 1
        self.render()
        # A relay socket left by an nginx that was killed would make bind() fail.
        (self.prefix / "relay.sock").unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [*self._base_args(), "-g", "daemon off; master_process on;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own process group: if the master must be killed, its workers go too.
            start_new_session=True,
        )
        self._wait_live()
        return self

    def reload(self, mode: str | None = None) -> NginxProcess:
        """Switch to `mode` live (same port and prefix): new config, `nginx -t`, SIGHUP.

        Returns once new connections get the new config. Connections already
        open stay with the old worker until they close (or worker_shutdown_timeout).
        """
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"unknown nginx mode {mode!r}")
            self.mode = mode
        assert self.proc is not None and self.proc.poll() is None, "nginx is not running"
        old_workers = psutil.Process(self.proc.pid).children()
        self.generation += 1
        self.render()
        self.proc.send_signal(signal.SIGHUP)
        self._wait_live()
        # The master starts the new workers, waits 100 ms, then tells the old ones to
        # quit; until an old worker closes its listening socket it still accepts new
        # connections with the old config. Wait for that, not just for one lucky answer.
        wait_until(
            lambda: not any(_listening(worker) for worker in old_workers),
            timeout=15, what="the old nginx workers to stop accepting",
        )
        return self

    def _wait_live(self) -> None:
        expected = f"{self.mode} {self.generation}"

        def live() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise NginxError(f"nginx exited {self.proc.returncode}:\n{self.errors()}")
            with self.http_client(timeout=1) as client:
                response = client.get("/__nginx")
            return response.status_code == 200 and response.text.strip() == expected

        wait_until(live, timeout=15, what=f"nginx on {self.port} serving {expected!r}")

    def errors(self) -> str:
        """The tail of nginx's error log (for assertion messages)."""
        if not self.error_log.exists():
            return ""
        return self.error_log.read_text(errors="replace")[-4000:]

    def access_lines(self) -> list[str]:
        if not self.access_log.exists():
            return []
        return self.access_log.read_text(errors="replace").splitlines()

    def stop(self) -> None:
        """Fast shutdown (SIGTERM): a graceful SIGQUIT would wait for open streams."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this class started
            self.proc.wait(5)

    def __enter__(self) -> NginxProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
