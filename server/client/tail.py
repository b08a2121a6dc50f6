"""`dualcast tail`: watch a dualcast stream from a terminal, with the client's fallback.

stdout carries only events, one JSON object per line (`{"id","event","data","ts"}`),
so it can be piped into `jq` or a file; everything else (transport changes, resets,
the server's errors) goes to stderr. It runs until interrupted; Ctrl-C exits 0, as
does the reader of a pipe going away (`| head -1`), at once, not at the next event.
A refusal that no retry would change (a token, no allowed room, a URL with no
dualcast server behind it) is one line on stderr and exit 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from collections.abc import Callable
from typing import TextIO

from dualcast.client import (
    TRANSPORTS,
    ClientError,
    Event,
    Refused,
    ServerError,
    Status,
    Transport,
    subscribe,
)


def transports_for(choice: str) -> tuple[Transport, ...]:
    """`auto` = all of them, best first; otherwise only the one named."""
    return TRANSPORTS if choice == "auto" else (Transport(choice),)


def when_reader_leaves(out: TextIO, then: Callable[[], object]) -> Callable[[], None]:
    """Call `then` once the reader of `out` is gone, when `out` is a pipe (`| head -1`):
    without this, tail learns it only at its next write, so a quiet stream holds the
    pipeline open. On Linux a pipe's write end reports an error to epoll once its
    reader has closed (and never reports readable before). Returns the undo."""
    loop = asyncio.get_running_loop()
    try:
        fd = out.fileno()
        if sys.platform != "linux" or not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return lambda: None
        loop.add_reader(fd, then)
    except (OSError, ValueError, NotImplementedError):  # no fd, or a loop without readers
        return lambda: None

    def unwatch() -> None:
        loop.remove_reader(fd)

    return unwatch


async def tail(url: str, *, token: str | None, rooms: list[str], last_event_id: str | None,
               transport: str, out: TextIO, err: TextIO, cacert: str | None = None) -> int:
    def said(message: str) -> None:
        print(f"dualcast tail: {message}", file=err, flush=True)

    def on_status(status: Status) -> None:
        # offline: why (nothing listens at that address, ...), or it said nothing useful
        why = f" ({status.reason})" if status.reason else ""
        said(f"{status.transport} {status.state}{why}")

    def on_error(error: ServerError) -> None:
        said(f"server error on {error.transport}: {error.code}: {error.message}")

    main = asyncio.current_task()
    gone = asyncio.Event()

    def reader_left() -> None:
        if gone.is_set():  # epoll repeats the error until the reader is removed: once
            return
        gone.set()
        if main is not None:
            main.cancel()

    unwatch = when_reader_leaves(out, reader_left)
    try:
        async with subscribe(url, token=token, rooms=rooms, last_event_id=last_event_id,
                             transports=transports_for(transport), on_status=on_status,
                             on_error=on_error, tls=cacert) as events:
            async for item in events:
                if isinstance(item, Event):
                    try:
                        out.write(json.dumps(item.as_dict(), ensure_ascii=False,
                                             separators=(",", ":")) + "\n")
                    except UnicodeEncodeError:
                        # stdout's encoding (a Latin-1 locale, PYTHONIOENCODING) cannot
                        # carry this text: the same JSON with \u escapes (nothing was
                        # written: the line is encoded whole before it is buffered).
                        out.write(json.dumps(item.as_dict(), separators=(",", ":")) + "\n")
                    out.flush()
                else:
                    said(f"reset: the cursor is gone; events before {item.last_id} "
                         "may be missing")
    except asyncio.CancelledError:
        if not gone.is_set():
            raise
        raise BrokenPipeError("the reader of stdout is gone") from None  # as a write says
    except ClientError as exc:
        # `--token "$TOKEN"` with TOKEN unset reads anonymously: the refusal named only
        # the room, not that no token was sent
        anonymous = (" (no token was given: pass --token or set DUALCAST_TOKEN; without one "
                     "only public events)"
                     if token is None and isinstance(exc, Refused)
                     and exc.code == "forbidden_room"
                     else "")
        said(f"refused: {exc}{anonymous}")
        return 1
    except ValueError as exc:  # a URL or transport name that cannot be used
        said(str(exc))
        return 2
    finally:
        unwatch()
    return 0


def run(url: str, *, token: str | None, rooms: list[str], last_event_id: str | None,
        transport: str, cacert: str | None = None) -> int:
    """The command's entry point: an interrupt is the normal way out (exit 0)."""
    token = token or os.environ.get("DUALCAST_TOKEN") or None
    if sys.stdout is None:  # started with stdout closed (`>&-`): as a reader gone at once
        return 0
    # With stderr closed (`2>&-`), print(file=None) would write to stdout, among the events.
    err = sys.stderr if sys.stderr is not None else open(os.devnull, "w")
    try:
        return asyncio.run(tail(url, token=token, rooms=rooms, last_event_id=last_event_id,
                                transport=transport, out=sys.stdout, err=err,
                                cacert=cacert))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep the interpreter's
        # final flush of stdout from failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        # stdout refused an event (a full disk): one line, not a traceback, and the
        # interpreter's final flush of what it holds goes nowhere rather than failing again.
        print(f"dualcast tail: cannot write the events: {exc.strerror or exc}", file=err,
              flush=True)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
