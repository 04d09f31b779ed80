"""In-memory event recorder with request-id claims, for unit tests and throwaway runs.

Imports: eventsourcing, domain. Select it with PERSISTENCE_MODULE="adapters.eventstore.memory:ClaimingPOPOFactory".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import ApplicationRecorder, IntegrityError, StoredEvent
from eventsourcing.popo import POPOApplicationRecorder, POPOFactory

from domain.claims import CLAIMS_KWARG


class ClaimingPOPOApplicationRecorder(POPOApplicationRecorder):
    def __init__(self) -> None:
        super().__init__()
        self._claims: set[str] = set()

    def _insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        request_ids: Sequence[str] = kwargs.get(CLAIMS_KWARG) or ()
        with self._database_lock:
            self._assert_uniqueness(stored_events, **kwargs)
            if len(set(request_ids)) != len(request_ids) or self._claims.intersection(request_ids):
                msg = "request id already claimed"
                raise IntegrityError(msg)
            self._claims.update(request_ids)
            return self._update_table(stored_events, **kwargs)

    def claimed_request_ids(self, request_ids: Sequence[str]) -> set[str]:
        with self._database_lock:
            return self._claims.intersection(request_ids)


class ClaimingPOPOFactory(POPOFactory):
    def application_recorder(self) -> ApplicationRecorder:
        return ClaimingPOPOApplicationRecorder()


Factory = ClaimingPOPOFactory
