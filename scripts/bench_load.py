#!/usr/bin/env python
"""Benchmark: thousands of streams held open at once through one gateway process — no error, bounded
memory, every request metered exactly once.

The stack is `scripts/bench_gateway.py`'s (`running_stack`): a fresh database, the fake OpenAI-compatible
upstream (`tests.fake_upstream`) and `lwapi serve` as a subprocess with every check and metering on (a
real key, a model with prices, admission, credit reservation, usage spooled and recorded in the event
store, the projections running in the same process). The service is pinned to core 0; the upstream,
this process and the embedded PostgreSQL share core 1. This process raises its open-files limit
(RLIMIT_NOFILE) before it starts them, so they inherit it, and checks the gateway's.

Load: a few warm-up streams, a pause, then `--waves` waves; each wave opens `--streams` connections at
once (raw asyncio protocols under uvloop, one streaming chat completion per connection, then closed),
each asking the upstream for `--tokens` tokens `--delay-ms` apart, and waits until all have ended. A
stream counts as completed when it answered 200, ended with `data: [DONE]` and carried exactly
`--tokens` content deltas. Every 100 ms the gateway's VmRSS (/proc/PID/status), its open file
descriptors and the number of streams open on the client side are sampled.

Metering: once the waves are over, wait (up to 60 s) until the project's `lwapi_read.balances` counts
every stream answered 200 and `lwapi_read.ledger_usage` holds a row for each; then check that the
ledger's request ids are exactly the `x-request-id`s the gateway answered 200 with, each once, and that
the completion tokens are what the streams carried.

Uses $DATABASE_URL's server (a new database, dropped after) when set, else a throwaway embedded server.
Progress goes to stderr; the figures are ONE JSON object on the last line of stdout. Exits 1 when a
correctness check fails (an answer other than 200, a dropped or incomplete stream, a metering
mismatch), not when a memory figure is merely high.

    .venv/bin/python scripts/bench_load.py --quick     # 500 streams x 100 tokens, 1 wave, about 1 min
    .venv/bin/python scripts/bench_load.py             # 2,000 streams x 200 tokens at 5 ms, 2 waves
    .venv/bin/python scripts/bench_load.py --streams 1000 --waves 3 --service-log /tmp/gw.log

Keys: concurrent_streams (streams opened at once per wave), errors (non-200 answers + connections that
failed or dropped + streams without [DONE] or with the wrong token count, all waves), requests_completed
(streams completed, all waves, warm-up excluded), usage_entries_recorded (ledger_usage rows for those
streams' request ids), rss_mb_peak (the gateway's highest sampled VmRSS during the waves), rss_mb_before
(idle, after the warm-up), rss_kb_per_open_stream ((peak - before) / concurrent_streams), rss_mb_hwm
(the kernel's VmHWM at the end; rss_mb_hwm_before: the same before the waves, start-up included),
rss_mb_after_waves (idle after each wave: growth from wave to wave would be a leak), open_streams_peak
(200 streams open at once, client side), gateway_fds_peak (the gateway's descriptors: client and
upstream sockets), tokens_per_stream, delay_ms, ttft_p50_ms / ttft_p99_ms (request sent → first `data:`
bytes), duration_s (all waves), wave_durations_s, tokens_per_s (content deltas received per second,
all streams together), gateway_cpu_ms_per_stream, cpu_per_wave (the gateway's, the upstream's and this
process's share of a core, and how busy each of the two cores was: a client core near 1 means the
upstream and this process set the pace, and streams last longer than tokens x delay;
gateway_core_others: other processes on the gateway's core), statuses, metered_ok, quick,
loadavg_before, failures.
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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's packages, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
from bench_gateway import METERING_TIMEOUT_S, MODEL, Stack, core_times, proc_cpu_s, running_stack
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
    gateway_cpu_s: float = 0.0
    busy: dict[str, float] = field(default_factory=dict)  # CPU shares over the wave (see `cpu_shares`)

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
            wave.note_error(f"status {self.status}: {bytes(self.error_body).decode(errors='replace')}")
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


async def run_wave(wave: Wave, port: int, request: bytes, count: int, stack: Stack, cores: tuple[int, int]) -> None:
    """Open `count` streams at once and wait until every one has ended (or stalled and was aborted)."""
    streams: list[_Stream] = []
    before = cpu_counters(stack)
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
    after = cpu_counters(stack)
    wave.gateway_cpu_s = after["gateway"] - before["gateway"]
    wave.busy = cpu_shares(before, after, wave.duration_s, cores)


# --------------------------------------------------------------------------- sampling


def cpu_counters(stack: Stack) -> dict[str, Any]:
    """CPU seconds so far of the gateway, the upstream and this process, and each core's jiffies."""
    return {"gateway": sum(proc_cpu_s(stack.gateway_pid)), "upstream": sum(proc_cpu_s(stack.upstream.pid)),
            "loadgen": time.process_time(), "cores": core_times()}


def cpu_shares(before: dict[str, Any], after: dict[str, Any], seconds: float,
               cores: tuple[int, int]) -> dict[str, float]:
    """Each process's share of one core over `seconds`, and how busy the gateway's and the client's cores were
    (a client core near 1 means the upstream and this process, not the gateway, set the pace)."""
    out = {f"{name}_cpu_share": round((after[name] - before[name]) / max(1e-9, seconds), 3)
           for name in ("gateway", "upstream", "loadgen")}
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
    rss_kb: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)


async def sample(pid: int, samples: Samples, stop: asyncio.Event) -> None:
    """The gateway's VmRSS and open descriptors every SAMPLE_INTERVAL_S until `stop`."""
    while not stop.is_set():
        samples.rss_kb.append(proc_status_kb(pid, "VmRSS"))
        samples.fds.append(len(os.listdir(f"/proc/{pid}/fd")))
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


# --------------------------------------------------------------------------- the run


def request_body(tokens: int, delay_ms: int) -> bytes:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello to the load benchmark."}],
               "stream": True, "max_tokens": 2 * tokens, "fake_tokens": tokens, "fake_delay_ms": delay_ms}
    return json.dumps(payload, separators=(",", ":")).encode()


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


async def idle_rss_mb(pid: int, seconds: float = 1.0) -> float:
    """The gateway's VmRSS after `seconds` of quiet (the lowest of a few readings)."""
    readings = []
    for _ in range(5):
        await asyncio.sleep(seconds / 5)
        readings.append(proc_status_kb(pid, "VmRSS"))
    return round(min(readings) / 1024, 1)


async def run(args: argparse.Namespace, stack: Stack) -> tuple[dict[str, Any], list[str]]:
    failures: list[str] = []
    pid, port = stack.gateway_pid, stack.service_port
    cores = (args.gateway_cpu, args.client_cpu)
    auth = {"Authorization": f"Bearer {stack.secret}"}
    nofile = open_files_limit(pid)
    log(f"the gateway (pid {pid}) may open {nofile} files")
    check(failures, nofile is None or nofile >= 2 * args.streams + FDS_SPARE,
          f"the gateway's open-files limit {nofile} is below {2 * args.streams + FDS_SPARE}")

    log(f"warm-up: {WARMUP_STREAMS} streams of {WARMUP_TOKENS} tokens")
    warmup = Wave(tokens=WARMUP_TOKENS)
    warm_request = loadgen.build_request("127.0.0.1", port, "/v1/chat/completions",
                                         request_body(WARMUP_TOKENS, 0), auth)
    await run_wave(warmup, port, warm_request, WARMUP_STREAMS, stack, cores)
    check(failures, warmup.errors == 0, f"warm-up: statuses {warmup.statuses}, {warmup.dropped} dropped, "
          f"{warmup.incomplete} incomplete: {warmup.error_samples}")
    rss_before = await idle_rss_mb(pid, 2.0)
    hwm_before = round(proc_status_kb(pid, "VmHWM") / 1024, 1)
    log(f"idle RSS after the warm-up: {rss_before} MB")

    request = loadgen.build_request("127.0.0.1", port, "/v1/chat/completions",
                                    request_body(args.tokens, args.delay_ms), auth)
    samples, stop = Samples(), asyncio.Event()
    waves: list[Wave] = []
    rss_after_waves: list[float] = []
    wave_peaks: list[float] = []
    for w in range(args.waves):
        wave = Wave(tokens=args.tokens)
        waves.append(wave)
        log(f"wave {w + 1}/{args.waves}: opening {args.streams:,} streams of {args.tokens} tokens, "
            f"{args.delay_ms} ms apart")
        first_sample = len(samples.rss_kb)
        sampler = asyncio.ensure_future(sample(pid, samples, stop))
        progress = asyncio.ensure_future(report_progress(wave, samples))
        try:
            await run_wave(wave, port, request, args.streams, stack, cores)
        finally:
            stop.set()
            await sampler
            progress.cancel()
            stop.clear()
        wave_peaks.append(round(max(samples.rss_kb[first_sample:], default=0) / 1024, 1))
        rss_after_waves.append(await idle_rss_mb(pid, WAVE_PAUSE_S))
        log(f"wave {w + 1}: {len(wave.completed_ids):,} completed in {wave.duration_s:.1f} s, statuses "
            f"{wave.statuses}, dropped {wave.dropped}, incomplete {wave.incomplete}, open at once {wave.open_peak:,}; "
            f"RSS peak {wave_peaks[-1]} MB, idle after {rss_after_waves[-1]} MB; ttft p50 "
            f"{ms(percentile(wave.ttfts, 0.5))} ms p99 {ms(percentile(wave.ttfts, 0.99))} ms; CPU {wave.busy}")
        if wave.error_samples:
            log(f"wave {w + 1} errors (first {len(wave.error_samples)}): {wave.error_samples}")
        check(failures, wave.errors == 0, f"wave {w + 1}: statuses {wave.statuses}, {wave.dropped} connections "
              f"failed or dropped, {wave.incomplete} streams incomplete")

    rss_hwm = round(proc_status_kb(pid, "VmHWM") / 1024, 1)
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

    rss_peak = round(max(samples.rss_kb, default=0) / 1024, 1)
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
        "errors": sum(wave.errors for wave in waves),
        "statuses": statuses,
        "dropped": sum(wave.dropped for wave in waves),
        "incomplete_streams": sum(wave.incomplete for wave in waves),
        "requests_completed": completed,
        "usage_entries_recorded": usage_entries,
        "rss_mb_before": rss_before,
        "rss_mb_peak": rss_peak,
        "rss_mb_peak_per_wave": wave_peaks,
        "rss_mb_after_waves": rss_after_waves,
        "rss_mb_hwm": rss_hwm,
        "rss_mb_hwm_before": hwm_before,
        "rss_kb_per_open_stream": round((rss_peak - rss_before) * 1024 / args.streams, 1),
        "open_streams_peak": max(wave.open_peak for wave in waves),
        "gateway_fds_peak": max(samples.fds, default=None),
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
        "metered_ok": metered_ok,
        "metered_requests": balance.get("requests"),
        "metered_completion_tokens": balance.get("tokens_completion"),
        "ledger_rows": len(ledger),
        "warmup_requests": len(warmup.ok_ids),
        "metering_wait_s": round(waited, 2),
        "quick": args.quick,
        "loadavg_before": args.loadavg_before,
        "failures": failures,
    }
    return figures, failures


async def report_progress(wave: Wave, samples: Samples) -> None:
    while True:
        await asyncio.sleep(2.0)
        rss = samples.rss_kb[-1] / 1024 if samples.rss_kb else 0
        log(f"  open {wave.open_now:,} (peak {wave.open_peak:,}), ended {wave.ended:,}, completed "
            f"{len(wave.completed_ids):,}, errors {wave.errors}, gateway RSS {rss:.1f} MB, "
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
    parser.add_argument("--gateway-cpu", type=int, default=0, help="the core the service is pinned to (default 0)")
    parser.add_argument("--client-cpu", type=int, default=1,
                        help="the core of the upstream, this process and the embedded PostgreSQL (default 1)")
    parser.add_argument("--service-log", type=Path, default=None, help="keep a copy of the service's log here")
    args = parser.parse_args()
    args.streams = args.streams or (500 if args.quick else 2000)
    args.tokens = args.tokens or (100 if args.quick else 200)
    args.waves = args.waves or (1 if args.quick else 2)
    args.profile, args.server = None, "uvicorn"  # what running_stack reads besides the cores
    if min(args.streams, args.tokens, args.waves) < 1 or args.delay_ms < 0:
        parser.error("--streams, --tokens and --waves must be positive, --delay-ms not negative")
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
    with fresh_database() as dsn, running_stack(args, dsn) as stack:
        loop = loadgen.new_event_loop()
        try:
            result, failures = loop.run_until_complete(run(args, stack))
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
