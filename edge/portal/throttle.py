"""Slowing down password guessing: after repeated failed logins, an account/address pair waits.

Imports: stdlib. Per process (with several workers each counts its own, so the bound multiplies by
the number of workers). Five failures within 15 minutes lock the pair for 30 s, doubling with each
further failure up to 15 minutes; a successful login clears it. Memory is bounded: the oldest
entries go first when there are too many.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
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


class LoginThrottle:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._records: OrderedDict[tuple[str, str], _Record] = OrderedDict()

    def wait_s(self, email: str, address: str) -> int:
        """Seconds this pair must still wait before trying again (0: go ahead)."""
        record = self._records.get((email.lower(), address))
        if record is None:
            return 0
        return max(0, int(record.locked_until - self._clock() + 0.999))

    def failed(self, email: str, address: str) -> None:
        now = self._clock()
        key = (email.lower(), address)
        record = self._records.pop(key, None) or _Record(first_failure=now)
        if now - record.first_failure > WINDOW_S:
            record = _Record(first_failure=now)
        record.failures += 1
        if record.failures >= FREE_FAILURES:
            lock = min(LOCK_MAX_S, FIRST_LOCK_S * 2 ** (record.failures - FREE_FAILURES))
            record.locked_until = now + lock
        self._records[key] = record
        while len(self._records) > ENTRIES_MAX:
            self._records.popitem(last=False)

    def succeeded(self, email: str, address: str) -> None:
        self._records.pop((email.lower(), address), None)
