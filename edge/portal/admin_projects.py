"""Portal page for administrators: every project with its balance; create projects, grant and correct credits.

Imports: everything inward. Each change is a command as the logged-in administrator (an event with the
amount, the reason and who did it); the creator of a new project is found by e-mail, or registered
with it (their first single sign-on with that e-mail joins them to the account).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from typing import Any
from uuid import UUID

from litestar import get, post
from litestar.response import Redirect, Template

from domain.access import Actor
from domain.errors import DomainError, InvalidValue, ProjectCodeTaken, ProjectNotFound, UserNotFound
from domain.validation import REASON_CHARS_MAX, clean_code, clean_text, credits
from edge import queries
from edge.portal.context import (
    AnyRequest,
    admin_actor,
    current_user,
    form_email,
    form_text,
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


async def _page(request: AnyRequest, *, status_code: int = 200, error: str | None = None,
                notice: str | None = None) -> Template:
    projects = await queries.projects(pool_of(request))
    return render(request, "admin_projects.html", user=await current_user(request), status_code=status_code,
                  projects=projects, error=error, notice=notice)


@get("/admin/projects")
async def projects_page(request: AnyRequest) -> Template | Redirect:
    actor = await admin_actor(request)
    if not isinstance(actor, Actor):
        return actor
    return await _page(request, notice=take_notice(request))


def _text(form: Mapping[str, Any], name: str) -> str:
    return form_text(form, name, FIELD_CHARS_MAX)


_WHOLE_NUMBER = re.compile(r"[+-]?(?:[0-9]+|[0-9]{1,3}(?:[,_][0-9]{3})+)")


def _amount(form: Mapping[str, Any]) -> int:
    """A whole number of credits; "," or "_" only between groups of three digits (never "1,5" read as 15)."""
    text = _text(form, "amount")
    if not _WHOLE_NUMBER.fullmatch(text):
        raise InvalidValue("amount: a whole number of credits", rule="credits", field="amount")
    return int(text.replace(",", "").replace("_", ""))


def _kind(form: Mapping[str, Any]) -> str:
    kind = _text(form, "kind") or "grant"
    if kind not in ("grant", "correction"):
        raise InvalidValue(f"not a kind of change: {kind!r}", rule="credit_kind", value=kind)
    return kind


def _project_id(form: Mapping[str, Any]) -> UUID:
    try:
        return UUID(_text(form, "project_id"))
    except ValueError:
        raise ProjectNotFound("no such project") from None


Notice = tuple[str, dict[str, Any]]


async def _apply(request: AnyRequest, form: Mapping[str, Any],
                 command: Callable[[Actor, Mapping[str, Any]], Notice]) -> Template | Redirect:
    actor = await admin_actor(request)
    if not isinstance(actor, Actor):
        return actor
    t = translator(request)
    try:
        key, params = await asyncio.to_thread(command, actor, form)
    except DomainError as e:
        return await _page(request, status_code=400, error=t.error(e))
    await settled(request)
    request.session["notice"] = t(key, **params)
    return Redirect("/admin/projects", status_code=303)


@post("/admin/projects", **FORM_POST)
async def create_project(request: AnyRequest, data: dict[str, Any] = FORM) -> Template | Redirect:
    accounting = runtime_of(request).accounting

    def command(actor: Actor, form: Mapping[str, Any]) -> Notice:
        # every input is checked before anything is saved: never a stray account or half a project
        code, name = clean_code(_text(form, "code")), clean_text(_text(form, "name"), "project_name")
        email = form_email(form, "creator_email")
        try:
            accounting.find_project_by_code(code)
            raise ProjectCodeTaken(f"project code {code} is taken")
        except ProjectNotFound:
            pass
        amount = _amount(form) if _text(form, "amount") else None
        reason = clean_text(_text(form, "reason") or "initial allocation", "reason", chars_max=REASON_CHARS_MAX)
        if amount is not None and amount <= 0:
            raise InvalidValue("an initial grant must be a positive number of credits", rule="initial_grant")
        if amount is not None:
            credits(amount, "amount", low=1)
        try:
            creator = accounting.find_user_by_email(email).id
        except UserNotFound:
            creator = accounting.register_user(email, email.split("@")[0])
        project_id = accounting.create_project(actor, code, name, creator)
        if amount is not None:
            accounting.grant_credits(actor, project_id, amount, reason)
        return "admin.created", {"code": code}
    return await _apply(request, data, command)


@post("/admin/projects/credits", **FORM_POST)
async def change_credits(request: AnyRequest, data: dict[str, Any] = FORM) -> Template | Redirect:
    accounting = runtime_of(request).accounting

    def command(actor: Actor, form: Mapping[str, Any]) -> Notice:
        project_id, kind, amount, reason = _project_id(form), _kind(form), _amount(form), _text(form, "reason")
        if kind == "correction":
            accounting.correct_credits(actor, project_id, amount, reason)
        else:
            accounting.grant_credits(actor, project_id, amount, reason)
        return "admin.credited", {"amount": f"{amount:,}", "code": accounting.get_project(project_id).code}
    return await _apply(request, data, command)


admin_project_routes = [projects_page, create_project, change_credits]
