"""The OS account the embedded server runs as when this process is root, and what it may reach.

Imports: stdlib, adapters.pg_embedded.errors. PostgreSQL refuses to run as root, so as root every
server-side command runs as the system account ``lwapi-pg`` (created here on demand), which then
owns the cluster and must be able to traverse every directory above it and above the binaries.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from adapters.pg_embedded.errors import EmbeddedPostgresError

SERVER_OS_USER = "lwapi-pg"
_USERADD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ServerAccount:
    """The OS account the server runs as, when it differs from the current (root) user."""

    name: str
    uid: int
    gid: int
    groups: frozenset[int]


def _lookup_account(name: str) -> ServerAccount | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    groups = frozenset(os.getgrouplist(name, entry.pw_gid))
    return ServerAccount(name=name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups)


def _create_system_user(name: str) -> None:
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    argv = [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_USERADD_TIMEOUT_S, check=False)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedPostgresError(f"cannot create system user {name!r}: {exc}") from exc
    if done.returncode != 0 and _lookup_account(name) is None:
        raise EmbeddedPostgresError(f"useradd {name} failed: {done.stderr.strip()}")


def server_account() -> ServerAccount | None:
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


def _can_traverse(path: Path, account: ServerAccount) -> bool:
    info = path.stat()
    if info.st_uid == account.uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid in account.groups:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def check_traversable(target: Path, account: ServerAccount, purpose: str) -> None:
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


def chown_tree(root: Path, account: ServerAccount) -> None:
    """Give ``root`` and everything below it to ``account``; links are changed, never followed."""
    os.lchown(root, account.uid, account.gid)
    for parent, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.lchown(Path(parent) / name, account.uid, account.gid)
