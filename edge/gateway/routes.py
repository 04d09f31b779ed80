"""`/v1`: OpenAI-shaped errors for every request that cannot be served.

Imports: everything inward. Key checks, the model catalog, forwarding and metering are the
gateway's work (issue 3); until a model is in the catalog, every model is unknown, and the API says
so in OpenAI's error shape rather than with a framework page.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, Router, route

from projections.base import SCHEMA


def openai_error(status: int, message: str, type_: str, code: str | None, param: str | None = None) -> Response[Any]:
    return Response({"error": {"message": message, "type": type_, "param": param, "code": code}},
                    status_code=status)


@route("/{path:path}", http_method=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def v1(request: Request[Any, Any, Any], path: str) -> Response[Any]:
    from domain.api_key import hash_secret, looks_like_secret  # noqa: PLC0415

    header = request.headers.get("authorization", "")
    secret = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not secret:
        return openai_error(401, "You didn't provide an API key. Provide it as 'Authorization: Bearer KEY'.",
                            "invalid_request_error", None)
    runtime = request.app.state.runtime
    found = None
    if looks_like_secret(secret):
        found = await runtime.pool.fetchval(
            f"SELECT key_id FROM {SCHEMA}.api_keys WHERE secret_hash = $1 AND revoked_at IS NULL",
            hash_secret(secret, runtime.accounting.key_pepper))
    if found is None:
        return openai_error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
    if path.strip("/") == "models" and request.method == "GET":
        return Response({"object": "list", "data": []}, status_code=200)
    return openai_error(404, "No model is available: the model catalog is empty.", "invalid_request_error",
                        "model_not_found")


gateway_router = Router(path="/v1", route_handlers=[v1])
