"""Just enough of WebSocket framing and HTTP/1.1 to read what a server sends, cheaply.

Library clients cost 30-70 us of CPU per delivery; with hundreds of clients in
one process (or a load generator on two shared cores) the client then becomes
the bottleneck. These helpers work on a `bytearray` that grows as bytes arrive.
"""

from __future__ import annotations

import base64
import os
from urllib.parse import quote


def mask_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (FIN set, masked with a random key, as RFC 6455 requires of clients)."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    repeated = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")
    return head + key + masked


def upgrade_request(path: str, host: str, port: int, extra: str = "") -> bytes:
    """A WebSocket opening handshake; `extra` is further header lines, each ending in CRLF."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"{extra}\r\n"
    ).encode()


def get_request(path: str, host: str, port: int, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode()


def header_lines(headers: dict[str, str]) -> str:
    return "".join(f"{name}: {value}\r\n" for name, value in headers.items())


def with_query(path: str, params: dict[str, str | None]) -> str:
    """`path` with the non-None `params` appended as a query string (values quoted)."""
    pairs = [f"{k}={quote(v, safe='')}" for k, v in params.items() if v is not None]
    if not pairs:
        return path
    return path + ("&" if "?" in path else "?") + "&".join(pairs)


class HTTPBody:
    """Incremental HTTP/1.1 response reader: head, then Content-Length, chunked or until close."""

    def __init__(self) -> None:
        self.status = 0
        self.status_line = ""
        self.have_head = False
        self.chunked = False
        self.remaining = -1  # body bytes left (Content-Length mode)
        self.chunk_left = 0  # bytes left in the current chunk, -1 = expecting a size line
        self.done = False

    def head(self, buf: bytearray) -> bool:
        """Consume the head from `buf` when it is complete; False while it is not."""
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(buf[:end]).split(b"\r\n")
        del buf[: end + 4]
        self.status_line = lines[0].decode(errors="replace")
        self.status = int(lines[0].split()[1])
        self.remaining = -1
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
                self.chunk_left = -1
            elif name == b"content-length":
                self.remaining = int(value.strip())
        if self.remaining == 0 and not self.chunked:
            self.done = True
        self.have_head = True
        return True

    def body(self, buf: bytearray) -> bytes:
        """Take the body bytes available in `buf`; sets `done` at the end of the message."""
        if not self.chunked:
            if self.remaining < 0:  # until close
                out = bytes(buf)
                buf.clear()
                return out
            take = min(self.remaining, len(buf))
            out = bytes(buf[:take])
            del buf[:take]
            self.remaining -= take
            if self.remaining == 0:
                self.done = True
            return out
        parts: list[bytes] = []
        while buf:
            if self.chunk_left == -2:  # the CRLF that ends a chunk
                if len(buf) < 2:
                    break
                del buf[:2]
                self.chunk_left = -1
                continue
            if self.chunk_left == -1:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    break
                size = int(bytes(buf[:eol]).split(b";")[0], 16)
                del buf[: eol + 2]
                if size == 0:
                    if len(buf) >= 2:
                        del buf[:2]
                    self.done = True
                    break
                self.chunk_left = size
            take = min(self.chunk_left, len(buf))
            parts.append(bytes(buf[:take]))
            del buf[:take]
            self.chunk_left -= take
            if self.chunk_left == 0:
                self.chunk_left = -2
        return b"".join(parts)
