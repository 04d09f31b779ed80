"""The embedded server itself: a private PostgreSQL cluster under ``DATA_DIR/pg``.

Imports: stdlib and the other modules of adapters.pg_embedded. The layout it keeps:

* ``DATA_DIR/pg/``            the cluster (PGDATA), created with ``initdb`` on first use;
* ``DATA_DIR/pg/run/``        the unix-socket directory (the server listens on no TCP port);
* ``DATA_DIR/pg/log/postgres.log``  the server log (``pg_ctl -l``);
* ``DATA_DIR/pg.lock``        an advisory lock serialising concurrent ``ensure_running``/``stop``.

Authentication is ``trust``; that is safe because the only way in is the socket inside PGDATA, a
0700 directory owned by the server's OS account.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from adapters.pg_embedded.account import ServerAccount, check_traversable, chown_tree, server_account
from adapters.pg_embedded.binaries import (
    BINDIR_ENV,
    candidate_bindirs,
    find_bindir,
    reachable_by_server,
    server_major_version,
)
from adapters.pg_embedded.config import CONFIG_FILE, INCLUDE_LINE, config_text
from adapters.pg_embedded.errors import EmbeddedPostgresError
from adapters.pg_embedded.processes import (
    PROC,
    cwd_of,
    last_lines,
    live_processes_in,
    log_tail,
    output_of,
    pid_alive,
    pid_in,
    proc_state,
    run_as,
)

DB_SUPERUSER = "lwapi"
DB_NAME = "lwapi"
MAX_SOCKET_PATH_BYTES = 103
STOP_MODES = ("smart", "fast", "immediate")
_INITDB_TIMEOUT_S = 180.0
_CLIENT_TIMEOUT_S = 30.0
_QUICK_TIMEOUT_S = 15.0
_RETRYABLE = re.compile(r'pre-existing shared memory block|lock file ".*" already exists')
_CREATE_DB_SQL = (
    "SELECT format('CREATE DATABASE %I', :'dbname') "
    "WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'dbname')\\gexec\n"
)


@dataclass(frozen=True)
class PgServerInfo:
    """Where to reach a running embedded server, and whether ``ensure_running`` started it."""

    socket_dir: Path
    port: int
    dbname: str
    user: str
    started_here: bool

    def dsn(self) -> str:
        """Return a libpq URL (accepted by asyncpg and psycopg) that connects over the socket."""
        host = quote(str(self.socket_dir), safe="/")
        return f"postgresql://{quote(self.user)}@/{quote(self.dbname)}?host={host}&port={self.port}"


class EmbeddedPostgres:
    """A private PostgreSQL cluster under ``data_dir/pg``, reachable only over its unix socket."""

    def __init__(
        self,
        data_dir: Path,
        *,
        bindir: Path | None = None,
        port: int = 5432,
        startup_timeout_s: float = 30.0,
    ) -> None:
        """Describe the cluster; nothing is touched until ``ensure_running``/``stop`` is called.

        Raises EmbeddedPostgresError at once when the socket path would be too long.
        """
        self.data_dir = Path(data_dir).absolute()
        self.pg_dir = self.data_dir / "pg"
        self.socket_dir = self.pg_dir / "run"
        self.log_file = self.pg_dir / "log" / "postgres.log"
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self._explicit_bindir = bindir
        self._bindir: Path | None = None
        self._check_socket_path()

    # ---- public API

    def ensure_running(self) -> PgServerInfo:
        """Initialise the cluster if needed, start it if it is not running, create the database.

        Idempotent; ``started_here`` in the result tells whether this call started the server.
        """
        with self._exclusive_lock():
            account = self._prepare()
            if not self._initialised():
                self._initdb(account)
            self._write_config(account)
            started = not self._running(account)
            if started:
                self._start(account)
            self._ensure_database(account)
        return self.info(started_here=started)

    def stop(self, *, mode: str = "fast", timeout_s: float = 30.0) -> None:
        """Stop the server (``smart``, ``fast`` or ``immediate``); a no-op when it is not running."""
        if mode not in STOP_MODES:
            raise ValueError(f"mode must be one of {STOP_MODES}, not {mode!r}")
        if not self._initialised():
            return
        with self._exclusive_lock():
            account = self._account_if_initialised()
            if not self._running(account):
                return
            argv: list[str | Path] = [
                self._pg_ctl(),
                "stop",
                "-D",
                self.pg_dir,
                "-m",
                mode,
                "-w",
                "-t",
                _secs(timeout_s),
            ]
            done = run_as(argv, account=account, cwd=self.pg_dir, timeout_s=timeout_s + 10)
            if done.returncode != 0:
                raise EmbeddedPostgresError(
                    f"pg_ctl stop failed: {output_of(done)}\n--- {self.log_file}:\n{log_tail(self.log_file)}"
                )

    def is_running(self) -> bool:
        """Tell whether the cluster's postmaster is alive (postmaster.pid + ``pg_ctl status``)."""
        return self._running(self._account_if_initialised())

    def info(self, *, started_here: bool = False) -> PgServerInfo:
        """Return the connection details (the server need not be running)."""
        return PgServerInfo(self.socket_dir, self.port, DB_NAME, DB_SUPERUSER, started_here)

    @property
    def bindir(self) -> Path:
        """The bin directory in use (resolved lazily, matching an existing cluster's version)."""
        if self._bindir is None:
            self._bindir = reachable_by_server(self._resolve_bindir())
        return self._bindir

    # ---- checks and preparation

    def _check_socket_path(self) -> None:
        socket_path = self.socket_dir / f".s.PGSQL.{self.port}"
        size = len(os.fsencode(socket_path))
        if size > MAX_SOCKET_PATH_BYTES:
            raise EmbeddedPostgresError(
                f"unix socket path {socket_path} is {size} bytes, over the "
                f"{MAX_SOCKET_PATH_BYTES}-byte limit of unix sockets; "
                f"use a shorter --data-dir (now {self.data_dir})"
            )

    def _prepare(self) -> ServerAccount | None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        account = server_account()
        if account is not None:
            check_traversable(self.pg_dir, account, "data directory")
            check_traversable(self.bindir / "postgres", account, "PostgreSQL binaries")
        if not self.pg_dir.exists():
            self.pg_dir.mkdir(mode=0o700)
        if account is not None and self.pg_dir.stat().st_uid != account.uid:
            chown_tree(self.pg_dir, account)
        return account

    def _account_if_initialised(self) -> ServerAccount | None:
        if os.geteuid() != 0 or not self._initialised():
            return None
        return server_account()

    def _initialised(self) -> bool:
        return (self.pg_dir / "PG_VERSION").is_file()

    def _cluster_major_version(self) -> int | None:
        try:
            return int((self.pg_dir / "PG_VERSION").read_text().strip())
        except (OSError, ValueError):
            return None

    def _resolve_bindir(self) -> Path:
        cluster = self._cluster_major_version()
        explicit = self._explicit_bindir or (Path(os.environ[BINDIR_ENV]) if os.environ.get(BINDIR_ENV) else None)
        if explicit is not None or cluster is None:
            bindir = find_bindir(explicit)
            self._check_version(bindir, cluster)
            return bindir
        for bindir in candidate_bindirs():
            if server_major_version(bindir) == cluster:
                return bindir
        raise EmbeddedPostgresError(
            f"cluster {self.pg_dir} was created by PostgreSQL {cluster} and no PostgreSQL {cluster} "
            f"binaries were found; set {BINDIR_ENV} to them"
        )

    def _check_version(self, bindir: Path, cluster: int | None) -> None:
        if cluster is not None and (binaries := server_major_version(bindir)) != cluster:
            raise EmbeddedPostgresError(
                f"cluster {self.pg_dir} was created by PostgreSQL {cluster} but {bindir} holds "
                f"PostgreSQL {binaries}; point {BINDIR_ENV} at PostgreSQL {cluster} binaries"
            )

    def _pg_ctl(self) -> Path:
        return self.bindir / "pg_ctl"

    @contextlib.contextmanager
    def _exclusive_lock(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.startup_timeout_s + 30
        with (self.data_dir / "pg.lock").open("a") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EmbeddedPostgresError(f"timed out waiting for {self.data_dir / 'pg.lock'}") from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ---- initdb and configuration

    def _initdb(self, account: ServerAccount | None) -> None:
        leftovers = [p.name for p in self.pg_dir.iterdir()]
        if leftovers:
            raise EmbeddedPostgresError(
                f"{self.pg_dir} is not an initialised cluster (no PG_VERSION) but is not empty either "
                f"({', '.join(sorted(leftovers)[:5])}); move it away and retry"
            )
        done = self._run_initdb(account, "--locale=C.UTF-8")
        if done.returncode != 0 and "locale" in output_of(done).lower():
            done = self._run_initdb(account, "--no-locale")
        if done.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed (exit {done.returncode}):\n{last_lines(output_of(done))}")
        with (self.pg_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n" + INCLUDE_LINE)

    def _run_initdb(self, account: ServerAccount | None, locale: str) -> subprocess.CompletedProcess[str]:
        argv: list[str | Path] = [
            self.bindir / "initdb",
            "-D",
            self.pg_dir,
            "-U",
            DB_SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            locale,
        ]
        return run_as(argv, account=account, cwd=self.pg_dir, timeout_s=_INITDB_TIMEOUT_S)

    def _write_config(self, account: ServerAccount | None) -> None:
        for directory in (self.socket_dir, self.log_file.parent):
            directory.mkdir(mode=0o700, exist_ok=True)
        target = self.pg_dir / CONFIG_FILE
        scratch = target.with_suffix(".tmp")
        scratch.write_text(config_text(self.port, self.socket_dir))
        if account is not None:
            for path in (scratch, self.socket_dir, self.log_file.parent):
                os.lchown(path, account.uid, account.gid)
        scratch.replace(target)

    # ---- running state, start, database

    def _postmaster_pid(self) -> int | None:
        return pid_in(self.pg_dir / "postmaster.pid")

    def _pid_is_our_postmaster(self, pid: int) -> bool:
        if not pid_alive(pid):
            return False
        cwd = cwd_of(pid)
        return cwd is None or cwd == self.pg_dir.resolve()  # a postmaster's cwd is its PGDATA

    def _clear_dead_lockfiles(self) -> None:
        """Remove postmaster.pid / socket lock files whose PID exists but is not our postmaster.

        That PID is a zombie (a SIGKILLed postmaster its new parent has not reaped yet) or a
        reused one; postgres refuses to start over either, while it handles a PID that is gone
        entirely by itself. Only done once no live process sits in PGDATA, so a surviving
        backend still guards the old shared memory.
        """
        lockfiles = (self.pg_dir / "postmaster.pid", self.socket_dir / f".s.PGSQL.{self.port}.lock")
        stale = [path for path in lockfiles if self._held_by_non_postmaster(path)]
        if stale and not live_processes_in(self.pg_dir.resolve()):
            for path in stale:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _held_by_non_postmaster(self, lockfile: Path) -> bool:
        pid = pid_in(lockfile)
        if pid is None or not PROC.is_dir() or proc_state(pid) is None:
            return False
        return not self._pid_is_our_postmaster(pid)

    def _running(self, account: ServerAccount | None) -> bool:
        pid = self._postmaster_pid()
        if pid is None or not self._pid_is_our_postmaster(pid):
            return False
        done = run_as(
            [self._pg_ctl(), "status", "-D", self.pg_dir],
            account=account,
            cwd=self.pg_dir,
            timeout_s=_QUICK_TIMEOUT_S,
        )
        return done.returncode == 0

    def _start(self, account: ServerAccount | None) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            self._clear_dead_lockfiles()
            offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            done = self._pg_ctl_start(account, max(deadline - time.monotonic(), 1.0))
            if done.returncode == 0:
                return
            log = log_tail(self.log_file, offset)
            # After a postmaster crash its children take a moment to exit and release shared memory.
            if not _RETRYABLE.search(log) or time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"PostgreSQL failed to start (pg_ctl exit {done.returncode}): {output_of(done)}\n"
                    f"--- {self.log_file}:\n{log}"
                )
            time.sleep(0.2)

    def _pg_ctl_start(self, account: ServerAccount | None, timeout_s: float) -> subprocess.CompletedProcess[str]:
        argv: list[str | Path] = [
            self._pg_ctl(),
            "start",
            "-D",
            self.pg_dir,
            "-l",
            self.log_file,
            "-w",
            "-s",
            "-t",
            _secs(timeout_s),
        ]
        return run_as(argv, account=account, cwd=self.pg_dir, timeout_s=timeout_s + 10)

    def _ensure_database(self, account: ServerAccount | None) -> None:
        argv: list[str | Path] = [
            self.bindir / "psql",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"dbname={DB_NAME}",
            "-h",
            self.socket_dir,
            "-p",
            str(self.port),
            "-U",
            DB_SUPERUSER,
            "-d",
            "postgres",
            "-f",
            "-",
        ]
        done = run_as(argv, account=account, cwd=self.pg_dir, timeout_s=_CLIENT_TIMEOUT_S, stdin=_CREATE_DB_SQL)
        if done.returncode != 0:
            raise EmbeddedPostgresError(f"creating database {DB_NAME!r} failed: {output_of(done)}")


def _secs(seconds: float) -> str:
    return str(max(1, int(seconds + 0.999)))
