"""JSON Schemas of the OpenAI API's response objects this service answers with (written from the
published API reference: required fields, types and enums), for validating real responses."""

from __future__ import annotations

from typing import Any

import jsonschema

_NULLABLE_STR = {"type": ["string", "null"]}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {k: {"type": "integer", "minimum": 0}
                         for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}

ERROR = {"type": "object", "required": ["error"], "additionalProperties": False, "properties": {
    "error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string", "minLength": 1}, "type": {"type": "string"},
        "param": _NULLABLE_STR, "code": _NULLABLE_STR}}}}

MODEL = {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
    "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
    "owned_by": {"type": "string"}}}

MODEL_LIST = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"const": "list"}, "data": {"type": "array", "items": MODEL}}}

CHAT_COMPLETION = {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
    "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
    "model": {"type": "string"}, "usage": _USAGE,
    "choices": {"type": "array", "items": {"type": "object", "required": ["index", "message", "finish_reason"],
                "properties": {"index": {"type": "integer"}, "finish_reason": {
                    "enum": ["stop", "length", "tool_calls", "content_filter", "function_call"]},
                    "message": {"type": "object", "required": ["role", "content"], "properties": {
                        "role": {"const": "assistant"}, "content": _NULLABLE_STR}}}}}}}

CHAT_CHUNK = {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
    "id": {"type": "string"}, "object": {"const": "chat.completion.chunk"}, "created": {"type": "integer"},
    "model": {"type": "string"}, "usage": {"anyOf": [_USAGE, {"type": "null"}]},
    "choices": {"type": "array", "items": {"type": "object", "required": ["index", "delta", "finish_reason"],
                "properties": {"index": {"type": "integer"}, "delta": {"type": "object"},
                               "finish_reason": {"enum": [None, "stop", "length", "tool_calls", "content_filter",
                                                          "function_call"]}}}}}}

EMBEDDINGS = {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
    "object": {"const": "list"}, "model": {"type": "string"},
    "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"]},
    "data": {"type": "array", "items": {"type": "object", "required": ["index", "embedding", "object"],
             "properties": {"object": {"const": "embedding"}, "index": {"type": "integer"}}}}}}

# The legacy completions API (POST /v1/completions): "The completion object" of the API reference; a
# streamed response is a series of such objects, each with the text generated since the one before,
# `finish_reason` null until the choice ends, and (with stream_options.include_usage) a last one with
# no choices and the usage (`usage` null in the others).
_TEXT_FINISH = ["stop", "length", "content_filter"]
_TEXT_LOGPROBS = {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
    "text_offset": {"type": "array", "items": {"type": "integer"}},
    "token_logprobs": {"type": "array", "items": {"type": ["number", "null"]}},
    "tokens": {"type": "array", "items": {"type": "string"}},
    "top_logprobs": {"type": "array", "items": {"type": ["object", "null"],
                                                "additionalProperties": {"type": "number"}}}}}]}


def _text_choice(finish_reason: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["finish_reason", "index", "logprobs", "text"], "properties": {
        "finish_reason": finish_reason, "index": {"type": "integer", "minimum": 0}, "logprobs": _TEXT_LOGPROBS,
        "text": {"type": "string"}}}


_TEXT_COMMON = {"id": {"type": "string", "minLength": 1}, "object": {"const": "text_completion"},
                "created": {"type": "integer"}, "model": {"type": "string", "minLength": 1},
                "system_fingerprint": {"type": "string"}}

TEXT_COMPLETION = {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
    **_TEXT_COMMON, "usage": _USAGE,
    "choices": {"type": "array", "items": _text_choice({"enum": _TEXT_FINISH})}}}

TEXT_COMPLETION_CHUNK = {"type": "object", "required": ["id", "object", "created", "model", "choices"],
                         "properties": {
    **_TEXT_COMMON, "usage": {"anyOf": [_USAGE, {"type": "null"}]},
    "choices": {"type": "array", "items": _text_choice({"enum": [None, *_TEXT_FINISH]})}}}


def validate(instance: Any, schema: dict[str, Any]) -> None:
    jsonschema.validate(instance, schema)
