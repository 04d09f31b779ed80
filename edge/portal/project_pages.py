"""Portal pages of one project: its home (balance, keys, models, recent usage) and its API keys.

Imports: everything inward. Who may see what: members (and platform administrators) see the project;
managers and the creator see and manage every key, users only their own. The pages hide what a role
may not do, and the domain refuses it anyway (a refused command is a 403 page, never a change).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from litestar import get, post
from litestar.response import Redirect, Template

from domain.access import Actor
from domain.api_key import KeySettings, key_status
from domain.errors import DomainError, InvalidValue, KeyNotFound, PermissionDenied
from domain.validation import label
from edge import queries
from edge.portal.context import (
    AnyRequest,
    current_user,
    form_text,
    form_time,
    plausible_code,
    pool_of,
    render,
    runtime_of,
    settled,
    take_notice,
    translator,
)
from edge.portal.form_guard import FORM_POST
from edge.portal.routes import FORM

FIELD_CHARS_MAX = 500
USAGE_DAYS = 14


@dataclass
class Visit:
    """A logged-in person on a project's page: who, which project, in which role."""

    user: dict[str, Any]
    project: dict[str, Any]
    role: str | None  # None: a platform administrator who is not a member

    @property
    def actor(self) -> Actor:
        return Actor(user_id=self.user["user_id"], is_admin=bool(self.user["is_admin"]))

    @property
    def manages_all_keys(self) -> bool:
        return self.role in ("creator", "manager") or bool(self.user["is_admin"])


async def visit_of(request: AnyRequest, code: str) -> Visit | Redirect | Template:
    user = await current_user(request)
    if user is None:
        return Redirect("/login")
    project = None if not plausible_code(code) else await queries.project_by_code(pool_of(request), code,
                                                                                   user["user_id"])
    if project is None or (project["role"] is None and not user["is_admin"]):
        return render(request, "not_found.html", user=user, status_code=404)  # another's project: as if absent
    return Visit(user, project, project["role"])


def page_context(visit: Visit) -> dict[str, Any]:
    return {"user": visit.user, "project": visit.project, "role": visit.role}


def _with_status(keys: list[dict[str, Any]]) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    for k in keys:
        k["status"] = key_status(revoked=k["revoked_at"] is not None, valid_from=k["valid_from"],
                                 valid_until=k["valid_until"], cap_credits=k["cap_credits"],
                                 used_credits=k["used_credits"], now=now).value
    return keys


async def _keys(request: AnyRequest, visit: Visit) -> list[dict[str, Any]]:
    owner = None if visit.manages_all_keys else visit.user["user_id"]
    return _with_status(await queries.keys_visible_to(pool_of(request), visit.project["project_id"], owner))


@get("/projects/{code:str}")
async def project_home(request: AnyRequest, code: str) -> Template | Redirect:
    visit = await visit_of(request, code)
    if not isinstance(visit, Visit):
        return visit
    pool = pool_of(request)
    keys = await _keys(request, visit)
    models, usage = await asyncio.gather(queries.models(pool),
                                         queries.usage_by_day(pool, visit.project["project_id"], USAGE_DAYS))
    return render(request, "project_home.html", **page_context(visit), keys=keys, models=models, usage=usage,
                  active_keys=sum(1 for k in keys if k["status"] == "active"))


@get("/projects/{code:str}/keys")
async def keys_page(request: AnyRequest, code: str) -> Template | Redirect:
    visit = await visit_of(request, code)
    if not isinstance(visit, Visit):
        return visit
    return await _keys_page(request, visit, notice=take_notice(request))


async def _keys_page(request: AnyRequest, visit: Visit, *, status_code: int = 200, error: str | None = None,
                     notice: str | None = None, form: Mapping[str, Any] | None = None,
                     created: dict[str, Any] | None = None) -> Template:
    models = await queries.models(pool_of(request))
    keys = await _keys(request, visit)
    return render(request, "keys.html", **page_context(visit), status_code=status_code, keys=keys, models=models,
                  error=error, notice=notice, form=form or {}, created=created,
                  base_url=str(request.base_url).rstrip("/") + "/v1")


def _text(form: Mapping[str, Any], name: str) -> str:
    return form_text(form, name, FIELD_CHARS_MAX)


def _optional_int(form: Mapping[str, Any], name: str, what: str) -> int | None:
    text = _text(form, name)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidValue(f"{label(what)}: a whole number, or empty for no limit",
                           rule="optional_int", field=what) from None


def _models(form: Mapping[str, Any]) -> tuple[str, ...]:
    chosen = form.get("models", [])
    if isinstance(chosen, str):
        chosen = [chosen]
    if not isinstance(chosen, list) or not all(isinstance(m, str) for m in chosen):
        raise InvalidValue("allowed models: a list of model names", rule="model_list")
    return tuple(chosen)


def settings_from(form: Mapping[str, Any]) -> KeySettings:
    """Key settings from the form (times in UTC); the domain checks every limit."""
    return KeySettings(
        name=_text(form, "name"),
        rpm_limit=_optional_int(form, "rpm_limit", "requests_per_minute"),
        tpm_limit=_optional_int(form, "tpm_limit", "tokens_per_minute"),
        cap_credits=_optional_int(form, "cap_credits", "usage_cap"),
        valid_from=form_time(form, "valid_from", FIELD_CHARS_MAX),
        valid_until=form_time(form, "valid_until", FIELD_CHARS_MAX),
        allowed_models=_models(form),
    )


@post("/projects/{code:str}/keys", **FORM_POST)
async def create_key(request: AnyRequest, code: str, data: dict[str, Any] = FORM) -> Template | Redirect:
    visit = await visit_of(request, code)
    if not isinstance(visit, Visit):
        return visit
    t = translator(request)
    accounting = runtime_of(request).accounting
    try:
        settings = settings_from(data)
        key_id, secret = await asyncio.to_thread(accounting.create_key, visit.actor, visit.project["project_id"],
                                                 visit.user["user_id"], settings)
    except PermissionDenied as e:
        return render(request, "forbidden.html", **page_context(visit), status_code=403, reason=t.error(e))
    except DomainError as e:
        return await _keys_page(request, visit, status_code=400, error=t.error(e), form=data)
    await settled(request)
    await _gateway_knows(request, key_id)
    # The secret is shown in this response only: it is never stored, nor put in a session or a URL.
    return await _keys_page(request, visit, status_code=201,
                            created={"key_id": key_id, "secret": secret, "name": settings.name})


async def _own_key(request: AnyRequest, visit: Visit, key_id: str) -> dict[str, Any] | None:
    """The key, if it belongs to this project and the person may see it."""
    try:
        wanted = UUID(key_id)
    except ValueError:
        return None
    for key in await _keys(request, visit):
        if key["key_id"] == wanted:
            return key
    return None


async def _key_visit(request: AnyRequest, code: str,
                     key_id: str) -> tuple[Visit, dict[str, Any]] | Redirect | Template:
    """The person on the project's page and the key they address; else the page that refuses them."""
    visit = await visit_of(request, code)
    if not isinstance(visit, Visit):
        return visit
    key = await _own_key(request, visit, key_id)
    if key is None:
        return await _not_yours(request, visit, key_id)
    return visit, key


@get("/projects/{code:str}/keys/{key_id:str}/edit")
async def edit_key_page(request: AnyRequest, code: str, key_id: str) -> Template | Redirect:
    found = await _key_visit(request, code, key_id)
    if not isinstance(found, tuple):
        return found
    visit, key = found
    models = await queries.models(pool_of(request))
    return render(request, "key_edit.html", **page_context(visit), key=key, models=models, error=None)


@post("/projects/{code:str}/keys/{key_id:str}/edit", **FORM_POST)
async def edit_key(request: AnyRequest, code: str, key_id: str, data: dict[str, Any] = FORM) -> Template | Redirect:
    return await _change_key(request, code, key_id, data, revoke=False)


@post("/projects/{code:str}/keys/{key_id:str}/revoke", **FORM_POST)
async def revoke_key(request: AnyRequest, code: str, key_id: str, data: dict[str, Any] = FORM) -> Template | Redirect:
    return await _change_key(request, code, key_id, data, revoke=True)


async def _change_key(request: AnyRequest, code: str, key_id: str, form: Mapping[str, Any], *,
                      revoke: bool) -> Template | Redirect:
    found = await _key_visit(request, code, key_id)
    if not isinstance(found, tuple):
        return found
    visit, key = found
    t = translator(request)
    accounting = runtime_of(request).accounting
    try:
        if revoke:
            await asyncio.to_thread(accounting.revoke_key, visit.actor, key["key_id"])
            notice = t("keys.revoked_notice", name=key["name"])
        else:
            settings = settings_from(form)
            await asyncio.to_thread(accounting.edit_key, visit.actor, key["key_id"], settings)
            notice = t("keys.edited_notice", name=settings.name)
    except PermissionDenied as e:
        return render(request, "forbidden.html", **page_context(visit), status_code=403, reason=t.error(e))
    except KeyNotFound:
        return render(request, "not_found.html", **page_context(visit), status_code=404)
    except DomainError as e:
        if revoke:
            return await _keys_page(request, visit, status_code=400, error=t.error(e))
        return render(request, "key_edit.html", **page_context(visit), status_code=400, key={**key, **_echo(form)},
                      models=await queries.models(pool_of(request)), error=t.error(e))
    await settled(request)
    await _gateway_knows(request, key["key_id"])
    request.session["notice"] = notice
    return Redirect(f"/projects/{visit.project['code']}/keys", status_code=303)


async def _gateway_knows(request: AnyRequest, key_id: UUID) -> None:
    """This process's gateway takes the change now (a new key works at once, a revoked one stops at once);
    other processes follow the database's notification within a second."""
    gateway = getattr(request.app.state, "gateway", None)
    if gateway is not None:
        await gateway.index.reload_keys({key_id})


async def _not_yours(request: AnyRequest, visit: Visit, key_id: str) -> Template:
    """Another member's key of this project: 403 (the role may not); anything else: 404 (as if absent)."""
    try:
        found = await queries.key(pool_of(request), UUID(key_id))
    except ValueError:
        found = {}
    if found and found["project_id"] == visit.project["project_id"]:
        return render(request, "forbidden.html", **page_context(visit), status_code=403)
    return render(request, "not_found.html", **page_context(visit), status_code=404)


def _echo(form: Mapping[str, Any]) -> dict[str, Any]:
    """What the person typed, to show again beside the error (never half-saved: nothing was)."""
    return {"name": form.get("name", ""), "form": form}


project_routes = [project_home, keys_page, create_key, edit_key_page, edit_key, revoke_key]
