"""The portal's languages and its login throttle."""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from domain.errors import DomainError, InvalidValue, PermissionDenied
from edge.portal.i18n import LANGUAGES, Translator, catalog, negotiate
from edge.throttle import FIRST_LOCK_S, FREE_FAILURES, LOCK_MAX_S, WINDOW_S, LoginThrottle

ROOT = Path(__file__).parents[2]
TEMPLATES = ROOT / "edge" / "portal" / "templates"


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
    refusal = InvalidValue("weight must be between 1 and 1000", rule="range", field="weight", low=1, high=1000)
    assert Translator("zh-TW").error(refusal) == "權重必須介於 1 與 1,000 之間。"
    assert Translator("en").error(refusal) == "Weight must be between 1 and 1,000."
    assert Translator("zh-TW").error(InvalidValue("no rule named")) == catalog("zh-TW")["errors.invalid_value"]
    # a rule raised without a parameter its message needs still reads as a sentence, never as a 500
    assert Translator("zh-TW").error(InvalidValue("x", rule="range", field="weight")) == "輸入內容有誤"
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


def _raise_sites() -> Iterator[tuple[str, ast.Call]]:
    for package in ("domain", "edge"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call):
                    yield f"{path.relative_to(ROOT)}:{node.lineno}", node


# validation helpers whose argument at this position is a field identifier
FIELD_ARGUMENT = {"clean_text": 1, "bounded_int": 1, "credits": 1, "aware": 1, "parse_time": 1, "_text": 1,
                  "_credits": 1, "_optional_int": 2, "_number": 3}


def test_every_rule_and_field_a_refusal_names_is_worded_in_both_languages() -> None:
    """The portal words a refusal from its rule; a rule or a field without words would fall back to English."""
    rules, fields = 0, 0
    for site, call in _raise_sites():
        name = call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", "")
        keywords = {k.arg: k.value for k in call.keywords if k.arg}
        rule = keywords.get("rule")
        if isinstance(rule, ast.Constant) and isinstance(rule.value, str):
            rules += 1
            for language in LANGUAGES:
                message = catalog(language).get(f"invalid.{rule.value}")
                assert message is not None, f"{site}: no invalid.{rule.value} in {language}"
                assert set(re.findall(r"{(\w+)}", message)) <= keywords.keys(), f"{site}: {language} asks for more"
        named: list[ast.expr] = [keywords["field"]] if "field" in keywords else []
        if name in FIELD_ARGUMENT and len(call.args) > FIELD_ARGUMENT[name]:
            named.append(call.args[FIELD_ARGUMENT[name]])
        for field in named:
            if isinstance(field, ast.Constant) and isinstance(field.value, str) and not field.value.startswith("-"):
                fields += 1
                for language in LANGUAGES:
                    assert f"fields.{field.value}" in catalog(language), f"{site}: no fields.{field.value}"
    assert rules > 30 and fields > 20  # the walk found the refusals


def test_every_refusal_code_has_a_message_in_both_languages() -> None:
    for module in ("accounting", "catalog", "errors"):
        importlib.import_module(f"domain.{module}")
    codes, pending = set(), [DomainError]
    while pending:
        cls = pending.pop()
        codes.add(cls.code)
        pending += cls.__subclasses__()
    for language in LANGUAGES:
        assert {f"errors.{code}" for code in codes} <= catalog(language).keys(), language
