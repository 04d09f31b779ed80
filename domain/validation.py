"""Field validation shared by the aggregates: names, codes, e-mails, bounded integers.

Imports: stdlib only.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from domain.errors import InvalidAmount, InvalidValue

NAME_CHARS_MAX = 120
EMAIL_CHARS_MAX = 254
MODEL_NAME_CHARS_MAX = 200
REASON_CHARS_MAX = 500
CREDITS_MAX = 10**15  # a quadrillion smallest units: far above any real budget, far below int64
COUNT_MAX = 10**9
PROJECT_CODE_CHARS_MAX = 40

# Times an aggregate may hold: the read models (PostgreSQL timestamptz through asyncpg) and date arithmetic
# hold every one of them in any time zone. A time outside would be an event no read model can apply.
TIME_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
TIME_LATEST = datetime(9000, 1, 1, tzinfo=UTC)

_CODE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{1,39}$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")


def label(field: str) -> str:
    """A field identifier as English words, for messages."""
    return field.replace("_", " ")


def clean_text(value: str, field: str, *, chars_max: int = NAME_CHARS_MAX) -> str:
    """Strip surrounding space; refuse empty, over-long or control-character text."""
    if not isinstance(value, str):
        raise InvalidValue(f"{label(field)} must be text", rule="text", field=field)
    text = value.strip()
    if not text:
        raise InvalidValue(f"{label(field)} must not be empty", rule="empty", field=field)
    if len(text) > chars_max:
        raise InvalidValue(f"{label(field)} must be at most {chars_max} characters",
                           rule="too_long", field=field, chars_max=chars_max)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InvalidValue(f"{label(field)} must not contain control characters", rule="control_chars", field=field)
    return unicode_text(text, field)


def unicode_text(text: str, field: str) -> str:
    """Refuse lone surrogates (what undecodable bytes in a command line become): no store holds them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidValue(f"{label(field)} must be valid Unicode text", rule="encoding", field=field) from None
    return text


def clean_email(value: str) -> str:
    email = clean_text(value, "email", chars_max=EMAIL_CHARS_MAX).lower()
    if not _EMAIL_RE.match(email):
        raise InvalidValue(f"not an e-mail address: {email!r}", rule="email", value=email)
    return email


def clean_code(value: str) -> str:
    code = clean_text(value, "project_code", chars_max=PROJECT_CODE_CHARS_MAX).lower()
    if not _CODE_RE.match(code):
        raise InvalidValue(
            "project code must be 2-40 characters: lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit", rule="project_code", value=code,
        )
    return code


def clean_model_name(value: str) -> str:
    name = clean_text(value, "model_name", chars_max=MODEL_NAME_CHARS_MAX)
    if not _MODEL_RE.match(name):
        raise InvalidValue(f"not a model name: {name!r}", rule="model_name", value=name)
    return name


def bounded_int(value: object, field: str, *, low: int, high: int) -> int:
    """An int (not bool) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(f"{label(field)} must be an integer", rule="integer", field=field)
    if not low <= value <= high:
        raise InvalidValue(f"{label(field)} must be between {low} and {high}",
                           rule="range", field=field, low=low, high=high)
    return value


def credits(value: object, field: str, *, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidAmount(f"{label(field)} must be an integer number of credits", rule="credits", field=field)
    if not low <= value <= CREDITS_MAX:
        raise InvalidAmount(f"{label(field)} must be between {low} and {CREDITS_MAX}",
                            rule="range", field=field, low=low, high=CREDITS_MAX)
    return value


def aware(value: datetime | None, field: str) -> datetime | None:
    """Times are compared across processes and zones: refuse naive datetimes, and those outside
    [TIME_EARLIEST, TIME_LATEST)."""
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise InvalidValue(f"{label(field)} must be a timezone-aware time", rule="aware_time", field=field)
    try:
        in_range = TIME_EARLIEST <= value < TIME_LATEST
    except OverflowError:  # a zone that pushes the time past year 1 or 9999
        in_range = False
    if not in_range:
        raise InvalidValue(f"{label(field)}: a time from {TIME_EARLIEST:%Y-%m-%d} up to {TIME_LATEST:%Y-%m-%d}",
                           rule="time_range", field=field, earliest=f"{TIME_EARLIEST:%Y-%m-%d}",
                           latest=f"{TIME_LATEST:%Y-%m-%d}")
    return value
