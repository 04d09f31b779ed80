"""Running the server's commands, and reading its processes' state from /proc.

Imports: stdlib, adapters.pg_embedded.errors, adapters.pg_embedded.account. Commands run with a
timeout, as the server account when one is given, in a scrubbed environment: inherited ``PG*``
variables could point pg_ctl and psql elsewhere, and ``LC_ALL=C`` keeps their messages untranslated
for the checks that read them.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from adapters.pg_embedded.account import ServerAccount
from adapters.pg_embedded.errors import EmbeddedPostgresError

LOG_TAIL_LINES = 25
PROC = Path("/proc")


def _child_env(account: ServerAccount | None, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and not k.startswith("LC_")}
    env["LC_ALL"] = "C"
    if account is not None:
        env.update(HOME=str(home), USER=account.name, LOGNAME=account.name)
    return env


def run_as(
    argv: Sequence[str | Path],
    *,
    account: ServerAccount | None,
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


def output_of(done: subprocess.CompletedProcess[str]) -> str:
    return "\n".join(part.strip() for part in (done.stdout, done.stderr) if part.strip())


def log_tail(path: Path, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log empty)"


def pid_in(lockfile: Path) -> int | None:
    """Return the PID on the first line of a postgres lock file, if any."""
    try:
        return int(lockfile.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def proc_state(pid: int) -> str | None:
    """Return the state letter of ``pid`` from /proc ("S", "R", "Z", ...), or None if there is none."""
    try:
        line = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = line.rpartition(")")[2].split()
    return fields[0] if fields else None


def pid_alive(pid: int) -> bool:
    """Tell whether ``pid`` is a live process; zombies count as dead."""
    if PROC.is_dir():
        return proc_state(pid) not in (None, "Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cwd_of(pid: int) -> Path | None:
    try:
        return Path(os.readlink(PROC / str(pid) / "cwd"))
    except OSError:
        return None


def live_processes_in(directory: Path) -> bool:
    """Tell whether any live process has ``directory`` as its working directory."""
    for entry in PROC.iterdir():
        if entry.name.isdigit() and cwd_of(int(entry.name)) == directory and pid_alive(int(entry.name)):
            return True
    return False


def last_lines(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])
