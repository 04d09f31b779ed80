"""The gateway's in-memory view of keys, projects and budgets: no database round-trip per request.

Imports: stdlib, asyncpg, domain, projections. Loaded whole at start from the read models, then kept
current by notifications: `lwapi_api_keys` (one key changed: reload that row) and
`lwapi_projections` (the read models moved: reload balances, key usage and project states, at most
every `refresh_interval_s`). A poll every `poll_interval_s` covers a lost notification or a dropped
listening connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

import asyncpg

from domain.api_key import KeyStatus, key_status
from projections.api_keys import CHANGE_CHANNEL as KEYS_CHANNEL
from projections.base import DATABASE_ERRORS, SCHEMA
from projections.follower import PROJECTIONS_CHANNEL

log = logging.getLogger(__name__)

REFRESH_INTERVAL_S = 0.05
POLL_INTERVAL_S = 1.0
KEYS_MAX = 1_000_000

_KEY_COLUMNS = ("key_id, project_id, owner_id, secret_hash, name, rpm_limit, tpm_limit, cap_credits, "
                "valid_from, valid_until, allowed_models, revoked_at")


class BudgetSink(Protocol):
    async def set_bases(self, bases: Sequence[tuple[tuple[str, UUID], int | None]], position: int) -> None: ...


@dataclass(frozen=True)
class KeyRecord:
    key_id: UUID
    project_id: UUID
    owner_id: UUID
    secret_hash: str
    name: str
    rpm_limit: int | None
    tpm_limit: int | None
    cap_credits: int | None
    valid_from: datetime | None
    valid_until: datetime | None
    allowed_models: frozenset[str]
    revoked: bool

    def status(self, now: datetime) -> KeyStatus:
        """Validity only: the cap is enforced through reservations, which see in-flight requests too."""
        return key_status(revoked=self.revoked, valid_from=self.valid_from, valid_until=self.valid_until,
                          cap_credits=None, used_credits=0, now=now)

    def allows(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models


def _record(row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(row["key_id"], row["project_id"], row["owner_id"], row["secret_hash"], row["name"],
                     row["rpm_limit"], row["tpm_limit"], row["cap_credits"], row["valid_from"], row["valid_until"],
                     frozenset(row["allowed_models"]), row["revoked_at"] is not None)


class KeyIndex:
    def __init__(self, pool: asyncpg.Pool, budgets: BudgetSink, *, refresh_interval_s: float = REFRESH_INTERVAL_S,
                 poll_interval_s: float = POLL_INTERVAL_S) -> None:
        self.pool = pool
        self.budgets = budgets
        self.refresh_interval_s = refresh_interval_s
        self.poll_interval_s = poll_interval_s
        self._by_hash: dict[str, KeyRecord] = {}
        self._hash_of: dict[UUID, str] = {}
        self.archived_projects: set[UUID] = set()
        self.position = 0
        self._budgets_stale = asyncio.Event()
        self._changed_keys: set[UUID] = set()
        self._capped: set[UUID] = set()

    def find(self, secret_hash: str) -> KeyRecord | None:
        return self._by_hash.get(secret_hash)

    def __len__(self) -> int:
        return len(self._by_hash)

    async def load(self) -> None:
        rows = await self.pool.fetch(f"SELECT {_KEY_COLUMNS} FROM {SCHEMA}.api_keys LIMIT {KEYS_MAX}")
        self._by_hash = {r["secret_hash"]: _record(r) for r in rows}
        self._hash_of = {k.key_id: h for h, k in self._by_hash.items()}
        await self.refresh_budgets()

    async def reload_keys(self, key_ids: set[UUID]) -> None:
        rows = await self.pool.fetch(f"SELECT {_KEY_COLUMNS} FROM {SCHEMA}.api_keys WHERE key_id = ANY($1)",
                                     list(key_ids))
        for row in rows:
            record = _record(row)
            old_hash = self._hash_of.get(record.key_id)
            if old_hash is not None and old_hash != record.secret_hash:
                self._by_hash.pop(old_hash, None)
            self._by_hash[record.secret_hash] = record
            self._hash_of[record.key_id] = record.secret_hash

    async def refresh_budgets(self) -> None:
        """Snapshot balances, key usage and archived projects, all at one log position."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            position = await conn.fetchval(f"SELECT coalesce(min(position), 0) FROM {SCHEMA}.positions")
            balances = await conn.fetch(f"SELECT project_id, remaining_credits FROM {SCHEMA}.balances")
            usage = await conn.fetch(
                f"SELECT k.key_id, k.cap_credits - coalesce(u.cost_credits, 0) AS left FROM {SCHEMA}.api_keys k "
                f"LEFT JOIN {SCHEMA}.key_usage u USING (key_id) WHERE k.cap_credits IS NOT NULL")
            archived = await conn.fetch(f"SELECT project_id FROM {SCHEMA}.projects WHERE archived")
        bases: list[tuple[tuple[str, UUID], int | None]] = [
            (("project", row["project_id"]), row["remaining_credits"]) for row in balances]
        capped = {row["key_id"] for row in usage}
        bases += [(("key", row["key_id"]), row["left"]) for row in usage]
        bases += [(("key", key_id), None) for key_id in self._capped - capped]  # caps removed since last time
        await self.budgets.set_bases(bases, position)
        self._capped = capped
        self.archived_projects = {r["project_id"] for r in archived}
        self.position = position

    async def follow(self, stop: asyncio.Event) -> None:
        """Apply notifications until `stop`; reconnects the listening connection if it drops."""
        refresher = asyncio.create_task(self._refresh_loop(stop))
        try:
            while not stop.is_set():
                try:
                    await self._listen(stop)
                except DATABASE_ERRORS:
                    log.exception("key index: lost the listening connection; reconnecting")
                    await asyncio.sleep(self.poll_interval_s)
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher

    async def _listen(self, stop: asyncio.Event) -> None:
        conn: Any = await self.pool.acquire()
        try:
            await conn.add_listener(KEYS_CHANNEL, self._on_key)
            await conn.add_listener(PROJECTIONS_CHANNEL, self._on_projection)
            await self.load()  # anything missed while not listening
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_interval_s)
                await conn.execute("SELECT 1")  # a dead connection shows here
                self._budgets_stale.set()
        finally:
            with contextlib.suppress(Exception):
                await conn.remove_listener(KEYS_CHANNEL, self._on_key)
                await conn.remove_listener(PROJECTIONS_CHANNEL, self._on_projection)
            with contextlib.suppress(*DATABASE_ERRORS):
                await self.pool.release(conn)

    def _on_key(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self._changed_keys.add(UUID(payload))
        self._budgets_stale.set()

    def _on_projection(self, *_: object) -> None:
        self._budgets_stale.set()

    async def _refresh_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._budgets_stale.wait()
            self._budgets_stale.clear()
            try:
                if self._changed_keys:
                    changed, self._changed_keys = self._changed_keys, set()
                    await self.reload_keys(changed)
                await self.refresh_budgets()
            except DATABASE_ERRORS:
                log.exception("key index: refresh failed; serving from the last snapshot")
            await asyncio.sleep(self.refresh_interval_s)
