"""A protocol-faithful Ollama server for tests, written from Ollama's published API documentation.

Run: `python -m tests.fake_ollama --port 11500`. Serves /api/chat, /api/generate (NDJSON streams ending
in a `done` object with counts and durations), /api/embed, /api/tags, /api/show, and Ollama's error
objects. Each answer has 8 tokens ("tok "), or `options.num_predict` of them with done_reason "length";
with `tools` it calls the first tool; with `format` it answers JSON; images are counted in the reply.
The model "missing" does not exist; "breaks" fails mid-stream with an error object, as Ollama does. Every request body is kept at GET /_requests for assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import uvicorn

NATURAL_TOKENS = 8
SEEN: list[dict[str, Any]] = []


def _now() -> str:
    return datetime.now(UTC).isoformat()


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
    path, method = scope["path"], scope["method"]
    if method == "GET" and path == "/api/tags":
        await _json(send, 200, {"models": [{"name": "llama3.2:1b", "model": "llama3.2:1b", "modified_at": _now(),
                                            "size": 1, "digest": "0" * 64, "details": {"family": "llama"}}]})
        return
    if method == "GET" and path == "/_requests":
        await _json(send, 200, {"requests": SEEN})
        return
    try:
        request = json.loads(body)
    except ValueError:
        await _json(send, 400, {"error": "invalid JSON"})
        return
    SEEN.append({"path": path, **request})
    if request.get("model") == "missing":
        await _json(send, 404, {"error": f'model "{request["model"]}" not found, try pulling it first'})
        return
    if path == "/api/show":
        await _json(send, 200, {"details": {"family": "llama"}, "model_info": {}})
    elif path == "/api/embed":
        inputs = request["input"] if isinstance(request["input"], list) else [request["input"]]
        await _json(send, 200, {"model": request["model"], "embeddings": [[0.1, 0.2] for _ in inputs],
                                "total_duration": 1000, "load_duration": 10,
                                "prompt_eval_count": sum(len(str(i).split()) + 1 for i in inputs)})
    elif path in ("/api/chat", "/api/generate"):
        await _answer(send, request, chat=path == "/api/chat")
    else:
        await _json(send, 404, {"error": "404 page not found"})


async def _answer(send: Any, request: dict[str, Any], *, chat: bool) -> None:
    options = request.get("options") or {}
    limit = options.get("num_predict")
    tokens = min(NATURAL_TOKENS, limit) if limit is not None else NATURAL_TOKENS
    reason = "length" if limit is not None and limit < NATURAL_TOKENS else "stop"
    images = sum(len(m.get("images") or []) for m in request.get("messages") or [])
    prompt_tokens = len(json.dumps(request.get("messages") or request.get("prompt"))) // 4 + 1
    pieces = ['{"ok": true}'] if request.get("format") else ["tok "] * tokens
    if images:
        pieces = [f"{images} image(s) ", *pieces[1:]]
    calls = [{"function": {"name": request["tools"][0]["function"]["name"], "arguments": {"city": "Taipei"}}}] \
        if chat and request.get("tools") else []
    final = {"model": request["model"], "created_at": _now(), "done": True, "done_reason": reason,
             "total_duration": 5000, "load_duration": 100, "prompt_eval_count": prompt_tokens,
             "prompt_eval_duration": 100, "eval_count": len(pieces), "eval_duration": 1000}
    if not request.get("stream", True):
        text = "".join(pieces)
        part = {"message": {"role": "assistant", "content": "" if calls else text, **({"tool_calls": calls}
                                                                                      if calls else {})}} \
            if chat else {"response": text, "context": [1, 2, 3]}
        await _json(send, 200, {**final, **part})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/x-ndjson")]})
    if calls:
        pieces = []
        await _line(send, {"model": request["model"], "created_at": _now(), "done": False,
                           "message": {"role": "assistant", "content": "", "tool_calls": calls}})
    for i, piece in enumerate(pieces):
        await asyncio.sleep(0)
        if request["model"] == "breaks" and i == 3:
            await _line(send, {"error": "an error was encountered while running the model: CUDA error"})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        part = {"message": {"role": "assistant", "content": piece}} if chat else {"response": piece}
        await _line(send, {"model": request["model"], "created_at": _now(), "done": False, **part})
    ending = {"message": {"role": "assistant", "content": ""}} if chat else {"response": "", "context": [1, 2, 3]}
    await _line(send, {**final, **ending})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _line(send: Any, payload: dict[str, Any]) -> None:
    await send({"type": "http.response.body", "body": json.dumps(payload).encode() + b"\n", "more_body": True})


async def _json(send: Any, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
