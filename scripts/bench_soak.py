#!/usr/bin/env python
"""Benchmark: a long soak of mixed traffic through one gateway process — memory stays flat, every answered
request is metered once, and the balance identity holds at the end.

The stack is `scripts/bench_gateway.py`'s (`running_stack`: a fresh database, the fake upstream, `lwapi
serve` with every check and metering on, pinned to core 0; the upstream, this process and PostgreSQL on
core 1). `--clients` connections loop over four kinds of request in turn: a streamed chat completion
(20 tokens, 2 ms apart), a whole one, an embedding, and one with a revoked key (refused, 401); an unknown
key is tried every 4 s as well (more would trip the bad-key throttle, which is tested elsewhere). The
gateway's RSS is sampled every 2 s. After the first fifth of the run (warm-up), a least-squares line
through the samples gives the growth in MB per minute; `rss_growth_mb_per_10min` projects it.

At the end: once the projections caught up, the ledger must hold exactly the request ids the gateway
answered 200 (each once), and the project's balance must equal its grants minus the ledger's charges.

    .venv/bin/python scripts/bench_soak.py --quick        # 60 s
    .venv/bin/python scripts/bench_soak.py                # 20 minutes

Last line, one JSON object: duration_s, requests (answered, by kind and status), errors (answers other
than expected, dropped connections), rss_mb_start (after warm-up), rss_mb_end, rss_mb_peak,
rss_growth_mb_per_10min, usage_entries_recorded, requests_metered_expected, balance_identity_holds,
metered_ok, quick. Exits 1 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gateway import GRANT_CREDITS, MODEL, PEPPER, Stack, running_stack
from bench_load import proc_status_kb, wait_metered
from bench_support import check, emit, fresh_database, log

SAMPLE_INTERVAL_S = 2.0
KINDS = ("stream", "whole", "embedding", "revoked_key")
UNKNOWN_KEY_INTERVAL_S = 4.0  # unknown keys stay under the bad-key throttle's 30 a minute from one address


def _body(kind: str) -> dict[str, Any]:
    if kind == "embedding":
        return {"model": MODEL, "input": ["soak test sentence one", "and two"]}
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say hello to the soak."}],
            "stream": kind == "stream", "max_tokens": 40, "fake_tokens": 20, "fake_delay_ms": 2}


async def client(base: str, secrets: dict[str, str], stop: float, answered: list[str], counts: Counter[str],
                 errors: list[str], offset: int) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30) as h:
        i = offset
        while time.monotonic() < stop:
            kind = KINDS[i % len(KINDS)]
            i += 1
            path = "/embeddings" if kind == "embedding" else "/chat/completions"
            key = secrets.get(kind, secrets["good"])
            try:
                r = await h.post(path, json=_body(kind), headers={"Authorization": f"Bearer {key}"})
            except httpx.HTTPError as e:
                errors.append(f"{kind}: {e!r}")
                continue
            counts[f"{kind}:{r.status_code}"] += 1
            expected = 401 if kind in ("revoked_key", "unknown_key") else 200
            if r.status_code != expected:
                errors.append(f"{kind}: {r.status_code} {r.text[:200]}")
            elif kind == "stream" and not r.text.rstrip().endswith("data: [DONE]"):
                errors.append("stream without [DONE]")
            elif expected == 200:
                answered.append(r.headers["x-request-id"])


async def unknown_keys(base: str, secrets: dict[str, str], stop: float, counts: Counter[str],
                       errors: list[str]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30) as h:
        while time.monotonic() < stop:
            r = await h.post("/chat/completions", json=_body("whole"),
                             headers={"Authorization": f"Bearer {secrets['unknown_key']}"})
            counts[f"unknown_key:{r.status_code}"] += 1
            if r.status_code != 401:
                errors.append(f"unknown_key: {r.status_code} {r.text[:200]}")
            await asyncio.sleep(UNKNOWN_KEY_INTERVAL_S)


def revoked_key(stack: Stack) -> str:
    """A key of the benchmark's project, revoked (the gateway refuses it without counting a bad key)."""
    from adapters.database import eventstore_env  # noqa: PLC0415
    from domain.access import SYSTEM  # noqa: PLC0415
    from domain.accounting import Accounting  # noqa: PLC0415
    from domain.api_key import KeySettings  # noqa: PLC0415

    app = Accounting(env=eventstore_env(stack.dsn), key_pepper=PEPPER)
    try:
        owner = app.get_project(stack.project_id).creator_id
        key_id, secret = app.create_key(SYSTEM, stack.project_id, owner, KeySettings(name="revoked"))
        app.revoke_key(SYSTEM, key_id)
    finally:
        app.close()
    time.sleep(1.5)  # the gateway learns of it within a second
    return secret


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    n = len(samples)
    if n < 3:
        return 0.0
    mean_t = sum(t for t, _ in samples) / n
    mean_m = sum(m for _, m in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    return 60 * sum((t - mean_t) * (m - mean_m) for t, m in samples) / var if var else 0.0


async def run(args: argparse.Namespace, stack: Stack) -> tuple[dict[str, Any], list[str]]:
    base = f"http://127.0.0.1:{stack.service_port}/v1"
    answered: list[str] = []
    counts: Counter[str] = Counter()
    errors: list[str] = []
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    stop = started + args.duration_s
    secrets = {"good": stack.secret, "revoked_key": revoked_key(stack), "unknown_key": "sk-lw-" + "0" * 43}
    workers = [asyncio.create_task(client(base, secrets, stop, answered, counts, errors, i))
               for i in range(args.clients)]
    workers.append(asyncio.create_task(unknown_keys(base, secrets, stop, counts, errors)))
    while time.monotonic() < stop:
        await asyncio.sleep(SAMPLE_INTERVAL_S)
        samples.append((time.monotonic() - started, proc_status_kb(stack.gateway_pid, "VmRSS") / 1024))
        if len(samples) % 30 == 0:
            log(f"{samples[-1][0]:7.0f} s: {sum(counts.values()):,} requests, RSS {samples[-1][1]:.1f} MB, "
                f"{len(errors)} errors")
    await asyncio.gather(*workers)
    steady = [s for s in samples if s[0] >= args.duration_s / 5]
    balance, ledger, waited = await wait_metered(stack.dsn, stack.project_id, len(answered))
    failures: list[str] = []
    check(failures, not errors, f"{len(errors)} unexpected answers, e.g. {errors[:3]}")
    check(failures, len(ledger) == len(set(ledger)) == len(answered) and set(ledger) == set(answered),
          f"ledger holds {len(ledger)} rows ({len(set(ledger))} distinct) for {len(answered)} answered requests")
    charged = await _ledger_charged(stack.dsn, stack.project_id)
    identity = balance.get("charged_credits") == charged and await _remaining(stack.dsn, stack.project_id) == (
        GRANT_CREDITS - charged)
    check(failures, identity, f"balance {balance} against ledger charges {charged}")
    result = {
        "duration_s": round(time.monotonic() - started, 1), "clients": args.clients,
        "requests": dict(sorted(counts.items())), "errors": len(errors),
        "rss_mb_start": round(steady[0][1], 1) if steady else None,
        "rss_mb_end": round(samples[-1][1], 1) if samples else None,
        "rss_mb_peak": round(max(m for _, m in samples), 1) if samples else None,
        "rss_growth_mb_per_10min": round(10 * slope_mb_per_min(steady), 2),
        "requests_metered_expected": len(answered), "usage_entries_recorded": len(ledger),
        "metering_wait_s": round(waited, 2), "balance_identity_holds": identity, "metered_ok": not failures,
        "quick": args.quick,
    }
    return result, failures


async def _ledger_charged(dsn: str, project_id: Any) -> int:
    import asyncpg  # noqa: PLC0415
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT coalesce(sum(cost_credits), 0) FROM lwapi_read.ledger_usage "
                                       "WHERE project_id = $1", project_id))
    finally:
        await conn.close()


async def _remaining(dsn: str, project_id: Any) -> int:
    import asyncpg  # noqa: PLC0415
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT remaining_credits FROM lwapi_read.balances WHERE project_id = $1",
                                       project_id))
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 s instead of 20 minutes")
    parser.add_argument("--duration-s", type=float, default=None)
    parser.add_argument("--clients", type=int, default=16, help="connections looping over the request kinds")
    parser.add_argument("--gateway-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    args = parser.parse_args()
    args.duration_s = args.duration_s or (60.0 if args.quick else 1200.0)
    # what running_stack reads besides the cores (the fake upstream keeps uvloop: timing to the
    # millisecond does not matter here, its capacity for thousands of streams does)
    args.profile, args.server, args.upstream_loop = None, "uvicorn", "auto"
    if args.duration_s < 10 or args.clients < 1:
        parser.error("--duration-s must be at least 10 and --clients positive")
    os.sched_setaffinity(0, {args.client_cpu})
    with fresh_database() as dsn, running_stack(args, dsn) as stack:
        result, failures = asyncio.run(run(args, stack))
    result["failures"] = failures
    emit(result)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
