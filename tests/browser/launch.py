"""Launch Debian's headless Chromium under Playwright for the portal's browser tests (no pytest in here).

The browser is the system one (`scripts/backends/install-browser` installs it with a CJK font); Playwright's
own browser downloads (`playwright install`) are never used. The Chromium binary comes from $LWAPI_CHROMIUM,
else /usr/bin/chromium.

    from playwright.sync_api import sync_playwright
    from tests.browser.launch import launch_browser, screenshot

    with sync_playwright() as pw:
        browser = launch_browser(pw)
        try:
            context = browser.new_context(locale="zh-TW", color_scheme="dark")
            page = context.new_page()
            page.goto("http://127.0.0.1:8000/portal")
            screenshot(page, "/tmp/portal.png")
        finally:
            browser.close()

Each launch gets a new, empty profile: Playwright's `launch()` makes a fresh user-data-dir under $TMPDIR
(playwright_chromiumdev_profile-*) and deletes it on `browser.close()` (an explicit --user-data-dir is refused
by `launch()`; that is what `launch_persistent_context` is for).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Playwright

CHROMIUM_ENV = "LWAPI_CHROMIUM"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
INSTALL_HINT = "run scripts/backends/install-browser (as root) to install Debian's chromium and fonts-noto-cjk"

# Headless, no sandbox (root in a container cannot use Chromium's sandbox), no GPU, and no traffic of the
# browser's own: without the background-networking switches Chromium phones home at start-up and this machine's
# closed network refuses it. Playwright adds most of these itself; they are repeated so that the set does not
# depend on Playwright's version. Never add --disable-features here: Playwright passes its own, and Chromium
# keeps one value per switch.
CHROMIUM_ARGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # /dev/shm is 64 MB in many containers; use /tmp instead
)

# Resolve nothing but loopback names and addresses: a page (or Chromium itself: its component/extension
# updater and Google-account checks still try update.googleapis.com and accounts.google.com despite the switches
# above) that reaches past this machine fails at once with net::ERR_NAME_NOT_RESOLVED, with no DNS query for it.
# The rules apply to IP literals too, hence the 127.* and ::1 exclusions (written without brackets).
LOOPBACK_ONLY_ARG = (
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE *.localhost , EXCLUDE 127.* , EXCLUDE ::1"
)


class BrowserNotInstalled(RuntimeError):
    """The system Chromium is missing or not executable."""


def chromium_path() -> str:
    """The Chromium binary to drive: $LWAPI_CHROMIUM, else /usr/bin/chromium; raises when it is not there."""
    path = os.environ.get(CHROMIUM_ENV) or DEFAULT_CHROMIUM
    resolved = shutil.which(path)
    if resolved is None:
        raise BrowserNotInstalled(f"no executable Chromium at {path}: {INSTALL_HINT}")
    return resolved


def launch_browser(
    playwright: Playwright,
    *,
    executable_path: str | None = None,
    extra_args: Sequence[str] = (),
    loopback_only: bool = True,
    timeout_ms: float = 30_000,
) -> Browser:
    """Start headless Debian Chromium with CHROMIUM_ARGS (+ extra_args) and a fresh empty profile.

    `loopback_only` adds LOOPBACK_ONLY_ARG (hosts other than localhost, *.localhost, 127.* and ::1 do not
    resolve). The caller closes the browser (`browser.close()`), which also removes the profile; `timeout_ms`
    bounds the start.
    """
    args = [*CHROMIUM_ARGS, *([LOOPBACK_ONLY_ARG] if loopback_only else []), *extra_args]
    return playwright.chromium.launch(
        executable_path=executable_path or chromium_path(),
        headless=True,
        chromium_sandbox=False,
        args=args,
        timeout=timeout_ms,
    )


def screenshot(page: Page, path: str | os.PathLike[str], *, full_page: bool = True) -> Path:
    """Save a PNG of the page (the whole scrollable page by default) to `path`, creating its folder; returns it.

    Waits for web fonts first, so CJK text is drawn in its final font rather than a fallback.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    page.evaluate("() => document.fonts.ready.then(() => true)")
    page.screenshot(path=str(target), full_page=full_page, type="png", animations="disabled")
    return target


_MISSING_GLYPHS_JS = """([text, font]) => {
  const draw = (s) => {
    const canvas = document.createElement("canvas");
    canvas.width = 96;
    canvas.height = 96;
    const ctx = canvas.getContext("2d");
    ctx.font = font;
    ctx.fillText(s, 8, 64);
    return ctx.getImageData(0, 0, 96, 96).data.join(",");
  };
  const tofu = draw("\\u0378");  // an unassigned code point: drawn as the missing-glyph box
  return [...new Set(Array.from(text))].filter((ch) => ch.trim() !== "" && draw(ch) === tofu);
}"""


def missing_glyphs(page: Page, text: str, *, font: str = "48px sans-serif") -> list[str]:
    """The characters of `text` that no installed font can draw: they would show as boxes (tofu).

    Draws each character on a canvas in `page` with `font` (and Chromium's font fallback) and compares it with
    the box drawn for an unassigned code point. Empty when everything renders; whitespace is skipped.
    """
    return list(page.evaluate(_MISSING_GLYPHS_JS, [text, font]))
