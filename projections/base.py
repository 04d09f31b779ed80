"""What every read model provides to the follower, and the schema they live in.

Imports: stdlib, asyncpg. A projection owns its tables; `apply` writes the effect of a page of
events inside the follower's transaction, which also moves the projection's tracked position.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
from asyncpg.pool import PoolConnectionProxy

Conn = asyncpg.Connection | PoolConnectionProxy  # a pooled connection proxies a plain one
SCHEMA = "lwapi_read"
# What a lost or restarting database raises through asyncpg: the server's errors, a connection closed
# under a call (InterfaceError, InternalClientError), a socket error, a timeout. Followers retry on these.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
# What a read model raises for an event it can never apply, however often it is retried: a value
# PostgreSQL refuses (class 22, or asyncpg refusing to encode an argument), a broken constraint
# (class 23), or the projection's own code failing on the event. The follower sets such an event aside
# for that read model instead of retrying it for ever with every read model stopped behind it.
DATA_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, ValueError, TypeError, LookupError,
    ArithmeticError, AttributeError)


@dataclass(frozen=True)
class Logged:
    """A domain event with its position in the notification log."""

    position: int
    event: Any


class Page(list[Logged]):
    """A page of events as the follower hands it to every read model; `memo` keeps what several read
    models derive from the same page (the usage fold) so that it is computed once per page."""

    def __init__(self, items: Iterable[Logged] = ()) -> None:
        super().__init__(items)
        self.memo: dict[str, Any] = {}


class Projection(Protocol):
    name: str
    tables: tuple[str, ...]
    ddl: str

    async def apply(self, conn: Conn, page: Sequence[Logged]) -> None:
        """Write the effect of `page` (in log order); runs inside the follower's transaction."""
        ...


def qualified(table: str) -> str:
    return f"{SCHEMA}.{table}"
