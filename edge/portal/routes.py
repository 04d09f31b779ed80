"""Portal pages: log in with a local account, see one's projects, log out.

Imports: everything inward. The full portal (keys, members, usage, SSO, languages) builds on these.
"""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

from litestar import Request, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body
from litestar.response import Redirect, Template

from adapters.passwords import verify_password
from domain.errors import DomainError, UserNotFound
from edge import queries
from edge.runtime import Runtime

FORM = Body(media_type=RequestEncodingType.URL_ENCODED)
LOGIN_FIELD_CHARS_MAX = 1024


def runtime_of(request: Request[Any, Any, Any]) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def current_user(request: Request[Any, Any, Any]) -> dict[str, Any] | None:
    raw = request.session.get("user_id") if request.session else None
    if not raw:
        return None
    runtime = runtime_of(request)
    assert runtime.pool is not None
    row = await runtime.pool.fetchrow(
        "SELECT user_id, email, display_name, is_admin FROM lwapi_read.users WHERE user_id = $1", UUID(raw))
    return dict(row) if row else None


@get("/")
async def home(request: Request[Any, Any, Any]) -> Template | Redirect:
    user = await current_user(request)
    if user is None:
        return Redirect("/login")
    runtime = runtime_of(request)
    assert runtime.pool is not None
    projects = await queries.projects_of_user(runtime.pool, user["user_id"])
    return Template("projects.html", context={"user": user, "projects": projects})


@get("/login")
async def login_page(request: Request[Any, Any, Any]) -> Template:
    return Template("login.html", context={"user": None, "error": None, "email": ""})


@post("/login")
async def login(request: Request[Any, Any, Any], data: dict[str, str] = FORM) -> Template | Redirect:
    email = str(data.get("email", ""))[:LOGIN_FIELD_CHARS_MAX]
    password = str(data.get("password", ""))[:LOGIN_FIELD_CHARS_MAX + 1]
    accounting = runtime_of(request).accounting
    try:
        user = await asyncio.to_thread(accounting.find_user_by_email, email)
        password_hash, user_id = user.password_hash, user.id
    except (UserNotFound, DomainError):
        password_hash, user_id = None, None
    ok = await asyncio.to_thread(verify_password, password_hash, password)
    if not ok or user_id is None:
        return Template("login.html", context={"user": None, "error": "Wrong e-mail or password.", "email": email},
                        status_code=401)
    request.clear_session()  # a fresh session id at login: no fixation
    request.set_session({"user_id": str(user_id)})
    return Redirect("/")


@post("/logout")
async def logout(request: Request[Any, Any, Any]) -> Redirect:
    request.clear_session()
    return Redirect("/login")


portal_routes = [home, login_page, login, logout]
