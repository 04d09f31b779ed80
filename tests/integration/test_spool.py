"""The usage spool on real disk and real PostgreSQL: nothing lost, nothing twice, across crashes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from eventsourcing.persistence import PersistenceError

from adapters.database import eventstore_env
from adapters.spool import FlushedBatch, Spool
from domain.access import SYSTEM
from domain.accounting import Accounting
from domain.api_key import KeySettings
from tests.integration.support import PEPPER, accounting, entries


def _world(url: str):
    app = accounting(url)
    owner = app.register_user("o@example.org", "Owner")
    project = app.create_project(SYSTEM, "spool", "Spool", owner)
    key_id, _ = app.create_key(SYSTEM, project, owner, KeySettings(name="k"))
    return app, project, key_id


def _claims(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM usage_request_claims").fetchone()
        assert row is not None
        return int(row[0])


async def test_entries_reach_the_log_in_batches(database_url: str, tmp_path: Path) -> None:
    app, project, key_id = _world(database_url)
    flushed: list[FlushedBatch] = []

    async def on_recorded(batch: FlushedBatch) -> None:
        flushed.append(batch)
    spool = Spool(tmp_path, app, on_recorded=on_recorded, segment_entries_max=40, segment_age_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(spool.run(stop))
    for entry in entries(project, key_id, 130):
        spool.append(entry)
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(task, 10)
    spool.close()
    assert _claims(database_url) == 130
    assert sum(len(f.request_ids) for f in flushed) == 130 and len(flushed) == 4
    assert all(f.position > 0 for f in flushed)
    assert spool.depth() == 0


CRASHING_WRITER = """
import os, sys, uuid
from pathlib import Path
from adapters.database import eventstore_env
from adapters.spool import FlushedBatch, Spool
from domain.accounting import Accounting
from tests.integration.support import PEPPER, accounting, entries
app = accounting(sys.argv[1])
spool = Spool(Path(sys.argv[2]), app, segment_entries_max=25)
for e in entries(uuid.UUID(sys.argv[3]), uuid.UUID(sys.argv[4]), 60):
    spool.append(e)
print("written", flush=True)
os.kill(os.getpid(), 9)
"""


async def test_a_killed_process_loses_nothing_and_its_segments_are_replayed_once(
        database_url: str, tmp_path: Path) -> None:
    app, project, key_id = _world(database_url)
    done = subprocess.run([sys.executable, "-c", CRASHING_WRITER, database_url, str(tmp_path), project.hex,
                           key_id.hex], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == -9 and "written" in done.stdout
    assert _claims(database_url) == 0
    successor = Spool(tmp_path, app)
    assert successor.depth() == 60
    assert await successor.replay_orphans() == 60
    assert _claims(database_url) == 60
    # a segment recorded but not yet deleted when its process died is recognised, not charged twice
    orphan = tmp_path / uuid.uuid4().hex
    orphan.mkdir()
    segment = orphan / "000000000001.jsonl"
    text = "".join(json.dumps(e.to_row()) + "\n" for e in entries(project, key_id, 5))
    segment.write_text(text)
    assert await successor.replay_orphans() == 5
    orphan.mkdir()
    segment.write_text(text)
    assert await successor.replay_orphans() == 5  # read again, but recognised as already recorded
    successor.close()
    assert _claims(database_url) == 65


async def test_database_away_keeps_segments_and_retries(database_url: str, pg_server_url: str,
                                                        tmp_path: Path) -> None:
    _app, project, key_id = _world(database_url)
    app = Accounting(env=eventstore_env(database_url, timeout_s=2), key_pepper=PEPPER)
    spool = Spool(tmp_path, app, segment_entries_max=10)
    for entry in entries(project, key_id, 20):
        spool.append(entry)
    await spool.seal()
    dbname = urlsplit(database_url).path.lstrip("/")
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,))
    try:
        with pytest.raises(PersistenceError):
            await spool.flush_closed(spool.folder, spool.instance)
        assert spool.depth() == 20
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    assert await spool.flush_closed(spool.folder, spool.instance) == 20
    assert _claims(database_url) == 20
    spool.close()
