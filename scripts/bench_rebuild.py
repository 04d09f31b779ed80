#!/usr/bin/env python
"""Benchmark: rebuilding every read model from the log (`lwapi projections rebuild`), in usage
entries per second.

Loads `--entries` usage entries (full 1,000,000, quick 100,000) through `Accounting.record_usage` in
batches of `--batch-entries` from `--loaders` producer processes, on top of a small catalogue of
users, projects, members, keys and grants; lets a follower catch up; snapshots every `lwapi_read`
table (rows as text, ordered); then times `Follower(pool, page_events_max=1000).rebuild()` and checks
that every table equals its snapshot.

Uses $DATABASE_URL's server (a new database, dropped after) when set, else a throwaway embedded server.
Prints progress to stderr and the figures as one JSON object on the last line of stdout; exits 1 when a
correctness check fails. `--profile FILE` writes a cProfile of the rebuild (this process's Python side).

    .venv/bin/python scripts/bench_rebuild.py --quick     # 100,000 entries
    .venv/bin/python scripts/bench_rebuild.py             # 1,000,000 entries
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_support import (
    Producers,
    build_catalog,
    check,
    emit,
    fresh_database,
    log,
    snapshot,
    usage_totals,
)

TARGET_ENTRIES_PER_S = 100_000
REBUILD_PAGE_EVENTS = 1000  # what `lwapi projections rebuild` uses (edge/queries.py)


async def run(args: argparse.Namespace, dsn: str) -> tuple[dict[str, Any], list[str]]:
    from adapters.database import create_pool  # noqa: PLC0415
    from projections.follower import Follower  # noqa: PLC0415

    failures: list[str] = []
    log("building the catalogue (users, projects, keys, grants)")
    catalog = build_catalog(dsn, projects=args.projects, keys_per_project=args.keys_per_project)

    log(f"loading {args.entries:,} usage entries in batches of {args.batch_entries} from {args.loaders} processes")
    producers = Producers(args.loaders, dsn, catalog, args.batch_entries, args.seed)
    try:
        await producers.ready()
        shares = [args.entries // args.loaders + (1 if i < args.entries % args.loaders else 0)
                  for i in range(args.loaders)]
        start, reports = await producers.run(args.loaders, "count", shares, timeout_s=3600)
        load_s = max(b[1] for r in reports for b in r.batches) - start
    finally:
        producers.close()
    loaded = sum(r.entries for r in reports)
    loaded_cost = sum(r.cost_credits for r in reports)
    batches = sum(len(r.batches) for r in reports)
    log(f"  loaded {loaded:,} entries in {batches:,} batches in {load_s:.1f} s ({loaded / load_s:,.0f} entries/s)")

    pool = await create_pool(dsn, size_max=2, timeout_s=600)
    try:
        follower = Follower(pool, page_events_max=REBUILD_PAGE_EVENTS)
        await follower.ensure_schema()
        log("catching up (incremental follower, pages of 1000 events)")
        t0 = time.perf_counter()
        await follower.catch_up()
        catch_up_s = time.perf_counter() - t0
        log(f"  caught up in {catch_up_s:.2f} s ({loaded / catch_up_s:,.0f} entries/s)")
        async with pool.acquire() as conn:
            await conn.execute("VACUUM ANALYZE public.accounting_events")
            totals = await usage_totals(conn)
            before = await snapshot(conn)
        log(f"  snapshot: {', '.join(f'{t} {len(rows)}' for t, rows in before.items())}")
        for name in ("balances_requests", "rollups_requests", "key_usage_requests", "claims"):
            check(failures, totals[name] == loaded, f"after catch-up {name} = {totals[name]}, loaded {loaded}")
        check(failures, totals["balances_charged"] == loaded_cost,
              f"after catch-up charged {totals['balances_charged']}, loaded {loaded_cost}")

        rebuilder = Follower(pool, page_events_max=REBUILD_PAGE_EVENTS)
        log("rebuilding (Follower(pool, page_events_max=1000).rebuild())")
        profiler = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        stats = await rebuilder.rebuild()
        if profiler is not None:
            profiler.disable()
        rebuild_s = time.perf_counter() - t0
        if profiler is not None:
            profiler.dump_stats(args.profile)
            log(f"  profile written to {args.profile}")
        log(f"  rebuilt {stats.events:,} events, {stats.usage_entries:,} entries in {rebuild_s:.2f} s "
            f"({stats.usage_entries / rebuild_s:,.0f} entries/s)")
        async with pool.acquire() as conn:
            after = await snapshot(conn)
            head = int(await conn.fetchval("SELECT coalesce(max(notification_id), 0) FROM public.accounting_events"))
            events = int(await conn.fetchval("SELECT count(*) FROM public.accounting_events"))
    finally:
        await pool.close()

    identical = before == after
    if not identical:
        for table in sorted(set(before) | set(after)):
            b, a = before.get(table, []), after.get(table, [])
            if a != b:
                log(f"  table {table} differs: {len(b)} rows before, {len(a)} after; "
                    f"first difference {next(((x, y) for x, y in zip(b, a, strict=False) if x != y), None)}")
    check(failures, identical, "a read-model table differs after the rebuild")
    check(failures, stats.usage_entries == loaded, f"rebuild applied {stats.usage_entries} entries, loaded {loaded}")
    check(failures, stats.events == events, f"rebuild read {stats.events} events, the log holds {events}")
    check(failures, stats.position == head, f"rebuild reached {stats.position}, the log head is {head}")

    rate = round(stats.usage_entries / rebuild_s)
    result = {
        "rebuild_entries_per_s": rate,
        "entries": loaded,
        "events": stats.events,
        "rebuild_s": round(rebuild_s, 3),
        "load_s": round(load_s, 2),
        "load_entries_per_s": round(loaded / load_s),
        "catch_up_s": round(catch_up_s, 3),
        "catch_up_entries_per_s": round(loaded / catch_up_s),
        "batch_entries": args.batch_entries,
        "loaders": args.loaders,
        "keys": len(catalog.pairs),
        "page_events_max": REBUILD_PAGE_EVENTS,
        "tables": {t: len(rows) for t, rows in after.items()},
        "tables_identical": identical,
        "quick": args.quick,
        "target_entries_per_s": TARGET_ENTRIES_PER_S,
        "target_met": rate >= TARGET_ENTRIES_PER_S,
        "checks_passed": not failures,
    }
    return result, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 entries (default 1,000,000)")
    parser.add_argument("--entries", type=int, default=None, help="usage entries to load (overrides --quick)")
    parser.add_argument("--batch-entries", type=int, default=500, help="usage entries per batch (default 500)")
    parser.add_argument("--loaders", type=int, default=max(2, min(8, os.cpu_count() or 2)),
                        help="loading processes (default: CPU count, 2 to 8)")
    parser.add_argument("--projects", type=int, default=4, help="projects in the catalogue (default 4)")
    parser.add_argument("--keys-per-project", type=int, default=3, help="usage-charged keys per project (default 3)")
    parser.add_argument("--profile", metavar="FILE", default=None, help="write a cProfile of the rebuild to FILE")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.entries is None:
        args.entries = 100_000 if args.quick else 1_000_000
    with fresh_database() as dsn:
        result, failures = asyncio.run(run(args, dsn))
    emit(result)
    if failures:
        log(f"{len(failures)} correctness check(s) failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
