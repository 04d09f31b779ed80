"""Read model `usage_rollups`: project × key × model × hour → requests, tokens, cost.

Imports: stdlib, asyncpg, domain.
"""

from __future__ import annotations

from collections.abc import Sequence

from projections.base import SCHEMA, Conn, Logged
from projections.usage_fold import as_uuid, hour_start, rollup_totals

_ADD = (
    f"INSERT INTO {SCHEMA}.usage_rollups AS u SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], "
    "$4::timestamptz[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[]) "
    "ON CONFLICT (project_id, key_id, model, hour) DO UPDATE SET "
    "requests = u.requests + excluded.requests, tokens_prompt = u.tokens_prompt + excluded.tokens_prompt, "
    "tokens_prompt_cached = u.tokens_prompt_cached + excluded.tokens_prompt_cached, "
    "tokens_completion = u.tokens_completion + excluded.tokens_completion, "
    "cost_credits = u.cost_credits + excluded.cost_credits, "
    "estimated_requests = u.estimated_requests + excluded.estimated_requests"
)


class UsageRollupsProjection:
    name = "usage_rollups"
    tables: tuple[str, ...] = ("usage_rollups",)
    ddl = f"""
    CREATE TABLE IF NOT EXISTS {SCHEMA}.usage_rollups (
        project_id uuid NOT NULL,
        key_id uuid NOT NULL,
        model text NOT NULL,
        hour timestamptz NOT NULL,
        requests bigint NOT NULL,
        tokens_prompt bigint NOT NULL,
        tokens_prompt_cached bigint NOT NULL,
        tokens_completion bigint NOT NULL,
        cost_credits bigint NOT NULL,
        estimated_requests bigint NOT NULL,
        PRIMARY KEY (project_id, key_id, model, hour)
    );
    CREATE INDEX IF NOT EXISTS usage_rollups_project_hour_idx ON {SCHEMA}.usage_rollups (project_id, hour);
    """

    async def apply(self, conn: Conn, page: Sequence[Logged]) -> None:
        totals = rollup_totals(page)
        if not totals:
            return
        rows = [(as_uuid(p), as_uuid(k), m, hour_start(h), *t) for (p, k, m, h), t in totals.items()]
        await conn.execute(_ADD, *[list(c) for c in zip(*rows, strict=True)])
