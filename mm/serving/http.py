"""HTTP/1.1 for ``mm serve`` with a deadline on reading each request.

uvicorn closes connections idle between requests (``timeout_keep_alive``) but gives a client that
sends its headers or body one byte at a time all the time it wants: a few such clients hold the
server's connections for ever. Here a request's headers and body must have arrived within
``request_timeout_s`` of the connection being made, or of the previous response on a kept-alive
connection; otherwise the server answers ``408 Request Timeout`` (when it has not started a response)
and closes the connection. The timer stops once the whole request is in; answering may take as long
as decoding takes.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["DeadlineH11Protocol", "deadline_protocol"]

_BODY = {
    "error": {
        "message": "the request did not arrive in time (request_timeout_s)",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_timeout",
    }
}


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's arrival (module docstring)."""

    request_timeout_s: float = 30.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline = None
        self._waiting_after = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and cycle is not self._waiting_after and not cycle.more_body:
            self._disarm()  # the whole request (a new cycle, not the one answered before) is in

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own time

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._waiting_after = self.cycle  # the request this timer waits for comes after this cycle
        self._deadline = self.loop.call_later(self.request_timeout_s, self._expired)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or cycle is self._waiting_after or not cycle.response_started:
            body = json.dumps(_BODY).encode()
            head = (
                "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
        self.transport.close()


def deadline_protocol(request_timeout_s: float) -> type[DeadlineH11Protocol]:
    """A :class:`DeadlineH11Protocol` class with this deadline (uvicorn builds one per connection)."""
    return type(
        "DeadlineH11Protocol", (DeadlineH11Protocol,), {"request_timeout_s": float(request_timeout_s)}
    )
