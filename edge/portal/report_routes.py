"""The reports' HTTP API, which the portal's download links also use.

Imports: everything inward. `GET /api/reports/projects/{code}/statement` and `…/entries` answer a
member of the project logged in to the portal, an administrator, or a program that sends one of the
project's API keys (`Authorization: Bearer sk-lw-…`, not revoked or expired); `GET /api/reports/platform`
answers administrators only. Refusals are JSON: `{"error": {"message", "code"}}` with 400, 401, 403 or
404; a project the caller may not see is 404, as if absent.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from litestar import Response, get
from litestar.response import Stream

from domain.api_key import KeyStatus, hash_secret, looks_like_secret
from domain.errors import DomainError, InvalidValue, NotFound
from domain.validation import MODEL_NAME_CHARS_MAX
from edge import queries, reports
from edge.cli_support import parse_uuid
from edge.portal.context import AnyRequest, current_user, plausible_code, pool_of, translator
from edge.portal.i18n import COOKIE

FORMATS = {"json": "application/json", "csv": "text/csv; charset=utf-8", "pdf": "application/pdf",
           "jsonl": "application/x-ndjson"}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str) -> Response[dict[str, Any]]:
    return Response({"error": {"message": message, "code": code}}, status_code=status)


def _refusal(request: AnyRequest, e: Exception) -> Response[dict[str, Any]]:
    if isinstance(e, _Refused):
        return _error(e.status, e.code, e.message)
    if isinstance(e, DomainError):
        status = 404 if isinstance(e, NotFound) else 400
        # a browser says which language it reads; a program that says nothing gets the precise English
        asked = COOKIE in request.cookies or "accept-language" in request.headers
        return _error(status, e.code, translator(request).error(e) if asked else str(e))
    raise e


def _bearer_key_project(request: AnyRequest) -> UUID | None:
    """The project of a usable API key in the Authorization header; None without one."""
    header = request.headers.get("authorization", "")
    if not header:
        return None
    secret = header.removeprefix("Bearer ").strip()
    gateway = getattr(request.app.state, "gateway", None)
    key = None
    if gateway is not None and looks_like_secret(secret):
        key = gateway.index.find(hash_secret(secret, gateway.pepper))
    if key is None or key.status(datetime.now(UTC)) in (KeyStatus.REVOKED, KeyStatus.EXPIRED):
        raise _Refused(401, "invalid_api_key", "the API key is unknown, revoked or expired")
    project_id: UUID = key.project_id
    return project_id


async def _project_for(request: AnyRequest, code: str) -> None:
    """Refuse unless the caller may read this project's reports."""
    key_project = _bearer_key_project(request)
    pool = pool_of(request)
    if not plausible_code(code):
        raise _Refused(404, "not_found", "no such project")
    if key_project is not None:
        project = await queries.project_by_code(pool, code, UUID(int=0))
        if project is None or project["project_id"] != key_project:
            raise _Refused(404, "not_found", f"no project {code} for this key")
        return
    user = await current_user(request)
    if user is None:
        raise _Refused(401, "unauthenticated", "log in to the portal, or send a project API key as a bearer token")
    project = await queries.project_by_code(pool, code, user["user_id"])
    if project is None or (project["role"] is None and not user["is_admin"]):
        raise _Refused(404, "not_found", f"no project {code}")


async def _administrator(request: AnyRequest) -> None:
    user = await current_user(request)
    if user is None:
        raise _Refused(401, "unauthenticated", "log in to the portal as an administrator")
    if not user["is_admin"]:
        raise _Refused(403, "permission_denied", "the platform report is for administrators")


def _as_of(value: str) -> int | None:
    if not value:
        return None
    if not value.isdigit() or len(value) > 18:
        raise InvalidValue(f"as_of must be a log position (a whole number): {value[:20]!r}", rule="as_of_number")
    return int(value)


def _download(data: bytes, fmt: str, name: str) -> Response[bytes]:
    return Response(data, media_type=FORMATS[fmt], headers={
        "content-disposition": f'attachment; filename="{_SAFE_NAME.sub("_", name)}.{fmt}"',
        "cache-control": "private, no-store"})


def _format(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _Refused(400, "invalid_format", f"format must be one of {', '.join(allowed)}")
    return value


@get("/api/reports/projects/{code:str}/statement")
async def statement(request: AnyRequest, code: str, start: str = "", end: str = "", as_of: str = "",
                    format: str = "json", language: str = "") -> Response[Any]:
    try:
        fmt = _format(format, ("json", "csv", "pdf"))
        period = reports.Period.parse(start[:10] or None, end[:10] or None)
        await _project_for(request, code)
        s = await reports.statement(pool_of(request), code, period, _as_of(as_of))
        if fmt == "pdf":
            # imported here: fpdf2 with fontTools, numpy and Pillow would add ~30 MB to every gateway process
            from adapters.statement_pdf import StatementFontMissing, render_statement_pdf  # noqa: PLC0415
            from edge.cli_reports import pdf_labels  # noqa: PLC0415 - shared wording of the statement

            lang = language if language in ("zh-TW", "en") else translator(request).language
            try:
                data = render_statement_pdf(s, pdf_labels(lang), language=lang)
            except StatementFontMissing as e:
                raise _Refused(503, "pdf_unavailable", str(e)) from None
        else:
            data = reports.to_json(s) if fmt == "json" else reports.statement_csv(s)
    except (DomainError, _Refused) as e:
        return _refusal(request, e)
    return _download(data, fmt, f"statement-{code}-{period.first}-{period.last}")


@get("/api/reports/projects/{code:str}/entries")
async def entries(request: AnyRequest, code: str, start: str = "", end: str = "", as_of: str = "",
                  model: str = "", key: str = "", format: str = "csv") -> Response[Any] | Stream:
    try:
        fmt = _format(format, ("csv", "jsonl"))
        period = reports.Period.parse(start[:10] or None, end[:10] or None)
        await _project_for(request, code)
        key_id = parse_uuid(key[:60], "key") if key else None
        if len(model) > MODEL_NAME_CHARS_MAX or "\x00" in model:  # PostgreSQL text holds no NUL
            raise InvalidValue(f"not a model name: {model[:60]!r}", rule="model_name", value=model[:60])
        position = _as_of(as_of)
        pool = pool_of(request)
        await reports.as_of_position(pool, position)  # refuse a bad position before streaming starts
    except (DomainError, _Refused) as e:
        return _refusal(request, e)

    async def lines() -> AsyncIterator[bytes]:
        if fmt == "csv":
            yield reports.entries_csv_header()
        async for e in reports.entries(pool, code, period, position, model=model or None, key_id=key_id):
            yield reports.entry_csv(e) if fmt == "csv" else reports.entry_jsonl(e)

    name = _SAFE_NAME.sub("_", f"entries-{code}-{period.first}-{period.last}")
    return Stream(lines(), media_type=FORMATS[fmt], headers={
        "content-disposition": f'attachment; filename="{name}.{fmt}"', "cache-control": "private, no-store"})


@get("/api/reports/platform")
async def platform(request: AnyRequest, start: str = "", end: str = "", as_of: str = "",
                   format: str = "json") -> Response[Any]:
    try:
        fmt = _format(format, ("json", "csv"))
        period = reports.Period.parse(start[:10] or None, end[:10] or None)
        await _administrator(request)
        r = await reports.platform_report(pool_of(request), period, _as_of(as_of))
    except (DomainError, _Refused) as e:
        return _refusal(request, e)
    data = reports.to_json(r) if fmt == "json" else reports.platform_csv(r)
    return _download(data, fmt, f"platform-{period.first}-{period.last}")


report_routes = [statement, entries, platform]
