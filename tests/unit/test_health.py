"""Deployment health against a real loopback server: a failed probe takes a deployment out only when it
has not answered a request within the interval, and probes never wait on the request pool."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from adapters.backends.http1 import Http1Client
from domain.catalog import BackendKind
from edge.gateway import health
from edge.gateway.catalog import Route

INTERVAL_S = 0.2


async def _server(status: int, delay_s: float = 0.0) -> tuple[asyncio.Server, int]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        await asyncio.sleep(delay_s)
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}".encode())
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _route(port: int) -> Route:
    return Route("d", BackendKind.OPENAI, f"http://127.0.0.1:{port}/v1", "m", None, 1, 5.0)


async def _one_round(route: Route, client: Any) -> None:
    catalog: Any = SimpleNamespace(models={"m": SimpleNamespace(routes=[route])})
    stop = asyncio.Event()
    task = asyncio.create_task(health.watch(catalog, client, stop, INTERVAL_S))
    await asyncio.sleep(INTERVAL_S / 2)  # the first round is done; the next starts after the interval
    stop.set()
    await task


async def test_a_failed_probe_takes_out_a_deployment_that_has_not_answered_lately() -> None:
    server, port = await _server(503)
    client = health.probe_client()
    try:
        route = _route(port)
        route.answered_at = time.monotonic() - 10 * INTERVAL_S
        await _one_round(route, client)
        assert not route.in_rotation(time.monotonic()) and route.failures == 1
    finally:
        await client.aclose()
        server.close()


async def test_a_failed_probe_keeps_a_deployment_that_just_answered_a_request() -> None:
    server, port = await _server(503)
    client = health.probe_client()
    try:
        route = _route(port)
        health.mark_healthy(route)  # what the gateway does when the deployment answers a request
        await _one_round(route, client)
        assert route.in_rotation(time.monotonic()) and route.failures == 0
    finally:
        await client.aclose()
        server.close()


async def test_probes_do_not_wait_on_a_full_request_pool() -> None:
    """Every connection of the request pool busy with a slow answer: the probes' own pool still probes."""
    slow, slow_port = await _server(200, delay_s=5.0)
    fast, fast_port = await _server(200)
    requests = Http1Client(connections_max=2, pool_timeout_s=0.2)  # as make_client's, only smaller
    probes = health.probe_client()
    hold = [asyncio.create_task(health.probe(requests, _route(slow_port))) for _ in range(2)]
    try:
        await asyncio.sleep(0.1)
        assert not await health.probe(requests, _route(fast_port))  # the request pool is full: PoolTimeout
        assert await health.probe(probes, _route(fast_port))
    finally:
        for task in hold:
            task.cancel()
        await asyncio.gather(*hold, return_exceptions=True)
        await requests.aclose()
        await probes.aclose()
        slow.close()
        fast.close()
