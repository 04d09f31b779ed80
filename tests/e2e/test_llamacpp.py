"""The gateway in front of a real llama.cpp server (llama-cpp-python's), which reports no usage in streams.

Its quirks, as seen through the gateway: streams never carry usage (the gateway counts with the
model's tokenizer file and tells the client that count when asked), any model name is accepted, and
`n` is ignored. The model's words are noise; the tests check protocol, usage and the ledger.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import openai
import pytest
from tokenizers import Tokenizer

from domain.catalog import BackendKind, Deployment
from domain.pricing import Prices
from tests.backends.process import ServerProcess
from tests.e2e.conftest import Real, real_service
from tests.e2e.openai_shapes import CHAT_CHUNK, CHAT_COMPLETION, validate
from tests.e2e.test_vllm import charged, client

PRICES = Prices(1_000, 2_000, datetime(2020, 1, 1, tzinfo=UTC))
MESSAGES = [{"role": "system", "content": "You count."}, {"role": "user", "content": "count to ten 你好"}]
RENDERED = "<s><|system|>\nYou count.</s>\n<|user|>\ncount to ten 你好</s>\n<|assistant|>\n"  # the chat template


@pytest.fixture(scope="module")
def real(pg_server_url: str, llamacpp_server: ServerProcess, tiny_model_dir: Path) -> Iterator[Real]:
    base = llamacpp_server.base_url + "/v1"
    tokenizer = f"file:{tiny_model_dir / 'tokenizer.json'}"
    with real_service(pg_server_url, [
        ("tiny-cpp", Deployment("cpp1", BackendKind.OPENAI, base, "any-name-at-all", tokenizer=tokenizer), PRICES),
        ("tiny-cpp-estimated", Deployment("cpp1", BackendKind.OPENAI, base, "tiny-llama-cpp"), PRICES),
    ]) as stack:
        yield stack


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


def test_a_stream_without_upstream_usage_is_counted_with_the_tokenizer_file(real: Real, reference: Tokenizer) -> None:
    key_id, secret = real.new_key()
    chunks = list(client(real, secret).chat.completions.create(
        model="tiny-cpp", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, max_tokens=16))
    for chunk in chunks:
        validate(chunk.model_dump(exclude_unset=True), CHAT_CHUNK)
        assert chunk.model == "tiny-cpp"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == [] and chunks[-1].id == chunks[0].id
    prompt = len(reference.encode(RENDERED).ids)
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, len(reference.encode(text).ids))
    cost = PRICES.cost_credits(prompt, 0, usage.completion_tokens)
    assert charged(real, key_id) == (1, prompt, usage.completion_tokens, cost, 1)  # told = charged, estimated


def test_without_a_tokenizer_the_documented_estimate_is_charged(real: Real) -> None:
    key_id, secret = real.new_key()
    chunks = list(client(real, secret).chat.completions.create(
        model="tiny-cpp-estimated", messages=MESSAGES, stream=True, max_tokens=10))
    assert all(c.usage is None for c in chunks)  # not asked for: not sent
    streamed = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    estimate_prompt = 3 + (4 + 3) + (4 + 5)  # 10 and 20 bytes of text: ceil(bytes / 4) each
    completion = max(len(streamed), -(-len("".join(streamed).encode()) // 4))
    assert charged(real, key_id)[1:3] + charged(real, key_id)[4:] == (estimate_prompt, completion, 1)


def test_a_whole_response_carries_llamacpps_own_usage(real: Real) -> None:
    key_id, secret = real.new_key()
    answer = client(real, secret).chat.completions.create(model="tiny-cpp", messages=MESSAGES, max_tokens=8, n=2)
    validate(answer.model_dump(exclude_unset=True), CHAT_COMPLETION)
    assert answer.model == "tiny-cpp" and len(answer.choices) == 1  # llama.cpp ignores n
    assert answer.usage is not None
    assert charged(real, key_id)[1:3] + charged(real, key_id)[4:] == (answer.usage.prompt_tokens,
                                                                      answer.usage.completion_tokens, 0)


def test_streamed_text_completions(real: Real, reference: Tokenizer) -> None:
    key_id, secret = real.new_key()
    chunks = list(client(real, secret).completions.create(model="tiny-cpp", prompt="hello world", max_tokens=6,
                                                          stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == len(reference.encode(text).ids)
    assert charged(real, key_id)[2] == usage.completion_tokens


def test_llamacpp_refusals_reach_the_client_as_errors(real: Real) -> None:
    _key_id, secret = real.new_key()
    with pytest.raises(openai.APIStatusError) as refused:
        client(real, secret).chat.completions.create(
            model="tiny-cpp", messages=[{"role": "user", "content": "count to ten " * 400}], max_tokens=4)
    assert 400 <= refused.value.status_code < 600 and refused.value.response.headers.get("x-request-id")
