"""What every portal page needs: the runtime, the person logged in, their language, and rendering.

Imports: everything inward. Pages read the read models (`edge.queries`); changes go through the
`Accounting` application's commands, then `settled()` waits until the read models show them, so the
page that follows a change shows it.
"""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

from litestar import Request
from litestar.response import Redirect, Template

from domain.access import Actor
from domain.errors import InvalidValue
from domain.validation import EMAIL_CHARS_MAX, PROJECT_CODE_CHARS_MAX, aware, clean_email, label
from edge import queries
from edge.cli_support import parse_time
from edge.portal.i18n import COOKIE, LANGUAGE_NAMES, Translator, negotiate
from edge.runtime import Runtime

AnyRequest = Request[Any, Any, Any]


def runtime_of(request: AnyRequest) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def pool_of(request: AnyRequest) -> Any:
    pool = runtime_of(request).pool
    assert pool is not None
    return pool


def translator(request: AnyRequest) -> Translator:
    return Translator(negotiate(request.cookies.get(COOKIE), request.headers.get("accept-language")))


async def current_user(request: AnyRequest) -> dict[str, Any] | None:
    raw = request.session.get("user_id") if request.session else None
    if not raw:
        return None
    try:
        user_id = UUID(raw)
    except ValueError:
        return None
    row = await pool_of(request).fetchrow(
        "SELECT user_id, email, display_name, is_admin FROM lwapi_read.users WHERE user_id = $1", user_id)
    return queries.plain(row) if row else None


async def settled(request: AnyRequest) -> None:
    """Wait until the read models have applied everything written so far (bounded)."""
    position = await asyncio.to_thread(runtime_of(request).accounting.recorder.max_notification_id)
    await queries.wait_until_projected(pool_of(request), position or 0)


def render(request: AnyRequest, template: str, *, user: dict[str, Any] | None, status_code: int = 200,
           **context: Any) -> Template:
    t = translator(request)
    return Template(template, status_code=status_code, context={
        "t": t, "lang": t.language, "languages": LANGUAGE_NAMES, "user": user, "path": request.url.path,
        "project": None, "role": None, **context})


def plausible_code(code: str) -> bool:
    """Whether a project code from a URL may be looked up at all (a NUL cannot be sent to PostgreSQL)."""
    return 0 < len(code) <= PROJECT_CODE_CHARS_MAX and "\x00" not in code


def take_notice(request: AnyRequest) -> str | None:
    """A message left by the change that redirected here (shown once)."""
    if not request.session:
        return None
    notice = request.session.pop("notice", None)
    return notice if isinstance(notice, str) else None


async def admin_actor(request: AnyRequest) -> Actor | Redirect | Template:
    """The logged-in platform administrator as an actor; else the login page, or 403 for anyone else."""
    user = await current_user(request)
    if user is None:
        return Redirect("/login")
    if not user["is_admin"]:
        return render(request, "forbidden.html", user=user, status_code=403)
    return Actor(user_id=user["user_id"], is_admin=True)


def form_text(form: Mapping[str, Any], name: str, chars_max: int) -> str:
    """A form field as stripped text (a repeated field counts by its first value), bounded, without control
    characters (a NUL cannot even be stored in PostgreSQL text: it would stop the read models)."""
    value = form.get(name, "")
    if isinstance(value, list):
        value = value[0] if value else ""
    if not isinstance(value, str):
        raise InvalidValue(f"{label(name)} must be text", rule="text", field=name)
    if len(value) > chars_max:
        raise InvalidValue(f"{label(name)}: text of at most {chars_max} characters",
                           rule="too_long", field=name, chars_max=chars_max)
    if any((ord(c) < 32 and c not in "\t\n\r") or ord(c) == 127 for c in value):
        raise InvalidValue(f"{label(name)} must not contain control characters", rule="control_chars", field=name)
    return value.strip()


def form_email(form: Mapping[str, Any], name: str) -> str:
    """An e-mail address from a form: as the domain cleans it, and without invisible or direction-changing
    characters (zero-width spaces, bidi overrides), which make an address that looks like another."""
    email = clean_email(form_text(form, name, EMAIL_CHARS_MAX))
    if any(unicodedata.category(c)[0] in "CZ" for c in email):
        shown = "".join(c if unicodedata.category(c)[0] not in "CZ" else f"\\u{ord(c):04x}" for c in email)
        raise InvalidValue(f"not an e-mail address: {shown!r}", rule="email", value=shown)
    return email


def form_time(form: Mapping[str, Any], name: str, chars_max: int) -> datetime | None:
    """A form field as an ISO 8601 time (UTC when it names no zone) within [1970, 9000); empty: None."""
    return aware(parse_time(form_text(form, name, chars_max) or None, name), name)
