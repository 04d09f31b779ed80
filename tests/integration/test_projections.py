"""Read models on real PostgreSQL: incremental == rebuilt, exactly once across crashes and restarts."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from eventsourcing.persistence import StoredEvent

from domain.access import SYSTEM
from domain.api_key import KeySettings
from domain.errors import InvalidValue
from projections.base import SCHEMA, Conn, Logged
from projections.catalog import all_projections
from projections.follower import Follower
from tests.integration.support import accounting, entries, pool, sample_history, snapshot


async def test_incremental_equals_rebuilt(database_url: str) -> None:
    app = accounting(database_url)
    db = await pool(database_url)
    follower = Follower(db, page_events_max=7)  # small pages: many transactions, many page boundaries
    await follower.ensure_schema()
    rng = random.Random(1234)
    for _ in range(3):  # writes interleaved with catch-ups
        sample_history(app, rng, projects=2, batches=8)
        await follower.catch_up()
    async with db.acquire() as conn:
        incremental = await snapshot(conn)
    stats = await Follower(db, page_events_max=1000).rebuild()
    async with db.acquire() as conn:
        rebuilt = await snapshot(conn)
    assert stats.position == await follower.head()
    assert rebuilt == incremental
    assert len(incremental["usage_rollups"]) > 10 and len(incremental["api_keys"]) == 12
    await db.close()


async def test_balance_identity_holds_in_the_read_model(database_url: str) -> None:
    app = accounting(database_url)
    history = sample_history(app, random.Random(7), projects=3, batches=20)
    db = await pool(database_url)
    follower = Follower(db)
    await follower.ensure_schema()
    await follower.catch_up()
    for project_id in history["projects"]:
        project = app.get_project(project_id)
        row = await db.fetchrow(f"SELECT * FROM {SCHEMA}.balances WHERE project_id = $1", project_id)
        charged = await db.fetchval(f"SELECT sum(cost_credits) FROM {SCHEMA}.usage_rollups WHERE project_id = $1",
                                    project_id)
        assert row["granted_credits"] == project.granted_credits
        assert row["corrections_credits"] == project.corrections_credits
        assert row["charged_credits"] == (charged or 0)
        assert row["remaining_credits"] == project.granted_credits + project.corrections_credits - (charged or 0)
    await db.close()


class Exploding:
    """Wraps a projection and fails once, after writing, on the page holding `position`."""

    def __init__(self, inner, position: int) -> None:
        self.inner, self.position, self.fired = inner, position, False
        self.name, self.tables, self.ddl = inner.name, inner.tables, inner.ddl

    async def apply(self, conn: Conn, page: Sequence[Logged]) -> None:
        await self.inner.apply(conn, page)
        if not self.fired and any(logged.position == self.position for logged in page):
            self.fired = True
            raise RuntimeError("crash mid-page")


async def test_crash_mid_page_neither_skips_nor_double_applies(database_url: str) -> None:
    app = accounting(database_url)
    sample_history(app, random.Random(3), projects=2, batches=10)
    db = await pool(database_url)
    reference = Follower(db)
    await reference.ensure_schema()
    head = await reference.head()
    projections = all_projections()
    projections[-1] = Exploding(projections[-1], position=head - 3)  # usage_rollups dies after writing its rows
    crashing = Follower(db, projections, page_events_max=4)
    with pytest.raises(RuntimeError, match="crash mid-page"):
        await crashing.catch_up()
    positions = await crashing.positions()
    assert max(positions.values()) < head and len(set(positions.values())) == 1  # whole page rolled back
    await crashing.catch_up()  # restart: resumes from the tracked position
    async with db.acquire() as conn:
        after_crash = await snapshot(conn)
    await Follower(db).rebuild()
    async with db.acquire() as conn:
        assert await snapshot(conn) == after_crash
    await db.close()


async def test_restart_resumes_from_tracked_position(database_url: str) -> None:
    app = accounting(database_url)
    history = sample_history(app, random.Random(5), projects=1, batches=3)
    db = await pool(database_url)
    first = Follower(db)
    await first.ensure_schema()
    await first.catch_up()
    before = await db.fetchval(f"SELECT requests FROM {SCHEMA}.balances WHERE project_id = $1",
                               history["projects"][0])
    pid, kid = history["keys"][0]
    app.record_usage(uuid.uuid4(), entries(pid, kid, 11))
    second = Follower(db)  # a new process would start exactly like this
    await second.ensure_schema()
    await second.catch_up()
    await second.catch_up()
    after = await db.fetchval(f"SELECT requests FROM {SCHEMA}.balances WHERE project_id = $1", pid)
    assert after == before + 11
    await db.close()


FOLLOWER_PROCESS = """
import asyncio, sys
from adapters.database import create_pool
from projections.follower import Follower
async def main():
    pool = await create_pool(sys.argv[1], size_max=3)
    follower = Follower(pool)
    await follower.ensure_schema()
    await follower.catch_up()
    print("ready", flush=True)
    await follower.run(asyncio.Event())
asyncio.run(main())
"""


async def test_revoked_key_is_visible_to_another_process_within_one_second(database_url: str) -> None:
    app = accounting(database_url)
    owner = app.register_user("owner@example.org", "Owner")
    project = app.create_project(SYSTEM, "lab", "Lab", owner)
    key_id, _ = app.create_key(SYSTEM, project, owner, KeySettings(name="k"))
    proc = subprocess.Popen([sys.executable, "-c", FOLLOWER_PROCESS, database_url], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        db = await pool(database_url)
        delays = []
        for _ in range(3):
            key_id, _ = app.create_key(SYSTEM, project, owner, KeySettings(name="k"))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            app.revoke_key(SYSTEM, key_id)
            while await db.fetchval(f"SELECT revoked_at FROM {SCHEMA}.api_keys WHERE key_id = $1", key_id) is None:
                assert time.monotonic() - started < 1.0, "revocation not visible within 1 s"
                await asyncio.sleep(0.005)
            delays.append(time.monotonic() - started)
        await db.close()
        assert max(delays) < 1.0
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_an_event_no_read_model_can_apply_is_set_aside_and_the_rest_go_on(database_url: str) -> None:
    """Events an older release stored unchecked (NUL in text, a time no timestamptz holds, a topic this
    code no longer knows) must not stop every read model: each is set aside for the read model that
    refused it, later events are applied, and the incremental tables equal a rebuild's."""
    app = accounting(database_url)
    history = sample_history(app, random.Random(11), projects=1, batches=2)
    pid, key_id = history["keys"][0]
    db = await pool(database_url)
    follower = Follower(db, page_events_max=50)
    await follower.ensure_schema()
    await follower.catch_up()
    assert all(n == 0 for n in (await follower.set_aside_counts()).values())

    # the domain refuses these now; the aggregates' event methods write them as an unchecked release did
    with pytest.raises(InvalidValue):
        app.change_model(SYSTEM, "a", lambda m: m.describe("nul\x00inside"))
    model = app.get_model("a")
    model._description_changed(description="nul\x00inside")
    app.save(model)
    far = datetime(9999, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-5)))  # past year 9999 in UTC
    with pytest.raises(InvalidValue):
        app.edit_key(SYSTEM, key_id, KeySettings(name="far", valid_until=far))
    key = app.get_key(key_id)
    key._edited(settings=replace(key.settings, name="far", valid_until=far))
    app.save(key)
    app.recorder.insert_events([StoredEvent(originator_id=uuid.uuid4(), originator_version=1,
                                            topic="lwapi_retired_module:Gone", state=b"{}")])
    # and ordinary events after them
    app.rename_project(SYSTEM, pid, "Renamed after the poison")
    app.record_usage(uuid.uuid4(), entries(pid, key_id, 5, model="a", cost=2))

    await asyncio.wait_for(follower.catch_up(), 30)
    head = await follower.head()
    assert set((await follower.positions()).values()) == {head}
    assert await db.fetchval(f"SELECT name FROM {SCHEMA}.projects WHERE project_id = $1", pid) \
        == "Renamed after the poison"
    aside = await follower.set_aside()
    by_topic = {}
    for row in aside:
        by_topic.setdefault(row["topic"].split(":")[-1], set()).add(row["projection"])
    assert by_topic.pop("Gone") == {"*"}
    assert by_topic.pop("ServedModel.DescriptionChanged") == {"models"}
    assert by_topic.pop("ApiKey.Edited") >= {"api_keys"}
    assert not by_topic, by_topic
    counts = await follower.set_aside_counts()
    assert counts["models"] == 2 and counts["api_keys"] >= 2
    async with db.acquire() as conn:
        incremental = await snapshot(conn)
    stats = await Follower(db, page_events_max=1000).rebuild()  # sets the same events aside again
    assert stats.position == head
    async with db.acquire() as conn:
        assert await snapshot(conn) == incremental
    assert [(r["position"], r["projection"]) for r in await follower.set_aside()] \
        == [(r["position"], r["projection"]) for r in aside]
    await db.close()
