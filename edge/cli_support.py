"""Plumbing shared by the `lwapi` commands: errors to exit codes, runtime, output formatting.

Imports: everything inward.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import wraps
from typing import IO, Any, TypeVar
from uuid import UUID

import asyncpg
import click
import psycopg
from eventsourcing.persistence import InterfaceError as StoreInterfaceError
from eventsourcing.persistence import OperationalError as StoreOperationalError
from psycopg_pool import PoolTimeout

from adapters.database import DatabaseUrlError, eventstore_env
from adapters.passwords import WeakPassword
from adapters.pg_embedded import EmbeddedPostgresError
from domain.errors import DomainError, InvalidValue
from domain.validation import label
from edge.runtime import Runtime
from edge.settings import Settings, SettingsError

F = TypeVar("F", bound=Callable[..., Any])
EXIT_REFUSED = 1
EXIT_SETUP = 2
PROBE_TIMEOUT_S = 5

# A server that is down, refuses us, or lacks the user or database, as each client library reports
# it: eventsourcing wraps psycopg's errors, asyncpg raises OSError subclasses or its own.
UNREACHABLE: tuple[type[BaseException], ...] = (
    StoreOperationalError, StoreInterfaceError, psycopg.OperationalError, psycopg.InterfaceError,
    asyncpg.PostgresConnectionError, asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError, asyncpg.CannotConnectNowError, OSError,
)


def _fail(message: str, code: int = EXIT_REFUSED) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handles_errors(fn: F) -> F:
    """Turn refusals and set-up problems into one line on stderr and a non-zero exit."""
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DomainError as e:
            _fail(str(e))
        except WeakPassword as e:
            _fail(str(e))
        except (SettingsError, DatabaseUrlError, EmbeddedPostgresError) as e:
            _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, EXIT_SETUP)
        except UNREACHABLE as e:
            _fail(_unreachable(e), EXIT_SETUP)
    return wrapper  # type: ignore[return-value]


def _unreachable(error: BaseException) -> str:
    """`cannot reach the database at host:port/db: why`, on one line and without the password."""
    ctx = click.get_current_context(silent=True)
    settings = ctx.find_root().obj if ctx is not None else None
    url = settings.database_url if isinstance(settings, Settings) else None
    reason = str(error) or type(error).__name__
    if url is None:  # the embedded server: its socket says nothing worth adding
        return _one_line(f"cannot reach the database: {reason}")
    env = eventstore_env(url)
    if isinstance(error.__cause__ or error, PoolTimeout):
        reason = _probe(url) or reason
    where = f"{env['POSTGRES_HOST']}:{env['POSTGRES_PORT']}/{env['POSTGRES_DBNAME']}"
    return _one_line(_masked(f"cannot reach the database at {where}: {reason}", env["POSTGRES_PASSWORD"]))


def _probe(url: str) -> str | None:
    """psycopg's pool reports only that it timed out; one direct attempt says why (refused, bad password...)."""
    try:
        psycopg.connect(url, connect_timeout=PROBE_TIMEOUT_S).close()
    except psycopg.Error as e:
        return str(e)
    return None


def _masked(text: str, password: str) -> str:
    """Hide the password, should a client library quote the URL or the password itself."""
    text = re.sub(r"(://[^:/@\s]*):[^@\s]*@", r"\1:***@", text)
    return text.replace(password, "***") if password else text


def _one_line(text: str) -> str:
    return " ".join(text.split())


class OneLineError(click.ClickException):
    """A click error shown as one `error:` line instead of click's usage block."""

    def __init__(self, error: click.ClickException) -> None:
        message = error.format_message().strip().removesuffix(".")
        if message[1:2].islower():  # a sentence, like this CLI's other errors; not e.g. 'AMOUNT ...'
            message = message[:1].lower() + message[1:]
        ctx = error.ctx if isinstance(error, click.UsageError) else None
        super().__init__(_one_line(f"{ctx.command_path}: {message}" if ctx is not None else message))
        self.exit_code = EXIT_SETUP if isinstance(error, click.UsageError) else error.exit_code  # type: ignore[misc]

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.message}", err=True)


class OneLineErrorGroup(click.Group):
    """The top-level group: every click error below it (parsing, bad values, UsageError raised by a
    command) becomes one `error:` line; usage errors exit with 2. Help, asked or implied, stays as is."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        with _one_line_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_errors():
            return super().invoke(ctx)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except (click.exceptions.NoArgsIsHelpError, OneLineError):
        raise
    except click.ClickException as e:
        raise OneLineError(e) from e


@contextmanager
def runtime(ctx: click.Context) -> Iterator[Runtime]:
    rt = Runtime.open(ctx.obj)
    try:
        yield rt
    finally:
        asyncio.run(rt.aclose()) if rt.pool is not None else None
        rt.close()


def read(rt: Runtime, query: Callable[..., Any], *args: Any) -> Any:
    """Bring the read models up to date, then run `query(pool, *args)`."""
    async def go() -> Any:
        await rt.start_projections()
        assert rt.pool is not None
        try:
            return await query(rt.pool, *args)
        finally:
            await rt.aclose()
    return asyncio.run(go())


def emit(data: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    click.echo(json.dumps(data, default=str, indent=2, ensure_ascii=False) if as_json else render(data))


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def parse_time(value: str | None, field: str) -> datetime | None:
    """ISO 8601; a time without a zone is taken as UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidValue(f"{label(field)}: not an ISO 8601 time: {value[:60]!r}", rule="time", field=field) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_uuid(value: str, what: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise InvalidValue(f"not a {what} id: {value[:60]!r}", rule="id", value=value[:60]) from None


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
