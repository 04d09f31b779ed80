"""Plumbing shared by the `lwapi` commands: errors to exit codes, runtime, output formatting.

Imports: everything inward.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import wraps
from typing import Any, TypeVar
from uuid import UUID

import click

from adapters.database import DatabaseUrlError
from adapters.passwords import WeakPassword
from adapters.pg_embedded import EmbeddedPostgresError
from domain.errors import DomainError, InvalidValue
from domain.validation import label
from edge.runtime import Runtime
from edge.settings import SettingsError

F = TypeVar("F", bound=Callable[..., Any])
EXIT_REFUSED = 1
EXIT_SETUP = 2


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
        except OSError as e:
            _fail(f"cannot reach the database: {e}", EXIT_SETUP)
    return wrapper  # type: ignore[return-value]


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
