"""Tamper evidence for the event log: every stored event is chained to the one before it.

Imports: stdlib only. Each stored event gets a digest, SHA-256 over the previous event's digest and
the event's stored form (position, originator, version, topic, state), length-prefixed so that no two
different events encode alike. The database computes the digest as the event is inserted (see
`adapters.eventstore.postgres`); `ChainVerifier` recomputes it here, independently, and names the
first position where the log and its chain disagree. An exported head (position and digest, signed)
lets an auditor prove later that nothing up to that position was rewritten, even by someone who
recomputed the whole chain.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from uuid import UUID

GENESIS = bytes(32)  # the "previous digest" of the first event
DIGEST_BYTES = 32
_I8 = struct.Struct(">q")
_I4 = struct.Struct(">i")


def link(previous: bytes, position: int, originator_id: UUID, originator_version: int, topic: str,
         state: bytes) -> bytes:
    """The digest of one stored event; must equal what the database trigger computes, byte for byte."""
    topic_bytes = topic.encode()
    h = hashlib.sha256(previous)
    h.update(_I8.pack(position))
    h.update(originator_id.bytes)
    h.update(_I8.pack(originator_version))
    h.update(_I4.pack(len(topic_bytes)))
    h.update(topic_bytes)
    h.update(_I4.pack(len(state)))
    h.update(state)
    return h.digest()


@dataclass(frozen=True)
class StoredRow:
    """One stored event as the database holds it."""

    position: int
    originator_id: UUID
    originator_version: int
    topic: str
    state: bytes


@dataclass(frozen=True)
class ChainProblem:
    """The first position where the log and its chain disagree, and what was found there."""

    position: int
    kind: str  # altered | missing | unchained | rewritten
    detail: str


@dataclass(frozen=True)
class Head:
    """The chain's last link: anyone holding it can later check that the log up to `position` is unchanged."""

    position: int
    digest: bytes


class ChainVerifier:
    """Walks the log and the chain in position order, one position at a time (`check`), and stops at the
    first disagreement. `expected_heads` are exported heads to compare against on the way."""

    def __init__(self, expected_heads: tuple[Head, ...] = ()) -> None:
        self.previous = GENESIS
        self.last_position = 0
        self.events = 0
        self.state_bytes = 0
        self.problem: ChainProblem | None = None
        self._heads = {h.position: h.digest for h in expected_heads}

    def check(self, position: int, row: StoredRow | None, digest: bytes | None) -> bool:
        """Check one position (an event, its digest, or both); False once a problem is found."""
        if self.problem is not None:
            return False
        if position <= self.last_position:
            return self._fail(position, "altered", "positions out of order")
        if row is None:
            return self._fail(position, "missing", "the chain has a digest for this position but the event is gone")
        if digest is None:
            return self._fail(position, "unchained", "this event has no digest: it was written around the store")
        expected = link(self.previous, row.position, row.originator_id, row.originator_version, row.topic, row.state)
        if digest != expected:
            return self._fail(position, "altered",
                              "the event does not match its digest: it, or an event before it, was edited, removed "
                              "or moved")
        head = self._heads.pop(position, None)
        if head is not None and head != digest:
            return self._fail(position, "rewritten",
                              "the log up to here differs from the exported head: history was rewritten")
        self.previous, self.last_position = digest, position
        self.events += 1
        self.state_bytes += len(row.state)
        return True

    def finish(self) -> ChainProblem | None:
        """The first problem, if any, once the whole log has been walked (an exported head past the end is one)."""
        if self.problem is None and self._heads:
            position = min(self._heads)
            self._fail(position, "missing",
                       "the log has no event at this exported head's position: events were removed")
        return self.problem

    @property
    def head(self) -> Head:
        return Head(self.last_position, self.previous)

    def _fail(self, position: int, kind: str, detail: str) -> bool:
        self.problem = ChainProblem(position, kind, detail)
        return False
