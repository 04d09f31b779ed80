"""The gateway's in-memory model catalog, reloaded within a second of any change.

Imports: stdlib, asyncpg, domain, projections. Deployments are chosen by least in-flight requests,
weights breaking ties (a deployment of weight w counts its in-flight requests divided by w).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from adapters.backends.token_count import Counter
from domain.catalog import BackendKind
from domain.pricing import Prices, price_at
from projections.base import DATABASE_ERRORS, SCHEMA
from projections.models import CHANGE_CHANNEL

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
CREDENTIAL_BYTES_MAX = 16_384


@dataclass
class Load:
    """Requests this process has open on a deployment: shared by every Route object a reload makes of it,
    so a request counts down on the same counter it counted up on."""

    in_flight: int = 0


@dataclass
class Route:
    """A deployment as the gateway uses it; `in_flight` is this process's count."""

    name: str
    backend: BackendKind
    base_url: str
    upstream_model: str
    credential_ref: str | None
    weight: int
    timeout_s: float
    tokenizer: str | None = None
    counter: Counter | None = None  # made at first use by edge.gateway.metering
    load: Load = field(default_factory=Load)
    failures: int = 0
    out_until: float = 0.0  # time.monotonic() until which the deployment is out of rotation
    answered_at: float = 0.0  # time.monotonic() of its last answer, to a request or a probe

    @property
    def in_flight(self) -> int:
        return self.load.in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self.load.in_flight = value

    def in_rotation(self, now: float) -> bool:
        return now >= self.out_until

    def credential(self) -> str | None:
        """Read at use: a rotated secret takes effect without a restart; never logged."""
        ref = self.credential_ref
        if ref is None:
            return None
        if ref.startswith("env:"):
            return os.environ.get(ref[4:]) or None
        with contextlib.suppress(OSError):
            return Path(ref[5:]).read_text()[:CREDENTIAL_BYTES_MAX].strip() or None
        return None


@dataclass
class CatalogModel:
    name: str
    description: str
    created_at: datetime
    routes: list[Route]
    prices: list[Prices] = field(default_factory=list)

    def price_at(self, moment: datetime) -> Prices | None:
        return price_at(self.prices, moment)

    def ranked_routes(self) -> list[Route]:
        """Healthy deployments first, least busy (per weight) first; the ones out of rotation last."""
        now = time.monotonic()
        return sorted(self.routes, key=lambda r: (not r.in_rotation(now), r.in_flight / r.weight, -r.weight))


def _definition(route: Route) -> tuple[object, ...]:
    return (route.backend, route.base_url, route.upstream_model, route.credential_ref, route.weight,
            route.timeout_s, route.tokenizer)


def _model(row: asyncpg.Record, old: CatalogModel | None) -> CatalogModel:
    kept = {r.name: r for r in old.routes} if old else {}
    routes = []
    for d in json.loads(row["deployments"]):
        route = Route(d["name"], BackendKind(d["backend"]), d["base_url"], d["upstream_model"], d["credential_ref"],
                      d["weight"], d["timeout_ms"] / 1000, d.get("tokenizer"))
        before = kept.get(route.name)
        if before is not None and _definition(before) == _definition(route):
            route = before  # the same object: requests in flight count down on the route they counted up on
        elif before is not None:  # changed (weight, URL, …): carry what this process knows of it
            route.load, route.failures = before.load, before.failures
            route.out_until, route.answered_at = before.out_until, before.answered_at
        routes.append(route)
    prices = [Prices(p["prompt_per_mtok"], p["completion_per_mtok"], datetime.fromisoformat(p["effective_at"]),
                     p["cached_prompt_per_mtok"]) for p in json.loads(row["price_schedule"])]
    return CatalogModel(row["name"], row["description"], row["created_at"], routes, prices)


class Catalog:
    def __init__(self, pool: asyncpg.Pool, *, poll_interval_s: float = POLL_INTERVAL_S) -> None:
        self.pool = pool
        self.poll_interval_s = poll_interval_s
        self.models: dict[str, CatalogModel] = {}
        self._stale = asyncio.Event()

    def get(self, name: str) -> CatalogModel | None:
        return self.models.get(name)

    async def load(self) -> None:
        rows = await self.pool.fetch(f"SELECT name, description, created_at, deployments::text, "
                                     f"price_schedule::text FROM {SCHEMA}.models WHERE NOT removed")
        self.models = {r["name"]: _model(r, self.models.get(r["name"])) for r in rows}

    async def follow(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            conn: Any = None
            try:
                conn = await self.pool.acquire()
                await conn.add_listener(CHANGE_CHANNEL, self._on_change)
                await self.load()
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stale.wait(), self.poll_interval_s)
                    self._stale.clear()
                    await self.load()
            except DATABASE_ERRORS:
                log.exception("catalog: reload failed; serving the last catalog")
                await asyncio.sleep(self.poll_interval_s)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.remove_listener(CHANGE_CHANNEL, self._on_change)
                    with contextlib.suppress(*DATABASE_ERRORS):
                        await self.pool.release(conn)

    def _on_change(self, *_: object) -> None:
        self._stale.set()
