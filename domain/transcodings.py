"""How domain values that JSON does not know are stored in events.

Imports: stdlib, eventsourcing, domain.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    JSONTranscoder,
    Transcoding,
    UUIDAsHex,
)

from domain.api_key import KeySettings
from domain.catalog import BackendKind, Deployment
from domain.errors import invariant
from domain.pricing import Prices
from domain.project import Role


class RoleAsName(Transcoding):
    type = Role
    name = "role"

    def encode(self, obj: Role) -> str:
        return obj.value

    def decode(self, data: str) -> Role:
        return Role(data)


class KeySettingsAsDict(Transcoding):
    type = KeySettings
    name = "key_settings"

    def encode(self, obj: KeySettings) -> dict[str, Any]:
        return {
            "name": obj.name,
            "rpm_limit": obj.rpm_limit,
            "tpm_limit": obj.tpm_limit,
            "cap_credits": obj.cap_credits,
            "valid_from": obj.valid_from,
            "valid_until": obj.valid_until,
            "allowed_models": list(obj.allowed_models),
        }

    def decode(self, data: dict[str, Any]) -> KeySettings:
        return KeySettings(
            name=data["name"],
            rpm_limit=data["rpm_limit"],
            tpm_limit=data["tpm_limit"],
            cap_credits=data["cap_credits"],
            valid_from=_as_datetime(data["valid_from"]),
            valid_until=_as_datetime(data["valid_until"]),
            allowed_models=tuple(data["allowed_models"]),
        )


class BackendKindAsName(Transcoding):
    type = BackendKind
    name = "backend_kind"

    def encode(self, obj: BackendKind) -> str:
        return obj.value

    def decode(self, data: str) -> BackendKind:
        return BackendKind(data)


class DeploymentAsDict(Transcoding):
    type = Deployment
    name = "deployment"

    def encode(self, obj: Deployment) -> dict[str, Any]:
        return {"name": obj.name, "backend": obj.backend, "base_url": obj.base_url,
                "upstream_model": obj.upstream_model, "credential_ref": obj.credential_ref,
                "weight": obj.weight, "timeout_ms": obj.timeout_ms, "tokenizer": obj.tokenizer}

    def decode(self, data: dict[str, Any]) -> Deployment:
        return Deployment(**data)


class PricesAsDict(Transcoding):
    type = Prices
    name = "prices"

    def encode(self, obj: Prices) -> dict[str, Any]:
        return {"prompt_per_mtok": obj.prompt_per_mtok, "completion_per_mtok": obj.completion_per_mtok,
                "effective_at": obj.effective_at, "cached_prompt_per_mtok": obj.cached_prompt_per_mtok}

    def decode(self, data: dict[str, Any]) -> Prices:
        effective = _as_datetime(data["effective_at"])
        invariant(effective is not None, "stored prices without an effective time")
        assert effective is not None  # for the type checker; the invariant above holds under -O too
        return Prices(prompt_per_mtok=data["prompt_per_mtok"], completion_per_mtok=data["completion_per_mtok"],
                      effective_at=effective, cached_prompt_per_mtok=data["cached_prompt_per_mtok"])


def _as_datetime(value: object) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


DOMAIN_TRANSCODINGS: tuple[Transcoding, ...] = (
    RoleAsName(), KeySettingsAsDict(), BackendKindAsName(), DeploymentAsDict(), PricesAsDict(),
)


def make_transcoder() -> JSONTranscoder:
    """The transcoder the Application uses, for readers of the log outside it (projections)."""
    transcoder = JSONTranscoder()
    for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO(), *DOMAIN_TRANSCODINGS):
        transcoder.register(transcoding)
    return transcoder
