"""The contract between the ledger and its event recorder for charging each request once.

Imports: stdlib. A usage batch is saved with `claim_request_ids=[...]`; the recorder inserts those
ids into a unique set in the same transaction as the batch's event, so a request id that was
already charged makes the whole save fail with an integrity error and nothing is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

CLAIMS_KWARG = "claim_request_ids"


@runtime_checkable
class RequestIdClaims(Protocol):
    def claimed_request_ids(self, request_ids: Sequence[str]) -> set[str]:
        """Those of `request_ids` whose usage is already recorded."""
        ...
