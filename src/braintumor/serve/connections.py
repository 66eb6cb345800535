"""Slow clients are closed: a deadline for a request's headers and a minimum rate for its body.

uvicorn's ``timeout_keep_alive`` only closes idle connections between requests: a client that sends its header
lines one byte at a time, or its body a few bytes a second, would hold a connection (and its buffers) for ever.
:class:`GuardedH11Protocol` is uvicorn's h11 protocol with one timer per connection that checks the request in
progress (its state as h11 reports it):

- headers: the whole request line and headers must arrive within ``header_timeout`` seconds, counted from the
  connection's start or the end of the previous response;
- body: after a ``body_grace`` period the body must keep up an average of ``min_body_rate`` bytes per second
  (time during which the server itself paused reading does not count);
- a request fully received is the server's own work: no deadline applies.

A slow client gets ``408 Request Timeout`` (when no response has started) and the connection is closed.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_SECONDS = 10.0
BODY_GRACE_SECONDS = 10.0
MIN_BODY_BYTES_PER_SECOND = 16 * 1024
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"connection: close\r\ncontent-length: 28\r\n\r\nrequest sent too slowly; bye")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body deadlines (class attributes; see :func:`guarded_protocol`)."""

    header_timeout = HEADER_TIMEOUT_SECONDS
    body_grace = BODY_GRACE_SECONDS
    min_body_rate = MIN_BODY_BYTES_PER_SECOND
    closed_slow = 0  # connections closed for slowness, over all instances of this class (for tests and logs)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._phase: str | None = "headers"  # h11 starts IDLE: waiting for the first request's headers
        self._phase_start = self.loop.time()
        self._phase_bytes = 0
        self._last_tick = self._phase_start
        tick = max(0.05, min(1.0, self.header_timeout / 4, self.body_grace / 4))
        self._tick_seconds = tick
        self._guard: asyncio.TimerHandle | None = self.loop.call_later(tick, self._check)

    def data_received(self, data: bytes) -> None:
        self._phase_bytes += len(data)
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None
        super().connection_lost(exc)

    def _current_phase(self) -> str | None:
        state = self.conn.their_state
        if state is h11.IDLE:
            return "headers"
        if state is h11.SEND_BODY:
            return "body"
        return None  # the request is complete (the app's work), or the connection is closing

    def _check(self) -> None:
        self._guard = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        phase = self._current_phase()
        if phase != self._phase:
            self._phase, self._phase_start, self._phase_bytes = phase, now, 0
        elif phase == "body" and self.flow.read_paused:
            self._phase_start += now - self._last_tick  # the server stopped reading: not the client's delay
        self._last_tick = now
        elapsed = now - self._phase_start
        too_slow = (phase == "headers" and elapsed > self.header_timeout) or (
            phase == "body" and elapsed > self.body_grace + self._phase_bytes / self.min_body_rate)
        if too_slow:
            self._close_slow(phase)
            return
        self._guard = self.loop.call_later(self._tick_seconds, self._check)

    def _close_slow(self, phase: str) -> None:
        type(self).closed_slow += 1
        # Bytes of an unfinished request (or a body) came in: tell the client why before closing. A connection
        # idle since its last response is closed silently, as a keep-alive timeout would.
        started = phase == "body" and self.cycle is not None and self.cycle.response_started
        if not started and (phase == "body" or self._phase_bytes):
            self.transport.write(_TIMEOUT_RESPONSE)
        self.logger.info("closed a connection from %s: request %s sent too slowly",
                         "%s:%d" % self.client if self.client else "?", phase)
        self.transport.close()


def guarded_protocol(header_timeout: float = HEADER_TIMEOUT_SECONDS, body_grace: float = BODY_GRACE_SECONDS,
                     min_body_rate: float = MIN_BODY_BYTES_PER_SECOND) -> type[GuardedH11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these limits."""
    if header_timeout <= 0 or body_grace <= 0 or min_body_rate <= 0:
        raise ValueError("the slow-client limits must be positive")
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout": float(header_timeout), "body_grace": float(body_grace),
        "min_body_rate": float(min_body_rate), "closed_slow": 0})
