"""Read model `projects`: code, name, creator and state of every project.

Imports: stdlib, asyncpg, domain.
"""

from __future__ import annotations

from collections.abc import Sequence

from domain.project import Project
from projections.base import SCHEMA, Conn, Logged


class ProjectsProjection:
    name = "projects"
    tables: tuple[str, ...] = ("projects",)
    ddl = f"""
    CREATE TABLE IF NOT EXISTS {SCHEMA}.projects (
        project_id uuid PRIMARY KEY,
        code text NOT NULL UNIQUE,
        name text NOT NULL,
        creator_id uuid NOT NULL,
        archived boolean NOT NULL,
        created_at timestamptz NOT NULL
    );
    """

    async def apply(self, conn: Conn, page: Sequence[Logged]) -> None:
        for logged in page:
            e = logged.event
            if isinstance(e, Project.Created):
                await conn.execute(f"INSERT INTO {SCHEMA}.projects VALUES ($1, $2, $3, $4, false, $5)",
                                   e.originator_id, e.code, e.name, e.creator_id, e.timestamp)
            elif isinstance(e, Project.Renamed):
                await conn.execute(f"UPDATE {SCHEMA}.projects SET name = $2 WHERE project_id = $1",
                                   e.originator_id, e.name)
            elif isinstance(e, Project.CreatorHandedOver):
                await conn.execute(f"UPDATE {SCHEMA}.projects SET creator_id = $2 WHERE project_id = $1",
                                   e.originator_id, e.new_creator_id)
            elif isinstance(e, Project.Archived):
                await conn.execute(f"UPDATE {SCHEMA}.projects SET archived = true WHERE project_id = $1",
                                   e.originator_id)
