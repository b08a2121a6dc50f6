"""Servers a test controls, standing in for an identity provider and an application.

`JwksServer` publishes a key set the test rotates, takes down, or slows down;
`HookServer` answers dualcast's session checks per cookie (or Authorization),
slowly, with errors, or with refusals. Both are real HTTP servers on free
loopback ports (threads, so they answer whatever the test's event loop does),
and both count the requests they get.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dualcast.keys import PrivateKey, generate, public_jwk
from tests.harness.procs import free_port


@dataclass
class SigningKey:
    kid: str
    algorithm: str
    private: PrivateKey = field(repr=False)

    @classmethod
    def make(cls, kid: str, algorithm: str = "ES256") -> SigningKey:
        return cls(kid, algorithm, generate(algorithm))

    def jwk(self) -> dict[str, Any]:
        return public_jwk(self.private.public_key(), self.kid, self.algorithm)

    def token(self, sub: str = "alice", ttl: float = 600, kid: str | None = "",
              **claims: Any) -> str:
        import jwt

        now = int(time.time())
        body = {"sub": sub, "exp": now + int(ttl), "iat": now, **claims}
        headers = {"kid": self.kid if kid == "" else kid} if kid is not None else None
        return jwt.encode(body, self.private, algorithm=self.algorithm, headers=headers)


class _Server:
    """A ThreadingHTTPServer on a fixed free port that can be stopped and started again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.lock = threading.Lock()
        self.requests: list[dict[str, str]] = []
        self.delay = 0.0
        #: When set, every request is answered `302 Location: <this>` (a moved URL, an
        #: application's redirect to its login page).
        self.redirect: str | None = None
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    path = "/"

    def answer(self, headers: dict[str, str]) -> tuple[int, Any]:
        raise NotImplementedError

    @property
    def calls(self) -> int:
        with self.lock:
            return len(self.requests)

    def start(self) -> _Server:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                with owner.lock:
                    owner.requests.append(headers)
                    delay = owner.delay
                if delay:
                    time.sleep(delay)
                if owner.redirect is not None:
                    self.send_response(302)
                    self.send_header("Location", owner.redirect)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status, body = owner.answer(headers)
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the caller gave up (a timeout the test provoked)

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Close the listening socket: the server is unreachable (connection refused)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


class JwksServer(_Server):
    path = "/.well-known/jwks.json"

    def __init__(self, *keys: SigningKey) -> None:
        super().__init__()
        self.keys = list(keys)
        self.status = 200

    def publish(self, *keys: SigningKey) -> None:
        with self.lock:
            self.keys = list(keys)

    def answer(self, headers: dict[str, str]) -> tuple[int, Any]:
        with self.lock:
            if self.status != 200:
                return self.status, {"error": "down"}
            return 200, {"keys": [k.jwk() for k in self.keys]}


class HookServer(_Server):
    """Answers per `Cookie` (or `Authorization`) header value: a status and a JSON body."""

    path = "/auth/dualcast"

    def __init__(self) -> None:
        super().__init__()
        self.sessions: dict[str, tuple[int, Any]] = {}

    def allow(self, credential: str, sub: str, rooms: list[str] | None = None,
              ttl: float | None = None, **flags: bool) -> None:
        """Vouch for `credential`; with `ttl`, each answer's `exp` is that far from then."""
        body: dict[str, Any] = {"sub": sub, "rooms": rooms or [], **flags}
        if ttl is not None:
            body["ttl"] = ttl
        with self.lock:
            self.sessions[credential] = (200, body)

    def fail(self, credential: str, status: int = 500) -> None:
        with self.lock:
            self.sessions[credential] = (status, {"error": "application trouble"})

    def refuse(self, credential: str, status: int = 401) -> None:
        with self.lock:
            self.sessions[credential] = (status, {"error": "no session"})

    def answer(self, headers: dict[str, str]) -> tuple[int, Any]:
        credential = headers.get("cookie") or headers.get("authorization") or ""
        with self.lock:
            status, body = self.sessions.get(credential, (401, {"error": "no session"}))
        if "ttl" in body:
            ttl = body["ttl"]
            body = {k: v for k, v in body.items() if k != "ttl"}
            body["exp"] = time.time() + ttl
        return status, body

    def calls_for(self, credential: str) -> int:
        with self.lock:
            return sum(
                1 for h in self.requests
                if (h.get("cookie") or h.get("authorization")) == credential
            )
