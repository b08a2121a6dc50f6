"""A feed replays from the log, goes live with no gap and nothing twice, says `reset`
when the cursor is gone, and ends when its credentials run out."""

from __future__ import annotations

import asyncio
import time

import pytest

from dualcast.config import load_settings
from dualcast.events import Envelope, Event, decode_entry, entry_fields, parse_id
from dualcast.feed import Feed, FeedClosed
from dualcast.frames import Reset
from dualcast.hub import CloseReason, Hub
from dualcast.log import LogInfo, RawEntry
from dualcast.log.memory import MemoryLog

pytestmark = pytest.mark.timeout(10)


async def filled(n: int, maxlen: int = 1000) -> tuple[MemoryLog, list[str]]:
    log = MemoryLog(maxlen)
    ids = [await log.append(entry_fields(Envelope(event="e", data=i))) for i in range(n)]
    return log, ids


async def deliver_all(hub: Hub, log: MemoryLog, after: str = "0-0") -> None:
    """What the consumer does: read what is new and hand it to the hub."""
    hub.publish([decode_entry(i, f) for i, f in await log.read_after(after, 10_000)])


async def collect(feed: Feed, count: int) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + 5
    while len(seen) < count and time.monotonic() < deadline:
        seen += [i.id for i in await feed.next(timeout=0.2) if isinstance(i, Event)]
    return seen


async def test_no_cursor_is_live_from_the_hub_position() -> None:
    log, ids = await filled(3)
    hub = Hub()
    hub.set_position((0, 0))
    await deliver_all(hub, log)
    async with Feed(hub, log, load_settings(), "sse", set(), None) as feed:
        assert feed.start_id == ids[-1]
        assert await feed.next(timeout=0.01) == []  # nothing old is replayed
        new = await log.append(entry_fields(Envelope(event="e", data="new")))
        await deliver_all(hub, log, ids[-1])
        assert await collect(feed, 1) == [new]


async def test_cursor_zero_replays_everything_retained() -> None:
    log, ids = await filled(7)
    hub = Hub()
    hub.set_position((0, 0))
    await deliver_all(hub, log)
    settings = load_settings(replay_page=3)
    async with Feed(hub, log, settings, "websocket", set(), (0, 0)) as feed:
        assert await collect(feed, 7) == ids


async def test_a_trimmed_cursor_gets_reset_then_live() -> None:
    log, ids = await filled(30, maxlen=10)  # the first 20 are trimmed away
    hub = Hub()
    hub.set_position((0, 0))
    await deliver_all(hub, log)
    async with Feed(hub, log, load_settings(), "websocket", set(), parse_id(ids[0])) as feed:
        assert feed.start_id == ids[-1]  # the welcome names the head, not the gone cursor
        first = await feed.next(timeout=1)
        assert first == [Reset(ids[-1])]
        new = await log.append(entry_fields(Envelope(event="e", data="after")))
        await deliver_all(hub, log, ids[-1])
        assert await collect(feed, 1) == [new]


async def test_a_cursor_newer_than_the_stream_gets_reset() -> None:
    log, ids = await filled(3)
    hub = Hub()
    hub.set_position((0, 0))
    await deliver_all(hub, log)
    future = (parse_id(ids[-1])[0] + 10_000, 0)
    async with Feed(hub, log, load_settings(), "sse", set(), future) as feed:
        assert feed.start_id == ids[-1]
        assert await feed.next(timeout=1) == [Reset(ids[-1])]


async def test_a_cursor_the_log_still_covers_is_the_welcome_cursor() -> None:
    log, ids = await filled(5)
    hub = Hub()
    hub.set_position((0, 0))
    await deliver_all(hub, log)
    async with Feed(hub, log, load_settings(), "sse", set(), parse_id(ids[1])) as feed:
        assert feed.start_id == ids[1]
        assert await collect(feed, 3) == ids[2:]


async def test_rooms_filter_the_replay() -> None:
    log = MemoryLog(100)
    mine = await log.append(entry_fields(Envelope(event="e", rooms=["a"])))
    await log.append(entry_fields(Envelope(event="e", rooms=["b"])))
    public = await log.append(entry_fields(Envelope(event="e")))
    hub = Hub()
    hub.set_position((0, 0))
    await deliver_all(hub, log)
    async with Feed(hub, log, load_settings(), "sse", {"a"}, (0, 0)) as feed:
        assert await collect(feed, 2) == [mine, public]


async def test_credentials_that_run_out_end_the_feed() -> None:
    log, _ = await filled(1)
    hub = Hub()
    hub.set_position((0, 0))
    soon = time.time() + 0.2
    async with Feed(hub, log, load_settings(), "sse", set(), None, expires=soon) as feed:
        with pytest.raises(FeedClosed) as closed:
            while True:
                await feed.next(timeout=5)  # returns early at the expiry, then ends
        assert closed.value.reason is CloseReason.EXPIRED
        assert time.time() >= soon


async def test_extending_the_credentials_keeps_the_feed_open() -> None:
    log, _ = await filled(1)
    hub = Hub()
    hub.set_position((0, 0))
    async with Feed(hub, log, load_settings(), "sse", set(), None,
                    expires=time.time() + 0.2) as feed:
        feed.extend(time.time() + 60)
        assert await feed.next(timeout=0.4) == []  # past the first expiry, still open
        feed.extend(time.time() - 1)
        with pytest.raises(FeedClosed):
            await feed.next(timeout=1)


async def test_a_closed_subscriber_ends_the_feed_with_its_reason() -> None:
    log, _ = await filled(1)
    hub = Hub()
    hub.set_position((0, 0))
    async with Feed(hub, log, load_settings(), "websocket", set(), None) as feed:
        hub.close_all(CloseReason.SHUTDOWN)
        with pytest.raises(FeedClosed) as closed:
            await feed.next(timeout=1)
        assert closed.value.reason is CloseReason.SHUTDOWN
    assert hub.count() == 0


async def test_a_replay_cap_of_zero_caps_nothing() -> None:
    """The README says `DUALCAST_REPLAY_MAX=0` replays everything retained; the setting
    refused 0 at start ("greater than or equal to 1")."""
    log, ids = await filled(40)
    hub = Hub()
    hub.set_position((0, 0))
    await deliver_all(hub, log)
    settings = load_settings(replay_max=0, replay_page=3, maxlen=10)
    assert settings.replay_cap is None
    async with Feed(hub, log, settings, "websocket", set(), parse_id(ids[0])) as feed:
        assert await collect(feed, 39) == ids[1:]


def test_the_default_replay_cap_follows_the_maxlen() -> None:
    """The cap was 10,000 whatever DUALCAST_MAXLEN said; unset it is twice the maxlen, and
    an explicit one (or `DUALCAST_REPLAY_MAX=`, blank: unset) is what it says."""
    assert load_settings(maxlen=100).replay_cap == 200
    assert load_settings().replay_cap == 20_000
    assert load_settings(maxlen=100, replay_max=300).replay_cap == 300
    assert load_settings(maxlen=100, replay_max="").replay_cap == 200


async def test_a_cursor_at_the_newest_trimmed_entry_replays_after_a_reset() -> None:
    """Once the instance had told its clients `reset` (any reset, long ago), a client
    whose cursor was the newest entry the stream had trimmed (everything after it still
    retained) was told `reset` too: its entry is missing, which was taken for Redis
    losing data, though the stream records trimming it (`max_deleted`)."""
    log, ids = await filled(12, maxlen=10)  # ids[0] and ids[1] trimmed, the rest held
    assert (await log.info()).max_deleted == parse_id(ids[1])
    hub = Hub()
    hub.set_position((0, 0))
    await deliver_all(hub, log)
    hub.reset_all(parse_id(ids[-1]))  # a reset told to every client, before this one came
    assert hub.reset_from >= parse_id(ids[1])
    async with Feed(hub, log, load_settings(), "websocket", set(), parse_id(ids[1])) as feed:
        items = await feed.next(timeout=1)
        assert not any(isinstance(i, Reset) for i in items), items
        assert [i.id for i in items if isinstance(i, Event)] == ids[2:]


async def test_a_reset_while_a_resuming_feed_looks_at_its_cursor_reaches_it() -> None:
    """Every client is told `reset` (Redis lost data) while a client that resumes with a
    cursor is being admitted, its feed reading the log before it joins the hub: the
    reset went to the others only, and this client replayed on from its cursor, through
    events the stream no longer held, without a word."""
    log, ids = await filled(5)
    hub = Hub()
    hub.set_position((0, 0))
    await deliver_all(hub, log)
    read = log.info

    async def info_as_redis_loses_data() -> LogInfo:
        window = await read()
        if not hub.resets:
            hub.reset_all(parse_id(ids[-1]))  # the consumer's reset, during this read
        return window

    log.info = info_as_redis_loses_data  # type: ignore[method-assign]
    async with Feed(hub, log, load_settings(), "websocket", set(), parse_id(ids[1])) as feed:
        items = await feed.next(timeout=1)
        assert items and isinstance(items[0], Reset), items
        assert items[0].last_id == ids[-1]


@pytest.mark.parametrize("when", ["between two pages", "during a page's read"])
async def test_a_reset_during_a_replay_comes_before_what_follows_it(when: str) -> None:
    """Every client is told `reset` while one still replays from the log: its replay
    jumped to the reset's position without a word, went on with the events after it,
    and the `reset` came only once the replay had caught up, behind events newer than
    its `last_id` (a client taking that `last_id` as its cursor went back before events
    it had shown)."""
    log, ids = await filled(10)
    hub = Hub()
    hub.set_position((0, 0))
    await deliver_all(hub, log)
    reset_at = parse_id(ids[5])
    read = log.read_after
    reads = 0

    async def read_as_redis_loses_data(after: str, count: int) -> list[RawEntry]:
        nonlocal reads
        page = await read(after, count)
        reads += 1
        if reads == 2 and when == "during a page's read":
            hub.reset_all(reset_at)  # the consumer's reset, while this read ran
        return page

    log.read_after = read_as_redis_loses_data  # type: ignore[method-assign]
    settings = load_settings(replay_page=3)
    async with Feed(hub, log, settings, "websocket", set(), parse_id(ids[0])) as feed:
        seen = [i.id for i in await feed.next(timeout=1) if isinstance(i, Event)]
        if when == "between two pages":
            hub.reset_all(reset_at)
        items: list[object] = []
        while not any(isinstance(i, Event) and i.id == ids[-1] for i in items):
            items += await feed.next(timeout=1)
    resets = [n for n, i in enumerate(items) if isinstance(i, Reset)]
    assert len(resets) == 1, items
    after = [i.id for i in items[resets[0] + 1:] if isinstance(i, Event)]
    before = [i.id for i in items[:resets[0]] if isinstance(i, Event)]
    assert items[resets[0]].last_id == ids[5]  # type: ignore[attr-defined]
    assert after == ids[6:], items  # everything after the reset's position, once
    assert all(parse_id(i) <= reset_at for i in seen + before), (seen, before)


async def test_a_replay_waiting_for_the_consumer_hands_back_to_its_writer() -> None:
    """The cursor is ahead of this instance's consumer (a client moved from an instance
    further ahead), or the consumer has no position yet (the log was away at start).
    The WebSocket writer asks with `timeout=0` while replaying, to flush a `pong` or a
    `joined` in between; the wait spun on the event loop without returning instead, and
    those frames waited until the consumer caught up (a client pinging meanwhile took
    the silence for a dead path and reconnected, to the same wait)."""
    log, ids = await filled(3)
    lagging = Hub()
    lagging.set_position((0, 0))  # its consumer has read none of the three yet
    for hub in (lagging, Hub()):  # ...and one whose consumer has not started
        async with Feed(hub, log, load_settings(), "websocket", set(), parse_id(ids[-1])) as feed:
            for _ in range(3):
                assert await asyncio.wait_for(feed.next(timeout=0), 2) == []
            assert feed.replaying
            waiting = asyncio.create_task(feed.next(timeout=0))
            await asyncio.sleep(0)  # (let it park)
            feed.sub.notify()  # what a control frame queued for the writer does
            assert await asyncio.wait_for(waiting, 0.3) == []


async def test_a_consumer_catching_up_behind_the_cursor_does_not_cut_the_client_off() -> None:
    """The events the consumer still reads before the cursor, more than the queue holds,
    are the client's already: it stays connected and gets what comes after, once."""
    log, ids = await filled(50)
    hub = Hub()
    hub.set_position((0, 0))
    settings = load_settings(queue_size=10)
    async with Feed(hub, log, settings, "websocket", set(), parse_id(ids[-1])) as feed:
        assert await feed.next(timeout=0.01) == []
        await deliver_all(hub, log)  # 50 stale events in one batch
        new = await log.append(entry_fields(Envelope(event="e", data="new")))
        await deliver_all(hub, log, ids[-1])
        assert await collect(feed, 1) == [new]
        assert feed.sub.closed is None
