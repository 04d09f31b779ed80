"""Service settings, read once from `LWAPI_`-prefixed environment variables (and DATABASE_URL).

Imports: stdlib. Settings are a frozen value handed to `edge.runtime`; nothing else reads the
environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_PORT = 8080


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    """Local data folder: the embedded PostgreSQL cluster, the key pepper file (LWAPI_DATA_DIR)."""
    database_url: str | None
    """External PostgreSQL (DATABASE_URL); unset means the embedded server in `data_dir`."""
    host: str
    """Address the HTTP server binds (LWAPI_HOST)."""
    port: int
    """Port the HTTP server binds (LWAPI_PORT)."""
    key_pepper_hex: str | None
    """Secret mixed into API-key hashes (LWAPI_KEY_PEPPER, hex); unset means `data_dir/key_pepper`."""
    admin_email: str | None
    """First administrator's e-mail (LWAPI_ADMIN_EMAIL); unset means admin@localhost."""
    admin_password: str | None
    """First administrator's password (LWAPI_ADMIN_PASSWORD); unset means one is generated and printed once."""
    db_pool_size: int
    """Connections per pool to PostgreSQL (LWAPI_DB_POOL_SIZE)."""
    db_timeout_s: float
    """Timeout for connecting and for each database command (LWAPI_DB_TIMEOUT_S)."""
    redis_url: str | None = None
    """Redis shared by several gateway processes for rate limits and reservations (LWAPI_REDIS_URL)."""
    health_interval_s: float = 10.0
    """How often every deployment is probed (LWAPI_HEALTH_INTERVAL_S)."""
    catalog_file: Path | None = None
    """A TOML model catalog applied at start (LWAPI_CATALOG_FILE); see edge/catalog_file.py."""
    secure_cookies: bool = False
    """Send the portal's cookies only over HTTPS (LWAPI_SECURE_COOKIES=1): set it behind a TLS proxy."""
    oidc_issuer: str | None = None
    """Institutional single sign-on: the OpenID provider's issuer URL (LWAPI_OIDC_ISSUER)."""
    oidc_client_id: str | None = None
    """This service's client id at the provider (LWAPI_OIDC_CLIENT_ID)."""
    oidc_client_secret: str | None = None
    """Its client secret (LWAPI_OIDC_CLIENT_SECRET, or a file named by LWAPI_OIDC_CLIENT_SECRET_FILE)."""
    public_url: str | None = None
    """The portal's address as people reach it (LWAPI_PUBLIC_URL), for the SSO redirect; default: as requested."""
    no_project_text: str | None = None
    """What a person without a project reads, e.g. whom to ask (LWAPI_NO_PROJECT_TEXT)."""
    request_timeout_s: float = 30.0
    """Seconds a client may take to send a whole request, headers and body (LWAPI_REQUEST_TIMEOUT_S)."""
    shutdown_grace_s: float = 15.0
    """On SIGTERM, seconds open requests get to finish before their streams are cut (LWAPI_SHUTDOWN_GRACE_S)."""
    audit_key_file: Path | None = None
    """Ed25519 key that signs exported chain heads (LWAPI_AUDIT_KEY_FILE); unset means `data_dir/audit_key`."""

    @property
    def audit_key_path(self) -> Path:
        return self.audit_key_file or self.data_dir / "audit_key"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        return cls(
            data_dir=Path(e.get("LWAPI_DATA_DIR", ".lwapi")).expanduser().absolute(),
            database_url=e.get("DATABASE_URL") or None,
            host=e.get("LWAPI_HOST", "127.0.0.1"),
            port=_int(e, "LWAPI_PORT", DEFAULT_PORT, 1, 65535),
            key_pepper_hex=e.get("LWAPI_KEY_PEPPER") or None,
            admin_email=e.get("LWAPI_ADMIN_EMAIL") or None,
            admin_password=e.get("LWAPI_ADMIN_PASSWORD") or None,
            db_pool_size=_int(e, "LWAPI_DB_POOL_SIZE", 10, 2, 200),
            db_timeout_s=float(_int(e, "LWAPI_DB_TIMEOUT_S", 30, 1, 3600)),
            redis_url=e.get("LWAPI_REDIS_URL") or None,
            health_interval_s=float(_int(e, "LWAPI_HEALTH_INTERVAL_S", 10, 1, 3600)),
            catalog_file=Path(e["LWAPI_CATALOG_FILE"]).absolute() if e.get("LWAPI_CATALOG_FILE") else None,
            secure_cookies=e.get("LWAPI_SECURE_COOKIES", "").lower() in ("1", "true", "yes"),
            oidc_issuer=e.get("LWAPI_OIDC_ISSUER") or None,
            oidc_client_id=e.get("LWAPI_OIDC_CLIENT_ID") or None,
            oidc_client_secret=e.get("LWAPI_OIDC_CLIENT_SECRET") or _file(e.get("LWAPI_OIDC_CLIENT_SECRET_FILE")),
            public_url=(e.get("LWAPI_PUBLIC_URL") or "").rstrip("/") or None,
            no_project_text=e.get("LWAPI_NO_PROJECT_TEXT") or None,
            audit_key_file=Path(e["LWAPI_AUDIT_KEY_FILE"]).absolute() if e.get("LWAPI_AUDIT_KEY_FILE") else None,
            request_timeout_s=float(_int(e, "LWAPI_REQUEST_TIMEOUT_S", 30, 1, 3600)),
            shutdown_grace_s=float(_int(e, "LWAPI_SHUTDOWN_GRACE_S", 15, 1, 3600)),
        )

    def as_env(self) -> dict[str, str]:
        """The environment that `from_env` reads back into these settings (for worker processes)."""
        env = {"LWAPI_DATA_DIR": str(self.data_dir), "LWAPI_HOST": self.host, "LWAPI_PORT": str(self.port),
               "LWAPI_DB_POOL_SIZE": str(self.db_pool_size), "LWAPI_DB_TIMEOUT_S": str(int(self.db_timeout_s)),
               "LWAPI_HEALTH_INTERVAL_S": str(int(self.health_interval_s)),
               "LWAPI_REQUEST_TIMEOUT_S": str(int(self.request_timeout_s)),
               "LWAPI_SHUTDOWN_GRACE_S": str(int(self.shutdown_grace_s)),
               "LWAPI_SECURE_COOKIES": "1" if self.secure_cookies else ""}
        optional = {"DATABASE_URL": self.database_url, "LWAPI_KEY_PEPPER": self.key_pepper_hex,
                    "LWAPI_ADMIN_EMAIL": self.admin_email, "LWAPI_ADMIN_PASSWORD": self.admin_password,
                    "LWAPI_REDIS_URL": self.redis_url,
                    "LWAPI_CATALOG_FILE": str(self.catalog_file) if self.catalog_file else None,
                    "LWAPI_OIDC_ISSUER": self.oidc_issuer, "LWAPI_OIDC_CLIENT_ID": self.oidc_client_id,
                    "LWAPI_OIDC_CLIENT_SECRET": self.oidc_client_secret, "LWAPI_PUBLIC_URL": self.public_url,
                    "LWAPI_NO_PROJECT_TEXT": self.no_project_text,
                    "LWAPI_AUDIT_KEY_FILE": str(self.audit_key_file) if self.audit_key_file else None}
        return env | {k: v for k, v in optional.items() if v}

    def with_overrides(self, *, data_dir: Path | None = None, port: int | None = None,
                       host: str | None = None) -> Settings:
        return replace(
            self,
            data_dir=self.data_dir if data_dir is None else data_dir.expanduser().absolute(),
            port=self.port if port is None else port,
            host=self.host if host is None else host,
        )


def _file(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip() or None
    except OSError as e:
        raise SettingsError(f"LWAPI_OIDC_CLIENT_SECRET_FILE: cannot read {path}: {e.strerror}") from None


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise SettingsError(f"{name} must be between {low} and {high}, got {value}")
    return value
