"""Deployments: a failing one leaves the rotation at once, a probe brings it back."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai

from domain.access import SYSTEM
from domain.catalog import BackendKind, Deployment
from domain.pricing import Prices
from tests.e2e.conftest import Stack, free_port, start_service, stop_service, wait_http
from tests.e2e.test_gateway import client, wait_for


def up(base_url: str, deployment: str) -> str | None:
    for line in httpx.get(base_url.removesuffix("/v1") + "/metrics").text.splitlines():
        if line.startswith(f'lwapi_upstream_up{{model="ha",deployment="{deployment}"}}'):
            return line.rsplit(" ", 1)[1]
    return None


def test_failed_deployment_leaves_rotation_and_returns_when_healthy(stack: Stack, database_url: str) -> None:
    stop_service(stack.service)
    folder = Path(tempfile.mkdtemp(prefix="lwapi-gw.", dir="/tmp"))
    service, base_url = start_service(database_url, folder, {"LWAPI_HEALTH_INTERVAL_S": "1"})
    stack.base_url = base_url
    dead_port = free_port()
    stack.app.add_model(SYSTEM, "ha", Deployment("dead", BackendKind.OPENAI, f"http://127.0.0.1:{dead_port}/v1",
                                                 "fake-upstream", weight=10),
                        Prices(1, 1, datetime(2020, 1, 1, tzinfo=UTC)))
    stack.app.change_model(SYSTEM, "ha", lambda m: m.add_deployment(
        Deployment("live", BackendKind.OPENAI, stack.upstream_url, "fake-upstream", weight=1)))
    revived = None
    try:
        wait_for(lambda: "ha" in [m.id for m in client(stack).models.list()], 2)
        for _ in range(5):  # the preferred deployment is down: every request still succeeds, on the other
            assert client(stack).chat.completions.create(model="ha", messages=[{"role": "user", "content": "x"}])
        assert up(base_url, "dead") == "0" and up(base_url, "live") == "1"
        revived = subprocess.Popen([sys.executable, "-m", "tests.fake_upstream", "--port", str(dead_port)])
        wait_http(f"http://127.0.0.1:{dead_port}/v1/models")
        wait_for(lambda: up(base_url, "dead") == "1", 5)  # the probe brings it back
    finally:
        if revived is not None:
            revived.terminate()
            revived.wait(timeout=10)
        stop_service(service)
        shutil.rmtree(folder, ignore_errors=True)


def test_catalog_file_is_applied_at_start(stack: Stack, database_url: str, tmp_path: Path) -> None:
    stop_service(stack.service)
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f"""
[[models]]
name = "from-file"
price_prompt = 1
price_completion = 2
[[models.deployments]]
name = "fake"
backend = "openai"
base_url = "{stack.upstream_url}"
upstream_model = "fake-upstream"
""")
    folder = Path(tempfile.mkdtemp(prefix="lwapi-gw.", dir="/tmp"))
    service, base_url = start_service(database_url, folder, {"LWAPI_CATALOG_FILE": str(catalog)})
    stack.base_url = base_url
    try:
        wait_for(lambda: "from-file" in [m.id for m in client(stack).models.list()], 2)
        assert client(stack).chat.completions.create(model="from-file", messages=[{"role": "user", "content": "x"}])
    finally:
        stop_service(service)
        shutil.rmtree(folder, ignore_errors=True)


def in_flight(base_url: str, model: str, deployment: str) -> str | None:
    for line in httpx.get(base_url.removesuffix("/v1") + "/metrics").text.splitlines():
        if line.startswith(f'lwapi_upstream_in_flight{{model="{model}",deployment="{deployment}"}}'):
            return line.rsplit(" ", 1)[1]
    return None


def test_requests_open_across_catalog_reloads_count_down_to_zero(stack: Stack) -> None:
    """The catalog reloads every second; streams that outlive several reloads must leave the deployment's
    in-flight count (what routing balances on) at zero, not at what was open at each reload."""
    async def streams() -> None:
        api = openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.secret, max_retries=0)

        async def one() -> None:
            stream = await api.chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "x"}], stream=True,
                extra_body={"fake_tokens": 10, "fake_delay_ms": 300})
            async for _ in stream:
                pass
        await asyncio.gather(*(one() for _ in range(6)))
        await api.close()

    asyncio.run(streams())  # 3 s each: three reloads or more while they run
    assert in_flight(stack.base_url, "llama", "fake") == "0"
