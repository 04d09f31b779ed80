"""A running stack for end-to-end tests: the fake upstream and the service on a fresh database."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import httpx
import psycopg
import pytest

from adapters.database import eventstore_env
from domain.access import SYSTEM
from domain.accounting import Accounting
from domain.api_key import KeySettings
from domain.catalog import BackendKind, Deployment
from domain.pricing import Prices
from tests.backends.process import ServerProcess
from tests.conftest import fresh_database

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

    def add_model(self, name: str) -> None:
        """Another model served by the same fake upstream."""
        self.app.add_model(SYSTEM, name, Deployment(name, BackendKind.OPENAI, self.upstream_url, "fake-upstream"),
                           Prices(1_000, 2_000, datetime(2020, 1, 1, tzinfo=UTC)))


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


def start_service(database_url: str, data_dir: Path, extra_env: dict[str, str] | None = None,
                  port: int | None = None) -> tuple[subprocess.Popen[str], str]:
    port = port or free_port()
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


@dataclass
class VllmServers:
    chat: ServerProcess  # the tiny Llama, served as "tiny-llama"
    embeddings: ServerProcess  # all-MiniLM-L6-v2, served as "minilm"


@pytest.fixture(scope="session")
def vllm_servers(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServers]:
    """Real vLLM CPU servers, started once per run (about 45 s, both at once) and shared."""
    from tests.backends.vllm_server import minilm_dir, start_vllm  # noqa: PLC0415

    log_dir = tmp_path_factory.mktemp("vllm-logs")
    with ThreadPoolExecutor(2) as pool:
        chat = pool.submit(start_vllm, tiny_model_dir, log_dir=log_dir)
        embeddings = pool.submit(start_vllm, minilm_dir(), served_name="minilm", pooling=True, log_dir=log_dir)
        wait([chat, embeddings])
    started = [f.result() for f in (chat, embeddings) if f.exception() is None]
    try:
        yield VllmServers(chat.result(), embeddings.result())  # raises the failure of one that did not start
    finally:
        for server in started:
            server.stop()


@dataclass
class Real:
    """The service in front of real inference servers, with one database for a test module."""

    base_url: str
    app: Accounting
    project_id: UUID
    user_id: UUID
    database_url: str

    def new_key(self, **settings: object) -> tuple[UUID, str]:
        """A new key, returned once the gateway knows it (its index follows the log within a second)."""
        key_id, secret = self.app.create_key(SYSTEM, self.project_id, self.user_id,
                                             KeySettings(**{"name": "k", **settings}))
        deadline = time.monotonic() + 10
        while httpx.get(self.base_url + "/models", headers={"authorization": f"Bearer {secret}"}).status_code != 200:
            assert time.monotonic() < deadline, "the gateway did not learn of a new key within 10 s"
            time.sleep(0.05)
        return key_id, secret

    def key_usage(self, key_id: UUID) -> tuple[int, int, int, int, int] | None:
        """(requests, prompt, completion, cost, estimated requests) charged to the key, once projected."""
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute("SELECT sum(requests), sum(tokens_prompt), sum(tokens_completion), sum(cost_credits), "
                               "sum(estimated_requests) FROM lwapi_read.usage_rollups WHERE key_id = %s",
                               (key_id,)).fetchone()
        return None if row is None or row[0] is None else tuple(int(v) for v in row)  # type: ignore[return-value]


@contextlib.contextmanager
def real_service(pg_server_url: str, models: list[tuple[str, Deployment, Prices]]) -> Iterator[Real]:
    with fresh_database(pg_server_url) as database_url:
        app = Accounting(env=eventstore_env(database_url), key_pepper=bytes(range(32)))
        user = app.register_user("researcher@uni.edu", "Researcher")
        project = app.create_project(SYSTEM, "nlp", "NLP Lab", user)
        app.grant_credits(SYSTEM, project, 10_000_000, "allocation")
        for name, deployment, prices in models:
            app.add_model(SYSTEM, name, deployment, prices)
        data_dir = Path(tempfile.mkdtemp(prefix="lwapi-gw.", dir="/tmp"))
        service, base_url = start_service(database_url, data_dir)
        try:
            yield Real(base_url, app, project, user, database_url)
        finally:
            stop_service(service)
            app.close()
            shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def llamacpp_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real llama.cpp server (llama-cpp-python's) for the tiny model's GGUF, started once per run (~1 s)."""
    from tests.backends.llamacpp_server import start_llamacpp  # noqa: PLC0415
    from tests.backends.tiny_gguf import write_gguf  # noqa: PLC0415

    folder = tmp_path_factory.mktemp("llamacpp")
    server = start_llamacpp(write_gguf(tiny_model_dir, folder / "tiny.gguf"), log_dir=folder)
    try:
        yield server
    finally:
        server.stop()
