"""Read model `balances`: per project, grants + corrections − charges (integer credits).

Imports: stdlib, asyncpg, domain.
"""

from __future__ import annotations

from collections.abc import Sequence

from domain.project import Project
from projections.base import SCHEMA, Conn, Logged
from projections.usage_fold import as_uuid, totals_by

_ADD = (
    f"INSERT INTO {SCHEMA}.balances AS b (project_id, granted_credits, corrections_credits, charged_credits, "
    "requests, tokens_prompt, tokens_completion) "
    "SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], "
    "$7::bigint[]) ON CONFLICT (project_id) DO UPDATE SET "
    "granted_credits = b.granted_credits + excluded.granted_credits, "
    "corrections_credits = b.corrections_credits + excluded.corrections_credits, "
    "charged_credits = b.charged_credits + excluded.charged_credits, "
    "requests = b.requests + excluded.requests, "
    "tokens_prompt = b.tokens_prompt + excluded.tokens_prompt, "
    "tokens_completion = b.tokens_completion + excluded.tokens_completion"
)


class BalancesProjection:
    name = "balances"
    tables: tuple[str, ...] = ("balances",)
    ddl = f"""
    CREATE TABLE IF NOT EXISTS {SCHEMA}.balances (
        project_id uuid PRIMARY KEY,
        granted_credits bigint NOT NULL,
        corrections_credits bigint NOT NULL,
        charged_credits bigint NOT NULL,
        requests bigint NOT NULL,
        tokens_prompt bigint NOT NULL,
        tokens_completion bigint NOT NULL,
        remaining_credits bigint GENERATED ALWAYS AS (granted_credits + corrections_credits - charged_credits) STORED
    );
    """

    async def apply(self, conn: Conn, page: Sequence[Logged]) -> None:
        deltas: dict[object, list[int]] = {}  # project → [granted, corrections, charged, requests, prompt, completion]
        for logged in page:
            e = logged.event
            if isinstance(e, Project.Created):
                deltas.setdefault(e.originator_id, [0] * 6)
            elif isinstance(e, Project.CreditsGranted):
                deltas.setdefault(e.originator_id, [0] * 6)[0] += e.amount_credits
            elif isinstance(e, Project.CreditsCorrected):
                deltas.setdefault(e.originator_id, [0] * 6)[1] += e.amount_credits
        for project_hex, t in totals_by(page, "project").items():
            d = deltas.setdefault(as_uuid(project_hex), [0] * 6)
            d[2] += t[4]
            d[3] += t[0]
            d[4] += t[1]
            d[5] += t[3]
        if deltas:
            columns = list(zip(*([pid, *d] for pid, d in deltas.items()), strict=True))
            await conn.execute(_ADD, *[list(c) for c in columns])
