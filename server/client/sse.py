"""A text/event-stream reader: `Lines` cuts the decoded body into lines, `SSEParser`
takes them one at a time.

The WHATWG rules that matter here: `field: value` with one leading space dropped,
`data` lines joined with a newline, a blank line dispatches, `:` starts a comment,
an `id` containing NUL is ignored. Unlike a browser's EventSource, an `id` belongs
to its own message only: dualcast's control messages (welcome, reset, error) carry
none, and must not inherit the last event's. `retry:` is ignored on purpose: the
client decides its own backoff.

A line ends at CR, LF or CRLF and nowhere else: U+2028, U+2029 and U+0085 are legal
unescaped in JSON data, and httpx's `aiter_lines()` (like `str.splitlines()`) would
cut an event's data there.
"""

from __future__ import annotations

from dataclasses import dataclass


class Lines:
    """Splits text chunks into SSE lines; a line cut by a chunk boundary is held back
    until its end arrives. A chunk is one `str.split("\\n")` (plus two replaces when
    it holds a CR, which dualcast does not send): cheaper than httpx's splitter."""

    def __init__(self) -> None:
        #: The pieces of a line not ended yet, joined once its end arrives: adding each
        #: chunk to a string would copy a long line (an event of 50 MB) once per chunk.
        self._pending: list[str] = []
        self._after_cr = False

    def feed(self, chunk: str) -> list[str]:
        """The lines this chunk completes (without their line breaks)."""
        if self._after_cr and chunk.startswith("\n"):
            chunk = chunk[1:]  # the LF of a CRLF the previous chunk ended inside
        self._after_cr = chunk.endswith("\r")
        if not chunk:
            return []
        if "\r" in chunk:
            chunk = chunk.replace("\r\n", "\n").replace("\r", "\n")
        if "\n" not in chunk:
            self._pending.append(chunk)
            return []
        lines = chunk.split("\n")
        if self._pending:
            self._pending.append(lines[0])
            lines[0] = "".join(self._pending)
        self._pending = [lines.pop()]
        return lines


@dataclass(frozen=True, slots=True)
class Message:
    id: str | None
    event: str
    data: str


class SSEParser:
    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self._id: str | None = None
        self._event = ""
        self._data: list[str] = []

    def line(self, line: str) -> Message | None:
        """Take one line (without its line break); returns the message a blank line ends."""
        if line == "":
            message = None
            if self._data or self._event:
                message = Message(self._id, self._event or "message", "\n".join(self._data))
            self._clear()
            return message
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None
