"""Schemathesis against the service's own OpenAPI document (`GET /v1/openapi.json`, issue 7).

The running service (fake upstream behind it) gets requests generated from the document for every
operation, in schemathesis's examples, coverage (boundary values, wrong types, missing fields, other
methods) and fuzzing phases: with the right key, with none and with unknown ones. Every answer must
come within seconds, never be a 5xx (the upstream is up), and be as documented: a status the
operation lists, its content type, headers and body schema (streamed events included). A valid
request for the served model must succeed; every refused request is charged nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckFunction
from schemathesis.pytest.lazy import get_all_tests

from edge.gateway import openapi, proxy
from edge.gateway.validation import INT_FIELDS
from tests.e2e.conftest import Stack

MODEL = "llama"  # the model the `stack` fixture serves
MAX_EXAMPLES = int(os.environ.get("LWAPI_CONTRACT_EXAMPLES", "30"))  # per operation, in the fuzzing phase
TIMEOUT_S = 20.0  # a request still unanswered then is a hang
RESPONSE_TIME_MAX_S = 5.0
INFERENCE = ("/chat/completions", "/completions", "/embeddings")
STREAMED = ("POST /chat/completions", "POST /completions")
# schemathesis leaves out the operation that serves the document it loaded (GET /openapi.json): tested directly
OPERATIONS = {"POST /chat/completions", "POST /completions", "POST /embeddings", "GET /models", "GET /models/{model}"}
# Cases take turns: as generated (a random model: refused as unknown), for the served model, and for the
# served model as a stream, so that the answered paths are exercised in every phase, not only refusals.
STEERING = ("as generated", "served model", "served model, streamed")
SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


def _checks() -> list[CheckFunction]:
    c = schemathesis.checks
    return [c.not_a_server_error, c.status_code_conformance, c.content_type_conformance,
            c.response_headers_conformance, c.response_schema_conformance]


@dataclass
class Tally:
    """What a run sent and got back: for the summary, the coverage asserts and the charge check."""

    sent: int = 0
    statuses: Counter[tuple[str, str, int]] = field(default_factory=Counter)  # (operation, kind of case, status)
    answered_ids: set[str] = field(default_factory=set)  # x-request-id of inference requests answered 200
    streamed: Counter[str] = field(default_factory=Counter)  # answers as server-sent events, by operation

    def summary(self) -> str:
        per_operation: Counter[str] = Counter()
        for (label, _, _), count in self.statuses.items():
            per_operation[label] += count
        return "\n".join(f"{label}: {per_operation[label]} cases; "
                         + ", ".join(f"{kind} {status}×{n}" for (op, kind, status), n in sorted(self.statuses.items())
                                     if op == label) for label in sorted(per_operation))

    def wait_for_charges(self, database_url: str) -> None:
        """What was answered is charged, once each; what was refused is not charged."""
        deadline = time.monotonic() + 15
        while (claimed := _claimed(database_url)) != self.answered_ids and time.monotonic() < deadline:
            assert claimed <= self.answered_ids, f"charged without a 200: {claimed - self.answered_ids}"
            time.sleep(0.2)
        assert claimed == self.answered_ids, (len(claimed), len(self.answered_ids))


def _load(stack: Stack) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json", timeout=TIMEOUT_S)
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    return schema


def _claimed(database_url: str) -> set[str]:
    with psycopg.connect(database_url) as conn:
        return {row[0] for row in conn.execute("SELECT request_id FROM usage_request_claims")}


def _send(stack: Stack, case: Any, headers: dict[str, str]) -> Any:
    started = time.monotonic()
    response = case.call(base_url=stack.base_url, headers=headers, timeout=TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert elapsed < RESPONSE_TIME_MAX_S, (case.operation.label, elapsed, case.body)
    case.validate_response(response, checks=_checks(), headers=headers)
    return response


def _kind(case: Any) -> str:
    """positive / negative (by the document), and the phase: `negative coverage`, `positive fuzzing`…"""
    meta = case.meta
    return f"{meta.generation.mode.value} {meta.phase.name.value}" if meta is not None else "explicit"


def _other_method(case: Any) -> bool:
    return bool(case.method.upper() != case.operation.method.upper())


def _integers_written_as_floats(body: object) -> set[str]:
    """The fields the gateway checks as integers that a case sends as floats such as 1.0."""
    return {name for name in INT_FIELDS if isinstance(body, dict) and isinstance(body.get(name), float)}


def _names(case: Any, model: str) -> bool:
    return (isinstance(case.body, dict) and case.body.get("model") == model) or \
        (case.path_parameters or {}).get("model") == model


def _error(response: Any) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(response.content)["error"]
    return error


def _header(response: Any, name: str) -> str:
    return str(response.headers[name][0])


# ---- the document itself

def test_the_document_is_served_without_a_key_and_lists_every_operation(stack: Stack) -> None:
    response = httpx.get(f"{stack.base_url}/openapi.json", timeout=TIMEOUT_S)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"].startswith("req_")
    assert response.json() == openapi.DOCUMENT
    schema = _load(stack)
    assert {result.ok().label for result in schema.get_all_operations()} == OPERATIONS
    assert {f"{method.upper()} {path}" for path, item in openapi.DOCUMENT["paths"].items() for method in item} \
        == OPERATIONS | {"GET /openapi.json"}
    assert openapi.BODY_BYTES_MAX == proxy.BODY_BYTES_MAX  # the document's 413 says the enforced limit
    # the document is data: asking for it with a key changes nothing; another method is an unknown URL
    with_key = httpx.get(f"{stack.base_url}/openapi.json", headers={"authorization": f"Bearer {stack.secret}"})
    assert with_key.content == response.content
    assert httpx.post(f"{stack.base_url}/openapi.json", json={}).status_code == 404


# ---- generated requests, with the key

def _run_every_operation(stack: Stack, test: Callable[[Any], None], max_examples: int) -> None:
    """Each operation of the live document through schemathesis's examples, coverage and fuzzing phases.

    This is what `schemathesis.pytest.from_fixture(...).parametrize()` runs for a schema that only exists
    once a fixture has started the service; that wrapper itself fails on pytest 9.2 (it sets
    `request.node._nodeid`, which pytest 9.2 no longer has), so its loop is run here directly."""
    schema = _load(stack)
    tests = list(get_all_tests(schema=schema, test_func=test, given_kwargs={},
                               settings=settings(SETTINGS, max_examples=max_examples)))
    assert {result.ok()[0].label for result in tests} == OPERATIONS
    for result in tests:
        _operation, run = result.ok()
        run()


def test_generated_requests_with_a_valid_key_get_documented_answers(stack: Stack, database_url: str) -> None:
    """Every answer as documented; a valid request for the served model answered (plain or streamed), one for
    another model refused as unknown; other methods refused; exactly the answered requests charged."""
    tally = Tally()
    auth = {"Authorization": f"Bearer {stack.secret}"}

    def test(case: Any) -> None:
        label = case.operation.label
        steer = STEERING[tally.sent % len(STEERING)]
        tally.sent += 1
        if steer != "as generated" and isinstance(case.body, dict):
            case.body["model"] = MODEL
            if steer.endswith("streamed") and label in STREAMED:
                case.body["stream"] = True
        if steer != "as generated" and "model" in (case.path_parameters or {}):
            case.path_parameters["model"] = MODEL
        response = _send(stack, case, auth)
        kind = _kind(case)
        tally.statuses[label, kind, response.status_code] += 1
        if response.status_code == 200 and case.operation.path in INFERENCE:
            tally.answered_ids.add(_header(response, "x-request-id"))
            if _header(response, "content-type").startswith("text/event-stream"):
                tally.streamed[label] += 1
        if _other_method(case):  # TRACE, PUT… (405 on the inference paths; an unknown URL elsewhere, as OpenAI)
            assert response.status_code == (405 if case.operation.path in INFERENCE else 404), response.content
            return
        sent_key = response.request.headers.get("authorization") == auth["Authorization"]
        if not kind.startswith("positive") or not sent_key:
            return  # documented (checked above); past the gateway's own checks the backend judges the fields
        if written_as_float := _integers_written_as_floats(case.body):
            # JSON Schema's `integer` admits 1.0; the gateway, like OpenAI, wants an integer written as one
            assert response.status_code == 400, (label, case.body, response.content[:500])
            assert _error(response)["param"] in written_as_float
        elif label == "GET /models" or _names(case, MODEL):
            # a request the document calls valid, for the served model, is answered
            assert response.status_code == 200, (label, case.body, response.content[:500])
        else:  # for another model it is refused as an unknown model, and nothing else
            assert response.status_code == 404, (label, case.body, response.content[:500])
            assert _error(response)["code"] == "model_not_found"

    _run_every_operation(stack, test, MAX_EXAMPLES)
    print("\n" + tally.summary() + f"\nstreamed: {dict(tally.streamed)}")
    assert {label for label, _, _ in tally.statuses} == OPERATIONS, tally.summary()
    for path in INFERENCE:  # the steering reached the answered paths of every inference operation
        assert sum(n for (label, kind, status), n in tally.statuses.items()
                   if label == f"POST {path}" and kind.startswith("positive") and status == 200), tally.summary()
    assert all(tally.streamed[label] > 0 for label in STREAMED), tally.streamed
    tally.wait_for_charges(database_url)


# ---- generated requests, without a valid key

KEYLESS = ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer sk-lw-" + "0" * 43},
           {"Authorization": "Bearer"}, {"Authorization": "bearer not-a-key"})


def test_generated_requests_without_a_valid_key_are_refused_as_documented(stack: Stack, database_url: str) -> None:
    """No key, another scheme, or an unknown key: 401 (or 429 once this address sent too many unknown
    keys), OpenAI's error object, whatever the body and the model; and nothing is charged."""
    tally = Tally()

    def test(case: Any) -> None:
        headers = KEYLESS[tally.sent % len(KEYLESS)]
        tally.sent += 1
        if isinstance(case.body, dict):
            case.body["model"] = MODEL  # the key is checked before the model
        response = _send(stack, case, headers)
        label = case.operation.label
        tally.statuses[label, _kind(case), response.status_code] += 1
        if _other_method(case):
            return
        assert response.status_code in (401, 429), (label, headers, response.content[:300])
        error = _error(response)
        # a negative case may leave the header out, whatever was asked for: judge by what was sent
        sent = response.request.headers.get("authorization", "")
        if response.status_code == 429:
            assert error["code"] == "too_many_invalid_keys" and _header(response, "retry-after").isdigit()
        else:
            assert error["code"] == ("invalid_api_key" if sent[:7].lower() == "bearer " else None), sent

    _run_every_operation(stack, test, max(10, MAX_EXAMPLES // 3))
    print("\n" + tally.summary())
    assert {label for label, _, _ in tally.statuses} == OPERATIONS, tally.summary()
    time.sleep(1.5)  # a charge would have reached the database by now
    assert _claimed(database_url) == set()


# ---- what the generated runs found, pinned

def test_a_model_id_of_slashes_is_not_the_model_list(stack: Stack) -> None:
    auth = {"authorization": f"Bearer {stack.secret}"}
    for encoded in ("%2F", "%2F%2F"):
        response = httpx.get(f"{stack.base_url}/models/{encoded}", headers=auth, timeout=TIMEOUT_S)
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found", \
            (encoded, response.status_code, response.text[:200])


def test_a_405_names_the_allowed_method(stack: Stack) -> None:
    for path in INFERENCE:
        response = httpx.get(f"{stack.base_url}{path}", headers={"authorization": f"Bearer {stack.secret}"})
        assert response.status_code == 405 and response.headers.get("allow") == "POST", (path, response.headers)
