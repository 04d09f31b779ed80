"""What every portal form post goes through before its handler: the body must be a web form a browser
would send, and what the framework itself refuses (no CSRF token, too large, unreadable) is a page.

Imports: everything inward. A browser sends `application/x-www-form-urlencoded`, every byte of it ASCII,
every percent-escape valid UTF-8; anything else is refused here with a readable page in the person's
language (never a stored "�" or mojibake, never a JSON error or a 500). Routes take both with
`@post(path, **FORM_POST)`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from litestar.response import Template

from edge.portal.context import AnyRequest, render, translator

URL_ENCODED = "application/x-www-form-urlencoded"
FIELDS_MAX = 1_000  # the largest form (a key's allowed models) has one field per model

_MESSAGES = {403: "refused.csrf", 413: "refused.too_large", 415: "refused.form_type"}


def _refused(request: AnyRequest, status_code: int, key: str) -> Template:
    return render(request, "refused.html", user=None, status_code=status_code, message=translator(request)(key))


async def strict_form(request: AnyRequest) -> Template | None:
    """Before a form handler: None to go on, or the page that refuses the body."""
    content_type, _ = request.content_type
    if content_type != URL_ENCODED:  # its body is not read here: the CSRF check may have consumed a multipart one
        empty = not content_type and request.headers.get("content-length", "0") == "0" \
            and "transfer-encoding" not in request.headers
        return None if empty else _refused(request, 415, "refused.form_type")
    body = await request.body()
    try:
        parse_qsl(body.decode("ascii"), keep_blank_values=True, max_num_fields=FIELDS_MAX, encoding="utf-8",
                  errors="strict")
    except UnicodeDecodeError:  # raw non-ASCII bytes, or a percent-escape that is not UTF-8 (%FF)
        return _refused(request, 400, "refused.not_utf8")
    except ValueError:  # more fields than any form has
        return _refused(request, 400, "refused.too_many_fields")
    return None


def refusal_page(request: AnyRequest, exc: Exception) -> Template:
    """What the framework refuses before the handler runs (CSRF, body size, an unreadable multipart body)."""
    if isinstance(exc, UnicodeDecodeError):
        return _refused(request, 400, "refused.not_utf8")
    status_code = getattr(exc, "status_code", 400)
    return _refused(request, status_code, _MESSAGES.get(status_code, "refused.bad_form"))


FORM_POST: dict[str, Any] = {
    "before_request": strict_form,
    "exception_handlers": {400: refusal_page, 403: refusal_page, 413: refusal_page, 415: refusal_page,
                           UnicodeDecodeError: refusal_page},
}
