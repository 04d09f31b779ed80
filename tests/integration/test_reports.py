"""Billing reports on real PostgreSQL: figures that add up, drill down to their entries, and stay
byte-for-byte the same "as of" a position however much is recorded after it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from domain.access import SYSTEM
from domain.accounting import Accounting
from domain.api_key import KeySettings
from domain.catalog import BackendKind, Deployment
from domain.errors import InvalidValue, ProjectNotFound
from domain.pricing import Prices
from domain.usage import UsageEntry
from edge import reports
from projections.follower import Follower
from tests.integration.support import accounting, pool

TODAY = datetime.now(UTC).date()
PERIOD = reports.Period(TODAY - timedelta(days=6), TODAY)
LWAPI = [sys.executable, "-m", "edge.cli"]
PRICES = {"llama": (100, 300, 50), "qwen": (2_000, 6_000, 2_000)}  # prompt, completion, cached per million


def _ms(day: date, hour: int) -> int:
    return int(datetime(day.year, day.month, day.day, hour, tzinfo=UTC).timestamp() * 1000)


def _entry(project: uuid.UUID, key: uuid.UUID, model: str, day: date, i: int) -> UsageEntry:
    prompt, cached, completion = 100 + i * 7, (i * 3) % 50, 20 + i % 13
    p, c, k = PRICES[model]
    cost = Prices(p, c, datetime(2020, 1, 1, tzinfo=UTC), k).cost_credits(prompt, cached, completion)
    return UsageEntry(f"req-{uuid.uuid4().hex}", project, key, model, f"{model}-gpu", prompt, cached, completion,
                      cost, _ms(day, i % 24), _ms(day, i % 24) + 900, False, p, c, k)


def _world(url: str) -> tuple[Accounting, dict[str, Any], list[UsageEntry]]:
    app = accounting(url)
    lead = app.register_user("lead@uni.edu", "Lead")
    finance = app.register_user("finance@uni.edu", "Finance")
    app.set_admin(SYSTEM, finance, is_admin=True)
    for model, (p, c, k) in PRICES.items():
        app.add_model(SYSTEM, model, Deployment(f"{model}-gpu", BackendKind.VLLM, "http://gpu:8000/v1", model),
                      Prices(p, c, datetime(2020, 1, 1, tzinfo=UTC), k))
    nlp = app.create_project(SYSTEM, "nlp", "自然語言處理實驗室", lead)
    bio = app.create_project(SYSTEM, "bio", "Bio Lab", lead)
    app.grant_credits(app.actor_for(finance), nlp, 5_000_000, "2026 allocation")
    app.correct_credits(SYSTEM, nlp, -1_500, "billing error")
    app.grant_credits(SYSTEM, bio, 100_000, "pilot")
    k1, _ = app.create_key(SYSTEM, nlp, lead, KeySettings(name="notebook 筆電"))
    k2, _ = app.create_key(SYSTEM, nlp, lead, KeySettings(name="batch jobs"))
    k3, _ = app.create_key(SYSTEM, bio, lead, KeySettings(name="bio key"))
    recorded: list[UsageEntry] = []
    for offset in range(-10, 1):  # some days before the period, most in it
        day = TODAY + timedelta(days=offset)
        batch = [_entry(nlp, k1 if i % 3 else k2, "llama" if i % 2 else "qwen", day, i) for i in range(12)]
        batch += [_entry(bio, k3, "llama", day, i) for i in range(3)]
        app.record_usage(uuid.uuid4(), batch)
        recorded += batch
    return app, {"nlp": nlp, "bio": bio, "keys": (k1, k2, k3), "lead": lead, "finance": finance}, recorded


async def _caught_up(url: str):  # type: ignore[no-untyped-def]
    db = await pool(url)
    follower = Follower(db)
    await follower.ensure_schema()
    await follower.catch_up()
    return db


def _expected(recorded: list[UsageEntry], project: uuid.UUID, period: reports.Period) -> dict[str, int]:
    mine = [e for e in recorded if e.project_id == project]
    inside = [e for e in mine if period.start_ms <= e.started_at_ms < period.end_ms]
    return {"requests": len(inside), "cost": sum(e.cost_credits for e in inside),
            "tokens_prompt": sum(e.tokens_prompt for e in inside),
            "before": sum(e.cost_credits for e in mine if e.started_at_ms < period.start_ms)}


async def test_a_statement_adds_up_and_drills_down_to_its_entries(database_url: str) -> None:
    _, ids, recorded = _world(database_url)
    db = await _caught_up(database_url)
    try:
        s = await reports.statement(db, "nlp", PERIOD)
        want = _expected(recorded, ids["nlp"], PERIOD)
        assert s["project"] == {"id": str(ids["nlp"]), "code": "nlp", "name": "自然語言處理實驗室"}
        assert s["totals"]["requests"] == want["requests"] and s["charged"] == want["cost"] > 0
        assert s["totals"]["tokens_prompt"] == want["tokens_prompt"]
        assert s["opening_balance"] == -want["before"]  # the grants were made today, inside the period
        assert (s["granted"], s["corrected"]) == (5_000_000, -1_500)
        assert s["closing_balance"] == s["opening_balance"] + 5_000_000 - 1_500 - want["cost"]
        assert [c["kind"] for c in s["credits"]] == ["grant", "correction"]
        assert s["credits"][0]["reason"] == "2026 allocation" and s["credits"][0]["by"] == "finance@uni.edu"
        assert s["credits"][1]["by"] == "system"
        assert len(s["by_day"]) == 7 and {m["model"] for m in s["by_model"]} == {"llama", "qwen"}
        assert {k["key_name"] for k in s["by_key"]} == {"notebook 筆電", "batch jobs"}
        for section in ("by_day", "by_model", "by_key"):
            for counter in reports.COUNTERS:
                assert sum(r[counter] for r in s[section]) == s["totals"][counter], (section, counter)
        # every figure expands to the entries that make it up, each with its price and its event
        drilled = [e async for e in reports.entries(db, "nlp", PERIOD)]
        assert len(drilled) == want["requests"] and sum(e["cost"] for e in drilled) == s["charged"]
        one_model = [e async for e in reports.entries(db, "nlp", PERIOD, model="qwen")]
        assert sum(e["cost"] for e in one_model) == next(m["cost"] for m in s["by_model"] if m["model"] == "qwen")
        e = drilled[0]
        assert e["price_prompt"] in (100, 2_000) and e["event_id"] and e["position"] > 0
        assert e["cost"] == Prices(e["price_prompt"], e["price_completion"], datetime.now(UTC), e["price_cached"]
                                   ).cost_credits(e["tokens_prompt"], e["tokens_prompt_cached"],
                                                  e["tokens_completion"])
    finally:
        await db.close()


async def test_a_report_as_of_a_position_never_changes(database_url: str) -> None:
    app, ids, _ = _world(database_url)
    db = await _caught_up(database_url)
    try:
        s1 = await reports.statement(db, "nlp", PERIOD)
        p1 = await reports.platform_report(db, PERIOD)
        position = s1["as_of"]["position"]
        # history grows: more usage in the period, a grant, renamed key and project, a new project
        k1 = ids["keys"][0]
        app.record_usage(uuid.uuid4(), [_entry(ids["nlp"], k1, "qwen", TODAY, i) for i in range(5)])
        app.grant_credits(SYSTEM, ids["nlp"], 7, "late top-up")
        app.edit_key(SYSTEM, k1, KeySettings(name="renamed"))
        app.rename_project(SYSTEM, ids["nlp"], "NLP")
        app.create_project(SYSTEM, "new", "New Lab", ids["lead"])
        await Follower(db).catch_up()
        later = await reports.statement(db, "nlp", PERIOD)
        assert later["as_of"]["position"] > position and later["charged"] > s1["charged"]
        again = await reports.statement(db, "nlp", PERIOD, position)
        assert reports.to_json(again) == reports.to_json(s1)
        assert reports.statement_csv(again) == reports.statement_csv(s1)
        assert reports.to_json(await reports.platform_report(db, PERIOD, position)) == reports.to_json(p1)
        assert len(s1["as_of"]["chain_digest"]) == 64 and s1["as_of"]["chain_digest"] != "0" * 64
        with pytest.raises(InvalidValue, match="up to position"):
            await reports.statement(db, "nlp", PERIOD, later["as_of"]["position"] + 1)
        with pytest.raises(ProjectNotFound):
            await reports.statement(db, "new", PERIOD, position)  # it did not exist yet
    finally:
        await db.close()


async def test_the_platform_report_is_the_sum_of_the_statements(database_url: str) -> None:
    _world(database_url)
    db = await _caught_up(database_url)
    try:
        report = await reports.platform_report(db, PERIOD)
        statements = {code: await reports.statement(db, code, PERIOD) for code in ("nlp", "bio")}
        assert [p["code"] for p in report["projects"]] == ["bio", "nlp"]
        for row in report["projects"]:
            s = statements[row["code"]]
            assert (row["opening_balance"], row["granted"], row["corrected"], row["charged"], row["closing_balance"]) \
                == (s["opening_balance"], s["granted"], s["corrected"], s["charged"], s["closing_balance"])
        for counter in reports.COUNTERS:
            assert sum(r[counter] for r in report["by_model"]) == report["totals"][counter]
            assert sum(r[counter] for r in report["by_project_model"]) == report["totals"][counter]
        assert {(r["model"], r["deployment"]) for r in report["by_model"]} == {("llama", "llama-gpu"),
                                                                              ("qwen", "qwen-gpu")}
    finally:
        await db.close()


def test_bad_periods_are_refused() -> None:
    with pytest.raises(InvalidValue, match="YYYY-MM-DD"):
        reports.Period.parse("last week", None)
    with pytest.raises(InvalidValue, match="runs forward"):
        reports.Period.parse("2026-12-01", "2026-11-01")
    with pytest.raises(InvalidValue, match="at most"):
        reports.Period.parse("2000-01-01", "2026-11-01")
    assert reports.Period.parse(None, "2026-11-20") == reports.Period(date(2026, 11, 1), date(2026, 11, 20))


def test_the_report_commands(database_url: str, tmp_path: Path) -> None:
    _world(database_url)
    env = {**os.environ, "DATABASE_URL": database_url}
    period = ["--from", PERIOD.first.isoformat(), "--to", PERIOD.last.isoformat()]

    def lwapi(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*LWAPI, *args], env=env, capture_output=True, timeout=120, check=False)

    as_json = lwapi("report", "statement", "nlp", *period)
    assert as_json.returncode == 0, as_json.stderr
    s = json.loads(as_json.stdout)
    csv_text = lwapi("report", "statement", "nlp", *period, "--format", "csv").stdout.decode()
    assert csv_text.startswith("section,item,detail,") and f"summary,charged,,,,,,,{s['charged']}" in csv_text
    pdf = lwapi("report", "statement", "nlp", *period, "--format", "pdf", "--out", str(tmp_path / "s.pdf"))
    assert pdf.returncode == 0, pdf.stderr
    assert (tmp_path / "s.pdf").read_bytes().startswith(b"%PDF")
    listed = lwapi("report", "entries", "nlp", *period).stdout.decode().splitlines()
    assert listed[0].startswith("position,event_id,request_id") and len(listed) == 1 + s["totals"]["requests"]
    platform = json.loads(lwapi("report", "platform", *period).stdout)
    assert platform["totals"]["requests"] > s["totals"]["requests"]
    unknown = lwapi("report", "statement", "nope", *period)
    assert unknown.returncode == 1 and b"no project with code nope" in unknown.stderr
    bad = lwapi("report", "statement", "nlp", "--from", "yesterday")
    assert bad.returncode == 1 and b"YYYY-MM-DD" in bad.stderr
