"""Who a caller is and which rooms it may join: JWT HS256 tokens (PyJWT).

A room rule in one place: admin, or listed in `rooms`, or `user-<sub>`.
Tokens are read from `Authorization: Bearer`, `?token=`, or the
`dualcast_token` cookie, in that order; nothing here ever logs a token.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from starlette.requests import HTTPConnection

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
        return self.admin or room in self.rooms or (self.sub is not None and room == f"user-{self.sub}")

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


def decode_token(token: str, secret: str | None) -> Identity:
    """Verify a token (signature, HS256 only, expiry) or raise AuthError."""
    if secret is None:
        raise AuthError("no_secret", "this server has no token secret configured")
    if len(token) > 8192:
        raise AuthError("invalid_token", "token too long")
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]}
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token_expired", "the token has expired; log in again") from None
    except jwt.InvalidTokenError as exc:
        reason = type(exc).__name__
        raise AuthError("invalid_token", f"the token is not valid ({reason})") from None
    rooms = claims.get("rooms") or []
    if not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms):
        raise AuthError("invalid_token", "the token's 'rooms' claim must be a list of strings")
    sub = claims.get("sub")
    if not isinstance(sub, str | int) or isinstance(sub, bool) or not str(sub):
        raise AuthError("invalid_token", "the token's 'sub' claim must be a string")
    return Identity(
        sub=str(sub),
        rooms=frozenset(rooms),
        admin=claims.get("admin") is True,
        publish=claims.get("publish") is True,
        exp=float(claims["exp"]),
        anonymous=False,
    )


_BEARER = re.compile(r"^\s*Bearer\s+(\S+)\s*$", re.IGNORECASE)


def token_from(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization")
    if header:
        match = _BEARER.match(header)
        if match is None:
            raise AuthError("invalid_token", "Authorization header must be 'Bearer <token>'")
        return match.group(1)
    token = conn.query_params.get("token")
    if token:
        return token
    return conn.cookies.get(COOKIE_NAME) or None


def identify(conn: HTTPConnection, secret: str | None, allow_anonymous: bool) -> Identity:
    """The caller's identity; anonymous only when no token was sent at all and it is allowed."""
    token = token_from(conn)
    if token is None:
        if not allow_anonymous:
            raise AuthError("unauthenticated", "a token is required on this server")
        return ANONYMOUS
    return decode_token(token, secret)
