"""What reaches the server's log: no token or password in clear, no false alarms.

The filters are part of the logging configuration `dualcast.serve` hands to
uvicorn (`logging_config`), which applies it in every process; nothing is
installed at import.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import logging
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import uvicorn.config

if TYPE_CHECKING:
    import httpx

# Tokens ------------------------------------------------------------------------

_SECRET_QUERY = re.compile(r"((?:^|[?&;\s])(?:token|access_token)=)[^&\s\"']*", re.IGNORECASE)
_JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")


def redact(text: str) -> str:
    """`text` with query tokens and anything shaped like a JWT replaced by `***`."""
    return _JWT_LIKE.sub("***", _SECRET_QUERY.sub(r"\1***", text))


_QUERY_PASSWORD = re.compile(r"((?:^|&)password=)[^&]*", re.IGNORECASE)


def redirected_to(response: httpx.Response) -> str:
    """Where a redirect not followed points, fit for a log line (relative made absolute)."""
    target = response.next_request
    return redact_url(str(target.url)) if target is not None else "an unreadable Location"


def redact_url(url: str) -> str:
    """A URL fit for a log line or an error: the password (in the userinfo or as
    `?password=`, which redis-py also reads) and any token masked.

    A Redis URL names where the log is, which is what a person needs to fix it; its
    password is not.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hosts}" if ":" in userinfo else f"***@{hosts}" if user else hosts
    query = _QUERY_PASSWORD.sub(r"\1***", parts.query)
    shown = f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
    return redact(shown + (f"#{parts.fragment}" if parts.fragment else ""))


class RedactTokens(logging.Filter):
    """Rewrites a record's message so no token reaches a log (uvicorn logs WebSocket
    paths with their query string, `?token=` included)."""

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


# Failures that come once per request ---------------------------------------------

class Repeats:
    """A failure that can happen once per client or request (a hook call, a publish):
    said the first time, then at most once per `every` seconds. `due()` is None while
    quiet, else how many happened since the last line (this one included)."""

    def __init__(self, every: float = 30.0) -> None:
        self.every = every
        self._said_at: float | None = None
        self._since = 0

    def due(self) -> int | None:
        self._since += 1
        now = time.monotonic()
        if self._said_at is not None and now - self._said_at < self.every:
            return None
        count, self._since, self._said_at = self._since, 0, now
        return count


# Streams the stall watch gave up on ----------------------------------------------

#: Set inside the request task whose SSE stream the stall watch cut off. A context
#: variable, not a registry: uvicorn logs its complaint from that same task, right
#: after the app returns, so the mark is seen there and nowhere else.
_ENDED_BY_STALL: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "dualcast_ended_by_stall", default=False
)


def mark_unfinished_by_stall() -> None:
    """Say that this request's response ends unfinished on purpose (see UnfinishedByStall)."""
    _ENDED_BY_STALL.set(True)


class UnfinishedByStall(logging.Filter):
    """uvicorn logs an error when an HTTP response ends unfinished. An SSE stream the
    stall watch gave up on ends so by design (its last write can never reach a client
    that stopped reading; the watch has logged the drop), so that record is dropped
    for the requests marked by `mark_unfinished_by_stall`, and only for them."""

    MESSAGE = "ASGI callable returned without completing response."

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == self.MESSAGE and _ENDED_BY_STALL.get())


class RejectedTwice(logging.Filter):
    """A refused WebSocket upgrade (403 origin, 429 quota, 503 draining...) was logged
    twice: uvicorn's line with the address, path and status, then websockets' own
    "connection rejected (429 Too Many Requests)", which says nothing more and doubled
    the lines a client retrying in a loop, or a crowd meeting a draining worker, wrote.
    The second is dropped."""

    MESSAGE = "connection rejected (%d %s)"

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != self.MESSAGE


class CutAtShutdown(logging.Filter):
    """A connection still open when uvicorn's graceful shutdown times out (a client that
    reads nothing cannot be sent its end) is cancelled, and uvicorn logged each one as
    "Exception in ASGI application" with a whole CancelledError traceback: a hundred
    stuck clients, a hundred tracebacks, for a cut-off its own line already reports
    ("Cancel N running task(s), timeout graceful shutdown exceeded"). Those are dropped;
    any other exception in the app is still logged with its traceback."""

    MESSAGE = "Exception in ASGI application\n"
    WHY = "timeout graceful shutdown exceeded"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.MESSAGE:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, asyncio.CancelledError) and self.WHY in str(exc))


class BadUtf8FromClient(logging.Filter):
    """A WebSocket client that sends a text frame which is not UTF-8 is closed with 1007
    by uvicorn, which also logged "Invalid UTF-8 sequence received from client." at ERROR
    with a whole UnicodeDecodeError traceback: one per such client, for bad input that
    is the client's alone and was refused as it should be. The line stays, at INFO and
    without the traceback (dropped when INFO is not shown)."""

    MESSAGE = "Invalid UTF-8 sequence received from client."

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.MESSAGE:
            return True
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


# Configuring them -----------------------------------------------------------------

def logging_config(level: str, worker: int | None = None) -> dict[str, Any]:
    """uvicorn's logging configuration plus ours, applied by uvicorn in every process it
    starts (each worker configures its own logging): our records at `level` with their
    logger names, the filters on every handler, so nothing reaches a log unredacted.

    `worker`: the slot of a worker under `--workers N`, which begins each of its lines
    (`[worker 1] `): the lines of N processes interleave in one log, and "stream went
    backwards" or a traceback said nothing of which process it came from."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    if worker is not None:
        for formatter in config["formatters"].values():
            formatter["fmt"] = f"[worker {worker}] {formatter['fmt']}"
    config["filters"] = {
        "redact": {"()": "dualcast.logs.RedactTokens"},
        "stall": {"()": "dualcast.logs.UnfinishedByStall"},
        "rejected": {"()": "dualcast.logs.RejectedTwice"},
        "shutdown": {"()": "dualcast.logs.CutAtShutdown"},
        "utf8": {"()": "dualcast.logs.BadUtf8FromClient"},
    }
    config["formatters"]["dualcast"] = {
        "format": ("" if worker is None else f"[worker {worker}] ")
        + "%(asctime)s %(levelname)s %(name)s: %(message)s",
    }
    config["handlers"]["dualcast"] = {
        "formatter": "dualcast", "class": "logging.StreamHandler", "stream": "ext://sys.stderr",
    }
    for handler in config["handlers"].values():
        handler["filters"] = ["redact"]
    loggers = config["loggers"]
    loggers["uvicorn.error"]["filters"] = ["stall", "rejected", "shutdown", "utf8"]
    loggers["dualcast"] = {"handlers": ["dualcast"], "level": level.upper(), "propagate": False}
    # Libraries' own records (redis, asyncio): warnings and worse, redacted too.
    config["root"] = {"handlers": ["dualcast"], "level": "WARNING"}
    return config
