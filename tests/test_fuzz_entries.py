"""Property test (hypothesis): no stream entry a producer can XADD stops delivery.

Raw bytes, JSON that decodes but cannot be encoded again (nesting past orjson's
254 levels, lone surrogates, 64-bit overflows), wrong types in every field: each
is XADDed raw to a real redis-server read by a real dualcast process, followed
by a canary. After every example, a healthy WebSocket, SSE and long-poll client
(same token, same rooms) have each received the canary, the same other events
as each other (nothing is delivered on one transport and not another), a replay
from `0` reaches the canary, and `/readyz` is 200.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import SECRET, token
from tests.harness.procs import DualcastProcess, RedisProcess
from tests.harness.waits import wait_until

USER = token("456")
Runner = Callable[[str, "Seen", threading.Event], None]
#: A bounded run for CI (~20 s); FUZZ_EXAMPLES=500 digs deeper.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None,
                database=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.function_scoped_fixture])


class Seen:
    """Event ids a client received, in order, and whether it is still connected."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.canaries: set[int] = set()
        self.ended: str | None = None
        self.live = False  # welcomed: what is XADDed from now on reaches it
        self.lock = threading.Lock()

    def add(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.ids.append(event["id"])
            if event.get("event") == "canary":
                self.canaries.add(int(event["data"]["n"]))

    def others(self, canary_ids: set[str]) -> list[str]:
        with self.lock:
            return [i for i in self.ids if i not in canary_ids]


def run_ws(url: str, seen: Seen, stop: threading.Event) -> None:
    try:
        with connect(f"{url}/api/ws?token={USER}", max_size=2**24, open_timeout=10) as conn:
            while not stop.is_set():
                try:
                    raw = conn.recv(timeout=0.5)
                except TimeoutError:
                    continue
                frame = json.loads(raw)
                for item in frame["events"] if frame.get("type") == "batch" else [frame]:
                    if item.get("type") == "event":
                        seen.add(item)
                    elif item.get("type") == "welcome":
                        seen.live = True
                    elif item.get("type") in ("error", "reset"):
                        seen.ended = f"ws {item}"
    except (ConnectionClosed, OSError) as exc:
        seen.ended = f"ws closed: {exc!r}"


def sse_lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """Lines as an EventSource splits them: at CR, LF or CRLF only (a data line may hold
    U+2028 or U+0085, which `str.splitlines` would split at)."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            yield line.decode()


def run_sse(url: str, seen: Seen, stop: threading.Event) -> None:
    try:
        with httpx.stream("GET", f"{url}/api/sse", params={"token": USER},
                          timeout=httpx.Timeout(10, read=None)) as response:
            block: dict[str, str] = {}
            for line in sse_lines(response.iter_bytes()):
                if stop.is_set():
                    return
                if line == "":
                    if block.get("event") == "welcome":
                        seen.live = True
                    if "id" in block and block.get("event") not in (None, "welcome", "reset"):
                        seen.add({"id": block["id"], "event": block["event"],
                                  "data": json.loads(block["data"])})
                    block = {}
                elif not line.startswith(":"):
                    key, _, value = line.partition(":")
                    block[key] = block.get(key, "") + value.removeprefix(" ")
        seen.ended = "sse stream ended"
    except httpx.HTTPError as exc:
        seen.ended = f"sse failed: {exc!r}"


def run_poll(url: str, seen: Seen, stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=10) as http:
        after = http.get("/api/events", params={"token": USER, "timeout": "0"}).json()["last_id"]
        seen.live = True
        while not stop.is_set():
            answer = http.get("/api/events", params={"token": USER, "after": after,
                                                     "timeout": "1"})
            if answer.status_code != 200:
                seen.ended = f"poll {answer.status_code}: {answer.text}"
                return
            body = answer.json()
            for event in body["events"]:
                seen.add(event)
            after = body["last_id"]


def guarded(runner: Runner) -> Runner:
    """A client thread that fails records why, so the test fails at once, not by timeout."""
    def run(url: str, seen: Seen, stop: threading.Event) -> None:
        try:
            runner(url, seen, stop)
        except Exception as exc:
            seen.ended = f"client crashed: {exc!r}"
    return run


class Target:
    def __init__(self, redis_server: RedisProcess, proc: DualcastProcess, stream: str) -> None:
        self.proc = proc
        self.stream = stream
        self.redis = redis.Redis.from_url(redis_server.url)  # bytes, as a producer writes
        self.http = httpx.Client(base_url=proc.url, timeout=10)
        self.stop = threading.Event()
        self.clients = {"websocket": Seen(), "sse": Seen(), "polling": Seen()}
        runners = {"websocket": guarded(run_ws), "sse": guarded(run_sse),
                   "polling": guarded(run_poll)}
        self.threads = [threading.Thread(target=runners[name], args=(proc.url if name != "websocket"
                                                                      else proc.ws_url,
                                                                      seen, self.stop),
                                         daemon=True)
                        for name, seen in self.clients.items()]
        for thread in self.threads:
            thread.start()
        self.sent = 0
        self.canary_ids: set[str] = set()
        wait_until(lambda: all(s.live or s.ended for s in self.clients.values()), timeout=15,
                   what="every client to be welcomed")
        # every client is live once each has the first canary
        self.canary()

    def canary(self) -> str:
        self.sent += 1
        n = self.sent
        entry_id = self.redis.xadd(self.stream, {
            b"data": json.dumps({"event": "canary", "data": {"n": n}}).encode()}).decode()
        self.canary_ids.add(entry_id)
        wait_until(lambda: all(n in s.canaries or s.ended for s in self.clients.values()),
                   timeout=15, what=f"canary {n} on every transport")
        for name, seen in self.clients.items():
            assert seen.ended is None, f"{name}: {seen.ended}"
        return entry_id

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(5)
        self.http.close()
        self.redis.close()


@pytest.fixture(scope="module")
def target(redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[Target]:
    stream = f"fuzz-entries-{uuid.uuid4().hex[:8]}"
    proc = DualcastProcess(tmp_path_factory.mktemp("fuzz-entries"), redis_url=redis_server.url,
                           env={"DUALCAST_SECRET": SECRET, "DUALCAST_STREAM": stream,
                                "DUALCAST_BLOCK_MS": "200", "DUALCAST_POLL_TIMEOUT_MAX": "2"})
    proc.start()
    t = Target(redis_server, proc, stream)
    yield t
    t.stop.set()
    proc.stop()  # ends the streams the client threads are blocked reading
    t.close()


# --- strategies ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=10,
)


def deep(depth: int, leaf: str) -> str:
    return "[" * depth + leaf + "]" * depth


#: JSON text that decodes but may not encode again, or must not be trusted as it reads.
hostile_json = st.one_of(
    st.integers(240, 400).map(lambda d: deep(d, "1")),
    st.integers(240, 400).map(lambda d: '{"a":' * d + "1" + "}" * d),
    st.sampled_from(['"\\ud800"', '"\\udfff x"', "1e400", "-1e400", "18446744073709551616",
                     "NaN", "Infinity", '"\\u0000"', '"\\u2028"']),
    json_values.map(json.dumps),
)
room_values = st.one_of(
    st.sampled_from(["{}", '""', "null", "false", "0", "[]", '["user-456"]', '["admin"]',
                     '["user-456", 1]', '["bad name"]', '"user-456"', '["user-456\\n"]']),
    hostile_json,
)
event_names = st.one_of(
    st.sampled_from(['"fuzz"', '"x\\nid: 1"', '"x\\r\\ndata: 1"', '""', "7", "null",
                     '"' + "a" * 65 + '"', '"fuzz\\u2028"']),
    st.text(max_size=20).map(json.dumps),
)


def envelope(event: str = '"fuzz"', data: str = "1", rooms: str | None = None) -> bytes:
    return ('{"event":' + event + ',"data":' + data
            + ("" if rooms is None else ',"rooms":' + rooms) + "}").encode()


timestamps = st.one_of(
    st.integers(-(2**70), 2**70).map(lambda n: str(n).encode()),
    st.binary(max_size=12),
    st.sampled_from([b"", b" 5 ", b"1e3", b"1_000", b"\xff", str(2**64).encode()]),
)
#: One branch per check the server makes, so every one is reached in a short run.
entries = st.one_of(
    st.builds(lambda d: {b"data": envelope(data=d)}, hostile_json),
    st.builds(lambda r: {b"data": envelope(rooms=r)}, room_values),
    st.builds(lambda e: {b"data": envelope(event=e)}, event_names),
    st.builds(lambda t: {b"data": envelope(), b"timestamp": t}, timestamps),
    st.builds(lambda e, d, r: {b"data": envelope(e, d, r)}, event_names, hostile_json,
              st.none() | room_values),
    st.builds(lambda b: {b"data": b}, st.binary(max_size=120)),
    st.just({b"data": b'{"event":"fuzz","data":"\xff\xfe"}'}),
    st.dictionaries(st.binary(min_size=1, max_size=10), st.binary(max_size=40), min_size=1,
                    max_size=3),
)


@FUZZ
@given(fields=entries)
# The cases of issue 15, always run first: each stopped delivery or leaked before.
@example(fields={b"data": b'{"event":"x","data":"caf\xe9"}'})
@example(fields={b"data": envelope(data=deep(254, "1"))})
@example(fields={b"data": envelope(data='"\\ud800"')})
@example(fields={b"data": envelope(), b"timestamp": str(2**64).encode()})
@example(fields={b"data": envelope(data='{"secret":1}', rooms="{}")})
@example(fields={b"data": envelope(data='{"secret":1}', rooms="false")})
@example(fields={b"data": envelope(event='"x\\nid: 1\\nevent: forged"')})
def test_no_stream_entry_stops_delivery_on_any_transport(
    target: Target, fields: dict[bytes, bytes],
) -> None:
    target.redis.xadd(target.stream, fields)  # type: ignore[arg-type]
    last = target.canary()
    # The same events everywhere: an entry is delivered on every transport or on none.
    ws, sse, poll = (s.others(target.canary_ids) for s in target.clients.values())
    assert ws == sse == poll, (ws, sse, poll)
    ready = target.http.get("/readyz")
    assert ready.status_code == 200, ready.text
    # Replay from `0` gets past every entry to the canary.
    replay = target.http.get("/api/events", params={"token": USER, "after": "0",
                                                    "timeout": "0"})
    assert replay.status_code == 200, replay.text
    with connect(f"{target.proc.ws_url}/api/ws?token={USER}&last_event_id=0",
                 max_size=2**24, open_timeout=10) as conn:
        ids: list[str] = []
        while last not in ids:
            frame = json.loads(conn.recv(timeout=10))
            assert frame.get("type") in ("welcome", "event", "batch"), frame
            ids += [e["id"] for e in (frame["events"] if frame["type"] == "batch" else [frame])
                    if e.get("type") == "event"]


def test_zz_nothing_crashed(target: Target) -> None:
    """Runs last in the module: no traceback in the log, the clients are still connected."""
    target.canary()
    log = target.proc.log()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]
    # The fuzz did reach the skipping path (a fuzz of only good entries proves nothing).
    metrics = target.http.get("/metrics").text
    skipped = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("dualcast_malformed_entries_total{")}
    print("skipped by reason:", skipped)
    assert sum(skipped.values()) >= 5, skipped
