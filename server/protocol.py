"""The protocol's vocabulary: transport names, frame types, error codes, close codes.

Every string a client can see or send is named here once, so a typo is a
NameError, not a silently different protocol; the dashboard's client keeps the
same list of error codes, and a test compares the two.
"""

from __future__ import annotations

import enum


class Transport(enum.StrEnum):
    WEBSOCKET = "websocket"
    SSE = "sse"
    POLLING = "polling"


class FrameType(enum.StrEnum):
    # server -> client
    WELCOME = "welcome"
    EVENT = "event"
    BATCH = "batch"
    JOINED = "joined"
    LEFT = "left"
    PONG = "pong"
    RESET = "reset"
    ERROR = "error"
    # client -> server (WebSocket)
    JOIN = "join"
    LEAVE = "leave"
    PING = "ping"
    AUTH = "auth"


class ErrorCode(enum.StrEnum):
    """Every `error` code the server sends, in a frame or an HTTP JSON body."""

    # who the caller is
    UNAUTHENTICATED = "unauthenticated"      # a token is required and none was sent
    INVALID_TOKEN = "invalid_token"
    TOKEN_EXPIRED = "token_expired"
    NO_SECRET = "no_secret"                  # the server cannot check tokens at all
    AUTH_UNAVAILABLE = "auth_unavailable"    # the identity source did not answer
    SESSION_REFUSED = "session_refused"      # the application's auth hook said no
    FORBIDDEN = "forbidden"                  # known, but may not do this
    BAD_ORIGIN = "bad_origin"
    CROSS_SITE = "cross_site"                # a cookie-authenticated write from another site
    # what the caller asked for
    BAD_ROOM = "bad_room"
    FORBIDDEN_ROOM = "forbidden_room"
    TOO_MANY_ROOMS = "too_many_rooms"
    BAD_CURSOR = "bad_cursor"
    BAD_TIMEOUT = "bad_timeout"
    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    INVALID = "invalid"                      # a publish body that fails validation
    UNENCODABLE = "unencodable"              # valid JSON no transport could send on
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    TOO_LARGE = "too_large"
    BODY_TIMEOUT = "body_timeout"            # a publish body that did not arrive in time
    NOT_FOUND = "not_found"                  # no such path or file
    METHOD_NOT_ALLOWED = "method_not_allowed"
    TRANSPORT_DISABLED = "transport_disabled"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    # the server's side
    LAGGING = "lagging"                      # too slow: cut off, resume from the cursor
    DRAINING = "draining"                    # restarting: reconnect (elsewhere)
    LOG_UNAVAILABLE = "log_unavailable"
    NO_DASHBOARD = "no_dashboard"


#: Codes that mean "who you are is no longer good": a client stops retrying and asks
#: for new credentials instead.
AUTH_CODES = frozenset({
    ErrorCode.UNAUTHENTICATED, ErrorCode.INVALID_TOKEN, ErrorCode.TOKEN_EXPIRED,
    ErrorCode.NO_SECRET,
})


class WSClose(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001       # draining: reconnect, another instance will answer
    POLICY = 1008           # refused: bad token, too many bad frames, token expired
    TOO_BIG = 1009
    TRY_AGAIN = 1013        # lagging: reconnect with the last id
