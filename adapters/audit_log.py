"""Reads the stored events and their chain out of PostgreSQL and checks them with `domain.audit`.

Imports: stdlib, asyncpg, domain. Both tables are read in position order, in pages, inside one
read-only REPEATABLE READ transaction, so the check sees one consistent moment of a log that keeps
growing while it runs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from domain.accounting import APPLICATION_NAME
from domain.audit import ChainProblem, ChainVerifier, Head, StoredRow

EVENTS_TABLE = f"public.{APPLICATION_NAME.lower()}_events"
CHAIN_TABLE = f"{EVENTS_TABLE}_chain"
PAGE_ROWS = 256  # events hold up to a few hundred kB (a batch of usage): bounds memory to tens of MB
TIMEOUT_S = 3600.0  # a whole-log walk; each page is far quicker

# table names are module constants, never input
_EVENTS = (f"SELECT notification_id, originator_id, originator_version, topic, state FROM {EVENTS_TABLE} "  # noqa: S608
           "WHERE notification_id > $1 ORDER BY notification_id LIMIT $2")
_CHAIN = (f"SELECT notification_id, digest FROM {CHAIN_TABLE} "  # noqa: S608
          "WHERE notification_id > $1 ORDER BY notification_id LIMIT $2")
_HEAD = f"SELECT notification_id, digest FROM {CHAIN_TABLE} ORDER BY notification_id DESC LIMIT 1"  # noqa: S608


@dataclass(frozen=True)
class Verification:
    events: int
    state_bytes: int
    head: Head
    problem: ChainProblem | None
    elapsed_s: float


async def _pages(conn: Any, query: str, page_rows: int) -> AsyncIterator[asyncpg.Record]:
    after = 0
    while True:
        rows = await conn.fetch(query, after, page_rows, timeout=TIMEOUT_S)
        for row in rows:
            yield row
        if len(rows) < page_rows:
            return
        after = rows[-1][0]


async def verify_log(pool: asyncpg.Pool, expected_heads: tuple[Head, ...] = (), *,
                     page_rows: int = PAGE_ROWS) -> Verification:
    """Walk the whole log against its chain; stops at the first problem."""
    started = time.perf_counter()
    verifier = ChainVerifier(expected_heads)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        events, chain = _pages(conn, _EVENTS, page_rows), _pages(conn, _CHAIN, page_rows)
        event, link = await anext(events, None), await anext(chain, None)
        while event is not None or link is not None:
            position = min(r[0] for r in (event, link) if r is not None)
            row = None
            if event is not None and event[0] == position:
                row = StoredRow(position, event[1], event[2], event[3] or "", event[4] or b"")
                event = await anext(events, None)
            digest = None
            if link is not None and link[0] == position:
                digest = bytes(link[1])
                link = await anext(chain, None)
            if not verifier.check(position, row, digest):
                break
    problem = verifier.finish()
    return Verification(verifier.events, verifier.state_bytes, verifier.head, problem,
                        time.perf_counter() - started)


async def chain_head(pool: asyncpg.Pool) -> Head:
    """The chain's last link as the database holds it (position 0 for an empty log)."""
    row = await pool.fetchrow(_HEAD, timeout=60)
    return Head(0, bytes(32)) if row is None else Head(row[0], bytes(row[1]))
