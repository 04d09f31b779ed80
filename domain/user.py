"""The `User` aggregate (a person who logs in) and the index aggregates that keep e-mails unique.

Imports: stdlib, eventsourcing, domain. Passwords arrive already hashed (argon2 lives at the edge);
the domain only refuses values that are not argon2 hashes.
"""

from __future__ import annotations

from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

from domain.errors import InvalidValue
from domain.validation import clean_email, clean_text

SUBJECT_CHARS_MAX = 255


def _check_password_hash(value: str | None) -> str | None:
    if value is not None and not (isinstance(value, str) and value.startswith("$argon2")):
        raise InvalidValue("password hash must be an argon2 hash")
    return value


class User(Aggregate):
    """A person: an SSO subject or a local account, optionally a platform administrator."""

    class Registered(Aggregate.Created):
        email: str
        display_name: str
        subject: str | None
        password_hash: str | None
        is_admin: bool

    class ProfileUpdated(Aggregate.Event):
        display_name: str
        email: str

    class PasswordChanged(Aggregate.Event):
        password_hash: str

    class AdminChanged(Aggregate.Event):
        is_admin: bool

    class SubjectLinked(Aggregate.Event):
        subject: str

    @event(Registered)
    def __init__(
        self,
        email: str,
        display_name: str,
        subject: str | None,
        password_hash: str | None,
        is_admin: bool,
    ) -> None:
        self.email = email
        self.display_name = display_name
        self.subject = subject
        self.password_hash = password_hash
        self.is_admin = is_admin

    @classmethod
    def register(
        cls,
        email: str,
        display_name: str,
        *,
        subject: str | None = None,
        password_hash: str | None = None,
        is_admin: bool = False,
    ) -> User:
        subject_clean = None if subject is None else clean_text(subject, "subject", chars_max=SUBJECT_CHARS_MAX)
        return cls(
            email=clean_email(email),
            display_name=clean_text(display_name, "display_name"),
            subject=subject_clean,
            password_hash=_check_password_hash(password_hash),
            is_admin=bool(is_admin),
        )

    def update_profile(self, *, display_name: str, email: str) -> None:
        name, mail = clean_text(display_name, "display_name"), clean_email(email)
        if (name, mail) != (self.display_name, self.email):
            self._profile_updated(display_name=name, email=mail)

    @event(ProfileUpdated)
    def _profile_updated(self, display_name: str, email: str) -> None:
        self.display_name = display_name
        self.email = email

    def set_password_hash(self, password_hash: str) -> None:
        checked = _check_password_hash(password_hash)
        if checked is None:
            raise InvalidValue("a password hash is required")
        self._password_changed(password_hash=checked)

    @event(PasswordChanged)
    def _password_changed(self, password_hash: str) -> None:
        self.password_hash = password_hash

    def set_admin(self, is_admin: bool) -> None:
        if bool(is_admin) != self.is_admin:
            self._admin_changed(is_admin=bool(is_admin))

    @event(AdminChanged)
    def _admin_changed(self, is_admin: bool) -> None:
        self.is_admin = is_admin

    def link_subject(self, subject: str) -> None:
        """An SSO identity for a user who had none (registered by e-mail before their first SSO login)."""
        if self.subject is not None:
            raise InvalidValue("this user already has a single sign-on identity", rule="identity_linked")
        self._subject_linked(subject=clean_text(subject, "subject", chars_max=SUBJECT_CHARS_MAX))

    @event(SubjectLinked)
    def _subject_linked(self, subject: str) -> None:
        self.subject = subject


class EmailIndex(Aggregate):
    """One per e-mail address; its id is derived from the address, so a second claim conflicts."""

    class Claimed(Aggregate.Created):
        email: str
        user_id: UUID

    class Released(Aggregate.Event):
        pass

    class Reclaimed(Aggregate.Event):
        user_id: UUID

    @staticmethod
    def create_id(email: str) -> UUID:
        return uuid5(NAMESPACE_URL, f"/lwapi/email/{email}")

    @event(Claimed)
    def __init__(self, email: str, user_id: UUID) -> None:
        self.email = email
        self.user_id: UUID | None = user_id

    def release(self) -> None:
        self._released()

    @event(Released)
    def _released(self) -> None:
        self.user_id = None

    def reclaim(self, user_id: UUID) -> None:
        self._reclaimed(user_id=user_id)

    @event(Reclaimed)
    def _reclaimed(self, user_id: UUID) -> None:
        self.user_id = user_id


class SubjectIndex(Aggregate):
    """One per SSO subject (issuer-scoped by the caller), so one person maps to one user."""

    class Claimed(Aggregate.Created):
        subject: str
        user_id: UUID

    @staticmethod
    def create_id(subject: str) -> UUID:
        return uuid5(NAMESPACE_URL, f"/lwapi/subject/{subject}")

    @event(Claimed)
    def __init__(self, subject: str, user_id: UUID) -> None:
        self.subject = subject
        self.user_id = user_id
