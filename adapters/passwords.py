"""Password hashing for local accounts (argon2id), kept out of the domain, which sees only hashes.

Imports: argon2-cffi.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

PASSWORD_CHARS_MIN = 8
PASSWORD_CHARS_MAX = 1024  # argon2 would hash megabytes happily; a login form should not make it

_hasher = PasswordHasher()


class WeakPassword(ValueError):
    """The password is too short or too long."""


def hash_password(password: str) -> str:
    if not PASSWORD_CHARS_MIN <= len(password) <= PASSWORD_CHARS_MAX:
        raise WeakPassword(f"a password must be {PASSWORD_CHARS_MIN} to {PASSWORD_CHARS_MAX} characters")
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """True when `password` matches; a missing hash still costs one hash so timing says nothing."""
    if len(password) > PASSWORD_CHARS_MAX:
        return False
    try:
        if password_hash is None:
            _hasher.hash(password)
            return False
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False
