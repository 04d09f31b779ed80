"""Reconciliation: the read models against the event log they were built from.

Imports: stdlib, asyncpg, domain, projections. In one REPEATABLE READ snapshot, the log is folded
afresh, up to the position the read models have reached, into the figures the read models claim:
each project's grants, corrections and charges (so its balance), each key's consumption, every
hourly rollup, and the ledger's rows. Any figure that differs is reported, with both values.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg
from eventsourcing.persistence import Mapper, StoredEvent

from domain.project import Project
from domain.transcodings import make_transcoder
from domain.usage import UsageBatch
from projections.base import SCHEMA
from projections.follower import EVENTS_TABLE
from projections.usage_fold import (
    HOUR_MS,
    I_CACHED,
    I_COMPLETION,
    I_COST,
    I_KEY,
    I_MODEL,
    I_PROJECT,
    I_PROMPT,
    I_STARTED,
    hour_start,
)

PAGE_EVENTS = 256
DIFFERENCES_MAX = 1_000  # a broken read model differs everywhere: the first thousand say enough
TIMEOUT_S = 600.0


@dataclass
class Reconciliation:
    position: int
    projects: int = 0
    usage_entries: int = 0
    differences: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.differences


@dataclass
class _Fold:
    """What the log says, keyed as the read models key it."""

    balances: dict[UUID, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0] * 6))
    keys: dict[UUID, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0] * 4))
    rollups: dict[tuple[UUID, UUID, str, Any], list[int]] = field(default_factory=lambda: defaultdict(lambda: [0] * 5))
    ledger: dict[UUID, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0] * 2))
    entries: int = 0

    def add(self, event: Any) -> None:
        if isinstance(event, Project.Created):
            self.balances.setdefault(event.originator_id, [0] * 6)  # no money yet, but a balance row all the same
        elif isinstance(event, Project.CreditsGranted):
            self.balances[event.originator_id][0] += event.amount_credits
        elif isinstance(event, Project.CreditsCorrected):
            self.balances[event.originator_id][1] += event.amount_credits
        elif isinstance(event, UsageBatch.Recorded):
            for r in event.rows:
                project, key = UUID(r[I_PROJECT]), UUID(r[I_KEY])
                b = self.balances[project]
                b[2] += r[I_COST]
                b[3] += 1
                b[4] += r[I_PROMPT]
                b[5] += r[I_COMPLETION]
                k = self.keys[key]
                k[0] += 1
                k[1] += r[I_PROMPT]
                k[2] += r[I_COMPLETION]
                k[3] += r[I_COST]
                u = self.rollups[(project, key, r[I_MODEL], hour_start(r[I_STARTED] // HOUR_MS))]
                u[0] += 1
                u[1] += r[I_PROMPT]
                u[2] += r[I_CACHED]
                u[3] += r[I_COMPLETION]
                u[4] += r[I_COST]
                lg = self.ledger[project]
                lg[0] += 1
                lg[1] += r[I_COST]
            self.entries += len(event.rows)


def _compare(result: Reconciliation, check: str, names: tuple[str, ...], log: dict[Any, list[int]],
             read: dict[Any, list[int]], *, row_required: bool = False) -> None:
    zeros = [0] * len(names)
    for key in sorted(log.keys() | read.keys(), key=str):
        shown = "/".join(str(k) for k in key) if isinstance(key, tuple) else str(key)
        want, have = log.get(key, zeros), read.get(key)
        if have is None and row_required:
            result.differences.append({"check": check, "key": shown, "field": "row", "log": "present",
                                       "read_model": "missing"})
            continue
        for name, w, h in zip(names, want, have or zeros, strict=True):
            if w != h and len(result.differences) < DIFFERENCES_MAX:
                result.differences.append({"check": check, "key": shown, "field": name, "log": w, "read_model": h})


async def reconcile(pool: asyncpg.Pool) -> Reconciliation:
    started = time.perf_counter()
    mapper: Mapper[Any] = Mapper(transcoder=make_transcoder())
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        positions = [r["position"] for r in await conn.fetch(f"SELECT position FROM {SCHEMA}.positions")]
        position = min(positions, default=0)
        result = Reconciliation(position=position)
        if positions and max(positions) != position:
            result.differences.append({"check": "positions", "key": "read models", "field": "position",
                                       "log": max(positions), "read_model": position})
        fold, after = _Fold(), 0
        while True:
            rows = await conn.fetch(
                f"SELECT notification_id, originator_id, originator_version, topic, state FROM {EVENTS_TABLE} "
                "WHERE notification_id > $1 AND notification_id <= $2 ORDER BY notification_id LIMIT $3",
                after, position, PAGE_EVENTS, timeout=TIMEOUT_S)
            for r in rows:
                fold.add(mapper.to_domain_event(StoredEvent(r["originator_id"], r["originator_version"], r["topic"],
                                                            bytes(r["state"]))))
            if len(rows) < PAGE_EVENTS:
                break
            after = rows[-1]["notification_id"]
        balances = {r[0]: list(r[1:]) for r in await conn.fetch(
            f"SELECT project_id, granted_credits, corrections_credits, charged_credits, requests, tokens_prompt, "
            f"tokens_completion FROM {SCHEMA}.balances", timeout=TIMEOUT_S)}
        identity = await conn.fetch(
            f"SELECT project_id, remaining_credits, granted_credits + corrections_credits - charged_credits AS sum "
            f"FROM {SCHEMA}.balances "
            "WHERE remaining_credits <> granted_credits + corrections_credits - charged_credits",
            timeout=TIMEOUT_S)
        keys = {r[0]: list(r[1:]) for r in await conn.fetch(
            f"SELECT key_id, requests, tokens_prompt, tokens_completion, cost_credits FROM {SCHEMA}.key_usage",
            timeout=TIMEOUT_S)}
        rollups = {(r[0], r[1], r[2], r[3]): list(r[4:]) for r in await conn.fetch(
            f"SELECT project_id, key_id, model, hour, requests, tokens_prompt, tokens_prompt_cached, "
            f"tokens_completion, cost_credits FROM {SCHEMA}.usage_rollups", timeout=TIMEOUT_S)}
        ledger = {r[0]: list(r[1:]) for r in await conn.fetch(
            f"SELECT project_id, count(*), sum(cost_credits)::bigint FROM {SCHEMA}.ledger_usage GROUP BY project_id",
            timeout=TIMEOUT_S)}
        ledger_credits = {r[0]: list(r[1:]) for r in await conn.fetch(
            f"SELECT project_id, coalesce(sum(amount_credits) FILTER (WHERE kind = 'grant'), 0)::bigint, "
            f"coalesce(sum(amount_credits) FILTER (WHERE kind = 'correction'), 0)::bigint "
            f"FROM {SCHEMA}.ledger_credits GROUP BY project_id", timeout=TIMEOUT_S)}
    result.projects, result.usage_entries = len(fold.balances), fold.entries
    _compare(result, "balances", ("granted", "corrections", "charged", "requests", "tokens_prompt",
                                  "tokens_completion"), fold.balances, balances, row_required=True)
    for r in identity:
        result.differences.append({"check": "balance identity", "key": str(r[0]), "field": "remaining",
                                   "log": r[2], "read_model": r[1]})
    _compare(result, "key_usage", ("requests", "tokens_prompt", "tokens_completion", "cost"), fold.keys, keys)
    _compare(result, "usage_rollups", ("requests", "tokens_prompt", "tokens_prompt_cached", "tokens_completion",
                                       "cost"), fold.rollups, rollups)
    _compare(result, "ledger_usage", ("entries", "cost"), fold.ledger, ledger)
    _compare(result, "ledger_credits", ("granted", "corrections"),
             {p: b[:2] for p, b in fold.balances.items() if any(b[:2])}, ledger_credits)
    result.elapsed_s = time.perf_counter() - started
    return result
