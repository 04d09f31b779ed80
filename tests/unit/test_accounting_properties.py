"""Random command sequences never break the ledger's invariants (hypothesis, stateful)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from domain.access import SYSTEM
from domain.api_key import ApiKey, KeySettings, KeyStatus
from domain.errors import DomainError
from domain.project import Project, Role
from domain.usage import UsageBatch, UsageEntry
from tests.unit.conftest import make_app

roles = st.sampled_from([Role.MANAGER, Role.USER])
amounts = st.integers(min_value=-10**6, max_value=10**6)
times = st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC))


class LedgerMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.app = make_app()
        self.users = [self.app.register_user(f"u{i}@example.org", f"User {i}") for i in range(4)]
        self.project = self.app.create_project(SYSTEM, "prop", "Prop", self.users[0])
        self.keys: list[UUID] = []
        self.used_request_ids: list[str] = []
        self.expected_grants = 0
        self.expected_corrections = 0
        self.expected_charges = 0

    def _try(self, command, *args) -> bool:
        try:
            command(*args)
        except DomainError:
            return False
        return True

    @rule(who=st.integers(0, 3), other=st.integers(0, 3), role=roles)
    def add_member(self, who: int, other: int, role: Role) -> None:
        self._try(self.app.add_member, self.app.actor_for(self.users[who]), self.project, self.users[other], role)

    @rule(who=st.integers(0, 3), other=st.integers(0, 3), role=roles)
    def change_role(self, who: int, other: int, role: Role) -> None:
        self._try(self.app.change_role, self.app.actor_for(self.users[who]), self.project, self.users[other], role)

    @rule(who=st.integers(0, 3), other=st.integers(0, 3))
    def remove_member(self, who: int, other: int) -> None:
        self._try(self.app.remove_member, self.app.actor_for(self.users[who]), self.project, self.users[other])

    @rule(who=st.integers(0, 3), other=st.integers(0, 3))
    def hand_over(self, who: int, other: int) -> None:
        self._try(self.app.hand_over_creator, self.app.actor_for(self.users[who]), self.project, self.users[other])

    @rule(amount=amounts)
    def grant(self, amount: int) -> None:
        if self._try(self.app.grant_credits, SYSTEM, self.project, amount, "grant"):
            self.expected_grants += amount

    @rule(amount=amounts)
    def correct(self, amount: int) -> None:
        if self._try(self.app.correct_credits, SYSTEM, self.project, amount, "correction"):
            self.expected_corrections += amount

    @rule(owner=st.integers(0, 3), start=st.none() | times, days=st.integers(1, 400))
    def create_key(self, owner: int, start: datetime | None, days: int) -> None:
        until = None if start is None else start + timedelta(days=days)
        try:
            key_id, _ = self.app.create_key(SYSTEM, self.project, self.users[owner],
                                            KeySettings(name="k", valid_from=start, valid_until=until))
        except DomainError:
            return
        self.keys.append(key_id)

    @rule(index=st.integers(0, 50))
    def revoke_key(self, index: int) -> None:
        if self.keys:
            self._try(self.app.revoke_key, SYSTEM, self.keys[index % len(self.keys)])

    @rule(fresh=st.integers(0, 5), reused=st.integers(0, 2), cost=st.integers(0, 1000), replay=st.booleans())
    def record_usage(self, fresh: int, reused: int, cost: int, replay: bool) -> None:
        ids = [uuid4().hex for _ in range(fresh)] + self.used_request_ids[-reused:] if reused else \
            [uuid4().hex for _ in range(fresh)]
        entries = [UsageEntry(r, self.project, uuid4(), "m", "", 3, 0, 4, cost, 0, 1) for r in ids]
        batch_id = uuid4()
        if self._try(self.app.record_usage, batch_id, entries):
            self.used_request_ids += ids
            self.expected_charges += cost * len(entries)
            if replay:
                assert self.app.record_usage(batch_id, entries).already_recorded

    def _log(self) -> list[object]:
        notifications = self.app.recorder.select_notifications(start=1, limit=10**6)
        return [self.app.mapper.to_domain_event(n) for n in notifications]

    @invariant()
    def exactly_one_creator(self) -> None:
        project = self.app.get_project(self.project)
        assert list(project.members.values()).count(Role.CREATOR) == 1

    @invariant()
    def revoked_keys_are_never_usable(self, ) -> None:
        for key_id in self.keys:
            key: ApiKey = self.app.get_key(key_id)
            if key.revoked:
                for moment in (datetime(2020, 1, 1, tzinfo=UTC), datetime(2031, 1, 1, tzinfo=UTC)):
                    assert key.status_at(moment) is KeyStatus.REVOKED

    @invariant()
    def balance_identity_and_single_charge(self) -> None:
        grants = corrections = charges = 0
        charged_ids: list[str] = []
        for event in self._log():
            if isinstance(event, Project.CreditsGranted):
                grants += event.amount_credits
            elif isinstance(event, Project.CreditsCorrected):
                corrections += event.amount_credits
            elif isinstance(event, UsageBatch.Recorded):
                for row in event.rows:
                    charged_ids.append(row[0])
                    charges += row[8]
        assert len(charged_ids) == len(set(charged_ids))
        assert (grants, corrections, charges) == (self.expected_grants, self.expected_corrections,
                                                  self.expected_charges)
        project = self.app.get_project(self.project)
        assert project.granted_credits + project.corrections_credits == grants + corrections


TestLedger = LedgerMachine.TestCase
TestLedger.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                               suppress_health_check=[HealthCheck.too_slow])


def test_usage_rows_round_trip() -> None:
    e = UsageEntry("r", uuid4(), uuid4(), "m", "d", 1, 1, 2, 3, 4, 5, estimated=True)
    assert UsageEntry.from_row(e.to_row()) == e
    assert isinstance(Project, type)
