"""The model catalog from a TOML file (LWAPI_CATALOG_FILE at start, or `lwapi model apply FILE`).

Imports: stdlib, domain. Applying a file adds what is missing — models, deployments — and records a
price change or description change where the file differs; it never removes anything (removal is a
deliberate `lwapi model remove`). Every change is an event like any other. Format:

    [[models]]
    name = "llama-3"
    description = "Llama 3 8B Instruct"
    price_prompt = 100          # credits per million tokens
    price_completion = 300
    [[models.deployments]]
    name = "gpu1"
    backend = "vllm"            # vllm | ollama | openai
    base_url = "http://gpu1:8000/v1"
    upstream_model = "meta-llama/Meta-Llama-3-8B-Instruct"
    api_key_env = "GPU1_KEY"    # or api_key_file = "/run/secrets/gpu1"; optional
    weight = 1
    timeout_s = 600
    tokenizer = "file:/models/llama-3/tokenizer.json"  # optional: counting when no usage is reported
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from domain.access import Actor
from domain.accounting import Accounting
from domain.catalog import BackendKind, Deployment, ModelNotFound, ServedModel
from domain.errors import DomainError, InvalidValue
from domain.pricing import Prices
from domain.validation import label

MODELS_MAX = 10_000


def deployment_from_fields(d: Mapping[str, Any], model: str) -> Deployment:
    """A deployment from a catalog file's table or a portal form (numbers may arrive as text)."""
    if d.get("api_key_env") and d.get("api_key_file"):
        raise InvalidValue(f"model {model}: give api_key_env or api_key_file, not both", rule="one_credential")
    credential = f"env:{d['api_key_env']}" if d.get("api_key_env") else (
        f"file:{d['api_key_file']}" if d.get("api_key_file") else None)
    missing = [name for name in ("name", "backend", "base_url") if name not in d]
    if missing:
        raise InvalidValue(f"model {model}: a deployment lacks {missing[0]!r}", rule="missing", field=missing[0])
    try:
        backend = BackendKind(d["backend"])
    except ValueError:
        raise InvalidValue(f"model {model}: unknown backend {d['backend']!r}", rule="backend",
                           value=str(d["backend"])[:40]) from None
    timeout_s = _number(d.get("timeout_s"), float, 600, "timeout_s")
    try:
        timeout_ms = int(timeout_s * 1000)
    except (ValueError, TypeError, OverflowError):
        raise InvalidValue(f"timeout s: not a number: {timeout_s!r}", rule="number", field="timeout_s") from None
    return Deployment(name=str(d["name"]), backend=backend, base_url=str(d["base_url"]),
                      upstream_model=str(d.get("upstream_model") or model), credential_ref=credential,
                      weight=_number(d.get("weight"), int, 1, "weight"), timeout_ms=timeout_ms,
                      tokenizer=d.get("tokenizer") or None)


def _number(value: Any, kind: type, default: Any, field: str) -> Any:
    """A form sends numbers as text; a file sends them as numbers, which the domain checks as they are."""
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        return value
    try:
        return kind(value.strip())
    except ValueError:
        raise InvalidValue(f"{label(field)}: not a number: {value[:40]!r}", rule="number", field=field) from None


def apply_catalog_file(app: Accounting, actor: Actor, path: Path) -> list[str]:
    """Bring the catalog up to the file; returns one line per change."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InvalidValue(f"catalog file {path}: {e}") from None
    models = document.get("models", [])
    if not isinstance(models, list) or len(models) > MODELS_MAX:
        raise InvalidValue(f"catalog file {path}: [[models]] must be a list of at most {MODELS_MAX}")
    changes: list[str] = []
    for entry in models:
        try:
            changes += _apply_model(app, actor, entry)
        except DomainError as e:
            raise type(e)(f"catalog file {path}: {e}") from None
    return changes


def _apply_model(app: Accounting, actor: Actor, entry: dict[str, Any]) -> list[str]:
    name = str(entry.get("name", ""))
    deployments = [deployment_from_fields(d, name) for d in entry.get("deployments", [])]
    if not deployments:
        raise InvalidValue(f"model {name!r} needs at least one [[models.deployments]]")
    prices = Prices(entry.get("price_prompt", 0), entry.get("price_completion", 0), datetime.now(UTC),
                    entry.get("price_cached"))
    description = str(entry.get("description", ""))
    changes: list[str] = []
    try:
        model = app.get_model(name)
    except ModelNotFound:
        app.add_model(actor, name, deployments[0], prices, description)
        model = app.get_model(name)
        changes.append(f"added model {name}")
    known = {d.name for d in model.deployments}
    for deployment in deployments:
        if deployment.name not in known:
            app.change_model(actor, name, partial(ServedModel.add_deployment, deployment=deployment))
            changes.append(f"{name}: added deployment {deployment.name}")
    current = app.get_model(name).price_at(datetime.now(UTC))
    wanted = (prices.prompt_per_mtok, prices.completion_per_mtok, prices.cached_prompt_per_mtok)
    if current is None or (current.prompt_per_mtok, current.completion_per_mtok,
                           current.cached_prompt_per_mtok) != wanted:
        app.change_model(actor, name, partial(ServedModel.change_prices, prices=prices))
        changes.append(f"{name}: prices changed")
    if description and app.get_model(name).description != description:
        app.change_model(actor, name, lambda m: m.describe(description))
        changes.append(f"{name}: description changed")
    return changes
