"""The one harness of tests and bench: real processes, lean clients, waits with deadlines.

- `procs`: redis-server and dualcast children on free loopback ports (`Child` for others)
- `waits`: `wait_until` (blocking) and `wait_for` (async), each with a deadline
- `wire`, `lean`: WebSocket / SSE / long-poll over raw asyncio protocols, parsed once
- `clients`: recording subscribers for tests (`WSClient`, `SSEClient`, `Poller`)
- `follow`: subscribers that resume across losses (`Follower`, `Stuck`)
- `stream`: raw producers and the stream as ground truth (`xadd`, `Producer`, ...)
- `probes`: what a running server shows (log problems, /metrics, /readyz, fds, RSS)
- `nginx`, `tcpproxy`, `sampled`: nginx in front, a fault-injecting proxy, a task-counting child
- `tools`: system tools a test needs, or a loud skip (a failure under CI=true)

`python -m bench` imports this package from the repository root; nothing here
imports bench or edits `sys.path`.
"""

from __future__ import annotations

from tests.harness.clients import (
    TRANSPORTS,
    Answer,
    Poller,
    Seen,
    SSEClient,
    Subscriber,
    Transport,
    WSClient,
    subscribe,
)
from tests.harness.follow import Close, Follower, Record, Stuck, start_followers
from tests.harness.lean import Conn, PollConn, SSEConn, WSConn
from tests.harness.probes import fd_count, log_problems, metric, readyz, rss_mb
from tests.harness.procs import (
    ROOT,
    Child,
    DualcastProcess,
    RedisProcess,
    clean_env,
    free_port,
    http_ok,
    raise_nofile,
)
from tests.harness.stream import (
    STREAM,
    Producer,
    check_exact,
    id_key,
    stream_entries,
    stream_ids,
    visible,
    xadd,
)
from tests.harness.waits import WaitTimeout, wait_for, wait_until

__all__ = [
    "ROOT",
    "STREAM",
    "TRANSPORTS",
    "Answer",
    "Child",
    "Close",
    "Conn",
    "DualcastProcess",
    "Follower",
    "PollConn",
    "Poller",
    "Producer",
    "Record",
    "RedisProcess",
    "SSEClient",
    "SSEConn",
    "Seen",
    "Stuck",
    "Subscriber",
    "Transport",
    "WSClient",
    "WSConn",
    "WaitTimeout",
    "check_exact",
    "clean_env",
    "fd_count",
    "free_port",
    "http_ok",
    "id_key",
    "log_problems",
    "metric",
    "raise_nofile",
    "readyz",
    "rss_mb",
    "start_followers",
    "stream_entries",
    "stream_ids",
    "subscribe",
    "visible",
    "wait_for",
    "wait_until",
    "xadd",
]
