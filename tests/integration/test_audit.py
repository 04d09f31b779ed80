"""Tamper evidence on real PostgreSQL: rows altered directly in the database, with the guard lifted,
are caught by `audit verify`, which names the first event affected."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from adapters.audit_log import chain_head, verify_log
from adapters.audit_signing import HeadInvalid, export_head, load_or_create_key, read_head
from domain.audit import GENESIS, link
from tests.integration.support import accounting, pool, sample_history

EVENTS, CHAIN = "accounting_events", "accounting_events_chain"
LWAPI = [sys.executable, "-m", "edge.cli"]


def _history(url: str) -> list[int]:
    """A varied history; returns the positions of its events."""
    app = accounting(url)
    sample_history(app, random.Random(7), projects=2, batches=6)
    app.close()
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute(f"SELECT notification_id FROM {EVENTS} ORDER BY 1").fetchall()]


def _tamper(url: str, *statements: str) -> None:
    """Run SQL as someone with full database rights would, append-only guard and chain trigger lifted."""
    with psycopg.connect(url, autocommit=True) as conn:
        for table in (EVENTS, CHAIN):
            conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
        for statement in statements:
            conn.execute(statement)
        for table in (EVENTS, CHAIN):
            conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")


async def _verify(url: str, heads=()):  # type: ignore[no-untyped-def]
    p = await pool(url)
    try:
        return await verify_log(p, heads, page_rows=7)  # small pages: the walk crosses many page borders
    finally:
        await p.close()


async def test_an_untouched_log_verifies_and_python_agrees_with_the_database(database_url: str) -> None:
    positions = _history(database_url)
    result = await _verify(database_url)
    assert result.problem is None and result.events == len(positions) > 20
    assert result.head.position == positions[-1]
    with psycopg.connect(database_url) as conn:
        first = conn.execute(f"SELECT notification_id, originator_id, originator_version, topic, state FROM {EVENTS} "
                             "ORDER BY 1 LIMIT 1").fetchone()
        stored = conn.execute(f"SELECT digest FROM {CHAIN} ORDER BY notification_id LIMIT 1").fetchone()
    assert stored[0] == link(GENESIS, *first)
    p = await pool(database_url)
    try:
        assert await chain_head(p) == result.head
    finally:
        await p.close()


def _middle(positions: list[int]) -> int:
    return positions[len(positions) // 2]


TAMPERINGS: dict[str, Callable[[list[int]], tuple[list[str], int]]] = {
    # each: the SQL, and the first position that must be named
    "edited state": lambda ps: ([f"UPDATE {EVENTS} SET state = state || '\\x20'::bytea "
                                 f"WHERE notification_id = {_middle(ps)}"], _middle(ps)),
    "edited topic": lambda ps: ([f"UPDATE {EVENTS} SET topic = topic || 'x' WHERE notification_id = {ps[3]}"], ps[3]),
    "deleted event": lambda ps: ([f"DELETE FROM {EVENTS} WHERE notification_id = {_middle(ps)}"], _middle(ps)),
    "deleted with its digest": lambda ps: ([f"DELETE FROM {EVENTS} WHERE notification_id = {_middle(ps)}",
                                            f"DELETE FROM {CHAIN} WHERE notification_id = {_middle(ps)}"],
                                           ps[len(ps) // 2 + 1]),
    "inserted event": lambda ps: ([f"INSERT INTO {EVENTS} SELECT gen_random_uuid(), 1, topic, state, "
                                   f"{_middle(ps)} * 1000 FROM {EVENTS} WHERE notification_id = {ps[0]}"],
                                  _middle(ps) * 1000),
    "moved events": lambda ps: ([f"UPDATE {EVENTS} SET notification_id = -1 WHERE notification_id = {ps[5]}",
                                 f"UPDATE {EVENTS} SET notification_id = {ps[5]} WHERE notification_id = {ps[6]}",
                                 f"UPDATE {EVENTS} SET notification_id = {ps[6]} WHERE notification_id = -1"], ps[5]),
    "edited digest": lambda ps: ([f"UPDATE {CHAIN} SET digest = sha256(digest) WHERE notification_id = {ps[4]}"],
                                 ps[4]),
}


@pytest.mark.parametrize("how", list(TAMPERINGS))
async def test_every_kind_of_tampering_is_caught_at_the_first_event_affected(database_url: str, how: str) -> None:
    positions = _history(database_url)
    statements, first_affected = TAMPERINGS[how](positions)
    _tamper(database_url, *statements)
    result = await _verify(database_url)
    assert result.problem is not None, how
    assert result.problem.position == first_affected, (how, result.problem)
    with psycopg.connect(database_url) as conn:  # every event before it was checked and found intact
        intact = conn.execute(f"SELECT count(*) FROM {EVENTS} WHERE notification_id BETWEEN 1 AND %s",
                              (first_affected - 1,)).fetchone()
    assert result.events == intact[0]


async def test_a_rewritten_chain_is_caught_by_a_head_exported_before(database_url: str, tmp_path: Path) -> None:
    positions = _history(database_url)
    key = load_or_create_key(tmp_path / "audit_key")
    p = await pool(database_url)
    try:
        exported = json.dumps(export_head(await chain_head(p), key, __import__("datetime").datetime(2026, 11, 25)))
    finally:
        await p.close()
    head = read_head(exported)
    # someone edits an event and recomputes the whole chain so that it is consistent again
    _tamper(database_url,
            f"UPDATE {EVENTS} SET state = state || '\\x20'::bytea WHERE notification_id = {positions[2]}",
            f"DELETE FROM {CHAIN}",
            f"""DO $$ DECLARE r record; previous bytea := decode(repeat('00', 32), 'hex'); BEGIN
                FOR r IN SELECT * FROM {EVENTS} ORDER BY notification_id LOOP
                  previous := lwapi_chain_link(previous, r.notification_id, r.originator_id, r.originator_version,
                                               r.topic, r.state);
                  INSERT INTO {CHAIN} VALUES (r.notification_id, previous);
                END LOOP; END $$""")
    assert (await _verify(database_url)).problem is None  # consistent on its own…
    caught = (await _verify(database_url, (head,))).problem
    assert caught is not None and caught.kind == "rewritten" and caught.position == positions[-1]


def test_a_forged_or_foreign_head_is_refused(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "k1")
    from domain.audit import Head  # noqa: PLC0415
    doc = export_head(Head(42, bytes(range(32))), key, __import__("datetime").datetime(2026, 11, 25))
    assert read_head(json.dumps(doc)).position == 42
    with pytest.raises(HeadInvalid, match="signature"):
        read_head(json.dumps({**doc, "position": 43}))
    with pytest.raises(HeadInvalid, match="another key"):
        read_head(json.dumps(doc), trusted_fingerprint="00" * 16)
    with pytest.raises(HeadInvalid, match="not a chain-head export"):
        read_head("{}")
    assert load_or_create_key(tmp_path / "k1").public_key().public_bytes_raw() == \
        key.public_key().public_bytes_raw()  # the key is created once and kept
    assert oct((tmp_path / "k1").stat().st_mode & 0o777) == "0o600"


def test_the_audit_commands(database_url: str, tmp_path: Path) -> None:
    positions = _history(database_url)
    env = {**os.environ, "DATABASE_URL": database_url, "LWAPI_AUDIT_KEY_FILE": str(tmp_path / "audit_key")}

    def lwapi(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*LWAPI, *args], env=env, capture_output=True, text=True, timeout=120, check=False)

    exported = lwapi("audit", "head", "--out", str(tmp_path / "head.json"))
    assert exported.returncode == 0, exported.stderr
    ok = lwapi("audit", "verify", "--head", str(tmp_path / "head.json"), "--json")
    report = json.loads(ok.stdout)
    assert ok.returncode == 0 and report["ok"] and report["events_checked"] == len(positions)
    assert report["heads_matched"] == [positions[-1]]
    _tamper(database_url, f"DELETE FROM {EVENTS} WHERE notification_id = {positions[3]}")
    altered = lwapi("audit", "verify")
    assert altered.returncode == 3 and f"ALTERED at position {positions[3]} (missing)" in altered.stderr
    (tmp_path / "bad.json").write_text("not json")
    bad = lwapi("audit", "verify", "--head", str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and "not a chain-head export" in bad.stderr


async def test_a_log_from_before_the_chain_is_chained_once_when_the_store_opens(database_url: str) -> None:
    positions = _history(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:  # as a database of the previous release
        conn.execute(f"DROP TRIGGER accounting_events_chained ON {EVENTS}")
        conn.execute(f"DROP TABLE {CHAIN}")
    accounting(database_url).close()
    result = await _verify(database_url)
    assert result.problem is None and result.events == len(positions)
