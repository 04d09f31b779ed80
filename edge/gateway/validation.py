"""The request fields the gateway itself relies on, checked with OpenAI's messages for each mistake.

Imports: stdlib, edge.gateway. Everything else in the body passes through to the backend untouched.
"""

from __future__ import annotations

from typing import Any

from edge.gateway.errors import bad_request

INT_FIELDS = ("max_tokens", "max_completion_tokens", "n")
INT_MAX = 10**7


def check_payload(payload: object, endpoint: str) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.")
    model = payload.get("model")
    if model is None:
        raise bad_request("you must provide a model parameter", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise bad_request("model must be a non-empty string", "model", "invalid_type")
    if endpoint == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("messages must be a non-empty array", "messages", "invalid_type")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise bad_request("each message must be an object with a role", "messages", "invalid_type")
    elif endpoint == "completions" and not isinstance(payload.get("prompt"), (str, list)):
        raise bad_request("prompt must be a string or an array", "prompt", "invalid_type")
    elif endpoint == "embeddings" and not isinstance(payload.get("input"), (str, list)):
        raise bad_request("input must be a string or an array", "input", "invalid_type")
    if "stream" in payload and not isinstance(payload["stream"], bool) and payload["stream"] is not None:
        raise bad_request("stream must be a boolean", "stream", "invalid_type")
    if endpoint == "embeddings" and payload.get("stream"):
        raise bad_request("embeddings cannot be streamed", "stream", "invalid_value")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options", "invalid_type")
    for field in INT_FIELDS:
        value = payload.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= INT_MAX):
            raise bad_request(f"{field} must be an integer between 1 and {INT_MAX}", field, "invalid_value")
    return payload
