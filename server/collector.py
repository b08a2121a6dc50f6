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
aborted closes, every transport: tests/test_no_cycles.py). What it could keep is a frozen object that later
ends up in a garbage cycle; so every `refresh` seconds the frozen objects are
thawed and the next full pass scans everything once, collecting any such cycle.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

log = logging.getLogger("dualcast.collector")


class FreezeAfterFullCollections:
    def __init__(self, refresh: float) -> None:
        self.refresh = refresh
        self.thawed_at = time.monotonic()
        self.thawed = False

    def install(self) -> None:
        if self._on_collection not in gc.callbacks:
            gc.callbacks.append(self._on_collection)
        gc.collect()  # start-up's own objects: collected once, then frozen by the callback

    def uninstall(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)
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
