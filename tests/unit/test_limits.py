"""The rate limiter's guarantees, for any arrival pattern (hypothesis)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from domain.limits import WINDOW_S, adjust, decide


def test_a_fresh_key_may_spend_its_whole_minute_at_once_and_then_waits() -> None:
    tat = 0.0
    for _ in range(60):
        d = decide(60, tat, 1000.0, 1)
        assert d.allowed
        tat = d.tat_s
    refused = decide(60, tat, 1000.0, 1)
    assert not refused.allowed and math.isclose(refused.retry_after_s, 1.0) and refused.remaining == 0
    assert decide(60, tat, 1001.0, 1).allowed


def test_a_request_larger_than_the_limit_never_passes() -> None:
    d = decide(100, 0.0, 0.0, 101)
    assert not d.allowed and d.retry_after_s == math.inf


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 10_000),
       arrivals=st.lists(st.tuples(st.floats(0, 5, allow_nan=False), st.integers(0, 200)), max_size=300))
def test_no_window_of_one_minute_admits_more_than_limit_plus_burst(limit: int, arrivals) -> None:
    """Over any interval of length L, admitted units ≤ limit × (1 + L / window)."""
    now, tat, admitted = 1_000.0, 0.0, []
    for gap, cost in arrivals:
        now += gap
        d = decide(limit, tat, now, cost)
        if d.allowed:
            tat = d.tat_s
            admitted.append((now, cost))
    for i, (start, _) in enumerate(admitted):
        total = 0
        for t, c in admitted[i:]:
            total += c
            span = t - start
            assert total <= limit * (1 + span / WINDOW_S) + 1e-6


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 1000), estimate=st.integers(0, 1000), actual=st.integers(0, 5000))
def test_settling_charges_the_actual_cost(limit: int, estimate: int, actual: int) -> None:
    now, admitted = 50.0, min(estimate, limit)
    d = decide(limit, 0.0, now, admitted)
    assert d.allowed
    tat = adjust(limit, d.tat_s, now, actual - admitted)
    assert math.isclose(tat, now + actual * WINDOW_S / limit, rel_tol=1e-12, abs_tol=1e-9)
