"""Ollama's native API (`/api/chat`, `/api/generate`, `/api/embed`) behind OpenAI's.

Imports: stdlib, msgspec, adapters.backends. Requests are translated into Ollama's fields (options
such as num_predict, temperature, top_p, stop, seed; images from data URLs; response_format to
`format`; tools); answers — one JSON object, or an NDJSON stream ending in a `done` object with
`prompt_eval_count` / `eval_count` — are translated back into OpenAI's objects and SSE chunks, so the
relay and the metering treat an Ollama deployment like any other.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec

from adapters.backends.http1 import UpstreamResponse

PATHS = {"chat": "/api/chat", "completions": "/api/generate", "embeddings": "/api/embed"}
OPTION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "presence_penalty":
                 "presence_penalty", "frequency_penalty": "frequency_penalty", "top_k": "top_k",
                 "min_p": "min_p", "repeat_penalty": "repeat_penalty"}
LINE_BYTES_MAX = 1 << 20
_encode = msgspec.json.encode
_decode = msgspec.json.decode


class UnsupportedRequest(ValueError):
    """The request uses something Ollama cannot do (the message says what)."""


def upstream_body(payload: dict[str, Any], endpoint: str, upstream_model: str) -> bytes:
    if endpoint == "embeddings":
        return _encode({"model": upstream_model, "input": payload["input"]})
    body: dict[str, Any] = {"model": upstream_model, "stream": payload.get("stream") is True,
                            "options": _options(payload)}
    if endpoint == "chat":
        body["messages"] = [_message(m) for m in payload["messages"]]
        if payload.get("tools"):
            body["tools"] = payload["tools"]
    else:
        prompt = payload["prompt"]
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise UnsupportedRequest("Ollama completes one text prompt per request")
            prompt = prompt[0]
        body["prompt"] = prompt
    fmt = _format(payload.get("response_format"))
    if fmt is not None:
        body["format"] = fmt
    return _encode(body)


def _options(payload: dict[str, Any]) -> dict[str, Any]:
    options = {ours: payload[theirs] for theirs, ours in OPTION_FIELDS.items() if payload.get(theirs) is not None}
    limit = payload.get("max_completion_tokens") or payload.get("max_tokens")
    if limit is not None:
        options["num_predict"] = limit
    stop = payload.get("stop")
    if stop is not None:
        options["stop"] = [stop] if isinstance(stop, str) else stop
    if (payload.get("n") or 1) != 1:
        raise UnsupportedRequest("Ollama returns one choice per request: n must be 1")
    return options


def _message(message: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message["role"]}
    content = message.get("content")
    if isinstance(content, list):
        texts, images = [], []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
            elif kind == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
                    raise UnsupportedRequest("images must be given as data: URLs (base64) for this model")
                images.append(url.split(";base64,", 1)[1])
        out["content"] = "\n".join(texts)
        if images:
            out["images"] = images
    else:
        out["content"] = content or ""
    if message.get("tool_calls"):
        out["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                           "arguments": _arguments(c["function"].get("arguments"))}}
                             for c in message["tool_calls"]]
    return out


def _arguments(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return _decode(value)
        except (msgspec.DecodeError, UnicodeDecodeError):
            return value
    return value


def _format(response_format: Any) -> Any:
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema") or "json"
    return None


def _finish(done: dict[str, Any], tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if done.get("done_reason") == "length" else "stop"


def _usage(done: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(done.get("prompt_eval_count") or 0), int(done.get("eval_count") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _tool_calls(message: dict[str, Any], request_id: str) -> list[dict[str, Any]]:
    calls = []
    for i, call in enumerate(message.get("tool_calls") or []):
        function = call["function"]
        calls.append({"index": i, "id": f"call_{request_id[-12:]}_{i}", "type": "function",
                      "function": {"name": function["name"],
                                   "arguments": _encode(function.get("arguments", {})).decode()}})
    return calls


class OllamaResponse:
    """An Ollama answer seen through OpenAI's eyes: same interface as `http1.Response`."""

    def __init__(self, inner: UpstreamResponse, endpoint: str, *, stream: bool, model: str, request_id: str) -> None:
        self.inner, self.endpoint, self.stream, self.model, self.request_id = inner, endpoint, stream, model, request_id
        self.status_code = inner.status_code
        self.created = int(time.time())

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """OpenAI bytes; an answer that does not parse as Ollama's is a protocol error of the upstream."""
        try:
            async for chunk in self._translated():
                yield chunk
        except (msgspec.DecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise httpx.RemoteProtocolError(f"unexpected answer from Ollama: {e}") from None

    async def _translated(self) -> AsyncIterator[bytes]:
        if self.status_code >= 400:  # errors ({"error": "…"}) pass through; the caller maps them
            async for chunk in self.inner.aiter_raw():
                yield chunk
            return
        if not self.stream:
            data = b"".join([chunk async for chunk in self.inner.aiter_raw()])
            yield _encode(self._whole(_decode(data)))
            return
        buffer = bytearray()
        async for chunk in self.inner.aiter_raw():
            buffer += chunk
            out: list[bytes] = []
            failure: Exception | None = None
            try:
                self._complete_lines(buffer, out)
            except (msgspec.DecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
                failure = e
            if out:  # what arrived before a failure still reaches the client (and is charged)
                yield b"".join(out)
            if failure is not None:
                raise failure

    def _complete_lines(self, buffer: bytearray, out: list[bytes]) -> None:
        """Append OpenAI events for the complete NDJSON lines in `buffer` (which keeps the incomplete rest) to
        `out`; what was appended before a failure stays there."""
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end]).strip()
            del buffer[: end + 1]
            if line:
                out += self._events(_decode(line))
        if len(buffer) > LINE_BYTES_MAX:
            raise ValueError("an Ollama stream line exceeded 1 MiB")

    def _base(self, kind: str) -> dict[str, Any]:
        prefix = "chatcmpl" if self.endpoint == "chat" else "cmpl"
        return {"id": f"{prefix}-{self.request_id[4:]}", "object": kind, "created": self.created, "model": self.model}

    def _whole(self, answer: dict[str, Any]) -> dict[str, Any]:
        if self.endpoint == "embeddings":
            data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(answer["embeddings"])]
            prompt = int(answer.get("prompt_eval_count") or 0)
            return {"object": "list", "data": data, "model": self.model,
                    "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}
        if self.endpoint == "chat":
            message = answer.get("message") or {}
            calls = _tool_calls(message, self.request_id)
            reply: dict[str, Any] = {"role": "assistant", "content": message.get("content") or None}
            if calls:
                reply["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
            choice = {"index": 0, "message": reply, "finish_reason": _finish(answer, bool(calls)), "logprobs": None}
            return {**self._base("chat.completion"), "choices": [choice], "usage": _usage(answer)}
        choice = {"index": 0, "text": answer.get("response", ""), "finish_reason": _finish(answer, False),
                  "logprobs": None}
        return {**self._base("text_completion"), "choices": [choice], "usage": _usage(answer)}

    def _events(self, part: dict[str, Any]) -> list[bytes]:
        if "error" in part:  # Ollama reports a failure mid-stream as an object with "error"
            raise ValueError(f"Ollama failed mid-stream: {part['error']}")
        chat = self.endpoint == "chat"
        kind = "chat.completion.chunk" if chat else "text_completion"
        events = []
        message = part.get("message") or {}
        text = message.get("content", "") if chat else part.get("response", "")
        calls = _tool_calls(message, self.request_id) if chat else []
        if text or calls:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if chat else {}
            if calls:
                delta["tool_calls"] = calls
            choice = {"index": 0, "delta": delta, "finish_reason": None} if chat else \
                {"index": 0, "text": text, "finish_reason": None, "logprobs": None}
            events.append(_sse({**self._base(kind), "choices": [choice]}))
        if part.get("done"):
            self.had_tool_calls = bool(calls) or getattr(self, "had_tool_calls", False)
            last = {"index": 0, "delta": {}, "finish_reason": _finish(part, self.had_tool_calls)} if chat else \
                {"index": 0, "text": "", "finish_reason": _finish(part, False), "logprobs": None}
            events += [_sse({**self._base(kind), "choices": [last]}),
                       _sse({**self._base(kind), "choices": [], "usage": _usage(part)}), b"data: [DONE]\n\n"]
        elif calls:
            self.had_tool_calls = True
        return events


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"
