"""Reconciliation on real PostgreSQL: read models agree with the log for random histories, and a read
model that drifts is reported with both figures."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import uuid
from datetime import UTC, date, datetime

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.access import SYSTEM
from domain.api_key import KeySettings
from domain.usage import UsageEntry
from edge import reports
from projections.base import SCHEMA
from projections.follower import Follower
from projections.reconcile import reconcile
from tests.conftest import fresh_database
from tests.integration.support import accounting, pool, sample_history

LWAPI = [sys.executable, "-m", "edge.cli"]
YEAR = reports.Period(date(2026, 1, 1), date(2026, 12, 31))
YEAR_START_MS = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)


async def _reconciled(url: str, page_events_max: int = 100):  # type: ignore[no-untyped-def]
    db = await pool(url)
    try:
        follower = Follower(db, page_events_max=page_events_max)
        await follower.ensure_schema()
        await follower.catch_up()
        return await reconcile(db)
    finally:
        await db.close()


async def test_a_varied_history_reconciles(database_url: str) -> None:
    app = accounting(database_url)
    sample_history(app, random.Random(3), projects=3, batches=20)
    result = await _reconciled(database_url, page_events_max=7)
    assert result.ok, result.differences
    assert result.projects == 3 and result.usage_entries > 100 and result.position > 0


@pytest.mark.parametrize(("drift", "check", "field"), [
    (f"UPDATE {SCHEMA}.balances SET charged_credits = charged_credits + 1 "
     f"WHERE project_id = (SELECT min(project_id::text)::uuid FROM {SCHEMA}.balances)", "balances", "charged"),
    (f"UPDATE {SCHEMA}.key_usage SET requests = requests - 1 "
     f"WHERE key_id = (SELECT min(key_id::text)::uuid FROM {SCHEMA}.key_usage)", "key_usage", "requests"),
    (f"DELETE FROM {SCHEMA}.usage_rollups WHERE ctid = (SELECT min(ctid) FROM {SCHEMA}.usage_rollups)",
     "usage_rollups", "requests"),
    (f"DELETE FROM {SCHEMA}.ledger_usage WHERE ctid = (SELECT min(ctid) FROM {SCHEMA}.ledger_usage)",
     "ledger_usage", "entries"),
    (f"UPDATE {SCHEMA}.ledger_credits SET amount_credits = amount_credits + 5 "
     f"WHERE ctid = (SELECT min(ctid) FROM {SCHEMA}.ledger_credits WHERE kind = 'grant')", "ledger_credits",
     "granted"),
    (f"DELETE FROM {SCHEMA}.balances WHERE project_id = (SELECT min(project_id::text)::uuid FROM {SCHEMA}.balances)",
     "balances", "row"),
])
async def test_a_read_model_that_drifts_is_reported(database_url: str, drift: str, check: str, field: str) -> None:
    app = accounting(database_url)
    sample_history(app, random.Random(5), projects=2, batches=8)
    assert (await _reconciled(database_url)).ok
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(drift)
    result = await _reconciled(database_url)
    assert not result.ok
    assert (check, field) in {(d["check"], d["field"]) for d in result.differences}, result.differences


HISTORY = st.lists(
    st.one_of(
        st.tuples(st.just("grant"), st.integers(0, 2), st.integers(1, 10**9)),
        st.tuples(st.just("correct"), st.integers(0, 2), st.integers(-10**6, 10**6).filter(bool)),
        st.tuples(st.just("usage"), st.integers(0, 5), st.lists(
            st.tuples(st.integers(0, 10**5), st.integers(0, 10**4), st.integers(0, 10**6),
                      st.integers(0, 364 * 86_400_000)), min_size=1, max_size=40)),
        st.tuples(st.just("rename"), st.integers(0, 5),
                  st.text(st.characters(categories=("L", "N", "P", "Zs")), min_size=1, max_size=20).filter(str.strip)),
    ),
    min_size=1, max_size=25,
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=HISTORY, page_events_max=st.sampled_from([1, 3, 100]))
def test_for_any_history_balances_statements_and_the_log_agree(pg_server_url: str, history: list,
                                                                page_events_max: int) -> None:
    with fresh_database(pg_server_url) as url:
        app = accounting(url)
        owner = app.register_user(f"o{uuid.uuid4().hex[:6]}@uni.edu", "Owner")
        projects = [app.create_project(SYSTEM, f"p{i}", f"Project {i}", owner) for i in range(3)]
        keys = [(p, app.create_key(SYSTEM, p, owner, KeySettings(name=f"k{i}"))[0])
                for i, p in enumerate(projects * 2)]
        for step in history:
            if step[0] == "grant":
                app.grant_credits(SYSTEM, projects[step[1]], step[2], "grant")
            elif step[0] == "correct":
                app.correct_credits(SYSTEM, projects[step[1]], step[2], "correction")
            elif step[0] == "rename":
                app.edit_key(SYSTEM, keys[step[1]][1], KeySettings(name=step[2].strip()[:100] or "k"))
            else:
                project, key = keys[step[1]]
                app.record_usage(uuid.uuid4(), [
                    UsageEntry(uuid.uuid4().hex, project, key, "m", "d", prompt, 0, completion, cost,
                               YEAR_START_MS + at, YEAR_START_MS + at) for prompt, completion, cost, at in step[2]])
        app.close()

        async def check() -> None:
            db = await pool(url)
            try:
                follower = Follower(db, page_events_max=page_events_max)
                await follower.ensure_schema()
                await follower.catch_up()
                result = await reconcile(db)
                assert result.ok, result.differences
                remaining = {str(r[0]): r[1] for r in await db.fetch(
                    f"SELECT project_id, remaining_credits FROM {SCHEMA}.balances")}
                platform = await reports.platform_report(db, YEAR)
                for row in platform["projects"]:
                    assert row["opening_balance"] == 0 and row["closing_balance"] == remaining[row["project_id"]]
                    s = await reports.statement(db, row["code"], YEAR)
                    assert s["closing_balance"] == remaining[row["project_id"]]
                    assert s["closing_balance"] == s["granted"] + s["corrected"] - sum(d["cost"] for d in s["by_day"])
            finally:
                await db.close()
        asyncio.run(check())


def test_the_reconcile_command(database_url: str) -> None:
    app = accounting(database_url)
    sample_history(app, random.Random(9), projects=2, batches=5)
    env = {**os.environ, "DATABASE_URL": database_url}

    def lwapi(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*LWAPI, *args], env=env, capture_output=True, text=True, timeout=120, check=False)

    ok = lwapi("audit", "reconcile", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"UPDATE {SCHEMA}.balances SET granted_credits = granted_credits + 10")
    differs = lwapi("audit", "reconcile")
    assert differs.returncode == 4 and "DIFFERS balances" in differs.stderr and "granted" in differs.stderr
