"""The portal in a real headless Chromium (Debian's, driven by Playwright), end to end.

Log in → pick the project → create a key → call the gateway with it through the official `openai` SDK →
the usage shows in the portal → revoke → the gateway refuses the key. Also the theme switch and the
language switch, remembered across reloads. Screenshots of the main pages, in both themes and both
languages, go to $LWAPI_ARTIFACTS_DIR/screenshots (default .artifacts/screenshots) for people to look at.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from adapters.passwords import hash_password
from tests.browser.launch import launch_browser, missing_glyphs, screenshot
from tests.e2e.conftest import Stack

PASSWORD = "browser-password-1"
SHOTS = Path(os.environ.get("LWAPI_ARTIFACTS_DIR", Path(__file__).parents[2] / ".artifacts")) / "screenshots"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch_browser(playwright)
        try:
            yield browser
        finally:
            browser.close()


def portal_url(stack: Stack) -> str:
    return stack.base_url.removesuffix("/v1")


def log_in(page: Page, stack: Stack, email: str, password: str = PASSWORD) -> None:
    page.goto(portal_url(stack) + "/login")
    page.fill("#email", email)
    page.fill("#password", password)
    page.click("button[type=submit]")
    page.wait_for_url(portal_url(stack) + "/")


def refusals_of(page: Page) -> list[str]:
    """What the browser refused to run or load on this page (the content security policy), and script errors."""
    seen: list[str] = []
    page.on("console", lambda m: seen.append(m.text) if "Content Security Policy" in m.text else None)
    page.on("pageerror", lambda e: seen.append(str(e)))
    return seen


def wait_for(condition, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_key_lifecycle_in_the_browser_with_the_gateway(stack: Stack, browser: Browser) -> None:
    stack.app.set_password_hash(stack.user_id, hash_password(PASSWORD))
    context = browser.new_context(locale="en-US", color_scheme="light")
    page = context.new_page()
    refused_by_browser = refusals_of(page)
    try:
        log_in(page, stack, "researcher@uni.edu")
        page.click("text=Go to project")
        page.wait_for_url(f"{portal_url(stack)}/projects/nlp")
        assert page.inner_text("[data-testid=role]") == "Creator"
        page.click("nav.project >> text=API keys")
        page.fill("#name", "browser-key")
        page.fill("#rpm_limit", "100")
        page.check("input[name=models][value=llama]")
        page.click("text=Create key")
        secret = page.inner_text("#new-secret").strip()
        assert re.fullmatch(r"sk-lw-\S{40,}", secret)
        screenshot(page, SHOTS / "keys-created-en-light.png")

        api = openai.OpenAI(base_url=stack.base_url, api_key=secret, max_retries=0)
        reply = api.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hello"}])
        assert reply.usage is not None

        def usage_shown() -> bool:
            page.goto(f"{portal_url(stack)}/projects/nlp/keys")
            row = page.locator("tr[data-key=browser-key]")
            return "1 Requests" in row.inner_text().replace("\n", " ")
        wait_for(usage_shown)
        page.goto(f"{portal_url(stack)}/projects/nlp")
        assert page.locator("text=No usage yet.").count() == 0  # the recent-usage table has a row now
        screenshot(page, SHOTS / "project-home-en-light.png")
        page.click("nav.project >> text=Usage")
        page.wait_for_selector("[data-testid=chart-tokens-model] svg.main-svg")  # Plotly drew it, served locally
        assert "browser-key" in page.inner_text("[data-testid=usage]")
        screenshot(page, SHOTS / "usage-en-light.png")

        page.goto(f"{portal_url(stack)}/projects/nlp/keys")
        page.once("dialog", lambda dialog: dialog.accept())  # "Revoke the key …? This cannot be undone."
        page.locator("tr[data-key=browser-key] >> text=Revoke").click()
        page.wait_for_selector("text=The key browser-key was revoked.")
        assert "Revoked" in page.locator("tr[data-key=browser-key]").inner_text()

        def refused() -> bool:
            try:
                api.models.list()
            except openai.AuthenticationError:
                return True
            return False
        wait_for(refused)
        assert refused_by_browser == []  # the pages, Plotly included, run under the content security policy
    finally:
        context.close()


def test_theme_and_language_switches_are_remembered(stack: Stack, browser: Browser) -> None:
    stack.app.set_password_hash(stack.user_id, hash_password(PASSWORD))
    context = browser.new_context(locale="zh-TW", color_scheme="dark")
    page = context.new_page()
    refused_by_browser = refusals_of(page)
    try:
        log_in(page, stack, "researcher@uni.edu")
        html = page.locator("html")
        assert html.get_attribute("lang") == "zh-TW" and html.get_attribute("data-theme") == "dark"  # the system's
        assert page.locator("h1").inner_text() == "我的專案"
        assert missing_glyphs(page, "我的專案金鑰用量") == []  # a CJK font renders, no boxes
        screenshot(page, SHOTS / "projects-zh-dark.png")
        page.goto(f"{portal_url(stack)}/projects/nlp")
        screenshot(page, SHOTS / "project-home-zh-dark.png")
        page.goto(f"{portal_url(stack)}/projects/nlp/keys")
        screenshot(page, SHOTS / "keys-zh-dark.png")
        page.goto(f"{portal_url(stack)}/projects/nlp/members")
        screenshot(page, SHOTS / "members-zh-dark.png")
        page.goto(f"{portal_url(stack)}/docs")
        screenshot(page, SHOTS / "docs-zh-dark.png")
        page.goto(f"{portal_url(stack)}/projects/nlp/keys")

        page.click("#theme-toggle")
        assert html.get_attribute("data-theme") == "light"
        page.reload()
        assert html.get_attribute("data-theme") == "light"  # remembered, although the system says dark
        screenshot(page, SHOTS / "keys-zh-light.png")

        with page.expect_navigation():
            page.select_option("#language", "en")  # the switch submits itself
        assert page.locator("h1").inner_text() == "API keys" and html.get_attribute("lang") == "en"
        page.goto(f"{portal_url(stack)}/projects/nlp")
        assert "Balance" in page.inner_text("main")  # remembered on the next page too
        page.click("#theme-toggle")
        screenshot(page, SHOTS / "project-home-en-dark.png")

        page.locator("details.menu > summary").click()
        assert page.locator("details.menu .panel").inner_text().count("researcher@uni.edu") == 1
        page.click("details.menu >> text=Log out")
        page.wait_for_url(portal_url(stack) + "/login")
        screenshot(page, SHOTS / "login-en-dark.png")
        assert refused_by_browser == []  # theme and language switches run under the content security policy
    finally:
        context.close()


def test_the_administrators_catalog_page_renders_in_both_languages(stack: Stack, browser: Browser) -> None:
    context = browser.new_context(locale="en-US", color_scheme="light")
    page = context.new_page()
    try:
        log_in(page, stack, "ops@uni.edu", "admin-password-1")
        page.goto(portal_url(stack) + "/admin/models")
        assert page.locator("#model-llama").count() == 1
        screenshot(page, SHOTS / "catalog-en-light.png")
        with page.expect_navigation():
            page.select_option("#language", "zh-TW")
        assert page.locator("h1").inner_text() == "模型目錄"
        screenshot(page, SHOTS / "catalog-zh-light.png")
    finally:
        context.close()
