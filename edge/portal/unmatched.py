"""Requests no route answers (an unknown path, a method the path does not take): a page in the person's
language, or for the JSON API under /api a JSON error, instead of the framework's bare JSON.

Imports: litestar, edge.portal. The gateway under /v1 answers its own unknown paths in OpenAI's shape.
The app's response headers (CSP and the rest) reach only what a route answers, so these answers carry
them explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from litestar import Response
from litestar.datastructures import ResponseHeader
from litestar.exceptions import HTTPException
from litestar.response import Template

from edge.portal.context import AnyRequest, render, translator

JSON_API_PREFIX = "/api/"


def unmatched_handlers(response_headers: Sequence[ResponseHeader]) -> dict[int | type[Exception], Any]:
    """Exception handlers for 404 and 405 that answer with `response_headers` too."""
    fixed = {h.name: h.value for h in response_headers if h.value is not None}

    def unmatched(request: AnyRequest, exc: Exception) -> Template | Response[Any]:
        status_code = getattr(exc, "status_code", 404)
        headers = dict(fixed)
        allow = (exc.headers or {}).get("allow") if isinstance(exc, HTTPException) else None
        if allow:
            headers["allow"] = allow
        if request.url.path.startswith(JSON_API_PREFIX):
            message = "No such endpoint." if status_code == 404 else "This endpoint does not take this method."
            code = "not_found" if status_code == 404 else "method_not_allowed"
            return Response({"error": {"message": message, "code": code}}, status_code=status_code, headers=headers)
        if status_code == 404:
            page = render(request, "not_found.html", user=None, status_code=404)
        else:
            page = render(request, "refused.html", user=None, status_code=status_code,
                          message=translator(request)("refused.method"))
        page.headers.update(headers)
        return page

    return {404: unmatched, 405: unmatched}
