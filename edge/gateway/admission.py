"""Admission: a key's per-minute limits and the credit reservation, decided before forwarding.

Imports: stdlib, redis, adapters, domain, edge.gateway. `LocalAdmission` keeps the state in this
process (one gateway process needs nothing else); `SharedAdmission` keeps it in Redis so that
several processes or hosts admit as one, and falls back to its own process's state while Redis is
unreachable (each process then admits on its own: at most N processes' worth of over-admission,
logged, until Redis returns). Rate-limit decisions are taken without storing anything until the
credits are reserved, so a refused request changes nothing; `settle` corrects both by what the
request really used.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from uuid import UUID

from redis.exceptions import RedisError

from adapters.redis_admission import RedisAdmissionStore
from domain.errors import InvalidValue
from domain.limits import Decision, adjust, decide
from domain.pricing import Prices
from domain.quota import QuotaBook
from domain.validation import CREDITS_MAX
from edge.gateway.errors import GatewayError
from edge.gateway.key_index import KeyRecord

log = logging.getLogger(__name__)
KEYS_TRACKED_MAX = 1_000_000

Budget = tuple[str, UUID]


@dataclass
class Ticket:
    """What a request holds between admission and settlement."""

    request_id: str
    key: KeyRecord
    tokens_estimate: int
    cost_estimate: int
    headers: dict[str, str]
    budgets: list[Budget] = field(default_factory=list)
    shared: bool = False


def budgets_of(key: KeyRecord) -> list[Budget]:
    return [("project", key.project_id)] + ([("key", key.key_id)] if key.cap_credits is not None else [])


def reset_text(seconds: float) -> str:
    """OpenAI's duration format for x-ratelimit-reset-*: '1s', '6m0s', '150ms'."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def limit_headers(kind: str, limit: int, remaining: int, reset_s: float) -> dict[str, str]:
    return {f"x-ratelimit-limit-{kind}": str(limit), f"x-ratelimit-remaining-{kind}": str(remaining),
            f"x-ratelimit-reset-{kind}": reset_text(reset_s)}


def rate_limited(kind: str, limit: int, retry_s: float, headers: dict[str, str]) -> GatewayError:
    finite = math.isfinite(retry_s) and retry_s >= 0
    message = (f"Rate limit reached for {kind} per minute: limit {limit}. "
               + (f"Please try again in {reset_text(retry_s)}." if finite
                  else "This request is larger than the limit allows."))
    extra = {"retry-after": str(max(1, math.ceil(retry_s)))} if finite else {}
    return GatewayError(429, message, kind, "rate_limit_exceeded", headers={**headers, **extra})


def out_of_quota(on_key: bool, cost: int, headers: dict[str, str]) -> GatewayError:
    what = "key's usage cap" if on_key else "project's balance"
    return GatewayError(429, f"You exceeded your current quota: the {what} does not cover this request "
                        f"(estimated cost {cost} credits).", "insufficient_quota", "insufficient_quota",
                        headers=headers)


class LocalAdmission:
    def __init__(self, quota: QuotaBook | None = None) -> None:
        self.quota = quota or QuotaBook()
        self._rpm_tat: dict[UUID, float] = {}
        self._tpm_tat: dict[UUID, float] = {}

    async def admit(self, key: KeyRecord, request_id: str, tokens_estimate: int, prices: Prices,
                    prompt_max: int, completion_max: int) -> Ticket:
        return self.admit_now(key, request_id, tokens_estimate, reservation_cost(prices, prompt_max, completion_max))

    def admit_now(self, key: KeyRecord, request_id: str, tokens_estimate: int, cost: int) -> Ticket:
        now = time.monotonic()
        rpm = tpm = None
        if key.rpm_limit is not None:
            rpm = decide(key.rpm_limit, self._rpm_tat.get(key.key_id, 0.0), now, 1)
            if not rpm.allowed:
                raise rate_limited("requests", key.rpm_limit, rpm.retry_after_s, self._untouched(key, now))
        tokens = min(tokens_estimate, key.tpm_limit) if key.tpm_limit is not None else tokens_estimate
        if key.tpm_limit is not None:
            tpm = decide(key.tpm_limit, self._tpm_tat.get(key.key_id, 0.0), now, tokens)
            if not tpm.allowed:
                raise rate_limited("tokens", key.tpm_limit, tpm.retry_after_s, self._untouched(key, now))
        budgets = budgets_of(key)
        refused: Hashable | None = self.quota.reserve(request_id, budgets, cost)
        if refused is not None:
            raise out_of_quota(refused != budgets[0], cost, self._untouched(key, now))
        self._store(key.key_id, rpm, tpm)
        headers: dict[str, str] = {}
        if key.rpm_limit is not None and rpm is not None:
            headers |= limit_headers("requests", key.rpm_limit, rpm.remaining, rpm.reset_s)
        if key.tpm_limit is not None and tpm is not None:
            headers |= limit_headers("tokens", key.tpm_limit, tpm.remaining, tpm.reset_s)
        return Ticket(request_id, key, tokens, cost, headers, budgets)

    def _untouched(self, key: KeyRecord, now: float) -> dict[str, str]:
        """The limits' headers as a refused request leaves them: it spent nothing."""
        headers: dict[str, str] = {}
        for kind, limit, tats in (("requests", key.rpm_limit, self._rpm_tat), ("tokens", key.tpm_limit, self._tpm_tat)):
            if limit is not None:
                state = decide(limit, tats.get(key.key_id, 0.0), now, 0)
                headers |= limit_headers(kind, limit, state.remaining, state.reset_s)
        return headers

    def _store(self, key_id: UUID, rpm: Decision | None, tpm: Decision | None) -> None:
        if rpm is not None:
            self._rpm_tat[key_id] = rpm.tat_s
        if tpm is not None:
            self._tpm_tat[key_id] = tpm.tat_s
        if len(self._tpm_tat) > KEYS_TRACKED_MAX or len(self._rpm_tat) > KEYS_TRACKED_MAX:
            now = time.monotonic()  # a TAT in the past is the same as none: drop those to bound memory
            for table in (self._rpm_tat, self._tpm_tat):
                for stale in [k for k, tat in table.items() if tat <= now]:
                    del table[stale]

    async def settle(self, ticket: Ticket, tokens_used: int, cost_credits: int) -> None:
        self.settle_now(ticket, tokens_used, cost_credits)

    def settle_now(self, ticket: Ticket, tokens_used: int, cost_credits: int) -> None:
        self.quota.settle(ticket.request_id, cost_credits)
        key = ticket.key
        if key.tpm_limit is not None and key.key_id in self._tpm_tat:
            self._tpm_tat[key.key_id] = adjust(key.tpm_limit, self._tpm_tat[key.key_id], time.monotonic(),
                                               tokens_used - ticket.tokens_estimate)

    async def set_bases(self, bases: Sequence[tuple[Budget, int | None]], position: int) -> None:
        for budget, base in bases:
            self.quota.set_base(budget, base, position)

    async def recorded(self, request_ids: Sequence[str], position: int) -> None:
        self.quota.recorded(request_ids, position)

    def open_reservations(self) -> int:
        return self.quota.open_reservations()


class SharedAdmission:
    def __init__(self, store: RedisAdmissionStore) -> None:
        self.store = store
        self.fallback = LocalAdmission()
        self.redis_failures = 0

    async def admit(self, key: KeyRecord, request_id: str, tokens_estimate: int, prices: Prices,
                    prompt_max: int, completion_max: int) -> Ticket:
        cost = reservation_cost(prices, prompt_max, completion_max)
        budgets = budgets_of(key)
        try:
            d = await self.store.admit(str(key.key_id), key.rpm_limit or 0, key.tpm_limit or 0, tokens_estimate,
                                       cost, request_id, [f"{kind}:{uid}" for kind, uid in budgets])
        except RedisError as e:
            self._degraded(e)
            return self.fallback.admit_now(key, request_id, tokens_estimate, cost)
        headers = self._headers(key, d.outcome, d.values)
        if d.outcome == "rpm":
            raise rate_limited("requests", key.rpm_limit or 0, _retry(d.values[0]), headers)
        if d.outcome == "tpm":
            raise rate_limited("tokens", key.tpm_limit or 0, _retry(d.values[0]), headers)
        if d.outcome == "quota":
            raise out_of_quota(int(float(d.values[0])) > 0, cost, headers)
        tokens = min(tokens_estimate, key.tpm_limit) if key.tpm_limit is not None else tokens_estimate
        return Ticket(request_id, key, tokens, cost, headers, budgets, shared=True)

    @staticmethod
    def _headers(key: KeyRecord, outcome: str, values: list[str]) -> dict[str, str]:
        v = values if outcome == "ok" else values[1:]  # a refusal leads with its retry delay or budget
        headers: dict[str, str] = {}
        if key.rpm_limit:
            headers |= limit_headers("requests", key.rpm_limit, int(v[0]), float(v[1]))
        if key.tpm_limit:
            headers |= limit_headers("tokens", key.tpm_limit, int(v[2]), float(v[3]))
        return headers

    async def settle(self, ticket: Ticket, tokens_used: int, cost_credits: int) -> None:
        if not ticket.shared:
            self.fallback.settle_now(ticket, tokens_used, cost_credits)
            return
        try:
            await self.store.settle(str(ticket.key.key_id), ticket.request_id, cost_credits, ticket.key.tpm_limit or 0,
                                    tokens_used - ticket.tokens_estimate,
                                    [f"{kind}:{uid}" for kind, uid in ticket.budgets])
        except RedisError as e:
            self._degraded(e)  # the reservation expires on its own deadline

    async def set_bases(self, bases: Sequence[tuple[Budget, int | None]], position: int) -> None:
        await self.fallback.set_bases(bases, position)
        try:
            await self.store.set_bases([(f"{kind}:{uid}", base) for (kind, uid), base in bases], position)
        except RedisError as e:
            self._degraded(e)

    async def recorded(self, request_ids: Sequence[str], position: int) -> None:
        await self.fallback.recorded(request_ids, position)
        try:
            await self.store.recorded(request_ids, position)
        except RedisError as e:
            self._degraded(e)

    def open_reservations(self) -> int:
        return self.fallback.open_reservations()

    def _degraded(self, error: RedisError) -> None:
        self.redis_failures += 1
        if self.redis_failures == 1 or self.redis_failures % 1000 == 0:
            log.error("admission: Redis unreachable (%d failures: %s); admitting with this process's state only",
                      self.redis_failures, error)


def _retry(value: str) -> float:
    retry = float(value)
    return math.inf if retry < 0 else retry


Admission = LocalAdmission | SharedAdmission


def reservation_cost(prices: Prices, prompt_max: int, completion_max: int) -> int:
    """Credits to hold for a request's worst case; one beyond any balance is held as the largest amount,
    which no balance covers, so the request is refused as out of quota rather than failing."""
    try:
        return prices.cost_credits(prompt_max, 0, completion_max)
    except InvalidValue:
        return CREDITS_MAX
