"""Where the subscription's token comes from, and when to ask for the next one.

A token is a string, or a callable (plain or async) returning a fresh one: it is
called at the start, shortly before the current token's `exp`, and again after the
server said the token is no longer good. The `exp` is read from the JWT payload
without verifying it (the client has no key, and only needs to know when to ask);
a token that is not a JWT is refreshed only when the server refuses it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import inspect
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

TokenSource = str | Callable[[], str | Awaitable[str]] | None

#: The soonest the source is asked again, however close (or past) the token's `exp`:
#: a source that hands out an expired token (a stale cache, a skewed clock) must not
#: be called in a loop; the server refuses that token and the subscription ends with
#: `AuthFailed` once a second one was no better. The browser client's floor too.
MIN_REFRESH = 1.0


def expiry(token: str | None) -> float | None:
    """The `exp` claim (epoch seconds) of a JWT, or None when there is none to read."""
    if not token:
        return None
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def refresh_in(token: str | None, now: float | None = None) -> float | None:
    """Seconds until the token should be replaced: a fifth of what is left, at most a
    minute, before it expires (so a slow token source still answers in time), and
    never sooner than `MIN_REFRESH`."""
    exp = expiry(token)
    if exp is None:
        return None
    left = exp - (time.time() if now is None else now)
    return max(MIN_REFRESH, left - min(60.0, left / 5))


#: How long a token source may take before its call counts as failed (a token service
#: that never answers froze the subscription for ever). `Timing.token`.
TOKEN_TIMEOUT = 10.0


def _is_async(source: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(source) or inspect.iscoroutinefunction(
        type(source).__call__)


async def _in_thread(source: Callable[[], Any]) -> Any:
    """Call a plain token function in a thread of its own, so one that blocks (an HTTP
    call to a token service) neither stalls the event loop nor escapes the timeout.
    A daemon thread, not `asyncio.to_thread`: the default executor is waited for when
    the loop closes, so one hung call would hang `asyncio.run` at the program's end."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(value: Any, error: Exception | None) -> None:
        if answer.done():  # (given up on: the timeout, or the subscription ended)
            return
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(value)

    def run() -> None:
        value: Any = None
        error: Exception | None = None
        try:
            value = context.run(source)
        except StopIteration as exc:  # (a future refuses it: the failure was lost)
            error = RuntimeError("the token function raised StopIteration")
            error.__cause__ = exc
        except Exception as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    threading.Thread(target=run, name="dualcast-token-source", daemon=True).start()
    return await answer


class Tokens:
    """The current token and the source of the next one."""

    def __init__(self, source: TokenSource, timeout: float = TOKEN_TIMEOUT) -> None:
        if source is not None and not isinstance(source, str) and not callable(source):
            # (bytes, as PyJWT 1 returned, subscribed anonymously without a word)
            raise TypeError("token must be a string or a function returning one, not "
                            f"{type(source).__name__}")
        self._source = source
        self.timeout = timeout
        self.current: str | None = source if isinstance(source, str) else None

    @property
    def refreshable(self) -> bool:
        return callable(self._source)

    async def refresh(self) -> str | None:
        """Ask the source for a fresh token (a fixed string is simply kept). A source that
        has not answered within `timeout` raises TimeoutError, which the subscription
        treats as any failure of the source. A plain function runs in a thread (see
        `_in_thread`): one that blocks fails the same way, the event loop running on."""
        if callable(self._source):
            source = self._source
            bound = asyncio.timeout(self.timeout)
            try:
                async with bound:
                    value = source() if _is_async(source) else await _in_thread(source)
                    if inspect.isawaitable(value):  # (a plain function may return one)
                        value = await value
            except TimeoutError:
                if not bound.expired():
                    raise  # the source's own TimeoutError: its failure, as it said it
                raise TimeoutError(
                    f"it did not answer within {self.timeout:g} s") from None
            if not isinstance(value, str) or not value:
                raise TypeError("the token source must return a non-empty string")
            self.current = value
        return self.current
