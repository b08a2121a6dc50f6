"""A text/event-stream parser, fed one line at a time (httpx splits the lines).

The WHATWG rules that matter here: `field: value` with one leading space dropped,
`data` lines joined with a newline, a blank line dispatches, `:` starts a comment,
an `id` containing NUL is ignored. Unlike a browser's EventSource, an `id` belongs
to its own message only: dualcast's control messages (welcome, reset, error) carry
none, and must not inherit the last event's. `retry:` is ignored on purpose: the
client decides its own backoff.
"""

from __future__ import annotations

from dataclasses import dataclass


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
