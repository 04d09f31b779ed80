"""Reading an upstream's Server-Sent Events stream: split events, find usage and text, rename the model.

Imports: stdlib, msgspec, edge.gateway.metering. Events pass through as bytes; only the fields that
metering needs are decoded (usage, and the generated text in case no usage comes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from edge.gateway.metering import Outcome, collect_text

EVENT_BYTES_MAX = 1 << 20  # one event larger than 1 MiB is not a token delta: refuse the stream
DONE = b"data: [DONE]"
_decoder = msgspec.json.Decoder()


@dataclass
class StreamState(Outcome):
    """What the relay learned from the stream so far."""

    finished: bool = False
    done: bool = False
    stream_id: str | None = None  # the first chunk's id, object and created: a usage chunk of our own repeats them
    stream_object: str = "chat.completion.chunk"
    created: int | None = None
    buffer: bytearray = field(default_factory=bytearray)


class StreamTooLarge(ValueError):
    """An event exceeded `EVENT_BYTES_MAX`."""


def split_events(state: StreamState, chunk: bytes) -> list[bytes]:
    """Complete events (without their blank-line terminator) from the bytes received so far."""
    state.buffer += chunk
    if b"\r\n" in state.buffer:
        state.buffer[:] = state.buffer.replace(b"\r\n", b"\n")
    events: list[bytes] = []
    while True:
        end = state.buffer.find(b"\n\n")
        if end < 0:
            if len(state.buffer) > EVENT_BYTES_MAX:
                raise StreamTooLarge("an upstream event exceeded 1 MiB")
            return events
        events.append(bytes(state.buffer[:end]))
        del state.buffer[: end + 2]


class _Head(msgspec.Struct):
    id: str | None = None
    object: str | None = None
    created: int | None = None


_head_decoder = msgspec.json.Decoder(_Head)


def inspect(state: StreamState, event: bytes) -> bool:
    """Record what `event` tells; True when it is a usage-only chunk (empty choices, usage set)."""
    if event.startswith(DONE):
        state.done = True
        return False
    if state.stream_id is None:
        _read_head(state, event)
    if b'"usage":{' in event or b'"usage": {' in event:
        payload = _payload(event)
        if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
            state.usage = payload["usage"]
            choices = payload.get("choices")
            if choices:
                state.content_events += 1
                collect_text(state, event.partition(b"data:")[2])
            return not choices
    if b'"finish_reason":"' in event or b'"finish_reason": "' in event:
        state.finished = True
    if b'"content":' in event or b'"text":' in event or b'"tool_calls":' in event:
        state.content_events += 1
        collect_text(state, event.partition(b"data:")[2])
    return False


def _read_head(state: StreamState, event: bytes) -> None:
    try:
        head = _head_decoder.decode(event.partition(b"data:")[2])
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return
    state.stream_id = head.id or ""
    state.stream_object = head.object or state.stream_object
    state.created = head.created


def _payload(event: bytes) -> Any:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                return _decoder.decode(line[5:].strip())
            except (msgspec.DecodeError, UnicodeDecodeError):
                return None
    return None


class Renamer:
    """Clients see the model name they asked for, not the upstream's (patterns encoded once)."""

    def __init__(self, upstream_model: str, model: str) -> None:
        old, new = msgspec.json.encode(upstream_model), msgspec.json.encode(model)
        self.pairs = [] if old == new else [(b'"model":' + old, b'"model":' + new),
                                             (b'"model": ' + old, b'"model": ' + new)]

    def __call__(self, data: bytes) -> bytes:
        for old, new in self.pairs:
            data = data.replace(old, new)
        return data


def rename_model(data: bytes, upstream_model: str, model: str) -> bytes:
    return Renamer(upstream_model, model)(data)
