"""Read model `models`: the catalog as the gateway and the portal read it.

Imports: stdlib, asyncpg, domain. Each change notifies channel `lwapi_models` with the model's
name (delivered at commit), so running gateways reload their catalog within a second.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from domain.catalog import Deployment, ServedModel
from domain.pricing import Prices
from projections.base import SCHEMA, Conn, Logged

CHANGE_CHANNEL = "lwapi_models"


def deployment_json(d: Deployment) -> dict[str, Any]:
    return {"name": d.name, "backend": d.backend.value, "base_url": d.base_url, "upstream_model": d.upstream_model,
            "credential_ref": d.credential_ref, "weight": d.weight, "timeout_ms": d.timeout_ms,
            "tokenizer": d.tokenizer}


def prices_json(p: Prices) -> dict[str, Any]:
    return {"prompt_per_mtok": p.prompt_per_mtok, "completion_per_mtok": p.completion_per_mtok,
            "cached_prompt_per_mtok": p.cached_prompt_per_mtok, "effective_at": p.effective_at.isoformat()}


class ModelsProjection:
    name = "models"
    tables: tuple[str, ...] = ("models",)
    ddl = f"""
    CREATE TABLE IF NOT EXISTS {SCHEMA}.models (
        name text PRIMARY KEY,
        model_id uuid NOT NULL UNIQUE,
        description text NOT NULL,
        deployments jsonb NOT NULL,
        price_schedule jsonb NOT NULL,
        removed boolean NOT NULL,
        created_at timestamptz NOT NULL,
        version bigint NOT NULL
    );
    """

    async def apply(self, conn: Conn, page: Sequence[Logged]) -> None:
        for logged in page:
            e = logged.event
            if not isinstance(e, ServedModel.Event):
                continue
            if isinstance(e, ServedModel.Added):
                await conn.execute(
                    f"INSERT INTO {SCHEMA}.models VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, false, $6, $7)",
                    e.name, e.originator_id, e.description, json.dumps([deployment_json(d) for d in e.deployments]),
                    json.dumps([prices_json(e.prices)]), e.timestamp, e.originator_version)
            else:
                await self._change(conn, e)
            name = await conn.fetchval(f"SELECT name FROM {SCHEMA}.models WHERE model_id = $1", e.originator_id)
            await conn.execute("SELECT pg_notify($1, $2)", CHANGE_CHANNEL, name)

    async def _change(self, conn: Conn, e: Any) -> None:
        where = "version = $2 WHERE model_id = $1"
        args: list[Any] = [e.originator_id, e.originator_version]
        if isinstance(e, ServedModel.DeploymentAdded):
            sql = f"UPDATE {SCHEMA}.models SET deployments = deployments || $3::jsonb, {where}"
            args.append(json.dumps([deployment_json(e.deployment)]))
        elif isinstance(e, ServedModel.DeploymentRemoved):
            sql = (f"UPDATE {SCHEMA}.models SET deployments = (SELECT coalesce(jsonb_agg(d), '[]'::jsonb) "
                   f"FROM jsonb_array_elements(deployments) d WHERE d->>'name' <> $3), {where}")
            args.append(e.deployment_name)
        elif isinstance(e, ServedModel.PricesChanged):
            sql = f"UPDATE {SCHEMA}.models SET price_schedule = price_schedule || $3::jsonb, {where}"
            args.append(json.dumps([prices_json(e.prices)]))
        elif isinstance(e, ServedModel.DescriptionChanged):
            sql = f"UPDATE {SCHEMA}.models SET description = $3, {where}"
            args.append(e.description)
        elif isinstance(e, ServedModel.Removed):
            sql = f"UPDATE {SCHEMA}.models SET removed = true, {where}"
        elif isinstance(e, ServedModel.Restored):
            sql = (f"UPDATE {SCHEMA}.models SET removed = false, deployments = $3::jsonb, "
                   f"price_schedule = price_schedule || $4::jsonb, {where}")
            args += [json.dumps([deployment_json(e.deployment)]), json.dumps([prices_json(e.prices)])]
        else:
            return
        await conn.execute(sql, *args)
