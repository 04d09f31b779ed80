"""No secret is ever written where it could leak: the service is driven end to end (portal login, a
failed login, a key created in the portal, requests through the gateway with a credentialed upstream,
refusals, a revoked key), then its whole log, every table of the database (events decoded) and every
file of its data folder are searched for each secret."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import psycopg

from adapters.passwords import hash_password
from domain.access import SYSTEM
from domain.accounting import Accounting
from domain.catalog import BackendKind, Deployment
from domain.pricing import Prices
from tests.e2e.conftest import free_port, wait_http
from tests.e2e.test_service import login
from tests.integration.support import accounting

PEPPER_HEX = bytes(range(100, 132)).hex()
UPSTREAM_CREDENTIAL = "upstream-credential-5f0c1e7d9a2b"
PASSWORD = "correct horse battery staple 42"
WRONG_PASSWORD = "wrong horse battery staple 43"
ADMIN_PASSWORD = "admin password that is long 7"


def _tables(url: str) -> list[str]:
    """Every row of every table, as text; bytea (the events' state) decoded."""
    out: list[str] = []
    with psycopg.connect(url) as conn:
        tables = conn.execute("SELECT table_schema, table_name FROM information_schema.tables "
                              "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')").fetchall()
        for schema, table in tables:
            for row in conn.execute(f'SELECT * FROM "{schema}"."{table}"').fetchall():
                out += [_text(v) for v in row]
    return out


def _text(value: object) -> str:
    if isinstance(value, memoryview):
        value = bytes(value)
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _files(folder: Path) -> list[str]:
    return [path.read_bytes().decode("utf-8", "replace") for path in folder.rglob("*") if path.is_file()]


def test_no_secret_reaches_a_log_a_table_or_a_file(database_url: str, fake_upstream: str) -> None:
    app: Accounting = accounting(database_url)
    lead = app.register_user("lead@uni.edu", "Lead")
    app.set_password_hash(lead, hash_password(PASSWORD))
    project = app.create_project(SYSTEM, "nlp", "NLP", lead)
    app.grant_credits(SYSTEM, project, 10_000_000, "allocation")
    app.add_model(SYSTEM, "llama", Deployment("fake", BackendKind.OPENAI, fake_upstream, "fake-upstream",
                                              credential_ref="env:LWAPI_TEST_UPSTREAM_KEY"),
                  Prices(1_000, 2_000, datetime(2020, 1, 1, tzinfo=UTC)))
    app.add_model(SYSTEM, "dead", Deployment("dead", BackendKind.OPENAI, f"http://127.0.0.1:{free_port()}/v1",
                                             "x", credential_ref="env:LWAPI_TEST_UPSTREAM_KEY"),
                  Prices(1, 1, datetime(2020, 1, 1, tzinfo=UTC)))
    app.close()

    data_dir = Path(tempfile.mkdtemp(prefix="lwapi-secrets.", dir="/tmp"))
    log_path = data_dir.parent / f"{data_dir.name}.log"
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "LWAPI_KEY_PEPPER": PEPPER_HEX,
           "LWAPI_ADMIN_EMAIL": "ops@uni.edu", "LWAPI_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "LWAPI_TEST_UPSTREAM_KEY": UPSTREAM_CREDENTIAL}
    with log_path.open("w") as log:
        service = subprocess.Popen([sys.executable, "-m", "edge.cli", "serve", "--port", str(port), "--data-dir",
                                    str(data_dir)], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    secrets: dict[str, str] = {"upstream credential": UPSTREAM_CREDENTIAL, "password": PASSWORD,
                               "wrong password": WRONG_PASSWORD, "admin password": ADMIN_PASSWORD,
                               "key pepper": PEPPER_HEX}
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, follow_redirects=False, timeout=30, cookies={"lwapi_lang": "en"}) as web:
            assert login(web, "lead@uni.edu", WRONG_PASSWORD).status_code == 401
            assert login(web, "lead@uni.edu", PASSWORD).status_code in (302, 303)
            secrets["session cookie"] = web.cookies.get("lwapi_session") or ""
            created = web.post("/projects/nlp/keys", data={"name": "scan", "_csrf_token": web.cookies["csrftoken"]})
            match = re.search(r'id="new-secret"[^>]*>(sk-lw-[^<]+)<', created.text)
            assert match, created.text[:500]
            secret = match.group(1).strip()
            secrets["api key"] = secret
        api = openai.OpenAI(base_url=base + "/v1", api_key=secret, max_retries=0)
        api.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}])
        list(api.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}], stream=True))
        for bad in (lambda: api.chat.completions.create(model="dead", messages=[{"role": "user", "content": "x"}]),
                    openai.OpenAI(base_url=base + "/v1", api_key=secret[:-3] + "abc", max_retries=0).models.list,
                    lambda: api.chat.completions.create(model="llama", messages="not a list")):  # type: ignore[arg-type]
            try:
                bad()
            except openai.APIError:
                pass
            else:
                raise AssertionError("a bad request succeeded")
        subprocess.run([sys.executable, "-m", "edge.cli", "audit", "head", "--out", str(data_dir / "head.json")],
                       env={**env, "LWAPI_DATA_DIR": str(data_dir)}, check=True, capture_output=True, timeout=60)
    finally:
        service.terminate()
        service.wait(timeout=30)
    assert all(secrets.values()), secrets
    log_text = log_path.read_text()
    assert "serving on" in log_text and len(log_text) > 200  # the log was captured
    places = {"log": [log_text], "database": _tables(database_url), "data folder": _files(data_dir)}
    for where, texts in places.items():
        for name, value in secrets.items():
            leaks = [t for t in texts if value in t]
            assert not leaks, f"the {name} appears in the {where}: {leaks[0][:200]!r}"
    # the key is stored only as its keyed hash and a short prefix, which are there
    assert any(secret[:12] in t for t in places["database"])
