"""The `dualcast` command: serve, publish, token, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
from typing import Any

from dualcast.config import Settings, SettingsError, load_settings

log = logging.getLogger("dualcast")

_TTL = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def parse_ttl(value: str) -> float:
    match = _TTL.match(value.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"bad --ttl {value!r}: use e.g. 90s, 30m, 1h, 7d")
    number, unit = match.groups()
    return float(number) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {k: v for k, v in extra.items() if v is not None}
    if getattr(args, "redis_url", None):
        overrides["redis_url"] = args.redis_url
    return load_settings(**overrides)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from dualcast.transports.ws_protocol import WebSocketProtocol

    settings = _settings(
        args, host=args.host, port=args.port, workers=args.workers,
        log_level=args.log_level,
    )
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    secret = settings.secret
    generated = False
    if secret is None:
        secret = secrets.token_urlsafe(32)
        generated = True
        os.environ["DUALCAST_SECRET"] = secret  # for workers started by uvicorn
    if generated:
        from dualcast.auth import mint_token

        token = mint_token(secret, "admin", admin=True, publish=True, ttl=7 * 86400)
        host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        print(
            "dualcast: no DUALCAST_SECRET set; made one for this process. Tokens from it do not "
            "work on other instances or after a restart: set one shared DUALCAST_SECRET "
            "for several instances.",
            file=sys.stderr,
        )
        print(f"dualcast: open the dashboard as admin: http://{host}:{settings.port}/?token={token}",
              file=sys.stderr, flush=True)
    common: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_level": settings.log_level,
        "ws": WebSocketProtocol,  # uvicorn's default, with refused handshakes answered
        "ws_max_size": settings.max_frame_bytes,
        "ws_per_message_deflate": False,  # costly per connection; see PITFALLS
        "ws_ping_interval": settings.ping_interval, "ws_ping_timeout": settings.ping_interval,
        "timeout_graceful_shutdown": settings.shutdown_grace,
        "access_log": False, "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
        "lifespan": "on",
    }
    if settings.workers > 1:
        uvicorn.run("dualcast.cli:app_from_env", factory=True, workers=settings.workers, **common)
        return 0
    from dualcast.app import create_app

    app = create_app(settings, secret)
    if args.demo:
        _attach_demo(app, args.demo_speed)
    config = uvicorn.Config(app, **common)
    from dualcast.auth import install_log_redaction

    install_log_redaction()  # after uvicorn's logging setup: it logs WS paths with ?token=
    server = DrainingServer(config, app)
    server.run()
    return 0


def app_from_env() -> Any:
    """uvicorn factory for `--workers N`: each worker builds its app from the environment."""
    from dualcast.app import create_app
    from dualcast.auth import install_log_redaction

    install_log_redaction()  # the worker's logging is configured by now
    app = create_app(load_settings())
    _drain_on_exit_signals(app)
    return app


def _drain_on_exit_signals(app: Any) -> None:
    """`--workers N`: uvicorn's supervisor builds each worker's Server itself, so the
    DrainingServer is not used there. Instead, once the app has started (uvicorn's own
    SIGTERM/SIGINT handlers are installed by then), put a drain in front of them: the
    first signal sends the subscribers away (WS 1001, jittered SSE `retry:`), then hands
    the signal on to uvicorn, which shuts down as it always does. A second signal goes
    to uvicorn at once."""
    runtime = app.state.dualcast
    started = runtime.start

    async def start() -> None:
        await started()
        loop = asyncio.get_running_loop()
        asked: list[int] = []

        async def drain_then_exit(signum: int, then: Any) -> None:
            try:
                await runtime.drain(runtime.settings.shutdown_grace)
            finally:
                then(signum, None)

        for sig in (signal.SIGTERM, signal.SIGINT):
            uvicorn_handler = signal.getsignal(sig)
            if not callable(uvicorn_handler):
                continue

            def on_signal(signum: int, frame: Any, then: Any = uvicorn_handler) -> None:
                if asked:
                    then(signum, frame)
                    return
                asked.append(signum)
                loop.call_soon_threadsafe(
                    runtime.start_task, drain_then_exit(signum, then), "dualcast-drain")

            signal.signal(sig, on_signal)

    runtime.start = start


def _attach_demo(app: Any, speed: float) -> None:
    """`serve --demo`: publish simulated proxy traffic into this app's own log."""
    from dualcast.demo import run_demo
    from dualcast.events import Envelope, entry_fields

    runtime = app.state.dualcast
    previous = runtime.start

    async def sink(event: str, data: Any, rooms: list[str]) -> object:
        return await runtime.log.append(entry_fields(Envelope(event=event, data=data, rooms=rooms)))

    async def start() -> None:
        await previous()
        stop = asyncio.Event()
        runtime.start_task(run_demo(sink, stop=stop, speed=speed), "dualcast-demo")

    runtime.start = start


def _make_draining_server() -> type:
    import uvicorn

    class _DrainingServer(uvicorn.Server):
        """uvicorn, but SIGTERM first drains our subscribers (WS 1001, jittered SSE retry)
        before uvicorn closes what is left with 1012."""

        def __init__(self, config: uvicorn.Config, app: Any) -> None:
            super().__init__(config)
            self.dualcast = app.state.dualcast

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            for srv in self.servers:
                srv.close()
            # A proxy (nginx `keepalive`) keeps idle HTTP connections open and would
            # send new requests (WS upgrades, SSE) down them during the drain, to an
            # instance that is leaving. Close the idle ones now (a request in flight,
            # such as an SSE stream, only loses keep-alive); the proxy then retries
            # elsewhere. WebSockets are left to the drain (1001, spread over time).
            for connection in list(self.server_state.connections):
                if hasattr(connection, "cycle"):  # an HTTP/1.1 protocol, not a WebSocket
                    connection.shutdown()
            grace = self.config.timeout_graceful_shutdown or 10.0
            await self.dualcast.drain(grace)
            await super().shutdown(sockets)

    return _DrainingServer


def DrainingServer(config: Any, app: Any) -> Any:
    return _make_draining_server()(config, app)


def _token(args: argparse.Namespace) -> int:
    from dualcast.auth import mint_token

    settings = _settings(args)
    secret = args.secret or settings.secret
    if not secret:
        print("dualcast token: no secret: set DUALCAST_SECRET or pass --secret", file=sys.stderr)
        return 2
    print(mint_token(secret, args.sub, rooms=args.room, admin=args.admin,
                     publish=args.publish, ttl=args.ttl))
    return 0


def _publish(args: argparse.Namespace) -> int:
    from dualcast.events import Envelope

    try:
        data = json.loads(args.json)
    except json.JSONDecodeError as exc:
        print(f"dualcast publish: JSON is not valid: {exc}", file=sys.stderr)
        return 2
    try:
        Envelope(event=args.event, data=data, rooms=args.room)
    except ValueError as exc:
        print(f"dualcast publish: {exc}", file=sys.stderr)
        return 2
    settings = _settings(args)
    if args.url:
        return _publish_http(args, settings, data)
    if settings.redis_url is None:
        print("dualcast publish: no Redis configured: set DUALCAST_REDIS_URL, pass --redis-url, "
              "or --url of a running dualcast server", file=sys.stderr)
        return 2
    return asyncio.run(_publish_redis(args, settings, data))


async def _publish_redis(args: argparse.Namespace, settings: Settings, data: Any) -> int:
    from dualcast.publisher import Publisher

    assert settings.redis_url is not None
    async with Publisher(settings.redis_url, stream=settings.stream, maxlen=settings.maxlen,
                         timeout=settings.redis_timeout) as publisher:
        entry_id = await publisher.publish(args.event, data, args.room or None)
    if entry_id is None:
        print(f"dualcast publish: Redis at {settings.redis_url} is not reachable", file=sys.stderr)
        return 1
    print(entry_id)
    return 0


def _publish_http(args: argparse.Namespace, settings: Settings, data: Any) -> int:
    import httpx

    from dualcast.auth import mint_token

    token = args.token
    if token is None and settings.secret:
        token = mint_token(settings.secret, "cli", publish=True, ttl=300)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"event": args.event, "data": data, "rooms": args.room}
    try:
        response = httpx.post(args.url.rstrip("/") + "/api/publish", json=body, headers=headers,
                              timeout=10)
    except httpx.HTTPError as exc:
        print(f"dualcast publish: {args.url} is not reachable: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 202:
        print(f"dualcast publish: {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    print(response.json()["id"])
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dualcast.demo import demo_against_redis

    settings = _settings(args)
    if settings.redis_url is None:
        print("dualcast demo: needs Redis (DUALCAST_REDIS_URL or --redis-url); "
              "for a single process use `dualcast serve --demo`", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO)

    async def main() -> None:
        stop = asyncio.Event()
        assert settings.redis_url is not None
        await demo_against_redis(settings.redis_url, settings.stream, settings.maxlen, stop,
                                 args.speed)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualcast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--redis-url")
    serve.add_argument("--workers", type=int)
    serve.add_argument("--log-level")
    serve.add_argument("--demo", action="store_true", help="publish simulated proxy traffic")
    serve.add_argument("--demo-speed", type=float, default=1.0)
    serve.set_defaults(func=_serve)

    pub = sub.add_parser("publish", help="append one event")
    pub.add_argument("event")
    pub.add_argument("json", help="the event's data as JSON")
    pub.add_argument("--room", action="append", default=[])
    pub.add_argument("--redis-url")
    pub.add_argument("--url", help="a running dualcast server (uses POST /api/publish)")
    pub.add_argument("--token", help="a publish token for --url")
    pub.set_defaults(func=_publish)

    tok = sub.add_parser("token", help="mint a token")
    tok.add_argument("--sub", required=True)
    tok.add_argument("--room", action="append", default=[])
    tok.add_argument("--admin", action="store_true")
    tok.add_argument("--publish", action="store_true")
    tok.add_argument("--ttl", type=parse_ttl, default=3600.0)
    tok.add_argument("--secret")
    tok.set_defaults(func=_token)

    demo = sub.add_parser("demo", help="publish simulated traffic to Redis")
    demo.add_argument("--redis-url")
    demo.add_argument("--speed", type=float, default=1.0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsError as exc:
        print(f"dualcast: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
