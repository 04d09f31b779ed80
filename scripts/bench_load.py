#!/usr/bin/env python
"""Benchmark: thousands of streams held open at once through one gateway process, or through several
sharing one PostgreSQL and one Redis — no error, bounded memory, every request metered exactly once, and
(with Redis) rate limits and credit reservations exact across the processes.

The stack is `scripts/bench_gateway.py`'s (`running_stack`): a fresh database, the fake OpenAI-compatible
upstream (`tests.fake_upstream`) and `lwapi serve` as a subprocess with every check and metering on (a
real key, a model with prices, admission, credit reservation, usage spooled and recorded in the event
store, the projections running in the same process). The service is pinned to core 0; the upstream,
this process and the embedded PostgreSQL share core 1. This process raises its open-files limit
(RLIMIT_NOFILE) before it starts them, so they inherit it, and checks the gateway's.

Several processes (`--workers N`, N >= 2): `lwapi serve --workers N` (uvicorn's supervisor and N worker
processes sharing the listening socket; each runs its own gateway, key index, usage spool and projection
follower) with LWAPI_REDIS_URL pointing at a throwaway `redis-server` (free loopback port, `--save ''
--appendonly no`, its own temporary folder, stopped after; pinned to core 1 with the other client-side
processes). Every worker is pinned to core 0, like the single process: the gateway gets the same one core
in both modes, so the CPU figures compare. Measured on 2 cores (--quick, 2 workers): with the workers
allowed on both cores the run got slower (the wave 3.1 s instead of 2.3 s, 5.7 instead of 4.1 ms of
gateway CPU per stream) because they took the client core from the upstream and the load generator (it
was 97 % busy); the two processes still interleave at any point (the kernel preempts them), which is what
the cross-process checks need. `--redis` runs one process through Redis as well (to tell the cost of
shared admission from that of several processes).

Load: a few warm-up streams (10 per worker), a pause, then `--waves` waves; each wave opens `--streams`
connections at once (raw asyncio protocols under uvloop, one streaming chat completion per connection,
then closed), each asking the upstream for `--tokens` tokens `--delay-ms` apart, and waits until all have
ended. A stream counts as completed when it answered 200, ended with `data: [DONE]` and carried exactly
`--tokens` content deltas. Every 100 ms each worker's VmRSS (/proc/PID/status), its open file
descriptors and the number of streams open on the client side are sampled.

Metering: once the waves are over, wait (up to 60 s) until the project's `lwapi_read.balances` counts
every stream answered 200 and `lwapi_read.ledger_usage` holds a row for each; then check that the
ledger's request ids are exactly the `x-request-id`s the gateway answered 200 with, each once, and that
the completion tokens are what the streams carried. Which worker served a stream: its ledger row's
batch id is uuid5(spool namespace, "<spool instance>/<segment>") (`adapters.spool`), each worker's spool
instance folder is held by that worker's flock (/proc/locks); with several workers, each must have
served some of the load.

The limit wave (with Redis only, after the load waves): two sub-waves of `--streams` streams opened at
once, with the same request except max_tokens = tokens, so that the credits reserved equal the credits
charged (1 at the defaults). (a) On a key limited to streams/2 requests a minute: a limit of N a minute
spends N at once, then refills one every 60/N s (GCRA, `domain.limits`), so while the admissions of a
burst last longer than 60/N s — they do under 2,000 streams — a few more than N are served, exactly as
many as were refilled by then. A process of its own polls Redis' clock and the key's stored TAT every
5 ms: the first admission stores t1 + 60/N and each later one adds 60/N, so the final TAT gives the
admissions Redis counted (t1 bracketed by the polls around it); the check is N <= served <= N + the
intervals refilled before the final TAT appeared, served == Redis' count, the TAT never more than 60 s
ahead of Redis' clock, every other answer a 429 with OpenAI's error object and code
`rate_limit_exceeded`. (b) On a project granted exactly streams/4 streams' worth of credits: exactly
streams/4 served, the rest 429 `insufficient_quota`; the read model's remaining balance and what
Redis holds available for the project (base - reserved - settled but not yet projected, read
atomically by a script mirroring the admission script) sampled every 100 ms, never negative; at the end
remaining = grant - the ledger's charges = 0 and Redis' base and available equal to it, no reservation
left. Both: every 200 metered once, no 429 metered, the balance's requests and tokens equal to the
streams'. These 429s are expected: they do not count as errors. At the end no reservation hash
(`adapters.redis_admission.PREFIX` + `res:*`) in Redis may hold a reservation.

Uses $DATABASE_URL's server (a new database, dropped after) when set, else a throwaway embedded server.
Progress goes to stderr; the figures are ONE JSON object on the last line of stdout. Exits 1 when a
correctness check fails (an answer other than 200 in the load waves, a dropped or incomplete stream, a
metering mismatch, a worker that served nothing, a limit or balance not held exactly, a reservation left
in Redis), not when a memory figure is merely high.

    .venv/bin/python scripts/bench_load.py --quick     # 500 streams x 100 tokens, 1 wave, about 1 min
    .venv/bin/python scripts/bench_load.py             # 2,000 streams x 200 tokens at 5 ms, 2 waves
    .venv/bin/python scripts/bench_load.py --streams 1000 --waves 3 --service-log /tmp/gw.log
    .venv/bin/python scripts/bench_load.py --quick --workers 2   # two processes, Redis, the limit wave
    .venv/bin/python scripts/bench_load.py --workers 2           # issue 7's multi-process load test
    .venv/bin/python scripts/bench_load.py --quick --redis       # one process admitting through Redis

Keys: concurrent_streams (streams opened at once per wave), errors (non-200 answers + connections that
failed or dropped + streams without [DONE] or with the wrong token count, all waves; plus the limit
wave's unexpected answers: anything but a complete 200 stream or a 429 with the expected code),
requests_completed (streams completed, all waves, warm-up excluded), usage_entries_recorded (ledger_usage
rows for those streams' request ids), workers, worker_pids, streams_per_worker (load streams metered by
each worker, in worker_pids' order; streams_unattributed: rows no worker's spool accounts for),
rss_mb_peak (the highest sampled VmRSS of any one worker during the waves; rss_mb_peak_per_worker: each
worker's; rss_mb_peak_total: the highest sum of all workers' at one sample), rss_mb_before (idle, after
the warm-up: the highest worker; rss_mb_before_total: all), rss_kb_per_open_stream ((peak_total -
before_total) / concurrent_streams), rss_mb_hwm (the kernel's VmHWM at the end, highest worker;
rss_mb_hwm_before: the same before the waves, start-up included), rss_mb_after_waves (idle after each
wave, highest worker; rss_mb_after_waves_total: all; growth from wave to wave would be a leak),
open_streams_peak (200 streams open at once, client side), gateway_fds_peak (all workers' descriptors:
client and upstream sockets; gateway_fds_peak_per_worker), tokens_per_stream, delay_ms, ttft_p50_ms /
ttft_p99_ms (request sent → first `data:` bytes), duration_s (all waves), wave_durations_s, tokens_per_s
(content deltas received per second, all streams together), gateway_cpu_ms_per_stream (all workers
together; worker_cpu_ms_per_stream: each), cpu_per_wave (the gateway's — all workers, and
worker_cpu_shares each —, the upstream's, Redis' and this process's share of a core, and how busy each
of the two cores was: a client core near 1 means the upstream, Redis and this process set the pace, and
streams last longer than tokens x delay; gateway_core_others: other processes on the gateway's core;
with Redis, redis_evalsha_calls and redis_evalsha_us_per_call: its admission, settlement and base scripts),
statuses, metered_ok, limit_wave (null without Redis; else `rate` and `balance`, each with streams,
served, refused, refusal_codes, unexpected, refused_metered, expected_served and exact — rate also
limit_rpm, expected_served_max, over_limit, redis_admissions, refill_allowed_max, refill_interval_ms,
admission_span_s, t1_window_ms, tat_ahead_max_s; balance also grant_credits, reserve/charge_credits_per_stream,
charged_credits, remaining_credits, remaining_min_seen, redis_available_min_seen, redis_after — and their
sums served, refused, expected_served, and exact), redis (null without Redis; else what it holds at the
end: keys by kind, reservations_left, settled_entries (settled costs the read model does not hold yet),
batch_positions (requests recorded before their settlement) and settled_unrecorded (the reverse),
used_memory_mb, cpu_s, evalsha_calls, evalsha_us_per_call), quick, loadavg_before,
service_log_warnings, failures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's packages, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
from bench_gateway import (
    COMPLETION_PER_MTOK,
    GRANT_CREDITS,
    METERING_TIMEOUT_S,
    MODEL,
    PEPPER,
    PROMPT_PER_MTOK,
    STARTUP_TIMEOUT_S,
    Stack,
    core_times,
    free_port,
    pinned,
    proc_cpu_s,
    running_stack,
    stop_process,
)
from bench_support import check, emit, fresh_database, log, percentile

SAMPLE_INTERVAL_S = 0.1
WARMUP_STREAMS = 10
WARMUP_TOKENS = 10
WAVE_PAUSE_S = 2.0
STALL_TIMEOUT_S = 60.0  # a stream that receives nothing for this long is aborted (and counted as an error)
FDS_SPARE = 512  # descriptors beyond two per stream (database pool, spool, logs, listening sockets)
_CONTENT = b'"content":'
_DONE = b"data: [DONE]"
PROBLEM_LINE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")  # in the service's log
WORKERS_MAX = 8
REDIS_SETTLE_TIMEOUT_S = 30.0  # for the key index to write a budget's base into Redis


# --------------------------------------------------------------------------- one stream


@dataclass
class Wave:
    """What one wave (or the warm-up) saw; `open_now` and the counters are read by `report_progress` as it runs."""

    tokens: int
    statuses: dict[int, int] = field(default_factory=dict)
    ok_ids: list[str] = field(default_factory=list)  # x-request-id of every 200 answer (what must be metered)
    completed_ids: list[str] = field(default_factory=list)  # ... of those complete with the right token count
    tokens_received: int = 0  # content deltas over all 200 answers
    ttfts: list[float] = field(default_factory=list)
    dropped: int = 0  # connections that failed, broke off or stalled before the answer ended
    incomplete: int = 0  # 200 answers without [DONE] or with the wrong number of tokens
    error_samples: list[str] = field(default_factory=list)
    open_now: int = 0
    open_peak: int = 0
    duration_s: float = 0.0
    gateway_cpu_s: float = 0.0  # all workers together
    worker_cpu_s: list[float] = field(default_factory=list)
    busy: dict[str, float] = field(default_factory=dict)  # CPU shares over the wave (see `cpu_shares`)
    refusals: dict[str, int] = field(default_factory=dict)  # 429 answers by their error code ("malformed": no
    refused_ids: list[str] = field(default_factory=list)  # OpenAI error object); x-request-id of every 429

    @property
    def ended(self) -> int:
        return sum(self.statuses.values()) + self.dropped

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != 200) + self.dropped + self.incomplete

    def note_error(self, text: str) -> None:
        if len(self.error_samples) < 5:
            self.error_samples.append(text[:300])


class _Stream(asyncio.Protocol):
    """One connection, one streaming request: parse the head and the chunked body as they arrive."""

    def __init__(self, wave: Wave, request: bytes, finished: asyncio.Future[None]) -> None:
        self.wave, self.request, self.finished = wave, request, finished
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.head_done = self.chunked = self.ended = False
        self.status = self.need = self.tokens = 0
        self.request_id = ""
        self.tail = b""  # the last bytes of the body: where [DONE] is
        self.carry = b""  # the last bytes of the previous chunk, so a delta split across chunks counts once
        self.error_body = bytearray()
        self.started = 0.0
        self.first: float | None = None
        self.last_byte = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.started = self.last_byte = time.perf_counter()
        transport.write(self.request)  # type: ignore[attr-defined]
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_byte = time.perf_counter()
        buf = self.buf
        buf += data
        if not self.head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            self.status = int(head[9:12])
            self.chunked = b"transfer-encoding: chunked" in head
            at = head.find(b"x-request-id:")
            if at >= 0:
                eol = head.find(b"\r\n", at)
                self.request_id = head[at + 13: eol if eol >= 0 else len(head)].strip().decode()
            if not self.chunked:
                at = head.find(b"content-length:")
                eol = head.find(b"\r\n", at)
                self.need = 0 if at < 0 else int(head[at + 15: eol if eol >= 0 else len(head)])
            del buf[: end + 4]
            self.head_done = True
            if self.status == 200:
                self.wave.open_now += 1
                self.wave.open_peak = max(self.wave.open_peak, self.wave.open_now)
        if self.chunked:
            self._chunks()
        elif len(buf) >= self.need:
            self.error_body += buf[: self.need]
            self._end()

    def _chunks(self) -> None:
        buf = self.buf
        while True:
            eol = buf.find(b"\r\n")
            if eol < 0:
                return
            size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
            if size == 0:
                if len(buf) >= eol + 4:  # the empty trailer's CRLF
                    self._end()
                return
            if len(buf) < eol + 2 + size + 2:
                return
            chunk = bytes(buf[eol + 2: eol + 2 + size])
            del buf[: eol + 2 + size + 2]
            if self.first is None and b"data:" in chunk:
                self.first = time.perf_counter()
            if self.status != 200:
                self.error_body += chunk[:1000]
                continue
            joined = self.carry + chunk
            self.tokens += joined.count(_CONTENT)
            self.carry = joined[-(len(_CONTENT) - 1):]
            self.tail = (self.tail + chunk)[-64:]

    def _end(self) -> None:
        """The whole answer arrived."""
        wave = self.wave
        self.ended = True
        wave.statuses[self.status] = wave.statuses.get(self.status, 0) + 1
        if self.status == 200:
            wave.open_now -= 1
            wave.ok_ids.append(self.request_id)
            wave.tokens_received += self.tokens
            if self.first is not None:
                wave.ttfts.append(self.first - self.started)
            if _DONE in self.tail and self.tokens == wave.tokens:
                wave.completed_ids.append(self.request_id)
            else:
                wave.incomplete += 1
                wave.note_error(f"200 stream {self.request_id}: {self.tokens} tokens, [DONE] {_DONE in self.tail}")
        else:
            body = bytes(self.error_body)
            if self.status == 429:
                code = openai_error_code(body)
                wave.refusals[code] = wave.refusals.get(code, 0) + 1
                wave.refused_ids.append(self.request_id)
            wave.note_error(f"status {self.status}: {body.decode(errors='replace')}")
        assert self.transport is not None
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended:
            self.wave.dropped += 1
            if self.head_done and self.status == 200:  # a 200 stream that broke off may still be metered
                self.wave.open_now -= 1
                self.wave.ok_ids.append(self.request_id)
                self.wave.tokens_received += self.tokens
            self.wave.note_error(f"connection lost (status {self.status or 'none'}, {self.tokens} tokens): {exc!r}")
        if not self.finished.done():
            self.finished.set_result(None)

    def abort_if_stalled(self, now: float) -> None:
        if not self.ended and self.transport is not None and now - self.last_byte > STALL_TIMEOUT_S:
            self.transport.abort()


def openai_error_code(body: bytes) -> str:
    """The `code` of OpenAI's error object {"error": {"message", "type", "param", "code"}}; "malformed" if
    the body is not one."""
    try:
        error = json.loads(body)["error"]
        if set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str) \
                and isinstance(error["type"], str) and isinstance(error["code"], str):
            return str(error["code"])
    except (ValueError, TypeError, KeyError):
        pass
    return "malformed"


async def open_stream(wave: Wave, port: int, request: bytes, streams: list[_Stream]) -> None:
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    try:
        _, stream = await loop.create_connection(lambda: _Stream(wave, request, finished), "127.0.0.1", port)
    except OSError as e:
        wave.dropped += 1
        wave.note_error(f"connect failed: {e!r}")
        return
    streams.append(stream)
    await finished


async def run_wave(wave: Wave, port: int, request: bytes, count: int, procs: Procs, cores: tuple[int, int]) -> None:
    """Open `count` streams at once and wait until every one has ended (or stalled and was aborted)."""
    streams: list[_Stream] = []
    before = cpu_counters(procs)
    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(open_stream(wave, port, request, streams)) for _ in range(count)]
    while True:
        _, pending = await asyncio.wait(tasks, timeout=1.0)
        if not pending:
            break
        now = time.perf_counter()
        for stream in streams:
            stream.abort_if_stalled(now)
    wave.duration_s = time.perf_counter() - t0
    after = cpu_counters(procs)
    wave.gateway_cpu_s = after["gateway"] - before["gateway"]
    wave.worker_cpu_s = [b - a for a, b in zip(before["workers"], after["workers"], strict=True)]
    wave.busy = cpu_shares(before, after, wave.duration_s, cores)


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Procs:
    """The processes whose CPU and memory the run follows."""

    workers: list[int]  # the gateway's serving processes: one, or uvicorn's workers
    upstream: int
    redis: int | None = None
    redis_url: str | None = None


def cpu_counters(procs: Procs) -> dict[str, Any]:
    """CPU seconds so far of the gateway (each worker and all together), the upstream, Redis and this
    process, and each core's jiffies."""
    workers = [sum(proc_cpu_s(pid)) for pid in procs.workers]
    out: dict[str, Any] = {"gateway": sum(workers), "workers": workers, "upstream": sum(proc_cpu_s(procs.upstream)),
           "loadgen": time.process_time(), "cores": core_times()}
    if procs.redis is not None:
        out["redis"] = sum(proc_cpu_s(procs.redis))
    if procs.redis_url is not None:
        out["evalsha"] = evalsha_stats(procs.redis_url)
    return out


def evalsha_stats(url: str) -> tuple[int, int]:
    """Redis' count of EVALSHA calls (the admission scripts) and the microseconds it spent in them."""
    import redis  # noqa: PLC0415

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
    finally:
        client.close()
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def cpu_shares(before: dict[str, Any], after: dict[str, Any], seconds: float,
               cores: tuple[int, int]) -> dict[str, Any]:
    """Each process's share of one core over `seconds`, and how busy the gateway's and the client's cores were
    (a client core near 1 means the upstream, Redis and this process, not the gateway, set the pace)."""
    names = ("gateway", "upstream", "loadgen") + (("redis",) if "redis" in before else ())
    out: dict[str, Any] = {f"{name}_cpu_share": round((after[name] - before[name]) / max(1e-9, seconds), 3)
                           for name in names}
    if "evalsha" in before:  # the admission, settlement and base scripts, all processes together
        calls, usec = (b - a for a, b in zip(before["evalsha"], after["evalsha"], strict=True))
        out["redis_evalsha_calls"] = calls
        out["redis_evalsha_us_per_call"] = round(usec / calls, 1) if calls else None
    if len(before["workers"]) > 1:
        out["worker_cpu_shares"] = [round((b - a) / max(1e-9, seconds), 3)
                                    for a, b in zip(before["workers"], after["workers"], strict=True)]
    for role, core in zip(("gateway_core_busy", "client_core_busy"), cores, strict=True):
        name = f"cpu{core}"
        if name in before["cores"] and name in after["cores"]:
            (b0, t0), (b1, t1) = before["cores"][name], after["cores"][name]
            out[role] = round((b1 - b0) / max(1, t1 - t0), 3)
    if "gateway_core_busy" in out:  # other processes on the gateway's core: the figures suffer
        out["gateway_core_others"] = round(max(0.0, out["gateway_core_busy"] - out["gateway_cpu_share"]), 3)
    return out


def proc_status_kb(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def open_files_limit(pid: int) -> int | None:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    return None


@dataclass
class Samples:
    """Per tick: every worker's VmRSS and open descriptors, and their sums."""

    workers: int
    rss_kb: list[int] = field(default_factory=list)  # all workers together
    fds: list[int] = field(default_factory=list)  # all workers together
    rss_kb_worker: list[list[int]] = field(default_factory=list)
    fds_worker: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rss_kb_worker = [[] for _ in range(self.workers)]
        self.fds_worker = [[] for _ in range(self.workers)]


async def sample(pids: list[int], samples: Samples, stop: asyncio.Event) -> None:
    """The workers' VmRSS and open descriptors every SAMPLE_INTERVAL_S until `stop`."""
    while not stop.is_set():
        rss = [proc_status_kb(pid, "VmRSS") for pid in pids]
        fds = [len(os.listdir(f"/proc/{pid}/fd")) for pid in pids]
        for i in range(len(pids)):
            samples.rss_kb_worker[i].append(rss[i])
            samples.fds_worker[i].append(fds[i])
        samples.rss_kb.append(sum(rss))
        samples.fds.append(sum(fds))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL_S)


# --------------------------------------------------------------------------- metering


async def wait_metered(dsn: str, project_id: Any, expected_requests: int) -> tuple[dict[str, int], list[str], float]:
    """Wait until the project's balance counts `expected_requests` and its ledger holds as many rows (or the
    timeout); then a second more (anything beyond would show up by now). The balance, the ledger's request
    ids (one per row) and the seconds waited."""
    import asyncpg  # noqa: PLC0415

    async def read() -> tuple[dict[str, int], list[str]]:
        found = await conn.fetchrow("SELECT requests, tokens_prompt, tokens_completion, charged_credits "
                                    "FROM lwapi_read.balances WHERE project_id = $1", project_id)
        rows = await conn.fetch("SELECT request_id FROM lwapi_read.ledger_usage WHERE project_id = $1", project_id)
        return {k: int(v) for k, v in dict(found or {}).items()}, [r["request_id"] for r in rows]

    conn = await asyncpg.connect(dsn)
    try:
        t0 = time.monotonic()
        while True:
            balance, ledger = await read()
            caught_up = balance.get("requests", 0) >= expected_requests and len(ledger) >= expected_requests
            if caught_up or time.monotonic() - t0 > METERING_TIMEOUT_S:
                break
            await asyncio.sleep(0.2)
        waited = time.monotonic() - t0
        await asyncio.sleep(1.0)
        balance, ledger = await read()
        return balance, ledger, waited
    finally:
        await conn.close()


# --------------------------------------------------------------------------- the workers


def spool_owners(root: Path) -> dict[uuid.UUID, int]:
    """Which process holds each usage spool instance folder under `root` (`adapters.spool`: one folder per
    process, named by its instance id, claimed with flock on its `.lock`): /proc/locks lists each FLOCK as
    `N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE ...` (a waiter's line has `->` after the number)."""
    holders: dict[tuple[int, int, int], int] = {}
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 6 or parts[1] != "FLOCK":
                continue
            major, minor, inode = parts[5].split(":")
            holders[(int(major, 16), int(minor, 16), int(inode))] = int(parts[4])
    owners: dict[uuid.UUID, int] = {}
    for folder in (root.iterdir() if root.is_dir() else []):
        with contextlib.suppress(OSError, ValueError):
            st = (folder / ".lock").stat()
            pid = holders.get((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
            if pid is not None:
                owners[uuid.UUID(folder.name)] = pid
    return owners


async def streams_by_worker(dsn: str, request_ids: list[str], owners: dict[uuid.UUID, int],
                            pids: list[int]) -> tuple[list[int], int]:
    """How many of these requests each worker metered: a usage batch's id is uuid5(SPOOL_NAMESPACE,
    "<instance>/<segment file>") (`adapters.spool`), so a ledger row's batch names the spool, and the spool
    its process. Counts in the order of `pids`, and the rows no worker's spool accounts for."""
    import asyncpg  # noqa: PLC0415

    from adapters.spool import SEGMENT_SUFFIX, SPOOL_NAMESPACE  # noqa: PLC0415

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT batch_id, count(*) AS n FROM lwapi_read.ledger_usage "
                                "WHERE request_id = ANY($1::text[]) GROUP BY batch_id", request_ids)
        segments_max = int(await conn.fetchval("SELECT count(*) FROM lwapi_read.ledger_usage")) + 1
    finally:
        await conn.close()
    batch_pid = {uuid.uuid5(SPOOL_NAMESPACE, f"{instance}/{n:012d}{SEGMENT_SUFFIX}"): pid
                 for instance, pid in owners.items() for n in range(1, segments_max + 1)}
    counts = dict.fromkeys(pids, 0)
    unattributed = 0
    for row in rows:
        pid = batch_pid.get(row["batch_id"])
        if pid in counts:
            counts[pid] += row["n"]
        else:
            unattributed += row["n"]
    return [counts[pid] for pid in pids], unattributed


# --------------------------------------------------------------------------- Redis


@dataclass
class RedisServer:
    proc: subprocess.Popen[bytes]
    url: str


@contextlib.contextmanager
def running_redis(cpu: int) -> Iterator[RedisServer]:
    """A throwaway `redis-server` on a free loopback port, nothing persisted, pinned to `cpu`."""
    import redis  # noqa: PLC0415

    folder = Path(tempfile.mkdtemp(prefix="lwapi-bench-redis.", dir="/tmp"))
    proc = None
    try:
        port = free_port()
        log(f"starting redis-server on port {port} (cpu {cpu}) in {folder}")
        proc = subprocess.Popen(pinned(cpu, [shutil.which("redis-server") or "redis-server", "--port", str(port),
                                             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                             "--dir", str(folder), "--logfile", str(folder / "redis.log")]),
                                stdout=subprocess.DEVNULL)
        client = redis.Redis(port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        yield RedisServer(proc, f"redis://127.0.0.1:{port}/0")
    finally:
        stop_process(proc)
        shutil.rmtree(folder, ignore_errors=True)


# A budget as the admission script (`adapters.redis_admission._ADMIT`) sees it, read in one atomic step
# without changing anything: its base and log position, the reservations not expired (count and credits)
# and the settled costs the base does not include yet (their batch not recorded, or recorded after the
# base's position), recomputed from the entries, next to the running sums the script keeps (r, u).
_READ_BUDGET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'base', 'pos', 'r', 'u')
local live = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. now, '+inf')
local reserved = 0
for _, r in ipairs(live) do reserved = reserved + tonumber(redis.call('HGET', KEYS[2], r) or '0') end
local unp, n = 0, 0
local entries = redis.call('HGETALL', KEYS[4])
for j = 1, #entries, 2 do
  local p = redis.call('ZSCORE', KEYS[5], entries[j])
  if not (p and b[2] and tonumber(p) <= tonumber(b[2])) then unp = unp + tonumber(entries[j + 1]); n = n + 1 end
end
return {b[1] or false, b[2] or false, #live, reserved, n, unp, b[3] or false, b[4] or false}
"""

# Redis' clock and a key's value, read together.
_READ_AT = """
local t = redis.call('TIME')
return {t[1], t[2], redis.call('GET', KEYS[1]) or false}
"""


async def redis_budget(client: Any, budget: str) -> dict[str, Any]:
    """A budget as the admission script sees it: base, position, reservations, settled costs not yet in the
    base, and what is available (base - reserved - unprojected; None without a base: no quota applies)."""
    from adapters.redis_admission import PREFIX  # noqa: PLC0415

    keys = [f"{PREFIX}{part}:{budget}" for part in ("base", "res", "resx", "unp", "unpz")]
    base, position, reservations, reserved, entries, unprojected, _r, _u = await client.eval(
        _READ_BUDGET, len(keys), *keys)
    base = None if base is None else int(base)
    return {"base": base, "position": None if position is None else int(position), "reservations": reservations,
            "reserved": reserved, "unprojected": unprojected, "unprojected_entries": entries,
            "available": None if base is None else base - reserved - unprojected}


# A separate process polls, so that neither this process's busy event loop nor the GIL delays the polls.
_WATCH_PROGRAM = """
import sys, redis
url, key, interval, script = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
read = redis.Redis.from_url(url).register_script(script)
import time
while True:
    sec, usec, value = read(keys=[key])
    print(sec.decode() if isinstance(sec, bytes) else sec, usec.decode() if isinstance(usec, bytes) else usec,
          value.decode() if value is not None else "-", flush=True)
    time.sleep(interval)
"""


class KeyWatch:
    """Polls Redis' clock and one key's value about every `interval_s`, from a process of its own on the
    client core, while the block runs: `polls` = [(Redis time, value or None)]."""

    def __init__(self, url: str, key: str, cpu: int, interval_s: float = 0.005) -> None:
        self.argv = pinned(cpu, [sys.executable, "-c", _WATCH_PROGRAM, url, key, str(interval_s), _READ_AT])
        self.polls: list[tuple[float, float | None]] = []
        self.out = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> KeyWatch:
        self.proc = subprocess.Popen(self.argv, stdout=self.out)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while self.out.tell() == 0:  # its first poll: before anything happens
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the Redis key watcher did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        time.sleep(0.05)  # a few more polls: the last state
        stop_process(self.proc, timeout_s=5)
        self.out.seek(0)
        for line in self.out.read().decode().splitlines():
            parts = line.split()
            if len(parts) == 3:
                self.polls.append((int(parts[0]) + int(parts[1]) / 1e6, None if parts[2] == "-" else float(parts[2])))
        self.out.close()


def gcra_check(polls: list[tuple[float, float | None]], limit: int) -> dict[str, Any]:
    """What the rate limit's state in Redis says about a burst on a fresh key (`domain.limits`: a limit of N
    a minute spends N at once, then one more per 60/N s; the stored TAT is never more than 60 s ahead).

    The first admission at Redis time t1 stores t1 + I (I = 60/limit) and each later one adds I while the TAT
    is ahead of the clock (it is, through a burst), so the final TAT is t1 + n I: with t1 bracketed by the
    last poll that saw no key and the first that saw one, n — the admissions Redis counted — follows. The
    n-th admission needed n <= limit + (t_n - t1) / I, and t_n comes before the first poll that saw the final
    TAT: so n may exceed the limit by the intervals refilled by then, and no more."""
    interval = 60.0 / limit
    seen = [i for i, (_, tat) in enumerate(polls) if tat is not None]
    if not seen or seen[0] == 0:
        return {"redis_admissions": None, "refill_allowed_max": None, "tat_ahead_max_s": None,
                "t1_window_ms": None, "admission_span_s": None}
    before, first = polls[seen[0] - 1][0], polls[seen[0]][0]
    tat_end = polls[-1][1]
    assert tat_end is not None
    final_seen = min(t for t, tat in polls if tat == tat_end)
    slack = 1e-3 + 5e-5 * (tat_end - before) / interval  # the TAT is stored with 0.1 ms resolution
    low, high = (tat_end - first - slack) / interval, (tat_end - before + slack) / interval
    candidates = list(range(int(-(-low // 1)), int(high // 1) + 1))
    return {"redis_admissions": candidates[0] if len(candidates) == 1 else candidates,
            "refill_allowed_max": int((final_seen - before) / interval + 1e-9),
            "tat_ahead_max_s": round(max(tat - t for t, tat in polls if tat is not None), 4),
            "t1_window_ms": round((first - before) * 1000, 1), "admission_span_s": round(final_seen - before, 3),
            "polls": len(polls)}


async def redis_summary(url: str, pid: int) -> dict[str, Any]:
    """What Redis holds at the end: keys by kind, leftover reservations (every `res:` hash should be
    empty: Redis drops empty hashes), settled costs the read model does not hold yet, requests recorded
    before their settlement (`rec:`) or settled before their recording (`own:`), its memory and CPU."""
    import redis.asyncio as aioredis  # noqa: PLC0415

    from adapters.redis_admission import PREFIX  # noqa: PLC0415

    client = aioredis.Redis.from_url(url)
    try:
        kinds: dict[str, int] = {}
        reservations = settled = 0
        async for raw in client.scan_iter(match=PREFIX + "*", count=1000):
            key = raw.decode()
            kind = key[len(PREFIX):].split(":", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind == "res":
                reservations += await client.hlen(key)
            elif kind == "unp":
                settled += await client.hlen(key)
        memory = await client.info("memory")
        evalsha = (await client.info("commandstats")).get("cmdstat_evalsha", {})
        return {"keys": kinds, "reservations_left": reservations, "settled_entries": settled,
                "batch_positions": kinds.get("rec", 0), "settled_unrecorded": kinds.get("own", 0),
                "used_memory_mb": round(memory["used_memory"] / 2**20, 2),
                "cpu_s": round(sum(proc_cpu_s(pid)), 2), "evalsha_calls": evalsha.get("calls"),
                "evalsha_us_per_call": evalsha.get("usec_per_call")}
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- the limit wave


@dataclass(frozen=True)
class LimitFixtures:
    """A key with a requests-per-minute limit (in a project with a large grant), and a project whose
    grant covers exactly `budget_streams` streams, with a key without limits."""

    rpm_key: uuid.UUID
    rpm_project: uuid.UUID
    rpm_secret: str
    rpm_limit: int
    budget_project: uuid.UUID
    budget_secret: str
    grant: int
    budget_streams: int
    reserve: int  # credits admission reserves per stream
    charge: int  # credits a stream costs


def limit_body(tokens: int, delay_ms: int) -> bytes:
    """The limit wave's request: max_tokens = the tokens asked, so that the reservation equals the charge."""
    return request_body(tokens, delay_ms, max_tokens=tokens)


def create_limit_fixtures(dsn: str, args: argparse.Namespace) -> LimitFixtures:
    """Before the service starts, so that every worker loads the keys and writes the budget's base to Redis."""
    from adapters.database import eventstore_env  # noqa: PLC0415
    from domain.access import SYSTEM  # noqa: PLC0415
    from domain.accounting import Accounting  # noqa: PLC0415
    from domain.api_key import KeySettings  # noqa: PLC0415
    from domain.pricing import charge  # noqa: PLC0415

    body = limit_body(args.tokens, args.delay_ms)
    # admission reserves one prompt token per byte of the body plus max_tokens (edge.gateway.admission);
    # tests.fake_upstream reports len(json.dumps(messages)) // 4 + 1 prompt tokens and the tokens asked
    reserve = charge(len(body), 0, args.tokens, PROMPT_PER_MTOK, PROMPT_PER_MTOK, COMPLETION_PER_MTOK)
    cost = charge(len(json.dumps(MESSAGES)) // 4 + 1, 0, args.tokens, PROMPT_PER_MTOK, PROMPT_PER_MTOK,
                  COMPLETION_PER_MTOK)
    if reserve != cost:  # a stream ending would free credits for another while the wave is still admitted
        raise SystemExit(f"the limit wave needs the reservation ({reserve} credits) to equal the charge ({cost}): "
                         f"choose another --tokens")
    budget_streams = max(1, args.streams // 4)
    rpm_limit = max(1, args.streams // 2)
    grant = budget_streams * reserve
    app = Accounting(env=eventstore_env(dsn), key_pepper=PEPPER)
    try:
        user = app.register_user("limits@bench.example", "Limits")
        rpm_project = app.create_project(SYSTEM, "bench-rpm", "Rate-limited key", user)
        app.grant_credits(SYSTEM, rpm_project, GRANT_CREDITS, "benchmark grant")
        rpm_key, rpm_secret = app.create_key(SYSTEM, rpm_project, user,
                                             KeySettings(name="rpm", rpm_limit=rpm_limit))
        budget_project = app.create_project(SYSTEM, "bench-budget", "Small balance", user)
        app.grant_credits(SYSTEM, budget_project, grant, f"{budget_streams} streams")
        _, budget_secret = app.create_key(SYSTEM, budget_project, user, KeySettings(name="budget"))
    finally:
        app.close()
    log(f"limit wave fixtures: a key limited to {rpm_limit} requests/min; a project granted {grant} credits "
        f"({budget_streams} streams at {reserve} credit(s) reserved and charged each)")
    return LimitFixtures(rpm_key, rpm_project, rpm_secret, rpm_limit, budget_project, budget_secret, grant,
                         budget_streams, reserve, cost)


def unexpected_answers(wave: Wave, code: str) -> int:
    """Anything but 200 streams complete and 429s with OpenAI's error object carrying `code`."""
    return (wave.dropped + wave.incomplete + sum(n for s, n in wave.statuses.items() if s not in (200, 429))
            + sum(n for c, n in wave.refusals.items() if c != code))


async def project_money(dsn: str, project_id: Any) -> dict[str, int | None]:
    """The project's balance and its ledger's totals."""
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(dsn)
    try:
        balance = await conn.fetchrow("SELECT granted_credits, charged_credits, remaining_credits, requests "
                                      "FROM lwapi_read.balances WHERE project_id = $1", project_id)
        ledger = await conn.fetchrow("SELECT count(*) AS rows, coalesce(sum(cost_credits), 0) AS cost, "
                                     "min(cost_credits) AS cost_min, max(cost_credits) AS cost_max "
                                     "FROM lwapi_read.ledger_usage WHERE project_id = $1", project_id)
    finally:
        await conn.close()
    out: dict[str, int | None] = {k: int(v) for k, v in (dict(balance) if balance else {}).items()}
    out |= {f"ledger_{k}": None if v is None else int(v) for k, v in (dict(ledger) if ledger else {}).items()}
    return out


async def watch_budget(dsn: str, project_id: Any, client: Any, budget: str, stop: asyncio.Event,
                       seen: dict[str, int | None]) -> None:
    """The lowest remaining balance (read model) and available amount (Redis) seen, every SAMPLE_INTERVAL_S."""
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            remaining = await conn.fetchval("SELECT remaining_credits FROM lwapi_read.balances WHERE project_id = $1",
                                            project_id)
            available = (await redis_budget(client, budget))["available"]
            for name, value in (("remaining", remaining), ("available", available)):
                lowest = seen.get(name)
                if value is not None and (lowest is None or value < lowest):
                    seen[name] = int(value)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL_S)
    finally:
        await conn.close()


async def wait_for_value(read: Any, wanted: Any, timeout_s: float) -> Any:
    """Poll the coroutine function `read` until it returns `wanted` (or the timeout); its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await read()
        if value == wanted or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


async def run_limit_wave(args: argparse.Namespace, stack: Stack, procs: Procs, cores: tuple[int, int],
                         redis_url: str, fx: LimitFixtures) -> tuple[dict[str, Any], list[str], int]:
    """Two sub-waves of `--streams` streams opened at once: on the rate-limited key, then on the small
    project. The figures, the failed checks and the unexpected answers (errors)."""
    import redis.asyncio as aioredis  # noqa: PLC0415

    from adapters.redis_admission import PREFIX  # noqa: PLC0415

    failures: list[str] = []
    port = stack.service_port
    body = limit_body(args.tokens, args.delay_ms)
    budget = f"project:{fx.budget_project}"
    client = aioredis.Redis.from_url(redis_url)
    try:
        base = await wait_for_value(lambda: _base(client, budget), fx.grant, REDIS_SETTLE_TIMEOUT_S)
        check(failures, base == fx.grant, f"limit wave: Redis holds base {base} for the small project, "
              f"its grant is {fx.grant}")

        # -- the rate-limited key
        rpm = Wave(tokens=args.tokens)
        log(f"limit wave, rate: {args.streams:,} streams at once on a key limited to {fx.rpm_limit}/min")
        request = loadgen.build_request("127.0.0.1", port, "/v1/chat/completions", body,
                                        {"Authorization": f"Bearer {fx.rpm_secret}"})
        with KeyWatch(redis_url, f"{PREFIX}rpm:{fx.rpm_key}", args.client_cpu) as watch:
            await run_wave(rpm, port, request, args.streams, procs, cores)
        gcra = gcra_check(watch.polls, fx.rpm_limit)
        refill_max = gcra["refill_allowed_max"]
        rpm_served, rpm_refused = rpm.statuses.get(200, 0), rpm.statuses.get(429, 0)
        rpm_unexpected = unexpected_answers(rpm, "rate_limit_exceeded")
        log(f"limit wave, rate: statuses {rpm.statuses}, codes {rpm.refusals}, dropped {rpm.dropped}, incomplete "
            f"{rpm.incomplete}; Redis: {gcra}")
        if rpm.error_samples and rpm_unexpected:
            log(f"limit wave, rate: first answers: {rpm.error_samples}")
        check(failures, rpm_unexpected == 0, f"limit wave, rate: {rpm_unexpected} answers neither a complete "
              f"200 stream nor a 429 rate_limit_exceeded: {rpm.statuses} {rpm.refusals}")
        check(failures, refill_max is not None and fx.rpm_limit <= rpm_served <= fx.rpm_limit + refill_max,
              f"limit wave, rate: {rpm_served} served; the limit allows {fx.rpm_limit} at once plus at most "
              f"{refill_max} refilled while admissions went on")
        counted = gcra["redis_admissions"]  # one count, or the candidates when the polls bracket t1 loosely
        check(failures, rpm_served == counted or (isinstance(counted, list) and rpm_served in counted),
              f"limit wave, rate: {rpm_served} served, Redis counted {gcra['redis_admissions']} admissions")
        check(failures, gcra["tat_ahead_max_s"] is not None and gcra["tat_ahead_max_s"] <= 60.001,
              f"limit wave, rate: the key's TAT was {gcra['tat_ahead_max_s']} s ahead (at most 60)")

        # -- the small project
        money = Wave(tokens=args.tokens)
        log(f"limit wave, balance: {args.streams:,} streams at once on a project whose balance covers "
            f"{fx.budget_streams}")
        request = loadgen.build_request("127.0.0.1", port, "/v1/chat/completions", body,
                                        {"Authorization": f"Bearer {fx.budget_secret}"})
        seen: dict[str, int | None] = {}
        stop = asyncio.Event()
        watcher = asyncio.ensure_future(watch_budget(stack.dsn, fx.budget_project, client, budget, stop, seen))
        try:
            await run_wave(money, port, request, args.streams, procs, cores)
        finally:
            stop.set()
            await watcher
        money_served, money_refused = money.statuses.get(200, 0), money.statuses.get(429, 0)
        money_unexpected = unexpected_answers(money, "insufficient_quota")
        log(f"limit wave, balance: statuses {money.statuses}, codes {money.refusals}, dropped {money.dropped}, "
            f"incomplete {money.incomplete}; lowest seen: remaining {seen.get('remaining')}, Redis available "
            f"{seen.get('available')}")
        if money.error_samples and money_unexpected:
            log(f"limit wave, balance: first answers: {money.error_samples}")
        check(failures, money_unexpected == 0, f"limit wave, balance: {money_unexpected} answers neither a "
              f"complete 200 stream nor a 429 insufficient_quota: {money.statuses} {money.refusals}")
        check(failures, money_served == fx.budget_streams,
              f"limit wave, balance: {money_served} served, the balance covers exactly {fx.budget_streams}")

        # -- metering: every 200 once, no 429
        metered: dict[str, Any] = {}
        for name, wave, project in (("rate", rpm, fx.rpm_project), ("balance", money, fx.budget_project)):
            balance, ledger, waited = await wait_metered(stack.dsn, project, len(wave.ok_ids))
            refused_metered = len(set(ledger) & set(wave.refused_ids))
            metered[name] = refused_metered
            log(f"limit wave, {name}: after {waited:.1f} s balance {balance}, {len(ledger)} ledger rows")
            check(failures, len(ledger) == len(set(ledger)) and set(ledger) == set(wave.ok_ids),
                  f"limit wave, {name}: ledger vs answers: {len(set(wave.ok_ids) - set(ledger))} answered but "
                  f"not metered, {len(set(ledger) - set(wave.ok_ids))} metered but not answered 200, "
                  f"{len(ledger) - len(set(ledger))} metered twice")
            check(failures, refused_metered == 0, f"limit wave, {name}: {refused_metered} refused requests metered")
            check(failures, balance.get("requests") == len(wave.ok_ids)
                  and balance.get("tokens_completion") == wave.tokens_received,
                  f"limit wave, {name}: balance counts {balance.get('requests')} requests and "
                  f"{balance.get('tokens_completion')} tokens; the streams: {len(wave.ok_ids)} and "
                  f"{wave.tokens_received}")

        # -- the small project's money: in the read model and in Redis
        final = await project_money(stack.dsn, fx.budget_project)
        ledger_cost = final.get("ledger_cost")
        check(failures, ledger_cost is not None and final.get("remaining_credits") == fx.grant - ledger_cost >= 0
              and final.get("charged_credits") == ledger_cost == money_served * fx.charge
              and final.get("granted_credits") == fx.grant,
              f"limit wave, balance: granted {fx.grant}, charged {final.get('charged_credits')}, ledger "
              f"{final.get('ledger_cost')}, remaining {final.get('remaining_credits')}; expected "
              f"{money_served} x {fx.charge} charged")
        check(failures, all(v is None or v >= 0 for v in seen.values()), f"limit wave, balance: went negative {seen}")
        remaining = final.get("remaining_credits")
        await wait_for_value(lambda: _base(client, budget), remaining, REDIS_SETTLE_TIMEOUT_S)
        after = await redis_budget(client, budget)
        log(f"limit wave, balance: read model {final}; Redis {after}")
        check(failures, after["base"] == remaining and after["available"] == remaining and after["reservations"] == 0,
              f"limit wave, balance: Redis holds base {after['base']}, available {after['available']}, "
              f"{after['reservations']} reservations; the read model's remaining is {remaining}")
    finally:
        await client.aclose()

    money_exact = (money_unexpected == 0 and money_served == fx.budget_streams
                   and not [f for f in failures if "balance:" in f])
    figures: dict[str, Any] = {
        "rate": {
            "streams": args.streams, "limit_rpm": fx.rpm_limit, "expected_served": fx.rpm_limit,
            "expected_served_max": None if refill_max is None else fx.rpm_limit + refill_max,
            "served": rpm_served, "refused": rpm_refused, "refusal_codes": rpm.refusals,
            "unexpected": rpm_unexpected, "over_limit": rpm_served - fx.rpm_limit,
            "refill_interval_ms": round(60_000 / fx.rpm_limit, 2), **gcra, "refused_metered": metered["rate"],
            "duration_s": round(rpm.duration_s, 2), "exact": not [f for f in failures if "rate:" in f],
        },
        "balance": {
            "streams": args.streams, "grant_credits": fx.grant, "reserve_credits_per_stream": fx.reserve,
            "charge_credits_per_stream": fx.charge, "expected_served": fx.budget_streams,
            "served": money_served, "refused": money_refused, "refusal_codes": money.refusals,
            "unexpected": money_unexpected, "refused_metered": metered["balance"],
            "charged_credits": final.get("charged_credits"), "remaining_credits": remaining,
            "remaining_min_seen": seen.get("remaining"), "redis_available_min_seen": seen.get("available"),
            "redis_after": after, "duration_s": round(money.duration_s, 2), "exact": money_exact,
        },
    }
    figures |= {"served": rpm_served + money_served, "refused": rpm_refused + money_refused,
                "expected_served": fx.rpm_limit + fx.budget_streams,
                "exact": figures["rate"]["exact"] and figures["balance"]["exact"] and not failures}
    return figures, failures, rpm_unexpected + money_unexpected


async def _base(client: Any, budget: str) -> int | None:
    base: int | None = (await redis_budget(client, budget))["base"]
    return base


# --------------------------------------------------------------------------- the run


MESSAGES = [{"role": "user", "content": "Say hello to the load benchmark."}]


def request_body(tokens: int, delay_ms: int, max_tokens: int | None = None) -> bytes:
    payload = {"model": MODEL, "messages": MESSAGES, "stream": True,
               "max_tokens": 2 * tokens if max_tokens is None else max_tokens, "fake_tokens": tokens,
               "fake_delay_ms": delay_ms}
    return json.dumps(payload, separators=(",", ":")).encode()


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


async def idle_rss_mb(pids: list[int], seconds: float = 1.0) -> list[float]:
    """Each worker's VmRSS after `seconds` of quiet (the lowest of a few readings)."""
    readings: list[list[int]] = [[] for _ in pids]
    for _ in range(5):
        await asyncio.sleep(seconds / 5)
        for i, pid in enumerate(pids):
            readings[i].append(proc_status_kb(pid, "VmRSS"))
    return [round(min(r) / 1024, 1) for r in readings]


def mb(kb: int) -> float:
    return round(kb / 1024, 1)


async def run(args: argparse.Namespace, stack: Stack, redis: RedisServer | None,
              fixtures: LimitFixtures | None) -> tuple[dict[str, Any], list[str]]:
    failures: list[str] = []
    pids, port = stack.worker_pids, stack.service_port
    workers = len(pids)
    procs = Procs(pids, stack.upstream.pid, None if redis is None else redis.proc.pid,
                  None if redis is None else redis.url)
    cores = (args.gateway_cpu, args.client_cpu)
    auth = {"Authorization": f"Bearer {stack.secret}"}
    nofiles = [open_files_limit(pid) for pid in pids]
    nofile = None if None in nofiles else min(n for n in nofiles if n is not None)
    for pid, limit in zip(pids, nofiles, strict=True):
        log(f"the gateway (pid {pid}) may open {limit} files")
        check(failures, limit is None or limit >= 2 * args.streams + FDS_SPARE,
              f"the gateway's open-files limit {limit} is below {2 * args.streams + FDS_SPARE}")
    owners = spool_owners(stack.data_dir / "service" / "spool")
    if workers > 1:
        log(f"usage spools: {({str(k)[:8]: v for k, v in owners.items()})} (instance → pid)")

    log(f"warm-up: {WARMUP_STREAMS * workers} streams of {WARMUP_TOKENS} tokens")
    warmup = Wave(tokens=WARMUP_TOKENS)
    warm_request = loadgen.build_request("127.0.0.1", port, "/v1/chat/completions",
                                         request_body(WARMUP_TOKENS, 0), auth)
    await run_wave(warmup, port, warm_request, WARMUP_STREAMS * workers, procs, cores)
    check(failures, warmup.errors == 0, f"warm-up: statuses {warmup.statuses}, {warmup.dropped} dropped, "
          f"{warmup.incomplete} incomplete: {warmup.error_samples}")
    before_each = await idle_rss_mb(pids, 2.0)
    rss_before, rss_before_total = max(before_each), round(sum(before_each), 1)
    hwm_before = max(mb(proc_status_kb(pid, "VmHWM")) for pid in pids)
    log(f"idle RSS after the warm-up: {before_each if workers > 1 else rss_before} MB")

    request = loadgen.build_request("127.0.0.1", port, "/v1/chat/completions",
                                    request_body(args.tokens, args.delay_ms), auth)
    samples, stop = Samples(workers), asyncio.Event()
    waves: list[Wave] = []
    rss_after_waves: list[float] = []
    rss_after_waves_total: list[float] = []
    wave_peaks: list[float] = []
    for w in range(args.waves):
        wave = Wave(tokens=args.tokens)
        waves.append(wave)
        log(f"wave {w + 1}/{args.waves}: opening {args.streams:,} streams of {args.tokens} tokens, "
            f"{args.delay_ms} ms apart")
        first_sample = len(samples.rss_kb)
        sampler = asyncio.ensure_future(sample(pids, samples, stop))
        progress = asyncio.ensure_future(report_progress(wave, samples))
        try:
            await run_wave(wave, port, request, args.streams, procs, cores)
        finally:
            stop.set()
            await sampler
            progress.cancel()
            stop.clear()
        wave_peaks.append(mb(max((max(s[first_sample:], default=0) for s in samples.rss_kb_worker), default=0)))
        after_each = await idle_rss_mb(pids, WAVE_PAUSE_S)
        rss_after_waves.append(max(after_each))
        rss_after_waves_total.append(round(sum(after_each), 1))
        log(f"wave {w + 1}: {len(wave.completed_ids):,} completed in {wave.duration_s:.1f} s, statuses "
            f"{wave.statuses}, dropped {wave.dropped}, incomplete {wave.incomplete}, open at once {wave.open_peak:,}; "
            f"RSS peak {wave_peaks[-1]} MB, idle after {after_each if workers > 1 else rss_after_waves[-1]} MB; "
            f"ttft p50 {ms(percentile(wave.ttfts, 0.5))} ms p99 {ms(percentile(wave.ttfts, 0.99))} ms; CPU {wave.busy}")
        if wave.error_samples:
            log(f"wave {w + 1} errors (first {len(wave.error_samples)}): {wave.error_samples}")
        check(failures, wave.errors == 0, f"wave {w + 1}: statuses {wave.statuses}, {wave.dropped} connections "
              f"failed or dropped, {wave.incomplete} streams incomplete")

    rss_hwm = max(mb(proc_status_kb(pid, "VmHWM")) for pid in pids)
    ok_ids = warmup.ok_ids + [i for wave in waves for i in wave.ok_ids]
    load_ids = {i for wave in waves for i in wave.ok_ids}
    completed = sum(len(wave.completed_ids) for wave in waves)
    tokens_expected = warmup.tokens_received + sum(wave.tokens_received for wave in waves)
    log(f"waiting for {len(ok_ids):,} requests (warm-up included) to be metered")
    balance, ledger, waited = await wait_metered(stack.dsn, stack.project_id, len(ok_ids))
    log(f"after {waited:.1f} s: balance {balance}, {len(ledger):,} ledger rows")
    usage_entries = sum(1 for request_id in ledger if request_id in load_ids)
    check(failures, len(set(ok_ids)) == len(ok_ids) and "" not in ok_ids,
          "the gateway's x-request-id values are missing or not unique")
    check(failures, balance.get("requests") == len(ok_ids),
          f"balances.requests = {balance.get('requests')}, the gateway answered {len(ok_ids)} streams with 200")
    check(failures, balance.get("tokens_completion") == tokens_expected,
          f"balances.tokens_completion = {balance.get('tokens_completion')}, the streams carried {tokens_expected}")
    check(failures, len(ledger) == len(set(ledger)), f"{len(ledger) - len(set(ledger))} requests metered twice")
    check(failures, set(ledger) == set(ok_ids),
          f"ledger vs answers: {len(set(ok_ids) - set(ledger))} answered but not metered, "
          f"{len(set(ledger) - set(ok_ids))} metered but not answered 200")
    check(failures, usage_entries == completed, f"usage_entries_recorded {usage_entries} != requests_completed "
          f"{completed}")
    metered_ok = not [f for f in failures if "balances" in f or "ledger" in f or "metered" in f
                      or "usage_entries" in f]

    per_worker, unattributed = await streams_by_worker(stack.dsn, sorted(load_ids), owners, pids)
    log(f"streams metered per worker {dict(zip(pids, per_worker, strict=True))}, {unattributed} unattributed")
    if workers > 1:
        check(failures, all(per_worker), f"the load did not reach every worker: streams per worker {per_worker} "
              f"(pids {pids}), {unattributed} not attributed")

    limit_wave, limit_errors = None, 0
    if fixtures is not None and redis is not None:
        limit_wave, limit_failures, limit_errors = await run_limit_wave(args, stack, procs, cores, redis.url,
                                                                        fixtures)
        failures += limit_failures
    redis_state = None
    if redis is not None:
        redis_state = await redis_summary(redis.url, redis.proc.pid)
        log(f"Redis at the end: {redis_state}")
        check(failures, redis_state["reservations_left"] == 0,
              f"Redis still holds {redis_state['reservations_left']} reservations after every request ended")

    rss_peak = max(mb(max(s, default=0)) for s in samples.rss_kb_worker)
    rss_peak_total = mb(max(samples.rss_kb, default=0))
    duration_s = sum(wave.duration_s for wave in waves)
    ttfts = [t for wave in waves for t in wave.ttfts]
    statuses: dict[str, int] = {}
    for wave in waves:
        for status, n in wave.statuses.items():
            statuses[str(status)] = statuses.get(str(status), 0) + n
    streams_total = args.streams * args.waves
    figures: dict[str, Any] = {
        "concurrent_streams": args.streams,
        "waves": args.waves,
        "workers": workers,
        "worker_pids": pids,
        "errors": sum(wave.errors for wave in waves) + limit_errors,
        "statuses": statuses,
        "dropped": sum(wave.dropped for wave in waves),
        "incomplete_streams": sum(wave.incomplete for wave in waves),
        "requests_completed": completed,
        "usage_entries_recorded": usage_entries,
        "streams_per_worker": per_worker,
        "streams_unattributed": unattributed,
        "rss_mb_before": rss_before,
        "rss_mb_before_total": rss_before_total,
        "rss_mb_peak": rss_peak,
        "rss_mb_peak_per_worker": [mb(max(s, default=0)) for s in samples.rss_kb_worker],
        "rss_mb_peak_total": rss_peak_total,
        "rss_mb_peak_per_wave": wave_peaks,
        "rss_mb_after_waves": rss_after_waves,
        "rss_mb_after_waves_total": rss_after_waves_total,
        "rss_mb_hwm": rss_hwm,
        "rss_mb_hwm_before": hwm_before,
        "rss_kb_per_open_stream": round((rss_peak_total - rss_before_total) * 1024 / args.streams, 1),
        "open_streams_peak": max(wave.open_peak for wave in waves),
        "gateway_fds_peak": max(samples.fds, default=None),
        "gateway_fds_peak_per_worker": [max(s, default=None) for s in samples.fds_worker],
        "gateway_nofile_limit": nofile,
        "tokens_per_stream": args.tokens,
        "delay_ms": args.delay_ms,
        "ttft_p50_ms": ms(percentile(ttfts, 0.50)),
        "ttft_p99_ms": ms(percentile(ttfts, 0.99)),
        "duration_s": round(duration_s, 2),
        "wave_durations_s": [round(wave.duration_s, 2) for wave in waves],
        "min_stream_s": round(args.tokens * args.delay_ms / 1000, 2),
        "tokens_per_s": round(sum(wave.tokens_received for wave in waves) / max(1e-9, duration_s)),
        "cpu_per_wave": [wave.busy for wave in waves],
        "gateway_cpu_ms_per_stream": round(sum(w.gateway_cpu_s for w in waves) / max(1, streams_total) * 1000, 3),
        "worker_cpu_ms_per_stream": [round(sum(w.worker_cpu_s[i] for w in waves) / max(1, streams_total) * 1000, 3)
                                     for i in range(workers)],
        "metered_ok": metered_ok,
        "metered_requests": balance.get("requests"),
        "metered_completion_tokens": balance.get("tokens_completion"),
        "ledger_rows": len(ledger),
        "warmup_requests": len(warmup.ok_ids),
        "metering_wait_s": round(waited, 2),
        "limit_wave": limit_wave,
        "redis": redis_state,
        "quick": args.quick,
        "loadavg_before": args.loadavg_before,
        "failures": failures,
    }
    return figures, failures


async def report_progress(wave: Wave, samples: Samples) -> None:
    while True:
        await asyncio.sleep(2.0)
        rss = samples.rss_kb[-1] / 1024 if samples.rss_kb else 0
        each = (f" ({', '.join(f'{s[-1] / 1024:.1f}' for s in samples.rss_kb_worker)})"
                if samples.workers > 1 and samples.rss_kb else "")
        log(f"  open {wave.open_now:,} (peak {wave.open_peak:,}), ended {wave.ended:,}, completed "
            f"{len(wave.completed_ids):,}, errors {wave.errors}, gateway RSS {rss:.1f} MB{each}, "
            f"fds {samples.fds[-1] if samples.fds else '?'}")


def raise_open_files_limit(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (the children started after inherit it); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else max(soft, min(hard, max(needed, 65_536)))
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 streams x 100 tokens, 1 wave")
    parser.add_argument("--streams", type=int, default=None, help="streams opened at once (default 2000)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per stream (default 200)")
    parser.add_argument("--delay-ms", type=int, default=5, help="the upstream's pause before each token (default 5)")
    parser.add_argument("--waves", type=int, default=None, help="waves of streams (default 2, --quick 1)")
    parser.add_argument("--workers", type=int, default=1,
                        help="gateway processes (`lwapi serve --workers N`, all on the gateway core); 2 or more "
                             "start a throwaway redis-server and add the limit wave (default 1)")
    parser.add_argument("--redis", action="store_true",
                        help="with one worker: admit through a throwaway Redis too, and run the limit wave (to tell "
                             "the cost of shared admission from that of several processes)")
    parser.add_argument("--gateway-cpu", type=int, default=0, help="the core the service is pinned to (default 0)")
    parser.add_argument("--client-cpu", type=int, default=1,
                        help="the core of the upstream, this process, Redis and the embedded PostgreSQL (default 1)")
    parser.add_argument("--service-log", type=Path, default=None, help="keep a copy of the service's log here")
    args = parser.parse_args()
    args.streams = args.streams or (500 if args.quick else 2000)
    args.tokens = args.tokens or (100 if args.quick else 200)
    args.waves = args.waves or (1 if args.quick else 2)
    # what running_stack reads besides the cores (the fake upstream keeps uvloop: timing to the
    # millisecond does not matter here, its capacity for thousands of streams does)
    args.profile, args.server, args.upstream_loop = None, "uvicorn", "auto"
    if min(args.streams, args.tokens, args.waves) < 1 or args.delay_ms < 0:
        parser.error("--streams, --tokens and --waves must be positive, --delay-ms not negative")
    if not 1 <= args.workers <= WORKERS_MAX:
        parser.error(f"--workers must be between 1 and {WORKERS_MAX}")
    if args.workers > 1 and shutil.which("redis-server") is None:
        parser.error("--workers > 1 needs redis-server on PATH (apt-get install redis-server)")
    if shutil.which("taskset") is None:
        parser.error("taskset (util-linux) is needed to pin the processes")
    if args.gateway_cpu == args.client_cpu or not {args.gateway_cpu, args.client_cpu} <= os.sched_getaffinity(0):
        parser.error(f"--gateway-cpu and --client-cpu must be two different cores of {sorted(os.sched_getaffinity(0))}")
    # this process holds one socket per stream, the gateway two, the upstream one
    nofile = raise_open_files_limit(2 * args.streams + FDS_SPARE)
    args.loadavg_before = [round(x, 2) for x in os.getloadavg()]
    log(f"open-files limit {nofile}; load average {args.loadavg_before} on {os.cpu_count()} cpus")
    if args.loadavg_before[0] > 1.0:
        log("WARNING: other processes are running; see gateway_core_others in cpu_per_wave")
    if nofile < 2 * args.streams + FDS_SPARE:
        parser.error(f"the open-files limit ({nofile}) is too low for {args.streams} streams; raise `ulimit -Hn`")
    os.sched_setaffinity(0, {args.client_cpu})  # the embedded PostgreSQL started below inherits the core
    shared = args.workers > 1 or args.redis
    with fresh_database() as dsn, (running_redis(args.client_cpu) if shared else contextlib.nullcontext()) as redis:
        fixtures = create_limit_fixtures(dsn, args) if shared else None
        with running_stack(args, dsn, workers=args.workers, redis_url=redis.url if redis else None) as stack:
            loop = loadgen.new_event_loop()
            try:
                result, failures = loop.run_until_complete(run(args, stack, redis, fixtures))
            finally:
                loop.close()
                log_text = stack.log_path.read_text(errors="replace") if stack.log_path.exists() else ""
                if args.service_log is not None:
                    args.service_log.write_text(log_text)
    problems = [line for line in log_text.splitlines() if PROBLEM_LINE.search(line)]
    result["service_log_warnings"] = len(problems)
    if problems:
        log(f"the service logged {len(problems)} warnings/errors; the first ones:\n" + "\n".join(problems[:20]))
    emit(result)
    if failures:
        log(f"{len(failures)} correctness check(s) failed: {failures}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
