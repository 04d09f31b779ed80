"""Read model `key_usage`: what each key has consumed in total, for usage caps and key lists.

Imports: stdlib, asyncpg, domain.
"""

from __future__ import annotations

from collections.abc import Sequence

from projections.base import SCHEMA, Conn, Logged
from projections.usage_fold import as_uuid, totals_by

_ADD = (
    f"INSERT INTO {SCHEMA}.key_usage AS k SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], "
    "$4::bigint[], $5::bigint[], $6::bigint[]) ON CONFLICT (key_id) DO UPDATE SET "
    "requests = k.requests + excluded.requests, tokens_prompt = k.tokens_prompt + excluded.tokens_prompt, "
    "tokens_completion = k.tokens_completion + excluded.tokens_completion, "
    "cost_credits = k.cost_credits + excluded.cost_credits"
)


class KeyUsageProjection:
    name = "key_usage"
    tables: tuple[str, ...] = ("key_usage",)
    ddl = f"""
    CREATE TABLE IF NOT EXISTS {SCHEMA}.key_usage (
        key_id uuid PRIMARY KEY,
        project_id uuid NOT NULL,
        requests bigint NOT NULL,
        tokens_prompt bigint NOT NULL,
        tokens_completion bigint NOT NULL,
        cost_credits bigint NOT NULL
    );
    """

    async def apply(self, conn: Conn, page: Sequence[Logged]) -> None:
        totals = totals_by(page, "key")
        if not totals:
            return
        rows = [(as_uuid(k), as_uuid(p), t[0], t[1], t[3], t[4]) for (k, p), t in totals.items()]
        await conn.execute(_ADD, *[list(c) for c in zip(*rows, strict=True)])
