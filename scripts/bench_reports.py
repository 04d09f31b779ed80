#!/usr/bin/env python
"""Benchmark: billing reports and the audit walk over a large log.

Loads `--entries` usage entries (full 1,000,000, quick 100,000) over `--projects` projects (100) and the
last 30 days through `Accounting.record_usage` (batches of 1,000, as the gateway's spool flushes them, from
two producer processes), lets the read models catch up, then times:

- `statement_ms`: a 30-day statement of one project (`edge.reports.statement`), median of `--repeat` runs
  over different projects (target < 300 ms);
- `platform_report_s`: the platform report for the same 30 days, median of 3 runs (target < 5 s);
- `verify_entries_per_s`: `lwapi audit verify`'s walk of the whole log against its hash chain, in usage
  entries per second (target >= 200,000).

It also checks the figures: the platform report's requests and cost equal what was loaded, each timed
statement equals that project's row of the platform report, and the chain verifies.

Uses $DATABASE_URL's server (a new database, dropped after) when set, else a throwaway embedded server.
Progress goes to stderr; the figures are one JSON object on the last line of stdout; exit 1 when a check
fails.

    .venv/bin/python scripts/bench_reports.py --quick     # 100,000 entries
    .venv/bin/python scripts/bench_reports.py             # 1,000,000 entries
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_support import Producers, build_catalog, check, emit, fresh_database, log

TARGET_STATEMENT_MS = 300
TARGET_PLATFORM_S = 5.0
TARGET_VERIFY_ENTRIES_PER_S = 200_000
DAYS = 30


async def run(args: argparse.Namespace, dsn: str) -> tuple[dict[str, Any], list[str]]:
    from adapters.audit_log import verify_log  # noqa: PLC0415
    from adapters.database import create_pool  # noqa: PLC0415
    from edge import reports  # noqa: PLC0415
    from projections.follower import Follower  # noqa: PLC0415
    from projections.reconcile import reconcile  # noqa: PLC0415

    failures: list[str] = []
    log(f"building the catalogue: {args.projects} projects, 3 keys each")
    catalog = build_catalog(dsn, projects=args.projects, keys_per_project=3)
    log(f"loading {args.entries:,} usage entries over the last {DAYS} days, batches of {args.batch_entries}")
    producers = Producers(args.loaders, dsn, catalog, args.batch_entries, seed=11, hours=DAYS * 24)
    try:
        await producers.ready()
        shares = [args.entries // args.loaders + (1 if i < args.entries % args.loaders else 0)
                  for i in range(args.loaders)]
        start, loaded_reports = await producers.run(args.loaders, "count", shares, timeout_s=3600)
        load_s = max(b[1] for r in loaded_reports for b in r.batches) - start
    finally:
        producers.close()
    loaded = sum(r.entries for r in loaded_reports)
    loaded_cost = sum(r.cost_credits for r in loaded_reports)
    log(f"  loaded {loaded:,} entries in {load_s:.1f} s")

    pool = await create_pool(dsn, size_max=4, timeout_s=600)
    try:
        follower = Follower(pool, page_events_max=1000)
        await follower.ensure_schema()
        t0 = time.perf_counter()
        await follower.catch_up()
        catch_up_s = time.perf_counter() - t0
        log(f"  read models caught up in {catch_up_s:.1f} s")
        async with pool.acquire() as conn:
            await conn.execute("VACUUM ANALYZE")

        today = datetime.now(UTC).date()
        period = reports.Period(today - timedelta(days=DAYS), today)  # the 30 days back from now touch 31 dates
        platform_s: list[float] = []
        platform: dict[str, Any] = {}
        for _ in range(3):
            t0 = time.perf_counter()
            platform = await reports.platform_report(pool, period)
            platform_s.append(time.perf_counter() - t0)
        log(f"  platform report: {', '.join(f'{s:.2f}' for s in platform_s)} s")
        check(failures, platform["totals"]["requests"] == loaded,
              f"platform report counts {platform['totals']['requests']} requests, loaded {loaded}")
        check(failures, platform["totals"]["cost"] == loaded_cost,
              f"platform report charges {platform['totals']['cost']}, loaded {loaded_cost}")
        rows = {p["code"]: p for p in platform["projects"]}

        statement_ms: list[float] = []
        codes = sorted(rows)[: args.repeat]
        await reports.statement(pool, codes[0], period)  # warm the connection and the plan cache
        for code in codes:
            t0 = time.perf_counter()
            s = await reports.statement(pool, code, period)
            statement_ms.append((time.perf_counter() - t0) * 1000)
            check(failures, (s["charged"], s["totals"]["requests"], s["closing_balance"]) ==
                  (rows[code]["charged"], rows[code]["requests"], rows[code]["closing_balance"]),
                  f"statement of {code} disagrees with the platform report")
        per_project = statistics.median(r["requests"] for r in rows.values())
        log(f"  statements ({per_project:,.0f} entries per project): median {statistics.median(statement_ms):.1f} ms, "
            f"max {max(statement_ms):.1f} ms")

        verified = await verify_log(pool)
        check(failures, verified.problem is None, f"the chain does not verify: {verified.problem}")
        verify_rate = loaded / verified.elapsed_s
        log(f"  audit verify: {verified.events:,} events, {verified.state_bytes / 1e6:,.0f} MB in "
            f"{verified.elapsed_s:.2f} s ({verify_rate:,.0f} entries/s)")

        t0 = time.perf_counter()
        reconciled = await reconcile(pool)
        reconcile_s = time.perf_counter() - t0
        check(failures, reconciled.ok, f"reconciliation differs: {reconciled.differences[:3]}")
        log(f"  reconcile: {reconcile_s:.2f} s")
    finally:
        await pool.close()

    return {
        "statement_ms": round(statistics.median(statement_ms), 1),
        "statement_ms_max": round(max(statement_ms), 1),
        "statements_timed": len(statement_ms),
        "platform_report_s": round(statistics.median(platform_s), 3),
        "verify_entries_per_s": round(verify_rate),
        "verify_s": round(verified.elapsed_s, 3),
        "verify_events": verified.events,
        "reconcile_s": round(reconcile_s, 2),
        "catch_up_s": round(catch_up_s, 2),
        "load_s": round(load_s, 2),
        "entries": loaded,
        "projects": args.projects,
        "days": DAYS,
        "entries_per_project_median": per_project,
        "quick": args.quick,
        "targets": {"statement_ms": TARGET_STATEMENT_MS, "platform_report_s": TARGET_PLATFORM_S,
                    "verify_entries_per_s": TARGET_VERIFY_ENTRIES_PER_S},
        "targets_met": statistics.median(statement_ms) < TARGET_STATEMENT_MS
        and statistics.median(platform_s) < TARGET_PLATFORM_S and verify_rate >= TARGET_VERIFY_ENTRIES_PER_S,
    }, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 entries instead of 1,000,000")
    parser.add_argument("--entries", type=int, default=None)
    parser.add_argument("--projects", type=int, default=100)
    parser.add_argument("--batch-entries", type=int, default=1_000,
                        help="entries per batch (the spool flushes at most 1,000)")
    parser.add_argument("--loaders", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10, help="statements timed (one project each)")
    args = parser.parse_args()
    if args.entries is None:
        args.entries = 100_000 if args.quick else 1_000_000
    with fresh_database() as dsn:
        result, failures = asyncio.run(run(args, dsn))
    for failure in failures:
        log(f"CHECK FAILED: {failure}")
    result["checks_failed"] = len(failures)
    emit(result)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
