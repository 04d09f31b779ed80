"""Per-minute rate limits as a generic cell-rate algorithm (GCRA): exact, O(1), one number per key.

Imports: stdlib, domain. A limit of N per minute lets a key spend N at once and then N per minute
evenly (burst = one minute). Each key keeps a "theoretical arrival time" (TAT); a request costing n
units is allowed when, after adding n emission intervals, the TAT is at most one window ahead of
now. Token costs are known only at the end of a request: admission takes an estimate, settlement
corrects by the difference (which may push the TAT into the future and delay the next request).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from domain.errors import InvalidValue, invariant

WINDOW_S = 60.0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    tat_s: float
    """The TAT to store (unchanged when refused)."""
    retry_after_s: float
    """When refused: how long until the same request would be allowed."""
    remaining: int
    """Units that could still be spent now, after this decision."""
    reset_s: float
    """Time until the budget is whole again."""


def decide(limit_per_min: int, tat_s: float, now_s: float, cost: int) -> Decision:
    """Admit `cost` units against a per-minute limit, given the stored TAT (0 for a fresh key)."""
    if limit_per_min < 1 or cost < 0:
        raise InvalidValue("limit must be positive and cost non-negative")
    interval = WINDOW_S / limit_per_min
    base = max(tat_s, now_s)
    new_tat = base + cost * interval
    ahead = new_tat - now_s
    if cost > limit_per_min or ahead > WINDOW_S + 1e-9:
        retry = max(0.0, ahead - WINDOW_S) if cost <= limit_per_min else math.inf
        return Decision(False, tat_s, retry, _remaining(limit_per_min, base - now_s, interval),
                        max(0.0, base - now_s))
    invariant(new_tat >= tat_s, "an admitted request moved the TAT backwards")
    return Decision(True, new_tat, 0.0, _remaining(limit_per_min, ahead, interval), ahead)


def adjust(limit_per_min: int, tat_s: float, now_s: float, delta: int) -> float:
    """Correct a TAT after the fact: `delta` more (or fewer, if negative) units than admitted.

    Refunds never move the TAT below now: unused budget does not accumulate beyond one window.
    """
    interval = WINDOW_S / limit_per_min
    return max(now_s, tat_s + delta * interval) if delta < 0 else max(tat_s, now_s) + delta * interval


def _remaining(limit: int, ahead_s: float, interval: float) -> int:
    return max(0, min(limit, math.floor((WINDOW_S - ahead_s) / interval + 1e-9)))
