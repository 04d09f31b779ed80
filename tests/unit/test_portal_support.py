"""The portal's languages and its login throttle."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from domain.errors import InvalidValue, PermissionDenied
from edge.portal.i18n import LANGUAGES, Translator, catalog, negotiate
from edge.portal.throttle import FIRST_LOCK_S, FREE_FAILURES, LOCK_MAX_S, WINDOW_S, LoginThrottle

TEMPLATES = Path(__file__).parents[2] / "edge" / "portal" / "templates"


def test_both_languages_have_every_message_and_the_same_placeholders() -> None:
    en, zh = catalog("en"), catalog("zh-TW")
    assert en.keys() == zh.keys()
    for key in en:
        assert set(re.findall(r"{(\w+)}", en[key])) == set(re.findall(r"{(\w+)}", zh[key])), key


def test_every_message_a_template_asks_for_exists() -> None:
    asked = set()
    for template in TEMPLATES.glob("*.html"):
        # literal keys only; computed ones (t("roles." ~ role)) are checked in the test below
        asked |= set(re.findall(r"""\bt\(\s*["']([\w.]+\w)["']""", template.read_text(encoding="utf-8")))
    assert asked and asked <= catalog("en").keys(), asked - catalog("en").keys()


@pytest.mark.parametrize(("cookie", "accept", "expected"), [
    (None, None, "zh-TW"), ("en", "zh-TW", "en"), ("zh-TW", "en-US", "zh-TW"), (None, "en-GB,en;q=0.9", "en"),
    (None, "fr-FR, zh-HK;q=0.5", "zh-TW"), ("klingon", "de", "zh-TW"), (None, "de, en;q=0.1", "en"),
])
def test_the_language_is_the_remembered_choice_else_the_browsers(cookie: str | None, accept: str | None,
                                                                 expected: str) -> None:
    assert negotiate(cookie, accept) == expected


def test_refusals_are_shown_in_the_persons_language() -> None:
    assert Translator("en").error(PermissionDenied("only admins")) == "only admins"
    assert Translator("zh-TW").error(PermissionDenied("only admins")) == catalog("zh-TW")["errors.permission_denied"]
    assert "weight must be" in Translator("zh-TW").error(InvalidValue("weight must be 1-1000"))
    assert Translator("zh-TW")("keys.revoke_confirm", name="ci") == "確定撤銷金鑰「ci」？使用它的程式將立即無法使用，且無法復原。"
    assert set(LANGUAGES) == {"zh-TW", "en"}
    assert {f"roles.{r}" for r in ("creator", "manager", "user", "admin")} <= catalog("en").keys()
    assert {f"status.{s}" for s in ("active", "not_yet_valid", "expired", "revoked", "over_cap")} <= catalog("en").keys()


def test_failed_logins_lock_the_pair_for_a_growing_time() -> None:
    now = [1000.0]
    throttle = LoginThrottle(lambda: now[0])
    for _ in range(FREE_FAILURES - 1):
        throttle.failed("A@uni.edu", "10.0.0.1")
    assert throttle.wait_s("a@uni.edu", "10.0.0.1") == 0
    throttle.failed("a@uni.edu", "10.0.0.1")
    assert throttle.wait_s("a@uni.edu", "10.0.0.1") == FIRST_LOCK_S
    assert throttle.wait_s("a@uni.edu", "10.0.0.2") == 0  # another address is not locked out by this one
    throttle.failed("a@uni.edu", "10.0.0.1")
    assert throttle.wait_s("a@uni.edu", "10.0.0.1") == 2 * FIRST_LOCK_S
    for _ in range(20):
        throttle.failed("a@uni.edu", "10.0.0.1")
    assert throttle.wait_s("a@uni.edu", "10.0.0.1") == LOCK_MAX_S
    throttle.succeeded("a@uni.edu", "10.0.0.1")
    assert throttle.wait_s("a@uni.edu", "10.0.0.1") == 0
    throttle.failed("b@uni.edu", "x")
    now[0] += WINDOW_S + 1  # old failures expire
    for _ in range(FREE_FAILURES - 1):
        throttle.failed("b@uni.edu", "x")
    assert throttle.wait_s("b@uni.edu", "x") == 0
