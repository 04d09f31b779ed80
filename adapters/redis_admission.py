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

PREFIX = "lwapi:"
RESERVATION_TTL_S = 3_900  # longer than any request may run (timeouts cap them at an hour)
TAT_TTL_S = 120
BATCH_POSITIONS = PREFIX + "batch"

_ADMIT = """
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
local batch = KEYS[#KEYS]
for i = 3, #KEYS - 1, 3 do
  local b = redis.call('HMGET', KEYS[i], 'base', 'pos')
  local reserved = 0
  local res = redis.call('HGETALL', KEYS[i + 1])
  for j = 1, #res, 2 do
    local sep = string.find(res[j + 1], ':')
    if tonumber(string.sub(res[j + 1], sep + 1)) < now then redis.call('HDEL', KEYS[i + 1], res[j])
    else reserved = reserved + tonumber(string.sub(res[j + 1], 1, sep - 1)) end
  end
  if b[1] then
    local base, pos = tonumber(b[1]), tonumber(b[2])
    local unp = 0
    local entries = redis.call('HGETALL', KEYS[i + 2])
    for j = 1, #entries, 2 do
      local p = redis.call('HGET', batch, entries[j])
      if p and tonumber(p) <= pos then
        redis.call('HDEL', KEYS[i + 2], entries[j])
        redis.call('HDEL', batch, entries[j])
      else unp = unp + tonumber(entries[j + 1]) end
    end
    if base - reserved - unp < cost then
      local rrem0, rreset0 = untouched(KEYS[1], rpm)
      local trem0, treset0 = untouched(KEYS[2], tpm)
      return {'quota', tostring((i - 3) / 3), rrem0, rreset0, trem0, treset0}
    end
  end
end
for i = 3, #KEYS - 1, 3 do redis.call('HSET', KEYS[i + 1], rid, cost .. ':' .. (now + ttl)) end
if rpm > 0 then redis.call('SET', KEYS[1], tostring(rtat), 'EX', TAT_TTL) end
if tpm > 0 then redis.call('SET', KEYS[2], tostring(ttat), 'EX', TAT_TTL) end
return {'ok', rrem, tostring(rreset), trem, tostring(treset)}
""".replace("TAT_TTL", str(TAT_TTL_S))

_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rid, cost, tpm, delta = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 2, #KEYS, 2 do
  redis.call('HDEL', KEYS[i], rid)
  if cost > 0 then redis.call('HSET', KEYS[i + 1], rid, cost) end
end
if tpm > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  local interval = 60 / tpm
  local new
  if delta < 0 then new = math.max(now, tat + delta * interval) else new = math.max(tat, now) + delta * interval end
  redis.call('SET', KEYS[1], tostring(new), 'EX', TAT_TTL)
end
return 1
""".replace("TAT_TTL", str(TAT_TTL_S))

_SET_BASE = """
local cur = redis.call('HGET', KEYS[1], 'pos')
if cur and tonumber(ARGV[2]) < tonumber(cur) then return 0 end
if ARGV[1] == '' then redis.call('HDEL', KEYS[1], 'base') else redis.call('HSET', KEYS[1], 'base', ARGV[1]) end
redis.call('HSET', KEYS[1], 'pos', ARGV[2])
return 1
"""


@dataclass(frozen=True)
class SharedDecision:
    outcome: str  # "ok", "rpm", "tpm" or "quota"
    values: list[Any]
    """ok: requests remaining and reset, tokens remaining and reset (after this request). A refusal:
    the retry delay (rpm, tpm) or the refusing budget's index (quota), then the same four, untouched."""


def _budget_keys(budgets: Sequence[str]) -> list[str]:
    keys = []
    for b in budgets:
        keys += [f"{PREFIX}base:{b}", f"{PREFIX}res:{b}", f"{PREFIX}unp:{b}"]
    return keys


class RedisAdmissionStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._admit = redis.register_script(_ADMIT)
        self._settle = redis.register_script(_SETTLE)
        self._set_base = redis.register_script(_SET_BASE)

    async def admit(self, key_id: str, rpm: int, tpm: int, tokens: int, cost: int, request_id: str,
                    budgets: Sequence[str]) -> SharedDecision:
        keys = [f"{PREFIX}rpm:{key_id}", f"{PREFIX}tpm:{key_id}", *_budget_keys(budgets), BATCH_POSITIONS]
        result = await self._admit(keys=keys, args=[rpm, tpm, tokens, cost, request_id, RESERVATION_TTL_S])
        return SharedDecision(_text(result[0]), [_text(v) for v in result[1:]])

    async def settle(self, key_id: str, request_id: str, cost: int, tpm: int, tokens_delta: int,
                     budgets: Sequence[str]) -> None:
        keys = [f"{PREFIX}tpm:{key_id}"]
        for b in budgets:
            keys += [f"{PREFIX}res:{b}", f"{PREFIX}unp:{b}"]
        await self._settle(keys=keys, args=[request_id, cost, tpm, tokens_delta])

    async def set_bases(self, bases: Iterable[tuple[str, int | None]], position: int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for budget, base in bases:
                await self._set_base(keys=[f"{PREFIX}base:{budget}"], args=["" if base is None else base, position],
                                     client=pipe)
            await pipe.execute()

    async def recorded(self, request_ids: Sequence[str], position: int) -> None:
        if request_ids:
            await self.redis.hset(BATCH_POSITIONS, mapping=dict.fromkeys(request_ids, position))


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
