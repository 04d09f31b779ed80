"""Manage a private, embedded PostgreSQL server that lives in a local data folder.

The service (``scripts/serve``), the CLI and the test suite use this package to get a PostgreSQL
server without any system-wide setup. Its modules, each with one job:

* ``server``     ``EmbeddedPostgres``: initdb, start, stop and the database, under ``DATA_DIR/pg``;
* ``binaries``   which PostgreSQL binaries to use, and staging a copy the server account can run;
* ``account``    the OS account ``lwapi-pg`` the server runs as when this process is root;
* ``processes``  running the server's commands and reading its processes' state from /proc;
* ``config``     the settings file ``lwapi.conf`` the cluster includes;
* ``errors``     ``EmbeddedPostgresError``;
* ``cli``        ``python -m adapters.pg_embedded start|stop|status|url --data-dir DIR``.

Imports: stdlib only, in every module of the package. Import from here, not from the modules: this
file is the public API, and what the modules name among themselves may move.
"""

from __future__ import annotations

from adapters.pg_embedded.account import SERVER_OS_USER, check_traversable, server_account
from adapters.pg_embedded.binaries import (
    BINDIR_ENV,
    REQUIRED_BINARIES,
    STAGED_BINARIES_DIR,
    candidate_bindirs,
    find_bindir,
    server_major_version,
)
from adapters.pg_embedded.cli import main
from adapters.pg_embedded.config import SERVER_SETTINGS
from adapters.pg_embedded.errors import EmbeddedPostgresError
from adapters.pg_embedded.server import (
    DB_NAME,
    DB_SUPERUSER,
    MAX_SOCKET_PATH_BYTES,
    STOP_MODES,
    EmbeddedPostgres,
    PgServerInfo,
)

__all__ = [
    "BINDIR_ENV",
    "DB_NAME",
    "DB_SUPERUSER",
    "MAX_SOCKET_PATH_BYTES",
    "REQUIRED_BINARIES",
    "SERVER_OS_USER",
    "SERVER_SETTINGS",
    "STAGED_BINARIES_DIR",
    "STOP_MODES",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "PgServerInfo",
    "candidate_bindirs",
    "check_traversable",
    "find_bindir",
    "main",
    "server_account",
    "server_major_version",
]
