"""Two gateway processes sharing Redis admit as one: limits and balances hold across them."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import openai
import psycopg

from domain.access import SYSTEM
from domain.api_key import KeySettings
from tests.e2e.conftest import Stack, free_port, start_service, stop_service, wait_http
from tests.e2e.test_gateway import wait_for


def _ready(base_url: str, secret: str) -> bool:
    return httpx.get(f"{base_url}/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200


async def _burst(urls: list[str], secret: str, n: int, **extra: object) -> list[str]:
    clients = [openai.AsyncOpenAI(base_url=u, api_key=secret, max_retries=0, timeout=60,
                                  http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=n)))
               for u in urls]

    async def one(i: int) -> str:
        try:
            answer = await clients[i % len(clients)].chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "x"}], **extra)  # type: ignore[call-overload]
            if extra.get("stream"):
                async for _ in answer:
                    pass
        except openai.RateLimitError as e:
            return str(e.code)
        return "ok"
    try:
        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for c in clients:
            await c.close()


def _two_services(stack: Stack, database_url: str, redis_url: str):
    stop_service(stack.service)  # the stack's own service runs without Redis
    folders = [Path(tempfile.mkdtemp(prefix="lwapi-gw.", dir="/tmp")) for _ in range(2)]
    services = [start_service(database_url, f, {"LWAPI_REDIS_URL": redis_url}) for f in folders]
    return services, folders


def test_rate_limit_holds_across_two_processes(stack: Stack, database_url: str, redis_url: str) -> None:
    _, secret = stack.app.create_key(SYSTEM, stack.project_id, stack.user_id, KeySettings(name="k", rpm_limit=6))
    services, folders = _two_services(stack, database_url, redis_url)
    urls = [url for _, url in services]
    try:
        wait_for(lambda: all(_ready(u, secret) for u in urls), 3)
        outcomes = asyncio.run(_burst(urls, secret, 30))
        assert outcomes.count("ok") == 6 and outcomes.count("rate_limit_exceeded") == 24
    finally:
        for service, _ in services:
            stop_service(service)
        for f in folders:
            shutil.rmtree(f, ignore_errors=True)


def test_balance_holds_across_two_processes(stack: Stack, database_url: str, redis_url: str) -> None:
    owner = stack.app.register_user("pair@uni.edu", "Pair")
    project = stack.app.create_project(SYSTEM, "pair", "Pair", owner)
    # each request: prompt estimate × 1 credit/Mtok + 10 completion tokens × 2,000 credits/Mtok → 1 credit
    stack.app.grant_credits(SYSTEM, project, 10, "ten requests")
    _, secret = stack.app.create_key(SYSTEM, project, owner, KeySettings(name="k"))
    services, folders = _two_services(stack, database_url, redis_url)
    urls = [url for _, url in services]
    try:
        wait_for(lambda: all(_ready(u, secret) for u in urls), 3)
        outcomes = asyncio.run(_burst(urls, secret, 100, max_tokens=10,
                                      extra_body={"fake_tokens": 10, "fake_delay_ms": 20}))
        assert outcomes.count("ok") == 10 and outcomes.count("insufficient_quota") == 90
    finally:
        for service, _ in services:
            stop_service(service)
        for f in folders:
            shutil.rmtree(f, ignore_errors=True)


def test_redis_down_degrades_to_local_admission(stack: Stack, database_url: str) -> None:
    stop_service(stack.service)
    folder = Path(tempfile.mkdtemp(prefix="lwapi-gw.", dir="/tmp"))
    service, url = start_service(database_url, folder, {"LWAPI_REDIS_URL": "redis://127.0.0.1:9/0"})
    try:
        wait_for(lambda: _ready(url, stack.secret), 3)
        outcomes = asyncio.run(_burst([url], stack.secret, 5))
        assert outcomes == ["ok"] * 5
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
        assert "lwapi_requests_total" in metrics
    finally:
        stop_service(service)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_serve_and_meter_once(stack: Stack, database_url: str, redis_url: str) -> None:
    stop_service(stack.service)
    folder = Path(tempfile.mkdtemp(prefix="lwapi-gw.", dir="/tmp"))
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "LWAPI_KEY_PEPPER": bytes(range(32)).hex(),
           "LWAPI_REDIS_URL": redis_url, "LWAPI_ADMIN_EMAIL": "ops@uni.edu", "LWAPI_ADMIN_PASSWORD": "pw-123456"}
    service = subprocess.Popen([sys.executable, "-m", "edge.cli", "serve", "--port", str(port), "--data-dir",
                                str(folder), "--workers", "2"], env=env, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        wait_for(lambda: _ready(url, stack.secret), 5)
        outcomes = asyncio.run(_burst([url], stack.secret, 40))
        assert outcomes == ["ok"] * 40
    finally:
        stop_service(service)
        shutil.rmtree(folder, ignore_errors=True)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM usage_request_claims").fetchone() == (40,)


def test_several_workers_without_redis_are_refused(database_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": database_url}
    done = subprocess.run([sys.executable, "-m", "edge.cli", "serve", "--workers", "2"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and "LWAPI_REDIS_URL" in done.stderr


def test_redis_stopped_and_restarted_under_traffic(stack: Stack, database_url: str) -> None:
    """Redis goes away mid-traffic: requests go on (admitted per process), and when a fresh, empty Redis comes
    back on the same address, admission is shared again, every request metered once."""
    import redis  # noqa: PLC0415

    from tests.conftest import _free_port, _wait_port  # noqa: PLC0415

    port, folder = _free_port(), Path(tempfile.mkdtemp(prefix="lwapi-redis.", dir="/tmp"))

    def start_redis() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                                 "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
                                stdout=subprocess.DEVNULL)
        _wait_port(port)
        return proc

    url = f"redis://127.0.0.1:{port}/0"
    stop_service(stack.service)
    redis_proc = start_redis()
    service, base = start_service(database_url, Path(tempfile.mkdtemp(prefix="lwapi-gw.", dir="/tmp")),
                                  {"LWAPI_REDIS_URL": url})
    try:
        wait_for(lambda: _ready(base, stack.secret), 3)
        assert asyncio.run(_burst([base], stack.secret, 5)) == ["ok"] * 5
        assert redis.Redis.from_url(url).keys("lwapi:*")  # the shared state is in Redis
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        assert asyncio.run(_burst([base], stack.secret, 5)) == ["ok"] * 5  # per process meanwhile
        redis_proc = start_redis()  # empty: everything it held is gone
        assert asyncio.run(_burst([base], stack.secret, 5)) == ["ok"] * 5
        wait_for(lambda: bool(redis.Redis.from_url(url).keys("lwapi:*")), 5)  # shared again
        with psycopg.connect(database_url) as conn:
            wait_for(lambda: conn.execute("SELECT count(*) FROM usage_request_claims").fetchone() == (15,), 10)
    finally:
        stop_service(service)
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_processes_under_a_streaming_load_keep_limits_reservations_and_metering_exact(
        stack: Stack, database_url: str, redis_url: str) -> None:
    """600 concurrent streams over two gateway processes sharing Redis: a project whose balance covers 200
    of them, and a key limited to 50 requests a minute. Exactly 200 and 50 are served, every one metered
    once, the balance ends at zero."""
    owner = stack.app.register_user("load@uni.edu", "Load")
    project = stack.app.create_project(SYSTEM, "load", "Load", owner)
    stack.app.grant_credits(SYSTEM, project, 200, "two hundred streams")  # 10 tokens × 2,000/Mtok → 1 credit each
    _, budget_key = stack.app.create_key(SYSTEM, project, owner, KeySettings(name="budget"))
    _, limited_key = stack.app.create_key(SYSTEM, stack.project_id, stack.user_id,
                                          KeySettings(name="limited", rpm_limit=50))
    services, folders = _two_services(stack, database_url, redis_url)
    urls = [url for _, url in services]
    try:
        wait_for(lambda: all(_ready(u, k) for u in urls for k in (budget_key, limited_key)), 3)

        async def both() -> tuple[list[str], list[str]]:
            streaming = {"stream": True, "max_tokens": 10, "extra_body": {"fake_tokens": 10, "fake_delay_ms": 20}}
            return await asyncio.gather(_burst(urls, budget_key, 500, **streaming),
                                        _burst(urls, limited_key, 100, **streaming))
        budget, limited = asyncio.run(both())
        assert budget.count("ok") == 200 and budget.count("insufficient_quota") == 300
        assert limited.count("ok") == 50 and limited.count("rate_limit_exceeded") == 50

        def claims() -> tuple[int, int]:
            with psycopg.connect(database_url) as conn:
                row = conn.execute("SELECT count(*), count(DISTINCT request_id) FROM usage_request_claims"
                                   ).fetchone()
            return (row[0], row[1]) if row else (0, 0)

        def balance() -> tuple[int, int, int] | None:
            with psycopg.connect(database_url) as conn:
                row = conn.execute("SELECT requests, charged_credits, remaining_credits FROM lwapi_read.balances "
                                   "WHERE project_id = %s", (project,)).fetchone()
            return (row[0], row[1], row[2]) if row else None
        wait_for(lambda: claims()[0] >= 250, 20)
        assert claims() == (250, 250)  # every served stream metered, once
        wait_for(lambda: balance() == (200, 200, 0), 20)
    finally:
        for service, _ in services:
            stop_service(service)
        for f in folders:
            shutil.rmtree(f, ignore_errors=True)
