"""Billing reports: a project's statement, the platform report, and the usage entries behind any figure.

Imports: stdlib, asyncpg, domain, adapters, projections. Every report reads the `ledger` read model
"as of" one position of the event log (by default, as far as the ledger has read): only rows written
by events at or before that position count, and names are those in force there. The same position
gives the same report, byte for byte, however many events have been added since. The report also
carries the chain digest at that position (`domain.audit`), tying its figures to the audited log.

Money is integer credits. Periods are whole UTC days, both ends included; a charge falls on the day
its request started (the day whose prices it was charged at), a credit movement on the day it was
made.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from adapters.audit_log import CHAIN_TABLE
from domain.errors import InvalidValue, ProjectNotFound
from projections.base import SCHEMA

DAY_MS = 86_400_000
PERIOD_DAYS_MAX = 3_660  # ten years: bounds the by-day table
ENTRIES_PAGE_ROWS = 5_000
TIMEOUT_S = 120.0
STATEMENT_FORMAT = "lwapi-statement/1"
PLATFORM_FORMAT = "lwapi-platform-report/1"
COUNTERS = ("requests", "tokens_prompt", "tokens_prompt_cached", "tokens_completion", "cost")
PDF_LABELS = ("title", "project", "period", "as_of", "chain_digest", "opening_balance", "grants", "corrections",
              "charges", "closing_balance", "credits_section", "by_day", "by_model", "by_key", "day", "model", "key",
              "requests", "tokens_prompt", "tokens_completion", "cost", "date", "kind", "amount", "reason", "by",
              "grant", "correction", "total", "page")
ENTRY_COLUMNS = ("position", "event_id", "request_id", "key_id", "model", "deployment", "tokens_prompt",
                 "tokens_prompt_cached", "tokens_completion", "price_prompt", "price_cached", "price_completion",
                 "cost", "started_at", "finished_at", "estimated")


@dataclass(frozen=True)
class Period:
    first: date
    last: date

    @classmethod
    def parse(cls, first: str | date | None, last: str | date | None, *, today: date | None = None) -> Period:
        """Whole days; without a start, the current calendar month (up to `last`)."""
        try:
            end = last if isinstance(last, date) else date.fromisoformat(last) if last else (
                today or datetime.now(UTC).date())
            start = first if isinstance(first, date) else date.fromisoformat(first) if first else end.replace(day=1)
        except ValueError:
            raise InvalidValue("a period is two dates, YYYY-MM-DD", rule="period") from None
        if start > end or (end - start).days >= PERIOD_DAYS_MAX:
            raise InvalidValue(f"a period runs forward and spans at most {PERIOD_DAYS_MAX} days",
                               rule="period_range", days_max=PERIOD_DAYS_MAX)
        return cls(start, end)

    @property
    def start_ms(self) -> int:
        return _day_ms(self.first)

    @property
    def end_ms(self) -> int:
        """Exclusive: the first millisecond after the last day."""
        return _day_ms(self.last + timedelta(days=1))

    @property
    def start(self) -> datetime:
        return datetime(self.first.year, self.first.month, self.first.day, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=(self.last - self.first).days + 1)

    def as_dict(self) -> dict[str, str]:
        return {"from": self.first.isoformat(), "to": self.last.isoformat()}


def _day_ms(day: date) -> int:
    return (day - date(1970, 1, 1)).days * DAY_MS


def _day(day_index: int) -> str:
    return (date(1970, 1, 1) + timedelta(days=day_index)).isoformat()


def _counters(row: asyncpg.Record | None) -> dict[str, int]:
    if row is None:
        return dict.fromkeys(COUNTERS, 0)
    return {name: int(row[name] or 0) for name in COUNTERS}


async def as_of_position(conn: Any, requested: int | None) -> tuple[int, str]:
    """The position a report is read at (default: as far as the ledger has read) and the chain digest there."""
    reached = await conn.fetchval(f"SELECT position FROM {SCHEMA}.positions WHERE projection = 'ledger'",
                                  timeout=TIMEOUT_S) or 0
    position = reached if requested is None else requested
    if position < 0 or position > reached:
        raise InvalidValue(f"the ledger has read the log up to position {reached}; ask for a position up to it",
                           rule="as_of", reached=reached)
    digest = await conn.fetchval(f"SELECT digest FROM {CHAIN_TABLE} WHERE notification_id <= $1 "
                                 "ORDER BY notification_id DESC LIMIT 1", position, timeout=TIMEOUT_S)
    return position, (bytes(digest) if digest is not None else bytes(32)).hex()


async def _names_at(conn: Any, ids: list[UUID], position: int) -> dict[UUID, str]:
    rows = await conn.fetch(f"SELECT DISTINCT ON (object_id) object_id, name FROM {SCHEMA}.ledger_names "
                            "WHERE object_id = ANY($1::uuid[]) AND position <= $2 ORDER BY object_id, position DESC",
                            ids, position, timeout=TIMEOUT_S)
    return {r["object_id"]: r["name"] for r in rows}


_USAGE_SETS = f"""
SELECT CASE WHEN GROUPING(day) = 0 THEN 'day' WHEN GROUPING(model) = 0 THEN 'model'
            WHEN GROUPING(key_id) = 0 THEN 'key' ELSE 'total' END AS section,
       day, model, key_id, count(*) AS requests, sum(tokens_prompt)::bigint AS tokens_prompt,
       sum(tokens_prompt_cached)::bigint AS tokens_prompt_cached,
       sum(tokens_completion)::bigint AS tokens_completion, sum(cost_credits)::bigint AS cost
FROM (SELECT started_at_ms / {DAY_MS} AS day, model, key_id, tokens_prompt, tokens_prompt_cached,
             tokens_completion, cost_credits
      FROM {SCHEMA}.ledger_usage
      WHERE project_id = $1 AND started_at_ms >= $2 AND started_at_ms < $3 AND position <= $4) u
GROUP BY GROUPING SETS ((day), (model), (key_id), ())
"""


async def statement(pool: asyncpg.Pool, project_code: str, period: Period, as_of: int | None = None
                    ) -> dict[str, Any]:
    """A project's statement for `period`: balances, credit movements, and charges by day, model and key."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        position, digest = await as_of_position(conn, as_of)
        project = await conn.fetchrow(f"SELECT project_id, code FROM {SCHEMA}.projects WHERE code = $1",
                                      project_code, timeout=TIMEOUT_S)
        names = {} if project is None else await _names_at(conn, [project["project_id"]], position)
        if project is None or project["project_id"] not in names:
            raise ProjectNotFound(f"no project with code {project_code}")
        pid = project["project_id"]
        charged_before = await conn.fetchval(
            f"SELECT coalesce(sum(cost_credits), 0)::bigint FROM {SCHEMA}.ledger_usage "
            "WHERE project_id = $1 AND started_at_ms < $2 AND position <= $3", pid, period.start_ms, position,
            timeout=TIMEOUT_S)
        credit_rows = await conn.fetch(
            f"SELECT position, event_id, kind, amount_credits, reason, actor_id, at FROM {SCHEMA}.ledger_credits "
            "WHERE project_id = $1 AND position <= $2 AND at < $3 ORDER BY at, position", pid, position, period.end,
            timeout=TIMEOUT_S)
        usage = await conn.fetch(_USAGE_SETS, pid, period.start_ms, period.end_ms, position, timeout=TIMEOUT_S)
        key_ids = sorted({r["key_id"] for r in usage if r["section"] == "key"})
        actors = sorted({r["actor_id"] for r in credit_rows if r["actor_id"] is not None})
        labels = await _names_at(conn, [*key_ids, *actors], position)
        prefixes = {r["key_id"]: r["display_prefix"] for r in await conn.fetch(
            f"SELECT key_id, display_prefix FROM {SCHEMA}.api_keys WHERE key_id = ANY($1::uuid[])", key_ids,
            timeout=TIMEOUT_S)}
    before = [r for r in credit_rows if r["at"] < period.start]
    during = [r for r in credit_rows if r["at"] >= period.start]
    granted = sum(r["amount_credits"] for r in during if r["kind"] == "grant")
    corrected = sum(r["amount_credits"] for r in during if r["kind"] == "correction")
    totals = _counters(next((r for r in usage if r["section"] == "total"), None))
    opening = sum(r["amount_credits"] for r in before) - charged_before
    return {
        "format": STATEMENT_FORMAT,
        "project": {"id": str(pid), "code": project["code"], "name": names[pid]},
        "period": period.as_dict(),
        "as_of": {"position": position, "chain_digest": digest},
        "opening_balance": opening, "granted": granted, "corrected": corrected, "charged": totals["cost"],
        "closing_balance": opening + granted + corrected - totals["cost"],
        "credits": [{"at": _time(r["at"]), "kind": r["kind"], "amount": r["amount_credits"], "reason": r["reason"],
                     "by": labels.get(r["actor_id"], "system") if r["actor_id"] else "system",
                     "position": r["position"], "event_id": str(r["event_id"])} for r in during],
        "totals": totals,
        "by_day": [{"day": _day(r["day"]), **_counters(r)}
                   for r in sorted((r for r in usage if r["section"] == "day"), key=lambda r: r["day"])],
        "by_model": [{"model": r["model"], **_counters(r)}
                     for r in sorted((r for r in usage if r["section"] == "model"), key=lambda r: r["model"])],
        "by_key": [{"key_id": str(r["key_id"]), "key_prefix": prefixes.get(r["key_id"], ""),
                    "key_name": labels.get(r["key_id"], ""), **_counters(r)}
                   for r in sorted((r for r in usage if r["section"] == "key"), key=lambda r: str(r["key_id"]))],
    }


_PLATFORM_SETS = f"""
SELECT CASE WHEN GROUPING(model) = 1 AND GROUPING(project_id) = 0 THEN 'project'
            WHEN GROUPING(project_id) = 0 THEN 'project_model'
            WHEN GROUPING(model) = 0 THEN 'model_deployment' ELSE 'total' END AS section,
       project_id, model, deployment, count(*) AS requests, sum(tokens_prompt)::bigint AS tokens_prompt,
       sum(tokens_prompt_cached)::bigint AS tokens_prompt_cached,
       sum(tokens_completion)::bigint AS tokens_completion, sum(cost_credits)::bigint AS cost
FROM {SCHEMA}.ledger_usage
WHERE started_at_ms >= $1 AND started_at_ms < $2 AND position <= $3
GROUP BY GROUPING SETS ((project_id), (project_id, model), (model, deployment), ())
"""


async def platform_report(pool: asyncpg.Pool, period: Period, as_of: int | None = None) -> dict[str, Any]:
    """Every project's balances and usage for `period`, and usage by model and deployment."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        position, digest = await as_of_position(conn, as_of)
        projects = await conn.fetch(f"SELECT project_id, code FROM {SCHEMA}.projects ORDER BY code", timeout=TIMEOUT_S)
        names = await _names_at(conn, [p["project_id"] for p in projects], position)
        usage = await conn.fetch(_PLATFORM_SETS, period.start_ms, period.end_ms, position, timeout=TIMEOUT_S)
        charged_before: dict[UUID, int] = {r[0]: r[1] for r in await conn.fetch(
            f"SELECT project_id, sum(cost_credits)::bigint FROM {SCHEMA}.ledger_usage "
            "WHERE started_at_ms < $1 AND position <= $2 GROUP BY project_id", period.start_ms, position,
            timeout=TIMEOUT_S)}
        credit_sums = await conn.fetch(
            f"SELECT project_id, kind, at < $1 AS before, sum(amount_credits)::bigint AS amount "
            f"FROM {SCHEMA}.ledger_credits WHERE position <= $2 AND at < $3 GROUP BY 1, 2, 3",
            period.start, position, period.end, timeout=TIMEOUT_S)
    credits: dict[tuple[UUID, str], int] = {}
    for r in credit_sums:
        k = (r["project_id"], "before" if r["before"] else r["kind"])
        credits[k] = credits.get(k, 0) + r["amount"]
    per_project = {r["project_id"]: _counters(r) for r in usage if r["section"] == "project"}
    rows = []
    for p in projects:
        pid = p["project_id"]
        if pid not in names:
            continue  # created after the report's position
        counters = per_project.get(pid, dict.fromkeys(COUNTERS, 0))
        opening = credits.get((pid, "before"), 0) - charged_before.get(pid, 0)
        granted, corrected = credits.get((pid, "grant"), 0), credits.get((pid, "correction"), 0)
        rows.append({"project_id": str(pid), "code": p["code"], "name": names[pid], "opening_balance": opening,
                     "granted": granted, "corrected": corrected, "charged": counters["cost"],
                     "closing_balance": opening + granted + corrected - counters["cost"], **counters})
    codes = {p["project_id"]: p["code"] for p in projects}
    return {
        "format": PLATFORM_FORMAT,
        "period": period.as_dict(),
        "as_of": {"position": position, "chain_digest": digest},
        "totals": _counters(next((r for r in usage if r["section"] == "total"), None)),
        "projects": rows,
        "by_model": [{"model": r["model"], "deployment": r["deployment"], **_counters(r)} for r in sorted(
            (r for r in usage if r["section"] == "model_deployment"), key=lambda r: (r["model"], r["deployment"]))],
        "by_project_model": [{"code": codes.get(r["project_id"], str(r["project_id"])), "model": r["model"],
                              **_counters(r)} for r in sorted(
            (r for r in usage if r["section"] == "project_model"),
            key=lambda r: (codes.get(r["project_id"], ""), r["model"]))],
    }


async def entries(pool: asyncpg.Pool, project_code: str, period: Period, as_of: int | None = None, *,
                  model: str | None = None, key_id: UUID | None = None) -> AsyncIterator[dict[str, Any]]:
    """The usage entries behind a statement's figures, in the order their requests started."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        position, _ = await as_of_position(conn, as_of)
        pid = await conn.fetchval(f"SELECT project_id FROM {SCHEMA}.projects WHERE code = $1", project_code,
                                  timeout=TIMEOUT_S)
        if pid is None:
            raise ProjectNotFound(f"no project with code {project_code}")
        after: tuple[int, str] = (period.start_ms - 1, "")
        while True:
            rows = await conn.fetch(
                f"SELECT * FROM {SCHEMA}.ledger_usage WHERE project_id = $1 AND (started_at_ms, request_id) > ($2, $3) "
                "AND started_at_ms < $4 AND position <= $5 AND ($6::text IS NULL OR model = $6) "
                "AND ($7::uuid IS NULL OR key_id = $7) ORDER BY started_at_ms, request_id LIMIT $8",
                pid, after[0], after[1], period.end_ms, position, model, key_id, ENTRIES_PAGE_ROWS,
                timeout=TIMEOUT_S)
            for r in rows:
                yield _entry(r)
            if len(rows) < ENTRIES_PAGE_ROWS:
                return
            after = (rows[-1]["started_at_ms"], rows[-1]["request_id"])


def _time(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _ms_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _entry(r: asyncpg.Record) -> dict[str, Any]:
    return {"position": r["position"], "event_id": str(r["batch_id"]), "request_id": r["request_id"],
            "key_id": str(r["key_id"]), "model": r["model"], "deployment": r["deployment"],
            "tokens_prompt": r["tokens_prompt"], "tokens_prompt_cached": r["tokens_prompt_cached"],
            "tokens_completion": r["tokens_completion"], "price_prompt": r["price_prompt"],
            "price_cached": r["price_cached"], "price_completion": r["price_completion"], "cost": r["cost_credits"],
            "started_at": _ms_time(r["started_at_ms"]), "finished_at": _ms_time(r["finished_at_ms"]),
            "estimated": r["estimated"]}


# ---- formats ------------------------------------------------------------------------------------

def to_json(report: dict[str, Any]) -> bytes:
    return (json.dumps(report, ensure_ascii=False, indent=2) + "\n").encode()


def statement_csv(s: dict[str, Any]) -> bytes:
    """One table a spreadsheet opens: a `section` column tells summary, credit, day, model and key rows apart."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["section", "item", "detail", *COUNTERS, "amount"])
    blank = [""] * len(COUNTERS)
    w.writerow(["project", s["project"]["code"], s["project"]["name"], *blank, ""])
    w.writerow(["period", s["period"]["from"], s["period"]["to"], *blank, ""])
    w.writerow(["as_of", s["as_of"]["position"], s["as_of"]["chain_digest"], *blank, ""])
    for name in ("opening_balance", "granted", "corrected", "charged", "closing_balance"):
        w.writerow(["summary", name, "", *blank, s[name]])
    for c in s["credits"]:
        w.writerow(["credit", c["at"], f"{c['kind']}: {c['reason']} ({c['by']})", *blank, c["amount"]])
    for section, rows, item in (("day", s["by_day"], "day"), ("model", s["by_model"], "model"),
                                ("key", s["by_key"], "key_prefix")):
        for r in rows:
            w.writerow([section, r[item], r.get("key_name", ""), *(r[c] for c in COUNTERS), ""])
    w.writerow(["total", "", "", *(s["totals"][c] for c in COUNTERS), ""])
    return out.getvalue().encode()


def platform_csv(report: dict[str, Any]) -> bytes:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    columns = ["code", "name", "opening_balance", "granted", "corrected", "charged", "closing_balance", *COUNTERS]
    w.writerow(columns)
    for p in report["projects"]:
        w.writerow([p[c] for c in columns])
    return out.getvalue().encode()


def entry_jsonl(entry: dict[str, Any]) -> bytes:
    return (json.dumps(entry, ensure_ascii=False) + "\n").encode()


def entries_csv_header() -> bytes:
    return (",".join(ENTRY_COLUMNS) + "\n").encode()


def entry_csv(entry: dict[str, Any]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(["" if entry[c] is None else entry[c] for c in ENTRY_COLUMNS])
    return out.getvalue().encode()
