"""Prices and the arithmetic that turns tokens into credits, in integers only.

Imports: stdlib, domain. Prices are credits per million tokens. A request's cost is the exact sum
in millionths of a credit, rounded UP to a whole credit: a request is never charged less than it
used, and at most one credit more.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from domain.errors import InvalidValue
from domain.validation import CREDITS_MAX, aware, credits

TOKENS_PER_PRICE_UNIT = 1_000_000


@dataclass(frozen=True)
class Prices:
    """Credits per million tokens, in force from `effective_at`; cached prompt tokens default to prompt."""

    prompt_per_mtok: int
    completion_per_mtok: int
    effective_at: datetime
    cached_prompt_per_mtok: int | None = None

    def cleaned(self) -> Prices:
        effective = aware(self.effective_at, "effective_time")
        if effective is None:
            raise InvalidValue("prices need an effective time", rule="effective_time")
        return Prices(
            prompt_per_mtok=credits(self.prompt_per_mtok, "prompt_price"),
            completion_per_mtok=credits(self.completion_per_mtok, "completion_price"),
            effective_at=effective,
            cached_prompt_per_mtok=None if self.cached_prompt_per_mtok is None
            else credits(self.cached_prompt_per_mtok, "cached_prompt_price"),
        )

    @property
    def cached_per_mtok(self) -> int:
        """What a cached prompt token costs: its own price, else the prompt price."""
        return self.prompt_per_mtok if self.cached_prompt_per_mtok is None else self.cached_prompt_per_mtok

    def cost_credits(self, tokens_prompt: int, tokens_prompt_cached: int, tokens_completion: int) -> int:
        return charge(tokens_prompt, tokens_prompt_cached, tokens_completion,
                      self.prompt_per_mtok, self.cached_per_mtok, self.completion_per_mtok)


def charge(tokens_prompt: int, tokens_prompt_cached: int, tokens_completion: int,
           prompt_per_mtok: int, cached_per_mtok: int, completion_per_mtok: int) -> int:
    """Credits for these tokens at these prices (per million tokens), rounded up."""
    micro = ((tokens_prompt - tokens_prompt_cached) * prompt_per_mtok
             + tokens_prompt_cached * cached_per_mtok + tokens_completion * completion_per_mtok)
    cost = -(-micro // TOKENS_PER_PRICE_UNIT)  # ceiling division on integers
    if not 0 <= cost <= CREDITS_MAX:
        raise InvalidValue("cost out of range")
    return cost


def price_at(schedule: list[Prices], moment: datetime) -> Prices | None:
    """The prices in force at `moment`: the latest change effective at or before it."""
    in_force = [p for p in schedule if p.effective_at <= moment]
    return max(in_force, key=lambda p: p.effective_at) if in_force else None
