"""uvicorn's HTTP protocol (httptools) with a deadline for receiving each request.

Imports: stdlib, uvicorn, edge. uvicorn has no timeout covering a request's arrival: its keep-alive
timeout only runs between requests and restarts with every byte, so a client that trickles headers
or a body a byte at a time holds a connection, and a task, for as long as it likes (slowloris). Here
every connection and every request gets `request_timeout_s` (LWAPI_REQUEST_TIMEOUT_S) from its
first byte to its last; when it runs out the connection is closed. The deadline stops as soon as the
request has arrived, so a long streamed answer is never cut.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edge.settings import Settings

log = logging.getLogger(__name__)


@functools.cache
def request_timeout_s() -> float:
    # read from the environment, not passed in: uvicorn builds this class itself, in every worker process
    return Settings.from_env().request_timeout_s


class DeadlineHttpToolsProtocol(HttpToolsProtocol):
    # One timer per connection, not one per request: a request sets when it is due, and the timer, when it
    # fires before that, re-arms for it (scheduling and cancelling a timer per request costs the hot path).
    _timer: asyncio.TimerHandle | None = None
    _due: float | None = None  # when the request now arriving must have arrived; None between requests

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_clock()  # a connection that never sends a whole request is closed too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._due is None:  # the next request on a kept-alive connection starts its own clock
            self._start_clock()

    def on_message_complete(self) -> None:
        self._due = None
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._due = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def _start_clock(self) -> None:
        self._due = self.loop.time() + request_timeout_s()
        if self._timer is None:
            self._timer = self.loop.call_at(self._due, self._check)

    def _check(self) -> None:
        self._timer = None
        if self._due is None:
            return  # between requests: the next one arms the timer again
        if self.loop.time() < self._due:
            self._timer = self.loop.call_at(self._due, self._check)
            return
        self._due = None
        if not self.transport.is_closing():
            log.warning("closed a connection from %s: its request took over %.0f s to arrive",
                        self.client[0] if self.client else "?", request_timeout_s())
            self.transport.close()
