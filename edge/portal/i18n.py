"""The portal's languages: Traditional Chinese (the default) and English.

Imports: stdlib, domain. Messages live in one TOML catalog per language (`locales/*.toml`, flat
dotted keys); the two catalogs hold the same keys (a test checks), so a page never shows a key. A
person's choice is remembered in a cookie; without one, the browser's Accept-Language picks, and
zh-TW when it names neither language. Domain refusals are worded from their rule and parameters
(`invalid.*`, `fields.*`) or, without a rule, their error code (`errors.*`).
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domain.errors import DomainError

LANGUAGES = ("zh-TW", "en")
DEFAULT_LANGUAGE = "zh-TW"
LANGUAGE_NAMES = {"zh-TW": "繁體中文", "en": "English"}
COOKIE = "lwapi_lang"
LOCALES = Path(__file__).with_name("locales")


@functools.cache
def catalog(language: str) -> dict[str, str]:
    with (LOCALES / f"{language}.toml").open("rb") as f:
        return _flatten(tomllib.load(f))


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = str(value)
    return flat


@dataclass(frozen=True)
class Translator:
    language: str

    def __call__(self, key: str, **params: object) -> str:
        text = catalog(self.language).get(key) or catalog("en").get(key) or key
        return text.format(**params) if params else text

    def error(self, error: DomainError) -> str:
        """A refusal in this language: the rule it broke, worded by the catalog with its parameters
        (field names translated too); a refusal without a rule shows its code's message."""
        rule_key = f"invalid.{error.rule}"
        if error.rule and rule_key in catalog(self.language):
            params = {name: self._parameter(name, value) for name, value in error.params.items()}
            try:
                return self(rule_key, **params)
            except (KeyError, IndexError):  # a rule raised without a parameter its message names: say less
                pass
        if self.language == "en":
            return str(error)
        code_key = f"errors.{error.code}"
        return self(code_key if code_key in catalog(self.language) else "errors.domain_error")

    def _parameter(self, name: str, value: object) -> str:
        if name == "field" and isinstance(value, str):
            return self(f"fields.{value}") if f"fields.{value}" in catalog(self.language) else value.replace("_", " ")
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value)


def negotiate(cookie: str | None, accept_language: str | None) -> str:
    """The person's language: their remembered choice, else the first of ours their browser accepts."""
    if cookie in LANGUAGES:
        return cookie
    for part in (accept_language or "").split(","):
        tag = part.split(";")[0].strip().lower()
        if tag.startswith("zh"):
            return "zh-TW"
        if tag.startswith("en"):
            return "en"
    return DEFAULT_LANGUAGE
