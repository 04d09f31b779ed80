"""Shared fixtures: a real PostgreSQL server for the run and a fresh database per test.

scripts/test starts a throwaway server and exports LWAPI_TEST_DATABASE_URL; run alone, pytest
starts an embedded one itself. A missing server is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from adapters.pg_embedded import EmbeddedPostgres


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    url = os.environ.get("LWAPI_TEST_DATABASE_URL")
    if url:
        yield url
        return
    folder = Path(tempfile.mkdtemp(prefix="lwapi-pytest-pg.", dir="/tmp"))
    folder.chmod(0o755)
    server = EmbeddedPostgres(folder)
    try:
        yield server.ensure_running().dsn()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


@pytest.fixture
def database_url(pg_server_url: str) -> Iterator[str]:
    """A new, empty database on the test server, dropped after the test."""
    name = "t_" + uuid.uuid4().hex[:16]
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(pg_server_url, name)
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
