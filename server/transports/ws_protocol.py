"""uvicorn's websockets-sansio protocol, with the refused handshakes answered.

When websockets refuses an upgrade request while parsing it (a request line over
8 KiB: 414; header fields too large: 431; not HTTP at all), it queues its answer
and waits to be flushed; uvicorn (0.54) never asks for it, and never closes: the
client waited forever and the server kept the socket, with no timer to end it
(one file descriptor per such request, for as long as the client likes). This
subclass writes websockets' answer and closes the connection.
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class WebSocketProtocol(WebSocketsSansIOProtocol):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if (not self.handshake_initiated and self.conn.handshake_exc is not None
                and not self.transport.is_closing()):
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()
