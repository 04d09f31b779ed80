"""OpenAI-shaped errors: one exception type for every refusal on `/v1`, one renderer.

Imports: stdlib, domain. Status codes and `type`/`code` values follow OpenAI's API so that SDKs
raise the exception class users expect (401 AuthenticationError, 403 PermissionDeniedError,
404 NotFoundError, 429 RateLimitError, …).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class GatewayError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.type, "param": self.param,
                                     "code": self.code}}).encode()

    def sse_event(self) -> bytes:
        """The same error as a final event of a stream that already started."""
        return b"data: " + self.body() + b"\n\n"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", code, param)


def unauthorized(message: str, code: str | None = "invalid_api_key") -> GatewayError:
    return GatewayError(401, message, "invalid_request_error", code)


def model_not_found(model: str) -> GatewayError:
    return GatewayError(404, f"The model `{model}` does not exist or you do not have access to it.",
                        "invalid_request_error", "model_not_found", "model")


def upstream_unavailable(message: str = "The model's backend is unavailable. Please retry.") -> GatewayError:
    return GatewayError(503, message, "server_error", "upstream_unavailable")


def upstream_timeout() -> GatewayError:
    return GatewayError(504, "The model's backend did not answer in time.", "server_error", "upstream_timeout")


def upstream_failed(status: int = 502, message: str = "The model's backend failed.") -> GatewayError:
    return GatewayError(status, message, "server_error", "upstream_error")


def shutting_down() -> GatewayError:
    return GatewayError(503, "The service is shutting down and cut this stream; what it generated is charged.",
                        "server_error", "service_shutting_down")
