"""The `ApiKey` aggregate: a project's credential, its limits, validity and allowed models.

Imports: stdlib, eventsourcing, domain. The secret is generated here from the OS's CSPRNG, returned
once, and only its keyed hash (HMAC-SHA256 with a server-side pepper) and a short display prefix
are stored. Whether a key may be used is a pure function of its state, the time and its usage.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.errors import InvalidValue, KeyRevoked
from domain.validation import COUNT_MAX, aware, bounded_int, clean_model_name, clean_text, credits

SECRET_PREFIX = "sk-lw-"  # noqa: S105 - a public marker, not a secret
SECRET_RANDOM_BYTES = 32
DISPLAY_PREFIX_CHARS = 12
ALLOWED_MODELS_MAX = 200
PEPPER_BYTES_MIN = 32


class KeyStatus(StrEnum):
    ACTIVE = "active"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    REVOKED = "revoked"
    OVER_CAP = "over_cap"


@dataclass(frozen=True)
class KeySettings:
    """What an owner may edit; `None` means no limit (or, for the window, open-ended)."""

    name: str
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    cap_credits: int | None = None
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    allowed_models: tuple[str, ...] = ()

    def cleaned(self) -> KeySettings:
        valid_from = aware(self.valid_from, "valid_from")
        valid_until = aware(self.valid_until, "valid_until")
        if valid_from and valid_until and valid_until <= valid_from:
            raise InvalidValue("valid until must be after valid from", rule="valid_order")
        if len(self.allowed_models) > ALLOWED_MODELS_MAX:
            raise InvalidValue(f"at most {ALLOWED_MODELS_MAX} allowed models", rule="models_max",
                               count_max=ALLOWED_MODELS_MAX)
        return KeySettings(
            name=clean_text(self.name, "key_name"),
            rpm_limit=None if self.rpm_limit is None
            else bounded_int(self.rpm_limit, "requests_per_minute", low=1, high=COUNT_MAX),
            tpm_limit=None if self.tpm_limit is None
            else bounded_int(self.tpm_limit, "tokens_per_minute", low=1, high=COUNT_MAX),
            cap_credits=None if self.cap_credits is None else credits(self.cap_credits, "usage_cap"),
            valid_from=valid_from,
            valid_until=valid_until,
            allowed_models=tuple(sorted({clean_model_name(m) for m in self.allowed_models})),
        )


def generate_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_RANDOM_BYTES)


def hash_secret(secret: str, pepper: bytes) -> str:
    """Keyed hash of a secret; without the pepper a stolen table cannot be brute-forced offline."""
    return hmac.new(pepper, secret.encode("utf-8"), hashlib.sha256).hexdigest()


def looks_like_secret(value: str) -> bool:
    return value.startswith(SECRET_PREFIX) and 20 <= len(value) <= 200


def key_status(
    *,
    revoked: bool,
    valid_from: datetime | None,
    valid_until: datetime | None,
    cap_credits: int | None,
    used_credits: int,
    now: datetime,
) -> KeyStatus:
    """The one rule for a key's usability, shared by the aggregate, the gateway and the portal."""
    if revoked:
        return KeyStatus.REVOKED
    if valid_from is not None and now < valid_from:
        return KeyStatus.NOT_YET_VALID
    if valid_until is not None and now >= valid_until:
        return KeyStatus.EXPIRED
    if cap_credits is not None and used_credits >= cap_credits:
        return KeyStatus.OVER_CAP
    return KeyStatus.ACTIVE


class ApiKey(Aggregate):
    class Created(Aggregate.Created):
        project_id: UUID
        owner_id: UUID
        secret_hash: str
        display_prefix: str
        settings: KeySettings

    class Edited(Aggregate.Event):
        settings: KeySettings

    class Revoked(Aggregate.Event):
        revoked_at: datetime

    @event(Created)
    def __init__(
        self,
        project_id: UUID,
        owner_id: UUID,
        secret_hash: str,
        display_prefix: str,
        settings: KeySettings,
    ) -> None:
        self.project_id = project_id
        self.owner_id = owner_id
        self.secret_hash = secret_hash
        self.display_prefix = display_prefix
        self.settings = settings
        self.revoked_at: datetime | None = None

    @classmethod
    def issue(
        cls, project_id: UUID, owner_id: UUID, settings: KeySettings, pepper: bytes
    ) -> tuple[ApiKey, str]:
        """A new key and its secret; the secret exists only in the return value."""
        if len(pepper) < PEPPER_BYTES_MIN:
            raise InvalidValue(f"the key-hash pepper must be at least {PEPPER_BYTES_MIN} bytes")
        secret = generate_secret()
        key = cls(
            project_id=project_id,
            owner_id=owner_id,
            secret_hash=hash_secret(secret, pepper),
            display_prefix=secret[:DISPLAY_PREFIX_CHARS],
            settings=settings.cleaned(),
        )
        return key, secret

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def status_at(self, now: datetime, used_credits: int = 0) -> KeyStatus:
        s = self.settings
        return key_status(
            revoked=self.revoked, valid_from=s.valid_from, valid_until=s.valid_until,
            cap_credits=s.cap_credits, used_credits=used_credits, now=now,
        )

    def edit(self, settings: KeySettings) -> None:
        if self.revoked:
            raise KeyRevoked("a revoked key cannot be edited")
        cleaned = settings.cleaned()
        if cleaned != self.settings:
            self._edited(settings=cleaned)

    @event(Edited)
    def _edited(self, settings: KeySettings) -> None:
        self.settings = settings

    def revoke(self) -> None:
        if self.revoked:
            raise KeyRevoked("the key is already revoked")
        self._revoked(revoked_at=datetime.now(UTC))

    @event(Revoked)
    def _revoked(self, revoked_at: datetime) -> None:
        self.revoked_at = revoked_at
