"""Shared pieces of the benchmarks in scripts/: a fresh database, a small catalogue, usage producers
in separate processes, read-model snapshots and the one-JSON-line report.

Not a module of the service: it is imported by `scripts/bench_ledger.py` and `scripts/bench_rebuild.py`
(which put this folder on `sys.path`) and by the producer processes they spawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import queue
import random
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

PEPPER = b"x" * 32
HOUR_MS = 3_600_000
# (model, deployment, credits per 1k prompt tokens, credits per 1k completion tokens)
MODELS = (
    ("gpt-4o-mini", "azure-eu-1", 15, 60),
    ("gpt-4o", "azure-eu-1", 250, 1000),
    ("llama-3.1-70b-instruct", "vllm-a100-1", 60, 60),
    ("mistral-small-24b", "vllm-l40-2", 10, 30),
    ("text-embedding-3-small", "azure-eu-1", 2, 0),
)
_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _T0:7.2f}s] {message}", file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    """The figures, as ONE JSON object on the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=True), flush=True)


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(fraction * len(ordered) + 0.999999) - 1))
    return ordered[rank]


def cpu_times() -> list[int]:
    """The machine's CPU time counters (user nice system idle iowait irq softirq steal), [] where unknown."""
    try:
        with open("/proc/stat") as stat:
            return [int(x) for x in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return []


def cpu_shares(before: list[int], after: list[int]) -> dict[str, float]:
    """How busy the machine's CPUs were between two `cpu_times()`, and how much the hypervisor stole."""
    if len(before) < 8 or len(after) < 8:
        return {}
    delta = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(delta) or 1
    return {"cpu_busy_share": round(1 - (delta[3] + delta[4]) / total, 3),
            "cpu_steal_share": round(delta[7] / total, 3)}


# --------------------------------------------------------------------------- the database


def _with_dbname(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "dbname"]
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(dbname), urlencode(query), parts.fragment))


def _admin(url: str, statement: str) -> None:
    import psycopg  # noqa: PLC0415

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement)  # type: ignore[arg-type]


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A DSN to an empty database: a new database on $DATABASE_URL's server (dropped after), or a
    throwaway embedded server in a temporary folder (stopped and removed after)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        name = f"lwapi_bench_{uuid.uuid4().hex[:12]}"
        log(f"DATABASE_URL is set: creating database {name} on that server")
        _admin(url, f'CREATE DATABASE "{name}"')
        try:
            yield _with_dbname(url, name)
        finally:
            log(f"dropping database {name}")
            _admin(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        return
    from adapters.pg_embedded import EmbeddedPostgres  # noqa: PLC0415

    folder = Path(tempfile.mkdtemp(prefix="lwapi-bench-", dir="/tmp"))
    folder.chmod(0o755)  # the server runs as an unprivileged account when we are root
    server = EmbeddedPostgres(folder)
    try:
        log(f"starting a throwaway PostgreSQL in {folder}")
        dsn = server.ensure_running().dsn()
        yield dsn
    finally:
        log("stopping the throwaway PostgreSQL")
        try:
            server.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def accounting_env(dsn: str, *, pool_size: int = 2, create_tables: bool = True) -> dict[str, str]:
    from adapters.database import eventstore_env  # noqa: PLC0415

    env = eventstore_env(dsn, pool_size=pool_size)
    env["CREATE_TABLE"] = "y" if create_tables else "n"  # concurrent CREATE OR REPLACE can collide
    return env


# --------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Catalog:
    """The (project, key) pairs usage is charged to, as hex ids (picklable for the producers)."""

    pairs: list[tuple[str, str]]
    users: int
    projects: int
    keys: int


def build_catalog(dsn: str, *, projects: int = 4, keys_per_project: int = 3) -> Catalog:
    """Users, projects, members, keys and grants (plus a rename, a correction, an edit, a revocation)
    through the Application; also creates the event store's tables."""
    from datetime import UTC, datetime  # noqa: PLC0415

    from domain.access import SYSTEM  # noqa: PLC0415
    from domain.accounting import Accounting  # noqa: PLC0415
    from domain.api_key import KeySettings  # noqa: PLC0415
    from domain.catalog import BackendKind, Deployment, ModelExists  # noqa: PLC0415
    from domain.pricing import Prices  # noqa: PLC0415
    from domain.project import Role  # noqa: PLC0415

    app = Accounting(env=accounting_env(dsn, create_tables=True), key_pepper=PEPPER)
    try:
        pairs: list[tuple[str, str]] = []
        users = keys = 0
        app.register_user("admin@bench.example", "Bench Admin", is_admin=True)
        users += 1
        for model, deployment, price_in, price_out in MODELS:  # keys may allow only catalogued models
            with contextlib.suppress(ModelExists):  # several catalogues in one database share the models
                app.add_model(SYSTEM, model, Deployment(deployment, BackendKind.OPENAI, "http://127.0.0.1:9/v1", model),
                              Prices(price_in * 1000, price_out * 1000, datetime(2020, 1, 1, tzinfo=UTC)))
        for p in range(projects):
            owner = app.register_user(f"owner{p}@bench.example", f"Owner {p}", subject=f"oidc|owner{p}")
            member = app.register_user(f"member{p}@bench.example", f"Member {p}")
            users += 2
            project_id = app.create_project(SYSTEM, f"bench-{p}", f"Bench project {p}", owner)
            app.add_member(SYSTEM, project_id, member, Role.USER)
            app.grant_credits(SYSTEM, project_id, 10**12, "benchmark grant")
            if p == 0:
                app.rename_project(SYSTEM, project_id, "Bench project zero")
                app.correct_credits(SYSTEM, project_id, 12_345, "benchmark correction")
            for k in range(keys_per_project):
                settings = KeySettings(name=f"key {p}.{k}", rpm_limit=600 if k else None,
                                       allowed_models=tuple(m[0] for m in MODELS[: 2 + k]))
                key_id, _ = app.create_key(SYSTEM, project_id, owner if k % 2 == 0 else member, settings)
                keys += 1
                pairs.append((project_id.hex, key_id.hex))
            spare_id, _ = app.create_key(SYSTEM, project_id, owner, KeySettings(name=f"spare {p}"))
            app.edit_key(SYSTEM, spare_id, KeySettings(name=f"spare {p} (edited)", tpm_limit=100_000))
            app.revoke_key(SYSTEM, spare_id)
            keys += 1
        return Catalog(pairs=pairs, users=users, projects=projects, keys=keys)
    finally:
        app.close()


# --------------------------------------------------------------------------- usage entries


class EntryMaker:
    """Realistic usage entries: random UUID request ids, lognormal token counts, a few models,
    started_at spread over the last `hours` hours, 1 % estimated (the backend reported no usage)."""

    def __init__(self, pairs: Sequence[tuple[str, str]], seed: int, hours: int = 6) -> None:
        self.rng = random.Random(seed)
        self.pairs = [(uuid.UUID(p), uuid.UUID(k)) for p, k in pairs]
        self.hours = hours
        self.now_ms = int(time.time() * 1000)

    def batch(self, n: int) -> list[Any]:
        from domain.usage import UsageEntry  # noqa: PLC0415

        rng = self.rng
        out = []
        for _ in range(n):
            project_id, key_id = rng.choice(self.pairs)
            model, deployment, price_in, price_out = rng.choice(MODELS)
            prompt = min(int(rng.lognormvariate(6.5, 1.1)) + 1, 120_000)
            cached = prompt // 2 if rng.random() < 0.3 else 0
            completion = 0 if price_out == 0 else min(int(rng.lognormvariate(5.0, 1.2)), 16_000)
            cost = (prompt * price_in + completion * price_out + 999) // 1000  # = the per-million prices below
            started = self.now_ms - rng.randrange(self.hours * HOUR_MS)
            finished = started + rng.randrange(150, 45_000)
            out.append(UsageEntry(str(uuid.uuid4()), project_id, key_id, model, deployment, prompt, cached,
                                  completion, cost, started, finished, rng.random() < 0.01,
                                  price_in * 1000, price_out * 1000, price_in * 1000))
        return out


# --------------------------------------------------------------------------- producer processes


@dataclass
class ProducerReport:
    index: int
    batches: list[tuple[int, float, int]] = field(default_factory=list)  # (position, committed at, entries)
    entries: int = 0
    cost_credits: int = 0
    make_s: float = 0.0
    record_s: float = 0.0


def producer_main(index: int, dsn: str, pairs: list[tuple[str, str]], batch_entries: int, seed: int,
                  nice: int, commands: Any, results: Any, hours: int = 6) -> None:
    """A producer process: its own Accounting; runs ("timed", start_at, seconds) or
    ("count", start_at, entries) commands until ("stop",). Times are time.monotonic(), which is
    CLOCK_MONOTONIC and so comparable between processes on Linux."""
    try:
        if nice:
            os.nice(nice)
        from domain.accounting import Accounting  # noqa: PLC0415

        app = Accounting(env=accounting_env(dsn, pool_size=1, create_tables=False), key_pepper=PEPPER)
        maker = EntryMaker(pairs, seed, hours)
        results.put(("ready", index, None))
        while True:
            command = commands.get()
            if command[0] == "stop":
                break
            kind, start_at, limit = command
            report = ProducerReport(index)
            deadline = start_at + limit  # used by "timed" only
            time.sleep(max(0.0, start_at - time.monotonic()))
            while True:
                if kind == "timed":
                    if time.monotonic() >= deadline:
                        break
                    n = batch_entries
                else:
                    n = min(batch_entries, limit - report.entries)
                    if n <= 0:
                        break
                t0 = time.monotonic()
                entries = maker.batch(n)
                t1 = time.monotonic()
                recorded = app.record_usage(uuid.uuid4(), entries)
                t2 = time.monotonic()
                _check_recorded(recorded, n)
                report.batches.append((recorded.position, t2, n))
                report.entries += n
                report.cost_credits += sum(e.cost_credits for e in entries)
                report.make_s += t1 - t0
                report.record_s += t2 - t1
            results.put(("done", index, report))
        app.close()
    except BaseException:  # report every failure to the parent rather than leave it waiting
        results.put(("error", index, traceback.format_exc()))
        raise


def _check_recorded(recorded: Any, entries: int) -> None:
    if recorded.already_recorded or recorded.entries != entries or recorded.position <= 0:
        raise RuntimeError(f"unexpected result {recorded}")


class Producers:
    """`count` producer processes (spawned once, reused by every phase)."""

    def __init__(self, count: int, dsn: str, catalog: Catalog, batch_entries: int, seed: int, *,
                 nice: int = 0, hours: int = 6) -> None:
        ctx = mp.get_context("spawn")
        self.results: Any = ctx.Queue()
        self.commands: list[Any] = [ctx.Queue() for _ in range(count)]
        self.processes = [
            ctx.Process(target=producer_main, name=f"producer-{i}", daemon=True,
                        args=(i, dsn, catalog.pairs, batch_entries, seed * 1000 + i, nice, self.commands[i],
                              self.results, hours))
            for i in range(count)
        ]
        for process in self.processes:
            process.start()

    def _get(self, timeout_s: float) -> tuple[str, int, Any]:
        try:
            kind, index, payload = self.results.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError("a producer did not answer in time") from None
        if kind == "error":
            raise RuntimeError(f"producer {index} failed:\n{payload}")
        return kind, index, payload

    async def _collect(self, count: int, timeout_s: float) -> list[Any]:
        loop = asyncio.get_running_loop()
        return [await loop.run_in_executor(None, self._get, timeout_s) for _ in range(count)]

    async def ready(self, timeout_s: float = 120.0) -> None:
        await self._collect(len(self.processes), timeout_s)

    async def run(self, producers: int, kind: str, limit: float | list[int], *, delay_s: float = 0.3,
                  timeout_s: float = 600.0) -> tuple[float, list[ProducerReport]]:
        """Start `producers` of them together; returns the start time and their reports."""
        start_at = time.monotonic() + delay_s
        for i in range(producers):
            per = limit[i] if isinstance(limit, list) else limit
            self.commands[i].put((kind, start_at, per))
        answers = await self._collect(producers, timeout_s)
        return start_at, sorted((payload for _, _, payload in answers), key=lambda r: r.index)

    def close(self) -> None:
        for commands in self.commands:
            commands.put(("stop",))
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


# --------------------------------------------------------------------------- read models


async def read_model_tables(conn: Any) -> list[str]:
    rows = await conn.fetch("SELECT table_name FROM information_schema.tables "
                            "WHERE table_schema = 'lwapi_read' AND table_type = 'BASE TABLE' ORDER BY 1")
    return [r["table_name"] for r in rows]


async def snapshot(conn: Any) -> dict[str, list[str]]:
    """Every `lwapi_read` table as its rows' text forms (row-to-text casts), in a total order."""
    out = {}
    for table in await read_model_tables(conn):
        rows = await conn.fetch(f'SELECT t::text AS r FROM lwapi_read."{table}" t ORDER BY t::text COLLATE "C"')
        out[table] = [r["r"] for r in rows]
    return out


async def usage_totals(conn: Any) -> dict[str, int]:
    """Entry and credit totals as each usage read model and the claims table see them."""
    row = await conn.fetchrow(
        "SELECT (SELECT coalesce(sum(requests), 0) FROM lwapi_read.balances) AS balances_requests, "
        "(SELECT coalesce(sum(charged_credits), 0) FROM lwapi_read.balances) AS balances_charged, "
        "(SELECT coalesce(sum(requests), 0) FROM lwapi_read.usage_rollups) AS rollups_requests, "
        "(SELECT coalesce(sum(cost_credits), 0) FROM lwapi_read.usage_rollups) AS rollups_cost, "
        "(SELECT coalesce(sum(requests), 0) FROM lwapi_read.key_usage) AS key_usage_requests, "
        "(SELECT count(*) FROM public.usage_request_claims) AS claims, "
        "(SELECT count(DISTINCT request_id) FROM public.usage_request_claims) AS distinct_claims, "
        "(SELECT count(*) FROM public.accounting_events WHERE topic LIKE '%UsageBatch.Recorded') AS batches")
    return {k: int(v) for k, v in dict(row).items()}


def check(failures: list[str], ok: bool, message: str) -> None:
    if not ok:
        failures.append(message)
        log(f"CHECK FAILED: {message}")
