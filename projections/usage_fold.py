"""Pure folds of usage rows into additive deltas, shared by the usage read models.

Imports: stdlib, domain. Rows are folded as flat lists (see `domain.usage.ROW_FIELDS`) without
building objects: a rebuild folds millions of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from domain.usage import ROW_FIELDS, UsageBatch
from projections.base import Logged

HOUR_MS = 3_600_000
(I_REQUEST, I_PROJECT, I_KEY, I_MODEL, I_DEPLOYMENT, I_PROMPT, I_CACHED, I_COMPLETION, I_COST,
 I_STARTED, I_FINISHED, I_ESTIMATED, I_PRICE_PROMPT, I_PRICE_COMPLETION, I_PRICE_CACHED) = range(len(ROW_FIELDS))


def usage_rows(page: Sequence[Logged]) -> Iterable[list[Any]]:
    for logged in page:
        if isinstance(logged.event, UsageBatch.Recorded):
            yield from logged.event.rows


def rollup_totals(page: Sequence[Logged]) -> dict[tuple[str, str, str, int], list[int]]:
    """Totals [requests, prompt, cached, completion, cost, estimated] per (project hex, key hex, model,
    hour index) of the page's usage rows; folded once per `Page` and shared by the usage read models."""
    memo = getattr(page, "memo", None)
    if memo is not None and "usage_rollups" in memo:
        return memo["usage_rollups"]  # type: ignore[no-any-return]
    totals: dict[tuple[str, str, str, int], list[int]] = {}
    get = totals.get
    for r in usage_rows(page):
        k = (r[I_PROJECT], r[I_KEY], r[I_MODEL], r[I_STARTED] // HOUR_MS)
        t = get(k)
        if t is None:
            totals[k] = [1, r[I_PROMPT], r[I_CACHED], r[I_COMPLETION], r[I_COST], 1 if r[I_ESTIMATED] else 0]
        else:
            t[0] += 1
            t[1] += r[I_PROMPT]
            t[2] += r[I_CACHED]
            t[3] += r[I_COMPLETION]
            t[4] += r[I_COST]
            if r[I_ESTIMATED]:
                t[5] += 1
    if memo is not None:
        memo["usage_rollups"] = totals
    return totals


def totals_by(page: Sequence[Logged], key_of: str) -> dict[Any, list[int]]:
    """`rollup_totals` summed up per project (`project`: project hex) or per key (`key`: (key hex, project hex))."""
    out: dict[Any, list[int]] = {}
    for (project, key, _model, _hour), t in rollup_totals(page).items():
        k: object = project if key_of == "project" else (key, project)
        o = out.get(k)
        if o is None:
            out[k] = list(t)
        else:
            for i in range(6):
                o[i] += t[i]
    return out


def as_uuid(hex_id: object) -> UUID:
    return UUID(str(hex_id))


def hour_start(hour_index: int) -> datetime:
    return datetime.fromtimestamp(hour_index * HOUR_MS / 1000, tz=UTC)
