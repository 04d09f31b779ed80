"""`lwapi key …`: API keys of a project (the secret is printed once, alone on stdout).

Imports: everything inward.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click

from domain.access import SYSTEM
from domain.api_key import KeySettings, key_status
from edge import queries
from edge.cli_support import emit, handles_errors, json_option, parse_time, parse_uuid, read, runtime, table


def key_options(fn: Any) -> Any:
    for option in reversed([
        click.option("--rpm", type=int, default=None, help="Requests per minute."),
        click.option("--tpm", type=int, default=None, help="Tokens per minute."),
        click.option("--cap", type=int, default=None, help="Usage cap in credits."),
        click.option("--valid-from", default=None, help="ISO 8601 time (UTC if no zone)."),
        click.option("--valid-until", default=None, help="ISO 8601 time (UTC if no zone)."),
        click.option("--models", default=None, help="Comma-separated allowed models (empty = all)."),
    ]):
        fn = option(fn)
    return fn


def _models(value: str | None) -> tuple[str, ...]:
    return tuple(m.strip() for m in value.split(",") if m.strip()) if value else ()


@click.group()
def key() -> None:
    """API keys."""


@key.command("create")
@click.argument("code")
@click.option("--owner", "owner_email", required=True)
@click.option("--name", required=True)
@key_options
@click.pass_context
@handles_errors
def key_create(ctx: click.Context, /, code: str, owner_email: str, name: str, **opts: Any) -> None:
    """Create a key; its secret is printed alone on stdout, once."""
    settings = KeySettings(name=name, rpm_limit=opts["rpm"], tpm_limit=opts["tpm"], cap_credits=opts["cap"],
                           valid_from=parse_time(opts["valid_from"], "--valid-from"),
                           valid_until=parse_time(opts["valid_until"], "--valid-until"),
                           allowed_models=_models(opts["models"]))
    with runtime(ctx) as rt:
        app = rt.accounting
        key_id, secret = app.create_key(SYSTEM, app.find_project_by_code(code).id,
                                        app.find_user_by_email(owner_email).id, settings)
    click.echo(f"key id: {key_id} (the secret below is shown only once)", err=True)
    click.echo(secret)


@key.command("list")
@click.argument("code")
@json_option
@click.pass_context
@handles_errors
def key_list(ctx: click.Context, code: str, as_json: bool) -> None:
    with runtime(ctx) as rt:
        rows = read(rt, queries.keys, rt.accounting.find_project_by_code(code).id)
    now = datetime.now(UTC)
    for r in rows:
        r["status"] = key_status(revoked=r["revoked_at"] is not None, valid_from=r["valid_from"],
                                 valid_until=r["valid_until"], cap_credits=r["cap_credits"],
                                 used_credits=r["used_credits"], now=now).value
    emit(rows, as_json, lambda rs: table(rs, ["key_id", "name", "display_prefix", "owner", "status", "rpm_limit",
                                              "tpm_limit", "cap_credits", "used_credits", "created_at"]))


@key.command("edit")
@click.argument("key_id")
@click.option("--name", default=None)
@key_options
@click.option("--no-rpm", is_flag=True, help="Remove the requests/min limit.")
@click.option("--no-tpm", is_flag=True, help="Remove the tokens/min limit.")
@click.option("--no-cap", is_flag=True, help="Remove the usage cap.")
@click.pass_context
@handles_errors
def key_edit(ctx: click.Context, /, key_id: str, name: str | None, **opts: Any) -> None:
    """Change the given settings; the others stay as they are."""
    with runtime(ctx) as rt:
        app = rt.accounting
        current = app.get_key(parse_uuid(key_id, "key")).settings
        settings = KeySettings(
            name=name if name is not None else current.name,
            rpm_limit=None if opts["no_rpm"] else (opts["rpm"] if opts["rpm"] is not None else current.rpm_limit),
            tpm_limit=None if opts["no_tpm"] else (opts["tpm"] if opts["tpm"] is not None else current.tpm_limit),
            cap_credits=None if opts["no_cap"] else (opts["cap"] if opts["cap"] is not None else current.cap_credits),
            valid_from=parse_time(opts["valid_from"], "--valid-from") if opts["valid_from"] else current.valid_from,
            valid_until=parse_time(opts["valid_until"], "--valid-until") if opts["valid_until"]
            else current.valid_until,
            allowed_models=_models(opts["models"]) if opts["models"] is not None else current.allowed_models,
        )
        app.edit_key(SYSTEM, parse_uuid(key_id, "key"), settings)
    click.echo(f"key {key_id} updated")


@key.command("revoke")
@click.argument("key_id")
@click.pass_context
@handles_errors
def key_revoke(ctx: click.Context, key_id: str) -> None:
    with runtime(ctx) as rt:
        rt.accounting.revoke_key(SYSTEM, parse_uuid(key_id, "key"))
    click.echo(f"key {key_id} revoked")
