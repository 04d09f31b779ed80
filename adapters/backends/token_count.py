"""Counting tokens for a request whose backend reported no usage.

Imports: stdlib, httpx, jinja2, msgspec, tokenizers, adapters.backends. Three ways, best first:
the backend's own tokenizer endpoint (vLLM's `/tokenize`), the model's
tokenizer file on local disk (Hugging Face `tokenizer.json`, with the chat template from the
`tokenizer_config.json` beside it), or an estimate. A counter that fails falls back to the estimate;
every count made here is marked estimated on the usage entry, because it is the gateway's, not the
backend's.

The estimate (documented in docs/metering.md): for a prompt, a quarter of its text's UTF-8 bytes,
rounded up, plus 4 tokens per chat message and 3 for the reply's priming (OpenAI's published rule of
thumb); for generated text, the same quarter of its bytes, or the number of streamed chunks that
carried text when that is more (servers stream about one token per chunk).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import msgspec
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from adapters.backends.http1 import Http1Client

COUNT_TIMEOUT_S = 5.0
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3
BYTES_PER_TOKEN = 4
TEXT_CHARS_MAX = 4 * 1024 * 1024  # beyond this, counting costs more than an estimate is off by

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


@dataclass(frozen=True)
class Prompt:
    """What a request asked the model to read: chat messages, completion prompts, or embedding inputs."""

    messages: list[dict[str, Any]] | None = None
    texts: tuple[str, ...] = ()
    token_ids: int = 0  # inputs given as token ids are already counted

    @classmethod
    def of(cls, endpoint: str, payload: dict[str, Any]) -> Prompt:
        if endpoint == "chat":
            messages = payload.get("messages")
            return cls(messages=[m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else [])
        value = payload.get("prompt" if endpoint == "completions" else "input")
        texts: list[str] = []
        ids = 0
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, int):
                ids += 1
            elif isinstance(item, list):
                ids += len(item)
        return cls(texts=tuple(texts), token_ids=ids)


class Counter(Protocol):
    async def prompt_tokens(self, prompt: Prompt) -> int: ...

    async def text_tokens(self, text: str) -> int: ...


def message_text(message: dict[str, Any]) -> str:
    """The text of a chat message: its content (string or text parts), tool calls and name."""
    parts: list[str] = []
    content = message.get("content")
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        parts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            parts += [str(function.get("name") or ""), str(function.get("arguments") or "")]
    if isinstance(message.get("name"), str):
        parts.append(message["name"])
    return "\n".join(parts)


def estimate_text(text: str) -> int:
    return math.ceil(len(text.encode("utf-8", "replace")) / BYTES_PER_TOKEN)


class Estimate:
    """The documented estimate; never fails and never waits."""

    async def prompt_tokens(self, prompt: Prompt) -> int:
        return estimate_prompt(prompt)

    async def text_tokens(self, text: str) -> int:
        return estimate_text(text)


def estimate_prompt(prompt: Prompt) -> int:
    if prompt.messages is not None:
        return TOKENS_PER_REPLY + sum(TOKENS_PER_MESSAGE + estimate_text(message_text(m)) for m in prompt.messages)
    return prompt.token_ids + sum(estimate_text(t) for t in prompt.texts)


class VllmTokenize:
    """vLLM's `/tokenize`: chat messages through the served model's own chat template."""

    def __init__(self, client: Http1Client, root_url: str, model: str,
                 credential: Callable[[], str | None]) -> None:
        self.client, self.url, self.model, self.credential = client, root_url + "/tokenize", model, credential

    async def prompt_tokens(self, prompt: Prompt) -> int:
        if prompt.messages is not None:
            return await self._count({"model": self.model, "messages": prompt.messages,
                                      "add_generation_prompt": True})
        counts = [await self._count({"model": self.model, "prompt": t}) for t in prompt.texts]
        return prompt.token_ids + sum(counts)

    async def text_tokens(self, text: str) -> int:
        return await self._count({"model": self.model, "prompt": text, "add_special_tokens": False})

    async def _count(self, body: dict[str, Any]) -> int:
        answer = await _post_json(self.client, self.url, body, self.credential)
        count = answer.get("count") if isinstance(answer, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise CountFailed(f"{self.url} answered without a count")
        return count


class LocalTokenizer:
    """A Hugging Face tokenizer file on local disk, and the chat template beside it (if any)."""

    def __init__(self, path: Path) -> None:
        self.tokenizer, self.template, self.special = _load_tokenizer(path)

    async def prompt_tokens(self, prompt: Prompt) -> int:
        if prompt.messages is not None:
            if self.template is None:
                return TOKENS_PER_REPLY + sum([TOKENS_PER_MESSAGE + await self.text_tokens(message_text(m))
                                               for m in prompt.messages])
            try:
                rendered = self.template.render(messages=prompt.messages, add_generation_prompt=True,
                                                **self.special)
            except TemplateError as e:
                raise CountFailed(f"the chat template failed: {e}") from None
            return await self._encode(rendered, special=False)
        return prompt.token_ids + sum([await self._encode(t, special=True) for t in prompt.texts])

    async def text_tokens(self, text: str) -> int:
        return await self._encode(text, special=False)

    async def _encode(self, text: str, *, special: bool) -> int:
        if len(text) > TEXT_CHARS_MAX:
            return estimate_text(text)
        if len(text) < 4096:  # a thread hop costs more than encoding a short text
            return len(self.tokenizer.encode(text, add_special_tokens=special).ids)
        encoding = await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=special)
        return len(encoding.ids)


class CountFailed(Exception):
    """A counter could not count; the caller falls back to the estimate."""


@functools.lru_cache(maxsize=32)
def _load_tokenizer(path: Path) -> tuple[Tokenizer, Any, dict[str, str]]:
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 (the tokenizers library raises a bare Exception for a bad file)
        raise CountFailed(f"cannot load the tokenizer file {path}: {e}") from None
    config_file = path.with_name("tokenizer_config.json")
    template, special = None, {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CountFailed(f"cannot read {config_file}: {e}") from None
        special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
        if isinstance(config.get("chat_template"), str):
            template = ImmutableSandboxedEnvironment().from_string(config["chat_template"])
    return tokenizer, template, special


def _token_text(value: object) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} in newer tokenizer configs
        value = value.get("content")
    return value if isinstance(value, str) else ""


async def _post_json(client: Http1Client, url: str, body: dict[str, Any],
                     credential: Callable[[], str | None]) -> Any:
    """POST `body`; the credential is read at each use, so a rotated secret applies at once."""
    headers = {"content-type": "application/json", "accept": "application/json", "accept-encoding": "identity"}
    if secret := credential():
        headers["authorization"] = f"Bearer {secret}"
    request = client.build_request("POST", url, content=_encoder.encode(body), headers=headers,
                                   timeout=httpx.Timeout(COUNT_TIMEOUT_S))
    try:
        response = await client.send(request, stream=True)
        chunks = [chunk async for chunk in response.aiter_raw()]
        await response.aclose()
    except httpx.HTTPError as e:
        raise CountFailed(f"{url}: {type(e).__name__}") from None
    if response.status_code != 200:
        raise CountFailed(f"{url} answered {response.status_code}")
    try:
        return _decoder.decode(b"".join(chunks))
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise CountFailed(f"{url} answered with malformed JSON") from None


def estimate_completion(parts: Sequence[str]) -> int:
    return max(estimate_text("".join(parts)), sum(1 for p in parts if p))


async def count_usage(counter: Counter, prompt: Prompt, completion_parts: Sequence[str]) -> tuple[int, int]:
    """(prompt tokens, completion tokens); falls back to the estimate, part by part, when counting fails."""
    try:
        prompt_tokens = await asyncio.wait_for(counter.prompt_tokens(prompt), COUNT_TIMEOUT_S)
    except (CountFailed, TimeoutError):
        prompt_tokens = estimate_prompt(prompt)
    text = "".join(completion_parts)
    if not text:
        return prompt_tokens, 0
    if isinstance(counter, Estimate):
        return prompt_tokens, estimate_completion(completion_parts)
    try:
        return prompt_tokens, await asyncio.wait_for(counter.text_tokens(text), COUNT_TIMEOUT_S)
    except (CountFailed, TimeoutError):
        return prompt_tokens, estimate_completion(completion_parts)
