"""Portal pages for everyone: log in with a local account, choose a language, see one's projects, log out.

Imports: everything inward.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from litestar import get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body
from litestar.response import Redirect, Template

from adapters.passwords import verify_password
from domain.errors import DomainError, UserNotFound
from edge import queries
from edge.portal.context import AnyRequest, current_user, pool_of, render, runtime_of, translator
from edge.portal.form_guard import FORM_POST
from edge.portal.i18n import COOKIE, LANGUAGES
from edge.portal.sso import oidc_of, provider_logout_url
from edge.throttle import LoginThrottle

FORM = Body(media_type=RequestEncodingType.URL_ENCODED)
LOGIN_FIELD_CHARS_MAX = 1024
LANGUAGE_COOKIE_MAX_AGE_S = 400 * 24 * 3600
NEXT_CHARS_MAX = 2_000  # where the language switch goes back to; a longer one goes home
_throttle = LoginThrottle()


@get("/")
async def home(request: AnyRequest) -> Template | Redirect:
    user = await current_user(request)
    if user is None:
        return Redirect("/login")
    projects = await queries.projects_of_user(pool_of(request), user["user_id"])
    return render(request, "projects.html", user=user, projects=projects,
                  no_project_text=runtime_of(request).settings.no_project_text)


@get("/login")
async def login_page(request: AnyRequest) -> Template:
    return render(request, "login.html", user=None, error=None, email="", sso_enabled=oidc_of(request) is not None)


@post("/login", **FORM_POST)
async def login(request: AnyRequest, data: dict[str, Any] = FORM) -> Template | Redirect:
    email = _field(data, "email")[:LOGIN_FIELD_CHARS_MAX]
    password = _field(data, "password")[:LOGIN_FIELD_CHARS_MAX + 1]
    address = request.client.host if request.client else "?"
    t = translator(request)
    if wait := _throttle.wait_s(email, address):
        return render(request, "login.html", user=None, error=t("login.throttled", seconds=wait), email=email,
                      status_code=429, sso_enabled=oidc_of(request) is not None)
    accounting = runtime_of(request).accounting
    try:
        user = await asyncio.to_thread(accounting.find_user_by_email, email)
        password_hash, user_id = user.password_hash, user.id
    except (UserNotFound, DomainError):
        password_hash, user_id = None, None
    ok = await asyncio.to_thread(verify_password, password_hash, password)  # also without a user: same time
    if not ok or user_id is None:
        _throttle.failed(email, address)
        return render(request, "login.html", user=None, error=t("login.wrong"), email=email, status_code=401,
                      sso_enabled=oidc_of(request) is not None)
    _throttle.succeeded(email, address)
    request.clear_session()  # a fresh session at login: no fixation
    request.set_session({"user_id": str(user_id)})
    return Redirect("/", status_code=303)


@post("/logout", **FORM_POST)
async def logout(request: AnyRequest) -> Redirect:
    id_token = (request.session or {}).get("id_token")
    request.clear_session()
    return Redirect(await provider_logout_url(request, id_token) or "/login", status_code=303)


@post("/language", **FORM_POST)
async def choose_language(request: AnyRequest, data: dict[str, Any] = FORM) -> Redirect:
    """Remember the language in a cookie and go back to the page the switch was on (same site only)."""
    language = _field(data, "language")
    back = _local_path(_field(data, "next") or "/")
    response = Redirect(back, status_code=303)
    if language in LANGUAGES:
        response.set_cookie(COOKIE, language, max_age=LANGUAGE_COOKIE_MAX_AGE_S, httponly=True, samesite="lax")
    return response


def _field(form: dict[str, Any], name: str) -> str:
    """A form field as text: a repeated field counts by its first value; anything but text is empty."""
    value = form.get(name, "")
    if isinstance(value, list):
        value = value[0] if value else ""
    return value if isinstance(value, str) else ""


def _local_path(target: Any) -> str:
    """Only a path on this site, of a length a Location header carries: never an open redirect."""
    if not isinstance(target, str) or not target.startswith("/") or target.startswith("//") \
            or len(target) > NEXT_CHARS_MAX:
        return "/"
    parts = urlsplit(target)
    return parts.path + (f"?{parts.query}" if parts.query else "") if not parts.netloc else "/"


@get("/docs")
async def api_guide(request: AnyRequest) -> Template:
    """The API guide (also for people who are not logged in: it holds no secret)."""
    models = await queries.models(pool_of(request))
    return render(request, f"docs_api.{translator(request).language}.html", user=await current_user(request),
                  base_url=str(request.base_url).rstrip("/") + "/v1", model=models[0]["name"] if models else "MODEL")


@get("/docs/rules")
async def usage_rules(request: AnyRequest) -> Template:
    return render(request, f"docs_rules.{translator(request).language}.html", user=await current_user(request))


portal_routes = [home, login_page, login, logout, choose_language, api_guide, usage_rules]
