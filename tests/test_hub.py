"""The hub routes by room, shares one encoding, and cuts off only the lagging subscriber."""

from __future__ import annotations

import pytest

from dualcast.config import load_settings
from dualcast.events import Event, format_id
from dualcast.feed import Feed
from dualcast.hub import CloseReason, Hub, Subscriber
from dualcast.log.memory import MemoryLog

pytestmark = pytest.mark.timeout(10)


def event(n: int, rooms: tuple[str, ...] = ()) -> Event:
    return Event(format_id((1000 + n, 0)), "tick", {"n": n}, rooms, 1000 + n)


def subscriber(hub: Hub, *rooms: str, maxsize: int = 100) -> Subscriber:
    sub = Subscriber("websocket", rooms, maxsize)
    hub.add(sub)
    return sub


def ids(sub: Subscriber) -> list[str]:
    return [item.id for item in sub.drain() if isinstance(item, Event)]


def test_room_events_reach_only_their_rooms_and_public_reach_all() -> None:
    hub = Hub()
    hub.set_position((0, 0))
    admin = subscriber(hub, "admin")
    user = subscriber(hub, "user-456")
    anon = subscriber(hub)
    both = subscriber(hub, "admin", "user-456")
    hub.publish([event(1, ("admin",)), event(2, ("user-456",)), event(3), event(4, ("admin", "user-456"))])
    assert ids(admin) == ["1001-0", "1003-0", "1004-0"]
    assert ids(user) == ["1002-0", "1003-0", "1004-0"]
    assert ids(anon) == ["1003-0"]
    assert ids(both) == ["1001-0", "1002-0", "1003-0", "1004-0"]  # once each, in order


def test_join_and_leave_change_routing() -> None:
    hub = Hub()
    hub.set_position((0, 0))
    sub = subscriber(hub)
    hub.publish([event(1, ("ops",))])
    hub.join(sub, "ops")
    hub.publish([event(2, ("ops",))])
    hub.leave(sub, "ops")
    hub.publish([event(3, ("ops",))])
    assert ids(sub) == ["1002-0"]


def test_every_subscriber_shares_one_encoded_frame() -> None:
    hub = Hub()
    hub.set_position((0, 0))
    subs = [subscriber(hub) for _ in range(3)]
    hub.publish([event(1)])
    frames = [sub.drain()[0] for sub in subs]
    assert frames[0] is frames[1] is frames[2]
    assert isinstance(frames[0], Event)
    assert frames[0].ws_frame() is frames[1].ws_frame()
    assert frames[0].sse_frame() is frames[2].sse_frame()


def test_full_queue_cuts_off_only_that_subscriber() -> None:
    hub = Hub()
    hub.set_position((0, 0))
    slow = subscriber(hub, maxsize=3)
    fast = subscriber(hub, maxsize=100)
    for n in range(1, 6):
        hub.publish([event(n)])
        ids(fast)
    assert slow.closed is CloseReason.LAGGING
    assert fast.closed is None
    hub.publish([event(6)])
    assert ids(fast) == ["1006-0"]
    hub.remove(slow)
    assert hub.stats.cutoffs == 1


def test_unsubscribed_rooms_cost_nothing() -> None:
    """An event for one room touches only that room's subscribers (the index, not a scan)."""
    hub = Hub()
    hub.set_position((0, 0))
    for n in range(1000):
        subscriber(hub, f"user-{n}")
    hub.publish([event(1, ("user-7",))])
    assert hub.stats.deliveries == 1


async def test_feed_leaves_the_hub_even_when_its_body_raises() -> None:
    hub = Hub()
    hub.set_position((0, 0))
    settings = load_settings(redis_url=None)
    with pytest.raises(RuntimeError):
        async with Feed(hub, MemoryLog(100), settings, "sse", {"a"}, None):
            assert len(hub.subscribers) == 1
            raise RuntimeError("boom")
    assert hub.subscribers == set()
    assert hub.count() == 0


async def test_feed_replays_then_goes_live_without_gap_or_duplicate() -> None:
    from dualcast.events import Envelope, entry_fields

    log = MemoryLog(1000)
    hub = Hub()
    ids_ = [await log.append(entry_fields(Envelope(event="e", data=i))) for i in range(5)]
    hub.set_position((0, 0))
    # The consumer has delivered the first 3 before the client arrives.
    from dualcast.events import decode_entry

    entries = await log.read_after("0-0", 3)
    hub.publish([decode_entry(i, f) for i, f in entries])
    settings = load_settings(redis_url=None, replay_page=2)
    from dualcast.events import parse_id

    async with Feed(hub, log, settings, "websocket", set(), parse_id(ids_[0])) as feed:
        # Entries 3 and 4 arrive live while the client is still replaying.
        rest = await log.read_after(ids_[2], 10)
        hub.publish([decode_entry(i, f) for i, f in rest])
        seen: list[str] = []
        while len(seen) < 4:
            seen += [item.id for item in await feed.next(timeout=1) if isinstance(item, Event)]
    assert seen == ids_[1:]
