"""A long-poll's cursor on an instance whose consumer has no position yet (it started
while Redis was away): a `reset` names the log's head, as a stream's does."""

from __future__ import annotations

import httpx
import pytest

from dualcast.app import create_app
from dualcast.config import Settings
from dualcast.events import Envelope, entry_fields, parse_id
from dualcast.log.base import RawEntry
from tests.conftest import SECRET

pytestmark = pytest.mark.timeout(20)


async def test_a_poll_reset_before_the_consumer_starts_goes_on_from_the_head() -> None:
    """Told `reset` to `0-0` (the consumer's position before it had one), a poller went
    on from `0-0`, everything retained, and got the whole window again as new events
    on top of the state it had just reloaded."""
    app = create_app(Settings(secret=SECRET, maxlen=10))  # no lifespan: no consumer yet
    rt = app.state.dualcast
    assert not rt.hub.started
    ids = [await rt.log.append(entry_fields(Envelope(event="e", data=n))) for n in range(30)]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dc",
                                 timeout=10) as client:
        gone = (await client.get("/api/events", params={"after": ids[0], "timeout": "0"})).json()
        assert gone == {"events": [], "last_id": ids[-1], "reset": True}
        rt.hub.set_position((await rt.log.info()).last_id)  # the consumer starts at the head
        after = (await client.get("/api/events", params={"after": gone["last_id"],
                                                          "timeout": "0"})).json()
        assert after == {"events": [], "last_id": ids[-1], "reset": False}


async def test_a_reset_while_a_poll_reads_the_log_is_told_to_that_poll() -> None:
    """Every client is told `reset` (Redis lost data) while a poll behind the in-memory
    window reads its page from the log: the poll answered what the page held, with
    `reset: false`, and its poller went on from there without ever hearing of the loss
    (only a poll waiting on the hub at that moment was told)."""
    app = create_app(Settings(secret=SECRET, maxlen=100))  # no lifespan: no consumer
    rt = app.state.dualcast
    ids = [await rt.log.append(entry_fields(Envelope(event="e", data=n))) for n in range(5)]
    rt.hub.set_position((await rt.log.info()).last_id)
    read = rt.poll_page

    async def read_as_redis_loses_data(after: str, count: int) -> list[RawEntry]:
        page = await read(after, count)
        rt.hub.reset_all(parse_id(ids[-1]))  # the consumer's reset, while this read ran
        return page

    rt.poll_page = read_as_redis_loses_data
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dc",
                                 timeout=10) as client:
        answer = (await client.get("/api/events", params={"after": ids[0], "timeout": "0"}))
    assert answer.json() == {"events": [], "last_id": ids[-1], "reset": True}
