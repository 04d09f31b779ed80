"""Runs `create_app(settings)` under uvicorn with graceful shutdown.

Imports: edge.
"""

from __future__ import annotations

import logging

import uvicorn

from edge.app import create_app
from edge.settings import Settings

SHUTDOWN_GRACE_S = 15


def run(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise, and costs CPU
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level="info",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S, proxy_headers=False, server_header=False,
        access_log=False, loop="uvloop", http="httptools",
    )
