"""A lean HTTP/1.1 client for the upstream hop: asyncio protocols, httptools parsing, keep-alive pools.

Imports: stdlib, httptools, httpx (exception classes only). The gateway needs one thing from an HTTP
client: POST a small body and stream the answer back. httpx costs ~1.2-1.7 ms of CPU per call on this
path (it checks every pooled connection on each request); this client costs ~20-80 µs, which took the
gateway from ~1,760 to ~420 µs per request in `scripts/bench_gateway.py`. It raises httpx's
exception classes, so callers handle failures the same way, and keeps httpx's build/send/aclose shape.
Connections are reused last-in-first-out per (scheme, host, port); a kept-alive connection that the
server closed meanwhile is retried once on a fresh one, and only if it produced no byte.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Any, Protocol
from urllib.parse import urlsplit

import httptools
import httpx

BUFFER_BYTES_HIGH = 1 << 20  # stop reading from the upstream while this much waits for the client
CONNECTIONS_MAX = 1_000
KEEPALIVE_PER_HOST_MAX = 200
POOL_TIMEOUT_S = 10.0

Origin = tuple[str, str, int]  # scheme, host, port


class UpstreamResponse(Protocol):
    """What the gateway reads from any upstream answer (this module's, or a translating adapter's)."""

    status_code: int

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Request:
    __slots__ = ("connect_timeout_s", "data", "origin", "read_timeout_s")

    def __init__(self, origin: Origin, data: bytes, connect_timeout_s: float, read_timeout_s: float) -> None:
        self.origin, self.data = origin, data
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; answers are parsed as they arrive into `chunks`."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.reset()

    def reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.keep_alive = False
        self.framed = False  # content-length or chunked; otherwise the body ends when the connection does
        self.headers_done = self.complete = self.paused = self.got_bytes = False
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.error: httpx.TransportError | None = None
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.error = httpx.RemoteProtocolError(f"malformed answer from the upstream: {e}")
            self._close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:  # a pending timer would keep this connection alive until it fires
            self.timer.cancel()
            self.timer = None
        if self.headers_done and not self.framed and self.error is None:
            self.complete = True  # a body delimited by the end of the connection
        elif not self.complete and self.error is None:
            self.error = httpx.ReadError(str(exc) if exc else "the upstream closed the connection")
        self._wake()

    def on_header(self, name: bytes, _value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        if self.status in {204, 304}:
            self.framed = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > BUFFER_BYTES_HIGH and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def wait(self, timeout_s: float) -> None:
        """Until more arrives, or `timeout_s` of silence (httpx.ReadTimeout).

        A stream waits once per event: rather than a timer per wait (asyncio.timeout schedules and cancels
        one each time), the connection keeps one that, when it fires early, re-arms for the latest deadline."""
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.deadline = loop.time() + timeout_s
        if self.timer is None or self.timer.when() > self.deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = loop.call_at(self.deadline, self._deadline_reached, loop)
        try:
            await self.waiter
        finally:
            self.waiter = None

    def _deadline_reached(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        if self.waiter is None or self.waiter.done():
            return  # not waiting now: the next wait arms its own deadline
        if loop.time() < self.deadline:
            self.timer = loop.call_at(self.deadline, self._deadline_reached, loop)
        else:
            self.waiter.set_exception(httpx.ReadTimeout("the upstream sent nothing within the read timeout"))


class Response:
    __slots__ = ("_client", "_conn", "_done", "read_timeout_s", "status_code")

    def __init__(self, client: Http1Client, conn: _Connection, read_timeout_s: float) -> None:
        self._client, self._conn, self.read_timeout_s = client, conn, read_timeout_s
        self.status_code = conn.status
        self._done = False

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.chunks:
                chunks, conn.chunks, conn.buffered = conn.chunks, [], 0
                if conn.paused and conn.transport is not None:
                    conn.paused = False
                    conn.transport.resume_reading()
                yield chunks[0] if len(chunks) == 1 else b"".join(chunks)
            elif conn.complete:
                return
            elif conn.error is not None:
                raise conn.error
            else:
                await conn.wait(self.read_timeout_s)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._client.release(self._conn)


class Http1Client:
    def __init__(self, *, connections_max: int = CONNECTIONS_MAX, pool_timeout_s: float = POOL_TIMEOUT_S,
                 tls: ssl.SSLContext | None = None) -> None:
        """`tls` verifies https upstreams (default: the system's CAs; SSL_CERT_FILE adds a private CA)."""
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._heads: dict[str, tuple[Origin, bytes]] = {}
        self._slots = asyncio.Semaphore(connections_max)
        self._waiting = 0  # requests waiting for a slot: idle connections are closed for them, not kept
        self._pool_timeout_s = pool_timeout_s
        self._tls = tls or ssl.create_default_context()

    def build_request(self, method: str, url: str, *, content: bytes, headers: dict[str, str],
                      timeout: httpx.Timeout) -> Request:
        cached = self._heads.get(url)
        if cached is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise httpx.UnsupportedProtocol(f"cannot send to {url!r}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            default_port = port == (443 if parts.scheme == "https" else 80)
            host = parts.hostname if default_port else f"{parts.hostname}:{port}"
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            cached = ((parts.scheme, parts.hostname, port), f"{method} {target} HTTP/1.1\r\nhost: {host}\r\n".encode())
            self._heads[url] = cached
        origin, head = cached
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items() if "\r" not in v and "\n" not in v)
        data = head + lines.encode("latin-1") + b"content-length: " + str(len(content)).encode() + b"\r\n\r\n"
        return Request(origin, data + content, timeout.connect or 5.0, timeout.read or 600.0)

    async def send(self, request: Request, *, stream: bool = True) -> Response:
        for attempt in range(2):
            conn = self._checkout(request.origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(request)
            conn.reset()
            assert conn.transport is not None
            conn.transport.write(request.data)
            try:
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(request.read_timeout_s)
            except httpx.TransportError:
                self._discard(conn)
                if reused and not conn.got_bytes and attempt == 0:
                    continue  # the server had closed this idle connection: once more, on a fresh one
                raise
            return Response(self, conn, request.read_timeout_s)
        raise httpx.ReadError("the upstream closed the connection twice")

    def _checkout(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
            self._discard(conn)
        return None

    async def _connect(self, request: Request) -> _Connection:
        scheme, host, port = request.origin
        if self._slots.locked():
            self._evict_idle()  # an idle connection to another upstream is worth less than this request
        self._waiting += 1
        try:
            async with asyncio.timeout(self._pool_timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("too many upstream connections are open") from None
        finally:
            self._waiting -= 1
        loop = asyncio.get_running_loop()
        tls: dict[str, Any] = {"ssl": self._tls, "server_hostname": host} if scheme == "https" else {}
        try:
            async with asyncio.timeout(request.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: _Connection(request.origin), host, port, **tls)
        except TimeoutError:
            self._slots.release()
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except (OSError, ssl.SSLError) as e:
            self._slots.release()
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {e}") from None
        self._open.add(conn)
        return conn

    def release(self, conn: _Connection) -> None:
        """Back to the pool if the answer was read to its end and the server keeps the connection."""
        idle = self._idle.setdefault(conn.origin, [])
        if conn.complete and conn.error is None and conn.keep_alive and not conn.closed \
                and len(idle) < KEEPALIVE_PER_HOST_MAX and not self._waiting:
            conn.chunks = []
            idle.append(conn)
        else:
            self._discard(conn)

    def _evict_idle(self) -> None:
        for idle in self._idle.values():
            if idle:
                self._discard(idle.pop(0))  # the longest idle
                return

    def _discard(self, conn: _Connection) -> None:
        conn._close()
        if conn in self._open:
            self._open.discard(conn)
            self._slots.release()

    async def aclose(self) -> None:
        for conn in list(self._open):
            self._discard(conn)
        self._idle.clear()
