"""scripts/audit_dependencies.py against a PyPI JSON API of our own on loopback: what it flags, what it
counts as audited, and what it refuses to call clean."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

ADVISORY = {"id": "PYSEC-2099-1", "aliases": ["CVE-2099-0001"], "fixed_in": ["1.0.1"], "withdrawn": None,
            "summary": "x", "details": "x", "link": "https://example.org"}
DOCUMENTS = {
    "/pypi/vulnerable/1.0.0/json": {"info": {"version": "1.0.0"}, "vulnerabilities": [ADVISORY]},
    "/pypi/withdrawn/2.0.0/json": {"info": {"version": "2.0.0"},
                                   "vulnerabilities": [ADVISORY | {"withdrawn": "2099-01-01"}]},
    "/pypi/clean/3.0.0/json": {"info": {"version": "3.0.0"}, "vulnerabilities": []},
    # only the project's document (the latest release) is served for these two
    "/pypi/latest-only/json": {"info": {"version": "4.0.0"}, "vulnerabilities": []},
    "/pypi/older/json": {"info": {"version": "6.0.0"}, "vulnerabilities": []},
}


class _PyPI(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        document = DOCUMENTS.get(self.path)
        body = json.dumps(document).encode() if document is not None else b""
        self.send_response(200 if document is not None else 404)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(scope="module")
def pypi() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PyPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/pypi"
    server.shutdown()


def _lock(tmp_path: Path, packages: dict[str, str]) -> Path:
    lock = tmp_path / "uv.lock"
    entries = ['[[package]]\nname = "ours"\nversion = "0.1.0"\nsource = { editable = "." }\n']
    entries += [f'[[package]]\nname = "{n}"\nversion = "{v}"\nsource = {{ registry = "https://pypi.org/simple" }}\n'
                for n, v in packages.items()]
    lock.write_text("version = 1\n\n" + "\n".join(entries))
    return lock


def _audit(pypi: str, lock: Path, *extra: str) -> tuple[int, dict[str, object], str]:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "audit_dependencies.py"), "--pypi", pypi,
                           "--lock", str(lock), *extra], check=False, capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(done.stdout.splitlines()[-1]), done.stderr


def test_a_locked_release_with_a_fixed_vulnerability_fails_the_audit(pypi: str, tmp_path: Path) -> None:
    rc, report, err = _audit(pypi, _lock(tmp_path, {"vulnerable": "1.0.0", "clean": "3.0.0"}))
    assert rc == 1 and report["fixable"] == 1 and report["audited"] == 2
    assert report["vulnerable"] == [{"package": "vulnerable", "version": "1.0.0", "id": "PYSEC-2099-1",
                                     "aliases": ["CVE-2099-0001"], "fixed_in": ["1.0.1"]}]
    assert "VULNERABLE vulnerable 1.0.0: PYSEC-2099-1 CVE-2099-0001 (fixed in 1.0.1)" in err


def test_withdrawn_advisories_and_the_latest_release_pass(pypi: str, tmp_path: Path) -> None:
    rc, report, _ = _audit(pypi, _lock(tmp_path, {"withdrawn": "2.0.0", "clean": "3.0.0", "latest-only": "4.0.0"}),
                           "--require-complete")
    assert rc == 0 and report["audited"] == 3 and report["vulnerable"] == []
    assert report["source_counts"] == {"release": 2, "latest": 1}


def test_what_cannot_be_audited_is_named_and_never_called_clean(pypi: str, tmp_path: Path) -> None:
    lock = _lock(tmp_path, {"clean": "3.0.0", "older": "5.0.0", "unknown": "1.0.0"})
    rc, report, err = _audit(pypi, lock)
    assert rc == 0 and report["audited"] == 1 and report["not_audited"] == ["older==5.0.0", "unknown==1.0.0"]
    assert "not audited: older 5.0.0: only the latest release (6.0.0) is described here" in err
    rc, _, _ = _audit(pypi, lock, "--require-complete")
    assert rc == 1
