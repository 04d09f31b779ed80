"""Slow clients (slowloris) against the running service: a request must arrive within
LWAPI_REQUEST_TIMEOUT_S (2 s here) or its connection is closed; answers that take long are never cut."""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from adapters.database import eventstore_env
from domain.access import SYSTEM
from domain.accounting import Accounting
from domain.api_key import KeySettings
from domain.catalog import BackendKind, Deployment
from domain.pricing import Prices
from tests.e2e.conftest import start_service

TIMEOUT_S = 2


@pytest.fixture
def service(database_url: str, fake_upstream: str) -> Iterator[tuple[str, str]]:
    app = Accounting(env=eventstore_env(database_url), key_pepper=bytes(range(32)))
    user = app.register_user("slow@uni.edu", "Slow")
    project = app.create_project(SYSTEM, "slow", "Slow Lab", user)
    app.grant_credits(SYSTEM, project, 10_000_000, "allocation")
    _, secret = app.create_key(SYSTEM, project, user, KeySettings(name="k"))
    app.add_model(SYSTEM, "llama", Deployment("fake", BackendKind.OPENAI, fake_upstream, "fake-upstream"),
                  Prices(1, 1, datetime(2020, 1, 1, tzinfo=UTC)))
    app.close()
    proc, base_url = start_service(database_url, Path(tempfile.mkdtemp(prefix="lwapi-slow.", dir="/tmp")),
                                   {"LWAPI_REQUEST_TIMEOUT_S": str(TIMEOUT_S)})
    try:
        yield base_url, secret
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _connect(base_url: str) -> socket.socket:
    parts = urlsplit(base_url)
    return socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT_S * 5)


def _closed_after(sock: socket.socket, trickle: bytes, started: float) -> float:
    """Send `trickle` a byte every 0.25 s until the server closes; seconds from `started` to the close."""
    try:
        for byte in trickle:
            sock.sendall(bytes([byte]))
            time.sleep(0.25)
        while sock.recv(4096):
            pass
    except (BrokenPipeError, ConnectionResetError):
        pass
    return time.monotonic() - started


@pytest.mark.parametrize("trickle", [
    b"",  # connects and says nothing
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100,  # headers a byte at a time
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{" + b" " * 200,  # a slow body
])
def test_a_request_that_does_not_arrive_in_time_loses_its_connection(service: tuple[str, str],
                                                                     trickle: bytes) -> None:
    started = time.monotonic()
    with _connect(service[0]) as sock:
        elapsed = _closed_after(sock, trickle, started)
    assert TIMEOUT_S - 0.5 <= elapsed <= TIMEOUT_S + 2, elapsed


def test_kept_alive_connections_and_long_answers_are_not_cut(service: tuple[str, str]) -> None:
    base_url, secret = service
    with httpx.Client(base_url=base_url, timeout=30, headers={"authorization": f"Bearer {secret}"}) as http:
        assert http.get("/models").status_code == 200
        time.sleep(1.5)  # idle on the same connection, within uvicorn's keep-alive
        assert http.get("/models").status_code == 200
        started = time.monotonic()
        with http.stream("POST", "/chat/completions", json={
                "model": "llama", "messages": [{"role": "user", "content": "x"}], "stream": True,
                "fake_tokens": 20, "fake_delay_ms": 200}) as streamed:  # 20 tokens, 0.2 s apart: 4 s
            raw = b"".join(streamed.iter_bytes())
        assert time.monotonic() - started > TIMEOUT_S + 1 and raw.rstrip().endswith(b"data: [DONE]")
