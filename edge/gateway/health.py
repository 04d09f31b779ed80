"""Deployment health: failures take a deployment out of rotation, probes bring it back.

Imports: stdlib, httpx (exception classes), adapters, edge.gateway. Passive: a connection failure,
a timeout or a 5xx before the first byte takes the deployment out for a cool-down that doubles with
each consecutive failure (up to `COOLDOWN_S_MAX`). Active: every `interval_s` each deployment is
probed (vLLM's /health, Ollama's /api/tags, OpenAI-compatible /models); an answer brings it back at
once, a failure takes it out — unless the deployment answered a request within the last interval: a
probe that a busy server answers late is no evidence that it is down (its real failures take it out
passively). Probes go through their own small connection pool, so that a pool full of streams can
neither delay nor fail them. When every deployment of a model is out, all are tried anyway: a guess
beats a certain refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import httpx

from adapters.backends.http1 import Http1Client
from domain.catalog import BackendKind
from edge.gateway.catalog import Catalog, Route

log = logging.getLogger(__name__)

COOLDOWN_S_MIN = 1.0
COOLDOWN_S_MAX = 60.0
PROBE_TIMEOUT_S = 2.0
HEALTH_INTERVAL_S = 10.0
PROBE_CONNECTIONS_MAX = 32


def mark_failed(route: Route) -> None:
    route.failures += 1
    cooldown = min(COOLDOWN_S_MAX, COOLDOWN_S_MIN * 2 ** (route.failures - 1))
    route.out_until = time.monotonic() + cooldown
    if route.failures == 1:
        log.warning("deployment %s (%s) failed: out of rotation for %.0f s", route.name, route.base_url, cooldown)


def mark_healthy(route: Route) -> None:
    route.answered_at = time.monotonic()
    if route.failures:
        log.info("deployment %s (%s) is back in rotation", route.name, route.base_url)
    route.failures = 0
    route.out_until = 0.0


def probe_url(route: Route) -> str:
    if route.backend is BackendKind.OLLAMA:
        return route.base_url + "/api/tags"
    if route.backend is BackendKind.VLLM:
        return route.base_url.removesuffix("/v1") + "/health"
    return route.base_url + "/models"


async def probe(client: Http1Client, route: Route) -> bool:
    timeout = httpx.Timeout(PROBE_TIMEOUT_S)
    headers = {"authorization": f"Bearer {c}"} if (c := route.credential()) else {}
    request = client.build_request("GET", probe_url(route), content=b"", headers=headers, timeout=timeout)
    try:
        response = await client.send(request)
        async for _ in response.aiter_raw():
            pass
        await response.aclose()
    except httpx.HTTPError:
        return False
    return response.status_code < 500


def probe_client() -> Http1Client:
    return Http1Client(connections_max=PROBE_CONNECTIONS_MAX)


async def watch(catalog: Catalog, client: Http1Client, stop: asyncio.Event,
                interval_s: float = HEALTH_INTERVAL_S) -> None:
    """Probe every deployment every `interval_s` until `stop` (`client`: the probes' own, see `probe_client`)."""
    while not stop.is_set():
        routes = [r for m in catalog.models.values() for r in m.routes]
        started = time.monotonic()
        results = await asyncio.gather(*(probe(client, r) for r in routes))
        for route, ok in zip(routes, results, strict=True):
            if ok:
                mark_healthy(route)
            elif started - route.answered_at > interval_s:
                mark_failed(route)
            else:
                log.info("deployment %s: probe failed, but it answered %.1f s ago; kept in rotation",
                         route.name, time.monotonic() - route.answered_at)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
