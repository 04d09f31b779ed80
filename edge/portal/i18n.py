"""The portal's languages: Traditional Chinese (the default) and English.

Imports: stdlib, domain. Messages live in one TOML catalog per language (`locales/*.toml`, flat
dotted keys); the two catalogs hold the same keys (a test checks), so a page never shows a key. A
person's choice is remembered in a cookie; without one, the browser's Accept-Language picks, and
zh-TW when it names neither language. Domain refusals are shown by their error code's message.
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
        """A refusal in this language. The domain words its refusals in English, precisely (which field,
        which limit); English pages show them as they are, others show the code's message with them."""
        key = f"errors.{error.code}"
        if self.language == "en" or key not in catalog(self.language):
            return str(error)
        if error.code == "invalid_value":
            return f"{self(key)}（{error}）"
        return self(key)


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
