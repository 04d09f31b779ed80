"""Read model `ledger`: every charge and every credit movement, each with its position in the log.

Imports: stdlib, asyncpg, domain. Billing reports are built from these rows, never from the running
totals: a row is written once and never changes, and carries the position of the event that made it,
so a report "as of" a position is the same rows however far the log has grown since. Names that can
change (project names, key names, e-mail addresses) are kept as a history by position for the same
reason.

Tables:
- `ledger_usage`: one row per usage entry (request id, key, model, tokens, prices, cost, times, batch
  event id and position).
- `ledger_credits`: one row per grant or correction (amount, reason, who, when, event id, position).
- `ledger_names`: (object id, position) → the name in force from that position on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from domain.api_key import ApiKey
from domain.project import Project
from domain.usage import ROW_FIELDS, UsageBatch
from domain.user import User
from projections.base import SCHEMA, Conn, Logged

# in the order of `domain.usage.ROW_FIELDS`, after the position and the batch; a request id is unique
# already (the event store's claims), so no index on it: each index slows every rebuild
USAGE_COLUMNS = (
    "position", "batch_id", "request_id", "project_id", "key_id", "model", "deployment", "tokens_prompt",
    "tokens_prompt_cached", "tokens_completion", "cost_credits", "started_at_ms", "finished_at_ms", "estimated",
    "price_prompt", "price_completion", "price_cached",
)
_PADDING = (None,) * 3


def _usage_records(logged: Logged) -> list[tuple[Any, ...]]:
    """The rows as COPY takes them: the stored row as it is (ids stay hex text, which COPY parses), after
    the position and the batch; a rebuild copies a million of them, so nothing is converted here."""
    e = logged.event
    position, batch, full = logged.position, e.originator_id, len(ROW_FIELDS)
    return [(position, batch, *r) if len(r) == full else (position, batch, *r, *_PADDING) for r in e.rows]


class LedgerProjection:
    name = "ledger"
    tables: tuple[str, ...] = ("ledger_usage", "ledger_credits", "ledger_names")
    indexes_rebuilt_after: tuple[str, ...] = ("ledger_usage_project_started_idx",)
    ddl = f"""
    CREATE TABLE IF NOT EXISTS {SCHEMA}.ledger_usage (
        position bigint NOT NULL,
        batch_id uuid NOT NULL,
        request_id text NOT NULL,
        project_id uuid NOT NULL,
        key_id uuid NOT NULL,
        model text NOT NULL,
        deployment text NOT NULL,
        tokens_prompt bigint NOT NULL,
        tokens_prompt_cached bigint NOT NULL,
        tokens_completion bigint NOT NULL,
        cost_credits bigint NOT NULL,
        started_at_ms bigint NOT NULL,
        finished_at_ms bigint NOT NULL,
        estimated boolean NOT NULL,
        price_prompt bigint,
        price_completion bigint,
        price_cached bigint
    );
    CREATE INDEX IF NOT EXISTS ledger_usage_project_started_idx ON {SCHEMA}.ledger_usage (project_id, started_at_ms);
    CREATE TABLE IF NOT EXISTS {SCHEMA}.ledger_credits (
        position bigint NOT NULL,
        event_id uuid NOT NULL,
        event_version bigint NOT NULL,
        project_id uuid NOT NULL,
        kind text NOT NULL CHECK (kind IN ('grant', 'correction')),
        amount_credits bigint NOT NULL,
        reason text NOT NULL,
        actor_id uuid,
        at timestamptz NOT NULL,
        PRIMARY KEY (event_id, event_version)
    );
    CREATE INDEX IF NOT EXISTS ledger_credits_project_idx ON {SCHEMA}.ledger_credits (project_id, at);
    CREATE TABLE IF NOT EXISTS {SCHEMA}.ledger_names (
        object_id uuid NOT NULL,
        position bigint NOT NULL,
        name text NOT NULL,
        PRIMARY KEY (object_id, position)
    );
    """

    async def apply(self, conn: Conn, page: Sequence[Logged]) -> None:
        usage: list[tuple[Any, ...]] = []
        credits: list[tuple[Any, ...]] = []
        names: list[tuple[Any, ...]] = []
        for logged in page:
            e = logged.event
            if isinstance(e, UsageBatch.Recorded):
                usage += _usage_records(logged)
            elif isinstance(e, Project.CreditsGranted):
                credits.append((logged.position, e.originator_id, e.originator_version, e.originator_id,
                                "grant", e.amount_credits, e.reason, e.granted_by, e.timestamp))
            elif isinstance(e, Project.CreditsCorrected):
                credits.append((logged.position, e.originator_id, e.originator_version, e.originator_id,
                                "correction", e.amount_credits, e.reason, e.corrected_by, e.timestamp))
            elif isinstance(e, Project.Created | Project.Renamed):
                names.append((e.originator_id, logged.position, e.name))
            elif isinstance(e, ApiKey.Created | ApiKey.Edited):
                names.append((e.originator_id, logged.position, e.settings.name))
            elif isinstance(e, User.Registered | User.ProfileUpdated):
                names.append((e.originator_id, logged.position, e.email))
        if usage:
            await conn.copy_records_to_table("ledger_usage", schema_name=SCHEMA, columns=USAGE_COLUMNS,
                                             records=usage)
        if credits:
            await conn.executemany(f"INSERT INTO {SCHEMA}.ledger_credits VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                                   credits)
        if names:
            await conn.executemany(f"INSERT INTO {SCHEMA}.ledger_names VALUES ($1, $2, $3) "
                                   "ON CONFLICT DO NOTHING", names)
