"""The shared admission in Redis decides exactly as the domain's quota book (`domain.quota`), on a real
redis-server: hypothesis drives both through the same reservations, settlements, recordings and
balance snapshots, and every admission must agree. Also: what a burst leaves behind in Redis."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from adapters.redis_admission import PREFIX, RedisAdmissionStore
from domain.quota import QuotaBook


@dataclass(frozen=True)
class Reserve:
    both: bool  # the project and the key's cap, or the project only
    cost: int


@dataclass(frozen=True)
class Settle:
    which: int  # an index into the open requests
    cost: int


@dataclass(frozen=True)
class Record:
    which: list[int]  # indexes into the settled (or open) requests


@dataclass(frozen=True)
class SetBase:
    on_key: bool
    base: int | None
    back: int  # how many positions older than the newest this snapshot is (0: the newest)


# What an admission would find available, read without changing anything: base - reserved - settled costs
# the base does not hold; and the running sums checked against the entries they sum.
_AVAILABLE = """
local b = redis.call('HMGET', KEYS[1], 'base', 'pos', 'r', 'u')
local reserved = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do reserved = reserved + tonumber(v) end
local unp, held = 0, 0
local entries = redis.call('HGETALL', KEYS[4])
for j = 1, #entries, 2 do
  unp = unp + tonumber(entries[j + 1])
  local p = redis.call('ZSCORE', KEYS[5], entries[j])
  if not (p and b[2] and tonumber(p) <= tonumber(b[2])) then held = held + tonumber(entries[j + 1]) end
end
if tonumber(b[3] or '0') ~= reserved or tonumber(b[4] or '0') ~= unp then
  return {'sums', b[3] or false, reserved, b[4] or false, unp}
end
if not b[1] then return {'none'} end
return {'ok', tonumber(b[1]) - reserved - held}
"""


async def _available(redis: Redis, budget: str) -> int | None:
    keys = [f"{PREFIX}{part}:{budget}" for part in ("base", "res", "resx", "unp", "unpz")]
    answer = await redis.eval(_AVAILABLE, len(keys), *keys)
    assert answer[0] != b"sums", f"running sums differ from the entries: {answer}"
    return None if answer[0] == b"none" else int(answer[1])


OPS = st.one_of(
    st.builds(Reserve, st.booleans(), st.integers(0, 40)),
    st.builds(Settle, st.integers(0, 50), st.integers(0, 60)),
    st.builds(Record, st.lists(st.integers(0, 50), max_size=4)),
    st.builds(SetBase, st.booleans(), st.one_of(st.none(), st.integers(0, 300)), st.integers(0, 3)),
)


async def _scenario(url: str, ops: list[object]) -> None:
    redis = Redis.from_url(url)
    store, book = RedisAdmissionStore(redis), QuotaBook()
    project, key = f"project:{uuid.uuid4()}", f"key:{uuid.uuid4()}"
    open_: list[tuple[str, list[str]]] = []
    settled: list[str] = []
    position = 10
    try:
        for budget in (project, key):  # both start with a balance, at position 10
            book.set_base(budget, 100, position)
        await store.set_bases([(project, 100), (key, 100)], position)
        for step, op in enumerate(ops):
            if isinstance(op, Reserve):
                rid = f"req_{uuid.uuid4().hex}"
                budgets = [project, key] if op.both else [project]
                expected = book.reserve(rid, budgets, op.cost)
                decision = await store.admit("k", 0, 0, 1, op.cost, rid, budgets)
                got = budgets[int(decision.values[0])] if decision.outcome == "quota" else None
                assert decision.outcome in ("ok", "quota")
                assert got == expected, (step, op, expected, decision)
                if expected is None:
                    open_.append((rid, budgets))
            elif isinstance(op, Settle) and open_:
                rid, budgets = open_.pop(op.which % len(open_))
                book.settle(rid, op.cost)
                await store.settle("k", rid, op.cost, 0, 0, budgets)
                if op.cost:
                    settled.append(rid)
            elif isinstance(op, Record):
                # a batch is recorded at a log position past every snapshot so far (the log only grows);
                # what the gateway passes on is the requests that cost credits, settled or still open
                pool = settled + [rid for rid, _ in open_]
                rids = sorted({pool[i % len(pool)] for i in op.which}) if pool else []
                position += 1
                book.recorded(rids, position)
                await store.recorded(rids, position)
            elif isinstance(op, SetBase):
                position += 1
                snapshot = position - op.back
                budget = key if op.on_key else project
                book.set_base(budget, op.base, snapshot)
                await store.set_bases([(budget, op.base)], snapshot)
            for budget in (project, key):
                assert await _available(redis, budget) == book.available(budget), (step, op, budget)
    finally:
        await redis.aclose()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(OPS, max_size=60))
# a request reported recorded twice (a batch flushed again) keeps its first position, settled before or after
@example(ops=[Reserve(False, 0), Settle(0, 1), Record([0]), Record([0]), SetBase(False, 0, 2)])
@example(ops=[Reserve(False, 5), Record([0]), Record([0]), Settle(0, 4), SetBase(False, 96, 2)])
def test_redis_admission_decides_as_the_quota_book(redis_url: str, ops: list[object]) -> None:
    asyncio.run(_scenario(redis_url, ops))


async def test_a_burst_leaves_nothing_behind(redis_url: str) -> None:
    """2,000 requests open on one project at once, settled, recorded and projected: nothing of theirs is
    left in Redis. (What an admission costs with thousands open: `scripts/bench_load.py --workers 2`.)"""
    redis = Redis.from_url(redis_url)
    store = RedisAdmissionStore(redis)
    project = f"project:{uuid.uuid4()}"
    try:
        await store.set_bases([(project, 10**12)], 1)
        tag = uuid.uuid4().hex
        burst = [f"req_{tag}_{i}" for i in range(2_000)]
        for rid in burst:
            assert (await store.admit("k", 0, 0, 1, 5, rid, [project])).outcome == "ok"
        base = await redis.hgetall(f"{PREFIX}base:{project}")
        assert int(base[b"r"]) == 10_000 and int(base.get(b"u", 0)) == 0
        for rid in burst:
            await store.settle("k", rid, 4, 0, 0, [project])
        await store.recorded(burst[:1_000], 2)
        await store.set_bases([(project, 10**12 - 4_000)], 2)  # the read model now holds the first 1,000
        await store.recorded(burst[1_000:], 3)
        await store.set_bases([(project, 10**12 - 8_000)], 3)
        base = await redis.hgetall(f"{PREFIX}base:{project}")
        assert {k.decode(): v.decode() for k, v in base.items()} == {"base": str(10**12 - 8_000), "pos": "3",
                                                                       "r": "0", "u": "0"}
        leftovers = [k async for k in redis.scan_iter(match=f"{PREFIX}*{project}*")]
        assert sorted(k.decode() for k in leftovers) == [f"{PREFIX}base:{project}"]
        assert not [k async for k in redis.scan_iter(match=f"{PREFIX}own:req_{tag}_*")]
        assert not [k async for k in redis.scan_iter(match=f"{PREFIX}rec:req_{tag}_*")]
    finally:
        await redis.aclose()
