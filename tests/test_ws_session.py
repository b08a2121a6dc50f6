"""A WebSocket session's control replies are bounded: a client that pings without
reading gets at most a queue's worth of pongs waiting, then is cut off as lagging
(1013), as a slow consumer of events would be. Before, the replies piled up without
limit until the stall watch gave up on the client.

In process, with the real runtime, hub and feed: only the socket is absent, because
the replies are queued before anything is sent (the writer is not running here, as
it is not while it waits on a client that stopped reading).
"""

from __future__ import annotations

from typing import Any, cast

import pytest
from starlette.websockets import WebSocket

from dualcast.auth import ANONYMOUS
from dualcast.config import load_settings
from dualcast.feed import Feed, FeedClosed
from dualcast.hub import CloseReason
from dualcast.runtime import Runtime
from dualcast.transports.ws import Session

pytestmark = pytest.mark.timeout(10)


async def never_sent(message: Any) -> None:  # the writer would call it; it does not run here
    raise AssertionError("nothing is sent while the replies are only queued")


async def test_pongs_for_a_client_that_does_not_read_are_bounded() -> None:
    settings = load_settings(queue_size=50)
    rt = Runtime(settings, None)
    rt.hub.set_position((1, 0))
    async with Feed(rt.hub, rt.log, settings, "websocket", set(), None) as feed:
        session = Session(cast(WebSocket, None), never_sent, rt, ANONYMOUS, feed)
        for _ in range(5_000):
            await session.handle({"type": "ping"})
        assert len(session.control) <= settings.queue_size
        assert feed.sub.closed is CloseReason.LAGGING
        with pytest.raises(FeedClosed) as closed:
            await feed.next(timeout=0)
        assert closed.value.reason is CloseReason.LAGGING  # the writer then closes 1013
