"""Every Redis client dualcast builds comes from here: one URL, three topologies.

`DUALCAST_REDIS_URL` names a plain server (`redis://`, `rediss://` with TLS,
`unix://`), a primary found through Sentinel and followed across failovers
(`redis+sentinel://[user:pass@]h1:p1[,h2:p2...]/<service>[/db]`) or a Redis
Cluster (`redis+cluster://[user:pass@]h1:p1[,h2:p2...]`; the stream key lives in
one slot, and redis-py follows MOVED/ASK and re-reads the slot map after a
failover). `rediss+sentinel://` and `rediss+cluster://` speak TLS to the data
nodes. The consumer, replay, the poll window, the publish API, the CLI and the
Python publisher all build their clients here, so each topology behaves the same
everywhere.

A plain URL's query options are checked against the connection class of its scheme
(`URL_OPTIONS`) when it is parsed: redis-py's own parser passes any name on, and the
connection then refuses it with a TypeError on every connect.

The publisher imports this module, so it must stay free of pydantic and Starlette.
Nothing here ever puts a password into a message: `redact` is what callers show.
"""

from __future__ import annotations

import difflib
import enum
import inspect
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.asyncio.connection
import redis.asyncio.retry as aioretry
import redis.asyncio.sentinel as aiosentinel
import redis.cluster
import redis.connection
import redis.retry
import redis.sentinel
from redis.backoff import NoBackoff


class Topology(enum.StrEnum):
    STANDALONE = "standalone"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


_SCHEMES: dict[str, tuple[Topology, bool]] = {
    "redis": (Topology.STANDALONE, False),
    "rediss": (Topology.STANDALONE, True),
    "unix": (Topology.STANDALONE, False),
    "redis+sentinel": (Topology.SENTINEL, False),
    "rediss+sentinel": (Topology.SENTINEL, True),
    "redis+cluster": (Topology.CLUSTER, False),
    "rediss+cluster": (Topology.CLUSTER, True),
}
SCHEMES: tuple[str, ...] = tuple(f"{scheme}://" for scheme in _SCHEMES)


class BadRedisUrl(ValueError):
    """A URL this module cannot use; the message never repeats a password."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for TLS to Redis: the CA that signed the server (None: the system's), and
    a client certificate and key when the server asks for one (`tls-auth-clients`)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ssl_cert_reqs": "required"}
        if self.ca:
            out["ssl_ca_certs"] = self.ca
        if self.cert:
            out["ssl_certfile"] = self.cert
        if self.key:
            out["ssl_keyfile"] = self.key
        return out


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed `DUALCAST_REDIS_URL`; `url` is the original, kept for plain servers
    (redis-py parses those itself, query options included)."""

    url: str = field(repr=False)
    topology: Topology
    tls: bool
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """The URL with its password hidden: fit for a log line or an error message."""
        return redact(self.url)

    def __str__(self) -> str:
        return self.where


def _userinfo(rest: str) -> tuple[str, str] | None:
    """(user info, what follows it) of a URL's text after `://`, or None without one.

    The user info ends at the last `@`, wherever it is: a password holding an unencoded
    `/`, `?` or `#` must still be masked whole (an `@` in a query value then masks too
    much, never too little).
    """
    userinfo, at, after = rest.rpartition("@")
    return (userinfo, after) if at else None


def redact(url: str) -> str:
    """`url` with the password of its user info (and a `password=` query value) masked."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<not a URL>"
    split = _userinfo(rest)
    if split is not None:
        userinfo, rest = split
        user = userinfo.split(":", 1)[0]
        rest = f"{user}:***@{rest}" if ":" in userinfo else f"***@{rest}" if user else rest
    rest = re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", rest)
    return f"{scheme}://{rest}"


def _masked(text: str, url: str) -> str:
    """redis-py's (or urllib's) message about `url`, with what it quotes from the user
    info masked: a password holding a `/` ends the host part early, and its tail is then
    quoted back as a bad "port". What the rest of the URL shows (a port, an option's
    name) stays: it is the reason."""
    split = _userinfo(url.partition("://")[2])
    if split is None:
        return text
    userinfo, after = split
    password = userinfo.partition(":")[2]

    def mask(match: re.Match[str]) -> str:
        quoted = match.group(0)[1:-1]
        secret = (quoted in userinfo and quoted not in after) or (password and password in quoted)
        return "'***'" if quoted and secret else match.group(0)

    return re.sub(r"'[^']*'|\"[^\"]*\"", mask, text)


def _nodes(hosts: str, url: str, default_port: int) -> tuple[tuple[str, int], ...]:
    """`h1:p1,h2:p2,[::1]:p3` as (host, port) pairs."""
    out = []
    for item in hosts.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [v6]:port
            host, _, port_text = item[1:].partition("]")
            port_text = port_text.removeprefix(":")
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise BadRedisUrl(f"bad port {port_text!r} in {redact(url)}") from None
        if not host or not 0 < port < 65536:
            raise BadRedisUrl(f"bad node {item!r} in {redact(url)}")
        out.append((host, port))
    if not out:
        raise BadRedisUrl(f"no host in {redact(url)}")
    return tuple(out)


def _init_options(connection_class: type) -> set[str]:
    """The keyword arguments `connection_class` takes: its `__init__`'s and, while each
    passes `**kwargs` on, its bases'."""
    names: set[str] = set()
    for klass in connection_class.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


#: Query options redis-py passes on as text, which the connection takes as text.
_TEXT_OPTIONS = frozenset({
    "username", "password", "client_name", "lib_name", "lib_version", "ssl_keyfile",
    "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data",
    "ssl_password", "ssl_ciphers",
})
#: Options dualcast sets itself, which a URL's query would override: its pool sizes (a
#: smaller pool raises "Too many connections" under the publisher) and waits (`timeout`
#: reaches a non-blocking pool's connections as an unknown argument), and how replies
#: are decoded (the log reads bytes).
_NOT_IN_URL = {
    "max_connections": "dualcast sizes its connection pools itself",
    "timeout": "the wait for a free connection is DUALCAST_REDIS_TIMEOUT; "
               "socket_timeout is the wait for a reply",
    "decode_responses": "dualcast decodes replies itself",
    "encoding": "dualcast writes UTF-8",
    "encoding_errors": "dualcast writes UTF-8",
}


def _url_options() -> dict[str, frozenset[str]]:
    """The query options each plain scheme can take: those redis-py reads from a URL
    (typed by both its blocking and its asyncio parser, or text) that both connection
    classes of the scheme accept. Any other name would reach the connection's `__init__`
    and fail there with a TypeError on every connect."""
    typed = (set(redis.connection.URL_QUERY_ARGUMENT_PARSERS)
             & set(redis.asyncio.connection.URL_QUERY_ARGUMENT_PARSERS))
    readable = (typed | _TEXT_OPTIONS) - set(_NOT_IN_URL)
    classes = {
        "redis": (redis.connection.Connection, redis.asyncio.connection.Connection),
        "rediss": (redis.connection.SSLConnection, redis.asyncio.connection.SSLConnection),
        "unix": (redis.connection.UnixDomainSocketConnection,
                 redis.asyncio.connection.UnixDomainSocketConnection),
    }
    return {scheme: frozenset(readable & _init_options(sync) & _init_options(aio))
            for scheme, (sync, aio) in classes.items()}


URL_OPTIONS: dict[str, frozenset[str]] = _url_options()


def _option_error(name: str, scheme: str) -> str | None:
    """Why the query option `name` cannot be used with `scheme://`, or None if it can."""
    if name in URL_OPTIONS[scheme]:
        return None
    if name in _NOT_IN_URL:
        return f"option {name!r} is not supported: {_NOT_IN_URL[name]}"
    takers = [f"{other}://" for other, names in URL_OPTIONS.items() if name in names]
    if takers:
        return f"option {name!r} does not apply to {scheme}:// (only to {', '.join(takers)})"
    close = difflib.get_close_matches(name, sorted(URL_OPTIONS[scheme]), n=1)
    return f"unknown option {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _check_standalone(url: str, scheme: str) -> None:
    """Refuse, before any client is built, what redis-py would take and then fail on at
    every connect (an option the connection class refuses), retry forever (a socket
    without a path) or quietly ignore (a database that is not a number)."""
    try:
        # redis-py's own check: the port, and the values of the options it types
        parsed = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
        parts = urlsplit(url)
    except ValueError as exc:
        raise BadRedisUrl(f"{redact(url)}: {_masked(str(exc), url)}") from None
    for name in parse_qs(parts.query):
        problem = _option_error(name, scheme)
        if problem:
            raise BadRedisUrl(f"{redact(url)}: {problem}")
    if scheme == "unix":
        if not parsed.get("path"):
            raise BadRedisUrl(f"{redact(url)}: name the socket: unix:///path/to/redis.sock")
        return
    if parts.port == 0:
        raise BadRedisUrl(f"{redact(url)}: port 0 is no port")
    db_parts = [p for p in parts.path.split("/") if p]
    if len(db_parts) > 1:
        raise BadRedisUrl(f"{redact(url)}: too many path parts")
    if db_parts and not _DB.fullmatch(unquote(db_parts[0])):
        raise BadRedisUrl(f"{redact(url)}: the database must be a number, not {db_parts[0]!r}")


#: A database number: ASCII digits. str.isdigit() also takes "²" (which redis-py then
#: fails to read and quietly replaces by database 0) and other scripts' digits (which it
#: reads: Arabic-Indic 1 was database 1).
_DB = re.compile(r"[0-9]+")


def parse_redis_url(url: str) -> RedisTarget:
    """The target `url` names, or BadRedisUrl (which never repeats its password)."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in _SCHEMES:
        raise BadRedisUrl(f"must start with one of {', '.join(SCHEMES)}")
    topology, tls = _SCHEMES[scheme]
    if topology is Topology.STANDALONE:
        _check_standalone(url, scheme)
        return RedisTarget(url=url, topology=topology, tls=tls)
    rest, _, query = url.split("://", 1)[1].partition("?")
    netloc, _, path = rest.partition("/")
    if query:
        raise BadRedisUrl(f"{redact(url)}: options in the query are not supported here")
    username = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user_text, colon, pass_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(pass_text) if colon else None
    parts = [p for p in path.split("/") if p]
    db = 0
    if topology is Topology.SENTINEL:
        if not parts:
            raise BadRedisUrl(f"{redact(url)}: name the Sentinel service: .../<service>[/db]")
        service, *rest_parts = parts
        nodes = _nodes(netloc, url, 26379)
    else:
        service, rest_parts = "", parts
        nodes = _nodes(netloc, url, 6379)
    if len(rest_parts) > 1:
        raise BadRedisUrl(f"{redact(url)}: too many path parts")
    if rest_parts:
        if not _DB.fullmatch(unquote(rest_parts[0])):
            raise BadRedisUrl(f"{redact(url)}: the database must be a number")
        db = int(unquote(rest_parts[0]))
        if topology is Topology.CLUSTER and db != 0:
            raise BadRedisUrl(f"{redact(url)}: a Redis Cluster has only database 0")
    return RedisTarget(url=url, topology=topology, tls=tls, nodes=nodes, service=service, db=db,
                       username=username, password=password)


@dataclass(frozen=True, slots=True)
class Pooling:
    """How callers share connections.

    `wait`: seconds a caller waits for a free connection when all `max_connections`
    are busy (None: the pool raises at once; the caller bounds concurrency itself).
    `single`: one dedicated connection (a blocking reader must never queue behind
    others). A cluster keeps a pool per node that never waits: there `max_connections`
    is the cap per node, and `wait` and `single` do not apply.
    """

    max_connections: int = 64
    wait: float | None = None
    single: bool = False


#: Options of a TCP connection that redis-py's Unix-socket connection refuses outright
#: (a TypeError each time a connection is made).
_TCP_ONLY = ("socket_keepalive", "socket_keepalive_options")


def _common(target: RedisTarget, tls: TlsFiles | None, options: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(options)
    if target.url.startswith("unix://"):
        for name in _TCP_ONLY:
            kwargs.pop(name, None)
    if target.topology is not Topology.STANDALONE:
        kwargs.update(username=target.username, password=target.password)
        if target.tls:
            kwargs["ssl"] = True
    if target.tls:
        kwargs.update((tls or TlsFiles()).kwargs())
    return kwargs


try:
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - redis-py before 7 has no such notifications
    _NO_MAINT_NOTIFICATIONS: dict[str, Any] = {}
else:
    #: Why: a pool checks a connection as it hands it out and reconnects one whose peer
    #: closed it, except when maintenance notifications (a Redis Enterprise feature, RESP3
    #: only) are on, and redis-py 8's default for them is "auto", which that check reads
    #: as on. So every connection cut while Redis was away was handed out as if alive
    #: and the first command on it after Redis came back failed: a publish answered 503
    #: "unreachable", a long-poll 503 (tests/test_log.py). Off, the check works again.
    _NO_MAINT_NOTIFICATIONS = {"maint_notifications_config": MaintNotificationsConfig(
        enabled=False)}


def _sentinel_kwargs(kwargs: dict[str, Any], retry_class: type) -> dict[str, Any]:
    """What the Sentinels themselves are asked with: the timeouts, and no retries. The
    URL's password is the data nodes'; Sentinels are usually run without one.

    Why no retries: redis-py asks every Sentinel in turn, and its default client retried
    each one three times with a backoff of up to ten seconds. With every Sentinel down,
    finding the primary took 8 s for two of them and longer for three: a connection to
    the primary lost meanwhile (the consumer's, a publish's, a long-poll's) waited that
    long for the answer "no primary known", so a long-poll hung past its own timeout
    and a publish timed out as if its event might have been appended. Asked once each,
    the answer comes within one connect timeout per Sentinel.
    """
    out = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    out["retry"] = retry_class(NoBackoff(), 0)
    return out


class _AsyncBlockingSentinelPool(aiosentinel.SentinelConnectionPool,
                                 aioredis.BlockingConnectionPool):
    """A Sentinel-managed pool that waits for a free connection instead of raising."""


class _SyncBlockingSentinelPool(redis.sentinel.SentinelConnectionPool,
                                redis.BlockingConnectionPool):
    """The blocking flavour of the above, for the thread-safe publisher."""


AsyncClient = aioredis.Redis | aiocluster.RedisCluster
SyncClient = redis.Redis | redis.cluster.RedisCluster


@dataclass(frozen=True)
class _Flavour:
    """redis-py's classes for one I/O model: the async and the blocking clients are
    built the same way from different classes."""

    client: Any
    pool: Any
    blocking_pool: Any
    cluster: Any
    node: Any
    sentinel: Any
    sentinel_pool: Any
    blocking_sentinel_pool: Any
    retry: type


_ASYNC = _Flavour(aioredis.Redis, aioredis.ConnectionPool, aioredis.BlockingConnectionPool,
                  aiocluster.RedisCluster, aiocluster.ClusterNode, aiosentinel.Sentinel,
                  aiosentinel.SentinelConnectionPool, _AsyncBlockingSentinelPool,
                  aioretry.Retry)
_SYNC = _Flavour(redis.Redis, redis.ConnectionPool, redis.BlockingConnectionPool,
                 redis.cluster.RedisCluster, redis.cluster.ClusterNode, redis.sentinel.Sentinel,
                 redis.sentinel.SentinelConnectionPool, _SyncBlockingSentinelPool,
                 redis.retry.Retry)


def _build(flavour: _Flavour, target: RedisTarget, tls: TlsFiles | None, pooling: Pooling,
           options: dict[str, Any]) -> Any:
    kwargs = _common(target, tls, options)
    if target.topology is Topology.CLUSTER:
        nodes = [flavour.node(host, port) for host, port in target.nodes]
        return flavour.cluster(startup_nodes=nodes, max_connections=pooling.max_connections,
                               **kwargs)
    kwargs.update(_NO_MAINT_NOTIFICATIONS)
    if target.topology is Topology.SENTINEL:
        sentinel = flavour.sentinel(list(target.nodes),
                                   sentinel_kwargs=_sentinel_kwargs(kwargs, flavour.retry))
        pool_class = flavour.sentinel_pool
        pool_kwargs: dict[str, Any] = {"max_connections": 1 if pooling.single else
                                       pooling.max_connections}
        if pooling.wait is not None or pooling.single:
            pool_class = flavour.blocking_sentinel_pool
            pool_kwargs["timeout"] = pooling.wait
        return sentinel.master_for(target.service, connection_pool_class=pool_class,
                                   db=target.db, **pool_kwargs, **kwargs)
    if pooling.single:
        return flavour.client.from_url(target.url, single_connection_client=True, **kwargs)
    if pooling.wait is not None:
        pool = flavour.blocking_pool.from_url(
            target.url, max_connections=pooling.max_connections, timeout=pooling.wait, **kwargs)
    else:
        pool = flavour.pool.from_url(target.url, max_connections=pooling.max_connections,
                                     **kwargs)
    return flavour.client.from_pool(pool)


def async_client(target: RedisTarget, tls: TlsFiles | None = None,
                 pooling: Pooling = Pooling(), **options: Any) -> AsyncClient:
    """An asyncio client for `target`; `options` are redis-py connection options
    (timeouts, `decode_responses`, `retry`, `health_check_interval`...).

    The client owns its connections: closing it (`aclose`) closes them all.
    """
    client: AsyncClient = _build(_ASYNC, target, tls, pooling, options)
    return client


def sync_client(target: RedisTarget, tls: TlsFiles | None = None,
                pooling: Pooling = Pooling(), **options: Any) -> SyncClient:
    """The blocking twin of :func:`async_client`."""
    client: SyncClient = _build(_SYNC, target, tls, pooling, options)
    return client


__all__ = [
    "SCHEMES", "URL_OPTIONS", "AsyncClient", "BadRedisUrl", "Pooling", "RedisTarget", "SyncClient",
    "TlsFiles", "Topology", "async_client", "parse_redis_url", "redact", "sync_client",
]
