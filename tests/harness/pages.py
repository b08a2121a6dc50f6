"""Plain HTTP servers on free loopback ports: the other origins that browser tests load
pages from (an embedding app, an attacker's site)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@contextlib.contextmanager
def page_servers() -> Iterator[Callable[[Callable[..., BaseHTTPRequestHandler]], str]]:
    """`start(handler)` serves `handler` on a free loopback port and gives its base URL;
    every server started is stopped when the block ends."""
    servers: list[ThreadingHTTPServer] = []

    def start(handler: Callable[..., BaseHTTPRequestHandler]) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    try:
        yield start
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def send_html(handler: BaseHTTPRequestHandler, body: str) -> None:
    """Answer 200 with this page."""
    data = body.encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "text/html; charset=utf-8")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class QuietLog:
    """Mixed into a handler: no line per request on stderr."""

    def log_message(self, *args: Any) -> None:
        """Quiet."""
