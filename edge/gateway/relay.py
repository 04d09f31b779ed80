"""Relaying an upstream stream to the client as it arrives, and reading usage from what passed.

Imports: stdlib, httpx, edge.gateway. The upstream is always asked for usage; its final usage-only
chunk reaches the client only if the client asked (`stream_options.include_usage`). A client that
goes away cancels the upstream request at once; an upstream that breaks, stalls past its timeout or
ends without `[DONE]` gives the client a final error event. Either way the caller meters what was
generated.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import httpx
import msgspec

from adapters.backends.http1 import UpstreamResponse
from edge.gateway import errors
from edge.gateway.metering import measure, usage_object
from edge.gateway.sse import Renamer, StreamState, StreamTooLarge, inspect, split_events

if TYPE_CHECKING:
    from edge.gateway.proxy import Call, Receive, Send


async def relay_stream(call: Call, response: UpstreamResponse, receive: Receive, send: Send,
                       headers: dict[str, str], state: StreamState,
                       before_end: Callable[[], Awaitable[None]]) -> None:
    """Relay until the upstream ends or the client leaves; `state` holds what passed, also when the
    relay is cancelled (a shutdown past its grace period), so that the caller still meters it.
    `before_end` runs before the bytes that finish a complete stream leave (the caller meters there)."""
    raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-request-id", call.request_id.encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
    relay = asyncio.ensure_future(_pump(call, response, send, state, before_end))
    gone = asyncio.ensure_future(_client_gone(receive))
    try:
        await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        if not relay.done():  # the response is still open: end it with an error event, not a bare cut
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": errors.shutting_down().sse_event(),
                            "more_body": False})
        raise
    finally:
        for task in (relay, gone):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay
        await response.aclose()
    if relay.done() and not relay.cancelled() and relay.exception() is not None:
        raise relay.exception()  # type: ignore[misc]


async def _pump(call: Call, response: UpstreamResponse, send: Send, state: StreamState,
                before_end: Callable[[], Awaitable[None]]) -> None:
    assert call.route is not None
    wants_usage = _wants_usage(call.payload)
    rename = Renamer(call.route.upstream_model, call.model.name)
    failure: errors.GatewayError | None = None
    try:
        async for chunk in response.aiter_raw():
            out = []
            for event in split_events(state, chunk):
                usage_only = inspect(state, event)
                if state.done and wants_usage and state.usage is None:  # the backend sent none: ours, counted
                    out.append(await _counted_usage_event(call, state))
                if wants_usage or not usage_only:
                    out.append(event + b"\n\n")
            if out:
                if state.done:
                    await before_end()
                await send({"type": "http.response.body", "body": rename(b"".join(out)), "more_body": True})
            if state.done:
                break
    except httpx.TimeoutException:
        failure = errors.upstream_timeout()
    except (httpx.TransportError, StreamTooLarge):
        failure = errors.upstream_failed(502, "The model's backend stream broke off.")
    if failure is None and not state.done:
        failure = errors.upstream_failed(502, "The model's backend ended the stream without finishing it.")
    tail = failure.sse_event() if failure is not None else b""
    await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _counted_usage_event(call: Call, state: StreamState) -> bytes:
    """The usage chunk OpenAI would have sent, with the gateway's count (also what gets charged)."""
    assert call.counter is not None
    state.measured = await measure(state, call.endpoint, call.payload, call.counter)
    prompt, _cached, completion, _estimated = state.measured
    chunk = {"id": state.stream_id or f"chatcmpl-{call.request_id}", "object": state.stream_object,
             "created": state.created or int(call.started.timestamp()), "model": call.model.name, "choices": [],
             "usage": usage_object(call.endpoint, prompt, completion)}
    return b"data: " + msgspec.json.encode(chunk) + b"\n\n"


async def _client_gone(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _wants_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
