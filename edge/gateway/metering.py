"""What a request consumed: the backend's usage report, or the gateway's own count without one.

Imports: stdlib, msgspec, adapters.backends, domain, edge.gateway. The relay collects the generated
text as it passes (a typed decode of each content chunk, which skips every field it does not name);
when the backend reports no usage — llama.cpp's server in streams, a stream that broke off — the
deployment's counter turns prompt and text into tokens, and the entry is marked estimated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from adapters.backends.http1 import Http1Client
from adapters.backends.token_count import (
    Counter,
    CountFailed,
    Estimate,
    LocalTokenizer,
    Prompt,
    VllmTokenize,
    count_usage,
    estimate_completion,
    estimate_prompt,
)
from domain.catalog import BackendKind
from edge.gateway.catalog import Route

log = logging.getLogger(__name__)

COUNT_MAX = 10**9
TEXT_PARTS_MAX = 1_000_000  # a runaway stream stops collecting; its tail is estimated from the chunk count


@dataclass
class Outcome:
    """What reached the client: the usage the backend reported (if any), content chunks, the text."""

    usage: dict[str, Any] | None = None
    content_events: int = 0
    text: list[str] = field(default_factory=list)
    measured: tuple[int, int, int, bool] | None = None  # counted during the response (told to the client)
    charged: tuple[int, int] | None = None  # (tokens, credits) once the usage entry is on disk

    @property
    def delivered(self) -> bool:
        return self.usage is not None or self.content_events > 0


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    function: _Function | None = None


class _Message(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct):
    delta: _Message | None = None
    message: _Message | None = None
    text: str | None = None


class _Body(msgspec.Struct):
    choices: list[_Choice] | None = None


_body_decoder = msgspec.json.Decoder(_Body)


def collect_text(outcome: Outcome, data: bytes | str) -> None:
    """Add the generated text in one chunk (or one whole response) to `outcome.text`."""
    if len(outcome.text) >= TEXT_PARTS_MAX:
        return
    try:
        body = _body_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return
    for choice in body.choices or ():
        if choice.text:
            outcome.text.append(choice.text)
        message = choice.delta or choice.message
        if message is None:
            continue
        outcome.text += [t for t in (message.reasoning_content, message.content) if t]
        for call in message.tool_calls or ():
            if call.function is not None:
                outcome.text += [t for t in (call.function.name, call.function.arguments) if t]


def reported_usage(usage: dict[str, Any] | None) -> tuple[int, int, int] | None:
    """(prompt, cached prompt, completion) from a well-formed usage report, else None."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    cached = 0 if cached is None else cached
    completion = 0 if completion is None else completion
    numbers = (prompt, cached, completion)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= COUNT_MAX for v in numbers):
        return None
    if cached > prompt:  # type: ignore[operator]
        return None
    return numbers  # type: ignore[return-value]


def counter_for(route: Route, client: Http1Client) -> Counter:
    """The route's counter, made once per route (a catalog reload makes new routes, and new counters)."""
    if route.counter is None:
        route.counter = _make_counter(route, client)
    return route.counter


def _make_counter(route: Route, client: Http1Client) -> Counter:
    source = route.tokenizer or ("vllm" if route.backend is BackendKind.VLLM else "estimate")
    root = route.base_url.removesuffix("/v1")
    if source == "vllm":
        return VllmTokenize(client, root, route.upstream_model, route.credential)
    if source.startswith("file:"):
        try:
            return LocalTokenizer(Path(source[5:]))
        except CountFailed as e:
            log.warning("deployment %s: %s; estimating instead", route.name, e)
    return Estimate()


async def measure(outcome: Outcome, endpoint: str, payload: dict[str, Any],
                  counter: Counter) -> tuple[int, int, int, bool]:
    """(prompt, cached prompt, completion, estimated) for the usage entry."""
    if outcome.measured is not None:
        return outcome.measured
    reported = reported_usage(outcome.usage)
    if reported is not None:
        return (*reported, False)
    prompt, completion = await count_usage(counter, Prompt.of(endpoint, payload), outcome.text)
    if len(outcome.text) >= TEXT_PARTS_MAX:
        completion = max(completion, outcome.content_events)
    return prompt, 0, completion, True


def estimate(outcome: Outcome, endpoint: str, payload: dict[str, Any]) -> tuple[int, int, int, bool]:
    """`measure` without waiting for anything: the reported usage, else the documented estimate."""
    if outcome.measured is not None:
        return outcome.measured
    reported = reported_usage(outcome.usage)
    if reported is not None:
        return (*reported, False)
    return estimate_prompt(Prompt.of(endpoint, payload)), 0, estimate_completion(outcome.text), True


def usage_object(endpoint: str, prompt: int, completion: int) -> dict[str, int]:
    """The `usage` member OpenAI sends for this endpoint."""
    if endpoint == "embeddings":
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
