"""Finding the PostgreSQL binaries, and staging a copy the server account can execute.

Imports: stdlib, adapters.pg_embedded.errors, adapters.pg_embedded.account. Binaries come from, in
order: an explicit ``bindir``, the ``LWAPI_PG_BINDIR`` environment variable, the binaries bundled in
the ``pgserver`` wheel, ``pg_config --bindir``, and the newest ``/usr/lib/postgresql/*/bin``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from adapters.pg_embedded.account import check_traversable, server_account
from adapters.pg_embedded.errors import EmbeddedPostgresError

BINDIR_ENV = "LWAPI_PG_BINDIR"
REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres", "psql")
STAGED_BINARIES_DIR = Path("/var/lib/lwapi-pg")
_QUERY_TIMEOUT_S = 15.0


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
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=_QUERY_TIMEOUT_S, check=False
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
        timeout=_QUERY_TIMEOUT_S,
        check=False,
    )
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out.stdout)
    if match is None:
        raise EmbeddedPostgresError(f"cannot tell the version of {bindir / 'postgres'}: {out.stdout!r}")
    return int(match.group(1))


def reachable_by_server(bindir: Path) -> Path:
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
