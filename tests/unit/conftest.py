from __future__ import annotations

import pytest

from domain.accounting import Accounting

MEMORY = {"PERSISTENCE_MODULE": "adapters.eventstore.memory:ClaimingPOPOFactory"}
PEPPER = b"unit-test-pepper-" + b"x" * 32


def make_app() -> Accounting:
    return Accounting(env=dict(MEMORY), key_pepper=PEPPER)


@pytest.fixture
def app() -> Accounting:
    return make_app()
