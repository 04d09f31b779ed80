"""The lean upstream client against real servers on loopback (plain, TLS, and misbehaving ones)."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from adapters.backends.http1 import Http1Client

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
TIMEOUT = httpx.Timeout(connect=2, read=2, write=2, pool=2)


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


async def _server(handler: Handler, tls: ssl.SSLContext | None = None) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
    return server, server.sockets[0].getsockname()[1]


async def _body(client: Http1Client, url: str, payload: bytes = b"{}") -> tuple[int, bytes]:
    response = await client.send(client.build_request("POST", url, content=payload, headers={}, timeout=TIMEOUT))
    chunks = [chunk async for chunk in response.aiter_raw()]
    await response.aclose()
    return response.status_code, b"".join(chunks)


async def test_keep_alive_reuses_one_connection_and_chunked_bodies_arrive_whole() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                request = await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            body = request.split(b"\r\n\r\n", 1)[1]
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                         + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
            await writer.drain()
    server, port = await _server(handler)
    client = Http1Client()
    for i in range(5):
        assert await _body(client, f"http://127.0.0.1:{port}/v1/x", json.dumps({"i": i}).encode()) == (
            200, json.dumps({"i": i}).encode())
    assert connections == 1
    await client.aclose()
    server.close()


async def test_an_idle_connection_closed_by_the_server_is_retried_once() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # keep-alive advertised, connection closed anyway
    server, port = await _server(handler)
    client = Http1Client()
    for _ in range(3):
        assert await _body(client, f"http://127.0.0.1:{port}/") == (200, b"ok")
    await client.aclose()
    server.close()


async def test_a_body_ended_by_closing_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()
    server, port = await _server(handler)
    client = Http1Client()
    assert await _body(client, f"http://127.0.0.1:{port}/") == (200, b"until the end")
    await client.aclose()
    server.close()


async def test_failures_raise_httpx_exceptions() -> None:
    client = Http1Client()
    with pytest.raises(httpx.ConnectError):
        await _body(client, "http://127.0.0.1:9/")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(5)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.close()
    for handler, error in ((silent, httpx.ReadTimeout), (garbage, httpx.RemoteProtocolError), (cut, httpx.ReadError)):
        server, port = await _server(handler)
        with pytest.raises(error):
            await _body(client, f"http://127.0.0.1:{port}/")
        server.close()
    await client.aclose()


async def test_the_read_timeout_counts_from_the_last_byte_of_a_stream() -> None:
    """A stream that sends a chunk every 0.1 s for a second, then stalls: no timeout while it flows (the
    read timeout, 0.5 s, is shorter than the whole), and one 0.5 s after the last chunk."""
    async def trickle_then_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(10):
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
        await asyncio.sleep(5)
    server, port = await _server(trickle_then_stall)
    client = Http1Client()
    timeout = httpx.Timeout(connect=2, read=0.5, write=2, pool=2)
    response = await client.send(client.build_request("POST", f"http://127.0.0.1:{port}/", content=b"{}",
                                                      headers={}, timeout=timeout))
    loop = asyncio.get_running_loop()
    received, last = b"", loop.time()

    async def read_all() -> None:
        nonlocal received, last
        async for chunk in response.aiter_raw():
            received, last = received + chunk, loop.time()
    with pytest.raises(httpx.ReadTimeout):
        await read_all()
    assert received == b"x" * 10
    assert 0.45 <= loop.time() - last < 1.0
    await response.aclose()
    await client.aclose()
    server.close()


async def test_a_full_pool_never_starves_a_waiting_request_while_connections_sit_idle() -> None:
    """Two slots, two upstreams: requests to the second wait while the first's answers end; the finished
    connections must go to the waiting requests (closed for them), not sit idle holding the slots."""
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            await asyncio.sleep(0.3)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
    first, first_port = await _server(slow)
    second, second_port = await _server(slow)
    client = Http1Client(connections_max=2, pool_timeout_s=1.5)
    answers = await asyncio.gather(*(_body(client, f"http://127.0.0.1:{first_port}/") for _ in range(2)),
                                   *(_body(client, f"http://127.0.0.1:{second_port}/") for _ in range(2)))
    assert answers == [(200, b"ok")] * 4
    # and a pool full of idle connections to one upstream gives way to a request for another
    assert await _body(client, f"http://127.0.0.1:{first_port}/") == (200, b"ok")
    assert await _body(client, f"http://127.0.0.1:{first_port}/") == (200, b"ok")
    assert await _body(client, f"http://127.0.0.1:{second_port}/") == (200, b"ok")
    await client.aclose()
    first.close()
    second.close()


@pytest.fixture
def tls_files(tmp_path: Path) -> AsyncIterator[tuple[Path, Path]]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key  # type: ignore[return-value]


async def test_https_upstreams_are_verified(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecure")
        await writer.drain()
    server, port = await _server(handler, server_tls)
    untrusting = Http1Client()
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await _body(untrusting, f"https://localhost:{port}/")
    trusting = Http1Client(tls=ssl.create_default_context(cafile=str(cert)))
    assert await _body(trusting, f"https://localhost:{port}/") == (200, b"secure")
    await trusting.aclose()
    await untrusting.aclose()
    server.close()
