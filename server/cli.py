"""The `dualcast` command: serve, publish, token, keys, demo, tail."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import re
import signal
import sys
import warnings
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

from dualcast.secret_file import MIN_SECRET_BYTES

# The settings (pydantic, redis) and asyncio are imported where a command needs them, inside
# main(): a Ctrl-C during those imports, a quarter of a second, ended in a traceback.
if TYPE_CHECKING:
    from dualcast.config import Settings
    from dualcast.keys import PrivateKey
    from dualcast.serve import ListenError

log = logging.getLogger("dualcast")

#: ASCII digits only (and fullmatch: `$` allows a trailing newline): `\d` alone took
#: other scripts' digits, as int() and float() read them.
_TTL = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)")
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def parse_ttl(value: str) -> float:
    match = _TTL.fullmatch(value.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"bad --ttl {value!r}: use e.g. 90s, 30m, 1h, 7d")
    number, unit = match.groups()
    seconds = float(number) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    if seconds < 1:  # expired when it is made (`exp` is in whole seconds): every server
        # refuses it
        raise argparse.ArgumentTypeError(f"bad --ttl {value!r}: a token must live at least "
                                         "1 s")
    if math.isinf(seconds):
        raise argparse.ArgumentTypeError(f"bad --ttl {value[:24]!r}...: too long")
    return seconds


def _subject(value: str) -> str:
    """`token --sub`: every server refuses a token whose `sub` is empty."""
    if not value:
        raise argparse.ArgumentTypeError("must not be empty (who the token is for, e.g. "
                                         "a user id)")
    return value


def _settings(args: argparse.Namespace) -> Settings:
    """Settings of the commands other than serve: the environment, and --redis-url."""
    return _flag_settings(args, {"redis_url": "--redis-url"})


#: `dualcast serve` flags and the settings they set: a flag is the environment
#: variable of the same name, for this process and every worker it starts.
SERVE_FLAGS = {
    "host": "--host", "port": "--port", "redis_url": "--redis-url", "workers": "--workers",
    "workers_wake": "--workers-wake",
    "log_level": "--log-level", "demo": "--demo", "demo_speed": "--demo-speed",
}


def _serve(args: argparse.Namespace) -> int:
    from dualcast.auth import hmac_algorithm
    from dualcast.secret_file import SecretFileError, load_or_create, secret_path
    from dualcast.serve import ListenError, serve

    settings = _flag_settings(args, SERVE_FLAGS)
    if args.demo_speed is not None and not settings.demo:  # it would pace nothing
        print("dualcast serve: --demo-speed paces the demo traffic: add --demo (or set "
              "DUALCAST_DEMO=true)", file=sys.stderr)
        return 2
    configured = settings.secret is not None
    kept: tuple[str, bool] | None = None
    # No secret is made where no HS* token is accepted: it would sign nothing.
    if not configured and hmac_algorithm(settings) is not None:
        path = secret_path()
        try:
            settings.secret, made = load_or_create(path)
        except SecretFileError as exc:
            print(f"dualcast serve: {exc}", file=sys.stderr)
            return 2
        kept = (str(path), made)

    def on_listening(url: str) -> None:
        if kept is not None:
            _print_admin_link(settings, kept, url)
        elif hmac_algorithm(settings) is None:
            print(f"dualcast: no admin link: {_keyed_only(settings)}; mint one with "
                  f"`{_keyed_token_command(settings, '--sub admin --admin')}` and open "
                  f"{url}/?token=<token>", file=sys.stderr, flush=True)
        else:  # a configured secret: no admin token in anybody's log, but the way to one
            # (the quick start's link was simply not there, and nothing said why)
            print("dualcast: no admin link (DUALCAST_SECRET is set, so no token goes to the "
                  "log): mint one with `dualcast token --sub admin --admin` (same "
                  f"DUALCAST_SECRET) and open {url}/?token=<token>", file=sys.stderr,
                  flush=True)

    try:
        return serve(settings, on_listening)
    except ListenError as exc:
        print(f"dualcast serve: {exc} {_listen_hint(settings.host, exc)}", file=sys.stderr)
        return 1


def _print_admin_link(settings: Settings, kept: tuple[str, bool], url: str) -> None:
    """The admin link of a server signing with the secret kept on this machine."""
    from dualcast.auth import mint_for

    path, made = kept
    assert settings.secret is not None
    # with the algorithm, issuer and audience this server checks, or it would refuse its
    # own link
    token = mint_for(settings, settings.secret, "admin", admin=True, publish=True,
                     ttl=7 * 86400)
    print(f"dualcast: no DUALCAST_SECRET set: signing tokens with the secret "
          f"{'made now and ' if made else ''}kept in {path} (other machines do not "
          "know it: give several instances one shared DUALCAST_SECRET)", file=sys.stderr)
    _on_both(f"dualcast: open the dashboard as admin: {url}/?token={token}")


def _on_both(line: str) -> None:
    """A line someone waits for: on stdout, and on stderr too when that is another file.

    The admin link was on stderr only, with the log, so a script or a supervisor that
    read the command's output (stdout) never saw it. In a terminal (or a journal) both
    are one file, and the line is printed once."""
    try:
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
        same = (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)
    except (OSError, ValueError, AttributeError):  # closed, or not a real file
        same = False
    with contextlib.suppress(OSError):  # (a closed stdout: stderr still says it)
        print(line, flush=True)
    if not same:
        print(line, file=sys.stderr, flush=True)


def _keyed_only(settings: Settings) -> str:
    """Why the CLI makes no token for a server that accepts only public-key algorithms."""
    return (f"this server accepts only {' or '.join(settings.jwt_algorithms)} tokens "
            "(DUALCAST_JWT_ALGORITHMS), signed with the issuer's private key")


def _keyed_token_command(settings: Settings, claims: str) -> str:
    """The `dualcast token` command that makes a token such a server accepts."""
    return (f"dualcast token --key @private.pem --alg {settings.jwt_algorithms[0]} "
            f"{claims}")


def _listen_hint(host: str, failed: ListenError) -> str:
    """What to change when the address cannot be bound: the host when it alone cannot be
    (a name that does not resolve, an address of another machine: tried again on any
    port), else the port. Never depends on the wording of the error."""
    from dualcast.serve import ListenError, bind

    if host.startswith("[") and host.endswith("]"):
        return (f"(write an IPv6 address without brackets: --host {host[1:-1]}, "
                f"or DUALCAST_HOST={host[1:-1]})")
    try:
        bind(host, 0).close()
    except ListenError:
        return ("(not a name or address of this machine: choose one with --host or "
                "DUALCAST_HOST, e.g. 127.0.0.1, or 0.0.0.0 for every interface)")
    if failed.errno == errno.EACCES:
        return ("(ports below 1024 need privileges here: choose a port with --port or "
                "DUALCAST_PORT)")
    return "(another server? choose a port with --port or DUALCAST_PORT)"


def _flag_settings(args: argparse.Namespace, flags: dict[str, str]) -> Settings:
    """Settings from the environment and the flags given; an error names the flag when
    a flag set the bad value, else the variable."""
    from dualcast.config import SettingsError, env_name, load_settings, unknown_variables

    overrides = {field: getattr(args, field) for field in flags
                 if getattr(args, field, None) is not None}
    for line in unknown_variables():
        print(f"dualcast: warning: {line}", file=sys.stderr)
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        if exc.field in overrides:
            message = str(exc).replace(f"setting {env_name(exc.field)}", flags[exc.field], 1)
            raise SettingsError(message, exc.field) from None
        raise


def _token(args: argparse.Namespace) -> int:
    """Mint a token: HS* with the shared secret, or signed with a private key (`--key`),
    carrying the algorithm, issuer and audience this server checks."""
    from dualcast.auth import LONGEST_COOKIE_TOKEN, Authenticator, mint_token
    from dualcast.keys import ALGORITHMS, Family, load_private_key
    from dualcast.names import check_room
    from dualcast.secret_file import SecretFileError

    settings = _settings(args)
    for room in args.room:  # a room the server's pattern refuses: no event could reach it
        try:
            check_room(room, settings.room_pattern)
        except ValueError as exc:
            print(f"dualcast token: --room: {exc} (DUALCAST_ROOM_PATTERN): no event could "
                  "ever be published to it", file=sys.stderr)
            return 2
    key: PrivateKey | None = None
    if args.key:
        try:
            key = load_private_key(args.key)
        except ValueError as exc:
            print(f"dualcast token: --key: {exc}", file=sys.stderr)
            return 2
    algorithm = args.alg or _token_algorithm(settings, key)
    if algorithm is None:
        return 2
    if algorithm not in ALGORITHMS:
        print(f"dualcast token: --alg: unknown algorithm {algorithm!r} "
              f"(choose from {', '.join(ALGORITHMS)})", file=sys.stderr)
        return 2
    secret: str | None = None
    if ALGORITHMS[algorithm] is Family.HMAC:
        if key is not None:  # it signed with the secret, and the key was ignored
            print(f"dualcast token: --alg {algorithm} signs with the shared secret, not "
                  "--key: leave out --key, or choose its algorithm with --alg (e.g. ES256)",
                  file=sys.stderr)
            return 2
        try:
            secret = args.secret or settings.secret or _kept_secret()
        except SecretFileError as exc:
            print(f"dualcast token: {exc}", file=sys.stderr)
            return 2
        if not secret:  # where the kept one would be: `dualcast serve` may run as another user
            print("dualcast token: no secret: set DUALCAST_SECRET or pass --secret (or --key "
                  "@private.pem with --alg); `dualcast serve` keeps one on this machine, in "
                  f"{_kept_secret_path()}, from its first start", file=sys.stderr)
            return 2
        if len(secret.encode()) < MIN_SECRET_BYTES:  # the server refuses shorter ones
            print(f"dualcast token: the secret must be at least {MIN_SECRET_BYTES} bytes "
                  "(RFC 7518), as the server requires", file=sys.stderr)
            return 2
    elif key is None:
        print(f"dualcast token: {algorithm} signs with a private key: pass --key @path",
              file=sys.stderr)
        return 2
    elif args.secret:  # it signed with the key, and the secret was ignored
        print(f"dualcast token: {algorithm} signs with --key, not --secret: leave out "
              "--secret, or sign with it by --alg HS256 without --key", file=sys.stderr)
        return 2
    refusal = _own_server_refuses(settings, args, algorithm, key)
    if refusal is not None:
        print(f"dualcast token: {refusal}", file=sys.stderr)
        return 2
    audience = args.audience or (settings.jwt_audience[0] if settings.jwt_audience else None)
    try:
        token = mint_token(
            secret, args.sub, rooms=args.room, admin=args.admin, publish=args.publish,
            ttl=args.ttl, algorithm=algorithm, key=key, kid=args.kid,
            issuer=args.issuer or settings.jwt_issuer, audience=audience,
        )
    except ValueError as exc:
        print(f"dualcast token: {exc} (--alg {algorithm} and --key must match)", file=sys.stderr)
        return 2
    if len(token) > Authenticator.MAX_TOKEN:  # every server refuses it: "too long"
        print(f"dualcast token: the token is {len(token)} bytes and no server reads one over "
              f"{Authenticator.MAX_TOKEN}: give it fewer --room (--admin joins every room)",
              file=sys.stderr)
        return 2
    if len(token) > LONGEST_COOKIE_TOKEN:  # fine as a Bearer token, not as a login link
        print(f"dualcast token: note: the token is {len(token)} bytes, too long for a login "
              f"link (/?token=: browsers keep no cookie over {LONGEST_COOKIE_TOKEN}); it "
              "works as Authorization: Bearer", file=sys.stderr)
    print(token)
    return 0


def _own_server_refuses(settings: Settings, args: argparse.Namespace, algorithm: str,
                        key: PrivateKey | None) -> str | None:
    """Why the server with this machine's settings would refuse the token asked for, or
    None. It was minted silently and refused only when used, far from the command that
    made it. A token of a kind this server takes none of (a key pair's where it lists
    only HS*, or HS* where it lists none) is for another server: not checked here. For
    another server that does take the kind, its settings given to the command say so."""
    from dualcast.jwks import public_id
    from dualcast.keys import ALGORITHMS, Family, load_public_key

    listed = settings.jwt_algorithms
    hmac = ALGORITHMS[algorithm] is Family.HMAC
    if not any((ALGORITHMS[a] is Family.HMAC) is hmac for a in listed):
        return None
    other = "or, for another server, run this with that server's {}"
    if algorithm not in listed:
        return (f"--alg {algorithm}: this server accepts only {' or '.join(listed)} tokens "
                f"(DUALCAST_JWT_ALGORITHMS) and would refuse it; choose one of them, "
                + other.format("DUALCAST_JWT_ALGORITHMS"))
    if args.issuer and settings.jwt_issuer and args.issuer != settings.jwt_issuer:
        return (f"--issuer {args.issuer!r}: this server accepts only tokens from "
                f"{settings.jwt_issuer!r} (DUALCAST_JWT_ISSUER) and would refuse it; leave "
                "out --issuer, " + other.format("DUALCAST_JWT_ISSUER"))
    if args.audience and args.audience not in settings.jwt_audience:
        accepted = (f"only the audience {' or '.join(map(repr, settings.jwt_audience))} "
                    "(DUALCAST_JWT_AUDIENCE)" if settings.jwt_audience else
                    "no token that names an audience (DUALCAST_JWT_AUDIENCE is unset)")
        return (f"--audience {args.audience!r}: this server accepts {accepted} and would "
                "refuse it; leave out --audience, " + other.format("DUALCAST_JWT_AUDIENCE"))
    if key is not None and settings.public_key and not settings.jwks_url and (
        public_id(key.public_key()) != public_id(load_public_key(settings.public_key))
    ):
        return ("--key: not the private half of DUALCAST_PUBLIC_KEY, so this server would "
                "refuse its tokens; pass that key's private half, "
                + other.format("DUALCAST_PUBLIC_KEY"))
    return None


def _token_algorithm(settings: Settings, key: PrivateKey | None) -> str | None:
    """`dualcast token`'s algorithm without --alg: one this server accepts (the first
    HS* of DUALCAST_JWT_ALGORITHMS, or with --key the first the key fits); else None,
    the refusal said. A key where the server lists no public-key algorithm signs with
    its usual one: the token is for another server, the one with that key's public half."""
    from dualcast.auth import hmac_algorithm
    from dualcast.keys import ALGORITHMS, Family, key_fits, usual_algorithm

    if key is None:
        algorithm = hmac_algorithm(settings)
        if algorithm is None:
            print(f"dualcast token: {_keyed_only(settings)}: pass --key @private.pem "
                  "(or --alg for another server)", file=sys.stderr)
        return algorithm
    keyed = [a for a in settings.jwt_algorithms if ALGORITHMS[a] is not Family.HMAC]
    if not keyed:
        return usual_algorithm(key)
    fitting = next((a for a in keyed if key_fits(key, a)), None)
    if fitting is None:
        print(f"dualcast token: --key fits none of {', '.join(keyed)} "
              "(DUALCAST_JWT_ALGORITHMS): this server would refuse its tokens; for another "
              "server, run this with that server's DUALCAST_JWT_ALGORITHMS", file=sys.stderr)
    return fitting


def _kept_secret() -> str | None:
    """The secret `dualcast serve` keeps on this machine, if there is one; SecretFileError
    (one line saying what to do) for a file that is there but unusable: "no secret" would
    send the person to set one while the server refuses to start on that file."""
    from dualcast.secret_file import read_secret, secret_path

    return read_secret(secret_path())


def _kept_secret_path() -> str:
    """Where `dualcast serve` keeps its secret, for messages that send people there."""
    from dualcast.secret_file import secret_path

    return str(secret_path())


def _file_name(name: str) -> bool:
    """Whether `name` is one plain file name, on every system: no folder in it, nothing
    that leaves the folder or hides the file."""
    return bool(name) and not any(c in name for c in "/\\\0") and not name.startswith(".")


def _keys(args: argparse.Namespace) -> int:
    """Make a key pair for signing tokens and add its public half to a JWKS file."""
    import secrets
    from pathlib import Path

    from dualcast.keys import ALGORITHMS, Family, make_key_files

    algorithm = args.alg
    keyed = [name for name, family in ALGORITHMS.items() if family is not Family.HMAC]
    if algorithm not in ALGORITHMS:  # (es256 was told "must be ES*", as HS256 was)
        print(f"dualcast keys: --alg: unknown algorithm {algorithm!r} (choose from "
              f"{', '.join(keyed)})", file=sys.stderr)
        return 2
    if ALGORITHMS[algorithm] is Family.HMAC:
        print("dualcast keys: --alg must be RS*, PS*, ES* or EdDSA "
              "(HS* uses DUALCAST_SECRET, not a key pair)", file=sys.stderr)
        return 2
    if args.kid is not None and not _file_name(args.kid):
        # it names the key files: `--kid ../x` wrote the private key outside --dir
        print(f"dualcast keys: --kid {args.kid!r} names the key files (<kid>.pem): use a "
              "plain name without '/', '\\' or a leading '.', e.g. signing-2026", file=sys.stderr)
        return 2
    kid = args.kid or f"{algorithm.lower()}-{secrets.token_hex(4)}"
    folder = Path(args.dir)
    try:
        made = make_key_files(folder, kid, algorithm, Path(args.jwks or folder / "jwks.json"))
    except FileExistsError as exc:
        print(f"dualcast keys: {exc.filename} exists; choose another --kid", file=sys.stderr)
        return 2
    except ValueError as exc:  # the key set file is not one: nothing was written
        print(f"dualcast keys: {exc} (fix or remove it, or name another with --jwks)",
              file=sys.stderr)
        return 2
    except OSError as exc:  # nothing is left behind either
        print(f"dualcast keys: cannot write {exc.filename or folder}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    held = f"{made.keys_in_set} key{'' if made.keys_in_set == 1 else 's'}"  # ("1 keys" was)
    print(f"private key  {made.private}  (keep it with the service that mints tokens)\n"
          f"public key   {made.public}  (DUALCAST_PUBLIC_KEY=@{made.public})\n"
          f"key set      {made.jwks}  ({held}; serve it at DUALCAST_JWKS_URL)\n"
          f"settings     DUALCAST_JWT_ALGORITHMS={algorithm}\n"
          f"a token      dualcast token --key @{made.private} --alg {algorithm} --kid {kid} "
          "--sub alice")
    return 0


def _publish(args: argparse.Namespace) -> int:
    from dualcast.publisher.encoding import prepare

    try:
        data = json.loads(args.json)
    except json.JSONDecodeError as exc:
        print(f"dualcast publish: JSON is not valid: {exc}", file=sys.stderr)
        return 2
    settings = _settings(args)
    try:  # names, and data a server could not deliver (NaN, numbers past 64 bits, depth)
        # Names by this deployment's patterns (DUALCAST_EVENT_PATTERN...), as its servers
        # decode them: by the defaults, a name they refuse was appended and then skipped
        # by every server while this printed its id, and a name they allow was refused.
        prepare(args.event, data, args.room, settings.event_pattern, settings.room_pattern)
    except ValueError as exc:
        print(f"dualcast publish: {exc}", file=sys.stderr)
        return 2
    if args.cacert and not args.url:  # a CA is for --url: straight to Redis it was ignored
        print("dualcast publish: --cacert is for an https:// --url; for Redis over TLS set "
              "DUALCAST_REDIS_TLS_CA", file=sys.stderr)
        return 2
    if args.url:
        if args.redis_url:  # one of the two was ignored without a word
            print("dualcast publish: --url and --redis-url are two ways to publish (through "
                  "a server, or straight to Redis): give one", file=sys.stderr)
            return 2
        if args.wait_replicas:
            print("dualcast publish: --wait-replicas needs Redis (--redis-url or "
                  "DUALCAST_REDIS_URL), not --url", file=sys.stderr)
            return 2
        return _publish_http(args, settings, data)
    if args.token:  # a token is for --url: straight to Redis it was ignored
        print("dualcast publish: --token is for --url (POST /api/publish); straight to Redis "
              "no token is needed: leave it out, or add --url", file=sys.stderr)
        return 2
    if settings.redis_url is None:
        print("dualcast publish: no Redis configured: set DUALCAST_REDIS_URL, pass --redis-url, "
              "or --url of a running dualcast server", file=sys.stderr)
        return 2
    import asyncio

    return asyncio.run(_publish_redis(args, settings, data))


def _count(value: str) -> int:
    """A whole number >= 0 for a flag; argparse turns the error into one line naming the flag."""
    if not (value.isascii() and value.isdigit()):
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number >= 0")
    return int(value)


def _milliseconds(value: str) -> int:
    """`--wait-timeout`: WAIT with 0 would block without bound, which the publisher refuses
    (in words naming its own parameter, wait_timeout_ms, not this flag)."""
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of milliseconds "
                                         ">= 1 (0 would wait without bound)")
    return int(value)


def _demo_speed(value: str) -> float:
    """`demo --speed`, refused by argparse in one line as `serve --demo-speed` is by the
    settings (0, nan or inf ended in a traceback once the demo had started)."""
    from dualcast.config import DEMO_SPEED_MAX

    speed = float(value) if _NUMBER.fullmatch(value) else math.nan
    if not 0 < speed <= DEMO_SPEED_MAX:  # (nan fails every comparison)
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a number above 0 and at most {DEMO_SPEED_MAX:g}")
    return speed


async def _publish_redis(args: argparse.Namespace, settings: Settings, data: Any) -> int:
    from dualcast.publisher import Publisher
    from dualcast.publisher.core import MAYBE_APPENDED
    from dualcast.redis_connect import parse_redis_url

    assert settings.redis_url is not None
    # the command reports the outcome itself, in one line: the library's warnings would repeat it
    logging.getLogger("dualcast.publisher").setLevel(logging.ERROR)
    try:
        publisher = Publisher(settings.redis_url, stream=settings.stream, maxlen=settings.maxlen,
                              timeout=settings.redis_timeout, wait_replicas=args.wait_replicas,
                              wait_timeout_ms=args.wait_timeout, tls=settings.redis_tls,
                              event_pattern=settings.event_pattern,
                              room_pattern=settings.room_pattern)
    except ValueError as exc:  # an option this Redis cannot honour (WAIT on a Cluster)
        print(f"dualcast publish: {exc}", file=sys.stderr)
        return 2
    async with publisher:
        result = await publisher.publish_result(args.event, data, args.room or None)
    if result.id is None:
        # (no reply in time is no refusal: a retry could append the event a second time)
        took = ("may or may not have taken the event" if (result.error or "").endswith(
            MAYBE_APPENDED) else "did not take the event")
        hint = ""
        if parse_redis_url(settings.redis_url).tls and "Timeout connecting" in (
                result.error or ""):
            hint = (" (no TLS handshake: is that a TLS port? rediss:// is for one, "
                    "redis:// for a plain-text one)")
        print(f"dualcast publish: Redis at {publisher.where} {took}: {result.error}{hint}",
              file=sys.stderr)
        return 1
    print(result.id)
    if not result.replicated:  # written to the primary: a warning, not a failure
        print(f"dualcast publish: warning: {result.replicas or 0} of {args.wait_replicas} "
              f"replicas acknowledged within {args.wait_timeout} ms", file=sys.stderr)
    return 0


def _publish_http(args: argparse.Namespace, settings: Settings, data: Any) -> int:
    import httpx

    from dualcast.auth import hmac_algorithm, mint_for
    from dualcast.client.connections import certificate_refused, trust
    from dualcast.secret_file import SecretFileError

    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        # (httpx's words were "127.0.0.1:8000 is not reachable: Request URL is missing an
        # 'http://' or 'https://' protocol", after the token checks had spoken first)
        print(f"dualcast publish: --url {args.url!r} is not a server's base URL: give it "
              "with its scheme, e.g. http://127.0.0.1:8000", file=sys.stderr)
        return 2
    token = args.token
    if token is None and hmac_algorithm(settings) is None:
        print(f"dualcast publish: {_keyed_only(settings)}: pass --token, e.g. from "
              f"`{_keyed_token_command(settings, '--sub cli --publish')}`", file=sys.stderr)
        return 2
    try:
        secret = (settings.secret or _kept_secret()) if token is None else None
    except SecretFileError as exc:
        print(f"dualcast publish: {exc}", file=sys.stderr)
        return 2
    signed_with = None  # which secret signed the token this command made, if it made one
    if secret:  # the algorithm, issuer and audience the server checks, else it refuses it
        token = mint_for(settings, secret, "cli", publish=True, ttl=300)
        signed_with = ("DUALCAST_SECRET" if settings.secret else
                       f"the secret kept in {_kept_secret_path()}")
    if not token:  # every server refuses a publish without one (it was a bare 401 back)
        print("dualcast publish: --url needs a publish token: pass --token (e.g. from "
              "`dualcast token --sub cli --publish` on the server's machine), or set "
              "DUALCAST_SECRET to the server's secret", file=sys.stderr)
        return 2
    headers = {"Authorization": f"Bearer {token}"}
    body = {"event": args.event, "data": data, "rooms": args.room}
    try:  # the CAs `dualcast tail` trusts, or --cacert's alone
        verify = trust(args.cacert)
    except ValueError as exc:
        print(f"dualcast publish: --cacert: {exc}", file=sys.stderr)
        return 2
    try:
        response = httpx.post(args.url.rstrip("/") + "/api/publish", json=body, headers=headers,
                              timeout=10, verify=verify)
    except httpx.HTTPError as exc:
        refused = certificate_refused(exc)
        if refused is not None:  # it answered: "not reachable" sent people to the network
            print(f"dualcast publish: the TLS certificate of {args.url} was not accepted "
                  f"({refused.verify_message or refused}): for a private CA, pass its "
                  "bundle with --cacert FILE", file=sys.stderr)
        else:
            print(f"dualcast publish: {args.url} is not reachable: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 202:
        hint = ""
        if signed_with and response.status_code == 401:
            # the quick start's server keeps its own secret; a shell that exported another
            # DUALCAST_SECRET (the README's "Using it") signed with that one
            hint = (f" (the token this command made was signed with {signed_with}: give "
                    "the server's own secret, or --token)")
        print(f"dualcast publish: {_publish_refusal(args.url, response)}{hint}",
              file=sys.stderr)
        return 1
    print(response.json()["id"])
    return 0


def _publish_refusal(url: str, response: Any) -> str:
    """A refused POST /api/publish in one line: dualcast's own JSON error as it came; a
    404 or 405 (no publish endpoint at that path), or an answer that is no dualcast error
    (another server's HTML page, a proxy's), with what to check."""
    endpoint = url.rstrip("/") + "/api/publish"
    location = response.headers.get("location")
    if 300 <= response.status_code < 400 and location:
        # (not followed: a POST redirected to another origin would lose its token, and a
        # 301 or 302 turns it into a GET)
        target = str(response.url.join(location))
        base = target.removesuffix("/api/publish")
        hint = (f"give --url {base}" if base != target else
                "is --url the server's base URL (e.g. http://127.0.0.1:8000)?")
        return (f"{endpoint} redirects ({response.status_code}) to {target}: {hint}")
    try:
        body = response.json()
        known = isinstance(body, dict) and {"error", "message"} <= body.keys()
    except ValueError:
        known = False
    status = response.status_code
    if not known:
        return (f"{endpoint} answered {status} {response.reason_phrase}, which is no dualcast "
                "answer: is --url a dualcast server (or is a proxy in the way)?")
    if status in (404, 405):
        return (f"{endpoint} answered {status} {body['error']}: no publish endpoint there; "
                "--url is the server's base URL (e.g. http://127.0.0.1:8000)")
    return f"{status}: {response.text}"


def _demo(args: argparse.Namespace) -> int:
    import asyncio

    from dualcast.demo import RedisUnreachable, demo_against_redis

    settings = _settings(args)
    if settings.redis_url is None:
        print("dualcast demo: needs Redis (DUALCAST_REDIS_URL or --redis-url); "
              "for a single process use `dualcast serve --demo`", file=sys.stderr)
        return 2
    # the lines `dualcast serve` writes ("INFO:dualcast.demo:demo: ..." had no time)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Ctrl-C and SIGTERM (docker stop, systemd) set `stop`: the demo ends its open
        # sessions and returns. Not asyncio.run's own Ctrl-C, which cancels the task: under
        # load that cancellation sometimes never ended the demo (its test waited 15 s in
        # ~1 of 25 runs; the process had the signal and kept publishing). A second
        # Ctrl-C stops at once; an ignored SIGINT (a background job) stays ignored.
        def interrupted() -> None:
            if stop.is_set():
                raise KeyboardInterrupt
            stop.set()

        loop.add_signal_handler(signal.SIGTERM, stop.set)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            loop.add_signal_handler(signal.SIGINT, interrupted)
        assert settings.redis_url is not None
        await demo_against_redis(settings.redis_url, settings.stream, settings.maxlen, stop,
                                 args.speed, tls=settings.redis_tls)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except RedisUnreachable as exc:
        print(f"dualcast demo: {exc}", file=sys.stderr)
        return 1
    return 0


def _tail(args: argparse.Namespace) -> int:
    from dualcast.client.tail import run

    # (every --rooms counts: the last one alone was kept, and `--room a --room b`, as
    # `dualcast token` and `publish` take rooms, tailed room b only)
    named = (room.strip() for value in args.rooms for room in value.split(","))
    rooms = list(dict.fromkeys(room for room in named if room))
    return run(args.url, token=args.token, rooms=rooms, last_event_id=args.last_event_id,
               transport=args.transport, cacert=args.cacert)


class _Parser(argparse.ArgumentParser):
    """argparse, with a refused command line said in one line (not usage plus error)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _version() -> str:
    """The installed distribution's version; the package's own when it runs from a source
    tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dualcast")
    except PackageNotFoundError:
        from dualcast import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    from dualcast.config import DEMO_SPEED_MAX

    parser = _Parser(prog="dualcast", description=__doc__)
    parser.add_argument("-V", "--version", action="version", version=f"dualcast {_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="interface to bind: an address of this machine (IPv6 "
                       "without brackets) or its name; 0.0.0.0 for all (DUALCAST_HOST)")
    # --port, --workers and --demo-speed are read as their variables are (the settings
    # refuse what the variable would): argparse's int() and float() took other scripts'
    # digits ("--port" with Arabic-Indic 8000 served on 8000, the variable was refused).
    serve.add_argument("--port", help="port to bind (DUALCAST_PORT)")
    serve.add_argument("--redis-url", help="Redis URL; none = the memory engine "
                       "(DUALCAST_REDIS_URL)")
    serve.add_argument("--workers", help="worker processes, Redis engine only "
                       "(DUALCAST_WORKERS)")
    serve.add_argument("--workers-wake", help="busy: workers past the first sleep (read "
                       "nothing) until it is busy; start: all serve from the start "
                       "(DUALCAST_WORKERS_WAKE)")
    serve.add_argument("--log-level", help="critical, error, warning, info, debug "
                       "(DUALCAST_LOG_LEVEL)")
    serve.add_argument("--demo", action="store_true", default=None,
                       help="publish simulated proxy traffic (DUALCAST_DEMO)")
    serve.add_argument("--demo-speed", help="pace of the demo (DUALCAST_DEMO_SPEED)")
    serve.set_defaults(func=_serve, parser=serve)

    pub = sub.add_parser("publish", help="append one event")
    pub.add_argument("event", help="the event's name, e.g. deploy (DUALCAST_EVENT_PATTERN)")
    pub.add_argument("json", help="the event's data as JSON, e.g. '{\"v\": 2}'")
    pub.add_argument("--room", action="append", default=[],
                     help="a room to send it to; repeat for several (none: a public event)")
    pub.add_argument("--redis-url", help="append straight to this Redis (DUALCAST_REDIS_URL)")
    pub.add_argument("--url", help="a running dualcast server (uses POST /api/publish)")
    pub.add_argument("--token", help="a publish token for --url (default: one made with "
                     "DUALCAST_SECRET, else the secret dualcast serve keeps on this machine)")
    pub.add_argument("--cacert", metavar="FILE", help="for an https:// --url: trust only "
                     "the CAs of this PEM bundle (default: the system's and certifi's)")
    pub.add_argument("--wait-replicas", type=_count, default=0, metavar="N",
                     help="after the write, WAIT for N replicas (a warning on stderr if fewer)")
    pub.add_argument("--wait-timeout", type=_milliseconds, default=1000, metavar="MS",
                     help="how long --wait-replicas waits, in ms (default 1000)")
    pub.set_defaults(func=_publish, parser=pub)

    tok = sub.add_parser("token", help="mint a token")
    tok.add_argument("--sub", required=True, type=_subject,
                     help="who the token is for (its user room is user-<sub>)")
    tok.add_argument("--room", action="append", default=[],
                     help="a room it may join; repeat for several")
    tok.add_argument("--admin", action="store_true", help="may join every room")
    tok.add_argument("--publish", action="store_true", help="may POST /api/publish")
    tok.add_argument("--ttl", type=parse_ttl, default=3600.0,
                     help="lifetime: seconds, or e.g. 90s, 30m, 8h, 7d (default 1h)")
    tok.add_argument("--secret", help="the HS* secret (default: DUALCAST_SECRET, else the "
                     "one dualcast serve keeps on this machine)")
    tok.add_argument("--key", help="sign with this private key (PEM, or @path)")
    tok.add_argument("--alg", help="HS256, HS384, HS512, or RS*/PS*/ES*/EdDSA with --key "
                     "(default: the first of DUALCAST_JWT_ALGORITHMS the secret or --key "
                     "signs)")
    tok.add_argument("--kid", help="the key id a JWKS publishes the key under")
    tok.add_argument("--issuer", help="'iss' claim (default: DUALCAST_JWT_ISSUER)")
    tok.add_argument("--audience", help="'aud' claim (default: DUALCAST_JWT_AUDIENCE)")
    tok.set_defaults(func=_token, parser=tok)

    keys = sub.add_parser("keys", help="make a key pair for tokens and a JWKS file")
    keys.add_argument("--alg", default="ES256", help="RS*, PS*, ES* or EdDSA (default ES256)")
    keys.add_argument("--kid", help="key id (default: made up)")
    keys.add_argument("--dir", default=".", help="where the key files go")
    keys.add_argument("--jwks", help="the JWKS file to add the key to (default DIR/jwks.json)")
    keys.set_defaults(func=_keys, parser=keys)

    demo = sub.add_parser("demo", help="publish simulated traffic to Redis")
    demo.add_argument("--redis-url", help="the Redis to publish to (DUALCAST_REDIS_URL)")
    demo.add_argument("--speed", type=_demo_speed, default=1.0,
                      help=f"pace: 1 = about five events a second, up to {DEMO_SPEED_MAX:g} "
                      "(as DUALCAST_DEMO_SPEED)")
    demo.set_defaults(func=_demo, parser=demo)

    tail = sub.add_parser("tail", help="print a server's events as JSON lines until Ctrl-C")
    tail.add_argument("url", help="the dualcast server, e.g. http://127.0.0.1:8000")
    tail.add_argument("--token", help="a subscriber token (default: $DUALCAST_TOKEN)")
    tail.add_argument("--rooms", action="append", default=[],
                      help="comma-separated rooms, or repeat it (default: all the token "
                      "allows)")
    tail.add_argument("--last-event-id", help="resume after this id; 0 = all retained events")
    tail.add_argument("--transport", choices=["auto", "websocket", "sse", "polling"],
                      default="auto", help="only this transport (default auto: the best "
                      "that works, falling back and climbing back)")
    tail.add_argument("--cacert", metavar="FILE", help="trust only the CAs of this PEM "
                      "bundle for https:// (default: the system's and certifi's)")
    tail.set_defaults(func=_tail, parser=tail)
    return parser


#: The exit status of a command stopped by Ctrl-C before it was under way (128 + SIGINT).
INTERRUPTED = 128 + signal.SIGINT


def _unrecognized(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    """`dualcast serve --prot 8000`: the flags the command does not know, the one meant
    when it is close to one, and the command's --help (`dualcast --help` lists none)."""
    import difflib

    flags = [flag for action in parser._actions for flag in action.option_strings]
    meant = [close[0] for word in extra if word.startswith("-")
             for close in [difflib.get_close_matches(word.split("=")[0], flags, n=1)] if close]
    hint = f"; did you mean {', '.join(meant)}?" if meant else ""
    parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, file: TextIO | None = None, line: str | None = None) -> None:
    """A library's warning as one line of the command's (PyJWT's InsecureKeyLengthWarning
    came as its source file, line number and a line of its code)."""
    print(f"dualcast: warning: {message}", file=file or sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _one_line_warning
    try:
        from dualcast.config import SettingsError

        parser = build_parser()
        if not (sys.argv[1:] if argv is None else argv):
            # a bare `dualcast` said "the following arguments are required: command":
            # the commands themselves, each with its line, are what the person is after
            parser.print_help(sys.stderr)
            return 2
        args, extra = parser.parse_known_args(argv)
        if extra:  # said by the command's own parser: its --help lists its flags
            _unrecognized(args.parser, extra)
        try:
            return int(args.func(args))
        except SettingsError as exc:
            print(f"dualcast: {exc}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:  # Ctrl-C while starting (imports, settings): no traceback
        return INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
