"""The event store on real PostgreSQL: append-only history and each request charged once."""

from __future__ import annotations

import multiprocessing
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import psycopg
import pytest

from domain.access import SYSTEM
from domain.api_key import KeySettings
from domain.errors import DuplicateRequest
from tests.integration.support import accounting, entries


def _world(url: str):
    app = accounting(url)
    owner = app.register_user(f"o-{uuid.uuid4().hex[:8]}@example.org", "Owner")
    project = app.create_project(SYSTEM, f"p-{uuid.uuid4().hex[:8]}", "P", owner)
    key_id, _ = app.create_key(SYSTEM, project, owner, KeySettings(name="k"))
    return app, project, key_id


@pytest.mark.parametrize("table", ["accounting_events", "usage_request_claims", "accounting_events_chain"])
@pytest.mark.parametrize("statement", ["UPDATE {t} SET {c} = {c}", "DELETE FROM {t}", "TRUNCATE {t}"])
def test_history_tables_refuse_update_delete_and_truncate(database_url: str, table: str, statement: str) -> None:
    app, project, key_id = _world(database_url)
    app.record_usage(uuid.uuid4(), entries(project, key_id, 3))
    column = {"accounting_events": "topic", "usage_request_claims": "request_id"}.get(table, "digest")
    with psycopg.connect(database_url, autocommit=True) as conn:
        before = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute(statement.format(t=table, c=column))
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == before


def test_request_id_is_charged_once_across_batches(database_url: str) -> None:
    app, project, key_id = _world(database_url)
    first = entries(project, key_id, 5)
    batch_id = uuid.uuid4()
    recorded = app.record_usage(batch_id, first)
    assert recorded.position > 0 and not recorded.already_recorded
    assert app.record_usage(batch_id, first).already_recorded  # a replayed spool segment is a no-op
    fresh = entries(project, key_id, 2)
    with pytest.raises(DuplicateRequest) as refused:
        app.record_usage(uuid.uuid4(), [*fresh, first[3]])
    assert refused.value.request_ids == [first[3].request_id]
    app.record_usage(uuid.uuid4(), fresh)  # nothing of the refused batch was written
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM usage_request_claims").fetchone() == (7,)


def _produce(url: str, project_hex: str, key_hex: str, shared: list[str], batches: int) -> tuple[int, int]:
    app = accounting(url)
    project, key_id = uuid.UUID(project_hex), uuid.UUID(key_hex)
    recorded = refused = 0
    for i in range(batches):
        batch = entries(project, key_id, 20)
        if i % 5 == 0:  # every fifth batch also tries to charge the ids every producer shares
            batch[: len(shared)] = [replace(e, request_id=rid) for rid, e in zip(shared, batch, strict=False)]
        try:
            app.record_usage(uuid.uuid4(), batch)
            recorded += len(batch)
        except DuplicateRequest:
            refused += 1
    app.close()
    return recorded, refused


def test_two_processes_writing_usage_at_once_never_charge_twice(database_url: str) -> None:
    _app, project, key_id = _world(database_url)
    shared = [f"shared-{i}" for i in range(3)]
    # A pool re-raises a producer's exception here instead of leaving the test waiting for its result.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_produce, database_url, project.hex, key_id.hex, shared, 25) for _ in range(2)]
        results = [f.result(timeout=120) for f in futures]
    recorded = sum(r for r, _ in results)
    with psycopg.connect(database_url) as conn:
        claims = conn.execute("SELECT count(*), count(DISTINCT request_id) FROM usage_request_claims").fetchone()
        shared_claims = conn.execute("SELECT count(*) FROM usage_request_claims WHERE request_id LIKE 'shared-%'"
                                     ).fetchone()
    assert claims == (recorded, recorded)
    assert shared_claims == (3,)  # exactly one batch carrying the shared ids won
    assert sum(refused for _, refused in results) == 2 * 5 - 1


def test_the_largest_batch_allowed_is_recorded_promptly(database_url: str) -> None:
    """A batch of the most entries allowed, with the longest request ids and model names: once, this hung in
    psycopg's pipeline mode until the lock timeout."""
    from domain.usage import ENTRIES_PER_BATCH_MAX, REQUEST_ID_CHARS_MAX  # noqa: PLC0415

    app, project, key_id = _world(database_url)
    batch = [replace(e, request_id=f"{i:08d}".ljust(REQUEST_ID_CHARS_MAX, "r"), model="m" * 200)
             for i, e in enumerate(entries(project, key_id, ENTRIES_PER_BATCH_MAX))]
    started = __import__("time").monotonic()
    recorded = app.record_usage(uuid.uuid4(), batch)
    assert recorded.entries == ENTRIES_PER_BATCH_MAX and __import__("time").monotonic() - started < 20
