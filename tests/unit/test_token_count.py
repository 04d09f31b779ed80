"""Counting tokens when a backend reports none: prompts, generated text, fallbacks, usage reports."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from adapters.backends.token_count import (
    CountFailed,
    Estimate,
    LocalTokenizer,
    Prompt,
    count_usage,
    estimate_completion,
    estimate_prompt,
)
from edge.gateway.metering import Outcome, collect_text, reported_usage


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_prompts_of_each_endpoint() -> None:
    chat = Prompt.of("chat", {"messages": [{"role": "user", "content": "hi"}, "junk"]})
    assert chat.messages == [{"role": "user", "content": "hi"}]
    assert Prompt.of("completions", {"prompt": ["a", "b"]}).texts == ("a", "b")
    ids = Prompt.of("embeddings", {"input": [[1, 2, 3], [4]]})
    assert ids.token_ids == 4 and ids.texts == ()
    assert Prompt.of("embeddings", {"input": [5, 6]}).token_ids == 2


def test_the_estimate_follows_the_documented_rule() -> None:
    # 3 for the reply + per message (4 + ceil(bytes / 4)); "你好" is 6 bytes of UTF-8
    messages = [{"role": "system", "content": "12345678"}, {"role": "user", "content": "你好"}]
    assert estimate_prompt(Prompt(messages=messages)) == 3 + (4 + 2) + (4 + 2)
    assert estimate_prompt(Prompt(texts=("abcde",), token_ids=7)) == 7 + 2
    # streamed chunks of one byte each count one token per chunk, more than a quarter of their bytes
    assert estimate_completion(["a"] * 10) == 10
    assert estimate_completion(["x" * 40]) == 10


def test_a_local_tokenizer_counts_through_the_chat_template(tiny_model_dir: Path) -> None:
    reference = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    counter = LocalTokenizer(tiny_model_dir / "tokenizer.json")
    messages = [{"role": "system", "content": "count to ten"}, {"role": "user", "content": "hello 你好"}]
    rendered = "<s><|system|>\ncount to ten</s>\n<|user|>\nhello 你好</s>\n<|assistant|>\n"
    expected = len(reference.encode(rendered, add_special_tokens=False).ids)
    assert run(counter.prompt_tokens(Prompt(messages=messages))) == expected
    assert run(counter.text_tokens("the sea 世界")) == len(reference.encode("the sea 世界").ids)
    long_text = "write a short poem about the sea " * 400  # long enough to be encoded off the event loop
    assert run(counter.text_tokens(long_text)) == len(reference.encode(long_text).ids)


def test_a_broken_tokenizer_file_is_a_clear_failure(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(CountFailed, match="cannot load the tokenizer file"):
        LocalTokenizer(bad)


class _Failing:
    async def prompt_tokens(self, prompt: Prompt) -> int:
        raise CountFailed("down")

    async def text_tokens(self, text: str) -> int:
        raise CountFailed("down")


def test_a_failing_counter_falls_back_to_the_estimate() -> None:
    prompt = Prompt(messages=[{"role": "user", "content": "abcd"}])
    assert run(count_usage(_Failing(), prompt, ["ab", "cd"])) == (3 + 4 + 1, 2)
    assert run(count_usage(Estimate(), prompt, [])) == (8, 0)


def test_generated_text_is_collected_from_chunks_and_whole_responses() -> None:
    outcome = Outcome()
    collect_text(outcome, b'{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}')
    collect_text(outcome, b'{"choices":[{"index":0,"delta":{"content":"Hel"}},{"index":1,"delta":{"content":"lo"}}]}')
    collect_text(outcome, b'{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":"{}"}}]}}]}')
    collect_text(outcome, b'{"choices":[{"index":0,"text":" world","finish_reason":null}]}')
    collect_text(outcome, b'{"choices":[{"message":{"role":"assistant","content":"whole"}}]}')
    collect_text(outcome, b'{"choices":[{"delta":{"content":42}}]}')  # malformed: ignored, never raises
    collect_text(outcome, b"not json at all")
    assert outcome.text == ["Hel", "lo", "f", "{}", " world", "whole"]


@pytest.mark.parametrize(("usage", "expected"), [
    ({"prompt_tokens": 5, "completion_tokens": 7}, (5, 0, 7)),
    ({"prompt_tokens": 5, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 3}}, (5, 3, 7)),
    ({"prompt_tokens": 5, "completion_tokens": None, "prompt_tokens_details": None}, (5, 0, 0)),
    ({"prompt_tokens": True, "completion_tokens": 7}, None),
    ({"prompt_tokens": -1, "completion_tokens": 7}, None),
    ({"prompt_tokens": 2, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 3}}, None),
    ({"prompt_tokens": 10**12, "completion_tokens": 7}, None),
    ({"completion_tokens": 7}, None),
    (None, None),
])
def test_only_well_formed_usage_reports_are_believed(usage: object, expected: object) -> None:
    assert reported_usage(usage) == expected  # type: ignore[arg-type]
