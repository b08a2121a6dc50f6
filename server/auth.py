"""Who a caller is and which rooms it may join: JWTs (PyJWT) and the application's hook.

A room rule in one place: admin, or listed in `rooms`, or `user-<sub>`.
Tokens are read from `Authorization: Bearer`, `?token=`, or the
`dualcast_token` cookie, in that order; nothing here ever logs a token.

Tokens may be signed with the shared secret (HS*), or by another issuer with
a key pair: a fixed public key, or the keys its JWKS URL publishes (see
`keys.py` for the rule that keeps each key to its own algorithms). A request
without a token may instead be vouched for by the application (`authhook.py`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import jwt
from starlette.requests import HTTPConnection

from dualcast.authhook import AuthHook, Follower, HookRefused, HookUnavailable, Lease
from dualcast.jwks import KeySet
from dualcast.keys import ALGORITHMS, Family, PrivateKey, PublicKey, key_fits, load_public_key
from dualcast.query import query_of

if TYPE_CHECKING:
    from dualcast.config import Settings

COOKIE_NAME = "dualcast_token"
#: Browsers drop a Set-Cookie whose name and value together exceed 4096 bytes, without a
#: word (RFC 6265 asks for at least that much; Chrome and Firefox keep no more): a token
#: longer than this makes no login cookie.
LONGEST_COOKIE_TOKEN = 4096 - len(COOKIE_NAME)
ALGORITHM = "HS256"

log = logging.getLogger("dualcast.auth")


class AuthError(Exception):
    """A token was presented and refused; `code` is machine-readable, `message` for people."""

    def __init__(self, code: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class _NoKeyChecks(AuthError):
    """No key held checks the token: none fits it, or each that fits refuses its signature.
    For a token without `kid` from a JWKS issuer that is what a rotation looks like."""


@dataclass(frozen=True)
class Identity:
    sub: str | None = None
    rooms: frozenset[str] = frozenset()
    admin: bool = False
    publish: bool = False
    exp: float | None = None
    anonymous: bool = True
    #: For an identity the application vouched for: its expiry moves when it is renewed.
    lease: Lease | None = field(default=None, compare=False, repr=False)

    def may_join(self, room: str) -> bool:
        if self.anonymous:
            return False
        return (
            self.admin or room in self.rooms
            or (self.sub is not None and room == f"user-{self.sub}")
        )

    def default_rooms(self) -> set[str]:
        """Rooms joined when a subscriber names none: its listed rooms, `user-<sub>`, `admin`."""
        if self.anonymous:
            return set()
        rooms = set(self.rooms)
        if self.sub is not None:
            rooms.add(f"user-{self.sub}")
        if self.admin:
            rooms.add("admin")
        return rooms

    def seconds_left(self) -> float | None:
        exp = self.exp if self.lease is None else self.lease.exp
        return None if exp is None else exp - time.time()

    def expired(self) -> bool:
        left = self.seconds_left()
        return left is not None and left <= 0

    def describe(self) -> dict[str, Any]:
        return {
            "sub": self.sub,
            "admin": self.admin,
            "publish": self.publish,
            "rooms": sorted(self.default_rooms()),
            "anonymous": self.anonymous,
            "exp": self.exp if self.lease is None else self.lease.exp,
        }


ANONYMOUS = Identity()


def mint_token(
    secret: str | None, sub: str, rooms: list[str] | None = None, admin: bool = False,
    publish: bool = False, ttl: float = 3600.0, *, algorithm: str = ALGORITHM,
    key: PrivateKey | None = None, kid: str | None = None, issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """A token: HS* with `secret`, or RS*/PS*/ES*/EdDSA with a private `key` (and `kid`)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": str(sub), "rooms": list(rooms or []), "admin": admin, "publish": publish,
        "iat": now, "exp": int(now + ttl),
    }
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    family = ALGORITHMS.get(algorithm)
    if family is None:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    headers = {"kid": kid} if kid else None
    if family is Family.HMAC:
        if not secret:
            raise ValueError(f"{algorithm} needs the shared secret")
        return jwt.encode(claims, secret, algorithm=algorithm, headers=headers)
    if key is None or not key_fits(key, algorithm):
        raise ValueError(f"{algorithm} needs a private key of its own kind")
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def hmac_algorithm(settings: Settings) -> str | None:
    """The algorithm tokens signed with the shared secret must use on this server: the first
    HS* of DUALCAST_JWT_ALGORITHMS (an HS256 token is refused where only HS512 is listed).
    None when it lists only public-key algorithms: then only the issuer's private key
    makes a token it accepts, and the secret makes none."""
    return next((a for a in settings.jwt_algorithms if ALGORITHMS[a] is Family.HMAC), None)


def mint_for(settings: Settings, secret: str, sub: str, **claims: Any) -> str:
    """A token this server accepts, signed with the secret: its HS* algorithm, the issuer
    and audience it checks (the admin link `serve` prints, the CLI's own publish token).
    ValueError when it accepts no HS* token (see `hmac_algorithm`)."""
    algorithm = hmac_algorithm(settings)
    if algorithm is None:
        raise ValueError("this server accepts no token signed with the shared secret")
    audience = settings.jwt_audience[0] if settings.jwt_audience else None
    return mint_token(secret, sub, issuer=settings.jwt_issuer, audience=audience,
                      algorithm=algorithm, **claims)


def _refusal_for(exc: jwt.InvalidTokenError, audience: Sequence[str]) -> AuthError:
    """A clear, token-free message for each way PyJWT refuses a token."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return AuthError("token_expired", "the token has expired; log in again")
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return AuthError("invalid_token", f"the token lacks the {exc.claim!r} claim")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return AuthError("invalid_token", "the token is not valid yet")
    if isinstance(exc, jwt.InvalidIssuerError):
        return AuthError("invalid_token", "the token comes from another issuer ('iss')")
    if isinstance(exc, jwt.InvalidAudienceError):
        if not audience:
            return AuthError("invalid_token", "the token names an audience ('aud') and this "
                             "server accepts none (set DUALCAST_JWT_AUDIENCE)")
        return AuthError("invalid_token", "the token is for another audience ('aud')")
    if isinstance(exc, jwt.DecodeError):
        return AuthError("invalid_token", "the token is malformed (not a signed JWT)")
    # Wrong claim types (sub, iat, nbf, exp...): say which class of problem without
    # echoing anything from the token itself.
    return AuthError("invalid_token", f"the token is not valid ({type(exc).__name__})")


def _claim_bool(claims: dict[str, Any], name: str) -> bool:
    value = claims.get(name, False)
    if not isinstance(value, bool):
        raise AuthError("invalid_token", f"the token's {name!r} claim must be true or false")
    return value


def _identity_of(claims: Any) -> Identity:
    """The identity in verified claims.

    A claim of the wrong type refuses the whole token rather than being read as
    "false" or "no rooms": a token we cannot read exactly is not a token we trust.
    """
    if not isinstance(claims, dict):
        raise AuthError("invalid_token", "the token's claims must be a JSON object")
    rooms = claims.get("rooms", [])
    if rooms is None:
        rooms = []
    if not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms):
        raise AuthError("invalid_token", "the token's 'rooms' claim must be a list of strings")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AuthError("invalid_token", "the token's 'sub' claim must be a non-empty string")
    exp = claims["exp"]
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise AuthError("invalid_token", "the token's 'exp' claim must be a number")
    try:
        expires = float(exp)
    except OverflowError:  # an integer past any float (PyJWT compares it as an int): a 500
        raise AuthError("invalid_token", "the token's 'exp' claim is out of range") from None
    return Identity(
        sub=sub,
        rooms=frozenset(rooms),
        admin=_claim_bool(claims, "admin"),
        publish=_claim_bool(claims, "publish"),
        exp=expires,
        anonymous=False,
    )


_BEARER = re.compile(r"^\s*Bearer\s+(\S+)\s*$", re.IGNORECASE)
_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


def token_from(conn: HTTPConnection) -> str | None:
    """The presented token: `Authorization: Bearer`, else `?token=`, else the cookie.

    Another Authorization scheme (a proxy's Basic auth, which browsers resend on
    every request) is not ours: it is ignored, not refused.
    """
    header = conn.headers.get("authorization")
    if header and header.strip().lower().startswith("bearer"):
        match = _BEARER.match(header)
        if match is None:
            raise AuthError("invalid_token", "Authorization header must be 'Bearer <token>'")
        return match.group(1)
    return _query_or_cookie_token(conn)


def _query_or_cookie_token(conn: HTTPConnection) -> str | None:
    token = query_of(conn).get("token")
    if token:
        return token
    return conn.cookies.get(COOKIE_NAME) or None


class Authenticator:
    """Turns what a request presents into an `Identity`; one per app, on its runtime.

    Async because a caller's identity may have to be fetched (an issuer's key set,
    the application's session check); a token signed with a key already held
    never awaits anything.
    """

    #: Tokens verified before: a long-poller presents the same token on every request,
    #: and PyJWT's checks cost ~65 us each (issue 8). Only tokens that verified are
    #: kept; the expiry is checked again on every hit.
    CACHE_MAX = 4096
    MAX_TOKEN = 8192
    #: Seconds of clock difference tolerated with whoever signs (`iat`/`nbf`, never `exp`).
    ISSUER_LEEWAY = 5.0

    def __init__(
        self, secret: str | None, allow_anonymous: bool = True, *,
        algorithms: Sequence[str] = (ALGORITHM,), public_key: PublicKey | None = None,
        jwks_url: str | None = None, issuer: str | None = None,
        audience: Sequence[str] = (), auth_url: str | None = None, timeout: float = 3.0,
        jwks_min_interval: float = 60.0, jwks_refresh: float = 600.0,
    ) -> None:
        self.secret = secret
        self.allow_anonymous = allow_anonymous
        self.algorithms = tuple(algorithms)
        self.public_key = public_key
        self.issuer = issuer
        self.audience = list(audience)
        self._verified: dict[str, Identity] = {}
        self._keys_version = 0
        self.client: httpx.AsyncClient | None = None
        if jwks_url or auth_url:
            # Our own client: no proxy from the environment, no redirects followed.
            self.client = httpx.AsyncClient(
                timeout=timeout, follow_redirects=False, trust_env=False
            )
        self.jwks = KeySet(jwks_url, self.client, jwks_min_interval, jwks_refresh) if (
            jwks_url and self.client is not None) else None
        self.hook = AuthHook(auth_url, self.client) if (
            auth_url and self.client is not None) else None

    @classmethod
    def from_settings(cls, settings: Settings, secret: str | None) -> Authenticator:
        return cls(
            secret, settings.allow_anonymous, algorithms=settings.jwt_algorithms,
            public_key=load_public_key(settings.public_key) if settings.public_key else None,
            jwks_url=settings.jwks_url, issuer=settings.jwt_issuer,
            audience=settings.jwt_audience, auth_url=settings.auth_url,
            timeout=settings.auth_timeout, jwks_min_interval=settings.jwks_min_interval,
            jwks_refresh=settings.jwks_refresh,
        )

    # background: the key set's fetches and the hook's renewals ---------------------

    async def run(self) -> None:
        """The key set's first fetch and its refreshes, and the renewal of identities the
        application vouched for; owned by the runtime's lifespan."""
        # A task group: if one job dies, the other is cancelled too, and the supervisor
        # restarts both (never a second copy of a loop that kept running).
        async with asyncio.TaskGroup() as group:
            for job in (self.jwks, self.hook):
                if job is not None:
                    group.create_task(job.run())

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    # tokens --------------------------------------------------------------------------

    async def decode(self, token: str) -> Identity:
        """A presented token's identity, or AuthError; fetches the issuer's key set again
        when the token names a key not yet known (rate-limited, see `KeySet`)."""
        known = self._remembered(token)
        if known is not None:
            return known
        algorithm, kid = self._header(token)
        if self.jwks is None or ALGORITHMS[algorithm] is Family.HMAC:
            return self._verify(token, algorithm, kid)
        if kid is not None or not self._static_fits(algorithm):
            await self.jwks.key_for(kid, algorithm)
        try:
            return self._verify(token, algorithm, kid)
        except _NoKeyChecks:
            # A token without kid names no key to fetch, so `key_for` could not tell that
            # the issuer rotated its only key: every such token would be refused until the
            # routine refresh (10 min). The same budget as unknown kids bounds the fetches.
            held = self.jwks.version
            if kid is not None or not await self.jwks.ask() or self.jwks.version == held:
                raise
        return self._verify(token, algorithm, kid)

    def decode_now(self, token: str) -> Identity:
        """As `decode`, with only the keys already held (never awaits a fetch)."""
        known = self._remembered(token)
        if known is not None:
            return known
        algorithm, kid = self._header(token)
        return self._verify(token, algorithm, kid)

    def _remembered(self, token: str) -> Identity | None:
        if self.jwks is not None and self.jwks.version != self._keys_version:
            # The key set changed: a token checked with a key now gone must not pass.
            self._verified.clear()
            self._keys_version = self.jwks.version
        known = self._verified.get(token)
        if known is not None and known.expired():
            raise AuthError("token_expired", "the token has expired; log in again")
        return known

    def _header(self, token: str) -> tuple[str, str | None]:
        """The token's algorithm (one this server accepts) and key id, before any check."""
        if len(token) > self.MAX_TOKEN:
            raise AuthError("invalid_token", "the token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("invalid_token", "the token is malformed (not a signed JWT)") from None
        algorithm = header.get("alg")
        if algorithm not in self.algorithms:
            raise AuthError(
                "invalid_token",
                f"the token must be signed with {' or '.join(self.algorithms)}",
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("invalid_token", "the token's 'kid' header must be a string")
        return str(algorithm), kid

    def _static_fits(self, algorithm: str) -> bool:
        return self.public_key is not None and key_fits(self.public_key, algorithm)

    def _keys(self, algorithm: str, kid: str | None) -> list[str | PublicKey]:
        """The keys that may check this token: the secret for HS*, else keys of the
        algorithm's own family (the key set's for `kid`, or its only fitting one for no
        kid, then the fixed key: a token without kid may come from either)."""
        if ALGORITHMS[algorithm] is Family.HMAC:
            if self.secret is None:
                raise AuthError("no_secret", "this server has no token secret configured")
            return [self.secret]
        keys: list[str | PublicKey] = []
        if self.jwks is not None:
            jwk = self.jwks.find(kid, algorithm)
            if jwk is not None:
                keys.append(jwk.key)
        if self.public_key is not None and key_fits(self.public_key, algorithm):
            keys.append(self.public_key)
        if not keys:
            named = f" (kid {kid[:64]!r})" if kid is not None else ""
            several = 0 if kid is not None or self.jwks is None else sum(
                1 for k in self.jwks.keys if k.fits(algorithm))
            if several > 1:  # (said "no key checks ES256 tokens" beside two that do)
                raise _NoKeyChecks(
                    "invalid_token", f"the token names no key ('kid' header) and {several} "
                    f"keys of this server check {algorithm} tokens: sign it with its key's "
                    "'kid' (dualcast token --kid)")
            raise _NoKeyChecks(
                "invalid_token", f"no key of this server checks {algorithm} tokens{named}"
            )
        return keys

    def _verify(self, token: str, algorithm: str, kid: str | None) -> Identity:
        required = ["sub", "exp"]
        if self.issuer:
            required.append("iss")
        if self.audience:
            required.append("aud")
        # The clock of whoever signed may run a little ahead of ours: a token it just
        # made would be "not valid yet" (iat/nbf) for a moment without a small leeway.
        # HS* tokens too: the application's backend mints them on its own machine, and
        # a page connects with one the moment it gets it (PyJWT compares `iat` with our
        # clock to the fraction of a second: 100 ms ahead refused one token in ten).
        claims: Any = None
        for key in self._keys(algorithm, kid):
            try:
                claims = jwt.decode(
                    token, key, algorithms=[algorithm], issuer=self.issuer,
                    leeway=self.ISSUER_LEEWAY,
                    audience=self.audience or None, options={"require": required},
                )
                break
            except jwt.InvalidSignatureError:
                continue  # (another key may have signed it)
            except jwt.InvalidTokenError as exc:
                raise _refusal_for(exc, self.audience) from None
        else:
            raise _NoKeyChecks(
                "invalid_token", "the token's signature does not match this server"
            )
        identity = _identity_of(claims)
        if identity.expired():  # (the leeway is for iat/nbf, not for exp)
            raise AuthError("token_expired", "the token has expired; log in again")
        if len(self._verified) >= self.CACHE_MAX:
            del self._verified[next(iter(self._verified))]  # the oldest entry
        self._verified[token] = identity
        return identity

    # live subscriptions ----------------------------------------------------------------

    def follow(self, identity: Identity, feed: Follower) -> None:
        """Keep a live subscription's end in step with its identity: for an identity the
        application vouched for, `feed.extend(exp)` is called each time the hook renews
        it; when it is refused, the subscription ends at the old `exp`, as on a token's
        expiry. A token's identity never changes by itself: nothing to do."""
        if identity.lease is not None:
            identity.lease.follow(feed)

    # requests ------------------------------------------------------------------------

    def _token_of(self, conn: HTTPConnection) -> str | None:
        """The dualcast token a request presents. With a hook, a Bearer credential that is
        not a JWT is the application's own (an opaque session token): it goes to the hook."""
        if self.hook is not None:
            match = _BEARER.match(conn.headers.get("authorization", ""))
            if match is not None and not _JWT_SHAPE.match(match.group(1)):
                return _query_or_cookie_token(conn)
            if match is None and conn.headers.get("authorization"):
                return _query_or_cookie_token(conn)
        return token_from(conn)

    async def identify(self, conn: HTTPConnection) -> Identity:
        """The caller's identity: its token's, else the application's word when a hook is
        set and the request carries a cookie or credential, else anonymous if allowed."""
        token = self._token_of(conn)
        if token is not None:
            return await self.decode(token)
        if self.hook is not None:
            headers = {
                name: value for name in ("cookie", "authorization")
                if (value := conn.headers.get(name))
            }
            if headers:
                return await self._vouched(headers)
        if not self.allow_anonymous:
            raise AuthError("unauthenticated", "a token is required on this server")
        return ANONYMOUS

    async def _vouched(self, headers: dict[str, str]) -> Identity:
        assert self.hook is not None
        try:
            lease = await self.hook.lease_for(headers)
        except HookRefused as exc:
            raise AuthError(
                "session_refused",
                f"the application did not accept this session ({exc}); log in to it again",
                status=exc.status,
            ) from None
        except HookUnavailable as exc:
            raise AuthError(
                "auth_unavailable",
                f"the application's session check is unavailable ({exc}); try again shortly",
                status=503,
            ) from None
        answer = lease.answer
        return Identity(
            sub=answer.sub, rooms=answer.rooms, admin=answer.admin, publish=answer.publish,
            exp=lease.exp, anonymous=False, lease=lease,
        )
