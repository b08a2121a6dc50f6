"""uvicorn's websockets-sansio protocol, with two of its handshake paths fixed.

- When websockets refuses an upgrade request while parsing it (a request line
  over 8 KiB: 414; header fields too large: 431; not HTTP at all), it queues its
  answer and waits to be flushed; uvicorn (0.54) never asks for it and never
  closes: the client waited forever and the server kept the socket with no timer
  to end it (one file descriptor per such request, for as long as the client
  liked). Here websockets' answer is written and the connection closed.
- A denial response (`websocket.http.response.*`: our 403 and 503 refusals) is
  the handshake's answer, but uvicorn did not count it as one and logged
  "ASGI callable returned without completing handshake." at error level after
  every refusal (upstream: Kludex/uvicorn#3138). Here it counts: a property,
  not a wrapper around `send`, which would add a coroutine to every frame sent.
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class WebSocketProtocol(WebSocketsSansIOProtocol):
    _handshake_complete = False

    @property
    def handshake_complete(self) -> bool:
        # A denial is complete once its body went out (uvicorn then sets close_sent).
        return self._handshake_complete or (self.initial_response is not None
                                            and self.close_sent)

    @handshake_complete.setter
    def handshake_complete(self, value: bool) -> None:
        self._handshake_complete = value

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if (not self.handshake_initiated and self.conn.handshake_exc is not None
                and not self.transport.is_closing()):
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()
