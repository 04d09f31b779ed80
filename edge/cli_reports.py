"""`lwapi report …`: billing reports from the ledger, as of a position of the event log.

Imports: everything inward. Reports go to stdout (or `--out`), as JSON, CSV or (statements) PDF.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import click

from edge import reports
from edge.cli_support import handles_errors, parse_uuid, read, runtime
from edge.portal.i18n import LANGUAGES, Translator

T = TypeVar("T")


def _read(ctx: click.Context, work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """Bring the read models up to date, then run `work` on their pool."""
    with runtime(ctx) as rt:
        result: T = read(rt, work)
        return result


def _write(data: bytes, out: Path | None) -> None:
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        out.write_bytes(data)
        click.echo(f"written to {out} ({len(data)} bytes)", err=True)


def period_options(fn: Any) -> Any:
    for option in reversed([
        click.option("--from", "first", default=None, help="First day, YYYY-MM-DD (default: 1st of the month)."),
        click.option("--to", "last", default=None, help="Last day, YYYY-MM-DD, included (default: today, UTC)."),
        click.option("--as-of", type=int, default=None,
                     help="Event-log position to report at (default: everything recorded); the same position "
                          "always gives the same report."),
        click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Write to this file instead of stdout."),
    ]):
        fn = option(fn)
    return fn


def pdf_labels(language: str) -> dict[str, str]:
    """The statement's words in `language`, from the portal's catalog."""
    t = Translator(language)
    return {key: t(f"statement.{key}") for key in reports.PDF_LABELS}


@click.group()
def report() -> None:
    """Billing reports: statements, the platform report, and the entries behind them."""


@report.command("statement")
@click.argument("code")
@period_options
@click.option("--format", "fmt", type=click.Choice(["json", "csv", "pdf"]), default="json", show_default=True)
@click.option("--language", type=click.Choice(LANGUAGES), default="zh-TW", show_default=True,
              help="Language of a PDF statement.")
@click.pass_context
@handles_errors
def statement(ctx: click.Context, code: str, first: str | None, last: str | None, as_of: int | None,
              out: Path | None, fmt: str, language: str) -> None:
    """A project's statement: balances, grants and corrections, charges by day, model and key."""
    period = reports.Period.parse(first, last)
    s = _read(ctx, lambda pool: reports.statement(pool, code, period, as_of))
    if fmt == "pdf":
        # imported here: the service imports this module, and fpdf2 brings fontTools, numpy and Pillow
        from adapters.statement_pdf import StatementFontMissing, render_statement_pdf  # noqa: PLC0415

        try:
            data = render_statement_pdf(s, pdf_labels(language), language=language)
        except StatementFontMissing as e:
            raise click.ClickException(str(e)) from None
    else:
        data = reports.to_json(s) if fmt == "json" else reports.statement_csv(s)
    _write(data, out)


@report.command("platform")
@period_options
@click.option("--format", "fmt", type=click.Choice(["json", "csv"]), default="json", show_default=True)
@click.pass_context
@handles_errors
def platform(ctx: click.Context, first: str | None, last: str | None, as_of: int | None, out: Path | None,
             fmt: str) -> None:
    """Every project's usage and balance for a period, by model and deployment."""
    period = reports.Period.parse(first, last)
    r = _read(ctx, lambda pool: reports.platform_report(pool, period, as_of))
    _write(reports.to_json(r) if fmt == "json" else reports.platform_csv(r), out)


@report.command("entries")
@click.argument("code")
@period_options
@click.option("--model", default=None, help="Only this model.")
@click.option("--key", "key_id", default=None, help="Only this key (its id).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="csv", show_default=True)
@click.pass_context
@handles_errors
def entries(ctx: click.Context, code: str, first: str | None, last: str | None, as_of: int | None,
            out: Path | None, model: str | None, key_id: str | None, fmt: str) -> None:
    """The usage entries behind a statement's figures: request id, key, model, tokens, prices, cost, event."""
    period = reports.Period.parse(first, last)
    key = parse_uuid(key_id, "key") if key_id else None

    async def collect(pool: asyncpg.Pool) -> bytes:
        line = reports.entry_csv if fmt == "csv" else reports.entry_jsonl
        chunks = [reports.entries_csv_header()] if fmt == "csv" else []
        chunks.extend([line(e) async for e in reports.entries(pool, code, period, as_of, model=model, key_id=key)])
        return b"".join(chunks)
    _write(_read(ctx, collect), out)
