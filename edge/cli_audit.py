"""`lwapi audit …`: prove the event log was not altered (`verify`, `head`) and that the read models
agree with it (`reconcile`).

Imports: everything inward. `verify` exits 0 when the whole log matches its chain (and every exported
head given), 3 when it does not, naming the first position affected.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import click

from adapters.audit_log import chain_head, verify_log
from adapters.audit_signing import HeadInvalid, export_head, fingerprint, load_or_create_key, read_head
from adapters.database import create_pool
from domain.audit import Head
from edge.cli_support import handles_errors, json_option, read, runtime
from projections.reconcile import Reconciliation, reconcile

T = TypeVar("T")
EXIT_ALTERED = 3
EXIT_DIFFERS = 4


def _with_pool(ctx: click.Context, work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    with runtime(ctx) as rt:
        async def go() -> T:
            pool = await create_pool(rt.database.dsn, size_max=2, timeout_s=rt.settings.db_timeout_s)
            try:
                return await work(pool)
            finally:
                await pool.close()
        return asyncio.run(go())


@click.group()
def audit() -> None:
    """Tamper evidence and reconciliation of the event log."""


@audit.command("verify")
@click.option("--head", "head_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A head exported earlier (lwapi audit head): the log must still match it. Repeatable.")
@click.option("--trusted-key", default=None, help="Fingerprint of the key the heads must be signed with.")
@json_option
@click.pass_context
@handles_errors
def verify(ctx: click.Context, head_files: tuple[Path, ...], trusted_key: str | None, as_json: bool) -> None:
    """Recompute the chain over every stored event; name the first one edited, removed, inserted or moved."""
    try:
        heads = tuple(read_head(p.read_text(encoding="utf-8"), trusted_fingerprint=trusted_key) for p in head_files)
    except (HeadInvalid, UnicodeDecodeError) as e:
        raise click.UsageError(str(e)) from None
    result = _with_pool(ctx, lambda pool: verify_log(pool, heads))
    report: dict[str, Any] = {
        "ok": result.problem is None, "events_checked": result.events, "bytes_checked": result.state_bytes,
        "head": {"position": result.head.position, "digest": result.head.digest.hex()},
        "heads_matched": [h.position for h in heads] if result.problem is None else [],
        "seconds": round(result.elapsed_s, 3),
        "problem": None if result.problem is None else {
            "position": result.problem.position, "kind": result.problem.kind, "detail": result.problem.detail},
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif result.problem is None:
        matched = f"; matches {len(heads)} exported head(s)" if heads else ""
        click.echo(f"ok: {result.events} events chained up to position {result.head.position} "
                   f"(digest {result.head.digest.hex()}){matched}, in {result.elapsed_s:.2f} s")
    else:
        click.echo(f"ALTERED at position {result.problem.position} ({result.problem.kind}): {result.problem.detail}; "
                   f"{result.events} events before it are intact", err=True)
    if result.problem is not None:
        sys.exit(EXIT_ALTERED)


@audit.command("head")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the signed export here (default: print it).")
@click.pass_context
@handles_errors
def head(ctx: click.Context, out: Path | None) -> None:
    """Export the chain head, signed with the service's audit key, for an auditor to keep."""
    try:
        key = load_or_create_key(ctx.obj.audit_key_path)
    except HeadInvalid as e:
        raise click.ClickException(str(e)) from None
    current: Head = _with_pool(ctx, chain_head)
    text = json.dumps(export_head(current, key, datetime.now(UTC).replace(microsecond=0)), indent=2) + "\n"
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
        public = key.public_key().public_bytes_raw()
        click.echo(f"head at position {current.position} written to {out}; signing key {fingerprint(public)}")


@audit.command("reconcile")
@json_option
@click.pass_context
@handles_errors
def reconcile_command(ctx: click.Context, as_json: bool) -> None:
    """Check every balance, key total, rollup and ledger row against the event log; report any difference."""
    with runtime(ctx) as rt:
        result: Reconciliation = read(rt, reconcile)
    if as_json:
        click.echo(json.dumps({"ok": result.ok, "position": result.position, "projects": result.projects,
                               "usage_entries": result.usage_entries, "differences": result.differences,
                               "seconds": round(result.elapsed_s, 3)}, indent=2))
    elif result.ok:
        click.echo(f"ok: {result.projects} projects and {result.usage_entries} usage entries agree with the log "
                   f"up to position {result.position}, in {result.elapsed_s:.2f} s")
    else:
        for d in result.differences:
            click.echo(f"DIFFERS {d['check']} {d['key']} {d['field']}: log {d['log']}, read model {d['read_model']}",
                       err=True)
    if not result.ok:
        sys.exit(EXIT_DIFFERS)
