"""A real llama.cpp server (llama-cpp-python's OpenAI-compatible one) serving the tiny GGUF, for tests and benchmarks.

The server lives in its own venv, `.venv-llamacpp` at the repository root, made by
`scripts/backends/install-llamacpp` (a pinned llama-cpp-python[server], built once into a wheel cache).
It has no health route: GET /v1/models answers 200 once the model is loaded (it loads before the port
opens). It serves one request at a time (a lock around the model), accepts any model name, ignores `n`
and never sends usage in a stream.

    python -m tests.backends.llamacpp_server [--gguf FILE] [--port N]   # serve until Ctrl-C
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tests.backends.process import ServerProcess, free_port, start_server

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-llamacpp"
INSTALLER = ROOT / "scripts" / "backends" / "install-llamacpp"
HEALTH_PATH = "/v1/models"
N_CTX = 512


class LlamaCppMissing(RuntimeError):
    """The llama.cpp venv is not installed."""


def llamacpp_python() -> Path:
    """The python of the llama.cpp venv; raises with the command to run when it is not installed."""
    python = VENV / "bin" / "python"
    if not python.exists():
        raise LlamaCppMissing(f"{python} not found: install llama.cpp's server first with `{INSTALLER}`")
    return python


def make_tiny_gguf(work_dir: Path) -> Path:
    """Write the tiny model folder and its GGUF under work_dir (needs the main venv) and return the GGUF."""
    from tests.backends import tiny_gguf, tiny_model  # noqa: PLC0415  (numpy, tokenizers: only when asked)

    model_dir = tiny_model.write(work_dir / "tiny-llama")
    return tiny_gguf.write_gguf(model_dir, work_dir / "tiny-llama.gguf")


def start_llamacpp(gguf: Path, *, port: int | None = None, log_dir: Path, alias: str = "tiny-llama-cpp",
                   n_ctx: int = N_CTX, timeout_s: float = 120.0) -> ServerProcess:
    """Start llama-cpp-python's server on 127.0.0.1 for `gguf` (model id `alias`); stop it with `.stop()`."""
    port = port or free_port()
    command = [
        str(llamacpp_python()), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_batch", str(n_ctx),
        "--n_threads", "1", "--n_threads_batch", "1",
    ]
    return start_server("llama.cpp", command, port=port, health_path=HEALTH_PATH,
                        log_path=log_dir / f"llamacpp-{port}.log", timeout_s=timeout_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help="GGUF to serve (default: the tiny model, written to a temp dir)")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--alias", default="tiny-llama-cpp")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lwapi-llamacpp-") as tmp:
        gguf = args.gguf or make_tiny_gguf(Path(tmp))
        started = time.monotonic()
        server = start_llamacpp(gguf, port=args.port, log_dir=Path(tmp), alias=args.alias)
        print(f"llama.cpp serving {gguf} as {args.alias!r} at {server.base_url}/v1 "
              f"(up in {time.monotonic() - started:.1f} s, log {server.log_path}); Ctrl-C stops it", flush=True)
        try:
            while server.process.poll() is None:
                time.sleep(0.5)
            print(f"server exited with status {server.process.returncode}:\n{server.log_tail()}")
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()


if __name__ == "__main__":
    main()
