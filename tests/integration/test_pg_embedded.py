"""Real-server tests for adapters.pg_embedded (no mocks: initdb, pg_ctl and postgres really run).

Data folders live in short, world-traversable directories directly under /tmp: pytest's
tmp_path sits below /tmp/pytest-of-root (mode 0700), which the unprivileged server account
used when running as root could not traverse.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import psycopg
import pytest

from adapters.pg_embedded import (
    MAX_SOCKET_PATH_BYTES,
    STAGED_BINARIES_DIR,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    find_bindir,
    server_major_version,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PG15 = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A fresh 0755 directory right under /tmp; any server left in it is stopped afterwards."""
    base = Path(tempfile.mkdtemp(prefix="lwpg-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    for pg_dir in base.rglob("PG_VERSION"):
        data_dir = pg_dir.parent.parent
        EmbeddedPostgres(data_dir, bindir=_bindir_of(pg_dir)).stop(mode="immediate")
    shutil.rmtree(base, ignore_errors=True)


def _bindir_of(pg_version_file: Path) -> Path | None:
    major = int(pg_version_file.read_text())
    return SYSTEM_PG15 if major == 15 else None


def _postmaster_pid(server: EmbeddedPostgres) -> int:
    return int((server.pg_dir / "postmaster.pid").read_text().split("\n", 1)[0])


def _wait_dead(pid: int, timeout_s: float = 10.0) -> None:
    """Wait until ``pid`` has exited (a not-yet-reaped zombie counts as exited)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)
    pytest.fail(f"process {pid} still alive after {timeout_s}s")


def test_first_start_initialises_and_data_survives_restart(short_dir: Path) -> None:
    server = EmbeddedPostgres(short_dir / "data")
    assert not server.is_running()

    info = server.ensure_running()

    assert info.started_here
    assert (server.pg_dir / "PG_VERSION").is_file()
    assert info.socket_dir == server.socket_dir
    assert (info.dbname, info.user, info.port) == ("lwapi", "lwapi", 5432)
    with psycopg.connect(info.dsn()) as conn:
        conn.execute("CREATE TABLE survivor (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO survivor VALUES (1, 'still here')")

    server.stop()
    assert not server.is_running()
    again = server.ensure_running()

    assert again.started_here
    with psycopg.connect(again.dsn()) as conn:
        assert conn.execute("SELECT note FROM survivor WHERE id = 1").fetchone() == ("still here",)


def test_ensure_running_is_idempotent_and_reports_started_here(short_dir: Path) -> None:
    first = EmbeddedPostgres(short_dir / "data").ensure_running()
    second = EmbeddedPostgres(short_dir / "data").ensure_running()
    third = EmbeddedPostgres(short_dir / "data").ensure_running()

    assert first.started_here
    assert not second.started_here
    assert not third.started_here
    assert first.dsn() == second.dsn() == third.dsn()


def test_concurrent_ensure_running_starts_exactly_once(short_dir: Path) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        infos = list(pool.map(lambda _: EmbeddedPostgres(short_dir / "data").ensure_running(), range(4)))

    assert sorted(info.started_here for info in infos) == [False, False, False, True]


def test_dsn_works_with_asyncpg_and_psycopg_and_settings_apply(short_dir: Path) -> None:
    dsn = EmbeddedPostgres(short_dir / "data").ensure_running().dsn()

    async def via_asyncpg() -> tuple[str, str]:
        conn = await asyncpg.connect(dsn)
        try:
            row = await conn.fetchrow("SELECT current_user, current_database()")
            return row[0], row[1]
        finally:
            await conn.close()

    assert asyncio.run(via_asyncpg()) == ("lwapi", "lwapi")
    names = ["shared_buffers", "max_connections", "fsync", "synchronous_commit", "listen_addresses"]
    with psycopg.connect(dsn) as conn:
        values = [conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0] for name in names]
        encoding = conn.execute(
            "SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = current_database()"
        ).fetchone()[0]
    assert values == ["128MB", "200", "on", "on", ""]
    assert encoding == "UTF8"


def test_socket_dir_with_space_is_quoted_everywhere(short_dir: Path) -> None:
    info = EmbeddedPostgres(short_dir / "with space").ensure_running()

    assert "with%20space" in info.dsn()
    with psycopg.connect(info.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_stop_is_clean(short_dir: Path) -> None:
    server = EmbeddedPostgres(short_dir / "data")
    server.ensure_running()
    pid = _postmaster_pid(server)

    server.stop()

    assert not server.is_running()
    assert not (server.pg_dir / "postmaster.pid").exists()
    _wait_dead(pid)
    assert "database system is shut down" in server.log_file.read_text()
    server.stop()  # stopping a stopped server is a no-op
    size = server.log_file.stat().st_size
    server.ensure_running()
    with server.log_file.open() as log:
        log.seek(size)
        assert "not properly shut down" not in log.read()
    with pytest.raises(ValueError, match="mode"):
        server.stop(mode="violent")


def test_stale_pid_after_sigkill_recovers(short_dir: Path) -> None:
    server = EmbeddedPostgres(short_dir / "data")
    info = server.ensure_running()
    with psycopg.connect(info.dsn()) as conn:
        conn.execute("CREATE TABLE committed (v int)")
        conn.execute("INSERT INTO committed VALUES (42)")
    pid = _postmaster_pid(server)

    os.kill(pid, signal.SIGKILL)
    _wait_dead(pid)

    assert (server.pg_dir / "postmaster.pid").exists()
    assert not server.is_running()
    recovered = server.ensure_running()
    assert recovered.started_here
    assert _postmaster_pid(server) != pid
    with psycopg.connect(recovered.dsn()) as conn:
        assert conn.execute("SELECT v FROM committed").fetchone() == (42,)


@pytest.mark.parametrize("holder", ["gone", "reused"])
def test_leftover_pid_files_do_not_block_start(short_dir: Path, holder: str) -> None:
    """postmaster.pid and the socket lock naming a vanished PID, or one reused by another process."""
    server = EmbeddedPostgres(short_dir / "data")
    server.ensure_running()
    pid_file = server.pg_dir / "postmaster.pid"
    socket_lock = server.socket_dir / ".s.PGSQL.5432.lock"
    saved = {path: path.read_text() for path in (pid_file, socket_lock)}
    server.stop()
    uid, gid = _owner(server.pg_dir)
    # Same owner as the server, so postgres's own kill(pid, 0) probe sees a live process.
    as_owner = {"user": uid, "group": gid} if os.geteuid() == 0 else {}
    other = subprocess.Popen(["sleep", "60"], **as_owner)
    try:
        if holder == "gone":
            other.kill()
            other.wait()
        for path, text in saved.items():
            path.write_text(f"{other.pid}\n" + text.split("\n", 1)[1])
            shutil.chown(path, uid, gid)

        assert not server.is_running()
        assert server.ensure_running().started_here
        assert server.is_running()
    finally:
        other.kill()
        other.wait()


def _owner(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_uid, info.st_gid


def test_too_long_socket_path_fails_clearly_before_touching_disk(short_dir: Path) -> None:
    data_dir = short_dir / ("d" * 100)

    with pytest.raises(EmbeddedPostgresError, match="shorter --data-dir") as caught:
        EmbeddedPostgres(data_dir)

    assert str(MAX_SOCKET_PATH_BYTES) in str(caught.value)
    assert not data_dir.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to the lwapi-pg account")
def test_untraversable_parent_fails_clearly_as_root(short_dir: Path) -> None:
    locked = short_dir / "locked"
    locked.mkdir(mode=0o700)

    with pytest.raises(EmbeddedPostgresError, match="traverse") as caught:
        EmbeddedPostgres(locked / "data").ensure_running()

    assert str(locked) in str(caught.value)
    assert "lwapi-pg" in str(caught.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="root-only behaviour")
def test_as_root_the_cluster_belongs_to_the_server_account(short_dir: Path) -> None:
    server = EmbeddedPostgres(short_dir / "data")
    server.ensure_running()

    account = pwd.getpwnam("lwapi-pg")
    assert server.pg_dir.stat().st_uid == account.pw_uid
    assert Path(f"/proc/{_postmaster_pid(server)}").stat().st_uid == account.pw_uid


@pytest.mark.skipif(not (SYSTEM_PG15 / "postgres").exists(), reason="needs system PostgreSQL 15 binaries")
def test_bindir_override_and_version_guard(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LWAPI_PG_BINDIR", str(SYSTEM_PG15))
    server = EmbeddedPostgres(short_dir / "data")
    server.ensure_running()
    server.stop()
    assert (server.pg_dir / "PG_VERSION").read_text().strip() == "15"
    monkeypatch.delenv("LWAPI_PG_BINDIR")

    # Without an override, the binaries matching the existing cluster are picked.
    assert server_major_version(EmbeddedPostgres(short_dir / "data").bindir) == 15
    default_bindir = EmbeddedPostgres(short_dir / "fresh").bindir
    if server_major_version(default_bindir) != 15:
        with pytest.raises(EmbeddedPostgresError, match="created by PostgreSQL 15"):
            EmbeddedPostgres(short_dir / "data", bindir=default_bindir).ensure_running()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adapters.pg_embedded", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_start_status_url_stop(short_dir: Path) -> None:
    data = str(short_dir / "data")

    started = _cli("start", "--data-dir", data)
    assert started.returncode == 0, started.stderr
    dsn = started.stdout.strip()
    assert dsn.startswith("postgresql://lwapi@/lwapi?host=")
    assert _cli("url", "--data-dir", data).stdout.strip() == dsn
    status = _cli("status", "--data-dir", data)
    assert (status.returncode, status.stdout.strip()) == (0, "running")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("lwapi",)

    assert _cli("stop", "--data-dir", data).returncode == 0
    status = _cli("status", "--data-dir", data)
    assert (status.returncode, status.stdout.strip()) == (3, "stopped")
    too_long = _cli("start", "--data-dir", "/tmp/" + "x" * 120)
    assert too_long.returncode == 1
    assert "shorter --data-dir" in too_long.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to an unprivileged account")
def test_binaries_in_a_private_checkout_are_staged_where_the_server_can_run_them(short_dir: Path) -> None:
    """A checkout under /root (mode 0700) holds binaries the server account cannot execute."""
    private = Path(tempfile.mkdtemp(prefix="lwapi-private.", dir="/tmp"))
    private.chmod(0o700)
    try:
        site = Path(find_bindir()).resolve().parent.parent.parent  # …/site-packages
        if not (site / "pgserver.libs").is_dir():
            pytest.fail("expected the pgserver wheel's layout (pgserver/pginstall/bin beside pgserver.libs)")
        shutil.copytree(site / "pgserver", private / "pgserver", symlinks=True)
        shutil.copytree(site / "pgserver.libs", private / "pgserver.libs", symlinks=True)
        server = EmbeddedPostgres(short_dir, bindir=private / "pgserver" / "pginstall" / "bin")
        info = server.ensure_running()
        staged = server.bindir
        assert staged.is_relative_to(STAGED_BINARIES_DIR)
        with psycopg.connect(info.dsn()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        server.stop()
        shutil.rmtree(staged.parents[2])
    finally:
        shutil.rmtree(private, ignore_errors=True)
