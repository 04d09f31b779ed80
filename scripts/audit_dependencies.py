#!/usr/bin/env python
"""Audit the locked dependencies (uv.lock) against PyPI's vulnerability data, as `pip-audit` does.

For each package from the registry, PyPI's JSON document for the locked release
(`/pypi/NAME/VERSION/json`) lists the advisories that affect it (from the Python Packaging Advisory
Database and OSV), each with the versions that fix it. Where that document is not served (some
mirrors and proxies serve only the project's document, `/pypi/NAME/json`, which describes the latest
release), the project's document still audits a package locked at its latest release; any other is
reported as not audited, by name, never counted as clean.

Exits 1 when a locked release has a known, not withdrawn vulnerability with a fixed version; with
`--require-complete`, also when any package could not be audited. Progress and findings go to stderr;
ONE JSON object on the last line of stdout: packages, audited, not_audited (names), vulnerable
(package, version, id, aliases, fixed_in), fixable (how many of those have a fix), source_counts.

    .venv/bin/python scripts/audit_dependencies.py
    .venv/bin/python scripts/audit_dependencies.py --require-complete    # where PyPI's JSON API is reachable
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import tomllib
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYPI = "https://pypi.org/pypi"
TIMEOUT_S = 15.0
THREADS = 16


@dataclass
class Finding:
    name: str
    version: str
    source: str = ""  # "release" or "latest" (the project's document, locked == latest), "" if not audited
    problem: str = ""
    vulnerabilities: list[dict[str, Any]] = field(default_factory=list)


def locked_packages(lock: Path) -> list[tuple[str, str]]:
    data = tomllib.loads(lock.read_text())
    return sorted((p["name"], p["version"]) for p in data.get("package", [])
                  if "registry" in p.get("source", {}) and "version" in p)


def fetch(url: str, context: ssl.SSLContext | None) -> dict[str, Any] | None:
    """The JSON document at `url`, or None when it is not served (404, unreachable, not JSON)."""
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "lwapi-audit"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=context) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, TimeoutError, OSError, ValueError):
        return None


def audit(pypi: str, name: str, version: str, context: ssl.SSLContext | None) -> Finding:
    finding = Finding(name, version)
    document = fetch(f"{pypi}/{name}/{version}/json", context)
    if document is not None:
        finding.source = "release"
    else:
        document = fetch(f"{pypi}/{name}/json", context)
        if document is None:
            finding.problem = "PyPI's JSON API did not answer"
            return finding
        latest = str(document.get("info", {}).get("version", ""))
        if latest != version:
            finding.problem = f"only the latest release ({latest}) is described here"
            return finding
        finding.source = "latest"
    if not isinstance(document.get("vulnerabilities"), list):
        finding.source, finding.problem = "", "the document carries no vulnerability data"
        return finding
    finding.vulnerabilities = [v for v in document["vulnerabilities"] if isinstance(v, dict) and not v.get("withdrawn")]
    return finding


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", type=Path, default=ROOT / "uv.lock", help="the lock file (default: uv.lock)")
    parser.add_argument("--pypi", default=PYPI, help=f"PyPI's JSON API (default {PYPI})")
    parser.add_argument("--require-complete", action="store_true",
                        help="also fail when a package could not be audited")
    args = parser.parse_args()
    packages = locked_packages(args.lock)
    context = ssl.create_default_context() if args.pypi.startswith("https:") else None
    with ThreadPoolExecutor(THREADS) as pool:
        findings = list(pool.map(lambda p: audit(args.pypi.rstrip("/"), p[0], p[1], context), packages))
    vulnerable = [{"package": f.name, "version": f.version, "id": v.get("id"), "aliases": v.get("aliases") or [],
                   "fixed_in": v.get("fixed_in") or []} for f in findings for v in f.vulnerabilities]
    for v in vulnerable:
        fix = ", ".join(v["fixed_in"]) or "no fixed release yet"
        print(f"VULNERABLE {v['package']} {v['version']}: {v['id']} {' '.join(v['aliases'])} (fixed in {fix})",
              file=sys.stderr)
    not_audited = [f for f in findings if not f.source]
    for f in not_audited:
        print(f"not audited: {f.name} {f.version}: {f.problem}", file=sys.stderr)
    audited = len(findings) - len(not_audited)
    fixable = sum(1 for v in vulnerable if v["fixed_in"])
    print(f"{len(findings)} locked packages: {audited} audited, {len(not_audited)} not audited, "
          f"{len(vulnerable)} known vulnerabilities ({fixable} with a fix)", file=sys.stderr)
    sources: dict[str, int] = {}
    for f in findings:
        sources[f.source or "none"] = sources.get(f.source or "none", 0) + 1
    print(json.dumps({"packages": len(findings), "audited": audited,
                      "not_audited": [f"{f.name}=={f.version}" for f in not_audited], "vulnerable": vulnerable,
                      "fixable": fixable, "source_counts": sources}, sort_keys=True))
    if fixable:
        return 1
    return 1 if args.require_complete and not_audited else 0


if __name__ == "__main__":
    raise SystemExit(main())
