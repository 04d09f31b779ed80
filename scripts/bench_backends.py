#!/usr/bin/env python
"""Benchmark: the gateway in front of a REAL vLLM CPU server, against the same vLLM server directly, the same
streamed requests, in one run.

The stack on loopback: the tiny random-weight Llama (`tests/backends/tiny_model.py`) served by vLLM's CPU build
(`tests/backends/vllm_server.py`, from `.venv-vllm`), a fresh database (`bench_support.fresh_database`), and
`lwapi serve` as a subprocess with every check and metering on: a real key, the model `tiny` as a `vllm`
deployment (`base_url` = vLLM's /v1, upstream model `tiny-llama`) with prices, admission, credit reservation, usage
spooled and recorded, the projections running. The load generator is `scripts/loadgen.py` (raw asyncio sockets,
one request in flight per connection). Every request is the same fixed-length stream:

    {"messages": [{"role": "user", "content": "count to ten"}], "stream": true,
     "stream_options": {"include_usage": true}, "max_tokens": 64, "min_tokens": 64, "temperature": 1.0, "seed": 1}

(`min_tokens` is vLLM's own sampling parameter, passed through by the gateway), so direct and gateway runs do the
same work: 64 completion tokens each, whatever the random weights produce.

Method. vLLM is warmed up first (streams at concurrency 8, direct, then through the gateway). Then, for each
concurrency (1 and 8), the phases alternate — direct, gateway, direct, gateway, ... (`--rounds`, 2 in quick mode,
4 in full) — so slow drift (other work on the machine, vLLM's state) hits both sides alike. Each phase has an
unmeasured warm-up then a measured window (quick: 1 + 8 s, full: 2 + 30 s); the rounds are pooled per side
(`rounds` in each phase keeps every round's own figures, `vllm_tokens_ratio_cN_rounds` the paired per-round ratios,
to show the noise). ratio = gateway tokens/s / direct tokens/s; added TTFT = gateway p50 − direct p50 (TTFT: from
writing the request to the first body bytes carrying an SSE `data:` line, streams finished inside the windows,
pooled).

Tokens/s = 64 × the streams finished inside the windows / (their summed durations / concurrency). In a closed loop
with `c` streams always in flight, the summed durations over `c` are the time those streams took, so this is the
token rate without the quantisation of counting whole streams over a fixed window (streams started together finish
in bursts of up to `c`). Two cross-checks per phase: `tokens_per_s_window` (64 × streams / window) and
`deltas_per_s` (loadgen's count of `"content":` fields arriving inside the windows). Content deltas are not tokens
here: vLLM's first chunk (the role) carries `"content":""`, and when its API server falls behind it merges several
tokens into one delta (`deltas_per_stream` shows 65 for most streams, fewer for merged ones), more or less often
depending on the load — so the headline rates count tokens by stream, 64 each, as vLLM's usage reports them.

What vLLM's CPU build does on two cores (seen while writing this): its model worker spins on core 0, its engine core
busy-loops on the other while requests run, and its API server gets what is left (~20 % of a core). It has two
modes: streaming (the first token ~6 ms after the request at c=1, then one delta every ~2 ms) and bursting (the
response — headers included — comes in one piece when generation ends, so TTFT ≈ the stream's duration, ~125 ms at
c=1). It flips between them unpredictably (seemingly more often under CPU contention) and stays in one for seconds
to minutes, whatever the client — direct, through the gateway or through a bare TCP proxy alike; at c=8 the
bursting mode can also serialise the streams (TTFT ≈ stream time ≈ 0.5-1 s, the c=1 token rate). The gateway
relays what arrives as it arrives (in streaming mode its TTFT stays far below the stream's duration), but it cannot
stream what vLLM sends in one piece. `burst_share` per phase (and `vllm_burst_share[_direct]_cN`) is the share of
streams whose first token came after 80 % of their duration: compare direct and gateway phases only where it is
similar, and read the per-round figures; `ttft_p50_ms_streaming` (and `vllm_added_ttft_p50_ms_cN_streaming`) pools
only the other streams, what the gateway adds to the first token when vLLM streams. When about half the streams of a
phase burst, a pooled p50 lands in either cluster (~6 or ~125 ms at c=1), and `vllm_added_ttft_p50_ms_c1` then
measures vLLM's mode, not the gateway: read it together with the burst shares and the `_streaming` figure.

Cores (`--pin`, default `split`). On two cores vLLM busy-loops on both (its model worker on every core but the
last, its engine core and API server on what is left), so without pinning any CPU the gateway uses comes out of
vLLM's throughput: that measures sharing two cores, not relaying. `split` (the default) confines all of vLLM to every
core but the last (taskset, and VLLM_CPU_OMP_THREADS_BIND) and puts everything of ours — the gateway, the load
generator, PostgreSQL — on the last, so direct and gateway phases give vLLM the same CPU and the ratio shows what
the relay adds; in split runs vLLM stayed in its streaming mode. `none` leaves scheduling to the kernel (the
gateway's CPU then competes with vLLM's, as when both share a small machine); `ours` pins only our processes, which
crowded vLLM's API server and engine core onto one core with them and pushed vLLM into its serialised bursting mode
at c=8 in every trial (direct too). Per phase: `cpu_share` (CPU seconds per window second of the gateway, each vLLM
process and the load generator), `core_busy` per core, and `gateway_cpu_us_per_stream`.

Correctness (exit 1 when one fails; a missed target does not): every stream answered 200 and complete (saw
`[DONE]`), no connection errors, no stream with more content deltas than vLLM sends for 64 tokens, and, once the
spool and the projections caught up, the gateway's metered usage in `lwapi_read.usage_rollups` equals what it
completed (warm-up included): requests = the gateway's 200 streams, completion tokens = 64 × that (`metered_ok`).

Every process started here (vLLM's process group, the service, PostgreSQL) is stopped on the way out, also after a
failure, Ctrl-C or SIGTERM. Progress goes to stderr; the figures are ONE JSON object on the last line of stdout
(after a crash too, then with the error in `failures`; not after Ctrl-C).

    .venv/bin/python scripts/bench_backends.py --quick     # 2 rounds of 1 + 8 s per phase: about 2 min in all
    .venv/bin/python scripts/bench_backends.py             # 4 rounds of 2 + 30 s per phase: about 9-10 min

Main keys: vllm_tokens_ratio_c8 (target >= 0.99), vllm_added_ttft_p50_ms_c1 (target < 2 ms),
vllm_tokens_ratio_c1, vllm_added_ttft_p50_ms_c8, vllm_tokens_per_s[_direct]_cN, vllm_ttft_p50_ms[_direct]_cN,
vllm_ttft_p99_ms[_direct]_cN, vllm_streams[_direct]_cN, vllm_errors[_direct]_cN, vllm_burst_share[_direct]_cN,
metered_ok, targets, targets_met, failures; `phases` holds each side's pooled figures per concurrency.
Needs `.venv-vllm` (`scripts/backends/install-vllm`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's packages, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gateway as gw
import loadgen
from bench_support import emit, fresh_database, log, percentile

from tests.backends.process import ServerProcess
from tests.backends.vllm_server import VllmMissing, make_tiny_model, start_vllm, vllm_python

ROOT = Path(__file__).resolve().parent.parent
PEPPER = gw.PEPPER
MODEL = "tiny"  # the gateway's catalog name
UPSTREAM_MODEL = "tiny-llama"  # vLLM's served model name
STREAM_TOKENS = 64
GRANT_CREDITS = 10**15
CONCURRENCIES = (1, 8)
VLLM_START_TIMEOUT_S = 300.0
METERING_TIMEOUT_S = 60.0
TARGETS = (  # (key, comparison, bound): the targets
    ("vllm_tokens_ratio_c8", ">=", 0.99),
    ("vllm_added_ttft_p50_ms_c1", "<", 2.0),
)


# --------------------------------------------------------------------------- vLLM, started so it is always stopped


def _ppid_and_pgid(pid: int) -> tuple[int, int, str]:
    """(parent pid, process group, state) of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[2]), fields[0]


def _processes() -> Iterator[tuple[int, int, int, str]]:
    """(pid, parent pid, process group, state) of every process we can see."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                yield (int(entry.name), *_ppid_and_pgid(int(entry.name)))


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    return sorted(pid for pid, _, group, state in _processes() if group == pgid and state != "Z")


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class VllmLaunch:
    """`start_vllm` in a thread (it takes 30-50 s, while the database and the service start here), with vLLM's
    process group found the moment it exists: a failure or Ctrl-C while vLLM loads still stops all of it."""

    def __init__(self, model_dir: Path, port: int, log_dir: Path, cpus: str | None = None) -> None:
        self.pgid: int | None = None
        self.server: ServerProcess | None = None
        self.started_at = time.monotonic()
        self.up_s: float | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vllm-start")
        self._future: Future[ServerProcess] = self._pool.submit(
            start_vllm, model_dir, port=port, served_name=UPSTREAM_MODEL, log_dir=log_dir,
            timeout_s=VLLM_START_TIMEOUT_S, cpus=cpus)
        self._watcher = threading.Thread(target=self._watch, name="vllm-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """Find our child that leads its own session and runs vLLM (start_server uses start_new_session)."""
        me = os.getpid()
        while self.pgid is None and not self._future.done():
            for pid, ppid, pgid, _ in _processes():
                if ppid == me and pgid == pid:
                    with contextlib.suppress(OSError):
                        if b"vllm" in Path(f"/proc/{pid}/cmdline").read_bytes():
                            self.pgid = pid
                            return
            time.sleep(0.2)

    def wait_spawned(self, timeout_s: float = 60.0) -> None:
        """Until vLLM's process exists (so that what we pin from now on is not inherited by it)."""
        deadline = time.monotonic() + timeout_s
        while self.pgid is None and time.monotonic() < deadline:
            if self._future.done():
                self._future.result()  # raises its failure
                return
            time.sleep(0.05)
        if self.pgid is None:
            raise RuntimeError(f"vLLM's process did not appear within {timeout_s:.0f} s")

    def wait(self) -> ServerProcess:
        while True:  # short waits: Ctrl-C gets through
            try:
                self.server = self._future.result(timeout=0.5)
            except FutureTimeout:
                continue
            self.up_s = time.monotonic() - self.started_at
            return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        elif self.pgid is not None:  # still starting (or failed): the group, then start_server's loop ends
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGTERM)
            with contextlib.suppress(BaseException):
                self._future.result(timeout=20)
        if self.pgid is not None:  # anything of its group left (an engine core whose parent died first)
            for pid in group_members(self.pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def pids(self) -> dict[str, int]:
        """vLLM's processes by role: api_server, engine_core, worker (and any other, by its name)."""
        assert self.pgid is not None
        out: dict[str, int] = {}
        for pid in group_members(self.pgid):
            name = comm(pid)
            role = ("vllm_api_server" if pid == self.pgid else "vllm_engine_core" if "EngineCor" in name
                    else "vllm_worker" if "Worker" in name else f"vllm_{name}_{pid}")
            out[role] = pid
        return out


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    dsn: str
    vllm: ServerProcess
    vllm_port: int
    vllm_pids: dict[str, int]
    vllm_start_s: float
    service: subprocess.Popen[bytes]
    service_port: int
    project_id: Any
    secret: str
    our_cores: list[int] | None  # where the gateway, the load generator and PostgreSQL run (None: not pinned)
    worker_cores: list[int]
    notes: list[str] = field(default_factory=list)


def setup_catalog(dsn: str, vllm_port: int) -> tuple[Any, str]:
    """A user, a project with a grant, a key, and the model `tiny` on the vLLM deployment; (project, secret)."""
    from adapters.database import eventstore_env  # noqa: PLC0415
    from domain.access import SYSTEM  # noqa: PLC0415
    from domain.accounting import Accounting  # noqa: PLC0415
    from domain.api_key import KeySettings  # noqa: PLC0415
    from domain.catalog import BackendKind, Deployment  # noqa: PLC0415
    from domain.pricing import Prices  # noqa: PLC0415

    app = Accounting(env=eventstore_env(dsn), key_pepper=PEPPER)
    try:
        user = app.register_user("bench@bench.example", "Bench")
        project = app.create_project(SYSTEM, "bench", "vLLM benchmark", user)
        app.grant_credits(SYSTEM, project, GRANT_CREDITS, "benchmark grant")
        _, secret = app.create_key(SYSTEM, project, user, KeySettings(name="bench"))
        app.add_model(SYSTEM, MODEL, Deployment("cpu1", BackendKind.VLLM, f"http://127.0.0.1:{vllm_port}/v1",
                                                UPSTREAM_MODEL),
                      Prices(1000, 2000, datetime(2020, 1, 1, tzinfo=UTC)))
    finally:
        app.close()
    return project, secret


@contextlib.contextmanager
def running_stack(args: argparse.Namespace) -> Iterator[Stack]:
    work = Path(tempfile.mkdtemp(prefix="lwapi-bench-vllm.", dir="/tmp"))
    log_path = work / "service.log"
    launch: VllmLaunch | None = None
    try:
        model_dir = make_tiny_model(work)
        vllm_port = gw.free_port()
        log(f"starting vLLM on port {vllm_port} (its log: {work}/vllm-{UPSTREAM_MODEL}-{vllm_port}.log); "
            "meanwhile the database and the service")
        allowed = sorted(os.sched_getaffinity(0))
        split = args.pin == "split" and len(allowed) > 1
        launch = VllmLaunch(model_dir, vllm_port, work, cpus=",".join(map(str, allowed[:-1])) if split else None)
        launch.wait_spawned()
        # vLLM's auto binding gives its model worker every core but the last (checked below, once it is up)
        our_cores = allowed[-1:] if args.pin in ("ours", "split") and len(allowed) > 1 else None
        if our_cores is not None:
            os.sched_setaffinity(0, our_cores)  # this thread: the load generator, and PostgreSQL started from it
        with fresh_database() as dsn:
            project, secret = setup_catalog(dsn, vllm_port)
            with running_service(dsn, secret, our_cores, work, log_path) as (service, service_port):
                log("the service lists the model; waiting for vLLM")
                vllm = launch.wait()
                assert launch.up_s is not None
                pids = launch.pids()
                worker_cores = sorted(os.sched_getaffinity(pids["vllm_worker"])) if "vllm_worker" in pids else []
                log(f"vLLM up in {launch.up_s:.1f} s: {pids}; its worker runs on cores {worker_cores}")
                notes = []
                if our_cores is not None and set(our_cores) & set(worker_cores):
                    notes.append(f"vLLM's worker (cores {worker_cores}) shares a core with ours ({our_cores})")
                    log(f"WARNING: {notes[-1]}")
                yield Stack(dsn, vllm, vllm_port, pids, launch.up_s, service, service_port, project, secret,
                            our_cores, worker_cores, notes)
    except BaseException:
        if log_path.exists():
            log("service log tail:\n" + "\n".join(log_path.read_text(errors="replace").splitlines()[-30:]))
        if launch is not None and launch.server is not None and launch.server.process.poll() is not None:
            log("vLLM log tail:\n" + launch.server.log_tail())
        raise
    finally:
        if launch is not None:
            log("stopping vLLM")
            launch.stop()
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def running_service(dsn: str, secret: str, cores: list[int] | None, work: Path,
                    log_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`lwapi serve` on a free port, once it lists the model; stopped on the way out (before its database)."""
    port = gw.free_port()
    env = {**os.environ, "DATABASE_URL": dsn, "LWAPI_KEY_PEPPER": PEPPER.hex(),
           "LWAPI_ADMIN_EMAIL": "ops@bench.example", "LWAPI_ADMIN_PASSWORD": "bench-admin-password-1"}
    argv = [sys.executable, "-m", "edge.cli", "serve", "--port", str(port), "--data-dir", str(work / "service")]
    if cores is not None:
        argv = ["taskset", "-c", ",".join(map(str, cores)), *argv]
    log(f"starting the service on port {port} (cores {cores or 'any'}); its log: {log_path}")
    service: subprocess.Popen[bytes] | None = None
    try:
        with log_path.open("wb") as out:
            service = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        gw.wait_http(f"http://127.0.0.1:{port}/healthz", gw.STARTUP_TIMEOUT_S, service)
        gw.wait_http(f"http://127.0.0.1:{port}/v1/models", gw.STARTUP_TIMEOUT_S, service,
                     headers={"Authorization": f"Bearer {secret}"}, until=f'"{MODEL}"')
        yield service, port
    finally:
        log("stopping the service")
        gw.stop_process(service)


# --------------------------------------------------------------------------- phases


def request_body(model: str) -> bytes:
    payload = {"model": model, "messages": [{"role": "user", "content": "count to ten"}], "stream": True,
               "stream_options": {"include_usage": True}, "max_tokens": STREAM_TOKENS, "min_tokens": STREAM_TOKENS,
               "temperature": 1.0, "seed": 1}
    return json.dumps(payload, separators=(",", ":")).encode()


class Sampler:
    """CPU counters of the gateway, vLLM's processes and the cores, read at the window's edges."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def __call__(self, _edge: str) -> dict[str, Any]:
        procs = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                procs[name] = gw.proc_cpu_s(pid)
        return {"procs": procs, "cores": gw.core_times(), "t": time.perf_counter()}


def is_burst(first: float, whole: float) -> bool:
    """The first token came after 80 % of the stream's duration: vLLM sent the stream in one piece."""
    return first >= 0.8 * whole


def streaming_ttfts(r: loadgen.PhaseResult) -> list[float]:
    """The TTFTs of the streams (finished in the window) that vLLM streamed rather than sent in one piece."""
    if len(r.ttfts) != len(r.latencies):  # every 200 stream has a first `data:` line, so the lists pair up
        return []
    return [first for first, whole in zip(r.ttfts, r.latencies, strict=True) if not is_burst(first, whole)]


@dataclass
class Pool:
    """One side's rounds at one concurrency, pooled."""

    window_s: float = 0.0
    tokens: int = 0
    streams: int = 0
    total_ok: int = 0
    errors: int = 0
    incomplete: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    deltas_per_stream: dict[str, int] = field(default_factory=dict)
    ttfts: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    ttfts_streaming: list[float] = field(default_factory=list)  # those of streams vLLM did not send in one piece
    cpu_s: dict[str, float] = field(default_factory=dict)  # process → CPU seconds inside the windows
    core_busy: dict[str, list[int]] = field(default_factory=dict)  # core → [busy, total] jiffies
    loadgen_cpu_s: float = 0.0
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def add(self, r: loadgen.PhaseResult, concurrency: int) -> dict[str, Any]:
        self.window_s += r.window_s
        self.tokens += r.tokens
        self.streams += r.ok
        self.total_ok += r.total_ok
        self.errors += r.errors
        self.incomplete += r.incomplete
        for status, n in r.statuses.items():
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + n
        for deltas, n in r.stream_tokens.items():
            self.deltas_per_stream[str(deltas)] = self.deltas_per_stream.get(str(deltas), 0) + n
        self.ttfts += r.ttfts
        self.latencies += r.latencies
        streaming = streaming_ttfts(r)
        self.ttfts_streaming += streaming
        bursts = r.ok - len(streaming)
        self.loadgen_cpu_s += r.cpu_s
        start, end = r.samples.get("start"), r.samples.get("end")
        if isinstance(start, dict) and isinstance(end, dict):
            for name, (u1, s1) in end["procs"].items():
                if name in start["procs"]:
                    u0, s0 = start["procs"][name]
                    self.cpu_s[name] = self.cpu_s.get(name, 0.0) + (u1 - u0) + (s1 - s0)
            for core, (b1, t1) in end["cores"].items():
                b0, t0 = start["cores"].get(core, (b1, t1))
                acc = self.core_busy.setdefault(core, [0, 0])
                acc[0] += b1 - b0
                acc[1] += t1 - t0
        busy_s = sum(r.latencies) / concurrency
        figures = {"tokens_per_s": round(STREAM_TOKENS * r.ok / busy_s, 1) if busy_s else None, "streams": r.ok,
                   "ttft_p50_ms": gw.ms(percentile(r.ttfts, 0.50)),
                   "stream_p50_ms": gw.ms(percentile(r.latencies, 0.50)),
                   "burst_share": round(bursts / r.ok, 3) if r.ok else None, "errors": r.errors}
        self.rounds.append(figures)
        return figures

    def figures(self, concurrency: int) -> dict[str, Any]:
        n = max(1, self.streams)
        window = self.window_s or 1.0
        busy_s = sum(self.latencies) / concurrency  # the window, as the streams' own durations measure it
        out: dict[str, Any] = {
            "tokens_per_s": round(STREAM_TOKENS * self.streams / busy_s, 1) if busy_s else None,
            "tokens_per_s_window": round(STREAM_TOKENS * self.streams / window, 1),
            "deltas_per_s": round(self.tokens / window, 1),
            "streams": self.streams, "streams_per_s": round(self.streams / window, 2),
            "window_s": round(self.window_s, 2), "total_ok": self.total_ok,
            "ttft_p50_ms": gw.ms(percentile(self.ttfts, 0.50)), "ttft_p99_ms": gw.ms(percentile(self.ttfts, 0.99)),
            "stream_p50_ms": gw.ms(percentile(self.latencies, 0.50)),
            "stream_p99_ms": gw.ms(percentile(self.latencies, 0.99)),
            "burst_share": round(1 - len(self.ttfts_streaming) / self.streams, 3) if self.streams else None,
            "ttft_p50_ms_streaming": gw.ms(percentile(self.ttfts_streaming, 0.50)), "errors": self.errors,
            "incomplete_streams": self.incomplete, "statuses": self.statuses,
            "deltas_per_stream": self.deltas_per_stream,
            "cpu_share": {name: round(s / window, 3) for name, s in sorted(self.cpu_s.items())}
            | {"loadgen": round(self.loadgen_cpu_s / window, 3)},
            "core_busy": {core: round(b / t, 3) for core, (b, t) in sorted(self.core_busy.items()) if t},
            "rounds": self.rounds,
        }
        # CPU the machine spent on anything but the gateway, vLLM and the load generator (PostgreSQL, other work)
        ours = sum(out["cpu_share"].values())
        out["others_cpu_share"] = round(max(0.0, sum(out["core_busy"].values()) - ours), 3)
        if "gateway" in self.cpu_s:
            out["gateway_cpu_us_per_stream"] = round(self.cpu_s["gateway"] / n * 1e6, 1)
        return out


async def warm_up(args: argparse.Namespace, stack: Stack, requests: dict[str, tuple[int, bytes]]) -> int:
    """vLLM's first streams (direct, then through the gateway); returns the gateway's 200s (they are metered)."""
    gateway_ok = 0
    for target in ("direct", "gateway"):
        port, request = requests[target]
        seconds = args.warmup_total_s if target == "direct" else args.warmup_total_s / 2
        r = await loadgen.run_phase("127.0.0.1", port, request, concurrency=max(CONCURRENCIES), warmup_s=0,
                                    duration_s=seconds, stream=True)
        bad = {s: n for s, n in r.statuses.items() if s != 200}
        log(f"warm-up {target:7s}: {r.total_ok} streams, {r.tokens / r.window_s:,.0f} deltas/s"
            + (f", statuses {bad}, errors {r.errors}" if bad or r.errors else ""))
        if bad or r.errors or r.incomplete:
            raise RuntimeError(f"warm-up {target} failed: statuses {dict(r.statuses)}, {r.errors} connection errors, "
                               f"{r.incomplete} incomplete streams")
        if target == "gateway":
            gateway_ok += r.total_ok
    return gateway_ok


async def run_phases(args: argparse.Namespace, stack: Stack) -> tuple[dict[str, Pool], int]:
    auth = {"Authorization": f"Bearer {stack.secret}"}
    requests = {
        "direct": (stack.vllm_port, loadgen.build_request("127.0.0.1", stack.vllm_port, "/v1/chat/completions",
                                                          request_body(UPSTREAM_MODEL))),
        "gateway": (stack.service_port, loadgen.build_request("127.0.0.1", stack.service_port,
                                                              "/v1/chat/completions", request_body(MODEL), auth)),
    }
    warm_ok = await warm_up(args, stack, requests)
    sampler = Sampler({"gateway": stack.service.pid, **stack.vllm_pids})
    pools: dict[str, Pool] = {}
    for c in CONCURRENCIES:
        for rnd in range(args.rounds):
            for target in ("direct", "gateway"):
                port, request = requests[target]
                r = await loadgen.run_phase("127.0.0.1", port, request, concurrency=c, warmup_s=args.warmup_s,
                                            duration_s=args.duration_s, stream=True, sampler=sampler)
                f = pools.setdefault(f"{target}_c{c}", Pool()).add(r, c)
                bad = {s: n for s, n in r.statuses.items() if s != 200}
                log(f"c={c} round {rnd + 1}/{args.rounds} {target:7s} {f['tokens_per_s'] or 0:8,.1f} tokens/s  "
                    f"{r.ok:4d} streams  ttft p50 {f['ttft_p50_ms']} ms  stream p50 {f['stream_p50_ms']} ms  "
                    f"burst {f['burst_share']}"
                    + (f"  statuses {bad}" if bad else "") + (f"  errors {r.errors}" if r.errors else "")
                    + (f"  incomplete {r.incomplete}" if r.incomplete else ""))
    return pools, warm_ok


# --------------------------------------------------------------------------- metering


async def metered(dsn: str, project_id: Any, expected_requests: int) -> tuple[dict[str, int], float]:
    """The project's usage in lwapi_read.usage_rollups once it counts `expected_requests` (or the timeout)."""
    import asyncpg  # noqa: PLC0415

    query = ("SELECT coalesce(sum(requests), 0) AS requests, coalesce(sum(tokens_prompt), 0) AS tokens_prompt, "
             "coalesce(sum(tokens_completion), 0) AS tokens_completion, "
             "coalesce(sum(estimated_requests), 0) AS estimated_requests, "
             "coalesce(sum(cost_credits), 0) AS cost_credits FROM lwapi_read.usage_rollups WHERE project_id = $1")
    conn = await asyncpg.connect(dsn)
    try:
        async def read() -> dict[str, int]:
            try:
                row = await conn.fetchrow(query, project_id)
            except asyncpg.UndefinedTableError:  # the projection has not made its table yet
                return {}
            return {k: int(v) for k, v in dict(row or {}).items()}

        t0 = time.monotonic()
        while True:
            if (await read()).get("requests", 0) >= expected_requests or time.monotonic() - t0 > METERING_TIMEOUT_S:
                break
            await asyncio.sleep(0.2)
        waited = time.monotonic() - t0
        await asyncio.sleep(1.0)  # anything beyond the expected count would show up by now
        return await read(), waited
    finally:
        await conn.close()


# --------------------------------------------------------------------------- the report


def judge(figures: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    for key, op, bound in TARGETS:
        value = figures.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value < bound)
        targets[key] = {"value": value, "target": f"{op} {bound}", "met": met}
    return targets


def check_phases(phases: dict[str, dict[str, Any]]) -> list[str]:
    failures: list[str] = []
    for key, f in phases.items():
        bad = {s: n for s, n in f["statuses"].items() if s != "200"}
        if bad or f["errors"] or f["incomplete_streams"]:
            failures.append(f"{key}: statuses {f['statuses']}, {f['errors']} connection errors, "
                            f"{f['incomplete_streams']} streams without [DONE]")
        if any(int(d) > STREAM_TOKENS + 1 for d in f["deltas_per_stream"]):  # more than vLLM sends for 64 tokens
            failures.append(f"{key}: streams with too many content deltas {f['deltas_per_stream']}")
        if not f["streams"]:
            failures.append(f"{key}: no stream finished inside the measured windows")
    return failures


async def run(args: argparse.Namespace, stack: Stack) -> tuple[dict[str, Any], list[str]]:
    pools, warm_ok = await run_phases(args, stack)
    phases = {k: p.figures(int(k.rsplit("_c", 1)[1])) for k, p in pools.items()}
    failures = check_phases(phases)
    gateway_ok = warm_ok + sum(p.total_ok for k, p in pools.items() if k.startswith("gateway_"))
    expected_completion = gateway_ok * STREAM_TOKENS
    log(f"waiting for the gateway's {gateway_ok:,} streams to be metered")
    usage, waited = await metered(stack.dsn, stack.project_id, gateway_ok)
    log(f"usage_rollups after {waited:.1f} s: {usage}")
    requests_ok = usage.get("requests") == gateway_ok
    tokens_ok = usage.get("tokens_completion") == expected_completion
    if not requests_ok:
        failures.append(f"usage_rollups.requests = {usage.get('requests')}, the gateway completed {gateway_ok}")
    if not tokens_ok:
        failures.append(f"usage_rollups.tokens_completion = {usage.get('tokens_completion')}, "
                        f"expected {expected_completion} ({STREAM_TOKENS} × {gateway_ok})")

    figures: dict[str, Any] = {}
    for c in CONCURRENCIES:
        g, d = phases.get(f"gateway_c{c}", {}), phases.get(f"direct_c{c}", {})
        figures |= {
            f"vllm_tokens_per_s_c{c}": g.get("tokens_per_s"), f"vllm_tokens_per_s_direct_c{c}": d.get("tokens_per_s"),
            f"vllm_tokens_ratio_c{c}": gw.ratio(g.get("tokens_per_s"), d.get("tokens_per_s")),
            f"vllm_tokens_ratio_c{c}_rounds": [
                gw.ratio(gr["tokens_per_s"], dr["tokens_per_s"])
                for gr, dr in zip(g.get("rounds", []), d.get("rounds", []), strict=False)],
            f"vllm_ttft_p50_ms_c{c}": g.get("ttft_p50_ms"), f"vllm_ttft_p50_ms_direct_c{c}": d.get("ttft_p50_ms"),
            f"vllm_ttft_p99_ms_c{c}": g.get("ttft_p99_ms"), f"vllm_ttft_p99_ms_direct_c{c}": d.get("ttft_p99_ms"),
            f"vllm_added_ttft_p50_ms_c{c}": gw.diff(g.get("ttft_p50_ms"), d.get("ttft_p50_ms")),
            f"vllm_added_ttft_p99_ms_c{c}": gw.diff(g.get("ttft_p99_ms"), d.get("ttft_p99_ms")),
            f"vllm_streams_c{c}": g.get("streams"), f"vllm_streams_direct_c{c}": d.get("streams"),
            f"vllm_errors_c{c}": g.get("errors"), f"vllm_errors_direct_c{c}": d.get("errors"),
            f"vllm_burst_share_c{c}": g.get("burst_share"), f"vllm_burst_share_direct_c{c}": d.get("burst_share"),
            f"vllm_added_ttft_p50_ms_c{c}_streaming": gw.diff(g.get("ttft_p50_ms_streaming"),
                                                               d.get("ttft_p50_ms_streaming")),
            f"gateway_cpu_us_per_stream_c{c}": g.get("gateway_cpu_us_per_stream"),
        }
    figures |= {
        "metered_ok": requests_ok and tokens_ok, "gateway_streams_ok": gateway_ok, "warmup_gateway_streams": warm_ok,
        "metered_requests": usage.get("requests"), "metered_completion_tokens": usage.get("tokens_completion"),
        "metered_estimated_requests": usage.get("estimated_requests"),
        "expected_completion_tokens": expected_completion, "metering_wait_s": round(waited, 2),
        "quick": args.quick, "rounds": args.rounds, "warmup_s": args.warmup_s, "duration_s": args.duration_s,
        "stream_tokens": STREAM_TOKENS, "pin": args.pin, "our_cores": stack.our_cores,
        "vllm_worker_cores": stack.worker_cores, "vllm_start_s": round(stack.vllm_start_s, 1),
        "gateway_rss_mb": gw.rss_mb(stack.service.pid)[0], "loadavg_before": args.loadavg_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(),
        "notes": stack.notes,
    }
    figures["targets"] = judge(figures)
    figures["targets_met"] = all(t["met"] for t in figures["targets"].values())
    figures["failures"] = failures
    figures["phases"] = phases
    return figures, failures


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 + 8 s per phase (default 4 of 2 + 30 s)")
    parser.add_argument("--rounds", type=int, default=None, help="direct/gateway pairs per concurrency")
    parser.add_argument("--duration-s", type=float, default=None, help="measured seconds per phase")
    parser.add_argument("--warmup-s", type=float, default=None, help="unmeasured seconds before each phase")
    parser.add_argument("--pin", choices=["none", "ours", "split"], default="split",
                        help="split (default): all of vLLM on every core but the last, everything of ours on the "
                             "last; none: no pinning; ours: only ours on the core(s) vLLM's worker leaves free")
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 4)
    if args.duration_s is None:
        args.duration_s = 8.0 if args.quick else 30.0
    if args.warmup_s is None:
        args.warmup_s = 1.0 if args.quick else 2.0
    args.warmup_total_s = 3.0 if args.quick else 6.0
    if args.pin in ("ours", "split") and shutil.which("taskset") is None:
        parser.error("taskset (util-linux) is needed to pin the service; or use --pin none")
    try:
        vllm_python()
    except VllmMissing as e:
        parser.error(str(e))
    signal.signal(signal.SIGTERM, _terminate)
    args.loadavg_before = [round(x, 2) for x in os.getloadavg()]
    log(f"load average before: {args.loadavg_before} on {os.cpu_count()} cpus")
    if args.loadavg_before[0] > 1.0:
        log("WARNING: other processes are running; the figures will be noisier")
    t0 = time.monotonic()
    try:
        with running_stack(args) as stack:
            loop = loadgen.new_event_loop()
            try:
                result, failures = loop.run_until_complete(run(args, stack))
            finally:
                loop.close()
    except Exception as e:  # noqa: BLE001  (still ONE JSON line, saying what broke; Ctrl-C is not caught)
        traceback.print_exc()
        log(f"the benchmark failed: {e!r}")
        failures = [f"{type(e).__name__}: {e}"]
        result = {"quick": args.quick, "targets": judge({}), "targets_met": False, "metered_ok": None,
                  "failures": failures, "loadavg_before": args.loadavg_before}
    result["wall_s"] = round(time.monotonic() - t0, 1)
    emit(result)
    if failures:
        log(f"{len(failures)} correctness check(s) failed: {failures}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
