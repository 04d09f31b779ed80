"""PostgreSQL stopped for a minute while requests flow: the gateway keeps serving the keys it knows from
memory, spools every request's usage on local disk, and records all of it, once, when the database is back.

The service runs against a PostgreSQL server of this test's own (the shared one cannot be stopped), stopped
for `LWAPI_TEST_OUTAGE_S` seconds (60 by default, as issue 7 names).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest

from adapters.database import eventstore_env
from adapters.pg_embedded import EmbeddedPostgres
from domain.access import SYSTEM
from domain.accounting import Accounting
from domain.api_key import KeySettings
from domain.catalog import BackendKind, Deployment
from domain.pricing import Prices
from tests.e2e.conftest import start_service, stop_service

OUTAGE_S = float(os.environ.get("LWAPI_TEST_OUTAGE_S", "60"))
COMPLETION_TOKENS = 5


@pytest.fixture
def own_server() -> Iterator[EmbeddedPostgres]:
    folder = Path(tempfile.mkdtemp(prefix="lwapi-outage.", dir="/tmp"))  # short: the socket path has a limit
    folder.chmod(0o755)  # the server may run as its own system account, which must reach its folder
    server = EmbeddedPostgres(folder / "data")
    try:
        yield server
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(folder, ignore_errors=True)


class Traffic:
    """Requests one after another from a thread, until stopped; remembers every answer."""

    def __init__(self, base_url: str, secret: str) -> None:
        self.base_url, self.secret = base_url, secret
        self.statuses: Counter[int] = Counter()
        self.ok_ids: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as h:
            while not self._stop.is_set():
                stream = len(self.ok_ids) % 2 == 1  # streamed and whole answers alternate
                try:
                    r = h.post(f"{self.base_url}/chat/completions", headers={"Authorization": f"Bearer {self.secret}"},
                               json={"model": "llama", "messages": [{"role": "user", "content": "hi"}],
                                     "stream": stream, "max_tokens": 50, "fake_tokens": COMPLETION_TOKENS})
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))
                    continue
                self.statuses[r.status_code] += 1
                if r.status_code == 200 and (not stream or r.text.rstrip().endswith("data: [DONE]")):
                    self.ok_ids.append(r.headers["x-request-id"])
                elif r.status_code == 200:
                    self.failures.append(f"stream without [DONE]: {r.text[-200:]}")
                time.sleep(0.02)


def test_postgresql_stopped_for_a_minute_under_traffic(own_server: EmbeddedPostgres, fake_upstream: str,
                                                      tmp_path: Path) -> None:
    dsn = own_server.ensure_running().dsn()
    app = Accounting(env=eventstore_env(dsn), key_pepper=bytes(range(32)))
    try:
        user = app.register_user("researcher@uni.edu", "Researcher")
        project = app.create_project(SYSTEM, "nlp", "NLP Lab", user)
        app.grant_credits(SYSTEM, project, 10_000_000, "allocation")
        _, secret = app.create_key(SYSTEM, project, user, KeySettings(name="main"))
        app.add_model(SYSTEM, "llama", Deployment("fake", BackendKind.OPENAI, fake_upstream, "fake-upstream"),
                      Prices(1_000, 2_000, datetime(2020, 1, 1, tzinfo=UTC)))
    finally:
        app.close()
    service, base_url = start_service(dsn, tmp_path / "data", {"LWAPI_DB_TIMEOUT_S": "2"})
    try:
        with Traffic(base_url, secret) as traffic:
            time.sleep(2)
            own_server.stop(mode="fast")
            stopped = len(traffic.ok_ids)
            time.sleep(OUTAGE_S)
            during = len(traffic.ok_ids) - stopped
            # a key the gateway has never seen cannot be checked without the database: refused, at once
            unknown = httpx.post(f"{base_url}/chat/completions", headers={"Authorization": "Bearer sk-lw-" + "x" * 43},
                                 json={"model": "llama", "messages": []}, timeout=10)
            spooled = sum(1 for _ in (tmp_path / "data" / "spool").rglob("*.jsonl*"))
            own_server.ensure_running()
            time.sleep(2)
        assert traffic.failures == [] and set(traffic.statuses) == {200}, (traffic.statuses, traffic.failures[:3])
        assert during >= OUTAGE_S * 5  # served all along (one request at a time, ~20 ms apart)
        assert unknown.status_code == 401
        assert spooled > 0  # the usage waited on local disk

        answered = len(traffic.ok_ids)

        def recorded() -> tuple[int, int]:
            with psycopg.connect(dsn) as conn:
                claims = conn.execute("SELECT count(*), count(DISTINCT request_id) FROM usage_request_claims"
                                      ).fetchone()
            assert claims is not None
            return claims[0], claims[1]
        deadline = time.monotonic() + 60
        while recorded()[0] < answered and time.monotonic() < deadline:
            time.sleep(0.2)
        assert recorded() == (answered, answered)  # every answered request charged, once
        with psycopg.connect(dsn) as conn:
            ids = {r[0] for r in conn.execute("SELECT request_id FROM usage_request_claims").fetchall()}
        assert ids == set(traffic.ok_ids)

        def balance() -> tuple[int, int] | None:
            with psycopg.connect(dsn) as conn:
                row = conn.execute("SELECT requests, tokens_completion FROM lwapi_read.balances "
                                   "WHERE project_id = %s", (project,)).fetchone()
            return (row[0], row[1]) if row else None
        deadline = time.monotonic() + 30
        while balance() != (answered, answered * COMPLETION_TOKENS) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert balance() == (answered, answered * COMPLETION_TOKENS)  # the read models caught up
    finally:
        stop_service(service)
