"""An Ollama deployment behind the OpenAI API: requests translated, answers and usage translated back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import openai
import psycopg
import pytest

from domain.access import SYSTEM
from domain.catalog import BackendKind, Deployment
from domain.pricing import Prices
from tests.e2e.conftest import Stack, free_port, wait_http
from tests.e2e.openai_shapes import CHAT_CHUNK, CHAT_COMPLETION, EMBEDDINGS, validate
from tests.e2e.test_gateway import client, wait_for


@pytest.fixture
def ollama(stack: Stack) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_ollama", "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/api/tags")
        for name, upstream in (("local", "llama3.2:1b"), ("gone", "missing"), ("flaky", "breaks")):
            stack.app.add_model(SYSTEM, name, Deployment("ollama", BackendKind.OLLAMA, base, upstream),
                                Prices(1_000, 1_000, datetime(2020, 1, 1, tzinfo=UTC)))
        wait_for(lambda: {"local", "gone", "flaky"} <= {m.id for m in client(stack).models.list()}, 2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def seen(base: str) -> list[dict]:
    return httpx.get(f"{base}/_requests").json()["requests"]


def test_chat_is_translated_both_ways(stack: Stack, ollama: str) -> None:
    result = client(stack).chat.completions.create(
        model="local", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=5, temperature=0.2, top_p=0.9, stop=["\n"], seed=7)
    validate(result.model_dump(), CHAT_COMPLETION)
    assert result.model == "local" and result.choices[0].message.content == "tok " * 5
    assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 5
    sent = seen(ollama)[-1]
    assert sent["path"] == "/api/chat" and sent["model"] == "llama3.2:1b" and sent["stream"] is False
    assert sent["options"] == {"temperature": 0.2, "top_p": 0.9, "seed": 7, "num_predict": 5, "stop": ["\n"]}


def test_streams_become_openai_chunks_with_usage_on_request(stack: Stack, ollama: str) -> None:
    chunks = list(client(stack).chat.completions.create(
        model="local", messages=[{"role": "user", "content": "Hi"}], stream=True,
        stream_options={"include_usage": True}))
    for chunk in chunks:
        validate(chunk.model_dump(), CHAT_CHUNK)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok " * 8
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_completions_embeddings_tools_json_and_images(stack: Stack, ollama: str) -> None:
    c = client(stack)
    completion = c.completions.create(model="local", prompt="Once upon", max_tokens=3)
    assert completion.choices[0].text == "tok " * 3 and seen(ollama)[-1]["path"] == "/api/generate"
    embedding = c.embeddings.create(model="local", input=["a b", "c"])
    validate(embedding.model_dump(), EMBEDDINGS)
    assert len(embedding.data) == 2 and embedding.usage.prompt_tokens == 5
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    called = c.chat.completions.create(model="local", messages=[{"role": "user", "content": "Weather?"}], tools=tools)
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].finish_reason == "tool_calls" and json.loads(call.function.arguments) == {"city": "Taipei"}
    as_json = c.chat.completions.create(model="local", messages=[{"role": "user", "content": "x"}],
                                        response_format={"type": "json_object"})
    assert json.loads(as_json.choices[0].message.content) == {"ok": True} and seen(ollama)[-1]["format"] == "json"
    image = c.chat.completions.create(model="local", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
    assert image.choices[0].message.content.startswith("1 image(s)")
    assert seen(ollama)[-1]["messages"][0]["images"] == ["iVBORw0KGgo="]


def test_refusals_and_ollama_errors_are_openai_errors(stack: Stack, ollama: str) -> None:
    with pytest.raises(openai.NotFoundError, match="not found"):
        client(stack).chat.completions.create(model="gone", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="data: URLs"):
        client(stack).chat.completions.create(model="local", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.org/cat.png"}}]}])
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client(stack).chat.completions.create(model="local", messages=[{"role": "user", "content": "x"}], n=2)


def test_ollama_usage_is_charged_from_its_counts(stack: Stack, ollama: str, database_url: str) -> None:
    result = client(stack).chat.completions.create(model="local", messages=[{"role": "user", "content": "Hi"}])

    def rollup() -> tuple[int, int, int] | None:
        with psycopg.connect(database_url) as conn:
            row = conn.execute("SELECT tokens_prompt, tokens_completion, estimated_requests FROM "
                               "lwapi_read.usage_rollups WHERE model = 'local'").fetchone()
        return (row[0], row[1], row[2]) if row else None
    wait_for(lambda: rollup() is not None)
    assert rollup() == (result.usage.prompt_tokens, 8, 0)


@pytest.mark.skipif(not os.environ.get("OLLAMA_HOST"), reason="set OLLAMA_HOST to also test against a real Ollama")
def test_a_real_ollama_when_one_is_reachable(stack: Stack, database_url: str) -> None:
    host = os.environ["OLLAMA_HOST"]
    base = host if host.startswith("http") else f"http://{host}"
    tags = httpx.get(f"{base}/api/tags", timeout=10).json()["models"]
    assert tags, "the Ollama at OLLAMA_HOST has no model pulled"
    stack.app.add_model(SYSTEM, "real-ollama", Deployment("real", BackendKind.OLLAMA, base, tags[0]["name"]),
                        Prices(1, 1, datetime(2020, 1, 1, tzinfo=UTC)))
    wait_for(lambda: "real-ollama" in [m.id for m in client(stack).models.list()], 2)
    chunks = list(client(stack).chat.completions.create(
        model="real-ollama", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_an_ollama_failure_mid_stream_ends_cleanly_and_is_charged(stack: Stack, ollama: str,
                                                                  database_url: str) -> None:
    stream = client(stack).chat.completions.create(model="flaky", stream=True,
                                                   messages=[{"role": "user", "content": "x"}])
    received = [next(stream) for _ in range(3)]
    with pytest.raises(openai.APIError, match="stream broke off"):
        next(stream)
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices) == "tok " * 3

    def estimated() -> int | None:
        with psycopg.connect(database_url) as conn:
            row = conn.execute("SELECT estimated_requests FROM lwapi_read.usage_rollups WHERE model = 'flaky'"
                               ).fetchone()
        return row[0] if row else None
    wait_for(lambda: estimated() == 1)
