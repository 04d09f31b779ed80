"""The OpenAPI 3.1 document of `/v1`, served at `GET /v1/openapi.json` (no key needed).

Imports: stdlib, msgspec, edge.gateway. Request bodies follow OpenAI's API reference for the fields this gateway
knows; anything else in a body passes through to the model's backend untouched, so the request
schemas stay open. Each operation lists exactly the statuses the gateway can answer with (see
`edge.gateway.proxy`, `edge.gateway.validation`, `edge.gateway.admission`, `edge.gateway.errors`);
a streamed answer is `text/event-stream`, whose `schema` describes one event (as OpenAI's own
document does before OpenAPI 3.2): `data` is a JSON chunk, a final error object, or `[DONE]`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from edge.gateway.validation import INT_MAX

Schema = dict[str, Any]

BODY_BYTES_MAX = 16 * 1024 * 1024  # edge.gateway.proxy.BODY_BYTES_MAX (that module imports this one)
MODEL_CHARS_MAX = 256  # the longest `model` edge.gateway.validation accepts


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _enum(*values: str) -> Schema:
    return {"type": "string", "enum": list(values)}


def _obj(properties: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = required
    return schema


_STRING: Schema = {"type": "string"}
_INT: Schema = {"type": "integer"}
_COUNT: Schema = {"type": "integer", "minimum": 0}
_TOKEN_LIMIT: Schema = {"type": ["integer", "null"], "minimum": 1, "maximum": INT_MAX}
_N: Schema = {"type": ["integer", "null"], "minimum": 1, "maximum": 128, "default": 1}
_PENALTY: Schema = {"type": ["number", "null"], "minimum": -2, "maximum": 2, "default": 0}
_TEMPERATURE: Schema = {"type": ["number", "null"], "minimum": 0, "maximum": 2, "default": 1}
_TOP_P: Schema = {"type": ["number", "null"], "minimum": 0, "maximum": 1, "default": 1}
_SEED: Schema = {"type": ["integer", "null"], "minimum": -(2**63), "maximum": 2**63 - 1}
_LOGIT_BIAS: Schema = {"type": ["object", "null"],
                       "additionalProperties": {"type": "integer", "minimum": -100, "maximum": 100}}
_STOP: Schema = {"anyOf": [{"type": ["string", "null"]},
                           {"type": "array", "minItems": 1, "maxItems": 4, "items": _STRING}]}
_STREAM: Schema = {"type": ["boolean", "null"], "default": False,
                   "description": "Answer as server-sent events (`text/event-stream`), ending with `data: [DONE]`."}
_MODEL: Schema = {"type": "string", "minLength": 1, "maxLength": MODEL_CHARS_MAX,
                  "description": "A model id from `GET /models` that this API key may use."}
_USER: Schema = {"type": "string", "description": "An end-user identifier, passed to the backend."}

_TEXT_PART: Schema = _obj({"type": {"const": "text"}, "text": _STRING}, ["type", "text"])
_REFUSAL_PART: Schema = _obj({"type": {"const": "refusal"}, "refusal": _STRING}, ["type", "refusal"])
_IMAGE_PART: Schema = _obj({"type": {"const": "image_url"}, "image_url": _obj(
    {"url": {"type": "string", "description": "An image URL or a base64 data URL."},
     "detail": {**_enum("auto", "low", "high"), "default": "auto"}}, ["url"])}, ["type", "image_url"])
_AUDIO_PART: Schema = _obj({"type": {"const": "input_audio"}, "input_audio": _obj(
    {"data": {"type": "string", "description": "Base64 audio."}, "format": _enum("wav", "mp3")},
    ["data", "format"])}, ["type", "input_audio"])
_FILE_PART: Schema = _obj({"type": {"const": "file"}, "file": _obj(
    {"file_data": _STRING, "file_id": _STRING, "filename": _STRING})}, ["type", "file"])


def _content(*parts: Schema, nullable: bool = False) -> Schema:
    return {"anyOf": [_STRING, {"type": "array", "minItems": 1, "items": {"anyOf": list(parts)}}]
            + ([{"type": "null"}] if nullable else [])}


_NAME: Schema = {"type": "string", "description": "A name that tells participants of the same role apart."}
_TOOL_CALL: Schema = _obj({"id": _STRING, "type": {"const": "function"},
                           "function": _obj({"name": _STRING, "arguments": {
                               "type": "string", "description": "The arguments, as JSON text."}},
                               ["name", "arguments"])},
                          ["id", "type", "function"])

_MESSAGES: dict[str, Schema] = {
    "ChatCompletionRequestDeveloperMessage": _obj(
        {"role": {"const": "developer"}, "content": _content(_TEXT_PART), "name": _NAME}, ["role", "content"]),
    "ChatCompletionRequestSystemMessage": _obj(
        {"role": {"const": "system"}, "content": _content(_TEXT_PART), "name": _NAME}, ["role", "content"]),
    "ChatCompletionRequestUserMessage": _obj(
        {"role": {"const": "user"}, "content": _content(_TEXT_PART, _IMAGE_PART, _AUDIO_PART, _FILE_PART),
         "name": _NAME}, ["role", "content"]),
    "ChatCompletionRequestAssistantMessage": _obj(
        {"role": {"const": "assistant"}, "content": _content(_TEXT_PART, _REFUSAL_PART, nullable=True),
         "refusal": {"type": ["string", "null"]}, "name": _NAME,
         "tool_calls": {"type": "array", "items": _TOOL_CALL}}, ["role"]),
    "ChatCompletionRequestToolMessage": _obj(
        {"role": {"const": "tool"}, "content": _content(_TEXT_PART), "tool_call_id": _STRING},
        ["role", "content", "tool_call_id"]),
}

_FUNCTION_NAME: Schema = {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}
_TOOL: Schema = _obj({"type": {"const": "function"}, "function": _obj(
    {"name": _FUNCTION_NAME, "description": _STRING,
     "parameters": {"type": "object", "description": "The arguments, as a JSON Schema object."},
     "strict": {"type": ["boolean", "null"], "default": False}}, ["name"])}, ["type", "function"])
_TOOL_CHOICE: Schema = {"anyOf": [_enum("none", "auto", "required"), _obj(
    {"type": {"const": "function"}, "function": _obj({"name": _STRING}, ["name"])}, ["type", "function"])]}
_RESPONSE_FORMAT: Schema = {"anyOf": [
    _obj({"type": {"const": "text"}}, ["type"]),
    _obj({"type": {"const": "json_object"}}, ["type"]),
    _obj({"type": {"const": "json_schema"}, "json_schema": _obj(
        {"name": _FUNCTION_NAME, "description": _STRING, "schema": {"type": "object"},
         "strict": {"type": ["boolean", "null"], "default": False}}, ["name"])}, ["type", "json_schema"]),
]}
_STREAM_OPTIONS: Schema = {"type": ["object", "null"], "properties": {"include_usage": {
    "type": "boolean", "description": "End the stream with a chunk whose `choices` is empty and whose `usage` "
                                      "counts the whole request; `usage` is null in the chunks before it."}}}

_SAMPLING: Schema = {"frequency_penalty": _PENALTY, "presence_penalty": _PENALTY, "logit_bias": _LOGIT_BIAS,
                     "max_tokens": {**_TOKEN_LIMIT, "description": "The most tokens to generate; without it (or "
                                    "`max_completion_tokens`), 4096 per choice are reserved against the balance."},
                     "n": _N, "seed": _SEED, "stop": _STOP, "stream": _STREAM, "stream_options": _STREAM_OPTIONS,
                     "temperature": _TEMPERATURE, "top_p": _TOP_P, "user": _USER}

_CHAT_REQUEST: Schema = _obj({
    "model": _MODEL,
    "messages": {"type": "array", "minItems": 1, "items": {"anyOf": [_ref(name) for name in _MESSAGES]}},
    **_SAMPLING,
    "max_completion_tokens": {**_TOKEN_LIMIT, "description": "Takes precedence over `max_tokens`."},
    "logprobs": {"type": ["boolean", "null"], "default": False},
    "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
    "response_format": _RESPONSE_FORMAT,
    "tools": {"type": "array", "items": _TOOL},
    "tool_choice": _TOOL_CHOICE,
    "parallel_tool_calls": {"type": "boolean", "default": True},
}, ["model", "messages"], description="Fields not listed here pass through to the model's backend.")

_PROMPT: Schema = {"anyOf": [_STRING, {"type": "array", "items": _STRING},
                             {"type": "array", "minItems": 1, "items": _INT},
                             {"type": "array", "minItems": 1,
                              "items": {"type": "array", "minItems": 1, "items": _INT}}]}
_COMPLETION_REQUEST: Schema = _obj({
    "model": _MODEL, "prompt": _PROMPT, **_SAMPLING,
    "best_of": {"type": ["integer", "null"], "minimum": 0, "maximum": 20, "default": 1},
    "echo": {"type": ["boolean", "null"], "default": False},
    "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 5},
    "suffix": {"type": ["string", "null"]},
}, ["model", "prompt"], description="Fields not listed here pass through to the model's backend.")

_EMBEDDING_REQUEST: Schema = _obj({
    "model": _MODEL,
    "input": {"anyOf": [_STRING, {"type": "array", "minItems": 1, "maxItems": 2048, "items": _STRING},
                        {"type": "array", "minItems": 1, "maxItems": 2048, "items": _INT},
                        {"type": "array", "minItems": 1, "maxItems": 2048,
                         "items": {"type": "array", "minItems": 1, "items": _INT}}]},
    "encoding_format": {**_enum("float", "base64"), "default": "float"},
    "dimensions": {"type": "integer", "minimum": 1},
    "user": _USER,
    "stream": {"type": ["boolean", "null"], "enum": [False, None],
               "description": "Embeddings are never streamed: true is refused with 400."},
}, ["model", "input"], description="Fields not listed here pass through to the model's backend.")

# ---- responses (the shapes OpenAI's API reference gives; backends may add fields, which pass through)

_USAGE: Schema = _obj({"prompt_tokens": _COUNT, "completion_tokens": _COUNT, "total_tokens": _COUNT,
                       "prompt_tokens_details": {"type": ["object", "null"]},
                       "completion_tokens_details": {"type": ["object", "null"]}},
                      ["prompt_tokens", "completion_tokens", "total_tokens"])
_FINISH = ["stop", "length", "tool_calls", "content_filter", "function_call"]
_TEXT_FINISH = ["stop", "length", "content_filter"]
_CHAT_LOGPROBS: Schema = {"type": ["object", "null"]}
_TEXT_LOGPROBS: Schema = _nullable(_obj({
    "text_offset": {"type": "array", "items": _INT},
    "token_logprobs": {"type": "array", "items": {"type": ["number", "null"]}},
    "tokens": {"type": "array", "items": _STRING},
    "top_logprobs": {"type": "array", "items": {"type": ["object", "null"],
                                                "additionalProperties": {"type": "number"}}}}))
_ID: Schema = {"type": "string", "minLength": 1}
_CREATED: Schema = {"type": "integer", "description": "Unix time, in seconds."}
_FINGERPRINT: Schema = {"type": ["string", "null"]}

_CHAT_COMPLETION: Schema = _obj({
    "id": _ID, "object": {"const": "chat.completion"}, "created": _CREATED, "model": _STRING,
    "system_fingerprint": _FINGERPRINT, "usage": _USAGE,
    "choices": {"type": "array", "items": _obj({
        "index": _COUNT, "finish_reason": {"enum": _FINISH}, "logprobs": _CHAT_LOGPROBS,
        "message": _obj({"role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                         "refusal": {"type": ["string", "null"]},
                         "tool_calls": {"type": ["array", "null"], "items": _TOOL_CALL}}, ["role", "content"]),
    }, ["index", "message", "finish_reason"])},
}, ["id", "object", "created", "model", "choices", "usage"],
    description="`usage` is always there: when the backend sends none, the gateway counts the tokens itself.")

_CHAT_CHUNK: Schema = _obj({
    "id": _STRING, "object": {"const": "chat.completion.chunk"}, "created": _CREATED, "model": _STRING,
    "system_fingerprint": _FINGERPRINT, "usage": _nullable(_USAGE),
    "choices": {"type": "array", "items": _obj({
        "index": _COUNT, "delta": {"type": ["object", "null"]}, "logprobs": _CHAT_LOGPROBS,
        "finish_reason": {"enum": [None, *_FINISH]}}, ["index", "delta", "finish_reason"])},
}, ["id", "object", "created", "model", "choices"])


def _text_choice(finish_reason: Schema) -> Schema:
    return _obj({"finish_reason": finish_reason, "index": _COUNT, "logprobs": _TEXT_LOGPROBS, "text": _STRING},
                ["finish_reason", "index", "logprobs", "text"])


_TEXT_COMPLETION: Schema = _obj({
    "id": _ID, "object": {"const": "text_completion"}, "created": _CREATED, "model": {"type": "string", "minLength": 1},
    "system_fingerprint": _FINGERPRINT, "usage": _USAGE,
    "choices": {"type": "array", "items": _text_choice({"enum": _TEXT_FINISH})},
}, ["id", "object", "created", "model", "choices", "usage"])

_TEXT_COMPLETION_CHUNK: Schema = _obj({
    "id": _ID, "object": {"const": "text_completion"}, "created": _CREATED, "model": {"type": "string", "minLength": 1},
    "system_fingerprint": _FINGERPRINT, "usage": _nullable(_USAGE),
    "choices": {"type": "array", "items": _text_choice({"enum": [None, *_TEXT_FINISH]})},
}, ["id", "object", "created", "model", "choices"])

_EMBEDDINGS: Schema = _obj({
    "object": {"const": "list"}, "model": _STRING,
    "usage": _obj({"prompt_tokens": _COUNT, "total_tokens": _COUNT}, ["prompt_tokens", "total_tokens"]),
    "data": {"type": "array", "items": _obj({
        "object": {"const": "embedding"}, "index": _COUNT,
        "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}},
                                {"type": "string", "description": "Base64, for `encoding_format: base64`."}]},
    }, ["object", "index", "embedding"])},
}, ["object", "data", "model", "usage"])

_MODEL_OBJECT: Schema = _obj({"id": _STRING, "object": {"const": "model"}, "created": _CREATED,
                              "owned_by": _STRING}, ["id", "object", "created", "owned_by"])
_MODEL_LIST: Schema = _obj({"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
                           ["object", "data"])

_ERROR: Schema = _obj({"error": _obj({
    "message": {"type": "string", "minLength": 1}, "type": _STRING,
    "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]},
}, ["message", "type", "param", "code"])}, ["error"], additionalProperties=False)


def _event(chunk: str) -> Schema:
    """One server-sent event: a chunk, a final error object (the stream then ends without [DONE]), or [DONE]."""
    return _obj({"event": {"const": "message"}, "data": {
        "type": "string",
        "if": {"const": "[DONE]"},
        "else": {"contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [_ref(chunk), _ref("ErrorResponse")]}}}}, ["data"])


# ---- responses, by status

_REQUEST_ID: Schema = {"$ref": "#/components/headers/RequestId"}
_RATE_HEADERS: Schema = {f"x-ratelimit-{what}-{kind}": {"$ref": f"#/components/headers/RateLimit{what.title()}"}
                         for kind in ("requests", "tokens") for what in ("limit", "remaining", "reset")}


def _error(description: str, *, retry: bool = False) -> Schema:
    headers: Schema = {"x-request-id": _REQUEST_ID}
    if retry:
        headers |= {"retry-after": {"$ref": "#/components/headers/RetryAfter"}, **_RATE_HEADERS}
    return {"description": description, "headers": headers,
            "content": {"application/json": {"schema": _ref("ErrorResponse")}}}


_UNAUTHORIZED: Schema = _error(
    "No `Authorization: Bearer` header (code null), or a key that is unknown (`invalid_api_key`), revoked "
    "(`key_revoked`), expired (`key_expired`), not valid yet (`key_not_yet_valid`), or of an archived project "
    "(`project_archived`).")
_BAD_KEYS = ("too many requests with unknown keys from this address (`too_many_invalid_keys`: refused before the "
             "key is looked at, with `retry-after`)")
_AUTH_ERRORS: Schema = {"401": _UNAUTHORIZED, "429": _error(f"Too many requests: {_BAD_KEYS}.", retry=True)}


def _inference_responses(ok: Schema, stream_event: str | None) -> Schema:
    content: Schema = {"application/json": {"schema": ok}}
    if stream_event is not None:
        content["text/event-stream"] = {"schema": _event(stream_event)}
    return {
        "200": {"description": "The answer" + (", or with `stream: true` its server-sent events" if stream_event
                                               else "") + ".",
                "headers": {"x-request-id": _REQUEST_ID, **_RATE_HEADERS}, "content": content},
        "400": _error("The body is not a JSON object, a field the gateway checks is wrong (`model`, `messages`, "
                      "`prompt`, `input`, `stream`, `stream_options`, `max_tokens`, `max_completion_tokens`, `n`; "
                      "as with OpenAI, an integer must be written as one: `1`, not `1.0`), or the model's backend "
                      "refused the request (its refusals are relayed with its status)."),
        "401": _UNAUTHORIZED,
        "403": _error("This API key may not use this model (`model_not_allowed`)."),
        "404": _error("No such model, or not one this key may see (`model_not_found`)."),
        "413": _error(f"The body is larger than {BODY_BYTES_MAX} bytes (`request_too_large`)."),
        "422": _error("The model's backend refused the request as unprocessable (relayed)."),
        "429": _error("A limit of the key (`rate_limit_exceeded`, type `requests` or `tokens`), a balance or usage cap "
                      f"that does not cover the request's worst case (`insufficient_quota`), or {_BAD_KEYS}.",
                      retry=True),
        "502": _error("The model's backend failed, or sent a malformed or oversized answer (`upstream_error`)."),
        "503": _error("No deployment of the model answered (`upstream_unavailable`), or the model has no price "
                      "in force yet (`model_not_priced`)."),
        "504": _error("The model's backend did not answer in time (`upstream_timeout`)."),
    }


def _body(name: str) -> Schema:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


DOCUMENT: Schema = {
    "openapi": "3.1.0",
    "info": {"title": "Lightweight API: the OpenAI-compatible endpoints", "version": "1",
             "description": "OpenAI's chat completions, completions, embeddings and models API, in front of the "
                            "models of this service's catalog. Errors are OpenAI's error object. Every response "
                            "carries `x-request-id`."},
    "servers": [{"url": "/v1"}],
    "security": [{"bearerAuth": []}],
    "paths": {
        "/chat/completions": {"post": {
            "operationId": "createChatCompletion", "summary": "Chat completion",
            "requestBody": _body("CreateChatCompletionRequest"),
            "responses": _inference_responses(_ref("CreateChatCompletionResponse"),
                                              "CreateChatCompletionStreamResponse"),
        }},
        "/completions": {"post": {
            "operationId": "createCompletion", "summary": "Text completion (legacy)",
            "requestBody": _body("CreateCompletionRequest"),
            "responses": _inference_responses(_ref("CreateCompletionResponse"), "CreateCompletionStreamResponse"),
        }},
        "/embeddings": {"post": {
            "operationId": "createEmbedding", "summary": "Embeddings",
            "requestBody": _body("CreateEmbeddingRequest"),
            "responses": _inference_responses(_ref("CreateEmbeddingResponse"), None),
        }},
        "/models": {"get": {
            "operationId": "listModels", "summary": "The models this key may use",
            "responses": {"200": {"description": "The models.", "headers": {"x-request-id": _REQUEST_ID},
                                  "content": {"application/json": {"schema": _ref("ListModelsResponse")}}},
                          **_AUTH_ERRORS},
        }},
        "/models/{model}": {"get": {
            "operationId": "retrieveModel", "summary": "One model",
            "parameters": [{"name": "model", "in": "path", "required": True,
                            "schema": {"type": "string", "minLength": 1},
                            "description": "The model's id (ids may contain `/`, sent as is or as `%2F`)."}],
            "responses": {"200": {"description": "The model.", "headers": {"x-request-id": _REQUEST_ID},
                                  "content": {"application/json": {"schema": _ref("Model")}}},
                          **_AUTH_ERRORS,
                          "404": _error("No such model, or not one this key may see (`model_not_found`).")},
        }},
        "/openapi.json": {"get": {
            "operationId": "getOpenApiDocument", "summary": "This document", "security": [],
            "responses": {"200": {"description": "This OpenAPI document.", "headers": {"x-request-id": _REQUEST_ID},
                                  "content": {"application/json": {"schema": _obj(
                                      {"openapi": _STRING, "paths": {"type": "object"}}, ["openapi", "paths"])}}}},
        }},
    },
    "components": {
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                           "description": "An API key of this service's portal."}},
        "headers": {
            "RequestId": {"required": True, "description": "This request's id (also in the service's logs).",
                          "schema": {"type": "string", "pattern": "^req_[0-9a-f]{32}$"}},
            "RetryAfter": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer",
                                                                                       "minimum": 1}},
            "RateLimitLimit": {"description": "The key's limit per minute (only for keys with limits).",
                               "schema": {"type": "integer", "minimum": 0}},
            "RateLimitRemaining": {"description": "What is left of the limit now.",
                                   "schema": {"type": "integer", "minimum": 0}},
            "RateLimitReset": {"description": "When the limit is whole again: `1s`, `6m0s`, `150ms`.",
                               "schema": {"type": "string", "pattern": "^([0-9]+m)?[0-9]+(s|ms)$"}},
        },
        "schemas": {
            "CreateChatCompletionRequest": _CHAT_REQUEST, **_MESSAGES,
            "CreateCompletionRequest": _COMPLETION_REQUEST,
            "CreateEmbeddingRequest": _EMBEDDING_REQUEST,
            "CreateChatCompletionResponse": _CHAT_COMPLETION,
            "CreateChatCompletionStreamResponse": _CHAT_CHUNK,
            "CreateCompletionResponse": _TEXT_COMPLETION,
            "CreateCompletionStreamResponse": _TEXT_COMPLETION_CHUNK,
            "CreateEmbeddingResponse": _EMBEDDINGS,
            "Model": _MODEL_OBJECT,
            "ListModelsResponse": _MODEL_LIST,
            "ErrorResponse": _ERROR,
        },
    },
}

DOCUMENT_JSON: bytes = msgspec.json.encode(DOCUMENT)  # encoded once: `GET /v1/openapi.json` sends these bytes
