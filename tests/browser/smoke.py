"""Check that Playwright drives the system Chromium here: a localhost page, dark mode, zh-TW locale, CJK text.

    .venv/bin/python -m tests.browser.smoke [OUT_DIR]

Serves a small page from 127.0.0.1 (stdlib http.server), loads it light/en-US and dark/zh-TW, checks what the
page sees (prefers-color-scheme, navigator.language, Intl) and that every character has a font (no boxes),
saves two screenshots to OUT_DIR (default: a new folder under /tmp) for a person to look at, and prints timings
and the browser's memory (PSS). Exits non-zero on any mismatch. Leaves no browser or server running.
"""

from __future__ import annotations

import http.server
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.browser.launch import launch_browser, missing_glyphs, screenshot

PAGE = """<!doctype html>
<html lang="zh-Hant-TW"><head><meta charset="utf-8"><title>瀏覽器測試</title>
<style>
  :root { color-scheme: light dark; }
  body { font: 20px sans-serif; margin: 24px; background: #fff; color: #111; }
  @media (prefers-color-scheme: dark) { body { background: #111; color: #eee; } }
  h1 { font-size: 32px; }
</style></head>
<body>
  <h1>繁體中文測試：帳戶餘額與金鑰管理</h1>
  <p id="text">憑證、額度、儀表板、註冊、登入。Latin: The quick brown fox 0123456789. Emoji: 🌙 ☀️</p>
  <p id="scheme"></p><p id="lang"></p><p id="date"></p>
  <script>
    const dark = matchMedia("(prefers-color-scheme: dark)").matches;
    document.getElementById("scheme").textContent = "scheme=" + (dark ? "dark" : "light");
    document.getElementById("lang").textContent = "navigator.language=" + navigator.language;
    document.getElementById("date").textContent =
      new Intl.DateTimeFormat(undefined, {dateStyle: "full"}).format(new Date(Date.UTC(2026, 0, 15)));
  </script>
</body></html>
"""


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = PAGE.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


@contextmanager
def _serve() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _chromium_pss_mib() -> tuple[int, float]:
    """(process count, summed PSS in MiB) of the Chromium processes under this Python process."""
    total_kib, count = 0, 0
    for pid in _descendants(os.getpid()):
        try:
            if "chromium" not in Path(f"/proc/{pid}/exe").resolve().name:
                continue
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        count += 1
        total_kib += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
    return count, total_kib / 1024


def main(out_dir: Path) -> int:
    failures: list[str] = []
    with _serve() as url, sync_playwright() as pw:
        started = time.perf_counter()
        browser = launch_browser(pw)
        launched = time.perf_counter()
        print(f"browser {browser.version}: launched in {launched - started:.2f} s")
        try:
            for name, options in (("light-en", {}), ("dark-zh-TW", {"locale": "zh-TW", "color_scheme": "dark"})):
                context = browser.new_context(viewport={"width": 900, "height": 400}, **options)
                page = context.new_page()
                t0 = time.perf_counter()
                page.goto(url, wait_until="load")
                print(f"{name}: new context + page + load {url} in {time.perf_counter() - t0:.3f} s")
                seen = [page.inner_text(f"#{key}") for key in ("scheme", "lang", "date")]
                print(f"{name}: {' | '.join(seen)}")
                want_scheme = "dark" if name.startswith("dark") else "light"
                if seen[0] != f"scheme={want_scheme}":
                    failures.append(f"{name}: page saw {seen[0]}, want scheme={want_scheme}")
                if "locale" in options and seen[1] != "navigator.language=zh-TW":
                    failures.append(f"{name}: page saw {seen[1]}, want navigator.language=zh-TW")
                if "locale" in options and "2026年1月15日" not in seen[2]:
                    failures.append(f"{name}: Intl date is {seen[2]!r}, want a zh-TW date")
                # The page's dark style only applies when the emulated media matches.
                if want_scheme == "dark":
                    page.emulate_media(color_scheme="light")
                    if page.inner_text("#scheme") != "scheme=dark":  # the script ran once at load
                        failures.append(f"{name}: page text changed without a reload")
                    light_bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
                    page.emulate_media(color_scheme="dark")
                    dark_bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
                    print(f"{name}: emulate_media body background light={light_bg} dark={dark_bg}")
                    if (light_bg, dark_bg) != ("rgb(255, 255, 255)", "rgb(17, 17, 17)"):
                        failures.append(f"{name}: emulate_media did not switch the page's colours")
                missing = missing_glyphs(page, page.inner_text("h1") + page.inner_text("#text"))
                if missing:
                    failures.append(f"{name}: no font for {missing} (run scripts/backends/install-browser)")
                if missing_glyphs(page, "\U000f0000") != ["\U000f0000"]:  # a private-use character: no font
                    failures.append(f"{name}: missing_glyphs does not see a missing glyph")
                shot = screenshot(page, out_dir / f"{name}.png")
                print(f"{name}: screenshot {shot}")
                count, pss = _chromium_pss_mib()
                print(f"{name}: memory {count} chromium processes, {pss:.0f} MiB PSS with this page open")
                context.close()
        finally:
            started = time.perf_counter()
            browser.close()
            print(f"browser closed in {time.perf_counter() - started:.2f} s")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="lwapi-browser-smoke."))
    sys.exit(main(target))
