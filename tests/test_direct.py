"""An event goes straight to an idle subscriber's sink only when nothing can overtake it.

The sink (server/direct.py) writes a frame from the fan-out loop; whenever the
writer task is busy, something is queued, a replay runs, the credentials ran out
or the transport declines, the event takes the queue as before.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from websockets.frames import Frame, Opcode

from dualcast.direct import text_frame_header
from dualcast.events import Event, format_id
from dualcast.frames import Item
from dualcast.hub import CloseReason, Hub, Subscriber

pytestmark = pytest.mark.timeout(10)


def event(n: int) -> Event:
    return Event(format_id((1000 + n, 0)), "tick", {"n": n}, (), 1000 + n)


class Wire:
    """A sink that records what it wrote; `accept` False plays a full transport."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.written: list[str] = []

    def __call__(self, ev: Event) -> bool:
        if self.accept:
            self.written.append(ev.id)
        return self.accept


def ids(items: list[Item]) -> list[str]:
    return [item.id for item in items if isinstance(item, Event)]


async def parked(hub: Hub, wire: Wire, **kwargs: object) -> tuple[Subscriber, asyncio.Task[None]]:
    """A subscriber whose writer waits (as a transport's writer does when idle)."""
    sub = Subscriber("websocket", (), 100, **kwargs)  # type: ignore[arg-type]
    sub.sink = wire
    hub.add(sub)
    waiter = asyncio.create_task(sub.wait())
    await asyncio.sleep(0)  # the task runs up to its wait
    return sub, waiter


def hub() -> Hub:
    h = Hub()
    h.set_position((0, 0))
    return h


async def test_an_idle_writer_is_skipped_and_the_cursor_moves() -> None:
    h, wire = hub(), Wire()
    sub, waiter = await parked(h, wire)
    h.publish([event(1)])
    h.publish([event(2)])
    assert wire.written == ["1001-0", "1002-0"]
    assert sub.drain() == [] and not waiter.done()
    # An event the sink already wrote is never sent again through the queue.
    sub.push(event(2))
    assert sub.drain() == []
    waiter.cancel()


async def test_a_declining_transport_leaves_the_event_to_the_writer() -> None:
    h, wire = hub(), Wire(accept=False)
    sub, waiter = await parked(h, wire)
    h.publish([event(1)])
    await asyncio.wait_for(waiter, 2)  # the writer is woken for it
    assert ids(sub.drain()) == ["1001-0"]


async def test_once_the_writer_is_woken_later_events_queue_behind_the_first() -> None:
    h, wire = hub(), Wire(accept=False)
    sub, waiter = await parked(h, wire)
    h.publish([event(1)])
    wire.accept = True  # the transport drained, but the writer has event 1 to send first
    h.publish([event(2)])
    assert wire.written == []
    await asyncio.wait_for(waiter, 2)
    assert ids(sub.drain()) == ["1001-0", "1002-0"]


async def test_a_batch_of_several_events_coalesces_through_the_writer() -> None:
    h, wire = hub(), Wire()
    sub, waiter = await parked(h, wire)
    h.publish([event(1), event(2), event(3)])
    assert wire.written == []
    await asyncio.wait_for(waiter, 2)
    assert ids(sub.drain()) == ["1001-0", "1002-0", "1003-0"]


async def test_no_direct_write_during_a_replay_or_after_expiry_or_close() -> None:
    h = hub()
    replaying, w1 = await parked(h, Wire())
    replaying.catching_up = True
    expired, w2 = await parked(h, Wire(), expires=time.time() - 1)
    closed, w3 = await parked(h, Wire())
    closed.close(CloseReason.GONE)
    h.publish([event(1)])
    for sub in (replaying, expired, closed):
        assert sub.sink is not None and sub.sink.written == []  # type: ignore[attr-defined]
    assert ids(replaying.drain()) == ["1001-0"]
    assert ids(expired.drain()) == ["1001-0"]  # the writer wakes, sees the expiry, ends it
    await asyncio.wait_for(asyncio.gather(w1, w2, w3), 2)


async def test_without_a_waiting_writer_the_event_is_queued() -> None:
    h, wire = hub(), Wire()
    sub = Subscriber("sse", (), 100)
    sub.sink = wire
    h.add(sub)
    h.publish([event(1)])
    assert wire.written == []
    assert ids(sub.drain()) == ["1001-0"]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_the_hand_built_frame_is_the_one_websockets_builds(size: int) -> None:
    payload = b"x" * size
    frame = Frame(Opcode.TEXT, payload).serialize(mask=False)
    assert text_frame_header(size) + payload == frame


async def test_above_the_budget_lone_events_go_through_the_writers() -> None:
    h, wire = hub(), Wire()
    h.DIRECT_BUDGET = 0.0  # any rate of deliveries is over it
    sub, waiter = await parked(h, wire)
    h.publish([event(1)])  # the first second: offered
    h._window_start -= 1.0  # a second later the hub reviews its last second
    h.publish([event(2)])
    assert wire.written == ["1001-0"]
    await asyncio.wait_for(waiter, 2)
    assert ids(sub.drain()) == ["1002-0"]
