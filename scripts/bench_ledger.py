#!/usr/bin/env python
"""Benchmark: usage entries recorded per second into PostgreSQL by 1, 4 and 16 concurrent producers,
and the projection lag while they write.

Each producer is a separate (spawned) process with its own `Accounting`, recording batches of
`--batch-entries` usage entries (default 500: what a gateway's spool flushes when it drains every
0.5-1 s at 500-1,000 requests/s, or at its size cap; one event of ~95 kB) for a fixed time per phase.
A `Follower` runs in its own process (`run()`, woken by LISTEN) all along; this process LISTENs on
`lwapi_projections` (the follower's per-page NOTIFY, payload = the page's last position) and takes the
lag of each batch as the time from `record_usage` returning to the first notification of a position at
or past the batch's. At the end the read models must account for every recorded entry exactly once.

Uses $DATABASE_URL's server (a new database, dropped after) when set, else a throwaway embedded server.
Prints progress to stderr and the figures as one JSON object on the last line of stdout; exits 1 when a
correctness check fails.

    .venv/bin/python scripts/bench_ledger.py --quick      # ~8 s per phase, under a minute
    .venv/bin/python scripts/bench_ledger.py              # 30 s per phase
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg
from bench_support import (
    ProducerReport,
    Producers,
    build_catalog,
    check,
    cpu_shares,
    cpu_times,
    emit,
    fresh_database,
    log,
    percentile,
    usage_totals,
)

TARGET_ENTRIES_PER_S = 20_000
TARGET_LAG_P99_MS = 500


def follower_main(dsn: str, page_events: int, stop: Any, ready: Any) -> None:
    """The follower process: `Follower.run()` until `stop` is set."""
    asyncio.run(_follow(dsn, page_events, stop, ready))


async def _follow(dsn: str, page_events: int, stop_flag: Any, ready: Any) -> None:
    from adapters.database import create_pool  # noqa: PLC0415
    from projections.follower import Follower  # noqa: PLC0415

    pool = await create_pool(dsn, size_max=4)
    try:
        follower = Follower(pool, page_events_max=page_events)
        await follower.ensure_schema()
        stop = asyncio.Event()
        waiter = asyncio.get_running_loop().run_in_executor(None, stop_flag.wait)
        waiter.add_done_callback(lambda _: stop.set())
        ready.put(True)
        await follower.run(stop)
    finally:
        await pool.close()


async def _min_position(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT coalesce(min(position), 0) FROM lwapi_read.positions"))


async def wait_applied(conn: asyncpg.Connection, position: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await _min_position(conn) >= position:
            return True
        await asyncio.sleep(0.05)
    return False


def phase_figures(producers: int, start: float, phase_s: float, reports: list[ProducerReport],
                  notes: list[tuple[float, int]]) -> dict[str, Any]:
    batches = sorted((b for r in reports for b in r.batches), key=lambda b: b[1])
    end = start + phase_s
    in_window = [b for b in batches if b[1] <= end]
    entries = sum(b[2] for b in in_window)
    # per-second rates, to show whether the rate is sustained
    seconds = [0] * max(1, int(phase_s))
    for _, t, n in in_window:
        seconds[min(len(seconds) - 1, int(t - start))] += n
    note_times = [t for t, _ in notes]
    note_positions = [p for _, p in notes]
    lags: list[float] = []
    missing = 0
    for position, committed, _ in batches:
        i = bisect.bisect_left(note_positions, position)
        if i == len(note_positions):
            missing += 1
            continue
        lags.append(max(0.0, note_times[i] - committed) * 1000)
    record_s = sum(r.record_s for r in reports)
    make_s = sum(r.make_s for r in reports)
    total_entries = sum(r.entries for r in reports)
    return {
        "producers": producers,
        "entries": entries,
        "entries_all": total_entries,
        "batches": len(batches),
        "entries_per_s": round(entries / phase_s),
        "min_1s_entries_per_s": min(seconds[1:] or seconds),  # the first second includes the start
        "record_ms_mean": round(record_s / max(1, len(batches)) * 1000, 2),
        "make_share": round(make_s / max(1e-9, make_s + record_s), 3),
        "lag_p50_ms": _round(percentile(lags, 0.50)),
        "lag_p99_ms": _round(percentile(lags, 0.99)),
        "lag_max_ms": _round(max(lags, default=None)),
        "lag_missing": missing,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def run(args: argparse.Namespace, dsn: str) -> tuple[dict[str, Any], list[str]]:
    from adapters.database import create_pool  # noqa: PLC0415
    from projections.follower import PROJECTIONS_CHANNEL, Follower  # noqa: PLC0415

    failures: list[str] = []
    log("building the catalogue (users, projects, keys, grants)")
    catalog = build_catalog(dsn, projects=args.projects, keys_per_project=args.keys_per_project)
    pool = await create_pool(dsn, size_max=2)
    await Follower(pool).ensure_schema()

    notes: list[tuple[float, int]] = []
    listener = await asyncpg.connect(dsn)
    await listener.add_listener(
        PROJECTIONS_CHANNEL, lambda _c, _p, _ch, payload: notes.append((time.monotonic(), int(payload))))

    ctx = mp.get_context("spawn")
    stop, ready = ctx.Event(), ctx.Queue()
    follower = ctx.Process(target=follower_main, name="follower", args=(dsn, args.follower_page_events, stop, ready),
                           daemon=True)
    follower.start()
    most = max(args.producers)
    log(f"spawning {most} producer processes and the follower")
    producers = Producers(most, dsn, catalog, args.batch_entries, args.seed, nice=args.producer_nice)
    phases: dict[int, dict[str, Any]] = {}
    recorded_entries = recorded_batches = recorded_cost = 0
    try:
        await producers.ready()
        await asyncio.get_running_loop().run_in_executor(None, ready.get, True, 60)
        conn = await pool.acquire()
        try:
            for count in args.producers:
                log(f"phase: {count} producer(s) × {args.phase_s:g} s, batches of {args.batch_entries}")
                cpu_before = cpu_times()
                start, reports = await producers.run(count, "timed", args.phase_s)
                cpu = cpu_shares(cpu_before, cpu_times())
                recorded_entries += sum(r.entries for r in reports)
                recorded_batches += sum(len(r.batches) for r in reports)
                recorded_cost += sum(r.cost_credits for r in reports)
                last = max((b[0] for r in reports for b in r.batches), default=0)
                caught_up = await wait_applied(conn, last, args.catch_up_timeout_s)
                check(failures, caught_up, f"the follower did not reach position {last} after the {count}-producer "
                                           f"phase within {args.catch_up_timeout_s:g} s")
                await asyncio.sleep(0.1)  # let the last notification arrive
                figures = {**phase_figures(count, start, args.phase_s, reports, list(notes)), **cpu}
                phases[count] = figures
                log(f"  {figures['entries_per_s']:,} entries/s (min 1-s window {figures['min_1s_entries_per_s']:,}), "
                    f"{figures['batches']} batches, record_usage {figures['record_ms_mean']} ms mean, "
                    f"lag p50 {figures['lag_p50_ms']} ms p99 {figures['lag_p99_ms']} ms "
                    f"max {figures['lag_max_ms']} ms; CPUs busy {cpu.get('cpu_busy_share')}, "
                    f"stolen {cpu.get('cpu_steal_share')}")
                check(failures, figures["lag_missing"] == 0,
                      f"{figures['lag_missing']} batches never showed up in a projections notification")
        finally:
            await pool.release(conn)
    finally:
        producers.close()
        stop.set()
        follower.join(timeout=30)
        await listener.close()

    log("verifying the read models against what the producers recorded")
    async with pool.acquire() as conn:
        totals = await usage_totals(conn)
        head = int(await conn.fetchval("SELECT coalesce(max(notification_id), 0) FROM public.accounting_events"))
        lowest = await _min_position(conn)
    await pool.close()
    log(f"  recorded {recorded_entries:,} entries in {recorded_batches:,} batches; read models: {totals}")
    check(failures, lowest == head, f"projections at {lowest}, log head at {head}")
    for name in ("balances_requests", "rollups_requests", "key_usage_requests", "claims", "distinct_claims"):
        check(failures, totals[name] == recorded_entries, f"{name} = {totals[name]}, recorded {recorded_entries}")
    check(failures, totals["batches"] == recorded_batches,
          f"{totals['batches']} batch events, {recorded_batches} recorded")
    for name in ("balances_charged", "rollups_cost"):
        check(failures, totals[name] == recorded_cost, f"{name} = {totals[name]}, recorded {recorded_cost}")

    top = phases[most]
    result: dict[str, Any] = {
        "entries_per_s": top["entries_per_s"],
        "lag_p50_ms": top["lag_p50_ms"],
        "lag_p99_ms": top["lag_p99_ms"],
        "lag_max_ms": top["lag_max_ms"],
        "batch_entries": args.batch_entries,
        "phase_s": args.phase_s,
        "quick": args.quick,
        "follower_page_events": args.follower_page_events,
        "producer_nice": args.producer_nice,
        "keys": len(catalog.pairs),
        "entries_recorded": recorded_entries,
        "phases": {str(k): v for k, v in phases.items()},
        "target_entries_per_s": TARGET_ENTRIES_PER_S,
        "target_lag_p99_ms": TARGET_LAG_P99_MS,
        "targets_met": (top["entries_per_s"] >= TARGET_ENTRIES_PER_S
                        and (top["lag_p99_ms"] or 1e9) < TARGET_LAG_P99_MS),
        "checks_passed": not failures,
    }
    for count, figures in phases.items():
        result[f"entries_per_s_{count}"] = figures["entries_per_s"]
    return result, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 s per phase (default 30 s)")
    parser.add_argument("--phase-s", type=float, default=None, help="seconds per phase (overrides --quick)")
    parser.add_argument("--batch-entries", type=int, default=500, help="usage entries per batch (default 500)")
    parser.add_argument("--producers", type=lambda s: sorted({int(x) for x in s.split(",")}), default=[1, 4, 16],
                        help="producer counts, one phase each (default 1,4,16; the largest gives entries_per_s)")
    parser.add_argument("--follower-page-events", type=int, default=100,
                        help="the live follower's page size (default 100, as the service runs it)")
    parser.add_argument("--producer-nice", type=int, default=0,
                        help="nice increment for the producer processes (default 0); on a small box where producers, "
                             "PostgreSQL and the follower share the cores, 10 keeps the follower from being starved")
    parser.add_argument("--projects", type=int, default=4, help="projects in the catalogue (default 4)")
    parser.add_argument("--keys-per-project", type=int, default=3, help="usage-charged keys per project (default 3)")
    parser.add_argument("--catch-up-timeout-s", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.phase_s is None:
        args.phase_s = 8.0 if args.quick else 30.0
    with fresh_database() as dsn:
        result, failures = asyncio.run(run(args, dsn))
    emit(result)
    if failures:
        log(f"{len(failures)} correctness check(s) failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
