"""`lwapi model …`: the model catalog (names clients use → deployments and prices).

Imports: everything inward.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from domain.access import SYSTEM
from domain.catalog import BackendKind, Deployment, ModelExists
from domain.errors import InvalidValue
from domain.pricing import Prices
from edge import queries
from edge.catalog_file import apply_catalog_file
from edge.cli_support import emit, handles_errors, json_option, parse_time, read, runtime, table


def _credential(api_key_env: str | None, api_key_file: str | None) -> str | None:
    if api_key_env and api_key_file:
        raise click.UsageError("give --api-key-env or --api-key-file, not both")
    if api_key_env:
        return f"env:{api_key_env}"
    return f"file:{api_key_file}" if api_key_file else None


def _deployment(opts: dict[str, Any], model_name: str) -> Deployment:
    backend = BackendKind(opts["backend"])
    name = opts["deployment"] or f"{backend.value}-{(urlsplit(opts['base_url']).hostname or 'upstream')}"
    return Deployment(
        name=name.lower().replace(":", "-")[:63], backend=backend, base_url=opts["base_url"],
        upstream_model=opts["upstream_model"] or model_name,
        credential_ref=_credential(opts["api_key_env"], opts["api_key_file"]),
        weight=opts["weight"], timeout_ms=int(opts["timeout_s"] * 1000), tokenizer=opts["tokenizer"],
    )


def _prices(prompt: int, completion: int, cached: int | None, effective_at: str | None) -> Prices:
    return Prices(prompt_per_mtok=prompt, completion_per_mtok=completion, cached_prompt_per_mtok=cached,
                  effective_at=parse_time(effective_at, "--effective-at") or datetime.now(UTC))


def deployment_options(fn: Any) -> Any:
    for option in reversed([
        click.option("--backend", type=click.Choice([b.value for b in BackendKind]), required=True),
        click.option("--base-url", required=True, help="e.g. http://gpu1:8000/v1 (vLLM), http://gpu2:11434 (Ollama)"),
        click.option("--upstream-model", default=None, help="The model's name upstream (default: NAME)."),
        click.option("--api-key-env", default=None, help="Environment variable holding the upstream key."),
        click.option("--api-key-file", default=None, help="File holding the upstream key."),
        click.option("--deployment", default=None, help="Deployment name (default: backend-host)."),
        click.option("--weight", type=int, default=1, show_default=True),
        click.option("--timeout-s", type=float, default=600.0, show_default=True),
        click.option("--tokenizer", default=None,
                     help="Counting tokens when the backend reports no usage: vllm (the server's /tokenize), "
                          "file:/path/tokenizer.json or estimate (default: vllm for vLLM, else estimate)."),
    ]):
        fn = option(fn)
    return fn


@click.group()
def model() -> None:
    """The model catalog."""


@model.command("add")
@click.argument("name")
@deployment_options
@click.option("--price-prompt", type=int, default=0, show_default=True, help="Credits per million prompt tokens.")
@click.option("--price-completion", type=int, default=0, show_default=True,
              help="Credits per million completion tokens.")
@click.option("--price-cached", type=int, default=None, help="Credits per million cached prompt tokens.")
@click.option("--description", default="")
@click.pass_context
@handles_errors
def model_add(ctx: click.Context, /, name: str, **opts: Any) -> None:
    """Add a model that clients request as NAME."""
    deployment = _deployment(opts, name)
    prices = _prices(opts["price_prompt"], opts["price_completion"], opts["price_cached"], None)
    with runtime(ctx) as rt:
        rt.accounting.add_model(SYSTEM, name, deployment, prices, opts["description"])
    click.echo(f"model {name} added (deployment {deployment.name})")


@model.command("list")
@click.option("--all", "include_removed", is_flag=True, help="Include removed models.")
@json_option
@click.pass_context
@handles_errors
def model_list(ctx: click.Context, include_removed: bool, as_json: bool) -> None:
    with runtime(ctx) as rt:
        rows = read(rt, queries.models, include_removed)
    emit(rows, as_json, lambda rs: table([_flat(r) for r in rs],
                                         ["name", "deployments", "price_prompt", "price_completion", "description"]))


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    current = row["prices"] or {}
    return {**row, "deployments": ", ".join(f"{d['name']}→{d['base_url']}" for d in row["deployments"]),
            "price_prompt": current.get("prompt_per_mtok"), "price_completion": current.get("completion_per_mtok")}


@model.command("remove")
@click.argument("name")
@click.pass_context
@handles_errors
def model_remove(ctx: click.Context, name: str) -> None:
    """Remove a model from the catalog (its history stays; adding the name again restores it)."""
    with runtime(ctx) as rt:
        rt.accounting.change_model(SYSTEM, name, lambda m: m.remove())
    click.echo(f"model {name} removed")


@model.command("price")
@click.argument("name")
@click.option("--prompt", type=int, required=True, help="Credits per million prompt tokens.")
@click.option("--completion", type=int, required=True, help="Credits per million completion tokens.")
@click.option("--cached", type=int, default=None, help="Credits per million cached prompt tokens.")
@click.option("--effective-at", default=None, help="ISO 8601 (UTC if no zone); default now.")
@click.pass_context
@handles_errors
def model_price(ctx: click.Context, name: str, prompt: int, completion: int, cached: int | None,
                effective_at: str | None) -> None:
    """Change prices from a time on; requests that started before keep the old price."""
    prices = _prices(prompt, completion, cached, effective_at)
    with runtime(ctx) as rt:
        rt.accounting.change_model(SYSTEM, name, lambda m: m.change_prices(prices))
    click.echo(f"model {name}: new prices from {prices.effective_at.isoformat()}")


@model.command("deploy")
@click.argument("name")
@deployment_options
@click.pass_context
@handles_errors
def model_deploy(ctx: click.Context, /, name: str, **opts: Any) -> None:
    """Add another deployment of NAME (requests are balanced across deployments)."""
    deployment = _deployment(opts, name)
    with runtime(ctx) as rt:
        rt.accounting.change_model(SYSTEM, name, lambda m: m.add_deployment(deployment))
    click.echo(f"model {name}: deployment {deployment.name} added")


@model.command("undeploy")
@click.argument("name")
@click.argument("deployment")
@click.pass_context
@handles_errors
def model_undeploy(ctx: click.Context, name: str, deployment: str) -> None:
    with runtime(ctx) as rt:
        rt.accounting.change_model(SYSTEM, name, lambda m: m.remove_deployment(deployment))
    click.echo(f"model {name}: deployment {deployment} removed")


DISCOVERY_TIMEOUT_S = 10.0


def discover_models(url: str, backend: str | None) -> tuple[BackendKind, str, list[str]]:
    """(backend, base URL, model names) of a running server: Ollama's /api/tags or OpenAI's /v1/models."""
    import httpx  # noqa: PLC0415 - only this command talks to upstreams directly

    root = url.rstrip("/")
    attempts = []
    if backend in (None, "ollama"):
        attempts.append((BackendKind.OLLAMA, root.removesuffix("/v1"), "/api/tags"))
    if backend in (None, "vllm", "openai"):
        base = root if root.endswith("/v1") else root + "/v1"
        attempts.append((BackendKind(backend or "openai"), base, "/models"))
    for kind, base, path in attempts:
        try:
            answer = httpx.get(base + path, timeout=DISCOVERY_TIMEOUT_S)
            body = answer.json()
        except (httpx.HTTPError, ValueError):
            continue
        if answer.status_code == 200 and kind is BackendKind.OLLAMA and isinstance(body.get("models"), list):
            return kind, base, [m["name"] for m in body["models"] if isinstance(m, dict) and "name" in m]
        if answer.status_code == 200 and isinstance(body.get("data"), list):
            models = [m for m in body["data"] if isinstance(m, dict) and "id" in m]
            says_vllm = backend is None and models and all(m.get("owned_by") == "vllm" for m in models)
            # vLLM says so itself: then its /tokenize can count and its /health be probed
            return (BackendKind.VLLM if says_vllm else kind), base, [m["id"] for m in models]
    raise click.ClickException(f"no Ollama or OpenAI-compatible model list answered at {url}")


@model.command("discover")
@click.argument("url")
@click.option("--backend", type=click.Choice([b.value for b in BackendKind]), default=None,
              help="What the server is (default: try Ollama's API, then OpenAI's).")
@click.option("--api-key-env", default=None, help="Environment variable holding the upstream key.")
@click.option("--price-prompt", type=int, default=0, show_default=True)
@click.option("--price-completion", type=int, default=0, show_default=True)
@click.pass_context
@handles_errors
def model_discover(ctx: click.Context, url: str, backend: str | None, api_key_env: str | None, price_prompt: int,
                   price_completion: int) -> None:
    """Add every model a running vLLM, Ollama or OpenAI-compatible server offers (existing names are skipped)."""
    kind, base, names = discover_models(url, backend)
    prices = _prices(price_prompt, price_completion, None, None)
    added, skipped = [], []
    with runtime(ctx) as rt:
        for name in names:
            deployment = Deployment(name=f"{kind.value}-{urlsplit(base).hostname or 'upstream'}"[:63], backend=kind,
                                    base_url=base, upstream_model=name,
                                    credential_ref=f"env:{api_key_env}" if api_key_env else None)
            try:
                rt.accounting.add_model(SYSTEM, name, deployment, prices)  # clients use the server's own name
                added.append(name)
            except (ModelExists, InvalidValue) as e:
                skipped.append(f"{name} ({e})")
    click.echo(f"{len(added)} model(s) added from {base} ({kind.value}): {', '.join(added) or '-'}")
    for line in skipped:
        click.echo(f"skipped {line}", err=True)



@model.command("apply")
@click.argument("path", type=click.Path(path_type=Path))
@click.pass_context
@handles_errors
def model_apply(ctx: click.Context, path: Path) -> None:
    """Bring the catalog up to a TOML file: adds models and deployments, records price changes."""
    with runtime(ctx) as rt:
        changes = apply_catalog_file(rt.accounting, SYSTEM, path)
    click.echo("\n".join(changes) if changes else "catalog already matches the file")
