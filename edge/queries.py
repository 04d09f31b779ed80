"""Read-model queries shared by the CLI and the portal (asyncpg, bounded result sizes).

Imports: asyncpg, projections.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from uuid import UUID

import asyncpg

from projections.base import SCHEMA

ROWS_MAX = 10_000


def plain(record: asyncpg.Record) -> dict[str, Any]:
    """A row as a dict of plain values: asyncpg's own UUID type becomes `uuid.UUID`, which the domain (and its
    event transcoder) knows."""
    return {k: UUID(bytes=v.bytes) if isinstance(v, UUID) and type(v) is not UUID else v for k, v in record.items()}


def _rows(records: list[asyncpg.Record]) -> list[dict[str, Any]]:
    return [plain(r) for r in records]


async def users(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    return _rows(await pool.fetch(
        f"SELECT user_id, email, display_name, is_admin, has_password, subject, created_at "
        f"FROM {SCHEMA}.users ORDER BY email LIMIT {ROWS_MAX}"))


async def projects(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    return _rows(await pool.fetch(
        f"SELECT p.code, p.name, p.archived, b.granted_credits, b.corrections_credits, b.charged_credits, "
        f"b.remaining_credits, p.project_id FROM {SCHEMA}.projects p "
        f"JOIN {SCHEMA}.balances b USING (project_id) ORDER BY p.code LIMIT {ROWS_MAX}"))


async def projects_of_user(pool: asyncpg.Pool, user_id: UUID) -> list[dict[str, Any]]:
    return _rows(await pool.fetch(
        f"SELECT p.project_id, p.code, p.name, p.archived, m.role, b.remaining_credits "
        f"FROM {SCHEMA}.memberships m JOIN {SCHEMA}.projects p USING (project_id) "
        f"JOIN {SCHEMA}.balances b USING (project_id) WHERE m.user_id = $1 ORDER BY p.code LIMIT {ROWS_MAX}",
        user_id))


async def project(pool: asyncpg.Pool, project_id: UUID) -> dict[str, Any]:
    row = await pool.fetchrow(
        f"SELECT p.project_id, p.code, p.name, p.archived, p.created_at, u.email AS creator, "
        f"b.granted_credits, b.corrections_credits, b.charged_credits, b.remaining_credits, b.requests, "
        f"b.tokens_prompt, b.tokens_completion FROM {SCHEMA}.projects p "
        f"JOIN {SCHEMA}.balances b USING (project_id) "
        f"LEFT JOIN {SCHEMA}.users u ON u.user_id = p.creator_id WHERE p.project_id = $1", project_id)
    return plain(row) if row else {}


async def members(pool: asyncpg.Pool, project_id: UUID) -> list[dict[str, Any]]:
    return _rows(await pool.fetch(
        f"SELECT u.email, u.display_name, m.role, m.since, m.user_id FROM {SCHEMA}.memberships m "
        f"JOIN {SCHEMA}.users u USING (user_id) WHERE m.project_id = $1 "
        f"ORDER BY CASE m.role WHEN 'creator' THEN 0 WHEN 'manager' THEN 1 ELSE 2 END, u.email "
        f"LIMIT {ROWS_MAX}", project_id))


async def keys(pool: asyncpg.Pool, project_id: UUID) -> list[dict[str, Any]]:
    return _rows(await pool.fetch(
        f"SELECT k.key_id, k.name, k.display_prefix, u.email AS owner, k.rpm_limit, k.tpm_limit, k.cap_credits, "
        f"coalesce(ku.cost_credits, 0) AS used_credits, coalesce(ku.requests, 0) AS requests, "
        f"k.valid_from, k.valid_until, k.allowed_models, k.created_at, k.revoked_at "
        f"FROM {SCHEMA}.api_keys k LEFT JOIN {SCHEMA}.key_usage ku USING (key_id) "
        f"LEFT JOIN {SCHEMA}.users u ON u.user_id = k.owner_id "
        f"WHERE k.project_id = $1 ORDER BY k.created_at LIMIT {ROWS_MAX}", project_id))


async def key(pool: asyncpg.Pool, key_id: UUID) -> dict[str, Any]:
    row = await pool.fetchrow(
        f"SELECT k.key_id, k.project_id, k.owner_id, k.display_prefix, k.name, k.rpm_limit, k.tpm_limit, "
        f"k.cap_credits, k.valid_from, k.valid_until, k.allowed_models, k.created_at, k.revoked_at, "
        f"coalesce(ku.cost_credits, 0) AS used_credits, coalesce(ku.requests, 0) AS requests "
        f"FROM {SCHEMA}.api_keys k LEFT JOIN {SCHEMA}.key_usage ku USING (key_id) WHERE k.key_id = $1", key_id)
    return plain(row) if row else {}


async def projection_status(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    from projections.follower import Follower  # noqa: PLC0415 - keeps this module's imports light

    follower = Follower(pool)
    head = await follower.head()
    positions = await follower.positions()
    set_aside = await follower.set_aside_counts()
    return [{"projection": name, "position": pos, "head": head, "lag_events": head - pos,
             "set_aside_events": set_aside[name]} for name, pos in positions.items()]


async def set_aside_events(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    from projections.follower import Follower  # noqa: PLC0415

    return await Follower(pool).set_aside()


async def rebuild(pool: asyncpg.Pool) -> dict[str, Any]:
    import time  # noqa: PLC0415

    from projections.follower import Follower  # noqa: PLC0415

    follower = Follower(pool, page_events_max=1000)
    started = time.perf_counter()
    stats = await follower.rebuild()
    return {"projections": len(follower.projections), "events": stats.events, "usage_entries": stats.usage_entries,
            "position": stats.position, "seconds": time.perf_counter() - started}


async def health(pool: asyncpg.Pool) -> dict[str, Any]:
    guard = await pool.fetchval(
        "SELECT count(*) FROM pg_trigger WHERE tgname IN ('accounting_events_append_only', "
        "'accounting_events_no_truncate', 'usage_request_claims_append_only', 'usage_request_claims_no_truncate', "
        "'accounting_events_chain_append_only', 'accounting_events_chain_no_truncate') AND tgenabled <> 'D'")
    chained = await pool.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname = 'accounting_events_chained' "
                                  "AND tgenabled <> 'D'")
    status = await projection_status(pool)
    return {"database": "ok", "server_version": await pool.fetchval("SHOW server_version"),
            "append_only_guard": guard == 6, "hash_chain": chained == 1, "events": status[0]["head"] if status else 0,
            "max_projection_lag_events": max((s["lag_events"] for s in status), default=0),
            "set_aside_events": max((s["set_aside_events"] for s in status), default=0)}


async def models(pool: asyncpg.Pool, include_removed: bool = False) -> list[dict[str, Any]]:
    """The catalog with each model's prices in force now (credentials appear only as references)."""
    import json  # noqa: PLC0415
    from datetime import UTC, datetime  # noqa: PLC0415

    rows = await pool.fetch(
        f"SELECT name, description, deployments::text, price_schedule::text, removed, created_at "
        f"FROM {SCHEMA}.models WHERE removed = false OR $1 ORDER BY name LIMIT {ROWS_MAX}", include_removed)
    now = datetime.now(UTC)
    result = []
    for r in rows:
        schedule = json.loads(r["price_schedule"])
        in_force = [p for p in schedule if datetime.fromisoformat(p["effective_at"]) <= now]
        current = max(in_force, key=lambda p: datetime.fromisoformat(p["effective_at"])) if in_force else None
        result.append({"name": r["name"], "description": r["description"], "removed": r["removed"],
                       "deployments": json.loads(r["deployments"]), "created_at": r["created_at"],
                       "prices": current, "price_schedule": schedule})
    return result


async def wait_until_projected(pool: asyncpg.Pool, position: int, timeout_s: float = 3.0) -> bool:
    """Wait until every read model has applied the log up to `position` (a page shows what was just done)."""
    deadline = time.monotonic() + timeout_s
    while True:
        reached = await pool.fetchval(f"SELECT min(position) FROM {SCHEMA}.positions")
        if reached is not None and reached >= position:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)


async def project_by_code(pool: asyncpg.Pool, code: str, user_id: UUID) -> dict[str, Any] | None:
    """The project with this code, its balance, and the user's role in it (None when not a member)."""
    row = await pool.fetchrow(
        f"SELECT p.project_id, p.code, p.name, p.archived, b.granted_credits, b.corrections_credits, "
        f"b.charged_credits, b.remaining_credits, m.role FROM {SCHEMA}.projects p "
        f"JOIN {SCHEMA}.balances b USING (project_id) "
        f"LEFT JOIN {SCHEMA}.memberships m ON m.project_id = p.project_id AND m.user_id = $2 "
        f"WHERE p.code = $1", code, user_id)
    return plain(row) if row else None


async def keys_visible_to(pool: asyncpg.Pool, project_id: UUID, user_id: UUID | None) -> list[dict[str, Any]]:
    """The project's keys with their usage; only the user's own when `user_id` is given."""
    return _rows(await pool.fetch(
        f"SELECT k.key_id, k.owner_id, k.name, k.display_prefix, u.display_name AS owner, k.rpm_limit, k.tpm_limit, "
        f"k.cap_credits, coalesce(ku.cost_credits, 0) AS used_credits, coalesce(ku.requests, 0) AS requests, "
        f"k.valid_from, k.valid_until, k.allowed_models, k.created_at, k.revoked_at "
        f"FROM {SCHEMA}.api_keys k LEFT JOIN {SCHEMA}.key_usage ku USING (key_id) "
        f"LEFT JOIN {SCHEMA}.users u ON u.user_id = k.owner_id "
        f"WHERE k.project_id = $1 AND ($2::uuid IS NULL OR k.owner_id = $2) "
        f"ORDER BY k.revoked_at IS NOT NULL, k.created_at DESC LIMIT {ROWS_MAX}", project_id, user_id))


async def usage_by_day(pool: asyncpg.Pool, project_id: UUID, days: int) -> list[dict[str, Any]]:
    return _rows(await pool.fetch(
        f"SELECT (date_trunc('day', hour AT TIME ZONE 'UTC'))::date AS day, sum(requests)::bigint AS requests, "
        f"sum(tokens_prompt)::bigint AS tokens_prompt, sum(tokens_completion)::bigint AS tokens_completion, "
        f"sum(cost_credits)::bigint AS cost_credits FROM {SCHEMA}.usage_rollups "
        f"WHERE project_id = $1 AND hour >= now() - make_interval(days => $2) GROUP BY 1 ORDER BY 1 DESC",
        project_id, days))


async def usage_rows(pool: asyncpg.Pool, project_id: UUID, start: Any, end: Any) -> list[dict[str, Any]]:
    """The project's usage per day (UTC), model and key within [start, end): the table under the charts."""
    return _rows(await pool.fetch(
        f"SELECT (date_trunc('day', r.hour AT TIME ZONE 'UTC'))::date AS day, r.model, r.key_id, "
        f"coalesce(k.name, '?') AS key_name, sum(r.requests)::bigint AS requests, "
        f"sum(r.tokens_prompt)::bigint AS tokens_prompt, sum(r.tokens_completion)::bigint AS tokens_completion, "
        f"sum(r.cost_credits)::bigint AS cost_credits, sum(r.estimated_requests)::bigint AS estimated_requests "
        f"FROM {SCHEMA}.usage_rollups r LEFT JOIN {SCHEMA}.api_keys k USING (key_id) "
        f"WHERE r.project_id = $1 AND r.hour >= $2 AND r.hour < $3 "
        f"GROUP BY 1, 2, 3, 4 ORDER BY 1 DESC, 2, 4 LIMIT {ROWS_MAX}", project_id, start, end))
