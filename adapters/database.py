"""Where PostgreSQL is, and how each client library connects to it.

Imports: stdlib, asyncpg, adapters. One DSN drives everything: the eventsourcing recorder (psycopg,
configured through its environment keys) and the asyncpg pools of the projections.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg

from adapters.pg_embedded import EmbeddedPostgres

EVENTSTORE_FACTORY = "adapters.eventstore.postgres:ClaimingPostgresFactory"


class DatabaseUrlError(ValueError):
    """DATABASE_URL cannot be understood."""


@dataclass(frozen=True)
class Database:
    dsn: str
    embedded: EmbeddedPostgres | None
    started_here: bool

    @classmethod
    def locate(cls, database_url: str | None, data_dir: Path) -> Database:
        """The external server at `database_url`, or the embedded one in `data_dir` (started if needed)."""
        if database_url:
            eventstore_env(database_url)  # refuse a malformed URL before anything connects
            return cls(dsn=database_url, embedded=None, started_here=False)
        server = EmbeddedPostgres(data_dir)
        info = server.ensure_running()
        return cls(dsn=info.dsn(), embedded=server, started_here=info.started_here)

    def release(self) -> None:
        """Stop the embedded server if this process started it."""
        if self.embedded is not None and self.started_here:
            self.embedded.stop()


def eventstore_env(dsn: str, *, pool_size: int = 5, timeout_s: float = 30.0) -> dict[str, str]:
    """eventsourcing's POSTGRES_* settings for `dsn` (postgresql://user:pw@host:port/db?host=/socket/dir)."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise DatabaseUrlError("DATABASE_URL must start with postgresql://")
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or ""])[0]
    dbname = unquote(parts.path.lstrip("/")) or query.get("dbname", [""])[0]
    user = unquote(parts.username or "") or query.get("user", [""])[0]
    if not host or not dbname or not user:
        raise DatabaseUrlError("DATABASE_URL must name a host (or socket dir), a database and a user")
    try:
        port = str(parts.port or query.get("port", ["5432"])[0])
    except ValueError:
        raise DatabaseUrlError("DATABASE_URL has a malformed port") from None
    return {
        "PERSISTENCE_MODULE": EVENTSTORE_FACTORY,
        "POSTGRES_DBNAME": dbname,
        "POSTGRES_HOST": host,
        "POSTGRES_PORT": port,
        "POSTGRES_USER": user,
        "POSTGRES_PASSWORD": unquote(parts.password or "") or query.get("password", [""])[0],
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": str(pool_size),
        "POSTGRES_CONNECT_TIMEOUT": str(int(timeout_s)),
        "POSTGRES_LOCK_TIMEOUT": str(int(timeout_s)),
        "POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT": str(int(timeout_s)),
        "POSTGRES_PRE_PING": "y",
        "CREATE_TABLE": "y",
    }


async def create_pool(dsn: str, *, size_max: int = 10, timeout_s: float = 30.0) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=size_max, timeout=timeout_s, command_timeout=timeout_s,
        server_settings={"application_name": "lwapi"},
    )
    if pool is None:  # asyncpg types the result as optional
        raise ConnectionError("could not create a connection pool")
    return pool
