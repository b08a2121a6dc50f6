"""The auth hook's leases, in process, against a real hook server the test controls.

A live subscription follows its identity's lease (`Authenticator.follow`); the
renewal loop asks the application again before `exp`. Here a recording
follower stands in for a transport's Feed, so what the renewal does to a live
subscription is seen directly: extended while the application vouches,
left to run out when it refuses or hands out other rights.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from starlette.requests import HTTPConnection

from dualcast.auth import Authenticator, AuthError, Identity
from tests.issuers import HookServer

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """Stands in for a Feed: remembers every new end it is given."""

    def __init__(self) -> None:
        self.ends: list[float | None] = []

    def extend(self, expires: float | None) -> None:
        self.ends.append(expires)


def request_with(cookie: str) -> HTTPConnection:
    return HTTPConnection({
        "type": "http", "method": "GET", "path": "/api/sse", "query_string": b"",
        "headers": [(b"cookie", cookie.encode())],
    })


@pytest.fixture
async def hook_and_auth() -> AsyncIterator[tuple[HookServer, Authenticator]]:
    app = HookServer().start()
    auth = Authenticator(None, auth_url=app.url, timeout=1.0)
    runner = asyncio.create_task(auth.run())
    try:
        yield app, auth
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await auth.close()
        app.stop()


async def until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_vouched_identity_is_renewed_while_followed(
    hook_and_auth: tuple[HookServer, Authenticator],
) -> None:
    app, auth = hook_and_auth
    app.allow("sid=a", "ann", ["ops"], ttl=2)
    identity = await auth.identify(request_with("sid=a"))
    assert (identity.sub, identity.rooms, identity.anonymous) == ("ann", {"ops"}, False)
    first_exp = identity.exp
    assert first_exp is not None
    feed = Recorder()
    auth.follow(identity, feed)
    async with asyncio.timeout(10):
        await until(lambda: len(feed.ends) >= 2, 10, "two renewals")
    assert feed.ends == sorted(feed.ends)  # type: ignore[type-var]
    assert feed.ends[-1] > first_exp  # type: ignore[operator]
    assert not identity.expired()  # (past the first answer's exp by now)
    assert time.time() > first_exp - 1.0

    # The application ends the session: no more renewals; the end stays where it was.
    app.refuse("sid=a", 401)
    calls, ends = app.calls_for("sid=a"), len(feed.ends)
    await until(lambda: app.calls_for("sid=a") > calls, 10, "the renewal that is refused")
    await until(identity.expired, 5, "the identity to run out")
    assert len(feed.ends) == ends
    with pytest.raises(AuthError) as refused:
        await auth.identify(request_with("sid=a"))
    assert (refused.value.status, refused.value.code) == (401, "session_refused")


async def test_other_rights_end_the_lease_instead_of_changing_a_live_subscription(
    hook_and_auth: tuple[HookServer, Authenticator],
) -> None:
    app, auth = hook_and_auth
    app.allow("sid=b", "ben", ["ops", "billing"], ttl=2)
    identity = await auth.identify(request_with("sid=b"))
    feed = Recorder()
    auth.follow(identity, feed)
    app.allow("sid=b", "ben", ["ops"], ttl=2)  # narrower now
    await until(identity.expired, 6, "the old identity to run out")
    assert feed.ends == []
    fresh = await auth.identify(request_with("sid=b"))
    assert fresh.rooms == {"ops"} and not fresh.expired()


async def test_unfollowed_identities_are_not_renewed(
    hook_and_auth: tuple[HookServer, Authenticator],
) -> None:
    """A long-poll's identity (nothing follows it) costs no renewal calls."""
    app, auth = hook_and_auth
    app.allow("sid=c", "cat", ttl=1.5)
    identity: Identity = await auth.identify(request_with("sid=c"))
    await until(identity.expired, 5, "the identity to run out")
    assert app.calls_for("sid=c") == 1


async def test_without_any_credential_the_application_is_not_asked(
    hook_and_auth: tuple[HookServer, Authenticator],
) -> None:
    app, auth = hook_and_auth
    bare = HTTPConnection({"type": "http", "method": "GET", "path": "/api/sse",
                           "query_string": b"", "headers": []})
    assert (await auth.identify(bare)).anonymous
    auth.allow_anonymous = False
    with pytest.raises(AuthError) as refused:
        await auth.identify(bare)
    assert refused.value.code == "unauthenticated"
    assert app.calls == 0


async def test_a_far_exp_still_has_a_live_subscription_asked_again_within_max_age(
    hook_and_auth: tuple[HookServer, Authenticator],
) -> None:
    """An answer whose `exp` was hours away kept a live stream open that long without
    asking again: a session the application had ended streamed on (60 s is the most an
    answer counts; 2 s here)."""
    app, auth = hook_and_auth
    assert auth.hook is not None
    auth.hook.max_age = 2.0
    app.allow("sid=f", "fay", ["ops"], ttl=3600)
    identity = await auth.identify(request_with("sid=f"))
    assert identity.exp is not None and identity.exp <= time.time() + 2.0
    feed = Recorder()
    auth.follow(identity, feed)
    await until(lambda: len(feed.ends) >= 1, 10, "a renewal while the session lasts")
    assert not identity.expired()
    app.refuse("sid=f", 401)  # signed out in the application
    await until(identity.expired, 5, "the identity to run out")
    with pytest.raises(AuthError) as refused:
        await auth.identify(request_with("sid=f"))
    assert refused.value.code == "session_refused"
