"""The gateway in front of a real vLLM server (CPU build, tiny random-weight Llama; MiniLM for embeddings).

The model's words are noise: these tests check protocol, streaming, usage and what lands in the ledger.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import httpx
import openai
import pytest

from domain.access import SYSTEM
from domain.catalog import BackendKind, Deployment
from domain.pricing import Prices
from tests.e2e.conftest import Real, VllmServers, free_port, real_service
from tests.e2e.openai_shapes import CHAT_CHUNK, CHAT_COMPLETION, EMBEDDINGS, validate

PRICES = Prices(1_000, 2_000, datetime(2020, 1, 1, tzinfo=UTC))
MESSAGES = [{"role": "system", "content": "You count."}, {"role": "user", "content": "count to ten 你好"}]


@pytest.fixture(scope="module")
def real(pg_server_url: str, vllm_servers: VllmServers) -> Iterator[Real]:
    chat, embeddings = vllm_servers.chat.base_url + "/v1", vllm_servers.embeddings.base_url + "/v1"
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with real_service(pg_server_url, [
        ("tiny", Deployment("cpu1", BackendKind.VLLM, chat, "tiny-llama"), PRICES),
        ("minilm", Deployment("cpu1", BackendKind.VLLM, embeddings, "minilm"), PRICES),
        ("tiny-ha", Deployment("gone", BackendKind.VLLM, dead, "tiny-llama", weight=100), PRICES),
    ]) as stack:
        stack.app.change_model(SYSTEM, "tiny-ha",
                               lambda m: m.add_deployment(Deployment("cpu1", BackendKind.VLLM, chat, "tiny-llama")))
        wait_for(lambda: {"tiny", "minilm", "tiny-ha"} <= _model_ids(stack), 10)
        yield stack


def _model_ids(stack: Real) -> set[str]:
    _key_id, secret = stack.new_key()
    return {m.id for m in client(stack, secret).models.list()}


def client(stack: Real, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=secret, max_retries=0, timeout=60)


def wait_for(condition: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def charged(stack: Real, key_id, requests: int = 1) -> tuple[int, int, int, int, int]:  # type: ignore[no-untyped-def]
    wait_for(lambda: (stack.key_usage(key_id) or (0,))[0] >= requests)
    usage = stack.key_usage(key_id)
    assert usage is not None and usage[0] == requests
    return usage


def test_a_streamed_chat_relays_vllm_chunks_and_charges_the_usage_vllm_reported(real: Real,
                                                                                vllm_servers: VllmServers) -> None:
    key_id, secret = real.new_key()
    chunks = list(client(real, secret).chat.completions.create(
        model="tiny", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, max_tokens=12,
        extra_body={"min_tokens": 12}))  # vLLM's own sampling parameter, passed through: exactly 12 tokens
    for chunk in chunks:
        validate(chunk.model_dump(exclude_unset=True), CHAT_CHUNK)
        assert chunk.model == "tiny" and chunk.id == chunks[0].id
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == [] and usage.completion_tokens == 12
    assert chunks[-2].choices[0].finish_reason == "length"
    tokenized = httpx.post(vllm_servers.chat.base_url + "/tokenize",
                           json={"model": "tiny-llama", "messages": MESSAGES}).json()
    assert usage.prompt_tokens == tokenized["count"]
    cost = PRICES.cost_credits(usage.prompt_tokens, 0, 12)
    assert charged(real, key_id) == (1, usage.prompt_tokens, 12, cost, 0)  # reported, so not estimated


def test_without_include_usage_the_client_sees_no_usage_chunk_but_is_charged(real: Real) -> None:
    key_id, secret = real.new_key()
    chunks = list(client(real, secret).chat.completions.create(
        model="tiny", messages=MESSAGES, stream=True, max_tokens=5, extra_body={"min_tokens": 5}))
    assert all(c.usage is None and c.choices for c in chunks)
    assert charged(real, key_id)[2:] == (5, PRICES.cost_credits(charged(real, key_id)[1], 0, 5), 0)


def test_whole_chat_completions_with_n_seed_stop_and_logprobs(real: Real) -> None:
    key_id, secret = real.new_key()
    ask = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "n": 2, "seed": 1234, "temperature": 1.0,
           "stop": ["\u2603"], "logprobs": True, "top_logprobs": 2}
    first = client(real, secret).chat.completions.create(**ask)  # type: ignore[call-overload]
    again = client(real, secret).chat.completions.create(**ask)  # type: ignore[call-overload]
    validate(first.model_dump(exclude_unset=True), CHAT_COMPLETION)
    assert first.model == "tiny" and len(first.choices) == 2
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]  # seeded
    assert first.choices[0].logprobs is not None and first.choices[0].logprobs.content
    assert first.usage is not None and again.usage is not None
    spent = first.usage.completion_tokens + again.usage.completion_tokens
    assert charged(real, key_id, 2)[2] == spent


def test_completions_and_json_mode(real: Real) -> None:
    key_id, secret = real.new_key()
    text = client(real, secret).completions.create(model="tiny", prompt=["hello world", "the sea"], max_tokens=4,
                                                   logprobs=2, extra_body={"min_tokens": 4})
    assert len(text.choices) == 2 and text.choices[0].logprobs is not None
    assert text.usage is not None and text.usage.completion_tokens == 8
    as_json = client(real, secret).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40,
                                                           temperature=0, response_format={"type": "json_object"})
    assert as_json.choices[0].message.content is not None and as_json.choices[0].message.content.lstrip()[:1] == "{"
    assert charged(real, key_id, 2)[0] == 2


def test_embeddings_from_a_pooling_server(real: Real) -> None:
    key_id, secret = real.new_key()
    answer = client(real, secret).embeddings.create(model="minilm", input=["hello world", "你好 世界"])
    validate(answer.model_dump(exclude_unset=True), EMBEDDINGS)
    assert answer.model == "minilm" and [len(d.embedding) for d in answer.data] == [384, 384]
    assert sum(v * v for v in answer.data[0].embedding) == pytest.approx(1.0, abs=1e-3)
    assert charged(real, key_id)[1:3] == (answer.usage.prompt_tokens, 0)


def test_vllm_refusals_reach_the_client_as_openai_errors_and_cost_nothing(real: Real) -> None:
    key_id, secret = real.new_key()
    with pytest.raises(openai.BadRequestError) as refused:
        client(real, secret).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=100_000)
    assert "max_tokens" in refused.value.message or "max_model_len" in refused.value.message
    assert refused.value.body is not None and refused.value.response.headers.get("x-request-id")
    with pytest.raises(openai.BadRequestError):
        client(real, secret).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=100_000,
                                                     stream=True)
    time.sleep(1.5)  # what would have been charged has been projected by now
    assert real.key_usage(key_id) is None


def test_a_client_that_leaves_mid_stream_is_charged_for_what_was_generated(real: Real) -> None:
    key_id, secret = real.new_key()
    body = {"model": "tiny", "messages": MESSAGES, "stream": True, "max_tokens": 480, "min_tokens": 480}
    with httpx.stream("POST", real.base_url + "/chat/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {secret}"}) as response:
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: {")
            if events == 6:
                break
    requests, _prompt, completion, _cost, estimated = charged(real, key_id)
    assert requests == 1
    if estimated:  # cancelled upstream before its usage chunk: vLLM's /tokenize counted the text relayed
        assert 1 <= completion < 480
    else:  # a loaded CPU vLLM may send the whole answer in one burst before the departure is noticed
        assert completion == 480  # then its own usage report is charged, once
    # (cancellation itself is checked deterministically against the steerable fake upstream in test_gateway)


def test_a_dead_deployment_fails_over_to_vllm_before_the_first_byte(real: Real) -> None:
    key_id, secret = real.new_key()
    for _ in range(3):
        answer = client(real, secret).chat.completions.create(model="tiny-ha", messages=MESSAGES, max_tokens=2)
        assert answer.model == "tiny-ha"
    assert charged(real, key_id, 3)[0] == 3


def test_discover_adds_a_running_vllm_servers_models_as_vllm_deployments(real: Real,
                                                                         vllm_servers: VllmServers) -> None:
    env = {**os.environ, "DATABASE_URL": real.database_url, "LWAPI_KEY_PEPPER": bytes(range(32)).hex()}
    run = subprocess.run([sys.executable, "-m", "edge.cli", "model", "discover", vllm_servers.chat.base_url,
                          "--price-prompt", "7"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert "1 model(s) added" in run.stdout and "(vllm)" in run.stdout
    listed = subprocess.run([sys.executable, "-m", "edge.cli", "model", "list", "--json"], env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    models = {m["name"]: m for m in json.loads(listed.stdout)}
    assert models["tiny-llama"]["deployments"][0]["backend"] == "vllm"
    _key_id, secret = real.new_key()
    wait_for(lambda: "tiny-llama" in {m.id for m in client(real, secret).models.list()}, 5)
    answer = client(real, secret).chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=2)
    assert answer.model == "tiny-llama" and answer.usage is not None
