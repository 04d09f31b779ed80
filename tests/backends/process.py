"""Starting and stopping a real inference server as a child process, for tests and benchmarks.

Imports: stdlib, httpx. The server's output goes to a log file whose tail is shown when it fails to
come up, so a broken install reads as a clear error instead of a timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerFailed(RuntimeError):
    """The server exited or did not answer its health check in time."""


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen[bytes]
    base_url: str  # http://127.0.0.1:PORT, without /v1
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 15.0) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the server's own children (engine cores) too
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_server(name: str, command: list[str], *, port: int, health_path: str, log_path: Path,
                 env: dict[str, str] | None = None, timeout_s: float = 240.0) -> ServerProcess:
    """Start `command` in its own process group and wait until GET health_path answers 200."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
    server = ServerProcess(name, process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"{name} exited with status {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.base_url + health_path, timeout=2.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise ServerFailed(f"{name} did not answer {health_path} within {timeout_s:.0f} s:\n{server.log_tail()}")
