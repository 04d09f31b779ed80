"""Runs the service under uvicorn (uvloop + httptools), in one process or several workers.

Imports: everything inward. The parent process locates PostgreSQL (starting the embedded server
when there is no DATABASE_URL), creates the schema and the first administrator once, and stops the
embedded server after every worker has ended — so workers never race to create or stop anything.
Several workers need LWAPI_REDIS_URL: without it each would admit on its own and limits and
balances would hold per worker, not per key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal

import uvicorn

from adapters.database import Database
from domain.access import SYSTEM
from domain.errors import InvalidValue
from edge.app import announce_admin, create_app, with_gateway_in_front
from edge.catalog_file import apply_catalog_file
from edge.http_protocol import DeadlineHttpToolsProtocol
from edge.runtime import Runtime, ensure_first_admin
from edge.settings import Settings

WORKERS_MAX = 64
OPEN_FILES_WANTED = 1_048_576


def run(settings: Settings, workers: int = 1) -> None:
    if not 1 <= workers <= WORKERS_MAX:
        raise InvalidValue(f"--workers must be between 1 and {WORKERS_MAX}")
    if workers > 1 and not settings.redis_url:
        raise InvalidValue("--workers > 1 needs LWAPI_REDIS_URL, so that rate limits and balances hold across "
                           "workers")
    _allow_more_open_files()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise, and costs CPU
    database = Database.locate(settings.database_url, settings.data_dir)
    # uvicorn re-raises SIGTERM/SIGINT once it has shut down; exit through `finally`, so that the embedded
    # server we started stops too
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    try:
        asyncio.run(_prepare(settings))
        options = {"host": settings.host, "port": settings.port, "log_level": "info", "access_log": False,
                   "timeout_graceful_shutdown": settings.shutdown_grace_s, "proxy_headers": False,
                   "server_header": False, "loop": "uvloop", "http": DeadlineHttpToolsProtocol}
        if workers == 1:
            uvicorn.run(with_gateway_in_front(create_app(settings)), **options)  # type: ignore[arg-type]
        else:
            os.environ.update(settings.as_env())  # workers rebuild the same settings from the environment
            uvicorn.run("edge.app:create_app_from_env", factory=True, workers=workers, **options)  # type: ignore[arg-type]
    finally:
        database.release()


def _allow_more_open_files() -> None:
    """Every open stream holds two sockets; distributions start services at a soft limit of 1,024 open
    files, far below the hard one. Raise the soft limit to the hard one (workers inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else OPEN_FILES_WANTED
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _exit_cleanly(signum: int, _frame: object) -> None:
    raise SystemExit(0)


async def _prepare(settings: Settings) -> None:
    """Schema and first administrator, once, before any worker starts."""
    runtime = await asyncio.to_thread(Runtime.open, settings)
    try:
        created = await ensure_first_admin(runtime)
        if created is not None:
            announce_admin(*created)
        if settings.catalog_file is not None:
            changes = await asyncio.to_thread(apply_catalog_file, runtime.accounting, SYSTEM, settings.catalog_file)
            logging.getLogger("lwapi").info("catalog file %s: %s", settings.catalog_file,
                                            "; ".join(changes) or "no change")
    finally:
        await runtime.aclose()
        await asyncio.to_thread(runtime.close)
