"""Read model `api_keys`: the key index (hash → key state, project, limits) the gateway loads.

Imports: stdlib, asyncpg, domain. Every change also notifies channel `lwapi_api_keys` with the key
id (delivered at commit), so in-memory indexes in other processes refresh within a second.
"""

from __future__ import annotations

from collections.abc import Sequence

from domain.api_key import ApiKey, KeySettings
from projections.base import SCHEMA, Conn, Logged

CHANGE_CHANNEL = "lwapi_api_keys"


def _settings_args(s: KeySettings) -> tuple[object, ...]:
    return (s.name, s.rpm_limit, s.tpm_limit, s.cap_credits, s.valid_from, s.valid_until, list(s.allowed_models))


class ApiKeysProjection:
    name = "api_keys"
    tables: tuple[str, ...] = ("api_keys",)
    ddl = f"""
    CREATE TABLE IF NOT EXISTS {SCHEMA}.api_keys (
        key_id uuid PRIMARY KEY,
        project_id uuid NOT NULL,
        owner_id uuid NOT NULL,
        secret_hash text NOT NULL UNIQUE,
        display_prefix text NOT NULL,
        name text NOT NULL,
        rpm_limit bigint,
        tpm_limit bigint,
        cap_credits bigint,
        valid_from timestamptz,
        valid_until timestamptz,
        allowed_models text[] NOT NULL,
        created_at timestamptz NOT NULL,
        revoked_at timestamptz,
        version bigint NOT NULL
    );
    CREATE INDEX IF NOT EXISTS api_keys_project_idx ON {SCHEMA}.api_keys (project_id);
    """

    async def apply(self, conn: Conn, page: Sequence[Logged]) -> None:
        for logged in page:
            e = logged.event
            if isinstance(e, ApiKey.Created):
                await conn.execute(
                    f"INSERT INTO {SCHEMA}.api_keys VALUES "
                    "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, NULL, $14)",
                    e.originator_id, e.project_id, e.owner_id, e.secret_hash, e.display_prefix,
                    *_settings_args(e.settings), e.timestamp, e.originator_version,
                )
            elif isinstance(e, ApiKey.Edited):
                await conn.execute(
                    f"UPDATE {SCHEMA}.api_keys SET name = $2, rpm_limit = $3, tpm_limit = $4, cap_credits = $5, "
                    "valid_from = $6, valid_until = $7, allowed_models = $8, version = $9 WHERE key_id = $1",
                    e.originator_id, *_settings_args(e.settings), e.originator_version,
                )
            elif isinstance(e, ApiKey.Revoked):
                await conn.execute(f"UPDATE {SCHEMA}.api_keys SET revoked_at = $2, version = $3 WHERE key_id = $1",
                                   e.originator_id, e.revoked_at, e.originator_version)
            else:
                continue
            await conn.execute("SELECT pg_notify($1, $2)", CHANGE_CHANNEL, str(e.originator_id))
