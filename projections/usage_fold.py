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
 I_STARTED, I_FINISHED, I_ESTIMATED) = range(len(ROW_FIELDS))


def usage_rows(page: Sequence[Logged]) -> Iterable[list[Any]]:
    for logged in page:
        if isinstance(logged.event, UsageBatch.Recorded):
            yield from logged.event.rows


def sum_by(rows: Iterable[list[Any]], key_of: str) -> dict[Any, list[int]]:
    """Totals [requests, prompt, cached, completion, cost, estimated] per key (`project`, `key`, `rollup`)."""
    totals: dict[Any, list[int]] = {}
    for r in rows:
        if key_of == "project":
            k: object = r[I_PROJECT]
        elif key_of == "key":
            k = (r[I_KEY], r[I_PROJECT])
        else:
            k = (r[I_PROJECT], r[I_KEY], r[I_MODEL], r[I_STARTED] // HOUR_MS)
        t = totals.get(k)
        if t is None:
            t = totals[k] = [0, 0, 0, 0, 0, 0]
        t[0] += 1
        t[1] += r[I_PROMPT]
        t[2] += r[I_CACHED]
        t[3] += r[I_COMPLETION]
        t[4] += r[I_COST]
        t[5] += 1 if r[I_ESTIMATED] else 0
    return totals


def as_uuid(hex_id: object) -> UUID:
    return UUID(str(hex_id))


def hour_start(hour_index: int) -> datetime:
    return datetime.fromtimestamp(hour_index * HOUR_MS / 1000, tz=UTC)
