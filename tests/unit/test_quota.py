"""Reservations keep concurrent requests within a budget (hypothesis, stateful)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from domain.quota import QuotaBook


def test_two_hundred_concurrent_requests_on_a_balance_for_ten() -> None:
    book = QuotaBook()
    book.set_base("project", 1000, position=1)
    admitted = [r for r in range(200) if book.reserve(f"r{r}", ["project"], estimate=100) is None]
    assert len(admitted) == 10
    for r in admitted:
        book.settle(f"r{r}", 97)
    assert book.available("project") == 1000 - 970


def test_unprojected_costs_are_dropped_only_once_the_snapshot_includes_them() -> None:
    book = QuotaBook()
    book.set_base("p", 100, position=5)
    assert book.reserve("a", ["p"], 40) is None
    book.settle("a", 30)
    book.set_base("p", 100, position=6)  # the batch holding "a" is not written yet
    assert book.available("p") == 70
    book.recorded(["a"], position=9)
    book.set_base("p", 100, position=8)
    assert book.available("p") == 70
    book.set_base("p", 70, position=9)
    assert book.available("p") == 70
    book.set_base("p", 100, position=3)  # stale snapshots are ignored
    assert book.available("p") == 70


def test_a_request_reported_recorded_twice_keeps_its_first_position() -> None:
    """A batch flushed again reports its requests again at a later position: the snapshot at the first
    position already holds their cost, so the later report must not count it a second time."""
    book = QuotaBook()
    book.set_base("p", 100, position=10)
    assert book.reserve("a", ["p"], 0) is None
    book.settle("a", 1)
    book.recorded(["a"], position=11)
    book.recorded(["a"], position=12)
    book.set_base("p", 99, position=11)
    assert book.available("p") == 99
    assert book.reserve("b", ["p"], 5) is None  # recorded before it settles, twice
    book.recorded(["b"], position=13)
    book.recorded(["b"], position=14)
    book.settle("b", 4)
    book.set_base("p", 95, position=13)
    assert book.available("p") == 95


def test_all_or_nothing_across_project_and_key() -> None:
    book = QuotaBook()
    book.set_base("project", 1000, 1)
    book.set_base("key", 50, 1)
    assert book.reserve("r1", ["project", "key"], 60) == "key"
    assert book.available("project") == 1000
    assert book.reserve("r2", ["project", "key", "unlimited"], 50) is None
    assert book.available("unlimited") is None


class Overspend(RuleBasedStateMachine):
    @initialize(balance=st.integers(0, 10_000))
    def start(self, balance: int) -> None:
        self.book, self.balance, self.position = QuotaBook(), balance, 1
        self.book.set_base("p", balance, self.position)
        self.open: dict[str, int] = {}
        self.settled: dict[str, int] = {}  # request → cost, not yet "recorded"
        self.charged = 0
        self.excess = 0
        self.n = 0

    @rule(estimate=st.integers(0, 3000))
    def reserve(self, estimate: int) -> None:
        self.n += 1
        rid = f"r{self.n}"
        if self.book.reserve(rid, ["p"], estimate) is None:
            self.open[rid] = estimate

    @rule(data=st.data())
    def settle(self, data) -> None:
        if not self.open:
            return
        rid = data.draw(st.sampled_from(sorted(self.open)))
        estimate = self.open.pop(rid)
        actual = data.draw(st.integers(0, estimate + 500))
        self.book.settle(rid, actual)
        self.excess += max(0, actual - estimate)
        self.settled[rid] = actual
        self.charged += actual

    @rule()
    def record_and_project(self) -> None:
        """The spool writes a batch and the projection catches up: the base shrinks by what was recorded."""
        if not self.settled:
            return
        self.position += 1
        self.book.recorded(list(self.settled), self.position)
        self.book.set_base("p", self.balance - self.charged, self.position)
        self.settled.clear()

    @invariant()
    def never_overspend_beyond_the_excess_over_estimates(self) -> None:
        assert self.charged <= self.balance + self.excess

    @invariant()
    def available_accounts_for_everything(self) -> None:
        available = self.book.available("p")
        assert available == self.balance - self.charged - sum(self.open.values())


TestOverspend = Overspend.TestCase
TestOverspend.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
