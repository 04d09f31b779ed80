"""Portal page of a project's members: who is in it, in which role, and who may change that.

Imports: everything inward. Managers add and remove users; the creator also appoints and demotes
managers and can hand the creator role over. A person added by e-mail who has never logged in is
registered with that e-mail; their first single sign-on with it (verified) links to that account.
Forms a role may not use are not shown, and the domain refuses them anyway (403).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from uuid import UUID

from litestar import get, post
from litestar.response import Redirect, Template

from domain.access import Actor
from domain.errors import DomainError, InvalidValue, PermissionDenied, UserNotFound
from domain.project import Role
from edge import queries
from edge.portal.context import (
    AnyRequest,
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
from edge.portal.project_pages import Visit, page_context, visit_of
from edge.portal.routes import FORM


@get("/projects/{code:str}/members")
async def members_page(request: AnyRequest, code: str) -> Template | Redirect:
    visit = await visit_of(request, code)
    if not isinstance(visit, Visit):
        return visit
    return await _page(request, visit, notice=take_notice(request))


async def _page(request: AnyRequest, visit: Visit, *, status_code: int = 200, error: str | None = None,
                notice: str | None = None) -> Template:
    members = await queries.members(pool_of(request), visit.project["project_id"])
    is_creator = visit.role == "creator" or bool(visit.user["is_admin"])
    return render(request, "members.html", **page_context(visit), status_code=status_code, members=members,
                  error=error, notice=notice, may_manage=visit.manages_all_keys, is_creator=is_creator)


def _member_id(form: dict[str, Any]) -> UUID:
    try:
        return UUID(str(form.get("user_id", "")))
    except ValueError:
        raise UserNotFound("no such member") from None


async def _change(request: AnyRequest, code: str, form: dict[str, Any],
                  command: Callable[[Actor, UUID, dict[str, Any]], tuple[str, dict[str, Any]]]) -> Template | Redirect:
    visit = await visit_of(request, code)
    if not isinstance(visit, Visit):
        return visit
    t = translator(request)
    try:
        key, params = await asyncio.to_thread(command, visit.actor, visit.project["project_id"], form)
    except PermissionDenied as e:
        return render(request, "forbidden.html", **page_context(visit), status_code=403, reason=t.error(e))
    except DomainError as e:
        return await _page(request, visit, status_code=400, error=t.error(e))
    await settled(request)
    request.session["notice"] = t(key, **params)
    return Redirect(f"/projects/{visit.project['code']}/members", status_code=303)


@post("/projects/{code:str}/members", **FORM_POST)
async def add_member(request: AnyRequest, code: str, data: dict[str, Any] = FORM) -> Template | Redirect:
    accounting = runtime_of(request).accounting

    def command(actor: Actor, project_id: UUID, form: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        email = form_email(form, "email")
        chosen = form_text(form, "role", 20) or "user"
        if chosen not in ("user", "manager"):
            raise InvalidValue(f"not a role a member can be given: {chosen!r}", rule="role", value=chosen)
        role = Role(chosen)
        try:
            user_id = accounting.find_user_by_email(email).id
        except UserNotFound:
            accounting.require_member_manager(actor, project_id, role)  # no stray account for a refused invite
            user_id = accounting.register_user(email, email.split("@")[0])
        accounting.add_member(actor, project_id, user_id, role)
        return "members.added", {"email": email}
    return await _change(request, code, data, command)


@post("/projects/{code:str}/members/role", **FORM_POST)
async def change_role(request: AnyRequest, code: str, data: dict[str, Any] = FORM) -> Template | Redirect:
    accounting = runtime_of(request).accounting

    def command(actor: Actor, project_id: UUID, form: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        user_id = _member_id(form)
        chosen = form_text(form, "role", 20)
        if chosen not in ("user", "manager", "creator"):  # never a silent demotion for a value the form never sends
            raise InvalidValue(f"not a role a member can be given: {chosen!r}", rule="role", value=chosen)
        if chosen == "creator":
            accounting.hand_over_creator(actor, project_id, user_id)
        else:
            accounting.change_role(actor, project_id, user_id, Role(chosen))
        return "members.role_changed", {"name": accounting.get_user(user_id).display_name}
    return await _change(request, code, data, command)


@post("/projects/{code:str}/members/remove", **FORM_POST)
async def remove_member(request: AnyRequest, code: str, data: dict[str, Any] = FORM) -> Template | Redirect:
    accounting = runtime_of(request).accounting

    def command(actor: Actor, project_id: UUID, form: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        user_id = _member_id(form)
        name = accounting.get_user(user_id).display_name
        accounting.remove_member(actor, project_id, user_id)
        return "members.removed", {"name": name}
    return await _change(request, code, data, command)


member_routes = [members_page, add_member, change_role, remove_member]
