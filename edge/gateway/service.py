"""Builds the gateway on a runtime and runs its background work (catalog, key index, spool).

Imports: everything inward.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from redis.asyncio import BlockingConnectionPool, Redis

from adapters.backends.openai_compat import make_client
from adapters.redis_admission import RedisAdmissionStore
from adapters.spool import FlushedBatch, Spool
from edge.gateway import health
from edge.gateway.admission import Admission, LocalAdmission, SharedAdmission
from edge.gateway.catalog import Catalog
from edge.gateway.key_index import KeyIndex
from edge.gateway.metrics import Metrics
from edge.gateway.proxy import Gateway
from edge.runtime import Runtime

log = logging.getLogger(__name__)
SPOOL_FOLDER = "spool"
STOP_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 5.0  # streams cut at the end of the grace period need a moment to write their usage
# Redis that is down (refused, unreachable) is known within REDIS_CONNECT_TIMEOUT_S, and admission falls back
# to this process's own state. A reply merely slow — this process's event loop busy with a burst, Redis busy
# — is waited for: the script may have run, and admitting locally as well would spend the budget twice.
REDIS_CONNECT_TIMEOUT_S = 2.0
REDIS_REPLY_TIMEOUT_S = 10.0
REDIS_CONNECTIONS_MAX = 64  # a burst queues for a connection rather than opening hundreds at once


@contextlib.asynccontextmanager
async def running_gateway(runtime: Runtime) -> AsyncIterator[Gateway]:
    """A gateway with its index and catalog loaded; on exit the spool is flushed to the event store."""
    assert runtime.pool is not None
    redis_client = None
    admission: Admission
    if runtime.settings.redis_url:
        pool = BlockingConnectionPool.from_url(runtime.settings.redis_url, max_connections=REDIS_CONNECTIONS_MAX,
                                               timeout=REDIS_REPLY_TIMEOUT_S, socket_timeout=REDIS_REPLY_TIMEOUT_S,
                                               socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S)
        redis_client = Redis(connection_pool=pool)
        admission = SharedAdmission(RedisAdmissionStore(redis_client))
    else:
        admission = LocalAdmission()
    index = KeyIndex(runtime.pool, admission)
    catalog = Catalog(runtime.pool)
    await index.load()
    await catalog.load()

    async def recorded(batch: FlushedBatch) -> None:
        await admission.recorded(batch.charged_request_ids, batch.position)

    spool = Spool(runtime.settings.data_dir / SPOOL_FOLDER, runtime.accounting, on_recorded=recorded)
    client, probes = make_client(), health.probe_client()
    metrics = Metrics()
    metrics.gauges["lwapi_spool_depth_entries"] = spool.depth
    metrics.gauges["lwapi_keys_indexed"] = lambda: len(index)
    metrics.gauges["lwapi_open_reservations"] = admission.open_reservations
    gateway = Gateway(index=index, catalog=catalog, admission=admission, spool=spool, client=client,
                      pepper=runtime.accounting.key_pepper, metrics=metrics)
    stop, spool_stop = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(index.follow(stop), name="key-index"),
             asyncio.create_task(catalog.follow(stop), name="catalog"),
             asyncio.create_task(spool.run(spool_stop), name="usage-spool"),
             asyncio.create_task(health.watch(catalog, probes, stop, runtime.settings.health_interval_s),
                                 name="deployment-health")]
    try:
        yield gateway
    finally:
        if not await gateway.drained(DRAIN_TIMEOUT_S):
            log.error("gateway: %d requests were still open at shutdown and are not metered", gateway.calls_open)
        spool_stop.set()  # last: every finished request's usage goes to the log before we stop
        stop.set()
        done, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
        for task in pending:
            log.error("gateway: %s did not stop in time", task.get_name())
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("gateway: %s failed", task.get_name(), exc_info=task.exception())
        spool.close()
        await client.aclose()
        await probes.aclose()
        if redis_client is not None:
            await redis_client.aclose()
