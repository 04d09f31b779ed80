"""Portal pages for administrators: the model catalog (models, deployments, prices, descriptions).

Imports: everything inward. Every change is a command on the `Accounting` application (an event in
the log, picked up by running gateways within a second), issued as the administrator who is logged
in; the page reads the `models` read model. A refused change re-renders the page with its reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any

from litestar import Request, get, post
from litestar.response import Redirect, Template

from domain.access import Actor
from domain.catalog import BackendKind, ServedModel
from domain.errors import DomainError, InvalidValue
from domain.pricing import Prices
from edge import queries
from edge.catalog_file import deployment_from_fields
from edge.cli_support import parse_time
from edge.portal.routes import FORM, current_user, runtime_of

FIELD_CHARS_MAX = 2_000


async def _admin(request: Request[Any, Any, Any]) -> Actor | Redirect | Template:
    user = await current_user(request)
    if user is None:
        return Redirect("/login")
    if not user["is_admin"]:
        return Template("forbidden.html", context={"user": user}, status_code=403)
    return Actor(user_id=user["user_id"], is_admin=True)


async def _page(request: Request[Any, Any, Any], *, error: str | None = None, notice: str | None = None,
                status_code: int = 200) -> Template:
    runtime = runtime_of(request)
    assert runtime.pool is not None
    models = await queries.models(runtime.pool)
    return Template("admin_models.html", status_code=status_code, context={
        "user": await current_user(request), "models": models, "backends": [b.value for b in BackendKind],
        "error": error, "notice": notice})


@get("/admin/models")
async def models_page(request: Request[Any, Any, Any]) -> Template | Redirect:
    actor = await _admin(request)
    if not isinstance(actor, Actor):
        return actor
    return await _page(request)


def _text(form: Mapping[str, Any], name: str) -> str:
    value = form.get(name, "")
    if not isinstance(value, str) or len(value) > FIELD_CHARS_MAX:
        raise InvalidValue(f"{name}: text of at most {FIELD_CHARS_MAX} characters")
    return value.strip()


def _credits(form: Mapping[str, Any], name: str, *, optional: bool = False) -> int | None:
    text = _text(form, name)
    if text == "" and optional:
        return None
    try:
        return int(text or "0")
    except ValueError:
        raise InvalidValue(f"{name.replace('_', ' ')}: a whole number of credits per million tokens") from None


def _prices(form: Mapping[str, Any]) -> Prices:
    effective = parse_time(_text(form, "effective_at") or None, "effective from")
    return Prices(prompt_per_mtok=_credits(form, "price_prompt") or 0,
                  completion_per_mtok=_credits(form, "price_completion") or 0,
                  cached_prompt_per_mtok=_credits(form, "price_cached", optional=True),
                  effective_at=effective or datetime.now(UTC))


def _deployment_fields(form: Mapping[str, Any]) -> dict[str, Any]:
    names = ("deployment", "backend", "base_url", "upstream_model", "api_key_env", "weight", "timeout_s", "tokenizer")
    fields = {name: _text(form, name) for name in names}
    fields["name"] = fields.pop("deployment")
    return fields


async def _apply(request: Request[Any, Any, Any], form: Mapping[str, Any],
                 command: Callable[[Actor, Mapping[str, Any]], str]) -> Template | Redirect:
    """Run one catalog command for the logged-in administrator; success redirects (no resubmission)."""
    actor = await _admin(request)
    if not isinstance(actor, Actor):
        return actor
    runtime = runtime_of(request)
    try:
        notice = await asyncio.to_thread(command, actor, form)
    except DomainError as e:
        return await _page(request, error=str(e), status_code=400)
    position = await asyncio.to_thread(runtime.accounting.recorder.max_notification_id)
    assert runtime.pool is not None
    await queries.wait_until_projected(runtime.pool, position or 0)
    request.session["notice"] = notice
    return Redirect("/admin/models/done", status_code=303)  # see other: a reload does not post again


@get("/admin/models/done")
async def after_change(request: Request[Any, Any, Any]) -> Template | Redirect:
    actor = await _admin(request)
    if not isinstance(actor, Actor):
        return actor
    notice = request.session.pop("notice", None) if request.session else None
    return await _page(request, notice=notice)


@post("/admin/models")
async def add_model(request: Request[Any, Any, Any], data: dict[str, Any] = FORM) -> Template | Redirect:
    def command(actor: Actor, form: Mapping[str, Any]) -> str:
        name = _text(form, "name")
        deployment = deployment_from_fields(_deployment_fields(form), name)
        runtime_of(request).accounting.add_model(actor, name, deployment, _prices(form), _text(form, "description"))
        return f"Model {name} added."
    return await _apply(request, data, command)


@post("/admin/models/{name:str}/deployments")
async def add_deployment(request: Request[Any, Any, Any], name: str,
                         data: dict[str, Any] = FORM) -> Template | Redirect:
    def command(actor: Actor, form: Mapping[str, Any]) -> str:
        deployment = deployment_from_fields(_deployment_fields(form), name)
        runtime_of(request).accounting.change_model(actor, name,
                                                    partial(ServedModel.add_deployment, deployment=deployment))
        return f"Deployment {deployment.name} added to {name}."
    return await _apply(request, data, command)


@post("/admin/models/{name:str}/deployments/{deployment:str}/remove")
async def remove_deployment(request: Request[Any, Any, Any], name: str, deployment: str,
                            data: dict[str, Any] = FORM) -> Template | Redirect:
    def command(actor: Actor, _form: Mapping[str, Any]) -> str:
        runtime_of(request).accounting.change_model(
            actor, name, partial(ServedModel.remove_deployment, deployment_name=deployment))
        return f"Deployment {deployment} removed from {name}."
    return await _apply(request, data, command)


@post("/admin/models/{name:str}/prices")
async def change_prices(request: Request[Any, Any, Any], name: str, data: dict[str, Any] = FORM) -> Template | Redirect:
    def command(actor: Actor, form: Mapping[str, Any]) -> str:
        prices = _prices(form)
        runtime_of(request).accounting.change_model(actor, name, partial(ServedModel.change_prices, prices=prices))
        return f"New prices for {name} from {prices.effective_at:%Y-%m-%d %H:%M} UTC."
    return await _apply(request, data, command)


@post("/admin/models/{name:str}/description")
async def describe(request: Request[Any, Any, Any], name: str, data: dict[str, Any] = FORM) -> Template | Redirect:
    def command(actor: Actor, form: Mapping[str, Any]) -> str:
        text = _text(form, "description")
        runtime_of(request).accounting.change_model(actor, name, lambda m: m.describe(text))
        return f"Description of {name} changed."
    return await _apply(request, data, command)


@post("/admin/models/{name:str}/remove")
async def remove_model(request: Request[Any, Any, Any], name: str, data: dict[str, Any] = FORM) -> Template | Redirect:
    def command(actor: Actor, _form: Mapping[str, Any]) -> str:
        runtime_of(request).accounting.change_model(actor, name, lambda m: m.remove())
        return f"Model {name} removed (its history stays; adding the name again restores it)."
    return await _apply(request, data, command)


admin_catalog_routes = [models_page, after_change, add_model, add_deployment, remove_deployment, change_prices,
                        describe, remove_model]
