"""OpenAI-compatible upstreams (vLLM's server, OpenAI, other gateways, llama.cpp's server).

Imports: stdlib, httpx, msgspec. Builds the upstream request (the upstream's model name, usage
always requested in streams, the upstream credential) and maps transport failures to OpenAI-shaped
errors. One pooled client per process (`adapters.backends.http1`) serves every deployment.
"""

from __future__ import annotations

import resource
from typing import Any

import httpx
import msgspec

from adapters.backends.http1 import Http1Client, Request

CONNECT_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 30.0
POOL_TIMEOUT_S = 10.0
CONNECTIONS_MAX = 20_000

_encoder = msgspec.json.Encoder()

ENDPOINT_PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}


def make_client() -> Http1Client:
    # each relayed request holds two descriptors (the client's socket and the upstream's): the pool may use
    # the larger part of what the process is allowed, leaving room for the database, files and listeners
    allowed = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    connections = CONNECTIONS_MAX if allowed == resource.RLIM_INFINITY else min(CONNECTIONS_MAX, allowed // 2 - 100)
    return Http1Client(connections_max=max(connections, 10), pool_timeout_s=POOL_TIMEOUT_S)


def upstream_url(base_url: str, endpoint: str) -> str:
    """`base_url` names the API root (…/v1 for vLLM and OpenAI)."""
    return base_url + ENDPOINT_PATHS[endpoint]


def upstream_body(payload: dict[str, Any], upstream_model: str, *, stream: bool) -> bytes:
    body = dict(payload)
    body["model"] = upstream_model
    if stream:
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return _encoder.encode(body)


def build_request(client: Http1Client, *, url: str, body: bytes, credential: str | None,
                  timeout_s: float, request_id: str) -> Request:
    # identity: the relay passes bytes through and must not receive a compressed body it would not decode
    headers = {"content-type": "application/json", "accept": "application/json", "accept-encoding": "identity",
               "x-request-id": upstream_request_id(request_id)}
    if credential:
        headers["authorization"] = f"Bearer {credential}"
    timeout = httpx.Timeout(connect=CONNECT_TIMEOUT_S, read=timeout_s, write=WRITE_TIMEOUT_S, pool=POOL_TIMEOUT_S)
    return client.build_request("POST", url, content=body, headers=headers, timeout=timeout)


def upstream_request_id(request_id: str) -> str:
    """Our request id in UUID form: some servers (llama-cpp-python's) refuse an x-request-id that is not one."""
    hex_id = request_id.removeprefix("req_")
    if len(hex_id) != 32:
        return request_id
    return f"{hex_id[:8]}-{hex_id[8:12]}-{hex_id[12:16]}-{hex_id[16:20]}-{hex_id[20:]}"


def error_message(status: int, body: bytes) -> str:
    """The upstream's own message for a refusal (OpenAI's shape or plain text), bounded."""
    try:
        decoded = msgspec.json.decode(body[:65_536])
    except (msgspec.DecodeError, UnicodeDecodeError):
        text = body[:500].decode("utf-8", "replace").strip()
        return text or f"upstream answered {status}"
    if isinstance(decoded, dict):
        error = decoded.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:2000]
        if isinstance(error, str):
            return error[:2000]
        if isinstance(decoded.get("detail"), str):
            return str(decoded["detail"])[:2000]
        if isinstance(decoded.get("message"), str):
            return str(decoded["message"])[:2000]
    return f"upstream answered {status}"
