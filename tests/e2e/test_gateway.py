"""The /v1 API through the official openai SDK, against the fake upstream on loopback."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai
import psycopg
import pytest
from tokenizers import Tokenizer

from domain.access import SYSTEM
from domain.api_key import KeySettings
from domain.catalog import BackendKind, Deployment
from domain.pricing import Prices
from tests.e2e.conftest import Stack, free_port, start_service, stop_service, wait_http
from tests.e2e.openai_shapes import CHAT_CHUNK, CHAT_COMPLETION, EMBEDDINGS, ERROR, MODEL, MODEL_LIST, validate


def client(stack: Stack, secret: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=secret or stack.secret, max_retries=0, timeout=30)


def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def charged(stack: Stack, database_url: str) -> tuple[int, int]:
    """(requests, credits) recorded for the project, as the read model has them."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT requests, charged_credits FROM lwapi_read.balances WHERE project_id = %s",
                           (stack.project_id,)).fetchone()
    return (row[0], row[1]) if row else (0, 0)


def test_chat_completion_is_relayed_and_metered(stack: Stack, database_url: str) -> None:
    result = client(stack).chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "Hello"}], extra_body={"fake_tokens": 5})
    assert result.model == "llama"  # the client sees the name it asked for
    assert result.choices[0].message.content == "tok " * 5
    assert result.usage is not None and result.usage.completion_tokens == 5
    expected = -(-(result.usage.prompt_tokens * 1_000 + 5 * 2_000) // 1_000_000)
    wait_for(lambda: charged(stack, database_url) == (1, expected))


def test_models_list_only_what_the_key_may_use(stack: Stack) -> None:
    assert [m.id for m in client(stack).models.list()] == ["llama"]
    assert client(stack).models.retrieve("llama").id == "llama"
    stack.add_model("something-else")
    _, restricted = stack.new_key(allowed_models=("something-else",))
    wait_for(lambda: _works(stack, restricted), 2)  # a new key reaches the gateway within a second
    assert [m.id for m in client(stack, restricted).models.list()] == ["something-else"]
    with pytest.raises(openai.NotFoundError):
        client(stack, restricted).models.retrieve("llama")


def test_streaming_relays_chunks_and_usage_only_when_asked(stack: Stack) -> None:
    chunks = list(client(stack).chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "Hi"}], stream=True, extra_body={"fake_tokens": 6}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok " * 6
    assert all(c.usage is None for c in chunks) and all(c.model == "llama" for c in chunks)
    with_usage = list(client(stack).chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "Hi"}], stream=True,
        stream_options={"include_usage": True}, extra_body={"fake_tokens": 6}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 6


async def test_async_client_streams_completions_and_embeddings(stack: Stack) -> None:
    aclient = openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.secret, max_retries=0)
    stream = await aclient.completions.create(model="llama", prompt="Once", stream=True, max_tokens=3,
                                              extra_body={"fake_tokens": 10})
    texts = [c.choices[0].text async for c in stream if c.choices]
    assert "".join(texts) == "tok " * 3
    embedding = await aclient.embeddings.create(model="llama", input=["a", "b"])
    assert len(embedding.data) == 2 and embedding.usage.prompt_tokens > 0
    await aclient.close()


@pytest.mark.parametrize(
    ("secret", "message"),
    [("sk-lw-" + "x" * 43, "Incorrect API key"), ("not-a-key", "Incorrect API key")],
)
def test_unknown_keys_are_refused(stack: Stack, secret: str, message: str) -> None:
    with pytest.raises(openai.AuthenticationError, match=message) as refused:
        client(stack, secret).chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}])
    assert refused.value.status_code == 401
    assert refused.value.response.headers["x-request-id"].startswith("req_")


def test_revoked_key_is_refused_within_one_second(stack: Stack) -> None:
    key_id, secret = stack.new_key()
    wait_for(lambda: client(stack, secret).models.list() is not None, 2)
    stack.app.revoke_key(SYSTEM, key_id)
    started = time.monotonic()

    def refused() -> bool:
        try:
            client(stack, secret).models.list()
        except openai.AuthenticationError as e:
            return "revoked" in str(e)
        return False
    wait_for(refused, 1.0)
    assert time.monotonic() - started < 1.0


def test_model_not_allowed_unknown_and_bad_body(stack: Stack) -> None:
    stack.add_model("other")
    _, restricted = stack.new_key(allowed_models=("other",))
    wait_for(lambda: _works(stack, restricted), 2)
    with pytest.raises(openai.PermissionDeniedError):
        client(stack, restricted).chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        client(stack).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client(stack).chat.completions.create(model="llama", messages=[])
    raw = httpx.post(f"{stack.base_url}/chat/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {stack.secret}"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    big = httpx.post(f"{stack.base_url}/chat/completions", content=b"x" * (17 * 1024 * 1024),
                     headers={"Authorization": f"Bearer {stack.secret}"})
    assert big.status_code == 413


def _works(stack: Stack, secret: str) -> bool:
    try:
        client(stack, secret).models.list()
    except openai.AuthenticationError:
        return False
    return True


def test_rate_limit_answers_429_with_openai_headers(stack: Stack) -> None:
    _, limited = stack.new_key(rpm_limit=2)
    wait_for(lambda: _works(stack, limited), 2)  # /models does not count against the limit
    c = client(stack, limited)
    for _ in range(2):
        c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.RateLimitError) as limited_error:
        c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}])
    headers = limited_error.value.response.headers
    assert headers["x-ratelimit-limit-requests"] == "2" and headers["x-ratelimit-remaining-requests"] == "0"
    assert int(headers["retry-after"]) >= 1
    assert limited_error.value.code == "rate_limit_exceeded"


def test_usage_cap_refuses_with_insufficient_quota(stack: Stack) -> None:
    _, capped = stack.new_key(cap_credits=3)
    wait_for(lambda: _works(stack, capped), 2)
    with pytest.raises(openai.RateLimitError) as refused:
        client(stack, capped).chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}])
    assert refused.value.code == "insufficient_quota"
    ok = client(stack, capped).chat.completions.create(model="llama", max_tokens=50,
                                                       messages=[{"role": "user", "content": "x"}])
    assert ok.choices


@pytest.mark.parametrize(
    ("fail", "error", "status"),
    [("500", openai.InternalServerError, 502), ("400", openai.BadRequestError, 400)],
)
def test_upstream_errors_map_to_openai_errors(stack: Stack, fail: str, error: type, status: int) -> None:
    with pytest.raises(error) as raised:
        client(stack).chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}],
                                              extra_body={"fake_fail": fail})
    assert raised.value.status_code == status


def test_stream_cut_midway_ends_with_an_error_event_and_a_charge(stack: Stack, database_url: str) -> None:
    before = charged(stack, database_url)
    with pytest.raises(openai.APIError):
        for _ in client(stack).chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "x"}], stream=True,
                extra_body={"fake_tokens": 10, "fake_fail": "cut"}):
            pass
    wait_for(lambda: charged(stack, database_url)[0] == before[0] + 1)


def test_client_disconnect_mid_stream_is_charged_once(stack: Stack, database_url: str) -> None:
    before = charged(stack, database_url)

    async def read_a_little() -> None:
        async with httpx.AsyncClient(timeout=30) as h, h.stream(
                "POST", f"{stack.base_url}/chat/completions", headers={"Authorization": f"Bearer {stack.secret}"},
                json={"model": "llama", "messages": [{"role": "user", "content": "x"}], "stream": True,
                      "fake_tokens": 200, "fake_delay_ms": 20}) as response:
            async for _ in response.aiter_bytes():
                break
    asyncio.run(read_a_little())
    wait_for(lambda: charged(stack, database_url)[0] == before[0] + 1)
    time.sleep(0.5)
    assert charged(stack, database_url)[0] == before[0] + 1


def test_upstream_down_is_503(stack: Stack) -> None:
    stack.app.add_model(SYSTEM, "down", Deployment("nowhere", BackendKind.OPENAI, "http://127.0.0.1:9/v1", "x"),
                        Prices(1, 1, datetime(2020, 1, 1, tzinfo=UTC)))
    wait_for(lambda: "down" in [m.id for m in client(stack).models.list()], 2)
    with pytest.raises(openai.InternalServerError) as raised:
        client(stack).chat.completions.create(model="down", messages=[{"role": "user", "content": "x"}])
    assert raised.value.status_code == 503


def test_metrics_are_prometheus_text_without_a_key(stack: Stack) -> None:
    client(stack).chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}])
    text = httpx.get(stack.base_url.removesuffix("/v1") + "/metrics").text
    assert 'lwapi_requests_total{endpoint="chat",model="llama",status="200"} 1' in text
    assert 'lwapi_tokens_total{model="llama",kind="completion"} 8' in text
    assert 'lwapi_request_duration_seconds_count{model="llama",status="200"} 1' in text
    assert "lwapi_spool_depth_entries" in text and "lwapi_projection_lag_events" in text
    assert 'lwapi_upstream_in_flight{model="llama",deployment="fake"} 0' in text


async def _burst_of_200(stack: Stack, secret: str, model: str, content: str, extra: dict[str, object]) -> list[str]:
    """200 chat completions at once (max_tokens 10); "ok" or the error code of each."""
    c = openai.AsyncOpenAI(base_url=stack.base_url, api_key=secret, max_retries=0, timeout=60,
                           http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=200)))

    async def one() -> str:
        try:
            await c.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                            max_tokens=10, extra_body=extra)
        except openai.RateLimitError as e:
            return str(e.code)
        return "ok"
    try:
        return await asyncio.gather(*(one() for _ in range(200)))
    finally:
        await c.close()


def _charged_credits(database_url: str, project: object) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT charged_credits FROM lwapi_read.balances WHERE project_id = %s",
                           (project,)).fetchone()
    return row[0] if row else 0


def test_two_hundred_concurrent_requests_on_a_balance_for_ten(stack: Stack, database_url: str) -> None:
    """Each request costs exactly 10 credits (10 completion tokens at 1 credit each, prompt free)."""
    owner = stack.app.register_user("tight@uni.edu", "Tight")
    project = stack.app.create_project(SYSTEM, "tight", "Tight budget", owner)
    stack.app.grant_credits(SYSTEM, project, 100, "ten requests")
    _, secret = stack.app.create_key(SYSTEM, project, owner, KeySettings(name="k"))
    stack.app.add_model(SYSTEM, "exact", Deployment("fake", BackendKind.OPENAI, stack.upstream_url, "fake-upstream"),
                        Prices(0, 1_000_000, datetime(2020, 1, 1, tzinfo=UTC)))
    wait_for(lambda: _works(stack, secret) and "exact" in [m.id for m in client(stack, secret).models.list()], 3)

    outcomes = asyncio.run(_burst_of_200(stack, secret, "exact", "x", {"fake_tokens": 10, "fake_delay_ms": 5}))
    assert outcomes.count("ok") == 10 and outcomes.count("insufficient_quota") == 190
    wait_for(lambda: _charged_credits(database_url, project) == 100)


def test_concurrent_requests_with_dense_prompts_never_spend_beyond_the_balance(stack: Stack,
                                                                              database_url: str) -> None:
    """The backend counts one prompt token per byte of text (the densest a tokenizer gets), four times the
    gateway's likely count: the reservation still covers it, so no burst spends beyond the balance."""
    owner = stack.app.register_user("dense@uni.edu", "Dense")
    project = stack.app.create_project(SYSTEM, "dense", "Dense prompts", owner)
    content = "你好" * 100  # 600 bytes of UTF-8
    per_request = len(content.encode()) + 10  # credits: 600 prompt tokens and 10 completion tokens, 1 each
    stack.app.grant_credits(SYSTEM, project, 10 * per_request, "ten requests")
    _, secret = stack.app.create_key(SYSTEM, project, owner, KeySettings(name="k"))
    stack.app.add_model(SYSTEM, "dense", Deployment("fake", BackendKind.OPENAI, stack.upstream_url, "fake-upstream"),
                        Prices(1_000_000, 1_000_000, datetime(2020, 1, 1, tzinfo=UTC)))
    wait_for(lambda: _works(stack, secret) and "dense" in [m.id for m in client(stack, secret).models.list()], 3)

    outcomes = asyncio.run(_burst_of_200(stack, secret, "dense", content,
                                         {"fake_tokens": 10, "fake_delay_ms": 5, "fake_prompt_tokens": 600}))
    succeeded = outcomes.count("ok")
    assert succeeded >= 1 and outcomes.count("insufficient_quota") == 200 - succeeded
    wait_for(lambda: _charged_credits(database_url, project) == succeeded * per_request)
    assert _charged_credits(database_url, project) <= 10 * per_request


def test_sigterm_lets_open_streams_finish_and_flushes_their_usage(stack: Stack, database_url: str) -> None:
    c = client(stack)
    stream = c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}], stream=True,
                                       extra_body={"fake_tokens": 40, "fake_delay_ms": 50})
    received = [next(stream)]
    stack.service.send_signal(signal.SIGTERM)
    received += list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in received if ch.choices) == "tok " * 40
    stack.service.wait(timeout=30)
    with psycopg.connect(database_url) as conn:
        claims = conn.execute("SELECT count(*) FROM usage_request_claims").fetchone()
    assert claims == (1,)  # the spool was flushed to the event store before the process ended


def test_stream_cut_at_the_end_of_the_grace_period_is_charged_for_what_it_generated(
        stack: Stack, database_url: str, tmp_path: Path) -> None:
    """A stream longer than the shutdown grace period: the client gets a final error event, the usage entry
    charges the tokens generated until the cut, and it reaches the event store before the process ends."""
    service, base_url = start_service(database_url, tmp_path / "data", {"LWAPI_SHUTDOWN_GRACE_S": "1"})
    try:
        c = openai.OpenAI(base_url=base_url, api_key=stack.secret, max_retries=0, timeout=30)
        stream = c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}], stream=True,
                                           extra_body={"fake_tokens": 400, "fake_delay_ms": 20})
        received = [next(stream)]
        service.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shutting down"):
            received.extend(stream)  # extend keeps the chunks that came before the error
        assert service.wait(timeout=30) == 0
    finally:
        stop_service(service)
    delivered = "".join(ch.choices[0].delta.content or "" for ch in received if ch.choices).count("tok ")
    assert 10 < delivered < 400  # about a second's worth at 20 ms per token
    with psycopg.connect(database_url) as conn:
        claims = conn.execute("SELECT count(*) FROM usage_request_claims").fetchone()
    assert claims == (1,)  # recorded in the event store before the process ended

    def rollup() -> list[tuple[int, int]]:
        with psycopg.connect(database_url) as conn:
            return conn.execute("SELECT tokens_completion, estimated_requests FROM lwapi_read.usage_rollups "
                                "WHERE key_id = %s", (stack.key_id,)).fetchall()
    wait_for(lambda: rollup() != [])  # the other service's projections fold it
    # charged what was generated: the tokens that reached the client, counted (the upstream never sent usage)
    assert rollup() == [(delivered, 1)]


def test_upstream_timeouts_are_504_or_a_final_error_event(stack: Stack) -> None:
    stack.app.add_model(SYSTEM, "slow", Deployment("fake", BackendKind.OPENAI, stack.upstream_url, "fake-upstream",
                                                   timeout_ms=500), Prices(1, 1, datetime(2020, 1, 1, tzinfo=UTC)))
    wait_for(lambda: "slow" in [m.id for m in client(stack).models.list()], 2)
    with pytest.raises(openai.InternalServerError) as raised:
        client(stack).chat.completions.create(model="slow", messages=[{"role": "user", "content": "x"}],
                                              extra_body={"fake_fail": "slow_headers", "fake_sleep_s": 3})
    assert raised.value.status_code == 504
    started = time.monotonic()
    with pytest.raises(openai.APIError, match="did not answer in time"):
        for _ in client(stack).chat.completions.create(model="slow", messages=[{"role": "user", "content": "x"}],
                                                       stream=True, extra_body={"fake_fail": "hang"}):
            pass
    assert time.monotonic() - started < 5


def test_stream_without_done_ends_with_an_error_event(stack: Stack) -> None:
    with pytest.raises(openai.APIError, match="without finishing"):
        for _ in client(stack).chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}],
                                                       stream=True, extra_body={"fake_fail": "no_done"}):
            pass


def test_malformed_upstream_json_is_502(stack: Stack) -> None:
    with pytest.raises(openai.InternalServerError) as raised:
        client(stack).chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}],
                                              extra_body={"fake_fail": "malformed"})
    assert raised.value.status_code == 502


def test_an_upstream_answering_in_invalid_utf8_is_a_clean_error_or_relayed(stack: Stack, database_url: str) -> None:
    with pytest.raises(openai.InternalServerError) as raised:
        client(stack).chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}],
                                              extra_body={"fake_fail": "bad_utf8"})
    assert raised.value.status_code == 502
    with httpx.stream("POST", stack.base_url + "/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {stack.secret}"},
                      json={"model": "llama", "messages": [{"role": "user", "content": "x"}], "stream": True,
                            "fake_fail": "bad_utf8"}) as streamed:
        raw = b"".join(streamed.iter_bytes())
    assert streamed.status_code == 200 and raw.rstrip().endswith(b"data: [DONE]")  # relayed as it came
    wait_for(lambda: charged(stack, database_url)[0] == 1)  # the stream was metered, the refusal was not


def test_responses_match_openai_shapes(stack: Stack) -> None:
    auth = {"Authorization": f"Bearer {stack.secret}"}
    body = {"model": "llama", "messages": [{"role": "user", "content": "x"}]}
    validate(httpx.post(f"{stack.base_url}/chat/completions", json=body, headers=auth).json(), CHAT_COMPLETION)
    validate(httpx.get(f"{stack.base_url}/models", headers=auth).json(), MODEL_LIST)
    validate(httpx.get(f"{stack.base_url}/models/llama", headers=auth).json(), MODEL)
    validate(httpx.post(f"{stack.base_url}/embeddings", json={"model": "llama", "input": "x"}, headers=auth).json(),
             EMBEDDINGS)
    with httpx.stream("POST", f"{stack.base_url}/chat/completions", headers=auth,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        validate(json.loads(event), CHAT_CHUNK)
    for response in (httpx.get(f"{stack.base_url}/models"),
                     httpx.post(f"{stack.base_url}/chat/completions", json={"model": 1}, headers=auth),
                     httpx.post(f"{stack.base_url}/chat/completions", json={**body, "model": "nope"}, headers=auth),
                     httpx.get(f"{stack.base_url}/nowhere", headers=auth)):
        assert response.status_code in (400, 401, 404)
        validate(response.json(), ERROR)


def test_catalog_changes_reach_the_gateway_within_one_second(stack: Stack) -> None:
    started = time.monotonic()
    stack.app.add_model(SYSTEM, "fresh", Deployment("fake", BackendKind.OPENAI, stack.upstream_url, "fake-upstream"),
                        Prices(1, 1, datetime(2020, 1, 1, tzinfo=UTC)))
    wait_for(lambda: "fresh" in [m.id for m in client(stack).models.list()], 1.0)
    stack.app.change_model(SYSTEM, "fresh", lambda m: m.remove())
    wait_for(lambda: "fresh" not in [m.id for m in client(stack).models.list()], 1.0)
    assert time.monotonic() - started < 2.5


def test_a_backend_without_usage_reports_is_metered_with_marked_estimates(stack: Stack, database_url: str,
                                                                        tiny_model_dir: Path) -> None:
    """No usage upstream: the deployment's tokenizer file counts, else the documented estimate does."""
    port = free_port()
    quiet = subprocess.Popen([sys.executable, "-m", "tests.fake_upstream", "--port", str(port), "--no-usage"])
    tokenizer = tiny_model_dir / "tokenizer.json"
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        base = f"http://127.0.0.1:{port}/v1"
        prices = Prices(1, 1, datetime(2020, 1, 1, tzinfo=UTC))
        stack.app.add_model(SYSTEM, "quiet", Deployment("q", BackendKind.OPENAI, base, "q"), prices)
        stack.app.add_model(SYSTEM, "quiet-counted", Deployment("q", BackendKind.OPENAI, base, "q",
                                                                tokenizer=f"file:{tokenizer}"), prices)
        wait_for(lambda: {"quiet", "quiet-counted"} <= {m.id for m in client(stack).models.list()}, 2)
        told = {}
        for model in ("quiet", "quiet-counted"):
            chunks = list(client(stack).chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hello 你好"}], stream=True,
                stream_options={"include_usage": True}, extra_body={"fake_tokens": 12}))
            for c in chunks:
                validate(c.model_dump(exclude_unset=True), CHAT_CHUNK)
            assert [c.usage is not None for c in chunks][-2:] == [False, True]  # the usage chunk comes last
            assert chunks[-1].choices == [] and chunks[-1].id == chunks[0].id and chunks[-1].model == model
            told[model] = (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens, 1)

        def entry(model: str) -> tuple[int, int, int] | None:
            with psycopg.connect(database_url) as conn:
                row = conn.execute("SELECT tokens_prompt, tokens_completion, estimated_requests "
                                   "FROM lwapi_read.usage_rollups WHERE model = %s", (model,)).fetchone()
            return (row[0], row[1], row[2]) if row else None
        wait_for(lambda: entry("quiet") is not None and entry("quiet-counted") == told["quiet-counted"])
        # the estimate: one token per streamed text chunk; 3 + 4 + ceil(12 bytes / 4) for the prompt
        assert entry("quiet") == told["quiet"] == (3 + 4 + 3, 12, 1)
        reference = Tokenizer.from_file(str(tokenizer))
        prompt = len(reference.encode("<s><|user|>\nhello 你好</s>\n<|assistant|>\n").ids)
        assert told["quiet-counted"] == (prompt, len(reference.encode("tok " * 12).ids), 1)
        whole = client(stack).chat.completions.create(model="quiet-counted", messages=[{"role": "user", "content": "x"}],
                                                     extra_body={"fake_tokens": 5})
        assert whole.usage is not None and whole.usage.completion_tokens == len(reference.encode("tok " * 5).ids)
    finally:
        quiet.terminate()
        quiet.wait(timeout=10)


def test_keys_outside_their_validity_window_are_refused(stack: Stack) -> None:
    now = datetime.now(UTC)
    _, early = stack.new_key(valid_from=now + timedelta(days=1))
    _, late = stack.new_key(valid_from=now - timedelta(days=2), valid_until=now - timedelta(days=1))
    for secret, message in ((early, "not valid yet"), (late, "expired")):
        def refused(secret: str = secret, message: str = message) -> bool:
            try:
                client(stack, secret).models.list()
            except openai.AuthenticationError as e:
                return message in str(e)
            return False
        wait_for(refused, 2)


def test_every_response_carries_the_request_id_of_its_usage_entry(stack: Stack, database_url: str) -> None:
    auth = {"Authorization": f"Bearer {stack.secret}"}
    body = {"model": "llama", "messages": [{"role": "user", "content": "x"}]}
    ok = httpx.post(f"{stack.base_url}/chat/completions", json=body, headers=auth)
    with httpx.stream("POST", f"{stack.base_url}/chat/completions", json={**body, "stream": True}, headers=auth) as s:
        streamed_id = s.headers["x-request-id"]
        s.read()
    refused = httpx.get(f"{stack.base_url}/models")
    ids = [ok.headers["x-request-id"], streamed_id, refused.headers["x-request-id"]]
    assert all(i.startswith("req_") for i in ids) and len(set(ids)) == 3

    def claimed() -> set[str]:
        with psycopg.connect(database_url) as conn:
            return {r[0] for r in conn.execute("SELECT request_id FROM usage_request_claims")}
    wait_for(lambda: {ids[0], ids[1]} <= claimed())


def test_an_address_sending_many_unknown_keys_is_throttled(stack: Stack) -> None:
    from edge.gateway.proxy import BAD_KEY_POLICY  # noqa: PLC0415

    with httpx.Client(base_url=stack.base_url, timeout=10) as http:
        def models(secret: str) -> httpx.Response:
            return http.get("/models", headers={"authorization": f"Bearer {secret}"})

        for i in range(BAD_KEY_POLICY.free_failures - 1):
            assert models(f"sk-lw-guess{i:04d}" + "x" * 40).status_code == 401
        assert models(stack.secret).status_code == 200  # a revoked or good key is no guess
        assert models("sk-lw-one-more-guess" + "x" * 40).status_code == 401  # this one reaches the limit
        locked = models(stack.secret)  # now even a right key learns nothing from this address
        assert locked.status_code == 429 and locked.json()["error"]["code"] == "too_many_invalid_keys"
        assert 1 <= int(locked.headers["retry-after"]) <= BAD_KEY_POLICY.first_lock_s
        with pytest.raises(openai.RateLimitError, match="invalid API keys"):
            client(stack).models.list()
