"""Who a caller is and which rooms it may join: JWT HS256 tokens (PyJWT).

A room rule in one place: admin, or listed in `rooms`, or `user-<sub>`.
Tokens are read from `Authorization: Bearer`, `?token=`, or the
`dualcast_token` cookie, in that order; nothing here ever logs a token.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from starlette.requests import HTTPConnection

from dualcast.query import query_of

COOKIE_NAME = "dualcast_token"
ALGORITHM = "HS256"


class AuthError(Exception):
    """A token was presented and refused; `code` is machine-readable, `message` for people."""

    def __init__(self, code: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Identity:
    sub: str | None = None
    rooms: frozenset[str] = frozenset()
    admin: bool = False
    publish: bool = False
    exp: float | None = None
    anonymous: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

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
        return None if self.exp is None else self.exp - time.time()

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
            "exp": self.exp,
        }


ANONYMOUS = Identity()


def mint_token(
    secret: str, sub: str, rooms: list[str] | None = None, admin: bool = False,
    publish: bool = False, ttl: float = 3600.0,
) -> str:
    claims: dict[str, Any] = {
        "sub": str(sub), "rooms": list(rooms or []), "admin": admin, "publish": publish,
        "iat": int(time.time()), "exp": int(time.time() + ttl),
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def _refusal_for(exc: jwt.InvalidTokenError) -> AuthError:
    """A clear, token-free message for each way PyJWT refuses a token."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return AuthError("token_expired", "the token has expired; log in again")
    if isinstance(exc, jwt.InvalidSignatureError):
        return AuthError("invalid_token", "the token's signature does not match this server")
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return AuthError("invalid_token", f"the token must be signed with {ALGORITHM}")
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return AuthError("invalid_token", f"the token lacks the {exc.claim!r} claim")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return AuthError("invalid_token", "the token is not valid yet")
    if isinstance(exc, jwt.DecodeError):
        return AuthError("invalid_token", "the token is malformed (not a signed JWT)")
    # Wrong claim types (sub, iat, nbf, exp...), unexpected aud/iss: say which class of
    # problem without echoing anything from the token itself.
    return AuthError("invalid_token", f"the token is not valid ({type(exc).__name__})")


def _claim_bool(claims: dict[str, Any], name: str) -> bool:
    value = claims.get(name, False)
    if not isinstance(value, bool):
        raise AuthError("invalid_token", f"the token's {name!r} claim must be true or false")
    return value


def _verify(token: str, secret: str) -> Identity:
    """The full check, uncached.

    A claim of the wrong type refuses the whole token rather than being read as
    "false" or "no rooms": a token we cannot read exactly is not a token we trust.
    """
    if len(token) > 8192:
        raise AuthError("invalid_token", "the token is too long")
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]}
        )
    except jwt.InvalidTokenError as exc:
        raise _refusal_for(exc) from None
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
    return Identity(
        sub=sub,
        rooms=frozenset(rooms),
        admin=_claim_bool(claims, "admin"),
        publish=_claim_bool(claims, "publish"),
        exp=float(exp),
        anonymous=False,
    )


_BEARER = re.compile(r"^\s*Bearer\s+(\S+)\s*$", re.IGNORECASE)


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
    token = query_of(conn).get("token")
    if token:
        return token
    return conn.cookies.get(COOKIE_NAME) or None


def decode_token(token: str, secret: str | None) -> Identity:
    """Verify a token (signature, HS256 only, expiry, claim types) or raise AuthError.

    Uncached: servers verify through their `Authenticator`, which remembers.
    """
    if secret is None:
        raise AuthError("no_secret", "this server has no token secret configured")
    return _verify(token, secret)


class Authenticator:
    """Turns what a request presents into an `Identity`; one per app, on its runtime.

    Async because a caller's identity may have to be fetched (a key set, an
    application's session check); the HS256 path never awaits anything.
    """

    #: Tokens verified before: a long-poller presents the same token on every request,
    #: and PyJWT's checks cost ~65 us each (issue 8). Only tokens that verified are
    #: kept; the expiry is checked again on every hit.
    CACHE_MAX = 4096

    def __init__(self, secret: str | None, allow_anonymous: bool = True) -> None:
        self.secret = secret
        self.allow_anonymous = allow_anonymous
        self._verified: dict[str, Identity] = {}

    async def decode(self, token: str) -> Identity:
        """A presented token's identity, or AuthError."""
        return self.decode_now(token)

    def decode_now(self, token: str) -> Identity:
        known = self._verified.get(token)
        if known is not None:
            if known.expired():
                raise AuthError("token_expired", "the token has expired; log in again")
            return known
        identity = decode_token(token, self.secret)
        if len(self._verified) >= self.CACHE_MAX:
            del self._verified[next(iter(self._verified))]  # the oldest entry
        self._verified[token] = identity
        return identity

    async def identify(self, conn: HTTPConnection) -> Identity:
        """The caller's identity; anonymous only when no token was sent and that is allowed."""
        token = token_from(conn)
        if token is None:
            if not self.allow_anonymous:
                raise AuthError("unauthenticated", "a token is required on this server")
            return ANONYMOUS
        return await self.decode(token)


# Logs never print a token ------------------------------------------------------

_SECRET_QUERY = re.compile(r"((?:^|[?&;\s])(?:token|access_token)=)[^&\s\"']*", re.IGNORECASE)
_JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")


def redact(text: str) -> str:
    """`text` with query tokens and anything shaped like a JWT replaced by `***`."""
    return _JWT_LIKE.sub("***", _SECRET_QUERY.sub(r"\1***", text))


class RedactTokens(logging.Filter):
    """Rewrites a record's message so no token reaches a log (uvicorn logs WS paths with
    their query string, `?token=` included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is logging's problem, not ours
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        return True


_REDACTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "dualcast", "")


def install_log_redaction() -> None:
    """Attach the filter to uvicorn's and our loggers and to every root handler.

    Call it after uvicorn has configured logging (its dictConfig replaces handlers,
    not logger filters). Idempotent.
    """
    for name in _REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
        for handler in logger.handlers:
            if not any(isinstance(f, RedactTokens) for f in handler.filters):
                handler.addFilter(RedactTokens())
