"""One settings object, validated at start-up; its errors name the setting.

Every knob is an environment variable with the `DUALCAST_` prefix (plain
`REDIS_URL` is honoured too, as most platforms set it).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from dualcast.names import EVENT_NAME_PATTERN, ROOM_NAME_PATTERN, name_rule
from dualcast.redis_connect import TlsFiles, parse_redis_url
from dualcast.secret_file import MIN_SECRET_BYTES

Transport = Literal["websocket", "sse", "polling"]
ALL_TRANSPORTS: tuple[Transport, ...] = ("websocket", "sse", "polling")


#: The largest count Redis takes (a signed 64-bit integer: XADD's MAXLEN) and the largest
#: length of a Python deque (the recent window): a count above it passed the settings
#: and then failed every publish ("value is not an integer or out of range"), or the
#: start with a traceback.
COUNT_MAX = 2**63 - 1

#: The demo's fastest pace, for DUALCAST_DEMO_SPEED and `dualcast demo --speed` alike.
DEMO_SPEED_MAX = 100.0


class Settings(BaseSettings):
    # (no float setting means anything by inf: "off" is 0 where a setting has an off)
    model_config = SettingsConfigDict(env_prefix="DUALCAST_", extra="ignore", frozen=False,
                                      allow_inf_nan=False)

    # where events live
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DUALCAST_REDIS_URL", "REDIS_URL", "redis_url"),
        description="Redis URL; none = the embedded memory engine (one process only)",
    )
    stream: str = Field("websocket-broadcast", min_length=1, max_length=200)
    maxlen: int = Field(10_000, ge=10, le=COUNT_MAX,
                        description="approximate MAXLEN ~ trim on append")
    block_ms: int = Field(2_000, ge=10, le=10_000, description="XREAD BLOCK per read")
    batch_count: int = Field(500, ge=1, le=10_000, description="XREAD COUNT per read")
    redis_timeout: float = Field(3.0, gt=0, le=60, description="timeout of a non-blocking call")
    stall_seconds: float = Field(
        15.0, gt=0, description="a consumer with no completed read for this long is not ready"
    )
    backoff_max: float = Field(5.0, gt=0, le=300, description="cap of the reconnect backoff")
    redis_tls_ca: str | None = Field(None, description="CA (PEM) that signed Redis' TLS cert")
    redis_tls_cert: str | None = Field(None, description="client certificate (PEM) for Redis TLS")
    redis_tls_key: str | None = Field(None, description="client key (PEM) for Redis TLS")

    # serving
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    workers_wake: Literal["busy", "start"] = Field(
        "busy", description="when workers past the first serve: once it is busy, or from the start",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    shutdown_grace: float = Field(10.0, ge=0, le=600, description="seconds to drain on SIGTERM")
    static_dir: str | None = Field(None, description="dashboard folder; default: the bundled one")
    forwarded_allow_ips: str = Field(
        "127.0.0.1,::1",
        description="proxies whose X-Forwarded-For/-Proto are trusted (comma list, * = any)",
    )

    # auth
    secret: str | None = Field(
        None, description="HS256 secret of the tokens (32+ bytes); none = one kept per machine"
    )
    allow_anonymous: bool = True
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    cookie_secure: Literal["auto", "always", "never"] = "auto"
    # tokens from other issuers, and the application's session check
    jwt_algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["HS256"],
        description="accepted token algorithms (comma list: HS*, RS*, PS*, ES*, EdDSA)",
    )
    public_key: str | None = Field(None, description="PEM public key for RS/PS/ES/EdDSA (or @path)")
    jwks_url: str | None = Field(None, description="an issuer's JWKS URL (keys by kid)")
    jwks_min_interval: float = Field(
        60.0, ge=0, le=3600,
        description="least seconds between fetches tokens cause (an unknown kid, or no kid "
        "and no key held checks it)",
    )
    jwks_refresh: float = Field(600.0, ge=0, description="seconds between JWKS refreshes; 0=off")
    jwt_issuer: str | None = Field(None, description="required 'iss' of every token")
    jwt_audience: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted 'aud' values (comma list); required if set"
    )
    auth_url: str | None = Field(None, description="the application's session check (GET)")
    auth_timeout: float = Field(
        3.0, gt=0, le=60, description="seconds the auth hook and a JWKS fetch may take"
    )

    # transports
    transports: Annotated[list[Transport], NoDecode] = Field(
        default_factory=lambda: list(ALL_TRANSPORTS)
    )
    queue_size: int = Field(1_000, ge=1, description="events waiting per subscriber before cut-off")
    max_connections_per_subject: int = Field(
        200, ge=0, description="streams and polls one token subject may hold at once (0: no cap)"
    )
    max_connections_per_address: int = Field(
        200, ge=0, description="streams and polls one anonymous client address may hold (0: no cap)"
    )
    max_connections: int | None = Field(
        None, ge=0,
        description="streams and polls one process (each worker) holds at once; each is an "
                    "open file (unset: the open-file limit minus 100; 0: no cap)",
    )
    ping_interval: float = Field(15.0, gt=0, le=3600, description="SSE ping / WS heartbeat")
    sse_retry_ms: int = Field(3_000, ge=100)
    replay_max: int | None = Field(
        None, ge=0,
        description="events one client may replay after a cursor (unset: twice "
                    "DUALCAST_MAXLEN; 0: not capped)")
    replay_page: int = Field(500, ge=1, le=10_000)
    recent_window: int = Field(2_000, ge=0, le=COUNT_MAX,
                               description="events kept in memory for pollers")
    poll_timeout_max: float = Field(30.0, ge=0, le=300)

    # limits
    max_frame_bytes: int = Field(64 * 1024, ge=256)
    max_body_bytes: int = Field(256 * 1024, ge=256)
    body_timeout: float = Field(30.0, gt=0, le=600,
                                description="seconds a publish body may take to arrive")
    max_rooms: int = Field(50, ge=1)
    room_pattern: str = ROOM_NAME_PATTERN
    event_pattern: str = EVENT_NAME_PATTERN
    max_bad_frames: int = Field(10, ge=1, description="bad WS frames before close 1008")
    demo: bool = Field(False, description="publish simulated LLM-proxy traffic (one process)")
    demo_speed: float = Field(1.0, gt=0, le=DEMO_SPEED_MAX, description="pace of the demo traffic")
    gc_refresh: float = Field(
        3600.0, ge=0,
        description="seconds between full garbage collections that rescan every connection "
                    "(others skip what the last one kept); 0 = Python's default collector",
    )

    @field_validator("allowed_origins", "transports", "jwt_algorithms", "jwt_audience",
                     mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        """Each listed origin as a browser sends it, so a request's Origin header is
        compared as sent (one set lookup per request, nothing parsed)."""
        try:
            return list(dict.fromkeys(canonical_origin(item) for item in value))
        except ValueError as exc:
            raise ValueError(f"DUALCAST_ALLOWED_ORIGINS: {exc}") from None

    @field_validator("room_pattern", "event_pattern")
    @classmethod
    def _name_pattern(cls, value: str, info: ValidationInfo) -> str:
        """A pattern that compiles, refuses the empty name and the names that would break
        the protocol (see dualcast.names: those limits also hold per name at run time)."""
        name_rule("room" if info.field_name == "room_pattern" else "event", value)
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        """A blank host (an env file's `DUALCAST_HOST=`) would bind every interface: the
        opposite of the default, so it is refused rather than guessed at."""
        if not value.strip():
            raise ValueError("must not be empty (127.0.0.1 binds this machine only, "
                             "0.0.0.0 or :: every interface)")
        return value.strip()

    @field_validator("secret")
    @classmethod
    def _long_secret(cls, value: str | None) -> str | None:
        if value is not None and len(value.encode()) < MIN_SECRET_BYTES:
            raise ValueError(
                f"must be at least {MIN_SECRET_BYTES} bytes for HS256 (RFC 7518); make one "
                "with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value in (None, "", "memory", "memory://"):
            return None
        parse_redis_url(value)  # its errors never repeat the password
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxies(cls, value: str) -> str:
        """Addresses and networks as uvicorn reads them. It takes anything else (a host
        name, 10.0.0.1/16 with host bits set, `*` beside an address) for a literal that
        no client address ever equals, so the proxy's headers were ignored without a word
        and every client looked like the proxy."""
        items = [item.strip() for item in value.split(",") if item.strip()]
        if "*" in items:
            return "*"
        for item in items:
            try:
                if "/" in item:
                    ipaddress.ip_network(item)
                else:
                    ipaddress.ip_address(item)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or a network such as "
                                 "10.0.0.0/16 (a comma list; * trusts any)") from None
        return ",".join(items)

    @field_validator("static_dir")
    @classmethod
    def _static_folder(cls, value: str | None) -> str | None:
        """A folder that is not there (a typo) served a 404 for the dashboard while the
        server printed its link; refused at start instead."""
        if value is not None and not os.path.isdir(value):
            raise ValueError("no such folder (the dashboard's files; leave it unset for "
                             "the bundled dashboard)")
        return value

    @model_validator(mode="after")
    def _redis_tls(self) -> Settings:
        files = (self.redis_tls_ca, self.redis_tls_cert, self.redis_tls_key)
        if any(files) and not (self.redis_url and parse_redis_url(self.redis_url).tls):
            # (the variable that was set: naming _CA for a lone _CERT sent people to
            # look for a setting they never made)
            named = next(name for name, path in zip(("CA", "CERT", "KEY"), files, strict=True)
                         if path)
            raise ValueError(f"DUALCAST_REDIS_TLS_{named}: TLS files need a rediss:// URL "
                             "(or rediss+sentinel://, rediss+cluster://)")
        if bool(self.redis_tls_cert) != bool(self.redis_tls_key):
            raise ValueError("DUALCAST_REDIS_TLS_CERT: a client certificate needs its key "
                             "(DUALCAST_REDIS_TLS_KEY), and a key its certificate")
        for name, path in zip(("CA", "CERT", "KEY"), files, strict=True):
            if path and not os.path.isfile(path):
                raise ValueError(f"DUALCAST_REDIS_TLS_{name}: no such file: {path}")
        return self

    @property
    def replay_cap(self) -> int | None:
        """Events one client may replay after its cursor before it is told `reset`; None:
        not capped.

        Unset, twice the maxlen: producers trim with `MAXLEN ~`, and Redis then keeps
        whole nodes, a little more than MAXLEN. A cap equal to MAXLEN (both were 10,000
        by default) sent `reset` to a client whose cursor was the oldest retained entry,
        though nothing after it was gone; a cursor the log no longer covers is a reset
        by itself, so the cap only bounds what one client may ask for.
        """
        if self.replay_max is None:
            return 2 * self.maxlen
        return self.replay_max or None

    @property
    def redis_tls(self) -> TlsFiles:
        """The TLS files for a rediss:// URL (empty: the system's CAs, no client cert)."""
        return TlsFiles(self.redis_tls_ca, self.redis_tls_cert, self.redis_tls_key)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.redis_url is None and self.workers > 1:
            raise ValueError(
                "DUALCAST_WORKERS (--workers): the memory engine lives in one process; "
                "set DUALCAST_REDIS_URL (or --redis-url) to run several workers"
            )
        if self.demo and self.workers > 1:
            raise ValueError(
                "DUALCAST_DEMO: the demo runs in one process; with several workers run "
                "`dualcast demo` beside them"
            )
        if self.block_ms / 1000 >= self.stall_seconds:
            raise ValueError("DUALCAST_STALL_SECONDS: must be longer than DUALCAST_BLOCK_MS")
        if not self.transports:
            raise ValueError("DUALCAST_TRANSPORTS: at least one transport must be enabled")
        return self

    @field_validator("jwt_algorithms")
    @classmethod
    def _algorithms(cls, value: list[str]) -> list[str]:
        from dualcast.keys import parse_algorithms

        return parse_algorithms(value)

    @field_validator("secret", "static_dir", "redis_tls_ca", "redis_tls_cert", "redis_tls_key",
                     "public_key", "jwks_url", "jwt_issuer", "auth_url", "replay_max",
                     mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        """`DUALCAST_X=` (set, empty: a template's blank) means unset, not an empty value."""
        return None if value == "" else value

    @field_validator("stream", "secret", "jwt_issuer", "room_pattern", "event_pattern")
    @classmethod
    def _no_stray_characters(cls, value: str | None) -> str | None:
        """A value that Redis, a token or a name is compared with byte for byte: a
        trailing `\\r` (an env file saved with CRLF line ends) or space was kept, and the
        server then read another stream key than its producers wrote, refused every token,
        or every room name, without a word. Never repeats the value (a secret)."""
        if value is None:
            return value
        if value != value.strip():
            raise ValueError("begins or ends with whitespace (a line end of an env file "
                             "saved with CRLF?): remove it")
        if not value.isprintable():
            raise ValueError("holds control characters: remove them")
        return value

    @field_validator("jwks_url", "auth_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        """A URL that can be fetched: one whose host or port does not parse (`http://`,
        `http://[::1`, port 99999) was taken, then every JWKS fetch failed, its task dying
        with a traceback each time, or every auth check did. The message never repeats the
        URL, which may carry a password."""
        if value is None:
            return value
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        problem = _not_an_http_url(value)
        if problem:
            raise ValueError(f"not a URL that can be fetched: {problem} "
                             "(http[s]://host[:port]/path)")
        return value

    @model_validator(mode="after")
    def _token_keys(self) -> Settings:
        """Every listed algorithm has a key, and every key an algorithm (caught at start,
        not on the first refused token)."""
        from dualcast.keys import ALGORITHMS, Family, key_fits, load_public_key

        keyed = [a for a in self.jwt_algorithms if ALGORITHMS[a] is not Family.HMAC]
        if keyed and not (self.public_key or self.jwks_url):
            raise ValueError(
                f"DUALCAST_JWT_ALGORITHMS: {keyed[0]} needs DUALCAST_PUBLIC_KEY or "
                "DUALCAST_JWKS_URL"
            )
        if (self.public_key or self.jwks_url) and not keyed:
            raise ValueError(
                "DUALCAST_JWT_ALGORITHMS: lists no algorithm for the issuer's keys "
                "(add the one it signs with, e.g. RS256 or ES256)"
            )
        if self.public_key:
            try:
                key = load_public_key(self.public_key)
            except ValueError as exc:
                raise ValueError(f"DUALCAST_PUBLIC_KEY: {exc}") from None
            if not any(key_fits(key, a) for a in keyed) and not self.jwks_url:
                raise ValueError(
                    "DUALCAST_PUBLIC_KEY: DUALCAST_JWT_ALGORITHMS lists no algorithm "
                    "this key can check"
                )
        return self

    @property
    def engine(self) -> str:
        return "memory" if self.redis_url is None else "redis"


_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_NAME = re.compile(r"[a-z0-9_.-]+")


def canonical_origin(value: str) -> str:
    """`value` as the `Origin` header a browser sends for it (RFC 6454 serialisation:
    scheme and host lower-case, the scheme's default port left out, no path), or
    ValueError naming what makes it something else. `*` (any origin) stays `*`."""
    if value == "*":
        return value
    if "*" in value:
        raise ValueError(f"{value!r}: `*` alone allows any origin; an origin with a "
                         "wildcard in it is not supported")
    problem = _not_an_origin(value)
    if problem:
        raise ValueError(f"{value!r} is not an origin (scheme://host[:port]): {problem}")
    parts = urlsplit(value)
    scheme, host, port = parts.scheme.lower(), parts.hostname or "", parts.port
    if ":" in host:
        host = f"[{ipaddress.IPv6Address(host).compressed}]"
    shown_port = "" if port is None or port == _DEFAULT_PORTS[scheme] else f":{port}"
    return f"{scheme}://{host}{shown_port}"


def _not_an_origin(value: str) -> str | None:
    """What keeps `value` from being an http(s) origin, or None when it is one."""
    if not value.isprintable() or " " in value:
        return "it holds whitespace or control characters"
    if "://" not in value:
        return "it has no scheme (http:// or https://)"
    try:
        parts = urlsplit(value)
        _ = parts.port  # (raises ValueError for a port that is not a number in range)
    except ValueError as exc:
        return f"its host or port does not parse ({exc})"
    host = parts.hostname or ""
    if parts.scheme.lower() not in _DEFAULT_PORTS:
        return f"its scheme is {parts.scheme!r}, not http or https"
    if "@" in parts.netloc:
        return "it has user information"
    if parts.path not in ("", "/"):
        return f"it has a path ({parts.path})"
    if "?" in value or "#" in value:
        return "it has a query or a fragment"
    if not host:
        return "it has no host"
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} is not an IPv6 address"
    elif not _HOST_NAME.fullmatch(host):
        return "its host is not a DNS name or an IP address (write an international name in " \
               "its xn-- form, as browsers send it)"
    return None


def _not_an_http_url(value: str) -> str | None:
    """What keeps an http(s) URL from being fetched, or None (never the URL itself)."""
    import httpx  # (only where such a URL is set: the settings load without it)

    if not value.isprintable() or any(char.isspace() for char in value):
        return "it holds whitespace or control characters"
    try:
        parts = urlsplit(value)
        _ = parts.port  # (raises ValueError for a port that is not a number in range)
    except ValueError:
        return "its host or port does not parse"
    if not parts.hostname:
        return "it has no host"
    try:
        httpx.URL(value)
    except httpx.InvalidURL:
        return "it does not parse"
    return None


class SettingsError(Exception):
    """A bad setting; its message is one line naming the setting (`field` is its name in
    Settings, so a command line can name its own flag instead)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


#: Values never repeated in an error: a secret, or a URL that may carry a password.
_NOT_ECHOED = frozenset({"secret", "redis_url", "jwks_url", "auth_url", "public_key"})


def env_name(field: str) -> str:
    """The environment variable a person set for `field` (REDIS_URL when only that is set)."""
    only_plain = "DUALCAST_REDIS_URL" not in os.environ and "REDIS_URL" in os.environ
    if field == "redis_url" and only_plain:
        return "REDIS_URL"
    return f"DUALCAST_{field.upper()}"


#: Variables with the prefix that are not settings: `dualcast tail` reads DUALCAST_TOKEN.
NOT_SETTINGS = frozenset({"DUALCAST_TOKEN"})


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line for each `DUALCAST_*` variable that is no setting (a typo such as
    DUALCAST_REDIS_ULR is ignored by the settings, so the server would run on the memory
    engine without a word), naming the setting it most likely meant."""
    fields = [field.upper() for field in Settings.model_fields]
    known = {f"DUALCAST_{field}" for field in fields} | NOT_SETTINGS
    lines = []
    for name in sorted(os.environ if environ is None else environ):
        upper = name.upper()  # (the settings read their variables in any case)
        if not upper.startswith("DUALCAST_") or upper in known:
            continue
        close = difflib.get_close_matches(upper.removeprefix("DUALCAST_"), fields, n=1,
                                          cutoff=0.75)
        hint = (f"did you mean DUALCAST_{close[0]}?" if close
                else "the settings are listed under Configuration in the README")
        lines.append(f"{name} is not a dualcast setting and is ignored ({hint})")
    return lines


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment plus overrides, or raise SettingsError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if message.startswith("DUALCAST_"):
            named = message.split(":", 1)[0].removeprefix("DUALCAST_").lower()
            raise SettingsError(f"bad setting {message}", named) from None
        where = str(first["loc"][0]) if first["loc"] else "settings"
        field = _field_of(where)
        shown = "" if field in _NOT_ECHOED else f" (got {first.get('input')!r})"
        raise SettingsError(f"bad setting {env_name(field)}: {message}{shown}", field) from None


def _field_of(loc: str) -> str:
    """Settings' field for an error location, which is the alias when one matched."""
    if loc in Settings.model_fields:
        return loc
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices) and loc in alias.choices:
            return name
    return loc.lower().removeprefix("dualcast_")
