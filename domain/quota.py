"""Credit reservations: how a gateway keeps concurrent requests within a balance or a key's cap.

Imports: stdlib, domain. A budget's base comes from the read model (a project's remaining balance,
or a key's cap minus its recorded usage) as of some log position. Before forwarding, a request
reserves its worst-case cost on every budget it draws on, all or nothing; when it ends, the
reservation becomes its actual cost, held as "unprojected" until a snapshot that includes its
usage batch replaces it. So available = base − reserved − unprojected, and as long as no request
costs more than it reserved, the sum of charges never exceeds the base. A request that costs more
than its estimate (no max_tokens given) can overspend by at most that excess.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from domain.errors import InvalidValue, invariant

RESERVATIONS_MAX = 1_000_000  # open requests per gateway process: far above any real concurrency


@dataclass
class _Budget:
    base_credits: int | None = None  # None: no limit
    position: int = 0
    reserved: int = 0
    unprojected: dict[str, int] = field(default_factory=dict)


@dataclass
class _Reservation:
    budgets: tuple[Hashable, ...]
    estimate: int


class QuotaBook:
    def __init__(self) -> None:
        self._budgets: dict[Hashable, _Budget] = {}
        self._open: dict[str, _Reservation] = {}
        self._batch_of: dict[str, int] = {}  # request id → log position of its recorded batch

    def set_base(self, budget: Hashable, base_credits: int | None, position: int) -> None:
        """A snapshot of the read model at `position`; drops the unprojected costs it now includes."""
        b = self._budgets.setdefault(budget, _Budget())
        if position < b.position:
            return  # an older snapshot than the one held: ignore
        b.base_credits, b.position = base_credits, position
        for request_id in [r for r in b.unprojected if self._batch_of.get(r, position + 1) <= position]:
            del b.unprojected[request_id]

    def available(self, budget: Hashable) -> int | None:
        b = self._budgets.get(budget)
        if b is None or b.base_credits is None:
            return None
        return b.base_credits - b.reserved - sum(b.unprojected.values())

    def reserve(self, request_id: str, budgets: Sequence[Hashable], estimate: int) -> Hashable | None:
        """Reserve `estimate` on every budget, or on none; returns the first budget that refused."""
        if estimate < 0:
            raise InvalidValue("an estimate cannot be negative")
        invariant(request_id not in self._open, f"request {request_id} reserved twice")
        if len(self._open) >= RESERVATIONS_MAX:
            raise InvalidValue("too many open reservations")
        for budget in budgets:
            available = self.available(budget)
            if available is not None and available < estimate:
                return budget
        for budget in budgets:
            self._budgets.setdefault(budget, _Budget()).reserved += estimate
        self._open[request_id] = _Reservation(tuple(budgets), estimate)
        return None

    def settle(self, request_id: str, actual_credits: int) -> None:
        """The request ended having cost `actual_credits` (0 when it failed before any output)."""
        reservation = self._open.pop(request_id)
        for budget in reservation.budgets:
            b = self._budgets[budget]
            b.reserved -= reservation.estimate
            invariant(b.reserved >= 0, "reservations went negative")
            # recorded already, and in the snapshot held: its cost is in the base, not unprojected
            if actual_credits and self._batch_of.get(request_id, b.position + 1) > b.position:
                b.unprojected[request_id] = actual_credits

    def recorded(self, request_ids: Iterable[str], position: int) -> None:
        """These requests' usage is in the log at `position`; the next snapshot past it includes them.

        A request reported again (a batch flushed twice) keeps its first position: that is where the log
        holds it, and a later report cannot move it past snapshots that already include it."""
        for request_id in request_ids:
            self._batch_of.setdefault(request_id, position)
        self._forget_projected()

    def _forget_projected(self) -> None:
        # a request may be recorded before it settles (a slow client holds its settlement back): keep
        # the position of those still open, or their cost would count as unprojected for ever
        live = {r for b in self._budgets.values() for r in b.unprojected} | self._open.keys()
        for request_id in [r for r in self._batch_of if r not in live]:
            del self._batch_of[request_id]

    def open_reservations(self) -> int:
        return len(self._open)
