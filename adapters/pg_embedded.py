"""Manage a private, embedded PostgreSQL server that lives in a local data folder.

The service (``scripts/serve``), the CLI and the test suite use this module to get a
PostgreSQL server without any system-wide setup:

* ``DATA_DIR/pg/``            the cluster (PGDATA), created with ``initdb`` on first use;
* ``DATA_DIR/pg/run/``        the unix-socket directory (the server listens on no TCP port);
* ``DATA_DIR/pg/log/postgres.log``  the server log (``pg_ctl -l``);
* ``DATA_DIR/pg.lock``        an advisory lock serialising concurrent ``ensure_running``/``stop``.

Binaries come from, in order: an explicit ``bindir``, the ``LWAPI_PG_BINDIR`` environment
variable, the binaries bundled in the ``pgserver`` wheel, ``pg_config --bindir``, and the newest
``/usr/lib/postgresql/*/bin``. Authentication is ``trust``; that is safe because the only way in
is the socket inside PGDATA, a 0700 directory owned by the server's OS account.

PostgreSQL refuses to run as root, so when this process is root every server-side command runs
as the system account ``lwapi-pg`` (created on demand), which owns ``DATA_DIR/pg``.

Run ``python -m adapters.pg_embedded start|stop|status|url --data-dir DIR`` for a small CLI.

This module may import only the Python standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError", "PgServerInfo", "find_bindir", "main"]

SERVER_OS_USER = "lwapi-pg"
DB_SUPERUSER = "lwapi"
DB_NAME = "lwapi"
BINDIR_ENV = "LWAPI_PG_BINDIR"
MAX_SOCKET_PATH_BYTES = 103
STOP_MODES = ("smart", "fast", "immediate")
REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres", "psql")
SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": "",
    "unix_socket_permissions": "0700",
    "shared_buffers": "128MB",
    "max_connections": "200",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "logging_collector": "off",
}
_CONFIG_FILE = "lwapi.conf"
_INCLUDE_LINE = f"include_if_exists = '{_CONFIG_FILE}'  # added by adapters.pg_embedded\n"
_INITDB_TIMEOUT_S = 180.0
_CLIENT_TIMEOUT_S = 30.0
_QUICK_TIMEOUT_S = 15.0
_LOG_TAIL_LINES = 25
_RETRYABLE = re.compile(r'pre-existing shared memory block|lock file ".*" already exists')
_PROC = Path("/proc")
_CREATE_DB_SQL = (
    "SELECT format('CREATE DATABASE %I', :'dbname') "
    "WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'dbname')\\gexec\n"
)


class EmbeddedPostgresError(Exception):
    """The embedded PostgreSQL server could not be located, initialised, started or stopped."""


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


@dataclass(frozen=True)
class _Account:
    """The OS account the server runs as, when it differs from the current (root) user."""

    name: str
    uid: int
    gid: int
    groups: frozenset[int]


# --------------------------------------------------------------------------- binaries


def _has_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in REQUIRED_BINARIES)


def _pgserver_bindir() -> Path | None:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=_QUICK_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def _debian_bindirs() -> list[Path]:
    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    return sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)


def candidate_bindirs() -> list[Path]:
    """Return the automatically discovered bin directories, most preferred first."""
    found: list[Path] = []
    for bindir in [_pgserver_bindir(), _pg_config_bindir(), *_debian_bindirs()]:
        if bindir is not None and bindir not in found and _has_binaries(bindir):
            found.append(bindir)
    return found


def find_bindir(explicit: Path | None = None) -> Path:
    """Return the PostgreSQL bin directory to use (explicit, ``$LWAPI_PG_BINDIR``, discovered)."""
    chosen = explicit or (Path(os.environ[BINDIR_ENV]) if os.environ.get(BINDIR_ENV) else None)
    if chosen is not None:
        if not _has_binaries(chosen):
            raise EmbeddedPostgresError(f"{chosen} lacks one of {', '.join(REQUIRED_BINARIES)}")
        return chosen
    candidates = candidate_bindirs()
    if not candidates:
        raise EmbeddedPostgresError(
            f"no PostgreSQL binaries found: install the 'pgserver' package or PostgreSQL, or set {BINDIR_ENV}"
        )
    return candidates[0]


def server_major_version(bindir: Path) -> int:
    """Return the major version of ``bindir/postgres`` (e.g. 16)."""
    out = subprocess.run(  # noqa: S603 - fixed argv, no shell
        [str(bindir / "postgres"), "--version"],
        capture_output=True,
        text=True,
        timeout=_QUICK_TIMEOUT_S,
        check=False,
    )
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out.stdout)
    if match is None:
        raise EmbeddedPostgresError(f"cannot tell the version of {bindir / 'postgres'}: {out.stdout!r}")
    return int(match.group(1))


# --------------------------------------------------------------------------- OS account


def _lookup_account(name: str) -> _Account | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    groups = frozenset(os.getgrouplist(name, entry.pw_gid))
    return _Account(name=name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups)


def _create_system_user(name: str) -> None:
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    argv = [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_CLIENT_TIMEOUT_S, check=False)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedPostgresError(f"cannot create system user {name!r}: {exc}") from exc
    if done.returncode != 0 and _lookup_account(name) is None:
        raise EmbeddedPostgresError(f"useradd {name} failed: {done.stderr.strip()}")


def server_account() -> _Account | None:
    """Return the account to run the server as: ``None`` (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    account = _lookup_account(SERVER_OS_USER)
    if account is None:
        _create_system_user(SERVER_OS_USER)
        account = _lookup_account(SERVER_OS_USER)
    if account is None:
        raise EmbeddedPostgresError(f"system user {SERVER_OS_USER!r} still missing after useradd")
    return account


def _can_traverse(path: Path, account: _Account) -> bool:
    info = path.stat()
    if info.st_uid == account.uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid in account.groups:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def check_traversable(target: Path, account: _Account, purpose: str) -> None:
    """Raise unless ``account`` can traverse ``target`` and every directory above it."""
    chain = {*target.absolute().parents, *target.resolve().parents, target.resolve()}
    for directory in sorted(chain, key=lambda p: len(p.parts)):
        if directory.is_dir() and not _can_traverse(directory, account):
            raise EmbeddedPostgresError(
                f"PostgreSQL refuses to run as root, so it runs as OS user {account.name!r}, which cannot "
                f"traverse directory {directory} (needed for the {purpose}). Make it traversable "
                f"(e.g. `chmod o+x {directory}`) or use a --data-dir whose parents are world-traversable "
                "(e.g. under /var/lib or /srv)."
            )


STAGED_BINARIES_DIR = Path("/var/lib/lwapi-pg")


def _reachable_by_server(bindir: Path) -> Path:
    """`bindir`, or a copy of its installation the server account can reach.

    As root the server runs as an unprivileged account, which cannot execute binaries inside a
    checkout under a private home (e.g. /root, mode 0700); PostgreSQL installations are relocatable,
    so the whole tree (bin, lib, share) is copied once to a world-traversable place.
    """
    account = server_account()
    if account is None:
        return bindir
    try:
        check_traversable(bindir / "postgres", account, "PostgreSQL binaries")
    except EmbeddedPostgresError:
        pass
    else:
        return bindir
    install = bindir.resolve().parent
    digest = hashlib.sha256(str(install).encode()).hexdigest()[:12]
    target = STAGED_BINARIES_DIR / f"pginstall-{server_major_version(bindir)}-{digest}"
    # wheels keep shared libraries beside the package (RPATH $ORIGIN/../../../pgserver.libs): keep that shape
    wheel_libs = install.parent.parent / f"{install.parent.name}.libs"
    layout = [(install, Path(install.parent.name) / install.name)]
    if wheel_libs.is_dir():
        layout.append((wheel_libs, Path(wheel_libs.name)))
    if not (target / layout[0][1] / "bin" / "postgres").exists():
        STAGED_BINARIES_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=STAGED_BINARIES_DIR))
        for source, relative in layout:
            shutil.copytree(source, staging / "tree" / relative, symlinks=True)
        for folder in (staging, *(p for p in (staging / "tree").rglob("*") if p.is_dir())):
            folder.chmod(0o755)
        with contextlib.suppress(OSError):  # another process staged it first
            (staging / "tree").rename(target)
        shutil.rmtree(staging, ignore_errors=True)
    target = target / layout[0][1]
    check_traversable(target / "bin" / "postgres", account, "PostgreSQL binaries")
    return target / "bin"


def _chown_tree(root: Path, account: _Account) -> None:
    os.lchown(root, account.uid, account.gid)
    for parent, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.lchown(Path(parent) / name, account.uid, account.gid)


# --------------------------------------------------------------------------- subprocesses


def _child_env(account: _Account | None, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and not k.startswith("LC_")}
    env["LC_ALL"] = "C"
    if account is not None:
        env.update(HOME=str(home), USER=account.name, LOGNAME=account.name)
    return env


def _run(
    argv: Sequence[str | Path],
    *,
    account: _Account | None,
    cwd: Path,
    timeout_s: float,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (as ``account`` when given) with a timeout; never raises on a non-zero exit."""
    try:
        return subprocess.run(  # noqa: S603 - argv built here, no shell
            [str(arg) for arg in argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=cwd,
            env=_child_env(account, cwd),
            check=False,
            user=None if account is None else account.uid,
            group=None if account is None else account.gid,
            extra_groups=None if account is None else sorted(account.groups),
        )
    except subprocess.TimeoutExpired as exc:
        raise EmbeddedPostgresError(f"{Path(argv[0]).name} timed out after {timeout_s:.0f}s") from exc
    except OSError as exc:
        raise EmbeddedPostgresError(f"cannot run {argv[0]}: {exc}") from exc


def _output(done: subprocess.CompletedProcess[str]) -> str:
    return "\n".join(part.strip() for part in (done.stdout, done.stderr) if part.strip())


def _tail(path: Path, offset: int = 0, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log empty)"


def _pid_in(lockfile: Path) -> int | None:
    """Return the PID on the first line of a postgres lock file, if any."""
    try:
        return int(lockfile.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _proc_state(pid: int) -> str | None:
    """Return the state letter of ``pid`` from /proc ("S", "R", "Z", ...), or None if there is none."""
    try:
        line = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = line.rpartition(")")[2].split()
    return fields[0] if fields else None


def _pid_alive(pid: int) -> bool:
    """Tell whether ``pid`` is a live process; zombies count as dead."""
    if _PROC.is_dir():
        return _proc_state(pid) not in (None, "Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cwd_of(pid: int) -> Path | None:
    try:
        return Path(os.readlink(_PROC / str(pid) / "cwd"))
    except OSError:
        return None


def _live_processes_in(directory: Path) -> bool:
    """Tell whether any live process has ``directory`` as its working directory."""
    for entry in _PROC.iterdir():
        if entry.name.isdigit() and _cwd_of(int(entry.name)) == directory and _pid_alive(int(entry.name)):
            return True
    return False


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


# --------------------------------------------------------------------------- the server


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
            done = _run(argv, account=account, cwd=self.pg_dir, timeout_s=timeout_s + 10)
            if done.returncode != 0:
                raise EmbeddedPostgresError(
                    f"pg_ctl stop failed: {_output(done)}\n--- {self.log_file}:\n{_tail(self.log_file)}"
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
            self._bindir = _reachable_by_server(self._resolve_bindir())
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

    def _prepare(self) -> _Account | None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        account = server_account()
        if account is not None:
            check_traversable(self.pg_dir, account, "data directory")
            check_traversable(self.bindir / "postgres", account, "PostgreSQL binaries")
        if not self.pg_dir.exists():
            self.pg_dir.mkdir(mode=0o700)
        if account is not None and self.pg_dir.stat().st_uid != account.uid:
            _chown_tree(self.pg_dir, account)
        return account

    def _account_if_initialised(self) -> _Account | None:
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
        explicit = self._explicit_bindir or (
            Path(os.environ[BINDIR_ENV]) if os.environ.get(BINDIR_ENV) else None
        )
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
                        raise EmbeddedPostgresError(
                            f"timed out waiting for {self.data_dir / 'pg.lock'}"
                        ) from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ---- initdb and configuration

    def _initdb(self, account: _Account | None) -> None:
        leftovers = [p.name for p in self.pg_dir.iterdir()]
        if leftovers:
            raise EmbeddedPostgresError(
                f"{self.pg_dir} is not an initialised cluster (no PG_VERSION) but is not empty either "
                f"({', '.join(sorted(leftovers)[:5])}); move it away and retry"
            )
        done = self._run_initdb(account, "--locale=C.UTF-8")
        if done.returncode != 0 and "locale" in _output(done).lower():
            done = self._run_initdb(account, "--no-locale")
        if done.returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb failed (exit {done.returncode}):\n{_tail_text(_output(done))}"
            )
        with (self.pg_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n" + _INCLUDE_LINE)

    def _run_initdb(self, account: _Account | None, locale: str) -> subprocess.CompletedProcess[str]:
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
        return _run(argv, account=account, cwd=self.pg_dir, timeout_s=_INITDB_TIMEOUT_S)

    def _write_config(self, account: _Account | None) -> None:
        for directory in (self.socket_dir, self.log_file.parent):
            directory.mkdir(mode=0o700, exist_ok=True)
        settings = {
            **SERVER_SETTINGS,
            "port": str(self.port),
            "unix_socket_directories": f'"{self.socket_dir}"',
        }
        body = "".join(f"{key} = {_conf_quote(value)}\n" for key, value in settings.items())
        target = self.pg_dir / _CONFIG_FILE
        scratch = target.with_suffix(".tmp")
        scratch.write_text("# Written by adapters.pg_embedded on every start; edits are lost.\n" + body)
        if account is not None:
            for path in (scratch, self.socket_dir, self.log_file.parent):
                os.lchown(path, account.uid, account.gid)
        scratch.replace(target)

    # ---- running state, start, database

    def _postmaster_pid(self) -> int | None:
        return _pid_in(self.pg_dir / "postmaster.pid")

    def _pid_is_our_postmaster(self, pid: int) -> bool:
        if not _pid_alive(pid):
            return False
        cwd = _cwd_of(pid)
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
        if stale and not _live_processes_in(self.pg_dir.resolve()):
            for path in stale:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _held_by_non_postmaster(self, lockfile: Path) -> bool:
        pid = _pid_in(lockfile)
        if pid is None or not _PROC.is_dir() or _proc_state(pid) is None:
            return False
        return not self._pid_is_our_postmaster(pid)

    def _running(self, account: _Account | None) -> bool:
        pid = self._postmaster_pid()
        if pid is None or not self._pid_is_our_postmaster(pid):
            return False
        done = _run(
            [self._pg_ctl(), "status", "-D", self.pg_dir],
            account=account,
            cwd=self.pg_dir,
            timeout_s=_QUICK_TIMEOUT_S,
        )
        return done.returncode == 0

    def _start(self, account: _Account | None) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            self._clear_dead_lockfiles()
            offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            done = self._pg_ctl_start(account, max(deadline - time.monotonic(), 1.0))
            if done.returncode == 0:
                return
            log = _tail(self.log_file, offset)
            # After a postmaster crash its children take a moment to exit and release shared memory.
            if not _RETRYABLE.search(log) or time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"PostgreSQL failed to start (pg_ctl exit {done.returncode}): {_output(done)}\n"
                    f"--- {self.log_file}:\n{log}"
                )
            time.sleep(0.2)

    def _pg_ctl_start(self, account: _Account | None, timeout_s: float) -> subprocess.CompletedProcess[str]:
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
        return _run(argv, account=account, cwd=self.pg_dir, timeout_s=timeout_s + 10)

    def _ensure_database(self, account: _Account | None) -> None:
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
        done = _run(argv, account=account, cwd=self.pg_dir, timeout_s=_CLIENT_TIMEOUT_S, stdin=_CREATE_DB_SQL)
        if done.returncode != 0:
            raise EmbeddedPostgresError(f"creating database {DB_NAME!r} failed: {_output(done)}")


def _secs(seconds: float) -> str:
    return str(max(1, int(seconds + 0.999)))


def _tail_text(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m adapters.pg_embedded", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=("start", "stop", "status", "url"))
    parser.add_argument(
        "--data-dir", type=Path, required=True, help="folder holding pg/ (created if missing)"
    )
    parser.add_argument(
        "--bindir",
        type=Path,
        default=None,
        help=f"PostgreSQL bin dir (default: ${BINDIR_ENV}, then pgserver's, then the system's)",
    )
    parser.add_argument("--port", type=int, default=5432, help="port number naming the socket (no TCP)")
    parser.add_argument("--mode", choices=STOP_MODES, default="fast", help="shutdown mode for stop")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for start/stop")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI.

    ``start`` prints the DSN, ``stop`` stops, ``status`` exits 0 if running else 3, ``url`` prints the DSN.
    """
    args = _parser().parse_args(argv)
    try:
        server = EmbeddedPostgres(
            args.data_dir, bindir=args.bindir, port=args.port, startup_timeout_s=args.timeout
        )
        if args.command == "start":
            print(server.ensure_running().dsn())
        elif args.command == "stop":
            server.stop(mode=args.mode, timeout_s=args.timeout)
        elif args.command == "status":
            running = server.is_running()
            print("running" if running else "stopped")
            return 0 if running else 3
        else:
            print(server.info().dsn())
    except EmbeddedPostgresError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
