"""Connection limits that uvicorn lacks: time limits on a request's headers and body, a cap on connections.

uvicorn's h11 protocol times out only idle keep-alive connections: a connection that sends nothing, part of
its headers, or a body that stops arriving stays open for good (2,000 such connections held 2,011 fds).
`protocol(config)` is uvicorn's h11 protocol with

- a header deadline: from the connection's start (or a request's first byte) until its headers are complete,
  `config.header_timeout` seconds; more bytes do not extend it;
- a body timeout: `config.body_timeout` seconds without a byte while a body is due (reset by every piece,
  so long uploads that keep moving are fine; a paused read is the server's doing and does not count);
- a connection cap: beyond `config.max_connections` open connections a new one is answered 503 at once.

A connection that runs out of time is answered 408 (when no response has started) and closed. A response
sent before its request's body was read (401, 413) closes the connection rather than read the rest. A
request h11 cannot parse (headers over 16 KiB included) gets uvicorn's 400, in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from quill.server.errors import error_body
from quill.server.state import ServerConfig


def _raw_response(status: int, reason: str, message: str, code: str, headers: str = "") -> bytes:
    """A whole HTTP/1.1 error response in OpenAI's error shape, for a connection the app never sees."""
    body = json.dumps(error_body(message, "invalid_request_error" if status < 500 else "server_error",
                                 code=code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{headers}connection: close\r\n\r\n")
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body time limits and a connection cap (module docstring)."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 500

    _timer: asyncio.TimerHandle | None = None
    _timer_for: str | None = None  # "headers" or "body"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(_raw_response(503, "Service Unavailable", f"the server has its maximum of "
                                          f"{self.max_connections} connections open; try again shortly",
                                          "too_many_connections", "retry-after: 1\r\n"))
            transport.close()
            return
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        if self.conn.their_state is h11.SEND_BODY:  # answered before the body was read: do not read the rest
            self._cancel()
            self.transport.close()
            return
        super().on_response_complete()  # arms uvicorn's keep-alive timeout for the idle connection
        self._cancel()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (bad framing, headers over 16 KiB): 400 in the error shape, then close."""
        self._cancel()
        self.transport.write(_raw_response(400, "Bad Request", f"malformed HTTP request: {msg}", "invalid_http"))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    # ---- the deadline --------------------------------------------------------------------------------------

    def _watch(self) -> None:
        """Arm the deadline that the connection's state calls for."""
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE and self.timeout_keep_alive_task is None:  # headers due (not an idle keep-alive)
            if self._timer_for != "headers":
                self._arm("headers", self.header_timeout)
        elif state is h11.SEND_BODY and not (self.cycle is not None and self.cycle.response_complete):
            self._arm("body", self.body_timeout)  # reset by every piece of the body
        else:
            self._cancel()

    def _arm(self, what: str, seconds: float) -> None:
        self._cancel()
        self._timer_for = what
        self._timer = self.loop.call_later(seconds, self._expired)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_for = None

    def _expired(self) -> None:
        what, seconds = self._timer_for, self.header_timeout if self._timer_for == "headers" else self.body_timeout
        self._timer = self._timer_for = None
        if self.transport.is_closing():
            return
        if what == "body" and self.flow.read_paused:  # the app is not reading: not the client's delay
            self._arm("body", self.body_timeout)
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_raw_response(408, "Request Timeout", f"the request's {what} did not arrive "
                                               f"within {seconds:g} seconds", "request_timeout"))
        if self.cycle is not None:  # the app (if reading the body) sees a disconnect
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()


def protocol(config: ServerConfig) -> type[GuardedH11Protocol]:
    """The uvicorn `http` protocol class with `config`'s limits."""
    return type("QuillH11Protocol", (GuardedH11Protocol,), {
        "header_timeout": config.header_timeout, "body_timeout": config.body_timeout,
        "max_connections": config.max_connections})
