"""The /v1 gateway's contract as OpenAI clients see it: rate-limit headers, key edits taking effect,
error classes of the official SDK, legacy completions shapes, cancellation upstream, and prices fixed
when a request starts. Against the real service and the fake upstream on loopback."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest
from psycopg.rows import dict_row

from adapters.passwords import hash_password
from domain.access import SYSTEM
from domain.catalog import BackendKind, Deployment
from domain.pricing import Prices
from tests.e2e.conftest import Stack, start_service, stop_service
from tests.e2e.openai_shapes import ERROR, TEXT_COMPLETION, TEXT_COMPLETION_CHUNK, validate
from tests.e2e.test_gateway import wait_for
from tests.e2e.test_service import login

MESSAGES = [{"role": "user", "content": "x"}]
# OpenAI's durations in x-ratelimit-reset-*: "1s", "6m0s", "1h2m3s", "1.5s", "150ms"
_RESET = re.compile(r"(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m(?!s))?(?:(?P<s>\d+(?:\.\d+)?)s)?|(?P<ms>\d+)ms")


def client(base_url: str, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=secret, max_retries=0, timeout=30)


def works(base_url: str, secret: str) -> bool:
    return httpx.get(f"{base_url}/models", headers={"authorization": f"Bearer {secret}"}).status_code == 200


def reset_seconds(text: str) -> float:
    match = _RESET.fullmatch(text)
    assert match is not None and text, f"not an OpenAI duration: {text!r}"
    if match["ms"] is not None:
        return int(match["ms"]) / 1000
    return int(match["h"] or 0) * 3600 + int(match["m"] or 0) * 60 + float(match["s"] or 0)


def lwapi(database_url: str, *args: str) -> str:
    """The `lwapi` command line against the stack's database, as an operator runs it."""
    env = {**os.environ, "DATABASE_URL": database_url, "LWAPI_KEY_PEPPER": bytes(range(32)).hex()}
    done = subprocess.run([sys.executable, "-m", "edge.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def usage_entry(database_url: str, request_id: str) -> dict[str, Any] | None:
    """The usage entry of one request, as the ledger read model has it (None until projected)."""
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return conn.execute("SELECT tokens_prompt, tokens_prompt_cached, tokens_completion, cost_credits, "
                            "started_at_ms, finished_at_ms, estimated, price_prompt, price_completion "
                            "FROM lwapi_read.ledger_usage WHERE request_id = %s", (request_id,)).fetchone()


def projected_entry(database_url: str, request_id: str) -> dict[str, Any]:
    wait_for(lambda: usage_entry(database_url, request_id) is not None, 15)
    entry = usage_entry(database_url, request_id)
    assert entry is not None
    return entry


def upstream_streams(stack: Stack) -> dict[str, dict[str, Any]]:
    """What the fake upstream recorded of the streams tagged with `fake_tag`."""
    return httpx.get(stack.upstream_url.removesuffix("/v1") + "/fake/streams", timeout=5).json()


def release_upstream(stack: Stack, tag: str) -> None:
    httpx.post(stack.upstream_url.removesuffix("/v1") + f"/fake/release/{tag}", timeout=5).raise_for_status()


def cost(prices: Prices, prompt: int, completion: int) -> int:
    return -(-(prompt * prices.prompt_per_mtok + completion * prices.completion_per_mtok) // 1_000_000)


# ---- 1. tokens per minute, and the x-ratelimit-* headers on 200s and 429s


@pytest.fixture(params=["local", "redis"])
def gateway_url(request: pytest.FixtureRequest, stack: Stack, database_url: str) -> Iterator[str]:
    """The stack's gateway: admitting on its own (local), or through Redis (as several processes do)."""
    if request.param == "local":
        yield stack.base_url
        return
    redis_url = request.getfixturevalue("redis_url")
    stop_service(stack.service)
    folder = Path(tempfile.mkdtemp(prefix="lwapi-gw.", dir="/tmp"))
    service, base_url = start_service(database_url, folder, {"LWAPI_REDIS_URL": redis_url})
    try:
        yield base_url
    finally:
        stop_service(service)


def test_tokens_per_minute_limit_with_openai_headers_on_200_and_429(stack: Stack, gateway_url: str) -> None:
    """A key with 10 requests and 200 tokens a minute: the first two requests (about 40 and 125 tokens
    estimated) pass and say what is left of both limits; the third (125 more) is over the token limit."""
    _, secret = stack.new_key(rpm_limit=10, tpm_limit=200)
    wait_for(lambda: works(gateway_url, secret), 3)
    c = client(gateway_url, secret)

    with c.chat.completions.with_streaming_response.create(
            model="llama", messages=MESSAGES, stream=True, max_tokens=10, extra_body={"fake_tokens": 10}) as streamed:
        assert streamed.status_code == 200
        streamed_headers = streamed.headers
        assert sum(1 for _ in streamed.iter_lines()) > 0
    whole = c.chat.completions.with_raw_response.create(model="llama", messages=MESSAGES, max_tokens=100,
                                                        extra_body={"fake_tokens": 100})
    assert whole.status_code == 200 and whole.parse().usage.completion_tokens == 100  # type: ignore[union-attr]
    for headers, requests_left in ((streamed_headers, 9), (whole.headers, 8)):  # as OpenAI sends on every answer
        assert headers["x-ratelimit-limit-requests"] == "10"
        assert headers["x-ratelimit-remaining-requests"] == str(requests_left)
        assert 0 < reset_seconds(headers["x-ratelimit-reset-requests"]) <= 60
        assert headers["x-ratelimit-limit-tokens"] == "200"
        assert 0 <= int(headers["x-ratelimit-remaining-tokens"]) < 200
        assert 0 < reset_seconds(headers["x-ratelimit-reset-tokens"]) <= 60
    assert int(whole.headers["x-ratelimit-remaining-tokens"]) < int(streamed_headers["x-ratelimit-remaining-tokens"])

    with pytest.raises(openai.RateLimitError) as refused:
        c.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=100, extra_body={"fake_tokens": 100})
    error = refused.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded" and error.type == "tokens"
    assert "tokens per minute" in error.message
    validate(error.response.json(), ERROR)
    headers = error.response.headers
    assert headers["x-ratelimit-limit-tokens"] == "200"
    remaining = int(headers["x-ratelimit-remaining-tokens"])
    assert 0 <= remaining < 100  # not enough for the 100 completion tokens asked for
    reset = reset_seconds(headers["x-ratelimit-reset-tokens"])
    assert 0 < reset <= 60
    retry_after = int(headers["retry-after"])
    assert 1 <= retry_after <= math.ceil(reset)  # the budget is whole again no sooner than the retry is possible
    assert headers["x-request-id"].startswith("req_")
    # every x-ratelimit-* header, as on any OpenAI answer; the refused request consumed nothing
    assert headers["x-ratelimit-limit-requests"] == "10" and headers["x-ratelimit-remaining-requests"] == "8"
    assert 0 < reset_seconds(headers["x-ratelimit-reset-requests"]) <= 60


# ---- 2. a key edited in the CLI or the portal takes effect at the gateway within a second


def test_key_edited_with_the_cli_takes_effect_within_one_second(stack: Stack, database_url: str) -> None:
    stack.add_model("other")
    key_id, secret = stack.new_key()
    wait_for(lambda: works(stack.base_url, secret), 3)
    c = client(stack.base_url, secret)
    assert c.chat.completions.create(model="llama", messages=MESSAGES).choices
    wait_for(lambda: "other" in {m.id for m in c.models.list()}, 3)

    lwapi(database_url, "key", "edit", str(key_id), "--models", "other", "--rpm", "1")
    edited = time.monotonic()

    def llama_refused() -> bool:
        try:
            c.chat.completions.create(model="llama", messages=MESSAGES)
        except openai.PermissionDeniedError as e:
            return e.code == "model_not_allowed"
        return False
    wait_for(llama_refused, 1.0)
    assert time.monotonic() - edited < 1.0
    # the same edit's rate limit: one request a minute
    allowed = c.chat.completions.with_raw_response.create(model="other", messages=MESSAGES)
    assert allowed.headers["x-ratelimit-limit-requests"] == "1"
    assert allowed.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as limited:
        c.chat.completions.create(model="other", messages=MESSAGES)
    assert limited.value.code == "rate_limit_exceeded" and limited.value.type == "requests"
    assert [m.id for m in c.models.list()] == ["other"]


def test_key_edited_in_the_portal_takes_effect_within_one_second(stack: Stack) -> None:
    password = "portal-password-1"
    stack.app.set_password_hash(stack.user_id, hash_password(password))
    c = client(stack.base_url, stack.secret)
    assert "x-ratelimit-limit-tokens" not in c.chat.completions.with_raw_response.create(
        model="llama", messages=MESSAGES).headers
    with httpx.Client(base_url=stack.base_url.removesuffix("/v1"), follow_redirects=False, timeout=30,
                      cookies={"lwapi_lang": "en"}) as portal:
        assert login(portal, "researcher@uni.edu", password).status_code in (302, 303)
        saved = portal.post(f"/projects/nlp/keys/{stack.key_id}/edit",
                            data={"name": "main", "rpm_limit": "", "tpm_limit": "500", "cap_credits": "",
                                  "_csrf_token": portal.cookies.get("csrftoken") or ""})
        assert saved.status_code == 303, saved.text
    edited = time.monotonic()

    def token_limit_applies() -> bool:
        answer = c.chat.completions.with_raw_response.create(model="llama", messages=MESSAGES, max_tokens=10)
        return answer.headers.get("x-ratelimit-limit-tokens") == "500"
    wait_for(token_limit_applies, 1.0)
    assert time.monotonic() - edited < 1.0


# ---- 3. the 413 and the missing-key 401 through the official SDK


def test_oversized_body_is_a_413_api_status_error_with_an_openai_error_body(stack: Stack) -> None:
    with pytest.raises(openai.APIStatusError) as raised:
        client(stack.base_url, stack.secret).chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "x" * (17 * 1024 * 1024)}])
    error = raised.value
    assert error.status_code == 413
    assert not isinstance(error, openai.BadRequestError | openai.InternalServerError)  # the SDK's own class for 413
    body = error.response.json()
    validate(body, ERROR)
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "request_too_large"
    assert error.code == "request_too_large" and error.type == "invalid_request_error"
    assert "16777216 bytes" in error.message
    assert error.response.headers["x-request-id"].startswith("req_")


def test_missing_api_key_is_an_authentication_error_with_openais_message(stack: Stack) -> None:
    no_key = client(stack.base_url, "unused")
    omitted = {"Authorization": openai.Omit()}  # the SDK's way to send no Authorization header at all
    for call in (lambda: no_key.chat.completions.create(model="llama", messages=MESSAGES, extra_headers=omitted),
                 lambda: no_key.models.list(extra_headers=omitted)):
        with pytest.raises(openai.AuthenticationError) as raised:
            call()
        error = raised.value
        assert "authorization" not in {k.lower() for k in error.response.request.headers}
        assert error.status_code == 401
        body = error.response.json()
        validate(body, ERROR)
        assert body["error"]["message"].startswith("You didn't provide an API key.")
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] is None
        assert error.code is None and error.type == "invalid_request_error"


# ---- 4. legacy completions: the response and its stream chunks against OpenAI's shapes


def test_legacy_completions_response_and_stream_chunks_match_openais_shapes(stack: Stack) -> None:
    c = client(stack.base_url, stack.secret)
    raw = c.completions.with_raw_response.create(model="llama", prompt="Once upon", max_tokens=3,
                                                 extra_body={"fake_tokens": 10})
    body = json.loads(raw.text)
    validate(body, TEXT_COMPLETION)
    assert body["model"] == "llama" and body["choices"][0]["text"] == "tok " * 3
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 3
    parsed = raw.parse()
    assert parsed.object == "text_completion" and parsed.choices[0].text == "tok " * 3

    for include_usage in (False, True):
        request = {"model": "llama", "prompt": "Once upon", "stream": True, "fake_tokens": 4,
                   **({"stream_options": {"include_usage": True}} if include_usage else {})}
        with httpx.stream("POST", f"{stack.base_url}/completions", json=request, timeout=30,
                          headers={"authorization": f"Bearer {stack.secret}"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        for chunk in chunks:
            validate(chunk, TEXT_COMPLETION_CHUNK)
        assert {chunk["model"] for chunk in chunks} == {"llama"} and len({chunk["id"] for chunk in chunks}) == 1
        with_choices = [chunk for chunk in chunks if chunk["choices"]]
        assert "".join(chunk["choices"][0]["text"] for chunk in with_choices) == "tok " * 4
        assert [chunk["choices"][0]["finish_reason"] for chunk in with_choices][-1] == "stop"
        assert all(chunk["choices"][0]["finish_reason"] is None for chunk in with_choices[:-1])
        usages = [chunk.get("usage") for chunk in chunks]
        if include_usage:
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
            assert all(u is None for u in usages[:-1])
        else:
            assert all(u is None for u in usages)

    streamed = c.completions.create(model="llama", prompt="Once upon", stream=True, max_tokens=2,
                                    stream_options={"include_usage": True}, extra_body={"fake_tokens": 5})
    sdk_chunks = list(streamed)
    assert "".join(ch.choices[0].text for ch in sdk_chunks if ch.choices) == "tok " * 2
    assert sdk_chunks[-1].usage is not None and sdk_chunks[-1].usage.completion_tokens == 2


# ---- 5. a client that goes away mid-stream: the upstream request is cancelled, the generated part charged


def test_client_leaving_a_held_stream_cancels_the_upstream_and_is_charged_what_was_generated(
        stack: Stack, database_url: str) -> None:
    """The upstream sends 5 of 50 tokens, then waits; the client reads those 5 and leaves. The gateway must
    close the upstream connection (the fake sees its client go), and charge the 5 tokens generated."""
    tag = "held-" + uuid.uuid4().hex
    stream = client(stack.base_url, stack.secret).chat.completions.create(
        model="llama", messages=MESSAGES, stream=True,
        extra_body={"fake_tokens": 50, "fake_tag": tag, "fake_hold_after": 5})
    request_id = stream.response.headers["x-request-id"]
    received = 0
    for chunk in stream:
        received += sum(1 for choice in chunk.choices if choice.delta.content)
        if received == 5:
            break
    stream.close()

    wait_for(lambda: upstream_streams(stack).get(tag, {}).get("client_gone"), 10)
    assert upstream_streams(stack)[tag] == {"planned": 50, "sent": 5, "client_gone": True, "finished": False}
    entry = projected_entry(database_url, request_id)
    assert entry["tokens_completion"] == 5  # what was generated (and delivered) before the client left
    assert entry["tokens_prompt"] > 0 and entry["estimated"] is True  # the stream's usage chunk never came
    prices = Prices(1_000, 2_000, datetime(2020, 1, 1, tzinfo=UTC))
    assert entry["cost_credits"] == cost(prices, entry["tokens_prompt"], 5)


def test_client_leaving_a_flowing_stream_cancels_the_upstream_and_is_charged_what_was_generated(
        stack: Stack, database_url: str) -> None:
    """2000 tokens at 10 ms each (20 s); the client leaves after 3. The upstream must see its client go
    long before the end, and the charge lies between what the client got and what the upstream sent."""
    tag = "flowing-" + uuid.uuid4().hex
    stream = client(stack.base_url, stack.secret).chat.completions.create(
        model="llama", messages=MESSAGES, stream=True,
        extra_body={"fake_tokens": 2000, "fake_delay_ms": 10, "fake_tag": tag})
    request_id = stream.response.headers["x-request-id"]
    received = 0
    for chunk in stream:
        received += sum(1 for choice in chunk.choices if choice.delta.content)
        if received >= 3:
            break
    stream.close()

    wait_for(lambda: upstream_streams(stack).get(tag, {}).get("client_gone"), 10)
    record = upstream_streams(stack)[tag]
    assert record["finished"] is False and received <= record["sent"] < 2000
    entry = projected_entry(database_url, request_id)
    assert 0 < received <= entry["tokens_completion"] <= record["sent"] < 2000
    assert entry["estimated"] is True


# ---- 6. prices changed while a request runs: it is charged at the prices in force when it started


def test_price_change_during_a_request_charges_the_prices_in_force_when_it_started(
        stack: Stack, database_url: str) -> None:
    old = Prices(1_000_000, 2_000_000, datetime(2020, 1, 1, tzinfo=UTC))  # 1 credit a prompt token, 2 a completion
    stack.app.add_model(SYSTEM, "priced", Deployment("fake", BackendKind.OPENAI, stack.upstream_url, "fake-upstream"),
                        old)
    c = client(stack.base_url, stack.secret)
    wait_for(lambda: "priced" in {m.id for m in c.models.list()}, 3)
    tag = "priced-" + uuid.uuid4().hex
    running = c.chat.completions.create(
        model="priced", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        extra_body={"fake_tokens": 10, "fake_tag": tag, "fake_hold_after": 2})
    request_id = running.response.headers["x-request-id"]
    chunks = [next(running)]  # the request has started and is held upstream after its second token

    printed = lwapi(database_url, "model", "price", "priced", "--prompt", "5000000", "--completion", "7000000")
    effective = datetime.fromisoformat(re.search(r"new prices from (\S+)", printed).group(1))  # type: ignore[union-attr]

    def new_price_in_force() -> bool:  # a request started now is charged at the new prices
        probe = c.chat.completions.with_raw_response.create(model="priced", messages=MESSAGES, max_tokens=1)
        entry = projected_entry(database_url, probe.headers["x-request-id"])
        return entry["price_prompt"] == 5_000_000 and entry["price_completion"] == 7_000_000
    wait_for(new_price_in_force, 15)
    assert upstream_streams(stack)[tag]["finished"] is False  # still running

    release_upstream(stack, tag)
    chunks += list(running)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "tok " * 10
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 10
    entry = projected_entry(database_url, request_id)
    assert entry["started_at_ms"] < effective.timestamp() * 1000 < entry["finished_at_ms"]
    assert (entry["price_prompt"], entry["price_completion"]) == (1_000_000, 2_000_000)
    assert (entry["tokens_prompt"], entry["tokens_completion"]) == (usage.prompt_tokens, 10)
    assert entry["cost_credits"] == cost(old, usage.prompt_tokens, 10) == usage.prompt_tokens + 20
