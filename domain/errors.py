"""Named refusals of the accounting domain, and the invariant check for bugs.

Imports: stdlib only. Every expected refusal is a `DomainError` subclass with a stable `code`
that the edges translate (OpenAI error JSON, portal message, CLI line); `InvariantViolation`
means a bug and is never translated into a polite refusal. The message is English for logs, the
CLI and the API; a refusal that names a rule also carries it with its parameters (`rule`,
`params`, field names as identifiers), so that the portal can word it in the reader's language.
"""

from __future__ import annotations


class DomainError(Exception):
    """An expected refusal of a command; `code` is stable and safe to show to users."""

    code = "domain_error"

    def __init__(self, message: str = "", *, rule: str | None = None, **params: object) -> None:
        super().__init__(message or self.code)
        self.rule = rule
        self.params = params


class NotFound(DomainError):
    code = "not_found"


class UserNotFound(NotFound):
    code = "user_not_found"


class ProjectNotFound(NotFound):
    code = "project_not_found"


class KeyNotFound(NotFound):
    code = "key_not_found"


class EmailTaken(DomainError):
    code = "email_taken"


class SubjectTaken(DomainError):
    code = "subject_taken"


class ProjectCodeTaken(DomainError):
    code = "project_code_taken"


class InvalidValue(DomainError):
    """A field's value is malformed or out of its allowed range."""

    code = "invalid_value"


class InvalidAmount(InvalidValue):
    code = "invalid_amount"


class NegativeGrant(InvalidAmount):
    code = "negative_grant"


class PermissionDenied(DomainError):
    code = "permission_denied"


class NotAMember(DomainError):
    code = "not_a_member"


class AlreadyAMember(DomainError):
    code = "already_a_member"


class LastCreatorRemoved(DomainError):
    """The creator cannot leave or be demoted without handing the role over first."""

    code = "last_creator_removed"


class ProjectArchived(DomainError):
    code = "project_archived"


class KeyRevoked(DomainError):
    """The key is revoked: it can be neither edited nor revoked again."""

    code = "key_revoked"


class DuplicateRequest(DomainError):
    """Usage for these request ids is already recorded: a request is charged once."""

    code = "duplicate_request"

    def __init__(self, request_ids: list[str]) -> None:
        shown = ", ".join(request_ids[:5]) + (" …" if len(request_ids) > 5 else "")
        super().__init__(f"usage already recorded for request id(s): {shown}")
        self.request_ids = request_ids


class InvariantViolation(AssertionError):
    """A state the code must never reach: a bug, not a refusal."""


def invariant(condition: bool, message: str) -> None:
    """Raise `InvariantViolation` unless `condition` holds; unlike `assert`, survives `python -O`."""
    if not condition:
        raise InvariantViolation(message)
