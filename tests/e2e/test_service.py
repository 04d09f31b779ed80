"""The service as `scripts/serve` runs it: embedded PostgreSQL, first administrator, login, restart."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapters.pg_embedded import EmbeddedPostgres

STARTUP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def data_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="lwapi-e2e.", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    server = EmbeddedPostgres(folder)
    if server.is_running():
        server.stop()
    shutil.rmtree(folder, ignore_errors=True)


class Service:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        clean_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "serve", "--port", str(self.port), "--data-dir", str(data_dir)],
            env={**clean_env, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError("service exited during start-up:\n" + "".join(self.output))
            self.output.append(line)
            if "Uvicorn running on" in line:
                return
        raise AssertionError("service did not start in time:\n" + "".join(self.output))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        # uvicorn re-raises the signal after a graceful shutdown, so a clean stop exits by SIGTERM
        return 0 if code == -signal.SIGTERM and "Application shutdown complete" in self._rest() else code

    def _rest(self) -> str:
        assert self.proc.stdout is not None
        self.output.append(self.proc.stdout.read())
        return "".join(self.output)


def login(client: httpx.Client, email: str, password: str) -> httpx.Response:
    page = client.get("/login")
    assert page.status_code == 200
    token = client.cookies.get("csrftoken")
    return client.post("/login", data={"email": email, "password": password, "_csrf_token": token})


def cli(data_dir: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    done = subprocess.run([sys.executable, "-m", "edge.cli", "--data-dir", str(data_dir), *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_embedded_default_first_admin_login_and_restart(data_dir: Path) -> None:
    service = Service(data_dir)
    printed = re.search(r"First administrator created: (\S+)\nPassword \(shown only this once\): (\S+)",
                        "".join(service.output))
    assert printed, "".join(service.output)
    email, password = printed.groups()
    with httpx.Client(base_url=service.base, follow_redirects=False, timeout=10,
                      cookies={"lwapi_lang": "en"}) as client:
        assert client.get("/").headers["location"] == "/login"
        wrong = login(client, email, "wrong password")
        assert wrong.status_code == 401 and "Wrong e-mail or password" in wrong.text
        ok = login(client, email, password)
        assert ok.status_code in (302, 303) and ok.headers["location"] == "/"
        assert "not a member of any project" in client.get("/").text
        session = httpx.Cookies(client.cookies)
    # the CLI shares the running service's embedded server
    cli(data_dir, "project", "create", "astro", "--name", "Astro Lab", "--creator", email)
    cli(data_dir, "credits", "grant", "astro", "1234567", "--reason", "start")
    secret = cli(data_dir, "key", "create", "astro", "--owner", email, "--name", "ci")
    assert EmbeddedPostgres(data_dir).is_running()
    assert service.stop() == 0
    assert not EmbeddedPostgres(data_dir).is_running(), "the embedded server must stop with the service"

    again = Service(data_dir)  # data survives; no second administrator or password
    assert "Password (shown only this once)" not in "".join(again.output)
    with httpx.Client(base_url=again.base, follow_redirects=False, timeout=10, cookies=session) as client:
        home = client.get("/")  # the session outlives the restart: no second login
        assert "Astro Lab" in home.text and "1,234,567" in home.text
        models = client.get("/v1/models", headers={"Authorization": f"Bearer {secret}"})
        assert models.status_code == 200 and models.json() == {"object": "list", "data": []}
    assert again.stop() == 0
    assert not EmbeddedPostgres(data_dir).is_running()


def test_admin_from_environment_and_openai_shaped_errors(data_dir: Path) -> None:
    service = Service(data_dir, {"LWAPI_ADMIN_EMAIL": "ops@uni.edu", "LWAPI_ADMIN_PASSWORD": "s3cret-enough"})
    try:
        assert "Password (shown only this once)" not in "".join(service.output)
        with httpx.Client(base_url=service.base, follow_redirects=False, timeout=10) as client:
            assert login(client, "ops@uni.edu", "s3cret-enough").status_code in (302, 303)
            for headers in ({}, {"Authorization": "Bearer sk-lw-not-a-real-key-at-all"}, {"Authorization": "Basic x"}):
                r = client.post("/v1/chat/completions", json={"model": "x", "messages": []}, headers=headers)
                assert r.status_code == 401
                error = r.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
            # a form post without the CSRF token is refused
            assert client.post("/logout").status_code == 403
    finally:
        assert service.stop() == 0
