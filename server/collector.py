"""Full garbage collections that scan what is new, not every connection again.

CPython's full collection walks every tracked object, and a WebSocket connection
holds about a hundred (uvicorn's protocol, websockets' parser and headers, our
session). At 10,000 connections one full pass took 0.8 s here, and every stream
stopped for it: once every few minutes while idle (the heartbeats' timers grow
the old generation by a quarter), and about ten growing passes back to back,
2.3 s in all, while 10,000 clients connected (bench/NOTES.md).

After a full pass every object left is reachable, so we freeze them all
(`gc.freeze`): later passes skip them. Freezing does not keep anything alive: a
frozen object is still freed by reference counting when its last reference
goes, and a closed connection leaves no reference cycle behind (clean and
aborted closes, every transport: tests/test_no_cycles.py). What it could keep is
a frozen object that later ends up in a garbage cycle; so every `refresh` seconds
the frozen objects are thawed and the next full pass scans everything once,
collecting any such cycle.

With freezing, a full pass costs what is new since the last one, so it pays to
run them often, while what they scan is still in the CPU's caches: a full pass
after every fourth middle one, and a middle one after every young one
(`THRESHOLDS`, against CPython's 700, 10, 10). A new object is still scanned by a
young, a middle and a full pass, but they are small ones (about 1,400 and 6,000
allocations' survivors, against 7,000 and 70,000). Measured in each worker's
collector callbacks while 15,000 connections each came in (`python -m bench fleet
--clients 30000 --server-workers 2 --transports ws|sse --events 1 --room-events 0
--idle-window 0`, 2026-11-30): 1.16-1.68 -> 0.50-0.64 s of collection per worker
for WebSockets, 0.76-0.88 -> 0.31-0.35 s for SSE streams, i.e. about 80 -> 37 us
and 55 -> 22 us per connect. Frozen early, more of what is in flight at a pass
gets frozen; after 8 x 3,000 connects and closes on one process (a third each
WebSocket, SSE and long-poll), the objects left for the thaw were 18-52 with
CPython's thresholds and 87 with these, and RSS 100 against 102.5 MB.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

log = logging.getLogger("dualcast.collector")

#: gc.set_threshold while installed: young passes every 700 allocations, as
#: CPython's; a middle pass after each young one; a full pass after four middle ones.
THRESHOLDS = (700, 0, 4)


class FreezeAfterFullCollections:
    def __init__(self, refresh: float) -> None:
        self.refresh = refresh
        self.thawed_at = time.monotonic()
        self.thawed = False
        self.saved: tuple[int, int, int] | None = None

    def install(self) -> None:
        if self._on_collection not in gc.callbacks:
            gc.callbacks.append(self._on_collection)
            self.saved = gc.get_threshold()
            gc.set_threshold(*THRESHOLDS)
        gc.collect()  # start-up's own objects: collected once, then frozen by the callback

    def uninstall(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)
        if self.saved is not None:
            gc.set_threshold(*self.saved)
            self.saved = None
        gc.unfreeze()

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or info["generation"] != 2:
            return
        now = time.monotonic()
        if not self.thawed and now - self.thawed_at >= self.refresh:
            # This pass scanned only the young; the next scans everything once.
            gc.unfreeze()
            self.thawed, self.thawed_at = True, now
            log.debug("thawed the frozen objects; the next full collection scans them")
            return
        self.thawed = False
        gc.freeze()
