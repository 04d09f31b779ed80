"""The `Project` aggregate: members and their roles, credit grants and corrections, archiving.

Imports: stdlib, eventsourcing, domain. Charges are not kept here (one busy project would
serialise the gateway); they live in `UsageBatch` events and the balance projection folds both.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

from domain.errors import (
    AlreadyAMember,
    InvalidAmount,
    LastCreatorRemoved,
    NegativeGrant,
    NotAMember,
    ProjectArchived,
    invariant,
)
from domain.validation import CREDITS_MAX, REASON_CHARS_MAX, clean_code, clean_text, credits

MEMBERS_MAX = 10_000


class Role(Enum):
    CREATOR = "creator"
    MANAGER = "manager"
    USER = "user"


@dataclass(frozen=True)
class Balance:
    """Balance = grants + corrections − charges, all in the smallest credit unit."""

    granted_credits: int
    corrections_credits: int
    charged_credits: int

    @property
    def remaining_credits(self) -> int:
        return self.granted_credits + self.corrections_credits - self.charged_credits


class Project(Aggregate):
    class Created(Aggregate.Created):
        code: str
        name: str
        creator_id: UUID

    class Renamed(Aggregate.Event):
        name: str

    class MemberAdded(Aggregate.Event):
        user_id: UUID
        role: Role

    class RoleChanged(Aggregate.Event):
        user_id: UUID
        role: Role

    class MemberRemoved(Aggregate.Event):
        user_id: UUID

    class CreatorHandedOver(Aggregate.Event):
        previous_id: UUID
        new_creator_id: UUID

    class CreditsGranted(Aggregate.Event):
        amount_credits: int
        reason: str
        granted_by: UUID | None

    class CreditsCorrected(Aggregate.Event):
        amount_credits: int
        reason: str
        corrected_by: UUID | None

    class Archived(Aggregate.Event):
        pass

    class KeyRegistered(Aggregate.Event):
        key_id: UUID

    @event(Created)
    def __init__(self, code: str, name: str, creator_id: UUID) -> None:
        self.code = code
        self.name = name
        self.members: dict[UUID, Role] = {creator_id: Role.CREATOR}
        self.granted_credits = 0
        self.corrections_credits = 0
        self.archived = False
        self.key_ids: list[UUID] = []

    @classmethod
    def open(cls, code: str, name: str, creator_id: UUID) -> Project:
        return cls(code=clean_code(code), name=clean_text(name, "project_name"), creator_id=creator_id)

    @property
    def creator_id(self) -> UUID:
        creators = [uid for uid, role in self.members.items() if role is Role.CREATOR]
        invariant(len(creators) == 1, f"project {self.id} has {len(creators)} creators")
        return creators[0]

    def role_of(self, user_id: UUID | None) -> Role | None:
        return None if user_id is None else self.members.get(user_id)

    def _require_open(self) -> None:
        if self.archived:
            raise ProjectArchived(f"project {self.code} is archived")

    def rename(self, name: str) -> None:
        self._require_open()
        self._renamed(name=clean_text(name, "project_name"))

    @event(Renamed)
    def _renamed(self, name: str) -> None:
        self.name = name

    def add_member(self, user_id: UUID, role: Role) -> None:
        self._require_open()
        if user_id in self.members:
            raise AlreadyAMember("already a member of this project")
        if role is Role.CREATOR:
            raise LastCreatorRemoved("a project has exactly one creator: hand the role over instead")
        if len(self.members) >= MEMBERS_MAX:
            raise InvalidAmount(f"a project has at most {MEMBERS_MAX} members")
        self._member_added(user_id=user_id, role=role)

    @event(MemberAdded)
    def _member_added(self, user_id: UUID, role: Role) -> None:
        self.members[user_id] = role

    def change_role(self, user_id: UUID, role: Role) -> None:
        current = self._role_required(user_id)
        if current is Role.CREATOR or role is Role.CREATOR:
            raise LastCreatorRemoved("the creator role changes hands only by hand-over")
        if current is not role:
            self._role_changed(user_id=user_id, role=role)

    @event(RoleChanged)
    def _role_changed(self, user_id: UUID, role: Role) -> None:
        self.members[user_id] = role

    def remove_member(self, user_id: UUID) -> None:
        if self._role_required(user_id) is Role.CREATOR:
            raise LastCreatorRemoved("the creator cannot be removed: hand the role over first")
        self._member_removed(user_id=user_id)

    @event(MemberRemoved)
    def _member_removed(self, user_id: UUID) -> None:
        del self.members[user_id]

    def hand_over_creator(self, new_creator_id: UUID) -> None:
        """The old creator stays as a manager; the new one must already be a member."""
        self._require_open()
        self._role_required(new_creator_id)
        if new_creator_id != self.creator_id:
            self._creator_handed_over(previous_id=self.creator_id, new_creator_id=new_creator_id)

    @event(CreatorHandedOver)
    def _creator_handed_over(self, previous_id: UUID, new_creator_id: UUID) -> None:
        self.members[previous_id] = Role.MANAGER
        self.members[new_creator_id] = Role.CREATOR

    def _role_required(self, user_id: UUID) -> Role:
        role = self.members.get(user_id)
        if role is None:
            raise NotAMember("not a member of this project")
        return role

    def grant_credits(self, amount_credits: int, reason: str, granted_by: UUID | None) -> None:
        if isinstance(amount_credits, int) and not isinstance(amount_credits, bool) and amount_credits <= 0:
            raise NegativeGrant("a grant must be a positive number of credits")
        amount = credits(amount_credits, "grant", low=1)
        self._require_open()
        self._credits_granted(
            amount_credits=amount, reason=clean_text(reason, "reason", chars_max=REASON_CHARS_MAX),
            granted_by=granted_by,
        )

    @event(CreditsGranted)
    def _credits_granted(self, amount_credits: int, reason: str, granted_by: UUID | None) -> None:
        self.granted_credits += amount_credits

    def correct_credits(self, amount_credits: int, reason: str, corrected_by: UUID | None) -> None:
        """A signed correction (a refund is positive); never zero, always with a reason."""
        amount = credits(amount_credits, "correction", low=-CREDITS_MAX)
        if amount == 0:
            raise InvalidAmount("a correction must not be zero")
        self._credits_corrected(
            amount_credits=amount,
            reason=clean_text(reason, "reason", chars_max=REASON_CHARS_MAX),
            corrected_by=corrected_by,
        )

    @event(CreditsCorrected)
    def _credits_corrected(self, amount_credits: int, reason: str, corrected_by: UUID | None) -> None:
        self.corrections_credits += amount_credits

    def archive(self) -> None:
        if not self.archived:
            self._archived()

    @event(Archived)
    def _archived(self) -> None:
        self.archived = True

    def register_key(self, key_id: UUID) -> None:
        self._require_open()
        self._key_registered(key_id=key_id)

    @event(KeyRegistered)
    def _key_registered(self, key_id: UUID) -> None:
        self.key_ids.append(key_id)


class ProjectCodeIndex(Aggregate):
    """One per project code; its id is derived from the code, so a second project with it conflicts."""

    class Claimed(Aggregate.Created):
        code: str
        project_id: UUID

    @staticmethod
    def create_id(code: str) -> UUID:
        return uuid5(NAMESPACE_URL, f"/lwapi/project-code/{code}")

    @event(Claimed)
    def __init__(self, code: str, project_id: UUID) -> None:
        self.code = code
        self.project_id = project_id
