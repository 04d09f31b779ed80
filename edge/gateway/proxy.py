"""The `/v1` request path: parse, authenticate, admit, forward, relay, meter — in that order.

Imports: stdlib, httpx, msgspec, adapters, domain, edge.gateway. A raw ASGI app (mounted in the
Litestar service) so that nothing between the socket and the upstream costs more than it must.
Every admitted request ends in `_finish`, exactly once, whatever happened: its usage entry goes to
the spool and its reservation is settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec

from adapters.backends import ollama, openai_compat
from adapters.backends.http1 import Http1Client, UpstreamResponse
from adapters.backends.token_count import Counter
from adapters.spool import Spool
from domain.api_key import KeyStatus, hash_secret, looks_like_secret
from domain.catalog import BackendKind
from domain.usage import UsageEntry
from edge.gateway import errors, health, openapi
from edge.gateway.admission import Admission, Ticket
from edge.gateway.catalog import Catalog, CatalogModel, Route
from edge.gateway.errors import GatewayError
from edge.gateway.key_index import KeyIndex, KeyRecord
from edge.gateway.metering import Outcome, collect_text, counter_for, estimate, measure, usage_object
from edge.gateway.metrics import Metrics
from edge.gateway.relay import relay_stream
from edge.gateway.sse import StreamState, rename_model
from edge.gateway.validation import check_payload
from edge.throttle import FailureThrottle, Policy

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

log = logging.getLogger(__name__)
BODY_BYTES_MAX = 16 * 1024 * 1024
RESPONSE_BYTES_MAX = 64 * 1024 * 1024
DEFAULT_COMPLETION_TOKENS = 4096  # reserved when a request sets no max_tokens (documented bound)
BYTES_PER_TOKEN_ESTIMATE = 4
ATTEMPTS_MAX = 3
ENDPOINTS = {"/chat/completions": "chat", "/completions": "completions", "/embeddings": "embeddings"}
_decoder = msgspec.json.Decoder()
_NO_KEY = "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."  # noqa: E501
_BAD_KEY = "Incorrect API key provided. You can find your API keys in the portal."
_KEY_STATUS_MESSAGES = {
    KeyStatus.REVOKED: ("This API key has been revoked.", "key_revoked"),
    KeyStatus.EXPIRED: ("This API key has expired.", "key_expired"),
    KeyStatus.NOT_YET_VALID: ("This API key is not valid yet.", "key_not_yet_valid"),
}

# An address that sends 30 unknown keys within a minute waits 10 s, doubling per further one up to 5
# minutes. Keys are 256 random bits, so this guards the logs and the CPU more than the keys.
BAD_KEY_POLICY = Policy(free_failures=30, window_s=60.0, first_lock_s=10.0, lock_max_s=300.0)


@dataclass
class Call:
    """One admitted inference request on its way through."""

    request_id: str
    endpoint: str
    payload: dict[str, Any]
    model: CatalogModel
    ticket: Ticket
    started: datetime
    prompt_estimate: int
    route: Route | None = None
    counter: Counter | None = None


class Gateway:
    def __init__(self, *, index: KeyIndex, catalog: Catalog, admission: Admission, spool: Spool,
                 client: Http1Client, pepper: bytes, metrics: Metrics) -> None:
        self.index, self.catalog, self.admission, self.spool = index, catalog, admission, spool
        self.client, self.pepper, self.metrics = client, pepper, metrics
        self.bad_keys = FailureThrottle(BAD_KEY_POLICY)
        self.calls_open = 0  # admitted and not yet metered: shutdown waits for these before the spool stops
        self._none_open = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        request_id = "req_" + os.urandom(16).hex()  # random like uuid4, at a seventh of the cost
        path = scope["path"].removeprefix("/v1")
        if not path.startswith("/models/"):  # a model id is decoded already: `%2F` must stay part of it
            path = path.rstrip("/") or "/"
        status = 0
        scope["lwapi.model"] = ""

        async def send_seen(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self._dispatch(scope, receive, send_seen, request_id, path)
        except GatewayError as e:
            await respond(send_seen, e.status, e.body(), request_id, e.headers)
        except asyncio.CancelledError:
            # the server cancels what is still open when the shutdown grace period ends; the request is
            # metered and its client told by now, so this is the request's end, not a fault to trace
            log.warning("request %s cut at shutdown", request_id)
        finally:
            self.metrics.observe(ENDPOINTS.get(path, "other"), scope["lwapi.model"], status,
                                 time.perf_counter() - started)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send, request_id: str, path: str) -> None:
        method = scope["method"]
        if method == "GET" and path in ("/models", "/models/"):
            await self._list_models(scope, send, request_id)
        elif method == "GET" and path.startswith("/models/"):
            await self._get_model(scope, send, request_id, path[len("/models/"):])
        elif path in ENDPOINTS and method == "POST":
            await self._inference(scope, receive, send, request_id, ENDPOINTS[path])
        elif method == "GET" and path == "/openapi.json":
            await respond(send, 200, openapi.DOCUMENT_JSON, request_id)
        elif path in ENDPOINTS:
            raise GatewayError(405, f"Use POST for /v1{path}.", code="method_not_allowed", headers={"allow": "POST"})
        else:
            raise GatewayError(404, f"Unknown request URL: {method} /v1{path}.", code="unknown_url")

    # ---- keys and models

    def authenticate(self, scope: Scope) -> KeyRecord:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if not header[:7].lower() == b"bearer ":
            raise errors.unauthorized(_NO_KEY, code=None)
        address = (scope.get("client") or ("",))[0]
        if wait_s := self.bad_keys.wait_s(address):
            # refused before the key is looked at: while locked, a guess learns nothing, right or wrong
            raise GatewayError(429, f"Too many requests with invalid API keys from this address. Please try again "
                                    f"in {wait_s}s.", "requests", "too_many_invalid_keys",
                               headers={"retry-after": str(wait_s)})
        secret = header[7:].strip().decode("latin-1")
        key = self.index.find(hash_secret(secret, self.pepper)) if looks_like_secret(secret) else None
        if key is None:
            self.bad_keys.failed(address)
            raise errors.unauthorized(_BAD_KEY)
        status = key.status(datetime.now(UTC))
        if status in _KEY_STATUS_MESSAGES:
            raise errors.unauthorized(*_KEY_STATUS_MESSAGES[status])
        if key.project_id in self.index.archived_projects:
            raise errors.unauthorized("The project of this API key is archived.", "project_archived")
        return key

    def _visible(self, key: KeyRecord) -> list[CatalogModel]:
        return [m for name, m in sorted(self.catalog.models.items()) if key.allows(name)]

    async def _list_models(self, scope: Scope, send: Send, request_id: str) -> None:
        key = self.authenticate(scope)
        data = [_model_object(m) for m in self._visible(key)]
        await respond(send, 200, msgspec.json.encode({"object": "list", "data": data}), request_id)

    async def _get_model(self, scope: Scope, send: Send, request_id: str, name: str) -> None:
        key = self.authenticate(scope)
        model = self.catalog.get(name)
        if model is None or not key.allows(name):
            raise errors.model_not_found(name)
        await respond(send, 200, msgspec.json.encode(_model_object(model)), request_id)

    # ---- inference

    async def _inference(self, scope: Scope, receive: Receive, send: Send, request_id: str, endpoint: str) -> None:
        body = await read_body(scope, receive)
        key = self.authenticate(scope)
        payload = parse_payload(body, endpoint)
        model = self.catalog.get(payload["model"])
        scope["lwapi.model"] = payload["model"] if model is not None else "_unknown"
        if model is None:
            raise errors.model_not_found(payload["model"])
        if not key.allows(model.name):
            raise GatewayError(403, f"This API key is not allowed to use the model `{model.name}`.",
                               "invalid_request_error", "model_not_allowed", "model")
        started = datetime.now(UTC)
        prices = model.price_at(started)
        if prices is None:
            raise GatewayError(503, f"The model `{model.name}` has no price in force yet.", "server_error",
                               "model_not_priced")
        prompt_estimate = max(1, len(body) // BYTES_PER_TOKEN_ESTIMATE)
        completion_max = completion_limit(payload, endpoint)
        # Credits are reserved for at most one prompt token per byte of the body: a token always carries at
        # least one byte of text, and the JSON around the messages outweighs what a chat template adds. The
        # tokens-per-minute limit takes the likely count instead, so it does not refuse four times too early.
        ticket = await self.admission.admit(key, request_id, prompt_estimate + completion_max, prices, len(body),
                                            completion_max)
        call = Call(request_id, endpoint, payload, model, ticket, started, prompt_estimate)
        outcome = Outcome()
        self.calls_open += 1
        self._none_open.clear()
        try:
            response = await self._open_upstream(call)
            if payload.get("stream") is True:
                outcome = stream = StreamState()
                await relay_stream(call, response, receive, send, ticket.headers, stream,
                                   lambda: self._meter(call, stream))
            else:
                outcome = await self._relay_whole(call, response, send)
        finally:
            try:
                await self._finish(call, outcome)
            finally:
                self.calls_open -= 1
                if not self.calls_open:
                    self._none_open.set()

    async def drained(self, timeout_s: float) -> bool:
        """Wait until every admitted request is metered (cut streams finish metering after a cancel)."""
        if self.calls_open:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._none_open.wait(), timeout_s)
        return not self.calls_open

    async def _open_upstream(self, call: Call) -> UpstreamResponse:
        """Send to the least busy deployment; on failure before any byte, try the next one."""
        failure: GatewayError = errors.upstream_unavailable()
        stream = call.payload.get("stream") is True
        for route in call.model.ranked_routes()[:ATTEMPTS_MAX]:
            ollama_api = route.backend is BackendKind.OLLAMA
            try:
                url, body = _upstream_call(route, call, stream=stream)
            except ollama.UnsupportedRequest as e:
                raise errors.bad_request(str(e)) from None
            request = openai_compat.build_request(self.client, url=url, body=body, credential=route.credential(),
                                                  timeout_s=route.timeout_s, request_id=call.request_id)
            route.in_flight += 1
            try:
                response: UpstreamResponse = await self.client.send(request, stream=True)
                if ollama_api:
                    response = ollama.OllamaResponse(response, call.endpoint, stream=stream,
                                                     model=route.upstream_model, request_id=call.request_id)
            except httpx.TimeoutException:
                route.in_flight -= 1
                health.mark_failed(route)
                failure = errors.upstream_timeout()
                continue
            except httpx.TransportError:
                route.in_flight -= 1
                health.mark_failed(route)
                failure = errors.upstream_unavailable()
                continue
            if response.status_code < 400:
                health.mark_healthy(route)
                call.route, call.counter = route, counter_for(route, self.client)
                return response
            detail = openai_compat.error_message(response.status_code, await _bounded(response, 65_536))
            await response.aclose()
            route.in_flight -= 1
            if response.status_code < 500:
                raise GatewayError(response.status_code, detail, "invalid_request_error", None)
            health.mark_failed(route)
            failure = errors.upstream_failed(502, f"The model's backend failed: {detail}")
        raise failure

    async def _relay_whole(self, call: Call, response: UpstreamResponse, send: Send) -> Outcome:
        try:
            data = await _bounded(response, RESPONSE_BYTES_MAX)
        except httpx.TimeoutException:
            raise errors.upstream_timeout() from None
        except httpx.TransportError:
            raise errors.upstream_failed() from None
        finally:
            await response.aclose()
        try:
            decoded = _decoder.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError):
            raise errors.upstream_failed(502, "The model's backend sent a malformed response.") from None
        usage = decoded.get("usage") if isinstance(decoded, dict) else None
        outcome = Outcome(usage if isinstance(usage, dict) else None, content_events=1)
        if outcome.usage is None and isinstance(decoded, dict) and call.counter is not None:
            # OpenAI's responses always carry usage: give the client the count it is charged for
            collect_text(outcome, data)
            outcome.measured = await measure(outcome, call.endpoint, call.payload, call.counter)
            prompt, _cached, completion, _estimated = outcome.measured
            decoded["usage"] = usage_object(call.endpoint, prompt, completion)
            data = msgspec.json.encode(decoded)
        assert call.route is not None
        body = rename_model(data, call.route.upstream_model, call.model.name)
        await self._meter(call, outcome)
        await respond(send, 200, body, call.request_id, call.ticket.headers)
        return outcome

    async def _finish(self, call: Call, outcome: Outcome) -> None:
        """Meter once (if the response did not already), and settle the reservation (also after failures)."""
        if call.route is not None:
            call.route.in_flight -= 1
        await self._meter(call, outcome)
        used, cost = outcome.charged or (0, 0)
        await self.admission.settle(call.ticket, used, cost)

    async def _meter(self, call: Call, outcome: Outcome) -> None:
        """The usage entry to the spool, once. A complete answer calls this before its last bytes leave, so
        that a client never holds a whole answer whose charge a crash could lose."""
        if outcome.charged is not None or call.counter is None or not outcome.delivered:
            return  # charged already, or no upstream answered, or nothing reached the client
        try:
            usage = await measure(outcome, call.endpoint, call.payload, call.counter)
        except asyncio.CancelledError:  # shut down while counting: the estimate goes on disk, then stop
            self._record(call, estimate(outcome, call.endpoint, call.payload))
            raise
        outcome.charged = (usage[0] + usage[2], self._record(call, usage))

    def _record(self, call: Call, usage: tuple[int, int, int, bool]) -> int:
        """The usage entry, on disk before anything else can be interrupted; returns its cost."""
        prompt, cached, completion, estimated = usage
        prices = call.model.price_at(call.started)
        assert prices is not None
        cost = prices.cost_credits(prompt, cached, completion)
        now_ms = int(time.time() * 1000)
        entry = UsageEntry(call.request_id, call.ticket.key.project_id, call.ticket.key.key_id, call.model.name,
                           call.route.name if call.route else "", prompt, cached, completion, cost,
                           min(int(call.started.timestamp() * 1000), now_ms), now_ms, estimated,
                           prices.prompt_per_mtok, prices.completion_per_mtok, prices.cached_per_mtok)
        self.spool.append(entry)
        self.metrics.count_tokens(call.model.name, prompt, completion)
        return cost


def _upstream_call(route: Route, call: Call, *, stream: bool) -> tuple[str, bytes]:
    """The URL and body for this deployment's API: OpenAI-compatible, or Ollama's native one."""
    if route.backend is BackendKind.OLLAMA:
        return route.base_url + ollama.PATHS[call.endpoint], ollama.upstream_body(call.payload, call.endpoint,
                                                                                 route.upstream_model)
    return (openai_compat.upstream_url(route.base_url, call.endpoint),
            openai_compat.upstream_body(call.payload, route.upstream_model, stream=stream))


def _model_object(model: CatalogModel) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": int(model.created_at.timestamp()),
            "owned_by": "lightweight-api"}


async def _bounded(response: UpstreamResponse, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:
            raise errors.upstream_failed(502, "The model's backend sent a response too large to relay.")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_body(scope: Scope, receive: Receive) -> bytes:
    declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
    if declared is not None and declared.isdigit() and int(declared) > BODY_BYTES_MAX:
        raise GatewayError(413, f"Request body too large: the limit is {BODY_BYTES_MAX} bytes.",
                           code="request_too_large")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise GatewayError(400, "The client disconnected.", code="client_disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > BODY_BYTES_MAX:
            raise GatewayError(413, f"Request body too large: the limit is {BODY_BYTES_MAX} bytes.",
                               code="request_too_large")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def parse_payload(body: bytes, endpoint: str) -> dict[str, Any]:
    try:
        payload = _decoder.decode(body)
    except RecursionError:
        raise errors.bad_request("The JSON body of your request is nested too deeply.") from None
    except (msgspec.DecodeError, UnicodeDecodeError):  # msgspec raises the latter for bad UTF-8 inside a string
        raise errors.bad_request("We could not parse the JSON body of your request. (HINT: This likely means "
                                 "you aren't using your HTTP library correctly.)") from None
    return check_payload(payload, endpoint)


def completion_limit(payload: dict[str, Any], endpoint: str) -> int:
    if endpoint == "embeddings":
        return 0
    limit = payload.get("max_completion_tokens") or payload.get("max_tokens") or DEFAULT_COMPLETION_TOKENS
    n = payload.get("n") or 1
    return int(limit) * int(n)


async def respond(send: Send, status: int, body: bytes, request_id: str,
                  headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"x-request-id", request_id.encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    with contextlib.suppress(OSError):
        await send({"type": "http.response.body", "body": body})

