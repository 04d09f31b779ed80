"""Read model `users`: who exists, for listings and look-ups (never the password hash).

Imports: stdlib, asyncpg, domain.
"""

from __future__ import annotations

from collections.abc import Sequence

from domain.user import User
from projections.base import SCHEMA, Conn, Logged


class UsersProjection:
    name = "users"
    tables: tuple[str, ...] = ("users",)
    ddl = f"""
    CREATE TABLE IF NOT EXISTS {SCHEMA}.users (
        user_id uuid PRIMARY KEY,
        email text NOT NULL,
        display_name text NOT NULL,
        subject text,
        is_admin boolean NOT NULL,
        has_password boolean NOT NULL,
        created_at timestamptz NOT NULL
    );
    CREATE INDEX IF NOT EXISTS users_email_idx ON {SCHEMA}.users (email);
    """

    async def apply(self, conn: Conn, page: Sequence[Logged]) -> None:
        for logged in page:
            e = logged.event
            if isinstance(e, User.Registered):
                await conn.execute(
                    f"INSERT INTO {SCHEMA}.users VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    e.originator_id, e.email, e.display_name, e.subject, e.is_admin,
                    e.password_hash is not None, e.timestamp,
                )
            elif isinstance(e, User.ProfileUpdated):
                await conn.execute(f"UPDATE {SCHEMA}.users SET display_name = $2, email = $3 WHERE user_id = $1",
                                   e.originator_id, e.display_name, e.email)
            elif isinstance(e, User.PasswordChanged):
                await conn.execute(f"UPDATE {SCHEMA}.users SET has_password = true WHERE user_id = $1",
                                   e.originator_id)
            elif isinstance(e, User.AdminChanged):
                await conn.execute(f"UPDATE {SCHEMA}.users SET is_admin = $2 WHERE user_id = $1",
                                   e.originator_id, e.is_admin)
            elif isinstance(e, User.SubjectLinked):
                await conn.execute(f"UPDATE {SCHEMA}.users SET subject = $2 WHERE user_id = $1",
                                   e.originator_id, e.subject)
