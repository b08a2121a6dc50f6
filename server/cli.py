"""The `dualcast` command: serve, publish, token, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
from typing import Any

from dualcast.config import Settings, SettingsError, env_name, load_settings

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


#: `dualcast serve` flags and the settings they set: a flag is the environment
#: variable of the same name, for this process and every worker it starts.
SERVE_FLAGS = {
    "host": "--host", "port": "--port", "redis_url": "--redis-url", "workers": "--workers",
    "log_level": "--log-level", "demo": "--demo", "demo_speed": "--demo-speed",
}


def _serve(args: argparse.Namespace) -> int:
    from dualcast.secret_file import SecretFileError, load_or_create, secret_path
    from dualcast.serve import ListenError, serve

    settings = _flag_settings(args, SERVE_FLAGS)
    kept: tuple[str, bool] | None = None
    if settings.secret is None:
        path = secret_path()
        try:
            settings.secret, made = load_or_create(path)
        except SecretFileError as exc:
            print(f"dualcast serve: {exc}", file=sys.stderr)
            return 2
        kept = (str(path), made)
    secret = settings.secret

    def on_listening(url: str) -> None:
        if kept is None:  # a configured secret: no admin token in anybody's log
            return
        from dualcast.auth import mint_token

        path, made = kept
        token = mint_token(secret, "admin", admin=True, publish=True, ttl=7 * 86400)
        print(f"dualcast: no DUALCAST_SECRET set: signing tokens with the secret "
              f"{'made now and ' if made else ''}kept in {path}", file=sys.stderr)
        print(f"dualcast: open the dashboard as admin: {url}/?token={token}",
              file=sys.stderr, flush=True)

    try:
        return serve(settings, on_listening)
    except ListenError as exc:
        print(f"dualcast serve: {exc} (another server? choose a port with --port "
              "or DUALCAST_PORT)", file=sys.stderr)
        return 1


def _flag_settings(args: argparse.Namespace, flags: dict[str, str]) -> Settings:
    """Settings from the environment and the flags given; an error names the flag when
    a flag set the bad value, else the variable."""
    overrides = {field: getattr(args, field) for field in flags
                 if getattr(args, field, None) is not None}
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        if exc.field in overrides:
            message = str(exc).replace(f"setting {env_name(exc.field)}", flags[exc.field], 1)
            raise SettingsError(message, exc.field) from None
        raise


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


class _Parser(argparse.ArgumentParser):
    """argparse, with a refused command line said in one line (not usage plus error)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dualcast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="interface to bind (DUALCAST_HOST)")
    serve.add_argument("--port", type=int, help="port to bind (DUALCAST_PORT)")
    serve.add_argument("--redis-url", help="Redis URL; none = the memory engine "
                       "(DUALCAST_REDIS_URL)")
    serve.add_argument("--workers", type=int, help="worker processes, Redis engine only "
                       "(DUALCAST_WORKERS)")
    serve.add_argument("--log-level", help="critical, error, warning, info, debug "
                       "(DUALCAST_LOG_LEVEL)")
    serve.add_argument("--demo", action="store_true", default=None,
                       help="publish simulated proxy traffic (DUALCAST_DEMO)")
    serve.add_argument("--demo-speed", type=float, help="pace of the demo (DUALCAST_DEMO_SPEED)")
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
