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

from litestar import get, post
from litestar.response import Redirect, Template

from domain.access import Actor
from domain.catalog import BackendKind, ServedModel
from domain.errors import DomainError, InvalidValue
from domain.pricing import Prices
from domain.validation import label
from edge import queries
from edge.catalog_file import deployment_from_fields
from edge.portal.context import (
    AnyRequest,
    admin_actor,
    current_user,
    form_text,
    form_time,
    pool_of,
    render,
    runtime_of,
    settled,
    take_notice,
    translator,
)
from edge.portal.form_guard import FORM_POST
from edge.portal.routes import FORM

FIELD_CHARS_MAX = 2_000


async def _page(request: AnyRequest, *, error: str | None = None, notice: str | None = None,
                status_code: int = 200) -> Template:
    models = await queries.models(pool_of(request))
    return render(request, "admin_models.html", user=await current_user(request), status_code=status_code,
                  models=models, backends=[b.value for b in BackendKind], error=error, notice=notice)


@get("/admin/models")
async def models_page(request: AnyRequest) -> Template | Redirect:
    actor = await admin_actor(request)
    if not isinstance(actor, Actor):
        return actor
    return await _page(request)


def _text(form: Mapping[str, Any], name: str) -> str:
    return form_text(form, name, FIELD_CHARS_MAX)


def _credits(form: Mapping[str, Any], name: str, *, optional: bool = False) -> int | None:
    text = _text(form, name)
    if text == "" and optional:
        return None
    try:
        return int(text or "0")
    except ValueError:
        raise InvalidValue(f"{label(name)}: a whole number of credits per million tokens",
                           rule="price", field=name) from None


def _prices(form: Mapping[str, Any]) -> Prices:
    effective = form_time(form, "effective_at", FIELD_CHARS_MAX)
    return Prices(prompt_per_mtok=_credits(form, "price_prompt") or 0,
                  completion_per_mtok=_credits(form, "price_completion") or 0,
                  cached_prompt_per_mtok=_credits(form, "price_cached", optional=True),
                  effective_at=effective or datetime.now(UTC))


def _deployment_fields(form: Mapping[str, Any]) -> dict[str, Any]:
    names = ("deployment", "backend", "base_url", "upstream_model", "api_key_env", "weight", "timeout_s", "tokenizer")
    fields = {name: _text(form, name) for name in names}
    fields["name"] = fields.pop("deployment")
    return fields


Notice = tuple[str, dict[str, Any]]  # a message key of the catalog and its parameters


async def _apply(request: AnyRequest, form: Mapping[str, Any],
                 command: Callable[[Actor, Mapping[str, Any]], Notice]) -> Template | Redirect:
    """Run one catalog command for the logged-in administrator; success redirects (no resubmission)."""
    actor = await admin_actor(request)
    if not isinstance(actor, Actor):
        return actor
    t = translator(request)
    try:
        key, params = await asyncio.to_thread(command, actor, form)
    except DomainError as e:
        return await _page(request, error=t.error(e), status_code=400)
    await settled(request)
    request.session["notice"] = t(key, **params)
    return Redirect("/admin/models/done", status_code=303)  # see other: a reload does not post again


@get("/admin/models/done")
async def after_change(request: AnyRequest) -> Template | Redirect:
    actor = await admin_actor(request)
    if not isinstance(actor, Actor):
        return actor
    return await _page(request, notice=take_notice(request))


@post("/admin/models", **FORM_POST)
async def add_model(request: AnyRequest, data: dict[str, Any] = FORM) -> Template | Redirect:
    def command(actor: Actor, form: Mapping[str, Any]) -> Notice:
        name = _text(form, "name")
        deployment = deployment_from_fields(_deployment_fields(form), name)
        runtime_of(request).accounting.add_model(actor, name, deployment, _prices(form), _text(form, "description"))
        return "catalog.added", {"model": name}
    return await _apply(request, data, command)


@post("/admin/models/{name:str}/deployments", **FORM_POST)
async def add_deployment(request: AnyRequest, name: str,
                         data: dict[str, Any] = FORM) -> Template | Redirect:
    def command(actor: Actor, form: Mapping[str, Any]) -> Notice:
        deployment = deployment_from_fields(_deployment_fields(form), name)
        runtime_of(request).accounting.change_model(actor, name,
                                                    partial(ServedModel.add_deployment, deployment=deployment))
        return "catalog.deployment_added", {"deployment": deployment.name, "model": name}
    return await _apply(request, data, command)


@post("/admin/models/{name:str}/deployments/{deployment:str}/remove", **FORM_POST)
async def remove_deployment(request: AnyRequest, name: str, deployment: str,
                            data: dict[str, Any] = FORM) -> Template | Redirect:
    def command(actor: Actor, _form: Mapping[str, Any]) -> Notice:
        runtime_of(request).accounting.change_model(
            actor, name, partial(ServedModel.remove_deployment, deployment_name=deployment))
        return "catalog.deployment_removed", {"deployment": deployment, "model": name}
    return await _apply(request, data, command)


@post("/admin/models/{name:str}/prices", **FORM_POST)
async def change_prices(request: AnyRequest, name: str, data: dict[str, Any] = FORM) -> Template | Redirect:
    def command(actor: Actor, form: Mapping[str, Any]) -> Notice:
        prices = _prices(form)
        runtime_of(request).accounting.change_model(actor, name, partial(ServedModel.change_prices, prices=prices))
        return "catalog.prices_changed", {"model": name, "when": f"{prices.effective_at:%Y-%m-%d %H:%M}"}
    return await _apply(request, data, command)


@post("/admin/models/{name:str}/description", **FORM_POST)
async def describe(request: AnyRequest, name: str, data: dict[str, Any] = FORM) -> Template | Redirect:
    def command(actor: Actor, form: Mapping[str, Any]) -> Notice:
        text = _text(form, "description")
        runtime_of(request).accounting.change_model(actor, name, lambda m: m.describe(text))
        return "catalog.described", {"model": name}
    return await _apply(request, data, command)


@post("/admin/models/{name:str}/remove", **FORM_POST)
async def remove_model(request: AnyRequest, name: str, data: dict[str, Any] = FORM) -> Template | Redirect:
    def command(actor: Actor, _form: Mapping[str, Any]) -> Notice:
        runtime_of(request).accounting.change_model(actor, name, lambda m: m.remove())
        return "catalog.removed", {"model": name}
    return await _apply(request, data, command)


admin_catalog_routes = [models_page, after_change, add_model, add_deployment, remove_deployment, change_prices,
                        describe, remove_model]
