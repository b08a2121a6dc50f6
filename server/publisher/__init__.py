"""Producers' side: append dualcast events to the Redis Stream without ever slowing the caller.

An application (an LLM-API proxy, a worker, a script) publishes from its request
path, so a publish must never block or break that path:

* **Fail open.** Each call is bounded by a short timeout (`asyncio.timeout` plus
  redis socket timeouts, no client retries). When Redis is unreachable or slow
  the call returns ``None``; a circuit breaker then answers ``None`` at once
  while Redis is probed, so during an outage the caller pays the timeout once,
  not on every call. Outages are logged once (rate limited) and counted in
  ``stats``.
* **Refuse early what no server can deliver.** Bad names, and data a server
  would have to drop (NaN, numbers past what JSON carries, absurd nesting),
  raise ValueError before anything reaches Redis.
* **Throttle / conflate.** ``publish(..., throttle_key=k, every=s)`` appends at
  most once per ``s`` seconds per key, with a leading and a trailing edge.
* **Batch.** ``publish_many`` sends many entries in one pipeline round trip.
* **Replicas** (opt-in): ``wait_replicas=n`` follows each write with ``WAIT``;
  ``publish_result`` says whether enough replicas acknowledged it.
* **Local fallback** (opt-in): an object with ``publish_local(event, data, rooms)``
  (the in-process dualcast app) receives events while Redis is away.

The wire format: ``XADD <stream> MAXLEN ~ <maxlen> * data <JSON
{"event","data","rooms"?}> timestamp <epoch ms>``. This package imports
neither Starlette, uvicorn nor pydantic: a producer installs dualcast and uses
it without the server.

Layout: :mod:`.encoding` (the envelope JSON and what it refuses),
:mod:`.throttle`, :mod:`.breaker`, :mod:`.results`, :mod:`.core` (everything
the two fronts share), :mod:`.aio` (``Publisher``) and :mod:`.blocking`
(``SyncPublisher``).
"""

from __future__ import annotations

from dualcast.publisher.aio import Publisher
from dualcast.publisher.blocking import SyncPublisher
from dualcast.publisher.core import BatchItem, LocalFallback
from dualcast.publisher.encoding import UnpublishableValue, encode_envelope
from dualcast.publisher.results import Outcome, PublisherStats, PublishResult

__all__ = [
    "BatchItem",
    "LocalFallback",
    "Outcome",
    "PublishResult",
    "Publisher",
    "PublisherStats",
    "SyncPublisher",
    "UnpublishableValue",
    "encode_envelope",
]
