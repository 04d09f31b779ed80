#!/usr/bin/env python
"""Benchmark: the `/v1` gateway's throughput, latency, CPU per request and memory, side by side with
the upstream it fronts, and a check that every request it answered was metered.

A real stack on loopback: a fresh database, the fake OpenAI-compatible upstream (`tests.fake_upstream`),
and `lwapi serve` as a subprocess with every check and metering on (a real key, a real model with
prices, admission, credit reservation, usage spooled to disk and recorded in the event store, the
projection follower and the key index running in the same process). The service is pinned to one core
(`taskset -c 0`); the upstream, this process (the load generator, `scripts/loadgen.py`: raw asyncio
sockets, HTTP/1.1 keep-alive, one request in flight per connection) and the embedded PostgreSQL share
the other (`taskset -c 1`). Each workload runs twice in a row: (a) straight at the upstream, (b) through
the gateway:

    non-streaming chat completions (16 tokens)      at concurrency 1, 16, 64
    streaming, 64 tokens, 0 ms and 5 ms per token    at concurrency 16, 64 (and 1 at 5 ms)

The streams ask the fake upstream for a steady clock (`fake_steady`), and it runs on asyncio's own loop:
see docs/performance.md for why time to first token needs both.

Per phase: requests (streams) per second, p50/p99 latency, time to first token, stream tokens per
second (counted as they arrive), the gateway's CPU seconds per request (its utime+stime from
/proc/PID/stat across the measured window, every thread included, divided by the requests finished in
the window; `gateway_sys_fraction` is the kernel's share), the upstream's and the load generator's CPU
per request, and how busy each of the two cores was: `client_core_busy` below 1 in a gateway phase
means the client side was not the bottleneck, and `gateway_core_others` shows other processes stealing
the gateway's core (rates suffer; CPU per request much less). The load generator's own ceiling:
`loadgen_cpu_us_per_request` (direct, c=16) and the direct rates themselves, reached with the upstream
on the same core.
At the end: the gateway's RSS, and the metering check: once the spool and the projections caught up,
the project's `lwapi_read.balances.requests` must equal the number of 200s the gateway gave (warm-up
included) and its completion tokens must be what the upstream reported for them.

Uses $DATABASE_URL's server (a new database, dropped after) when set, else a throwaway embedded server.
Progress goes to stderr; the figures are ONE JSON object on the last line of stdout (`targets` says
which of the issue's targets are met). Exits 1 when a correctness check fails (a gateway answer other
than 200, a dropped connection, a metering mismatch), not when a target is missed.

    .venv/bin/python scripts/bench_gateway.py --quick      # 0.5 + 3 s per phase, about 1 min in all
    .venv/bin/python scripts/bench_gateway.py              # 2 + 10 s per phase, about 3 min
    .venv/bin/python scripts/bench_gateway.py --only ns16 --against gateway --profile /tmp/gw.prof
                                                           # one workload, the service under cProfile
    .venv/bin/python scripts/bench_gateway.py --quick --server granian
                                                           # the same app under granian (needs it installed)

With `--against direct,nginx,gateway` each workload also runs through nginx as a bare reverse proxy
(one worker on the gateway's core, keep-alive to the upstream, no buffering): the issue's anchor for
the least one hop can add, measured side by side here (`nginx_*` keys; needs `nginx` on the PATH, e.g.
Debian's nginx-light; it is not installed by the project).

With `--server granian` the schema and the first administrator are prepared as `lwapi serve` does,
then `python -m granian --interface asgi --factory edge.app:create_app_from_env` (one worker, uvloop,
lifespan on) serves the same app; the figures are the worker's (`supervisor_*` and
`rss_supervisor_mb`: granian's parent process, on the same core).

Main keys: rps_c1/c16/c64 and rps_direct_* (non-streaming), cpu_us_per_request (gateway, non-streaming
c=16), added_p50_ms_c1, streams_per_s_c16_0ms/c64_0ms (and _direct), stream_tokens_ratio_c16_5ms/c64_5ms,
added_ttft_p50_ms_c16 / _c64 (5 ms per token), rss_mb, metered_ok; `phases` holds every phase's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's packages, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
from bench_support import emit, fresh_database, log, percentile

ROOT = Path(__file__).resolve().parent.parent
PEPPER = bytes(range(32))
MODEL = "bench"
UPSTREAM_MODEL = "fake-upstream"
GRANT_CREDITS = 10**15
PROMPT_PER_MTOK, COMPLETION_PER_MTOK = 1000, 2000  # the model's prices (credits per million tokens)
NS_TOKENS = 16  # completion tokens of a non-streaming answer
STREAM_TOKENS = 64
CLK_TCK = os.sysconf("SC_CLK_TCK")
STARTUP_TIMEOUT_S = 90.0
METERING_TIMEOUT_S = 60.0

# name: (stream, concurrency, ms per token)
WORKLOADS: dict[str, tuple[bool, int, int]] = {
    "ns1": (False, 1, 0),
    "ns16": (False, 16, 0),
    "ns64": (False, 64, 0),
    "st1_5ms": (True, 1, 5),  # time to first token with no other stream open: c=16 adds contention to it
    "st16_0ms": (True, 16, 0),
    "st64_0ms": (True, 64, 0),
    "st16_5ms": (True, 16, 5),
    "st64_5ms": (True, 64, 5),
}

TARGETS = (  # (key, comparison, bound): the targets
    ("rps_c16", ">=", 3000),
    ("cpu_us_per_request", "<=", 330),
    ("added_p50_ms_c1", "<=", 0.5),
    ("streams_per_s_c64_0ms", ">=", 400),
    ("stream_tokens_ratio_c64_5ms", ">=", 0.99),
    ("added_ttft_p50_ms_c16", "<=", 1.0),
    ("added_ttft_p50_ms_c64", "<=", 1.0),
    ("rss_mb", "<=", 150),
)


# `lwapi serve`'s preparation, for a server that only imports the app factory (granian)
GRANIAN_PREPARE = (
    "import asyncio; from edge.server import _prepare; from edge.settings import Settings; "
    "asyncio.run(_prepare(Settings.from_env()))"
)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes], headers: dict[str, str] | None = None,
              until: str | None = None) -> None:
    """Poll `url` until it answers (and its body contains `until`, when given)."""
    import httpx  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} while we waited for {url}")
        try:
            response = httpx.get(url, headers=headers, timeout=2)
            if until is None or until in response.text:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not come up in {timeout_s:.0f} s")


def proc_cpu_s(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, all its threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def core_times() -> dict[str, tuple[int, int]]:
    """(busy, total) jiffies per core from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                numbers = [int(v) for v in values]
                idle = numbers[3] + numbers[4]  # idle + iowait
                out[name] = (sum(numbers[:8]) - idle, sum(numbers[:8]))
    return out


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (every thread's)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def granian_worker(pid: int) -> int:
    workers = child_pids(pid)
    if len(workers) != 1:
        raise RuntimeError(f"granian ({pid}) has {len(workers)} child processes {workers}, expected 1 worker")
    return workers[0]


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                found[line.split(":")[0]] = int(line.split()[1]) / 1024
    return round(found["VmRSS"], 1), round(found["VmHWM"], 1)


def pinned(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv]


def stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float = 30.0, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@dataclass
class Stack:
    dsn: str
    upstream: subprocess.Popen[bytes]
    upstream_port: int
    service: subprocess.Popen[bytes]
    service_port: int
    gateway_pid: int  # the process that serves: the service itself, or granian's worker
    supervisor_pid: int | None  # granian's parent process
    project_id: Any
    secret: str
    data_dir: Path
    log_path: Path
    worker_pids: list[int] = field(default_factory=list)
    """Every process that serves: [gateway_pid] for one process, uvicorn's workers with `workers` > 1."""
    nginx_port: int | None = None  # nginx in front of the upstream, when asked for
    nginx_pid: int | None = None  # its worker process


NGINX_CONF = """
worker_processes 1;
daemon off;
user root root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream fake {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"""


@contextlib.contextmanager
def nginx_in_front(args: argparse.Namespace, stack: Stack) -> Iterator[None]:
    """nginx as a bare reverse proxy to the upstream, pinned to the gateway's core: the anchor."""
    folder = Path(tempfile.mkdtemp(prefix="lwapi-bench-nginx.", dir="/tmp"))
    port = free_port()
    (folder / "nginx.conf").write_text(NGINX_CONF.format(dir=folder, port=port, upstream_port=stack.upstream_port))
    proc = subprocess.Popen(pinned(args.gateway_cpu, ["nginx", "-c", str(folder / "nginx.conf"), "-p", str(folder)]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", STARTUP_TIMEOUT_S, proc)
        workers = child_pids(proc.pid)
        if len(workers) != 1:
            raise RuntimeError(f"nginx should run one worker, found {workers}")
        stack.nginx_port, stack.nginx_pid = port, workers[0]
        log(f"nginx in front of the upstream on port {port} (cpu {args.gateway_cpu}, worker pid {workers[0]})")
        yield
    finally:
        stop_process(proc, sig=signal.SIGQUIT)
        shutil.rmtree(folder, ignore_errors=True)


def uvicorn_workers(pid: int) -> list[int]:
    """The worker processes of `lwapi serve --workers N` (uvicorn's supervisor `pid` spawns them with
    multiprocessing's spawn, whose resource tracker is a child too: only `spawn_main` children count)."""
    found = []
    for child in child_pids(pid):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
    return sorted(found)


def wait_workers(service: subprocess.Popen[bytes], workers: int, log_path: Path, timeout_s: float) -> list[int]:
    """Wait until `workers` uvicorn workers run and each has finished its startup (its lifespan: index,
    catalog, spool loaded), as their "Application startup complete." lines in the service's log say."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise RuntimeError(f"the service exited with {service.returncode} while its workers started")
        pids = uvicorn_workers(service.pid)
        started = log_path.read_text(errors="replace").count("Application startup complete.")
        if len(pids) == workers and started >= workers:
            return pids
        time.sleep(0.1)
    raise TimeoutError(f"{workers} workers did not start in {timeout_s:.0f} s")


@contextlib.contextmanager
def running_stack(args: argparse.Namespace, dsn: str, *, workers: int = 1,
                  redis_url: str | None = None) -> Iterator[Stack]:
    """The fake upstream, the catalogue and `lwapi serve` pinned to `args.gateway_cpu`; with `workers` > 1,
    `lwapi serve --workers N` (uvicorn's supervisor and N worker processes, all on that core), which needs
    `redis_url` (passed as LWAPI_REDIS_URL; it may be given with one worker too)."""
    from adapters.database import eventstore_env  # noqa: PLC0415
    from domain.access import SYSTEM  # noqa: PLC0415
    from domain.accounting import Accounting  # noqa: PLC0415
    from domain.api_key import KeySettings  # noqa: PLC0415
    from domain.catalog import BackendKind, Deployment  # noqa: PLC0415
    from domain.pricing import Prices  # noqa: PLC0415

    if workers > 1 and (args.server != "uvicorn" or not redis_url):
        raise ValueError("several workers need `lwapi serve` (uvicorn) and a Redis URL")
    data_dir = Path(tempfile.mkdtemp(prefix="lwapi-bench-gw.", dir="/tmp"))
    log_path = data_dir / "service.log"
    upstream = service = None
    try:
        upstream_port = free_port()
        log(f"starting the fake upstream on port {upstream_port} (cpu {args.client_cpu})")
        upstream = subprocess.Popen(
            pinned(args.client_cpu, [sys.executable, "-m", "tests.fake_upstream", "--port", str(upstream_port),
                                     "--loop", args.upstream_loop]),
            cwd=ROOT, stdout=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{upstream_port}/v1/models", STARTUP_TIMEOUT_S, upstream)

        log("creating a user, a project with a grant, a key and the model")
        app = Accounting(env=eventstore_env(dsn), key_pepper=PEPPER)
        try:
            user = app.register_user("bench@bench.example", "Bench")
            project = app.create_project(SYSTEM, "bench", "Gateway benchmark", user)
            app.grant_credits(SYSTEM, project, GRANT_CREDITS, "benchmark grant")
            _, secret = app.create_key(SYSTEM, project, user, KeySettings(name="bench"))
            app.add_model(SYSTEM, MODEL, Deployment("fake", BackendKind.OPENAI,
                                                    f"http://127.0.0.1:{upstream_port}/v1", UPSTREAM_MODEL),
                          Prices(PROMPT_PER_MTOK, COMPLETION_PER_MTOK, datetime(2020, 1, 1, tzinfo=UTC)))
        finally:
            app.close()

        service_port = free_port()
        env = {**os.environ, "DATABASE_URL": dsn, "LWAPI_KEY_PEPPER": PEPPER.hex(),
               "LWAPI_ADMIN_EMAIL": "ops@bench.example", "LWAPI_ADMIN_PASSWORD": "bench-admin-password-1"}
        if redis_url:
            env["LWAPI_REDIS_URL"] = redis_url
        argv = [sys.executable]
        if args.profile:
            argv += ["-m", "cProfile", "-o", str(Path(args.profile).absolute())]
        if args.server == "granian":
            env |= {"LWAPI_DATA_DIR": str(data_dir / "service"), "LWAPI_PORT": str(service_port),
                    "LWAPI_HOST": "127.0.0.1"}
            log("preparing the schema and the first administrator (as `lwapi serve` does)")
            subprocess.run([sys.executable, "-c", GRANIAN_PREPARE], cwd=ROOT, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            argv += ["-m", "granian", "--interface", "asgi", "--factory", "--host", "127.0.0.1",
                     "--port", str(service_port), "--workers", "1", "--loop", "uvloop", "--no-ws",
                     "--log-level", "info", "--no-access-log", "edge.app:create_app_from_env"]
        else:
            argv += ["-m", "edge.cli", "serve", "--port", str(service_port), "--data-dir",
                     str(data_dir / "service")]
            if workers > 1:
                argv += ["--workers", str(workers)]
        log(f"starting the service ({args.server}) on port {service_port} (cpu {args.gateway_cpu}"
            + (f", {workers} workers" if workers > 1 else "") + f"); its log: {log_path}")
        with log_path.open("wb") as out:
            service = subprocess.Popen(pinned(args.gateway_cpu, argv), cwd=ROOT, env=env, stdout=out,
                                       stderr=subprocess.STDOUT)
        wait_http(f"http://127.0.0.1:{service_port}/healthz", STARTUP_TIMEOUT_S, service)
        wait_http(f"http://127.0.0.1:{service_port}/v1/models", STARTUP_TIMEOUT_S, service,
                  headers={"Authorization": f"Bearer {secret}"}, until=f'"{MODEL}"')
        gateway_pid, supervisor_pid = service.pid, None
        if args.server == "granian":
            gateway_pid, supervisor_pid = granian_worker(service.pid), service.pid
        worker_pids = [gateway_pid]
        if workers > 1:
            worker_pids = wait_workers(service, workers, log_path, STARTUP_TIMEOUT_S)
            gateway_pid, supervisor_pid = worker_pids[0], service.pid
            log(f"the gateway lists the model; {workers} workers (pids {worker_pids}), RSS now "
                f"{[rss_mb(pid)[0] for pid in worker_pids]} MB")
        else:
            log(f"the gateway lists the model; its RSS now {rss_mb(gateway_pid)[0]} MB (pid {gateway_pid})")
        yield Stack(dsn, upstream, upstream_port, service, service_port, gateway_pid, supervisor_pid, project,
                    secret, data_dir, log_path, worker_pids)
    except BaseException:
        if log_path.exists():
            log("service log tail:\n" + "\n".join(log_path.read_text(errors="replace").splitlines()[-30:]))
        raise
    finally:
        # Under cProfile, SIGINT: should the signal be re-raised after uvicorn's graceful shutdown, a
        # KeyboardInterrupt still lets cProfile write its file, where a default SIGTERM would kill it first.
        stop_process(service, sig=signal.SIGINT if args.profile else signal.SIGTERM)
        stop_process(upstream)
        shutil.rmtree(data_dir, ignore_errors=True)


# --------------------------------------------------------------------------- phases


def request_body(stream: bool, delay_ms: int, model: str) -> bytes:
    payload: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Say hello to the benchmark."}]}
    if stream:
        payload |= {"stream": True, "max_tokens": 2 * STREAM_TOKENS, "fake_tokens": STREAM_TOKENS,
                    "fake_delay_ms": delay_ms, "fake_steady": True}
    else:
        payload |= {"max_tokens": 4 * NS_TOKENS, "fake_tokens": NS_TOKENS}
    return json.dumps(payload, separators=(",", ":")).encode()


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class Sampler:
    """CPU counters of the gateway, the upstream, and the cores, read at the window's edges."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def __call__(self, _edge: str) -> dict[str, Any]:
        return {"procs": {name: proc_cpu_s(pid) for name, pid in self.pids.items()}, "cores": core_times()}


def summarize(result: loadgen.PhaseResult, stream: bool, gateway_core: str, client_core: str) -> dict[str, Any]:
    start, end = result.samples.get("start"), result.samples.get("end")
    n = max(1, result.completed)
    figures: dict[str, Any] = {
        "rps": round(result.rps, 1), "ok": result.ok, "total_ok": result.total_ok,
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())}, "errors": result.errors,
        "incomplete_streams": result.incomplete,
        "p50_ms": ms(percentile(result.latencies, 0.50)), "p99_ms": ms(percentile(result.latencies, 0.99)),
        "loadgen_cpu_us_per_request": round(result.cpu_s / n * 1e6, 1),
    }
    if stream:
        figures |= {"tokens_per_s": round(result.tokens / result.window_s, 1),
                    "tokens_per_stream": {str(k): v for k, v in sorted(result.stream_tokens.items())},
                    "ttft_p10_ms": ms(percentile(result.ttfts, 0.10)),
                    "ttft_p50_ms": ms(percentile(result.ttfts, 0.50)),
                    "ttft_p90_ms": ms(percentile(result.ttfts, 0.90)),
                    "head_p50_ms": ms(percentile(result.heads, 0.50)),  # the response head: the request's way in
                    "ttft_p99_ms": ms(percentile(result.ttfts, 0.99))}
    if isinstance(start, dict) and isinstance(end, dict):
        for name in start["procs"]:
            user = end["procs"][name][0] - start["procs"][name][0]
            system = end["procs"][name][1] - start["procs"][name][1]
            figures[f"{name}_cpu_us_per_request"] = round((user + system) / n * 1e6, 1)
            figures[f"{name}_cpu_share"] = round((user + system) / result.window_s, 3)
            figures[f"{name}_sys_fraction"] = round(system / (user + system), 3) if user + system else None
        for role, core in (("gateway", gateway_core), ("client", client_core)):
            if core in end["cores"]:
                (b0, t0), (b1, t1) = start["cores"][core], end["cores"][core]
                figures[f"{role}_core_busy"] = round((b1 - b0) / max(1, t1 - t0), 3)
        if "gateway_core_busy" in figures:  # what else ran on the gateway's core (other processes)
            others = figures["gateway_core_busy"] - figures["gateway_cpu_share"]
            figures["gateway_core_others"] = round(max(0.0, others), 3)
    return figures


async def run_phases(args: argparse.Namespace, stack: Stack) -> dict[str, dict[str, Any]]:
    pids = {"upstream": stack.upstream.pid, "gateway": stack.gateway_pid}
    if stack.supervisor_pid is not None:
        pids["supervisor"] = stack.supervisor_pid
    if stack.nginx_pid is not None:
        pids["nginx"] = stack.nginx_pid
    sampler = Sampler(pids)
    phases: dict[str, dict[str, Any]] = {}
    auth = {"Authorization": f"Bearer {stack.secret}"}
    for name in args.only:
        stream, concurrency, delay_ms = WORKLOADS[name]
        for target in args.against:
            port, model = {"direct": (stack.upstream_port, UPSTREAM_MODEL),
                           "nginx": (stack.nginx_port or 0, UPSTREAM_MODEL),
                           "gateway": (stack.service_port, MODEL)}[target]
            request = loadgen.build_request("127.0.0.1", port, "/v1/chat/completions",
                                            request_body(stream, delay_ms, model), auth)
            result = await loadgen.run_phase("127.0.0.1", port, request, concurrency=concurrency,
                                             warmup_s=args.warmup_s, duration_s=args.duration_s, stream=stream,
                                             sampler=sampler)
            figures = summarize(result, stream, f"cpu{args.gateway_cpu}", f"cpu{args.client_cpu}")
            phases[f"{target}_{name}"] = figures
            extra = (f" tokens/s {figures['tokens_per_s']:,.0f} ttft p50 {figures['ttft_p50_ms']} ms "
                     f"(head {figures['head_p50_ms']} ms)" if stream else "")
            log(f"{target:7s} {name:9s} {figures['rps']:9,.1f} /s  p50 {figures['p50_ms']} ms  p99 "
                f"{figures['p99_ms']} ms{extra}  gateway {figures.get('gateway_cpu_us_per_request')} us/req  "
                f"cores: gateway {figures.get('gateway_core_busy')} (others {figures.get('gateway_core_others')}) "
                f"client {figures.get('client_core_busy')}  statuses {figures['statuses']}"
                + (f"  nginx {figures.get('nginx_cpu_us_per_request')} us/req" if target == "nginx" else "")
                + (f" errors {figures['errors']}" if figures["errors"] else ""))
    return phases


# --------------------------------------------------------------------------- metering


async def metered(dsn: str, project_id: Any, expected_requests: int) -> tuple[dict[str, int], float]:
    """Wait until the project's balance counts `expected_requests` (or the timeout); its figures, seconds waited."""
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(dsn)
    try:
        t0 = time.monotonic()
        row: dict[str, int] = {}
        while True:
            found = await conn.fetchrow("SELECT requests, tokens_prompt, tokens_completion, charged_credits "
                                        "FROM lwapi_read.balances WHERE project_id = $1", project_id)
            row = {k: int(v) for k, v in dict(found or {}).items()}
            if row.get("requests", 0) >= expected_requests or time.monotonic() - t0 > METERING_TIMEOUT_S:
                break
            await asyncio.sleep(0.1)
        waited = time.monotonic() - t0
        await asyncio.sleep(1.0)  # anything beyond the expected count would show up by now
        found = await conn.fetchrow("SELECT requests, tokens_prompt, tokens_completion, charged_credits "
                                    "FROM lwapi_read.balances WHERE project_id = $1", project_id)
        return {k: int(v) for k, v in dict(found or {}).items()}, waited
    finally:
        await conn.close()


# --------------------------------------------------------------------------- the report


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 4)


def diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def headline(phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def get(target: str, name: str, key: str) -> Any:
        return phases.get(f"{target}_{name}", {}).get(key)

    out: dict[str, Any] = {}
    for c in (1, 16, 64):
        out[f"rps_c{c}"] = get("gateway", f"ns{c}", "rps")
        out[f"rps_direct_c{c}"] = get("direct", f"ns{c}", "rps")
        out[f"p50_ms_c{c}"] = get("gateway", f"ns{c}", "p50_ms")
        out[f"p99_ms_c{c}"] = get("gateway", f"ns{c}", "p99_ms")
        out[f"p50_ms_direct_c{c}"] = get("direct", f"ns{c}", "p50_ms")
        out[f"cpu_us_per_request_c{c}"] = get("gateway", f"ns{c}", "gateway_cpu_us_per_request")
    out["cpu_us_per_request"] = out["cpu_us_per_request_c16"]
    out["added_p50_ms_c1"] = diff(out["p50_ms_c1"], out["p50_ms_direct_c1"])
    out["added_p99_ms_c1"] = diff(out["p99_ms_c1"], get("direct", "ns1", "p99_ms"))
    for target, prefix in (("gateway", ""), ("nginx", "nginx_")):  # nginx: the anchor, when it ran
        for c in (1, 16, 64):
            for d in (0, 5):
                name = f"st{c}_{d}ms"
                out[f"{prefix}streams_per_s_c{c}_{d}ms"] = get(target, name, "rps")
                out[f"{prefix}stream_tokens_ratio_c{c}_{d}ms"] = ratio(get(target, name, "tokens_per_s"),
                                                                       get("direct", name, "tokens_per_s"))
                out[f"{prefix}added_ttft_p50_ms_c{c}_{d}ms"] = diff(get(target, name, "ttft_p50_ms"),
                                                                    get("direct", name, "ttft_p50_ms"))
    for c in (1, 16, 64):
        for d in (0, 5):
            name = f"st{c}_{d}ms"
            out[f"streams_per_s_direct_c{c}_{d}ms"] = get("direct", name, "rps")
            out[f"tokens_per_s_c{c}_{d}ms"] = get("gateway", name, "tokens_per_s")
            out[f"tokens_per_s_direct_c{c}_{d}ms"] = get("direct", name, "tokens_per_s")
            out[f"ttft_p50_ms_c{c}_{d}ms"] = get("gateway", name, "ttft_p50_ms")
            out[f"cpu_us_per_stream_c{c}_{d}ms"] = get("gateway", name, "gateway_cpu_us_per_request")
        out[f"added_ttft_p50_ms_c{c}"] = out[f"added_ttft_p50_ms_c{c}_5ms"]
    out["nginx_rps_c16"] = get("nginx", "ns16", "rps")
    out["nginx_cpu_us_per_request"] = get("nginx", "ns16", "nginx_cpu_us_per_request")
    out["nginx_added_p50_ms_c1"] = diff(get("nginx", "ns1", "p50_ms"), out["p50_ms_direct_c1"])
    # The client core: its CPU per request in the direct c=16 phase, and the rate one core gives it alone.
    lg = get("direct", "ns16", "loadgen_cpu_us_per_request")
    out["loadgen_cpu_us_per_request"] = lg
    out["loadgen_ceiling_rps_est"] = round(1e6 / lg) if lg else None
    out["client_core_busy_max_gateway"] = max(
        (f.get("client_core_busy", 0) for k, f in phases.items() if k.startswith("gateway_")), default=None)
    out["gateway_core_others_max"] = max(
        (f.get("gateway_core_others", 0) for k, f in phases.items() if k.startswith("gateway_")), default=None)
    return {k: v for k, v in out.items() if v is not None}


def judge(figures: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    for key, op, bound in TARGETS:
        value = figures.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        targets[key] = {"value": value, "target": f"{op} {bound}", "met": met}
    return targets


async def run(args: argparse.Namespace, stack: Stack) -> tuple[dict[str, Any], list[str]]:
    failures: list[str] = []
    phases = await run_phases(args, stack)
    gateway_ok = sum(f["total_ok"] for k, f in phases.items() if k.startswith("gateway_"))
    expected_completion = sum(f["total_ok"] * (STREAM_TOKENS if WORKLOADS[k.split("_", 1)[1]][0] else NS_TOKENS)
                              for k, f in phases.items() if k.startswith("gateway_"))
    for key, f in phases.items():
        bad = {s: n for s, n in f["statuses"].items() if s != "200"}
        if bad or f["errors"] or f["incomplete_streams"]:
            failures.append(f"{key}: statuses {f['statuses']}, {f['errors']} connection errors, "
                            f"{f['incomplete_streams']} streams without [DONE]")
        if "tokens_per_stream" in f and set(f["tokens_per_stream"]) - {str(STREAM_TOKENS)}:
            failures.append(f"{key}: tokens per stream → streams {f['tokens_per_stream']}, expected {STREAM_TOKENS}")
    rss, hwm = rss_mb(stack.gateway_pid)
    rss_supervisor = rss_mb(stack.supervisor_pid)[0] if stack.supervisor_pid is not None else None
    log(f"gateway RSS {rss} MB (peak {hwm} MB); waiting for {gateway_ok:,} requests to be metered")
    balance, waited = await metered(stack.dsn, stack.project_id, gateway_ok)
    log(f"balance after {waited:.1f} s: {balance}")
    metered_ok = balance.get("requests") == gateway_ok
    tokens_ok = balance.get("tokens_completion") == expected_completion
    if not metered_ok:
        failures.append(f"balances.requests = {balance.get('requests')}, the gateway answered {gateway_ok} with 200")
    if not tokens_ok:
        failures.append(f"balances.tokens_completion = {balance.get('tokens_completion')}, "
                        f"expected {expected_completion}")
    figures = headline(phases)
    figures |= {
        "server": args.server, "rss_mb": rss, "rss_peak_mb": hwm, "rss_supervisor_mb": rss_supervisor,
        "metered_ok": metered_ok and tokens_ok,
        "gateway_requests_ok": gateway_ok, "metered_requests": balance.get("requests"),
        "metered_completion_tokens": balance.get("tokens_completion"),
        "expected_completion_tokens": expected_completion, "metering_wait_s": round(waited, 2),
        "warmup_s": args.warmup_s, "duration_s": args.duration_s, "quick": args.quick,
        "gateway_cpu": args.gateway_cpu, "client_cpu": args.client_cpu,
        "loadavg_before": args.loadavg_before, "failures": failures,
    }
    figures["targets"] = judge(figures)
    figures["targets_met"] = all(t["met"] for t in figures["targets"].values() if t["met"] is not None)
    figures["phases"] = phases
    return figures, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.5 s warm-up + 3 s per phase (default 2 + 10 s)")
    parser.add_argument("--duration-s", type=float, default=None, help="measured seconds per phase")
    parser.add_argument("--warmup-s", type=float, default=None, help="unmeasured seconds before each phase")
    parser.add_argument("--only", type=lambda s: s.split(","), default=list(WORKLOADS),
                        help=f"workloads to run, comma-separated (default all: {','.join(WORKLOADS)})")
    parser.add_argument("--against", type=lambda s: s.split(","), default=["direct", "gateway"],
                        help="what each workload runs against, in order (default direct,gateway; nginx: the anchor)")
    parser.add_argument("--gateway-cpu", type=int, default=0, help="the core the service is pinned to (default 0)")
    parser.add_argument("--client-cpu", type=int, default=1,
                        help="the core of the upstream, the load generator and the embedded PostgreSQL (default 1)")
    parser.add_argument("--upstream-loop", choices=["asyncio", "uvloop"], default="asyncio",
                        help="the fake upstream's event loop (default asyncio: its timers keep the float clock, "
                             "where uvloop's put every token on a 1 ms grid; see tests/fake_upstream.py)")
    parser.add_argument("--profile", default=None, help="run the service under cProfile, writing this file")
    parser.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn",
                        help="what serves the app: `lwapi serve` (uvicorn, the default) or granian")
    args = parser.parse_args()
    unknown = [w for w in args.only if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")
    if args.server == "granian" and importlib.util.find_spec("granian") is None:
        parser.error("granian is not installed (it is not a dependency); for the comparison install it into .venv "
                     "with `.venv/bin/uv pip install granian`")
    if not args.against or set(args.against) - {"direct", "nginx", "gateway"}:
        parser.error("--against takes direct, nginx and gateway (comma-separated)")
    if "nginx" in args.against and shutil.which("nginx") is None:
        parser.error("nginx is not on the PATH (it is not a dependency; e.g. `apt-get install nginx-light`)")
    if args.duration_s is None:
        args.duration_s = 3.0 if args.quick else 10.0
    if args.warmup_s is None:
        args.warmup_s = 0.5 if args.quick else 2.0
    if args.profile and args.server != "uvicorn":
        parser.error("--profile profiles `lwapi serve` (uvicorn) only")
    if shutil.which("taskset") is None:
        parser.error("taskset (util-linux) is needed to pin the processes")
    if args.gateway_cpu == args.client_cpu or not {args.gateway_cpu, args.client_cpu} <= os.sched_getaffinity(0):
        parser.error(f"--gateway-cpu and --client-cpu must be two different cores of {sorted(os.sched_getaffinity(0))}")
    args.loadavg_before = [round(x, 2) for x in os.getloadavg()]
    log(f"load average before: {args.loadavg_before} on {os.cpu_count()} cpus")
    if args.loadavg_before[0] > 1.0:
        log("WARNING: other processes are running; rates will be lower than on a quiet machine (CPU per request "
            "is less affected); see gateway_core_others in each phase")
    # This process is the load generator; the embedded PostgreSQL it starts inherits the same core.
    os.sched_setaffinity(0, {args.client_cpu})
    with fresh_database() as dsn, running_stack(args, dsn) as stack, contextlib.ExitStack() as extra:
        if "nginx" in args.against:
            extra.enter_context(nginx_in_front(args, stack))
        loop = loadgen.new_event_loop()
        try:
            result, failures = loop.run_until_complete(run(args, stack))
        finally:
            loop.close()
    emit(result)
    if failures:
        log(f"{len(failures)} correctness check(s) failed: {failures}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
