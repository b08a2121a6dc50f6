"""The least a process can pay to hear of each event: the floor under a second worker.

`python -m bench.wakefloor [--rate 100] [--duration 15] [--repeat 3] [--size 600]`

With `--workers N` every worker reads every event from Redis, so at low rates each
event wakes every worker once. This measures what such a wake-up costs with no work
in it: a child process on uvloop holds one loopback TCP connection; the parent writes
`--size` bytes on it `--rate` times a second (an XREAD reply of one event is about
that size). Modes, interleaved per repeat:

- `bare`: the child's protocol takes the bytes and does nothing;
- `answer`: it also writes 60 bytes back (what the consumer does: the next XREAD).

Prints one JSON line per run and the medians of µs of the child's CPU (on-CPU time,
from /proc/<pid>/schedstat) per message. Compare with `python -m bench.readcost` (a whole
dualcast worker with no subscriber) and with one worker's CPU per event in
`python -m bench workers`: `--workers 2` can cost less than 10 % more per delivery
only if this floor is under a tenth of one worker's cost per event.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import time
from multiprocessing.connection import Connection

from bench.report import interleaved

_ANSWER = b"*8\r\n" + b"$5\r\nXREAD\r\n" * 7  # 60 bytes, the size of the next XREAD


def _child(sock: socket.socket, mode: str, ready: Connection) -> None:
    import uvloop

    class Taker(asyncio.Protocol):
        def __init__(self, done: asyncio.Event) -> None:
            self.done = done

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            if mode == "answer":
                self.transport.write(_ANSWER)  # type: ignore[attr-defined]

        def connection_lost(self, exc: Exception | None) -> None:
            self.done.set()

    async def main() -> None:
        done = asyncio.Event()
        await asyncio.get_running_loop().connect_accepted_socket(lambda: Taker(done), sock)
        ready.send("ready")
        await done.wait()

    uvloop.run(main())


def _on_cpu(pid: int) -> float:
    """Seconds the process has run, to the nanosecond (/proc's CPU times count ticks of
    10 ms: a few per run here)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def one_run(mode: str, rate: float, duration: float, size: int) -> dict[str, object]:
    # loopback TCP, as a worker's line to Redis
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    sender = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    listener.close()
    parent_end, child_end = multiprocessing.Pipe()
    proc = multiprocessing.get_context("fork").Process(
        target=_child, args=(accepted, mode, child_end), daemon=True)
    proc.start()
    accepted.close()
    try:
        parent_end.recv()
        time.sleep(1.0)  # past start-up
        sender.setblocking(False)
        payload = b"x" * size
        t0 = _on_cpu(proc.pid)
        sent = 0
        start = time.monotonic()
        while (due := start + sent / rate) < start + duration:
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            sender.send(payload)
            sent += 1
            try:
                while sender.recv(65536):
                    pass
            except BlockingIOError:
                pass
        time.sleep(0.2)
        t1 = _on_cpu(proc.pid)
    finally:
        sender.close()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    cpu = t1 - t0
    return {"mode": mode, "rate": rate, "sent": sent, "child_cpu_s": round(cpu, 3),
            "us_per_message": round(1e6 * cpu / sent, 1)}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.wakefloor", description=__doc__)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--size", type=int, default=600)
    args = p.parse_args()
    interleaved(["bare", "answer"], args.repeat,
                lambda mode: one_run(mode, args.rate, args.duration, args.size),
                "us_per_message", "us of CPU per message")

if __name__ == "__main__":
    main()
