"""A running stack for end-to-end tests: the fake upstream and the service on a fresh database."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import httpx
import pytest

from adapters.database import eventstore_env
from domain.access import SYSTEM
from domain.accounting import Accounting
from domain.api_key import KeySettings
from domain.catalog import BackendKind, Deployment
from domain.pricing import Prices

STARTUP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not come up")


@dataclass
class Stack:
    base_url: str
    upstream_url: str
    app: Accounting
    project_id: UUID
    user_id: UUID
    secret: str
    key_id: UUID
    data_dir: Path
    service: subprocess.Popen[str]

    def new_key(self, **settings: object) -> tuple[UUID, str]:
        return self.app.create_key(SYSTEM, self.project_id, self.user_id, KeySettings(**{"name": "k", **settings}))


@pytest.fixture
def fake_upstream() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_upstream", "--port", str(port)])
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # a test left it answering a request that hangs on purpose
            proc.kill()
            proc.wait(timeout=5)


def start_service(database_url: str, data_dir: Path, extra_env: dict[str, str] | None = None
                  ) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "LWAPI_KEY_PEPPER": bytes(range(32)).hex(),
           "LWAPI_ADMIN_EMAIL": "ops@uni.edu", "LWAPI_ADMIN_PASSWORD": "admin-password-1", **(extra_env or {})}
    service = subprocess.Popen([sys.executable, "-m", "edge.cli", "serve", "--port", str(port), "--data-dir",
                                str(data_dir)], env=env, text=True)
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return service, f"http://127.0.0.1:{port}/v1"


def stop_service(service: subprocess.Popen[str]) -> None:
    if service.poll() is None:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)


@pytest.fixture
def stack(database_url: str, fake_upstream: str) -> Iterator[Stack]:
    app = Accounting(env=eventstore_env(database_url), key_pepper=bytes(range(32)))
    user = app.register_user("researcher@uni.edu", "Researcher")
    project = app.create_project(SYSTEM, "nlp", "NLP Lab", user)
    app.grant_credits(SYSTEM, project, 10_000_000, "allocation")
    key_id, secret = app.create_key(SYSTEM, project, user, KeySettings(name="main"))
    app.add_model(SYSTEM, "llama", Deployment("fake", BackendKind.OPENAI, fake_upstream, "fake-upstream"),
                  Prices(1_000, 2_000, datetime(2020, 1, 1, tzinfo=UTC)), "A fake model")
    data_dir = Path(tempfile.mkdtemp(prefix="lwapi-gw.", dir="/tmp"))
    service, base_url = start_service(database_url, data_dir)
    try:
        yield Stack(base_url, fake_upstream, app, project, user, secret, key_id, data_dir, service)
    finally:
        stop_service(service)
        app.close()
        shutil.rmtree(data_dir, ignore_errors=True)
