"""Render dualcast's nginx configs from nginx/templates/ (stdlib only).

One template is the single source of the production config (`nginx/dualcast.conf`,
the file a user installs) and of the test configs that imitate proxies which break
real-time transports:

- ``plain``: exactly the production config, with the tests' ports and paths;
- ``no-websocket``: refuses every WebSocket upgrade with 403, like a corporate
  proxy that speaks plain HTTP only; SSE and polls pass;
- ``buffering``: refuses WebSocket too, and buffers every response (HTTP/1.0 to
  the instances, ``proxy_buffering on``, ``X-Accel-Buffering`` ignored), which
  holds an SSE stream back completely while polls still answer.

Placeholders are ``{{name}}``: nginx's own ``$variables`` and ``@named``
locations never clash with them. A missing or unused value is an error, so a
template edit cannot silently render a half-filled config.

The production layout serves https with HTTP/2 on 443 (certificates from Let's
Encrypt's paths for the server name unless given) and only redirects plain HTTP
there; the test modes serve plain HTTP unless a test asks for TLS.

Command line (prints to stdout)::

    python nginx/render.py                      # the production config
    python nginx/render.py --upstream 10.0.0.5:8000 --upstream 10.0.0.6:8000 \\
        --server-name push.example.com --static-root /srv/dualcast/static \\
        --ssl-certificate /etc/ssl/push.pem --ssl-certificate-key /etc/ssl/push.key
    python nginx/render.py --access-log off      # no access log
    python nginx/render.py --tls-listen '' --real-ip-from 10.0.0.2   # behind a TLS terminator
    python nginx/render.py --ipv6                # also listen [::]:80 and [::]:443

Paths are quoted when they need it; a value nginx cannot take (``$`` in a path,
``--limit-conn 0``, an upstream that is not one ``host:port`` word) ends in one
line and exit status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

TEMPLATES = Path(__file__).resolve().parent / "templates"
SITE_TEMPLATE = TEMPLATES / "dualcast.conf.tmpl"
MAIN_TEMPLATE = TEMPLATES / "nginx.conf.tmpl"

MODES = ("plain", "no-websocket", "buffering")

#: What `nginx/dualcast.conf` is rendered with.
PRODUCTION = {
    "upstreams": ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"],
    "listen": "80",
    "server_name": "dualcast.example.com",
    "static_root": "/srv/dualcast/static",
    "access_log": "/var/log/nginx/dualcast.access.log",
    "tls_listen": "443",
    "ssl_certificate": "/etc/letsencrypt/live/dualcast.example.com/fullchain.pem",
    "ssl_certificate_key": "/etc/letsencrypt/live/dualcast.example.com/privkey.pem",
}

#: Open connections (HTTP/2: streams) one client address may hold. A browser tab
#: needs one or two; the headroom is for offices behind one NAT address.
LIMIT_CONN = 512

#: The dashboard's page headers, the same as the app sends (dualcast.headers; a
#: test keeps the two equal). This script is stdlib-only, so they are repeated.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

#: nginx's buffers for a long request head: 4 x 16 KiB, so a line holds a token as long
#: as dualcast takes (8,192 characters) with room to spare, and a head dualcast's 64 KiB.
HEADER_BUFFERS = "4 16k"

#: One year, the value HSTS preload lists ask for; no includeSubDomains (the
#: config cannot know what else lives under the domain).
HSTS = "max-age=31536000"

_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")

_MODE_NOTICE = {
    "plain": "",
    "no-websocket": """
# TEST CONFIG (mode no-websocket): imitates a proxy that refuses WebSocket
# upgrades. Never deploy it.
""",
    "buffering": """
# TEST CONFIG (mode buffering): imitates a proxy that refuses WebSocket and
# buffers every response, which holds SSE back. Never deploy it.
""",
}

_REFUSE_UPGRADE = """
    # Fault: refuse every WebSocket upgrade with 403 before it reaches an
    # instance, like a corporate proxy that speaks plain HTTP only.
    if ($http_upgrade) {
        return 403;
    }
"""

_BUFFER_EVERYTHING = """
    # Fault: buffer every response, ignoring the app's X-Accel-Buffering: no as
    # old proxies do. Requests go out as HTTP/1.0 (see proxy_http_version above)
    # to the relay below, which answers without chunked encoding, so this
    # server passes a body on only when a buffer fills or the response ends:
    # an SSE stream is held back completely.
    proxy_buffering on;
    proxy_ignore_headers X-Accel-Buffering;
    # Send the response headers at once (nginx would otherwise hold them with
    # the first 1460 bytes): the nasty case, where a browser's EventSource
    # fires onopen on a stream whose body never comes.
    postpone_output 0;
"""

_RELAY = """
# ---- fault relay (buffering mode only) ----
# The buffering server above reaches the instances through this inner hop.
# uvicorn sends chunked encoding even to an HTTP/1.0 request, and nginx passes
# every complete chunk on at once, buffering or not (an SSE event is a chunk).
# nginx itself answers an HTTP/1.0 request with one close-delimited body, so
# through this hop the server above sees no chunks, and holds the stream the
# way a real buffering proxy does.
upstream dualcast_instances {
{{upstream_servers}}
    keepalive 32;
    keepalive_timeout 4s;
}

server {
    listen unix:{{relay_socket}};
    access_log off;

    location / {
        proxy_pass http://dualcast_instances;
        proxy_http_version 1.1;
        proxy_set_header Host $http_host;
        proxy_set_header Connection "";
        # Pass everything on at once: the holding happens in the server above.
        proxy_buffering off;
        proxy_read_timeout 1h;
    }
}
"""

_TEST_UPSTREAM_HEADER = """
    # Test hook: which instance served the request (tests check that both
    # instances get clients, and which one a client must fail over from).
    add_header X-Dualcast-Upstream $upstream_addr always;
"""

_HTTP_REDIRECT_SERVER = """
# Plain HTTP only sends browsers on to https. A login link keeps its ?token=
# on the way (the log below masks it, as everywhere); after one visit HSTS
# makes the browser go to https by itself.
server {
{{listen_lines}}
    server_name {{server_name}};
    server_tokens off;
    access_log {{access_log}};
    client_header_timeout {{client_header_timeout}};
    large_client_header_buffers {{header_buffers}};
    # (no limit_conn here: `return` answers in the rewrite phase, before limit_conn
    # counts anything, so it never refused a connection; a redirect costs nginx little)

    location / {
        return 301 https://$host{{https_port}}$request_uri;
    }
}
"""

_TLS_SETTINGS = """
    # TLS. HTTP/2 (the "http2" on the listen line; nginx 1.25.1+ also takes
    # "http2 on;") lets one browser's SSE streams, polls and API calls share a
    # connection instead of eating its six HTTP/1.1 slots per host. WebSocket
    # still upgrades over HTTP/1.1: browsers open a separate connection for it.
    ssl_certificate {{ssl_certificate}};
    ssl_certificate_key {{ssl_certificate_key}};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:dualcast_tls:10m;
    ssl_session_timeout 1d;
    # Browsers must come back over https only (no cookie ever rides plain HTTP).
    add_header Strict-Transport-Security "{{hsts}}" always;
"""

_REAL_IP = """
    # A TLS terminator (or load balancer) in front: requests come from its
    # address, so the client's is taken from the X-Forwarded-For it adds (the
    # rightmost address not listed here). Without this, limit_conn above and
    # dualcast's per-address cap counted every user of the site as one client.
{{addresses}}
    real_ip_header X-Forwarded-For;
    real_ip_recursive on;
"""

_TEST_LOCATIONS = """
    # ---- test hooks (rendered only for tests) ----
    # Which config is live: a test waits for the new generation after a reload.
    location = /__nginx {
        default_type text/plain;
        return 200 "{{mode}} {{generation}}\\n";
    }
"""


class TemplateError(ValueError):
    """A template and its values do not match (missing or unused placeholders)."""


#: What a path may hold and still be written bare; anything else is quoted.
_BARE_PATH = re.compile(r"[A-Za-z0-9_./@%+=:,~-]+")
#: What a word (an address, a port, a host name) may hold.
_WORD = re.compile(r"[A-Za-z0-9_.:/\[\]*-]+")


def nginx_path(value: str | Path, what: str) -> str:
    """`value` as one nginx argument: bare when it can be, else double-quoted.

    A space or a quote would otherwise split the argument or end the directive;
    `$` cannot be written at all (nginx reads a variable there in `root` and
    `access_log`, quoted or not), nor can a control character.
    """
    text = str(value)
    if not text:
        raise ValueError(f"{what} is empty")
    if "$" in text or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(
            f"{what} {text!r}: nginx cannot take a path with '$' or a control character")
    if _BARE_PATH.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def absolute_path(value: str | Path, what: str) -> str | Path:
    """`value`, refused when relative: nginx reads a relative `root` or `access_log`
    from its own prefix (`/usr/share/nginx/` on Debian), not from where render.py ran,
    so `--static-root static` served 404s for the dashboard without a word."""
    text = str(value)
    if text and not Path(text).is_absolute():
        raise ValueError(f"{what} {text!r} is relative: nginx would look for it under its "
                         f"own prefix, not here; give the whole path, e.g. {Path(text).resolve()}")
    return value


def nginx_word(value: str, what: str) -> str:
    """`value` checked as one bare nginx word (`host:port`, a port, a server name)."""
    if not _WORD.fullmatch(value):
        raise ValueError(f"{what} {value!r}: not a single word nginx can take "
                         "(letters, digits and . : / - _ [ ] *)")
    return value


#: An upstream: a host name or IPv4 address, or an IPv6 one in brackets, then its port.
_UPSTREAM = re.compile(r"(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")


def nginx_upstream(value: str) -> str:
    """`value` checked as one dualcast instance, `host:port`: nginx takes `http://h:p`
    or a port past 65535 only to fail `nginx -t`, and a bare host as port 80."""
    nginx_word(value, "upstream")
    match = _UPSTREAM.fullmatch(value)
    if match is None or not 1 <= int(match.group(1)) <= 65535:
        raise ValueError(f"upstream {value!r}: not host:port with a port from 1 to 65535 "
                         "(e.g. 127.0.0.1:8001, [::1]:8001; no http://)")
    return value


def real_ip_lines(addresses: Sequence[str]) -> str:
    """The realip block for trusted proxies in front (addresses or networks), or ''."""
    if not addresses:
        return ""
    lines = []
    for address in addresses:
        try:
            network = ipaddress.ip_network(address, strict=False)
        except ValueError:
            raise ValueError(f"real ip from {address!r}: not an address or network "
                             "(e.g. 10.0.0.5, 10.0.0.0/16, ::1)") from None
        lines.append(f"    set_real_ip_from {network if '/' in address else address};")
    return fill(_REAL_IP, {"addresses": "\n".join(lines)})


def ipv6_listen(address: str | None) -> Callable[[str, str], str]:
    """`also(listen, flags)`: the extra line listening on `address` (IPv6) at the port of
    `listen` (a port, or address:port), or '' without an address."""
    if address is None:
        return lambda listen, flags: ""
    try:
        ip = ipaddress.IPv6Address(address.strip("[]"))
    except ValueError:
        raise ValueError(f"ipv6 {address!r}: not an IPv6 address (e.g. :: for all, ::1)") from None

    def also(listen: str, flags: str) -> str:
        port = listen.rsplit(":", 1)[-1] if not listen.isdigit() else listen
        if listen.startswith("[") or not port.isdigit():
            raise ValueError(f"listen {listen!r}: --ipv6 needs a port or an IPv4 address:port")
        return f"\n    listen [{ip}]:{port}{flags};"

    return also


def access_log_directive(access_log: str | Path) -> str:
    """The arguments of `access_log`: a file in the `dualcast` format, or ``off``."""
    if str(access_log) == "off":
        return "off"
    return f"{nginx_path(access_log, 'access log')} dualcast"


def fill(template: str, values: Mapping[str, object]) -> str:
    """Replace every ``{{name}}`` in `template`; every name must be given, every value used."""
    names = set(_PLACEHOLDER.findall(template))
    missing = names - values.keys()
    unused = values.keys() - names
    if missing or unused:
        raise TemplateError(f"missing values {sorted(missing)}, unused values {sorted(unused)}")
    return _PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), template)


def render_site(
    *,
    upstreams: Sequence[str],
    listen: str,
    server_name: str,
    static_root: str | Path,
    access_log: str | Path,
    mode: str = "plain",
    test_hooks: bool = False,
    generation: int = 0,
    relay_socket: str | Path | None = None,
    tls_listen: str | None = None,
    ssl_certificate: str | Path | None = None,
    ssl_certificate_key: str | Path | None = None,
    limit_conn: int = LIMIT_CONN,
    client_header_timeout: str = "10s",
    real_ip_from: Sequence[str] = (),
    ipv6: str | None = None,
) -> str:
    """The http-level config (map, upstream, server) for one mode.

    With `tls_listen` (a port, or address:port) the site is served over TLS with
    HTTP/2 there, and `listen` only redirects to it (the production layout);
    without it, `listen` serves everything over plain HTTP.

    `ipv6` (an IPv6 address, ``::`` for all) adds a listen on it beside each one,
    on the same port. Not in the production config: nginx refuses to start on a
    host whose kernel has IPv6 turned off ("Address family not supported").

    `test_hooks` adds a header naming the instance that served a request (in
    mode buffering: the relay) and a ``/__nginx`` location that answers
    ``<mode> <generation>``. Mode buffering needs `relay_socket`, a unix socket
    path for its inner hop.
    """
    if mode not in MODES:
        raise ValueError(f"unknown nginx mode {mode!r}; one of {', '.join(MODES)}")
    if not upstreams:
        raise ValueError("at least one upstream (host:port) is needed")
    if limit_conn < 1:
        raise ValueError(f"limit_conn {limit_conn}: nginx needs at least 1 connection per client")
    for upstream in upstreams:
        nginx_upstream(upstream)
    nginx_word(listen, "listen")
    nginx_word(server_name, "server name")
    also = ipv6_listen(ipv6)
    static_root = nginx_path(absolute_path(static_root, "static root"), "static root")
    if str(access_log) != "off":
        absolute_path(access_log, "access log")
    access_log = access_log_directive(access_log)
    real_ip = real_ip_lines(real_ip_from)
    server_extra = ""
    if mode in ("no-websocket", "buffering"):
        server_extra += _REFUSE_UPGRADE
    if mode == "buffering":
        server_extra += _BUFFER_EVERYTHING
    test_locations = ""
    if test_hooks:
        server_extra += _TEST_UPSTREAM_HEADER
        test_locations = fill(_TEST_LOCATIONS, {"mode": mode, "generation": generation})
    servers = "\n".join(
        f"    server {upstream} max_fails=1 fail_timeout=5s;" for upstream in upstreams
    )
    relay = ""
    if mode == "buffering":
        if relay_socket is None:
            raise ValueError("mode buffering needs relay_socket (a unix socket path)")
        relay = fill(_RELAY, {"upstream_servers": servers, "relay_socket": relay_socket})
        servers = f"    server unix:{relay_socket};"
    title = "production config" if mode == "plain" and not test_hooks else f"mode {mode}"
    page_headers = dict(PAGE_HEADERS)
    if tls_listen is None:
        listen_lines = f"    listen {listen};{also(listen, '')}"
        http_server = tls_settings = ""
    else:
        if ssl_certificate is None or ssl_certificate_key is None:
            raise ValueError("tls_listen needs ssl_certificate and ssl_certificate_key")
        nginx_word(tls_listen, "tls listen")
        ssl_certificate = nginx_path(ssl_certificate, "ssl certificate")
        ssl_certificate_key = nginx_path(ssl_certificate_key, "ssl certificate key")
        listen_lines = f"    listen {tls_listen} ssl http2;{also(tls_listen, ' ssl http2')}"
        https_port = tls_listen.rsplit(":", 1)[-1]
        http_server = fill(_HTTP_REDIRECT_SERVER, {
            "listen_lines": f"    listen {listen};{also(listen, '')}",
            "server_name": server_name, "access_log": access_log,
            "client_header_timeout": client_header_timeout,
            "header_buffers": HEADER_BUFFERS,
            "https_port": "" if https_port == "443" else f":{https_port}",
        })
        tls_settings = fill(_TLS_SETTINGS, {
            "ssl_certificate": ssl_certificate, "ssl_certificate_key": ssl_certificate_key,
            "hsts": HSTS,
        })
        # add_header in a location drops the server's: the page locations repeat it
        page_headers["Strict-Transport-Security"] = HSTS
    page_header_lines = "\n".join(
        f'        add_header {name} "{value}" always;' for name, value in page_headers.items()
    )
    return fill(
        SITE_TEMPLATE.read_text(),
        {
            "title": title,
            "mode_notice": _MODE_NOTICE[mode],
            "upstream_servers": servers,
            "http_server": http_server,
            "listen_lines": listen_lines,
            "tls_settings": tls_settings,
            "page_headers": page_header_lines,
            "limit_conn": limit_conn,
            "client_header_timeout": client_header_timeout,
            "header_buffers": HEADER_BUFFERS,
            "real_ip": real_ip,
            "server_name": server_name,
            "static_root": static_root,
            "access_log": access_log,
            "upstream_http_version": "1.0" if mode == "buffering" else "1.1",
            "sse_buffering": "on" if mode == "buffering" else "off",
            "server_extra": server_extra,
            "test_locations": test_locations,
            "relay": relay,
        },
    )


def render_main(
    *,
    prefix: str | Path,
    site_conf: str | Path,
    mime_types: str | Path | None = "/etc/nginx/mime.types",
    run_as_root: bool = False,
    error_log_level: str = "info",
) -> str:
    """A self-contained main config around `site_conf`, everything under `prefix`.

    `run_as_root` keeps the workers root (only when the master runs as root):
    otherwise they drop to an unprivileged user that cannot enter private temp
    folders such as pytest's (mode 0700).
    """
    if mime_types is not None and Path(mime_types).exists():
        types = f"    include {mime_types};"
    else:  # enough for the dashboard; a browser refuses JS modules served as octet-stream
        types = (
            "    types {\n        text/html html;\n        text/css css;\n"
            "        application/javascript js mjs;\n        application/json json;\n"
            "        image/svg+xml svg;\n        image/png png;\n        image/x-icon ico;\n    }"
        )
    return fill(
        MAIN_TEMPLATE.read_text(),
        {
            "user": "user root;" if run_as_root else "",
            "prefix": prefix,
            "error_log_level": error_log_level,
            "mime_types": types,
            "site_conf": site_conf,
        },
    )


def render_production() -> str:
    """Exactly the content of `nginx/dualcast.conf` (a test keeps the two equal)."""
    return render_site(**PRODUCTION)  # type: ignore[arg-type]


def _connections(text: str) -> int:
    """--limit-conn: a whole number of at least 1 (nginx refuses 0)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: nginx needs at least 1")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with a refused command line said in one line, not the usage and then it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Print the config; arguments nginx would refuse end in one line and exit 2."""
    parser = _Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--upstream", action="append", metavar="HOST:PORT",
        help="a dualcast instance; repeat once per instance (default: 127.0.0.1:8001-8003)",
    )
    parser.add_argument("--listen", default=PRODUCTION["listen"],
                        help="port (or address:port) of the plain-HTTP server: it redirects "
                             "to https, or serves the site with --tls-listen '' "
                             f"(default {PRODUCTION['listen']})")
    parser.add_argument("--server-name", default=PRODUCTION["server_name"],
                        help="the site's host name, which the certificate paths follow "
                             f"(default {PRODUCTION['server_name']})")
    parser.add_argument("--static-root", default=PRODUCTION["static_root"],
                        help="dualcast's static/ folder, served by nginx (quoted when needed)")
    parser.add_argument("--access-log", default=PRODUCTION["access_log"],
                        help="the access log file (tokens masked); 'off' = no access log")
    parser.add_argument("--tls-listen", default=PRODUCTION["tls_listen"],
                        help="port (or address:port) of the https server; '' = plain HTTP only")
    parser.add_argument("--ssl-certificate", default=None,
                        help="certificate chain (default: Let's Encrypt's path for --server-name)")
    parser.add_argument("--ssl-certificate-key", default=None,
                        help="its private key (default: Let's Encrypt's path for "
                             "--server-name)")
    parser.add_argument("--limit-conn", type=_connections, default=LIMIT_CONN,
                        help="connections (HTTP/2 streams) one client address may hold (1 or more)")
    parser.add_argument("--real-ip-from", action="append", default=[], metavar="ADDRESS",
                        help="a TLS terminator or load balancer in front (address or network; "
                             "repeat for several): client addresses come from its "
                             "X-Forwarded-For")
    parser.add_argument("--ipv6", nargs="?", const="::", default=None, metavar="ADDRESS",
                        help="listen on IPv6 too, beside each listen and on its port (default "
                             "address :: = all); not on a host whose kernel has IPv6 off, "
                             "where nginx would refuse to start")
    args = parser.parse_args(argv)
    live = f"/etc/letsencrypt/live/{args.server_name}"
    try:
        site = render_site(
            upstreams=args.upstream or PRODUCTION["upstreams"],
            listen=args.listen,
            server_name=args.server_name,
            static_root=args.static_root,
            access_log=args.access_log,
            tls_listen=args.tls_listen or None,
            ssl_certificate=args.ssl_certificate or f"{live}/fullchain.pem",
            ssl_certificate_key=args.ssl_certificate_key or f"{live}/privkey.pem",
            limit_conn=args.limit_conn,
            real_ip_from=args.real_ip_from,
            ipv6=args.ipv6,
        )
    except ValueError as err:  # a value nginx could not take: one line, exit 2
        parser.error(str(err))
    print(site, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
