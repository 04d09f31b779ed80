"""Rate limits and credit reservations shared by every gateway process, in Redis.

Imports: stdlib, redis. The same rules as `domain.limits` (GCRA) and `domain.quota`
(base − reserved − unprojected), run atomically as Lua scripts on Redis' own clock, so that any
number of processes on any number of hosts admit as one. Budgets' bases are written by every
process's key index, monotonically by log position. A reservation carries a deadline: a process
that dies with requests open cannot hold credits for longer than `RESERVATION_TTL_S`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

PREFIX = "lwapi:2:"  # the layout's version: a process of another layout never reads these keys
RESERVATION_TTL_S = 3_900  # longer than any request may run (timeouts cap them at an hour)
SETTLED_TTL_S = 86_400  # how long a settled request waits for its batch to be recorded (a database outage)
TAT_TTL_S = 120

# Per budget b: `base:b` is a hash {base, pos: the read model's balance and its log position; r: the
# credits reserved; u: the credits settled but not yet in the read model}. `res:b` holds each open
# reservation's credits, `resx:b` its deadline (sorted); `unp:b` each settled request's credits until the
# read model includes it, `unpz:b` the log position of its batch once recorded (sorted). The sums make an
# admission cost O(log n) in the n requests open, not O(n): what expired or got projected is found by
# range on the sorted sets. A request's usage may be recorded before its settlement arrives (a slow
# client holds the settlement back): `own:<rid>` tells `recorded` which budgets a settled request is in,
# `rec:<rid>` tells a late settlement where its batch is; both expire after `SETTLED_TTL_S`. Only requests
# that cost credits are settled into `unp` and passed to `recorded`.

# Drop from `entries` (request id -> credits) those that `order` scores at or below `bound`, and take
# their credits off the budget's running sum `field`: reservations past their deadline (r), settled costs
# the read model now holds (u).
_PRUNE = """
local function release(base, field, entries, order, bound)
  local gone = redis.call('ZRANGEBYSCORE', order, '-inf', bound)
  if #gone == 0 then return end
  local freed = 0
  for _, r in ipairs(gone) do
    freed = freed + tonumber(redis.call('HGET', entries, r) or '0')
    redis.call('HDEL', entries, r)
  end
  redis.call('ZREMRANGEBYSCORE', order, '-inf', bound)
  if freed > 0 then redis.call('HINCRBY', base, field, -freed) end  -- Redis takes no '-0'
end
"""

_ADMIT = _PRUNE + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm, tpm, tokens, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local rid, ttl = ARGV[5], tonumber(ARGV[6])
local W = 60
local function gcra(key, limit, n)
  if limit == 0 then return true, 0, 0, 0, 0 end
  local interval = W / limit
  local base = math.max(tonumber(redis.call('GET', key) or '0'), now)
  local new = base + n * interval
  local ahead = new - now
  if n > limit or ahead > W + 1e-9 then
    local retry = -1
    if n <= limit then retry = math.max(0, ahead - W) end
    return false, new, retry, math.max(0, math.min(limit, math.floor((W - (base - now)) / interval + 1e-9))), base - now
  end
  return true, new, 0, math.max(0, math.min(limit, math.floor((W - ahead) / interval + 1e-9))), ahead
end
local function untouched(key, limit)  -- a limit's state as a refused request leaves it
  local _, _, _, rem, reset = gcra(key, limit, 0)
  return rem, tostring(reset)
end
local ok, rtat, rretry, rrem, rreset = gcra(KEYS[1], rpm, 1)
local n = tokens
if tpm > 0 then n = math.min(tokens, tpm) end
if not ok then
  local trem0, treset0 = untouched(KEYS[2], tpm)
  return {'rpm', tostring(rretry), rrem, tostring(rreset), trem0, treset0}
end
local ok2, ttat, tretry, trem, treset = gcra(KEYS[2], tpm, n)
if not ok2 then
  local rrem0, rreset0 = untouched(KEYS[1], rpm)
  return {'tpm', tostring(tretry), rrem0, rreset0, trem, tostring(treset)}
end
for i = 3, #KEYS, 5 do
  release(KEYS[i], 'r', KEYS[i + 1], KEYS[i + 2], now)
  local b = redis.call('HMGET', KEYS[i], 'base', 'pos')
  if b[1] then
    release(KEYS[i], 'u', KEYS[i + 3], KEYS[i + 4], b[2])
    local sums = redis.call('HMGET', KEYS[i], 'r', 'u')
    if tonumber(b[1]) - tonumber(sums[1] or '0') - tonumber(sums[2] or '0') < cost then
      local rrem0, rreset0 = untouched(KEYS[1], rpm)
      local trem0, treset0 = untouched(KEYS[2], tpm)
      return {'quota', tostring((i - 3) / 5), rrem0, rreset0, trem0, treset0}
    end
  end
end
for i = 3, #KEYS, 5 do
  if redis.call('HSETNX', KEYS[i + 1], rid, cost) == 1 then
    redis.call('ZADD', KEYS[i + 2], now + ttl, rid)
    redis.call('HINCRBY', KEYS[i], 'r', cost)
  end
end
if rpm > 0 then redis.call('SET', KEYS[1], tostring(rtat), 'EX', TAT_TTL) end
if tpm > 0 then redis.call('SET', KEYS[2], tostring(ttat), 'EX', TAT_TTL) end
return {'ok', rrem, tostring(rreset), trem, tostring(treset)}
""".replace("TAT_TTL", str(TAT_TTL_S))

_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rid, cost, tpm, delta, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[6]
local own, rec = KEYS[#KEYS - 1], KEYS[#KEYS]
local batch = redis.call('GET', rec)
for i = 2, #KEYS - 2, 5 do
  local held = redis.call('HGET', KEYS[i + 1], rid)
  if held then
    redis.call('HDEL', KEYS[i + 1], rid)
    redis.call('ZREM', KEYS[i + 2], rid)
    if tonumber(held) > 0 then redis.call('HINCRBY', KEYS[i], 'r', -tonumber(held)) end
  end
  if cost > 0 and redis.call('HSETNX', KEYS[i + 3], rid, cost) == 1 then
    redis.call('HINCRBY', KEYS[i], 'u', cost)
    if batch then redis.call('ZADD', KEYS[i + 4], batch, rid) end
  end
end
if batch then redis.call('DEL', rec) elseif cost > 0 then redis.call('SET', own, ARGV[5], 'EX', ttl) end
if tpm > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  local interval = 60 / tpm
  local new
  if delta < 0 then new = math.max(now, tat + delta * interval) else new = math.max(tat, now) + delta * interval end
  redis.call('SET', KEYS[1], tostring(new), 'EX', TAT_TTL)
end
return 1
""".replace("TAT_TTL", str(TAT_TTL_S))

# KEYS: own:<rid>, rec:<rid> for each request id, in pairs; ARGV: the batch's position, the TTL, then the
# budgets' unp and unpz key prefixes. The budgets a settled request is in are read from own:<rid>, so
# their keys are derived here (one Redis, not a cluster: see docs/deploy.md).
_RECORDED = """
local pos, ttl, unp, unpz = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
for i = 1, #KEYS, 2 do
  local budgets = redis.call('GET', KEYS[i])
  if budgets then
    local rid = string.sub(KEYS[i], #ARGV[5] + 1)
    for b in string.gmatch(budgets, '[^,]+') do
      if redis.call('HEXISTS', unp .. b, rid) == 1 then redis.call('ZADD', unpz .. b, 'NX', pos, rid) end
    end
    redis.call('DEL', KEYS[i])
  else
    redis.call('SET', KEYS[i + 1], pos, 'EX', ttl, 'NX')  -- reported again: the first position stands
  end
end
return 1
"""

_SET_BASE = _PRUNE + """
local cur = redis.call('HGET', KEYS[1], 'pos')
if cur and tonumber(ARGV[2]) < tonumber(cur) then return 0 end
if ARGV[1] == '' then redis.call('HDEL', KEYS[1], 'base') else redis.call('HSET', KEYS[1], 'base', ARGV[1]) end
redis.call('HSET', KEYS[1], 'pos', ARGV[2])
release(KEYS[1], 'u', KEYS[2], KEYS[3], ARGV[2])  -- an idle budget lets go of what the read model now holds
return 1
"""


@dataclass(frozen=True)
class SharedDecision:
    outcome: str  # "ok", "rpm", "tpm" or "quota"
    values: list[Any]
    """ok: requests remaining and reset, tokens remaining and reset (after this request). A refusal:
    the retry delay (rpm, tpm) or the refusing budget's index (quota), then the same four, untouched."""


def _budget_keys(budget: str) -> list[str]:
    return [f"{PREFIX}{part}:{budget}" for part in ("base", "res", "resx", "unp", "unpz")]


class RedisAdmissionStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._admit = redis.register_script(_ADMIT)
        self._settle = redis.register_script(_SETTLE)
        self._recorded = redis.register_script(_RECORDED)
        self._set_base = redis.register_script(_SET_BASE)

    async def admit(self, key_id: str, rpm: int, tpm: int, tokens: int, cost: int, request_id: str,
                    budgets: Sequence[str]) -> SharedDecision:
        keys = [f"{PREFIX}rpm:{key_id}", f"{PREFIX}tpm:{key_id}", *(k for b in budgets for k in _budget_keys(b))]
        result = await self._admit(keys=keys, args=[rpm, tpm, tokens, cost, request_id, RESERVATION_TTL_S])
        return SharedDecision(_text(result[0]), [_text(v) for v in result[1:]])

    async def settle(self, key_id: str, request_id: str, cost: int, tpm: int, tokens_delta: int,
                     budgets: Sequence[str]) -> None:
        keys = [f"{PREFIX}tpm:{key_id}", *(k for b in budgets for k in _budget_keys(b)),
                f"{PREFIX}own:{request_id}", f"{PREFIX}rec:{request_id}"]
        await self._settle(keys=keys, args=[request_id, cost, tpm, tokens_delta, ",".join(budgets), SETTLED_TTL_S])

    async def set_bases(self, bases: Iterable[tuple[str, int | None]], position: int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for budget, base in bases:
                base_key, _, _, unp, unpz = _budget_keys(budget)
                await self._set_base(keys=[base_key, unp, unpz], args=["" if base is None else base, position],
                                     client=pipe)
            await pipe.execute()

    async def recorded(self, request_ids: Sequence[str], position: int) -> None:
        """These requests' usage is in the log at `position`; give only those that cost credits (one
        script per 500 ids)."""
        for start in range(0, len(request_ids), 500):
            keys = [k for rid in request_ids[start:start + 500] for k in (f"{PREFIX}own:{rid}", f"{PREFIX}rec:{rid}")]
            await self._recorded(keys=keys, args=[position, SETTLED_TTL_S, f"{PREFIX}unp:", f"{PREFIX}unpz:",
                                                  f"{PREFIX}own:"])


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
