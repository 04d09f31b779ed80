"""Slowing down guessing: after repeated failures, whoever failed waits, for a growing time.

Imports: stdlib. Two users: the portal's login (an account/address pair: five failures within 15
minutes lock the pair for 30 s, doubling with each further failure up to 15 minutes; a successful
login clears it) and the gateway's key check (an address that sends many unknown API keys). Per
process: with several workers each counts its own, so the bound multiplies by the number of workers.
Memory is bounded: the oldest entries go first when there are too many.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

FREE_FAILURES = 5
WINDOW_S = 15 * 60
FIRST_LOCK_S = 30.0
LOCK_MAX_S = 15 * 60.0
ENTRIES_MAX = 100_000


@dataclass
class _Record:
    failures: int = 0
    first_failure: float = 0.0
    locked_until: float = 0.0


@dataclass(frozen=True)
class Policy:
    free_failures: int = FREE_FAILURES
    window_s: float = WINDOW_S
    first_lock_s: float = FIRST_LOCK_S
    lock_max_s: float = LOCK_MAX_S
    entries_max: int = ENTRIES_MAX


class FailureThrottle:
    def __init__(self, policy: Policy = Policy(), clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._records: OrderedDict[Hashable, _Record] = OrderedDict()

    def wait_s(self, who: Hashable) -> int:
        """Seconds `who` must still wait before trying again (0: go ahead)."""
        record = self._records.get(who)
        if record is None:
            return 0
        return max(0, int(record.locked_until - self._clock() + 0.999))

    def failed(self, who: Hashable) -> None:
        p, now = self.policy, self._clock()
        record = self._records.pop(who, None) or _Record(first_failure=now)
        if now - record.first_failure > p.window_s:
            record = _Record(first_failure=now)
        record.failures += 1
        if record.failures >= p.free_failures:
            record.locked_until = now + min(p.lock_max_s, p.first_lock_s * 2 ** (record.failures - p.free_failures))
        self._records[who] = record
        while len(self._records) > p.entries_max:
            self._records.popitem(last=False)

    def succeeded(self, who: Hashable) -> None:
        self._records.pop(who, None)


class LoginThrottle:
    """The portal's: per (e-mail, address), e-mail compared without case."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._throttle = FailureThrottle(Policy(), clock)

    def wait_s(self, email: str, address: str) -> int:
        return self._throttle.wait_s((email.lower(), address))

    def failed(self, email: str, address: str) -> None:
        self._throttle.failed((email.lower(), address))

    def succeeded(self, email: str, address: str) -> None:
        self._throttle.succeeded((email.lower(), address))
