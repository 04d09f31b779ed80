"""A small OpenAI-compatible upstream for tests and benchmarks, steerable per request.

Run: `python -m tests.fake_upstream --port 9100 [--no-usage]`. Extra request fields steer it:
`fake_tokens` (completion tokens, default 8, capped by max_tokens), `fake_prompt_tokens` (the prompt
tokens it reports; default a quarter of the prompt's JSON), `fake_delay_ms` (per token, after the previous one was sent),
`fake_steady` (true: a stream's n-th token leaves n × delay after its headers instead, a steady clock
like a model server's decoding steps at a constant rate, so that a late send does not push every later
token back; a saturated upstream then catches up in bursts rather than slowing its streams down),
`fake_fail`: "500" (error before any byte), "400" (a refusal), "cut" (stream breaks off midway),
"no_done" (stream ends without [DONE]), "hang" (headers, then silence), "malformed" (bad JSON), "bad_utf8"
(a body, or one stream event, that is not UTF-8),
"slow_headers" (sleeps before answering). `--no-usage` ignores include_usage, like llama.cpp's server.

`--loop asyncio` serves on asyncio's own event loop, whose timers keep the float clock: uvloop's
(the default when installed) round every delay to whole milliseconds of a cached clock, so a stream's
first token lands on a 1 ms grid and a fraction of a millisecond more before a request arrives can cost
a whole one (what `scripts/bench_gateway.py` measures as time to first token).

Watching streams: a stream with `fake_tag` (any string) is recorded under that tag, and stops generating
as soon as its client (the gateway) closes the connection, as a real inference server does;
`fake_hold_after` (with a tag) pauses it after that many tokens until `POST /fake/release/TAG` or the
client goes away. `GET /fake/streams` answers the records: {tag: {"planned", "sent", "client_gone",
"finished"}}, where `sent` counts the token events sent and `client_gone` means the client went away
before the last one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

import uvicorn

NO_USAGE = False
HOLD_MAX_S = 120.0
STREAMS: dict[str, dict[str, Any]] = {}  # the tagged streams, by tag
RELEASES: dict[str, asyncio.Event] = {}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    if scope["method"] == "GET" and path == "/fake/streams":
        await _json(send, 200, STREAMS)
        return
    if scope["method"] == "POST" and path.startswith("/fake/release/"):
        RELEASES.setdefault(path.removeprefix("/fake/release/"), asyncio.Event()).set()
        await _json(send, 200, {"released": True})
        return
    if scope["method"] == "GET" and path == "/v1/models":
        await _json(send, 200, {"object": "list", "data": [{"id": "fake", "object": "model", "created": 0,
                                                           "owned_by": "fake"}]})
        return
    try:
        request = json.loads(body)
    except ValueError:
        await _json(send, 400, {"error": {"message": "bad json", "type": "invalid_request_error"}})
        return
    fail = request.get("fake_fail")
    if fail == "slow_headers":
        await asyncio.sleep(float(request.get("fake_sleep_s", 30)))
    if fail == "500":
        await _json(send, 500, {"error": {"message": "upstream exploded", "type": "server_error"}})
        return
    if fail == "400":
        await _json(send, 400, {"error": {"message": "This model's maximum context length is 8 tokens.",
                                          "type": "invalid_request_error", "param": "messages", "code": None}})
        return
    if path == "/v1/embeddings":
        inputs = request["input"] if isinstance(request["input"], list) else [request["input"]]
        tokens = sum(len(str(i)) // 4 + 1 for i in inputs)
        data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))]
        await _json(send, 200, {"object": "list", "data": data, "model": request["model"],
                                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        return
    await _complete(send, request, chat=path == "/v1/chat/completions", receive=receive)


async def _complete(send: Any, request: dict[str, Any], *, chat: bool, receive: Any = None) -> None:
    prompt_tokens = int(request.get("fake_prompt_tokens") or len(json.dumps(request.get("messages")
                                                                            or request.get("prompt"))) // 4 + 1)
    tokens = int(request.get("fake_tokens", 8))
    limit = request.get("max_completion_tokens") or request.get("max_tokens")
    finish = "stop"
    if limit is not None and tokens > limit:
        tokens, finish = int(limit), "length"
    delay = float(request.get("fake_delay_ms", 0)) / 1000
    fail = request.get("fake_fail")
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": request["model"],
            "system_fingerprint": "fake"}
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
    if not request.get("stream"):
        if fail == "malformed":
            await _raw(send, 200, b'{"id": "x", "choices": [', "application/json")
            return
        if fail == "bad_utf8":
            await _raw(send, 200, b'{"id": "\xff\xfe", "choices": []}', "application/json")
            return
        await asyncio.sleep(delay * tokens)
        text = "tok " * tokens
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                   "logprobs": None} if chat else {"index": 0, "text": text, "finish_reason": finish,
                                                   "logprobs": None})
        await _json(send, 200, {**base, "object": "chat.completion" if chat else "text_completion",
                                "choices": [choice], **({} if NO_USAGE else {"usage": usage})})
        return
    tag = request.get("fake_tag")
    if isinstance(tag, str) and receive is not None:
        await _watched_stream(send, receive, request, tag, tokens, chat=chat, base=base, finish=finish,
                              usage=usage)
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    kind = "chat.completion.chunk" if chat else "text_completion"
    if fail == "hang":
        await asyncio.sleep(3600)
    loop = asyncio.get_running_loop()
    start, steady = loop.time(), request.get("fake_steady") is True
    for i in range(tokens):
        if fail == "cut" and i == tokens // 2:
            raise ConnectionResetError("cut")  # uvicorn drops the connection mid-body
        if delay:
            await asyncio.sleep(max(0.0, start + (i + 1) * delay - loop.time()) if steady else delay)
        delta = ({"role": "assistant", "content": "tok "} if i == 0 else {"content": "tok "}) if chat else None
        choice = {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None} if chat else \
            {"index": 0, "text": "tok ", "finish_reason": None, "logprobs": None}
        await _event(send, {**base, "object": kind, "choices": [choice]})
        if fail == "bad_utf8" and i == 0:
            await send({"type": "http.response.body", "body": b'data: {"id": "\xff", "choices": [{"delta": '
                        b'{"content": "\xfe"}}]}\n\n', "more_body": True})
    last = {"index": 0, "delta": {}, "finish_reason": finish, "logprobs": None} if chat else \
        {"index": 0, "text": "", "finish_reason": finish, "logprobs": None}
    await _event(send, {**base, "object": kind, "choices": [last]})
    options = request.get("stream_options") or {}
    if options.get("include_usage") and not NO_USAGE:
        await _event(send, {**base, "object": kind, "choices": [], "usage": usage})
    if fail != "no_done":
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _watched_stream(send: Any, receive: Any, request: dict[str, Any], tag: str, tokens: int, *, chat: bool,
                          base: dict[str, Any], finish: str, usage: dict[str, int]) -> None:
    """A stream recorded under `tag` that stops as soon as its client goes away (see the module doc)."""
    record = STREAMS[tag] = {"planned": tokens, "sent": 0, "client_gone": False, "finished": False}
    release = RELEASES.setdefault(tag, asyncio.Event())
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()
    watcher = asyncio.ensure_future(watch())
    delay = float(request.get("fake_delay_ms", 0)) / 1000
    hold_after = request.get("fake_hold_after")
    kind = "chat.completion.chunk" if chat else "text_completion"
    try:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(tokens):
            if i and i == hold_after:
                waits = {asyncio.ensure_future(release.wait()), asyncio.ensure_future(gone.wait())}
                _, pending = await asyncio.wait(waits, timeout=HOLD_MAX_S, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
            elif delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gone.wait(), delay)
            if gone.is_set():
                record["client_gone"] = True
                return
            delta = ({"role": "assistant", "content": "tok "} if i == 0 else {"content": "tok "}) if chat else None
            choice = {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None} if chat else \
                {"index": 0, "text": "tok ", "finish_reason": None, "logprobs": None}
            await _event(send, {**base, "object": kind, "choices": [choice]})
            record["sent"] = i + 1
        last = {"index": 0, "delta": {}, "finish_reason": finish, "logprobs": None} if chat else \
            {"index": 0, "text": "", "finish_reason": finish, "logprobs": None}
        await _event(send, {**base, "object": kind, "choices": [last]})
        options = request.get("stream_options") or {}
        if options.get("include_usage") and not NO_USAGE:
            await _event(send, {**base, "object": kind, "choices": [], "usage": usage})
        record["finished"] = True
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        watcher.cancel()


async def _event(send: Any, payload: dict[str, Any]) -> None:
    data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _json(send: Any, status: int, payload: dict[str, Any]) -> None:
    await _raw(send, status, json.dumps(payload).encode(), "application/json")


async def _raw(send: Any, status: int, body: bytes, content_type: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    global NO_USAGE  # noqa: PLW0603 - a process-wide switch set once from the command line
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-usage", action="store_true")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    args = parser.parse_args()
    NO_USAGE = args.no_usage
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, loop=args.loop)


if __name__ == "__main__":
    main()
