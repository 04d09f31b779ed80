"""Signed exports of the chain head, so that an auditor can hold the service to its history.

Imports: stdlib, cryptography, domain. The head (position, digest, time) is signed with the service's
Ed25519 key; the export carries the public key, and the auditor records its fingerprint once, out of
band. Later, `lwapi audit verify --head FILE` checks the signature and that the log still has that
digest at that position: rewriting history, even with a recomputed chain, cannot match both.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from domain.audit import DIGEST_BYTES, Head

FORMAT = "lwapi-chain-head/1"
HEAD_FILE_BYTES_MAX = 64 * 1024


class HeadInvalid(ValueError):
    """An exported head that is malformed, or whose signature does not hold."""


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The signing key in `path` (raw 32 bytes, hex), created once with 0600 permissions."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(Ed25519PrivateKey.generate().private_bytes_raw().hex() + "\n")
    try:
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(path.read_text().strip()))
    except ValueError:
        raise HeadInvalid(f"{path} does not hold an Ed25519 signing key (64 hex digits)") from None


def fingerprint(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:32]


def _message(position: int, digest_hex: str, exported_at: str) -> bytes:
    return f"{FORMAT}\n{position}\n{digest_hex}\n{exported_at}".encode()


def export_head(head: Head, key: Ed25519PrivateKey, exported_at: datetime) -> dict[str, Any]:
    at = exported_at.isoformat()
    public = key.public_key().public_bytes_raw()
    return {
        "format": FORMAT,
        "position": head.position,
        "digest": head.digest.hex(),
        "exported_at": at,
        "public_key": base64.b64encode(public).decode(),
        "public_key_fingerprint": fingerprint(public),
        "signature": base64.b64encode(key.sign(_message(head.position, head.digest.hex(), at))).decode(),
    }


def read_head(text: str, *, trusted_fingerprint: str | None = None) -> Head:
    """The head in an export, once its signature (and, if given, its signer) is checked."""
    if len(text) > HEAD_FILE_BYTES_MAX:
        raise HeadInvalid("not a chain-head export: too large")
    try:
        doc = json.loads(text)
        if doc.get("format") != FORMAT:
            raise HeadInvalid(f"not a chain-head export (format {doc.get('format')!r}, expected {FORMAT!r})")
        position, digest_hex, at = int(doc["position"]), str(doc["digest"]), str(doc["exported_at"])
        public, signature = base64.b64decode(doc["public_key"]), base64.b64decode(doc["signature"])
        digest = bytes.fromhex(digest_hex)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise HeadInvalid(f"not a chain-head export: {e}") from None
    if len(digest) != DIGEST_BYTES or position < 0:
        raise HeadInvalid("not a chain-head export: bad position or digest")
    if trusted_fingerprint is not None and fingerprint(public) != trusted_fingerprint.lower():
        raise HeadInvalid("the export was signed by another key than the trusted one")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, _message(position, digest_hex, at))
    except (InvalidSignature, ValueError):
        raise HeadInvalid("the export's signature does not match its content") from None
    return Head(position, digest)
