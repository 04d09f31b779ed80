"""Follows the accounting notification log and feeds the read models, exactly once.

Imports: stdlib, asyncpg, eventsourcing (decoding), domain, projections. Each page of events is
applied to every projection that has not seen it, and the projections' tracked positions move in
the same transaction, under one advisory lock: a crash mid-page rolls the whole page back, and a
second follower (another process) waits instead of applying the page twice. The event store's
NOTIFY wakes the follower; a poll every `poll_interval_s` covers a lost notification.

An event a read model can never apply (a value PostgreSQL refuses, an event this code cannot decode)
would otherwise stop every read model for good: the follower applies such a page again event by event,
sets the failing event aside for the read models that refused it (table `set_aside`, logged, counted
in `projections status`), and goes on. A rebuild tries set-aside events again.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from eventsourcing.persistence import Mapper, StoredEvent
from eventsourcing.utils import TopicError

from domain.accounting import APPLICATION_NAME
from domain.errors import invariant
from domain.transcodings import make_transcoder
from domain.usage import UsageBatch
from projections.base import DATA_ERRORS, DATABASE_ERRORS, SCHEMA, Conn, Logged, Page, Projection
from projections.catalog import all_projections

log = logging.getLogger(__name__)

EVENTS_TABLE = f"public.{APPLICATION_NAME.lower()}_events"
EVENTS_CHANNEL = f"{APPLICATION_NAME.lower()}_events"
PROJECTIONS_CHANNEL = "lwapi_projections"
ADVISORY_LOCK_KEY = 7_303_010_001  # "lwapi projections": one writer of read models at a time
PAGE_EVENTS_MAX = 100
POLL_INTERVAL_S = 1.0
STATEMENT_TIMEOUT_MS = 60_000
SET_ASIDE_TABLE = f"{SCHEMA}.set_aside"
ALL_PROJECTIONS = "*"  # set aside for every read model: the event could not be decoded
UNDECODABLE: tuple[type[BaseException], ...] = (*DATA_ERRORS, TopicError)

_SELECT_PAGE = (f"SELECT notification_id, originator_id, originator_version, topic, state FROM {EVENTS_TABLE} "
                "WHERE notification_id > $1 ORDER BY notification_id LIMIT $2")


@dataclass(frozen=True)
class RebuildStats:
    events: int
    usage_entries: int
    position: int


class Follower:
    def __init__(
        self,
        pool: asyncpg.Pool,
        projections: Sequence[Projection] | None = None,
        *,
        page_events_max: int = PAGE_EVENTS_MAX,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        invariant(0 < page_events_max <= 10_000, "page size out of range")
        self.pool = pool
        self.projections = list(projections) if projections is not None else all_projections()
        self.page_events_max = page_events_max
        self.poll_interval_s = poll_interval_s
        self.mapper: Mapper[Any] = Mapper(transcoder=make_transcoder())
        self._wake = asyncio.Event()
        self.usage_entries_applied = 0

    async def ensure_schema(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_KEY)
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            await conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA}.positions "
                               "(projection text PRIMARY KEY, position bigint NOT NULL)")
            await conn.execute(f"CREATE TABLE IF NOT EXISTS {SET_ASIDE_TABLE} (position bigint NOT NULL, "
                               "projection text NOT NULL, topic text NOT NULL, error text NOT NULL, "
                               "at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (position, projection))")
            for projection in self.projections:
                await conn.execute(projection.ddl)
                await conn.execute(f"INSERT INTO {SCHEMA}.positions VALUES ($1, 0) ON CONFLICT DO NOTHING",
                                   projection.name)

    async def positions(self, conn: Conn | None = None) -> dict[str, int]:
        if conn is None:
            async with self.pool.acquire() as c:
                return await self.positions(c)
        rows = await conn.fetch(f"SELECT projection, position FROM {SCHEMA}.positions")
        found = {r["projection"]: r["position"] for r in rows}
        return {p.name: found.get(p.name, 0) for p in self.projections}

    async def head(self) -> int:
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval(f"SELECT coalesce(max(notification_id), 0) FROM {EVENTS_TABLE}"))

    async def catch_up(self) -> int:
        """Apply every page there is now; returns the lowest position reached."""
        while True:
            async with self.pool.acquire() as conn, conn.transaction():
                await _lock(conn)
                applied = await self.advance(conn)
            if not applied:
                return min((await self.positions()).values(), default=0)

    async def advance(self, conn: Conn) -> int:
        """Apply one page inside the caller's transaction; returns the number of events read."""
        positions = await self.positions(conn)
        start = min(positions.values(), default=0)
        rows = await conn.fetch(_SELECT_PAGE, start, self.page_events_max)
        if not rows:
            return 0
        try:
            async with conn.transaction():  # a savepoint: a page a read model refuses is applied again below
                page = self._decode_page(rows)
                await self._apply(conn, page, positions)
        except UNDECODABLE:
            log.exception("projection follower: events %d..%d refused; applying them one by one",
                          rows[0]["notification_id"], rows[-1]["notification_id"])
            page = await self._apply_one_by_one(conn, rows, positions)
        self.usage_entries_applied += sum(len(p.event.rows) for p in page if isinstance(p.event, UsageBatch.Recorded))
        last = rows[-1]["notification_id"]
        await conn.execute(f"UPDATE {SCHEMA}.positions SET position = greatest(position, $1)", last)
        await conn.execute("SELECT pg_notify($1, $2)", PROJECTIONS_CHANNEL, str(last))
        return len(rows)

    async def _apply(self, conn: Conn, page: Page, positions: dict[str, int]) -> None:
        for projection in self.projections:
            seen = positions[projection.name]
            unseen = page if seen < page[0].position else Page(p for p in page if p.position > seen)
            if unseen:
                await projection.apply(conn, unseen)

    async def _apply_one_by_one(self, conn: Conn, rows: list[asyncpg.Record], positions: dict[str, int]) -> Page:
        """Each event of `rows` to each read model under its own savepoint; what a read model refuses is
        set aside for it. Returns the events decoded."""
        page = Page()
        for row in rows:
            try:
                logged = self._decode(row)
            except UNDECODABLE as error:
                await self._set_aside(conn, row["notification_id"], ALL_PROJECTIONS, row["topic"], error)
                continue
            page.append(logged)
            for projection in self.projections:
                if logged.position <= positions[projection.name]:
                    continue
                try:
                    async with conn.transaction():
                        await projection.apply(conn, Page([logged]))
                except DATA_ERRORS as error:
                    await self._set_aside(conn, logged.position, projection.name, row["topic"], error)
        return page

    async def _set_aside(self, conn: Conn, position: int, projection: str, topic: str, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {error}"[:1000].replace("\x00", "\\x00")
        log.error("projection follower: event %d (%s) set aside for %s: %s", position, topic, projection, reason)
        await conn.execute(f"INSERT INTO {SET_ASIDE_TABLE} (position, projection, topic, error) "
                           "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING", position, projection, topic, reason)

    async def set_aside_counts(self) -> dict[str, int]:
        """Per read model, how many events it has set aside (those no read model could decode count for all)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(f"SELECT projection, count(*) AS n FROM {SET_ASIDE_TABLE} GROUP BY projection")
        found = {r["projection"]: r["n"] for r in rows}
        every = found.get(ALL_PROJECTIONS, 0)
        return {p.name: found.get(p.name, 0) + every for p in self.projections}

    async def set_aside(self, conn: Conn | None = None) -> list[dict[str, Any]]:
        """The events set aside, oldest first."""
        if conn is None:
            async with self.pool.acquire() as c:
                return await self.set_aside(c)
        rows = await conn.fetch(f"SELECT position, projection, topic, error, at FROM {SET_ASIDE_TABLE} "
                                "ORDER BY position, projection")
        return [dict(r) for r in rows]

    def _decode_page(self, rows: list[asyncpg.Record]) -> Page:
        """Decoding a page allocates up to millions of lists that cannot form cycles; with the cyclic
        GC paused meanwhile (no await in between, so nothing else runs) it takes less than half the time."""
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return Page(self._decode(r) for r in rows)
        finally:
            if was_enabled:
                gc.enable()

    def _decode(self, row: asyncpg.Record) -> Logged:
        stored = StoredEvent(originator_id=row["originator_id"], originator_version=row["originator_version"],
                             topic=row["topic"], state=bytes(row["state"]))
        return Logged(position=row["notification_id"], event=self.mapper.to_domain_event(stored))

    async def run(self, stop: asyncio.Event) -> None:
        """Follow until `stop` is set; listens on the event store's channel to wake promptly, and starts
        over on a fresh connection when the database goes away (restarted, unreachable)."""
        while not stop.is_set():
            try:
                await self._follow(stop)
            except DATABASE_ERRORS:
                log.exception("projection follower: lost the database; retrying")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_interval_s)

    async def _follow(self, stop: asyncio.Event) -> None:
        listener = await self.pool.acquire()
        try:
            await listener.add_listener(EVENTS_CHANNEL, self._on_notify)
            while not stop.is_set():
                await self.catch_up()
                self._wake.clear()
                waiter = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({waiter, stopper}, timeout=self.poll_interval_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                if listener.is_closed():  # notifications stopped with it: listen again on a new one
                    raise ConnectionError("the listening connection closed")
        finally:
            with contextlib.suppress(*DATABASE_ERRORS):
                await listener.remove_listener(EVENTS_CHANNEL, self._on_notify)
            with contextlib.suppress(*DATABASE_ERRORS):
                await self.pool.release(listener)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def wait_for(self, position: int, timeout_s: float) -> bool:
        """Until every projection has applied `position` (polled); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if min((await self.positions()).values(), default=0) >= position:
                return True
            await asyncio.sleep(0.01)
        return False

    async def rebuild(self) -> RebuildStats:
        """Recompute every read model from the log in one transaction; readers see the old tables until
        it commits (those of a projection with `indexes_rebuilt_after` wait for it instead), and the live
        follower waits on the lock meanwhile."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock(conn)
            for projection in self.projections:
                for table in projection.tables:
                    await conn.execute(f"DELETE FROM {SCHEMA}.{table}")
                # an index built once over the loaded rows costs a fraction of one kept up row by row;
                # dropping it locks that table's readers out until the rebuild commits
                for index in getattr(projection, "indexes_rebuilt_after", ()):
                    await conn.execute(f"DROP INDEX IF EXISTS {SCHEMA}.{index}")
            await conn.execute(f"UPDATE {SCHEMA}.positions SET position = 0")
            await conn.execute(f"DELETE FROM {SET_ASIDE_TABLE}")  # tried again below
            events = 0
            self.usage_entries_applied = 0
            # A page holds up to hundreds of thousands of decoded rows: with the cyclic GC on, building the
            # read models' records triggers collections that walk all of them again and again. Nothing
            # here forms cycles; the collector runs once at the end.
            was_enabled = gc.isenabled()
            gc.disable()
            try:
                while applied := await self.advance(conn):
                    events += applied
            finally:
                if was_enabled:
                    gc.enable()
            for projection in self.projections:
                if getattr(projection, "indexes_rebuilt_after", ()):
                    await conn.execute(projection.ddl)  # CREATE INDEX IF NOT EXISTS: the dropped ones again
            position = min((await self.positions(conn)).values(), default=0)
            return RebuildStats(events=events, usage_entries=self.usage_entries_applied, position=position)


async def _lock(conn: Conn) -> None:
    await conn.execute(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
    await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_KEY)
