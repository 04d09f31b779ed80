"""Builders for integration tests: an Accounting on PostgreSQL, a follower, a sample history."""

from __future__ import annotations

import contextlib
import random
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg

from adapters.database import create_pool, eventstore_env
from domain.access import SYSTEM
from domain.accounting import Accounting
from domain.api_key import KeySettings
from domain.catalog import BackendKind, Deployment, ModelExists
from domain.pricing import Prices
from domain.project import Role
from domain.usage import UsageEntry
from projections.base import SCHEMA
from projections.catalog import all_projections

PEPPER = b"integration-test-pepper-" + b"p" * 16


def accounting(url: str) -> Accounting:
    return Accounting(env=eventstore_env(url), key_pepper=PEPPER)


async def pool(url: str) -> asyncpg.Pool:
    return await create_pool(url, size_max=4)


def entries(project_id: UUID, key_id: UUID, n: int, *, model: str = "llama-3", cost: int = 3,
            start_ms: int | None = None) -> list[UsageEntry]:
    base = start_ms if start_ms is not None else int(time.time() * 1000)
    return [UsageEntry(uuid.uuid4().hex, project_id, key_id, model, "vllm-a", 20 + i % 7, i % 3, 10 + i % 5,
                       cost, base + i * 1000, base + i * 1000 + 350, estimated=i % 11 == 0) for i in range(n)]


def sample_history(app: Accounting, rng: random.Random, *, projects: int = 3, batches: int = 12) -> dict[str, Any]:
    """A varied history: users, projects, members, grants, corrections, keys edited and revoked, usage."""
    users = [app.register_user(f"user{i}-{uuid.uuid4().hex[:6]}@example.org", f"User {i}") for i in range(5)]
    project_ids, key_ids = [], []
    for p in range(projects):
        pid = app.create_project(SYSTEM, f"proj-{p}-{uuid.uuid4().hex[:6]}", f"Project {p}", users[p % 5])
        project_ids.append(pid)
        app.add_member(SYSTEM, pid, users[(p + 1) % 5], Role.MANAGER)
        app.add_member(SYSTEM, pid, users[(p + 2) % 5], Role.USER)
        app.grant_credits(SYSTEM, pid, rng.randint(1_000, 1_000_000), "allocation")
        app.correct_credits(SYSTEM, pid, -rng.randint(1, 500), "correction")
        for owner in (users[(p + 1) % 5], users[(p + 2) % 5]):
            key_id, _ = app.create_key(SYSTEM, pid, owner, KeySettings(name=f"key {p}", rpm_limit=60))
            key_ids.append((pid, key_id))
    for name in ("a", "b"):  # the models a key allows must be in the catalog
        with contextlib.suppress(ModelExists):
            app.add_model(SYSTEM, name, Deployment(name, BackendKind.OPENAI, "http://h", name),
                          Prices(1, 1, datetime(2020, 1, 1, tzinfo=UTC)))
    app.edit_key(SYSTEM, key_ids[0][1], KeySettings(name="renamed", tpm_limit=1000, allowed_models=("a", "b")))
    app.revoke_key(SYSTEM, key_ids[1][1])
    app.hand_over_creator(SYSTEM, project_ids[0], users[1])
    app.remove_member(SYSTEM, project_ids[0], users[2])
    for _ in range(batches):
        pid, kid = rng.choice(key_ids)
        app.record_usage(uuid.uuid4(), entries(pid, kid, rng.randint(1, 60), model=rng.choice(["m1", "m2"]),
                                               cost=rng.randint(0, 50), start_ms=rng.randint(0, 10**12)))
    return {"users": users, "projects": project_ids, "keys": key_ids}


async def snapshot(conn: asyncpg.Connection | Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every read-model table, rows sorted, for equality checks."""
    tables = [t for p in all_projections() for t in p.tables] + ["positions"]
    result = {}
    for table in tables:
        rows = await conn.fetch(f"SELECT * FROM {SCHEMA}.{table}")
        result[table] = sorted(tuple(r.values()) for r in rows)
    return result
