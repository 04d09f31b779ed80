"""The one wiring point: settings → database → event store, Applications, read-model pools.

Imports: everything inward. The service (`edge.app`) and the CLI (`edge.cli`) both build a
`Runtime`; closing it stops the embedded PostgreSQL server when this process started it.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from adapters.database import Database, create_pool, eventstore_env
from adapters.passwords import hash_password
from domain.access import SYSTEM
from domain.accounting import Accounting
from domain.api_key import PEPPER_BYTES_MIN
from domain.errors import UserNotFound
from edge.settings import Settings, SettingsError
from projections.base import SCHEMA
from projections.follower import Follower

DEFAULT_ADMIN_EMAIL = "admin@lwapi.local"
PEPPER_FILE = "key_pepper"


@dataclass
class Runtime:
    settings: Settings
    database: Database
    accounting: Accounting
    pool: asyncpg.Pool | None = field(default=None)
    follower: Follower | None = field(default=None)

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        """Locate (or start) PostgreSQL and build the Application; creates the event tables if missing."""
        pepper = load_pepper(settings)
        database = Database.locate(settings.database_url, settings.data_dir)
        try:
            env = eventstore_env(database.dsn, pool_size=settings.db_pool_size, timeout_s=settings.db_timeout_s)
            accounting = Accounting(env=env, key_pepper=pepper)
        except BaseException:
            database.release()
            raise
        return cls(settings=settings, database=database, accounting=accounting)

    async def start_projections(self) -> Follower:
        """Open the asyncpg pool, create the read models if missing and bring them up to date."""
        if self.follower is None:
            self.pool = await create_pool(self.database.dsn, size_max=self.settings.db_pool_size,
                                          timeout_s=self.settings.db_timeout_s)
            self.follower = Follower(self.pool)
            await self.follower.ensure_schema()
        await self.follower.catch_up()
        return self.follower

    async def aclose(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
            self.follower = None

    def close(self) -> None:
        self.accounting.close()
        self.database.release()


def load_pepper(settings: Settings) -> bytes:
    """LWAPI_KEY_PEPPER, else `data_dir/key_pepper`, created once with 0600 permissions."""
    if settings.key_pepper_hex:
        try:
            pepper = bytes.fromhex(settings.key_pepper_hex)
        except ValueError:
            raise SettingsError("LWAPI_KEY_PEPPER must be hexadecimal") from None
        if len(pepper) < PEPPER_BYTES_MIN:
            raise SettingsError(f"LWAPI_KEY_PEPPER must be at least {PEPPER_BYTES_MIN} bytes (hex digits × 2)")
        return pepper
    path = settings.data_dir / PEPPER_FILE
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return bytes.fromhex(Path(path).read_text().strip())


async def ensure_first_admin(runtime: Runtime) -> tuple[str, str | None] | None:
    """Create the first administrator when there is none: (e-mail, password to print once or None)."""
    follower = await runtime.start_projections()
    assert runtime.pool is not None
    async with runtime.pool.acquire() as conn:
        if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {SCHEMA}.users WHERE is_admin)"):
            return None
    settings, app = runtime.settings, runtime.accounting
    email = settings.admin_email or DEFAULT_ADMIN_EMAIL
    password: str | None = settings.admin_password or secrets.token_urlsafe(15)
    try:
        user = app.find_user_by_email(email)
    except UserNotFound:
        app.register_user(email, "Administrator", password_hash=hash_password(str(password)), is_admin=True)
    else:
        app.set_admin(SYSTEM, user.id, is_admin=True)
        if user.password_hash is None and password is not None:
            app.set_password_hash(user.id, hash_password(password))
        else:
            password = None  # an existing account keeps its password
    await follower.catch_up()
    return email, (None if settings.admin_password else password)
