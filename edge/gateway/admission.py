"""Admission: a key's per-minute limits and the credit reservation, decided before forwarding.

Imports: stdlib, domain. State lives in this process (one gateway process needs nothing else).
Rate-limit decisions are taken first without storing anything; then credits are reserved on the
project's balance and the key's cap (all or nothing); only then are the limits' states stored, so a
refused request changes nothing. `settle` corrects both by what the request really used.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from uuid import UUID

from domain.limits import Decision, adjust, decide
from domain.pricing import Prices
from domain.quota import QuotaBook
from edge.gateway.errors import GatewayError
from edge.gateway.key_index import KeyRecord

KEYS_TRACKED_MAX = 1_000_000


@dataclass
class Ticket:
    """What a request holds between admission and settlement."""

    request_id: str
    key: KeyRecord
    tokens_estimate: int
    cost_estimate: int
    headers: dict[str, str]


def _reset(seconds: float) -> str:
    """OpenAI's duration format for x-ratelimit-reset-*: '1s', '6m0s', '150ms'."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _headers(kind: str, limit: int, decision: Decision) -> dict[str, str]:
    return {f"x-ratelimit-limit-{kind}": str(limit), f"x-ratelimit-remaining-{kind}": str(decision.remaining),
            f"x-ratelimit-reset-{kind}": _reset(decision.reset_s)}


class Admission:
    def __init__(self, quota: QuotaBook) -> None:
        self.quota = quota
        self._rpm_tat: dict[UUID, float] = {}
        self._tpm_tat: dict[UUID, float] = {}

    def admit(self, key: KeyRecord, request_id: str, tokens_estimate: int, prices: Prices,
              prompt_estimate: int, completion_max: int) -> Ticket:
        now = time.monotonic()
        headers: dict[str, str] = {}
        rpm = tpm = None
        if key.rpm_limit is not None:
            rpm = decide(key.rpm_limit, self._rpm_tat.get(key.key_id, 0.0), now, 1)
            headers |= _headers("requests", key.rpm_limit, rpm)
            if not rpm.allowed:
                raise self._limited("requests", key.rpm_limit, rpm, headers)
        if key.tpm_limit is not None:
            tpm = decide(key.tpm_limit, self._tpm_tat.get(key.key_id, 0.0), now, min(tokens_estimate, key.tpm_limit))
            headers |= _headers("tokens", key.tpm_limit, tpm)
            if not tpm.allowed:
                raise self._limited("tokens", key.tpm_limit, tpm, headers)
        cost = prices.cost_credits(prompt_estimate, 0, completion_max)
        budgets = [("project", key.project_id)] + ([("key", key.key_id)] if key.cap_credits is not None else [])
        refused = self.quota.reserve(request_id, budgets, cost)
        if refused is not None:
            what = "project's balance" if refused == budgets[0] else "key's usage cap"
            raise GatewayError(429, f"You exceeded your current quota: the {what} does not cover this request "
                               f"(estimated cost {cost} credits).", "insufficient_quota", "insufficient_quota",
                               headers=headers)
        if rpm is not None:
            self._rpm_tat[key.key_id] = rpm.tat_s
        if tpm is not None:
            self._tpm_tat[key.key_id] = tpm.tat_s
        return Ticket(request_id, key, min(tokens_estimate, key.tpm_limit or tokens_estimate), cost, headers)

    def settle(self, ticket: Ticket, tokens_used: int, cost_credits: int) -> None:
        """Replace the estimates by what the request used; runs once per admitted request."""
        self.quota.settle(ticket.request_id, cost_credits)
        key = ticket.key
        if key.tpm_limit is not None and key.key_id in self._tpm_tat:
            self._tpm_tat[key.key_id] = adjust(key.tpm_limit, self._tpm_tat[key.key_id], time.monotonic(),
                                               tokens_used - ticket.tokens_estimate)
        if len(self._tpm_tat) > KEYS_TRACKED_MAX or len(self._rpm_tat) > KEYS_TRACKED_MAX:
            self._forget_idle()

    def _forget_idle(self) -> None:
        """A TAT in the past is the same as no TAT: drop them to bound memory."""
        now = time.monotonic()
        for table in (self._rpm_tat, self._tpm_tat):
            for key_id in [k for k, tat in table.items() if tat <= now]:
                del table[key_id]

    @staticmethod
    def _limited(kind: str, limit: int, decision: Decision, headers: dict[str, str]) -> GatewayError:
        retry = decision.retry_after_s
        message = (f"Rate limit reached for {kind} per minute: limit {limit}. "
                   + (f"Please try again in {_reset(retry)}." if math.isfinite(retry)
                      else "This request is larger than the limit allows."))
        extra = {"retry-after": str(max(1, math.ceil(retry)))} if math.isfinite(retry) else {}
        return GatewayError(429, message, "requests" if kind == "requests" else "tokens", "rate_limit_exceeded",
                            headers={**headers, **extra})
