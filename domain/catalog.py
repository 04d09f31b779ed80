"""The model catalog: models clients ask for by name, their deployments and their prices.

Imports: stdlib, eventsourcing, domain. A `ServedModel`'s id derives from its name, so a name is
unique without an index. Deployments name upstream credentials by reference (`env:VAR` or
`file:/path`), never by value: secrets never enter the event log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from urllib.parse import urlsplit
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

from domain.errors import DomainError, InvalidValue
from domain.pricing import Prices, price_at
from domain.validation import bounded_int, clean_model_name, clean_text, unicode_text

DEPLOYMENTS_MAX = 64
DESCRIPTION_CHARS_MAX = 2_000
PRICE_CHANGES_MAX = 10_000
TIMEOUT_MS_MAX = 3_600_000
_CREDENTIAL_RE = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:/\S+)$")
_DEPLOYMENT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_TOKENIZER_RE = re.compile(r"^(vllm|estimate|file:/\S{1,500})$")


class ModelNotFound(DomainError):
    code = "model_not_found"


class ModelExists(DomainError):
    code = "model_exists"


class DeploymentConflict(DomainError):
    code = "deployment_conflict"


class BackendKind(Enum):
    VLLM = "vllm"
    OLLAMA = "ollama"
    OPENAI = "openai"


@dataclass(frozen=True)
class Deployment:
    """One upstream serving a model: where, under which name, with which credential and timeout.

    `tokenizer` says how the gateway counts tokens when this upstream reports no usage: `vllm` (the
    server's /tokenize), `file:/path/tokenizer.json`, or `estimate`; None picks by backend (vLLM's
    endpoint for vLLM, the estimate otherwise).
    """

    name: str
    backend: BackendKind
    base_url: str
    upstream_model: str
    credential_ref: str | None = None
    weight: int = 1
    timeout_ms: int = 600_000
    tokenizer: str | None = None

    def cleaned(self) -> Deployment:
        if not _DEPLOYMENT_NAME_RE.match(self.name or ""):
            raise InvalidValue("deployment name: 1-63 lowercase letters, digits, '.', '_' or '-'",
                               rule="deployment_name")
        url = clean_text(self.base_url, "base_url", chars_max=500).rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise InvalidValue(f"base URL must be an http(s) URL without query: {url!r}", rule="base_url", value=url)
        if parts.username or parts.password:
            raise InvalidValue("base URL must not carry credentials: use --api-key-env", rule="url_credentials")
        if self.credential_ref is not None and not _CREDENTIAL_RE.match(self.credential_ref):
            raise InvalidValue("credential must be a reference: env:VARIABLE or file:/path", rule="credential")
        if self.tokenizer is not None and not _TOKENIZER_RE.match(self.tokenizer):
            raise InvalidValue("tokenizer must be vllm, estimate or file:/path/to/tokenizer.json", rule="tokenizer")
        return replace(
            self, base_url=url,
            upstream_model=clean_text(self.upstream_model, "upstream_model", chars_max=200),
            weight=bounded_int(self.weight, "weight", low=1, high=1000),
            timeout_ms=bounded_int(self.timeout_ms, "timeout_ms", low=100, high=TIMEOUT_MS_MAX),
        )


class ServedModel(Aggregate):
    class Added(Aggregate.Created):
        name: str
        description: str
        deployments: list[Deployment]
        prices: Prices

    class DeploymentAdded(Aggregate.Event):
        deployment: Deployment

    class DeploymentRemoved(Aggregate.Event):
        deployment_name: str

    class PricesChanged(Aggregate.Event):
        prices: Prices

    class DescriptionChanged(Aggregate.Event):
        description: str

    class Removed(Aggregate.Event):
        pass

    class Restored(Aggregate.Event):
        deployment: Deployment
        prices: Prices

    @staticmethod
    def create_id(name: str) -> UUID:
        return uuid5(NAMESPACE_URL, f"/lwapi/model/{name}")

    @event(Added)
    def __init__(self, name: str, description: str, deployments: list[Deployment], prices: Prices) -> None:
        self.name = name
        self.description = description
        self.deployments = list(deployments)
        self.price_schedule = [prices]
        self.removed = False

    @classmethod
    def add(cls, name: str, deployment: Deployment, prices: Prices, description: str = "") -> ServedModel:
        return cls(name=clean_model_name(name), description=_description(description),
                   deployments=[deployment.cleaned()], prices=prices.cleaned())

    def price_at(self, moment: datetime) -> Prices | None:
        return price_at(self.price_schedule, moment)

    def add_deployment(self, deployment: Deployment) -> None:
        cleaned = deployment.cleaned()
        if any(d.name == cleaned.name for d in self.deployments):
            raise DeploymentConflict(f"model {self.name} already has a deployment named {cleaned.name}")
        if len(self.deployments) >= DEPLOYMENTS_MAX:
            raise DeploymentConflict(f"a model has at most {DEPLOYMENTS_MAX} deployments")
        self._deployment_added(deployment=cleaned)

    @event(DeploymentAdded)
    def _deployment_added(self, deployment: Deployment) -> None:
        self.deployments.append(deployment)

    def remove_deployment(self, deployment_name: str) -> None:
        if not any(d.name == deployment_name for d in self.deployments):
            raise ModelNotFound(f"model {self.name} has no deployment named {deployment_name}")
        if len(self.deployments) == 1:
            raise DeploymentConflict("a model keeps at least one deployment: remove the model instead")
        self._deployment_removed(deployment_name=deployment_name)

    @event(DeploymentRemoved)
    def _deployment_removed(self, deployment_name: str) -> None:
        self.deployments = [d for d in self.deployments if d.name != deployment_name]

    def change_prices(self, prices: Prices) -> None:
        """A new price from its effective time on; past charges keep the price they were made at."""
        if len(self.price_schedule) >= PRICE_CHANGES_MAX:
            raise InvalidValue("too many price changes", rule="price_changes")
        self._prices_changed(prices=prices.cleaned())

    @event(PricesChanged)
    def _prices_changed(self, prices: Prices) -> None:
        self.price_schedule.append(prices)

    def describe(self, description: str) -> None:
        self._description_changed(description=_description(description))

    @event(DescriptionChanged)
    def _description_changed(self, description: str) -> None:
        self.description = description

    def remove(self) -> None:
        if not self.removed:
            self._removed()

    @event(Removed)
    def _removed(self) -> None:
        self.removed = True

    def restore(self, deployment: Deployment, prices: Prices) -> None:
        """A removed model comes back with the deployment and prices given now."""
        if not self.removed:
            raise ModelExists(f"model {self.name} already exists: add deployments or change prices instead")
        self._restored(deployment=deployment.cleaned(), prices=prices.cleaned())

    @event(Restored)
    def _restored(self, deployment: Deployment, prices: Prices) -> None:
        self.removed = False
        self.deployments = [deployment]
        self.price_schedule.append(prices)


def _description(text: str) -> str:
    """Free text over several lines; other control characters (NUL above all, which no PostgreSQL text
    holds) are refused."""
    if text is not None and not isinstance(text, str):
        raise InvalidValue("description must be text", rule="text", field="description")
    text = (text or "").replace("\r\n", "\n").strip()
    if len(text) > DESCRIPTION_CHARS_MAX:
        raise InvalidValue(f"description must be at most {DESCRIPTION_CHARS_MAX} characters",
                           rule="too_long", field="description", chars_max=DESCRIPTION_CHARS_MAX)
    if any((ord(c) < 32 and c not in "\n\t") or ord(c) == 127 for c in text):
        raise InvalidValue("description must not contain control characters", rule="control_chars",
                           field="description")
    return unicode_text(text, "description")
