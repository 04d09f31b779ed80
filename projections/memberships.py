"""Read model `memberships`: who belongs to which project, with which role.

Imports: stdlib, asyncpg, domain.
"""

from __future__ import annotations

from collections.abc import Sequence

from domain.project import Project, Role
from projections.base import SCHEMA, Conn, Logged

_UPSERT = (f"INSERT INTO {SCHEMA}.memberships VALUES ($1, $2, $3, $4) "
           "ON CONFLICT (project_id, user_id) DO UPDATE SET role = excluded.role")


class MembershipsProjection:
    name = "memberships"
    tables: tuple[str, ...] = ("memberships",)
    ddl = f"""
    CREATE TABLE IF NOT EXISTS {SCHEMA}.memberships (
        project_id uuid NOT NULL,
        user_id uuid NOT NULL,
        role text NOT NULL CHECK (role IN ('creator', 'manager', 'user')),
        since timestamptz NOT NULL,
        PRIMARY KEY (project_id, user_id)
    );
    CREATE INDEX IF NOT EXISTS memberships_user_idx ON {SCHEMA}.memberships (user_id);
    """

    async def apply(self, conn: Conn, page: Sequence[Logged]) -> None:
        for logged in page:
            e = logged.event
            pid = e.originator_id
            if isinstance(e, Project.Created):
                await conn.execute(_UPSERT, pid, e.creator_id, Role.CREATOR.value, e.timestamp)
            elif isinstance(e, (Project.MemberAdded, Project.RoleChanged)):
                await conn.execute(_UPSERT, pid, e.user_id, e.role.value, e.timestamp)
            elif isinstance(e, Project.MemberRemoved):
                await conn.execute(f"DELETE FROM {SCHEMA}.memberships WHERE project_id = $1 AND user_id = $2",
                                   pid, e.user_id)
            elif isinstance(e, Project.CreatorHandedOver):
                await conn.execute(_UPSERT, pid, e.previous_id, Role.MANAGER.value, e.timestamp)
                await conn.execute(_UPSERT, pid, e.new_creator_id, Role.CREATOR.value, e.timestamp)
