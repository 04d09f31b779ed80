"""The accounting Application: one method per use case (load, decide, save), over one event log.

Imports: stdlib, eventsourcing, domain. Users, projects, keys and usage batches share one
notification log so that projections follow a single ordered stream. Library errors are re-raised
as the domain's own; every command takes the `Actor` that issues it and checks its rights here, so
the rules hold whether the command comes from the CLI, the portal or the gateway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError, Transcoder

from domain import access
from domain.access import Actor
from domain.api_key import ApiKey, KeySettings
from domain.catalog import Deployment, ModelExists, ModelNotFound, ServedModel
from domain.claims import CLAIMS_KWARG, RequestIdClaims
from domain.errors import (
    DomainError,
    DuplicateRequest,
    EmailTaken,
    KeyNotFound,
    ProjectCodeTaken,
    ProjectNotFound,
    SubjectTaken,
    UserNotFound,
    invariant,
)
from domain.pricing import Prices
from domain.project import Project, ProjectCodeIndex, Role
from domain.transcodings import make_transcoder
from domain.usage import UsageBatch, UsageEntry
from domain.user import EmailIndex, SubjectIndex, User
from domain.validation import clean_code, clean_email, clean_model_name

APPLICATION_NAME = "Accounting"
A = TypeVar("A")


@dataclass(frozen=True)
class RecordedUsage:
    """`position` is the batch's place in the notification log (0 when it was already recorded)."""

    batch_id: UUID
    entries: int
    already_recorded: bool
    position: int = 0


class Accounting(Application[UUID]):
    name = APPLICATION_NAME
    env: ClassVar[dict[str, str]] = {"COMPRESSOR_TOPIC": ""}

    def __init__(self, env: dict[str, str] | None = None, *, key_pepper: bytes) -> None:
        super().__init__(env)
        self.key_pepper = key_pepper
        invariant(
            isinstance(self.recorder, RequestIdClaims),
            "the event recorder must enforce request-id claims (use adapters.eventstore)",
        )

    def construct_transcoder(self) -> Transcoder:
        return make_transcoder()

    # ---- users -------------------------------------------------------------------------

    def register_user(
        self,
        email: str,
        display_name: str,
        *,
        subject: str | None = None,
        password_hash: str | None = None,
        is_admin: bool = False,
    ) -> UUID:
        user = User.register(email, display_name, subject=subject, password_hash=password_hash,
                             is_admin=is_admin)
        claims: list[Any] = [self._email_claim(user.email, user.id)]
        if user.subject is not None:
            if self._find_subject(user.subject) is not None:
                raise SubjectTaken("this identity already belongs to a user")
            claims.append(SubjectIndex(user.subject, user.id))
        self._save_unique(user, *claims, error=EmailTaken(f"e-mail {user.email} is already registered"))
        return user.id

    def _email_claim(self, email: str, user_id: UUID) -> EmailIndex:
        try:
            index: EmailIndex = self.repository.get(EmailIndex.create_id(email))
        except AggregateNotFoundError:
            return EmailIndex(email, user_id)
        if index.user_id is not None:
            raise EmailTaken(f"e-mail {email} is already registered")
        index.reclaim(user_id)
        return index

    def _save_unique(self, *aggregates: Any, error: Exception) -> None:
        try:
            self.save(*aggregates)
        except IntegrityError:
            raise error from None

    def _load(self, aggregate_id: UUID, kind: type[A], missing: DomainError) -> A:
        """The aggregate of that kind, or `missing`: ids can come from users, so a wrong kind is not found."""
        try:
            aggregate: object = self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            raise missing from None
        if not isinstance(aggregate, kind):
            raise missing
        return aggregate

    def get_user(self, user_id: UUID) -> User:
        return self._load(user_id, User, UserNotFound(f"no user {user_id}"))

    def find_user_by_email(self, email: str) -> User:
        address = clean_email(email)
        try:
            index: EmailIndex = self.repository.get(EmailIndex.create_id(address))
        except AggregateNotFoundError:
            raise UserNotFound(f"no user with e-mail {address}") from None
        if index.user_id is None:
            raise UserNotFound(f"no user with e-mail {address}")
        return self.get_user(index.user_id)

    def _find_subject(self, subject: str) -> UUID | None:
        try:
            index: SubjectIndex = self.repository.get(SubjectIndex.create_id(subject))
        except AggregateNotFoundError:
            return None
        return index.user_id

    def find_user_by_subject(self, subject: str) -> User:
        user_id = self._find_subject(subject)
        if user_id is None:
            raise UserNotFound("no user with this identity")
        return self.get_user(user_id)

    def sign_in_with_identity(self, subject: str, *, email: str, email_verified: bool, display_name: str) -> UUID:
        """The user behind an SSO identity: known by subject (profile kept up to date from the claims), or
        the user registered with this e-mail and no identity yet (only when the provider verified the
        e-mail), or a new user."""
        user_id = self._find_subject(subject)
        if user_id is not None:
            user = self.get_user(user_id)
            if (user.display_name, user.email) != (display_name, email):
                self.update_profile(user_id, display_name=display_name, email=email)
            return user_id
        try:
            existing = self.find_user_by_email(email)
        except UserNotFound:
            return self.register_user(email, display_name, subject=subject)
        if not email_verified or existing.subject is not None:
            raise EmailTaken(f"e-mail {email} already belongs to another account: ask an administrator to link them")
        existing.link_subject(subject)
        self._save_unique(existing, SubjectIndex(existing.subject, existing.id),  # type: ignore[arg-type]
                          error=SubjectTaken("this identity already belongs to a user"))
        return existing.id

    def update_profile(self, user_id: UUID, *, display_name: str, email: str) -> None:
        user = self.get_user(user_id)
        old_email = user.email
        user.update_profile(display_name=display_name, email=email)
        changed: list[Any] = [user]
        if user.email != old_email:
            old_index: EmailIndex = self.repository.get(EmailIndex.create_id(old_email))
            old_index.release()
            changed += [old_index, self._email_claim(user.email, user.id)]
        self._save_unique(*changed, error=EmailTaken(f"e-mail {user.email} is already registered"))

    def set_password_hash(self, user_id: UUID, password_hash: str) -> None:
        user = self.get_user(user_id)
        user.set_password_hash(password_hash)
        self.save(user)

    def set_admin(self, actor: Actor, user_id: UUID, *, is_admin: bool) -> None:
        access.require_admin(actor)
        user = self.get_user(user_id)
        user.set_admin(is_admin)
        self.save(user)

    def actor_for(self, user_id: UUID) -> Actor:
        return Actor(user_id=user_id, is_admin=self.get_user(user_id).is_admin)

    # ---- projects ----------------------------------------------------------------------

    def create_project(self, actor: Actor, code: str, name: str, creator_id: UUID) -> UUID:
        access.require_admin(actor)
        self.get_user(creator_id)
        project = Project.open(code, name, creator_id)
        index = ProjectCodeIndex(project.code, project.id)
        self._save_unique(project, index, error=ProjectCodeTaken(f"project code {project.code} is taken"))
        return project.id

    def get_project(self, project_id: UUID) -> Project:
        return self._load(project_id, Project, ProjectNotFound(f"no project {project_id}"))

    def find_project_by_code(self, code: str) -> Project:
        cleaned = clean_code(code)
        try:
            index: ProjectCodeIndex = self.repository.get(ProjectCodeIndex.create_id(cleaned))
        except AggregateNotFoundError:
            raise ProjectNotFound(f"no project with code {cleaned}") from None
        return self.get_project(index.project_id)

    def rename_project(self, actor: Actor, project_id: UUID, name: str) -> None:
        project = self.get_project(project_id)
        access.require_creator(actor, project.role_of(actor.user_id))
        project.rename(name)
        self.save(project)

    def add_member(self, actor: Actor, project_id: UUID, user_id: UUID, role: Role = Role.USER) -> None:
        project = self.get_project(project_id)
        access.require_member_management(actor, project.role_of(actor.user_id), role)
        self.get_user(user_id)
        project.add_member(user_id, role)
        self.save(project)

    def require_member_manager(self, actor: Actor, project_id: UUID, role: Role) -> None:
        """Refuses unless `actor` may add or remove members of `role` in the project (checked before inviting)."""
        project = self.get_project(project_id)
        access.require_member_management(actor, project.role_of(actor.user_id), role)

    def change_role(self, actor: Actor, project_id: UUID, user_id: UUID, role: Role) -> None:
        project = self.get_project(project_id)
        access.require_creator(actor, project.role_of(actor.user_id))
        project.change_role(user_id, role)
        self.save(project)

    def remove_member(self, actor: Actor, project_id: UUID, user_id: UUID) -> None:
        """A member who leaves loses their keys in the same transaction."""
        project = self.get_project(project_id)
        target_role = project.role_of(user_id) or Role.USER
        if actor.user_id != user_id:  # leaving one's own project needs no management right
            access.require_member_management(actor, project.role_of(actor.user_id), target_role)
        project.remove_member(user_id)
        revoked = [key for key in self._keys_of(project) if key.owner_id == user_id and not key.revoked]
        for key in revoked:
            key.revoke()
        self.save(project, *revoked)

    def hand_over_creator(self, actor: Actor, project_id: UUID, new_creator_id: UUID) -> None:
        project = self.get_project(project_id)
        access.require_creator(actor, project.role_of(actor.user_id))
        project.hand_over_creator(new_creator_id)
        self.save(project)

    def grant_credits(self, actor: Actor, project_id: UUID, amount_credits: int, reason: str) -> None:
        access.require_admin(actor)
        project = self.get_project(project_id)
        project.grant_credits(amount_credits, reason, granted_by=actor.user_id)
        self.save(project)

    def correct_credits(self, actor: Actor, project_id: UUID, amount_credits: int, reason: str) -> None:
        access.require_admin(actor)
        project = self.get_project(project_id)
        project.correct_credits(amount_credits, reason, corrected_by=actor.user_id)
        self.save(project)

    def archive_project(self, actor: Actor, project_id: UUID) -> None:
        access.require_admin(actor)
        project = self.get_project(project_id)
        project.archive()
        self.save(project)

    # ---- keys --------------------------------------------------------------------------

    def create_key(
        self, actor: Actor, project_id: UUID, owner_id: UUID, settings: KeySettings
    ) -> tuple[UUID, str]:
        """The new key's id and its secret; the secret is never stored nor shown again."""
        project = self.get_project(project_id)
        access.require_key_management(actor, project.role_of(actor.user_id), owner_id)
        access.require_member(Actor(owner_id, is_admin=False), project.role_of(owner_id))
        self._require_models(settings.allowed_models)
        key, secret = ApiKey.issue(project.id, owner_id, settings, self.key_pepper)
        project.register_key(key.id)
        self.save(project, key)
        return key.id, secret

    def get_key(self, key_id: UUID) -> ApiKey:
        return self._load(key_id, ApiKey, KeyNotFound(f"no key {key_id}"))

    def _key_for_management(self, actor: Actor, key_id: UUID) -> ApiKey:
        key = self.get_key(key_id)
        project = self.get_project(key.project_id)
        access.require_key_management(actor, project.role_of(actor.user_id), key.owner_id)
        return key

    def edit_key(self, actor: Actor, key_id: UUID, settings: KeySettings) -> None:
        key = self._key_for_management(actor, key_id)
        before = set(key.settings.allowed_models)
        key.edit(settings)
        # a model removed from the catalog since may stay on the key: the gateway refuses it anyway
        self._require_models(set(key.settings.allowed_models) - before)
        self.save(key)

    def _require_models(self, names: Iterable[str]) -> None:
        for name in names:
            try:
                self.get_model(name)
            except ModelNotFound:
                raise ModelNotFound(f"no model named {name}", rule="unknown_model", value=name) from None

    def revoke_key(self, actor: Actor, key_id: UUID) -> None:
        key = self._key_for_management(actor, key_id)
        key.revoke()
        self.save(key)

    def _keys_of(self, project: Project) -> list[ApiKey]:
        return [self.get_key(key_id) for key_id in project.key_ids]

    def keys_of_project(self, actor: Actor, project_id: UUID) -> list[ApiKey]:
        project = self.get_project(project_id)
        access.require_member(actor, project.role_of(actor.user_id))
        return self._keys_of(project)

    # ---- model catalog -----------------------------------------------------------------

    def add_model(self, actor: Actor, name: str, deployment: Deployment, prices: Prices,
                  description: str = "") -> UUID:
        """Add a model; adding a removed model's name restores it with this deployment and prices."""
        access.require_admin(actor)
        model = ServedModel.add(name, deployment, prices, description)
        try:
            existing = self.get_model(model.name, include_removed=True)
        except ModelNotFound:
            self._save_unique(model, error=ModelExists(f"model {model.name} already exists"))
            return model.id
        existing.restore(deployment, prices)
        if description:
            existing.describe(description)
        self.save(existing)
        return existing.id

    def get_model(self, name: str, *, include_removed: bool = False) -> ServedModel:
        model = self._load(ServedModel.create_id(clean_model_name(name)), ServedModel,
                           ModelNotFound(f"no model named {name}"))
        if model.removed and not include_removed:
            raise ModelNotFound(f"no model named {name}")
        return model

    def change_model(self, actor: Actor, name: str, change: Callable[[ServedModel], None]) -> None:
        """Apply one catalog change (`lambda m: m.change_prices(p)`, `m.add_deployment(d)`, …) and save it."""
        access.require_admin(actor)
        model = self.get_model(name)
        change(model)
        self.save(model)

    # ---- usage -------------------------------------------------------------------------

    def record_usage(self, batch_id: UUID, entries: Sequence[UsageEntry]) -> RecordedUsage:
        """Record a batch once. Replaying the same batch id is a no-op; a request id already
        charged in another batch raises `DuplicateRequest` and nothing is written."""
        batch = UsageBatch.record(batch_id, list(entries))
        request_ids = batch.request_ids
        try:
            recordings = self.save(batch, **{CLAIMS_KWARG: request_ids})
        except IntegrityError:
            if self._batch_exists(batch_id):
                return RecordedUsage(batch_id, len(request_ids), already_recorded=True)
            recorder: Any = self.recorder
            claimed = recorder.claimed_request_ids(request_ids)
            invariant(bool(claimed), "an integrity error with neither a batch nor a claim conflict")
            raise DuplicateRequest(sorted(claimed)) from None
        position = max((r.notification.id or 0 for r in recordings), default=0)
        return RecordedUsage(batch_id, len(request_ids), already_recorded=False, position=position)

    def _batch_exists(self, batch_id: UUID) -> bool:
        return bool(self.recorder.select_events(batch_id, limit=1))

