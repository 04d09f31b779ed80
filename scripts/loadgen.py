"""A closed-loop HTTP/1.1 load generator for `scripts/bench_gateway.py`: asyncio protocols on raw
keep-alive sockets (under uvloop when installed), one request in flight per connection.

Not a module of the service. Cheaper per request than any HTTP client library (one prebuilt request
written per round trip, the response parsed only as far as framing needs: status line, Content-Length
or chunked encoding), so one core drives a Python ASGI upstream and a gateway harder than they can
answer; `bench_gateway.py` measures its ceiling and CPU per request and reports them.

    run_phase(host, port, request, concurrency=16, warmup_s=1, duration_s=5, stream=False)

`request` is the complete request (head and body) as bytes. For streams, the time to first token is
taken when the first body bytes carrying an SSE `data:` line arrive, and the tokens of a stream are
its `"content":` fields (every delta the fake upstream sends carries one). Tokens per second count the
tokens *arriving* inside the window (not those of streams finishing in it: streams of equal length
started together finish in bursts, which would quantise the rate). A stream without `data: [DONE]`
counts as incomplete.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

STALL_TIMEOUT_S = 60.0
_CONTENT = b'"content":'
_DONE = b"data: [DONE]"


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class PhaseResult:
    """What one phase measured: everything in the window [warm_end, end], plus totals over the phase."""

    window_s: float
    completed: int = 0  # responses finished inside the window (any status)
    ok: int = 0  # ... with status 200
    tokens: int = 0  # stream deltas that arrived inside the window
    stream_tokens: dict[int, int] = field(default_factory=dict)  # deltas per 200 stream → streams (whole phase)
    latencies: list[float] = field(default_factory=list)  # seconds, status 200 in the window
    ttfts: list[float] = field(default_factory=list)  # seconds, streams with status 200 in the window
    heads: list[float] = field(default_factory=list)  # seconds to the response head, the same streams
    statuses: dict[int, int] = field(default_factory=dict)  # over the whole phase (warm-up and drain too)
    total_ok: int = 0  # 200s over the whole phase: what the gateway must have metered
    errors: int = 0  # connections lost or stalled with a request in flight
    incomplete: int = 0  # streams answered 200 that ended without `data: [DONE]` (whole phase)
    cpu_s: float = 0.0  # this process's CPU time during the window
    samples: dict[str, object] = field(default_factory=dict)  # what the caller's sampler returned

    @property
    def rps(self) -> float:
        return self.ok / self.window_s if self.window_s else 0.0


class _Phase:
    def __init__(self, request: bytes, stream: bool, warm_end: float, end: float) -> None:
        self.request = request
        self.stream = stream
        self.warm_end = warm_end
        self.end = end
        self.result = PhaseResult(window_s=end - warm_end)
        self.running = True
        self.open = 0
        self.drained = asyncio.get_running_loop().create_future()

    def done(self, status: int, started: float, head: float, first: float | None, finished: float, tokens: int,
             complete: bool) -> None:
        r = self.result
        r.statuses[status] = r.statuses.get(status, 0) + 1
        if status == 200:
            r.total_ok += 1
            if self.stream:
                r.stream_tokens[tokens] = r.stream_tokens.get(tokens, 0) + 1
                if not complete:
                    r.incomplete += 1
        if self.warm_end <= finished <= self.end:
            r.completed += 1
            if status == 200:
                r.ok += 1
                r.latencies.append(finished - started)
                if first is not None:
                    r.ttfts.append(first - started)
                    r.heads.append(head - started)

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0 and not self.drained.done():
            self.drained.set_result(None)


class _Client(asyncio.Protocol):
    """One keep-alive connection: send, read the whole response, send again until the phase ends."""

    __slots__ = ("body", "buf", "chunked", "first", "head_at", "head_done", "inflight", "need", "phase",
                 "started", "status", "transport")

    def __init__(self, phase: _Phase) -> None:
        self.phase = phase
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.body = bytearray()
        self.head_done = False
        self.inflight = False
        self.chunked = False
        self.need = 0
        self.status = 0
        self.started = self.head_at = 0.0
        self.first: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        self.buf.clear()
        self.body.clear()
        self.head_done = False
        self.first = None
        self.inflight = True
        self.started = time.perf_counter()
        assert self.transport is not None
        self.transport.write(self.phase.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            self.status = int(head[9:12])
            self.chunked = b"transfer-encoding: chunked" in head
            if not self.chunked:
                at = head.find(b"content-length:")
                eol = head.find(b"\r\n", at)
                self.need = 0 if at < 0 else int(head[at + 15: eol if eol >= 0 else len(head)])
            del buf[: end + 4]
            self.head_done = True
            self.head_at = time.perf_counter()
        if self.chunked:
            self._chunks()
        elif len(buf) >= self.need:
            self._finish(0, True)

    def _chunks(self) -> None:
        buf = self.buf
        while True:
            eol = buf.find(b"\r\n")
            if eol < 0:
                return
            size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
            if size == 0:
                if len(buf) < eol + 4:  # the empty trailer's CRLF
                    return
                self._finish(self.body.count(_CONTENT), _DONE in self.body)
                return
            if len(buf) < eol + 2 + size + 2:
                return
            chunk = buf[eol + 2: eol + 2 + size]
            if self.first is None and b"data:" in chunk:
                self.first = time.perf_counter()
            phase = self.phase
            if phase.stream and phase.warm_end <= time.perf_counter() <= phase.end:
                phase.result.tokens += chunk.count(_CONTENT)
            self.body += chunk
            del buf[: eol + 2 + size + 2]

    def _finish(self, tokens: int, complete: bool) -> None:
        phase = self.phase
        self.inflight = False
        phase.done(self.status, self.started, self.head_at, self.first, time.perf_counter(), tokens, complete)
        if phase.running:
            self.send()
        else:
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inflight:
            self.phase.result.errors += 1  # lost with a request in flight
        self.phase.closed()


async def run_phase(host: str, port: int, request: bytes, *, concurrency: int, warmup_s: float, duration_s: float,
                    stream: bool = False, sampler: Callable[[str], object] | None = None) -> PhaseResult:
    """Keep `concurrency` requests in flight for warmup_s + duration_s, then let the last ones finish.

    `sampler("start")` and `sampler("end")` run at the window's edges (e.g. to read other processes'
    CPU counters); what they return is stored in `result.samples`.
    """
    loop = asyncio.get_running_loop()
    now = time.perf_counter()
    phase = _Phase(request, stream, now + warmup_s, now + warmup_s + duration_s)
    clients = []
    for _ in range(concurrency):
        _, client = await loop.create_connection(lambda: _Client(phase), host, port)
        clients.append(client)
        phase.open += 1
    cpu = [0.0]

    def edge(name: str) -> None:
        if name == "start":
            cpu[0] = time.process_time()
        else:
            phase.result.cpu_s = time.process_time() - cpu[0]
        if sampler is not None:
            phase.result.samples[name] = sampler(name)

    loop.call_later(max(0.0, phase.warm_end - time.perf_counter()), edge, "start")
    loop.call_later(max(0.0, phase.end - time.perf_counter()), edge, "end")
    await asyncio.sleep(max(0.0, phase.end - time.perf_counter()))
    phase.running = False
    try:
        await asyncio.wait_for(asyncio.shield(phase.drained), STALL_TIMEOUT_S)
    except TimeoutError:
        for client in clients:
            if client.transport is not None and not client.transport.is_closing():
                client.transport.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(phase.drained, 5)
    return phase.result


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (it is, with uvicorn[standard]), else asyncio's."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
