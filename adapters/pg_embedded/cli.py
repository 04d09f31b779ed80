"""The ``python -m adapters.pg_embedded start|stop|status|url --data-dir DIR`` command line.

Imports: stdlib, adapters.pg_embedded.binaries, adapters.pg_embedded.errors, adapters.pg_embedded.server.
``scripts/test`` starts and stops its throwaway server through it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from adapters.pg_embedded.binaries import BINDIR_ENV
from adapters.pg_embedded.errors import EmbeddedPostgresError
from adapters.pg_embedded.server import STOP_MODES, EmbeddedPostgres

_DESCRIPTION = "Manage a private, embedded PostgreSQL server that lives in a local data folder."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adapters.pg_embedded", description=_DESCRIPTION)
    parser.add_argument("command", choices=("start", "stop", "status", "url"))
    parser.add_argument("--data-dir", type=Path, required=True, help="folder holding pg/ (created if missing)")
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
        server = EmbeddedPostgres(args.data_dir, bindir=args.bindir, port=args.port, startup_timeout_s=args.timeout)
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
