"""`lwapi`: administration without the portal, scriptable (`--json` on every list/show).

Imports: everything inward. Each command builds a `Runtime` (which starts the embedded PostgreSQL
server when no service is running, and stops it after), calls one Application use case as the
system actor, and reads read models after bringing them up to date. Errors are one line on stderr
with a non-zero exit; nothing is half-written because each use case saves in one transaction.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from adapters.passwords import hash_password
from domain.access import SYSTEM
from domain.errors import InvalidValue
from domain.project import Role
from edge import queries
from edge.cli_audit import audit
from edge.cli_catalog import model
from edge.cli_keys import key
from edge.cli_reports import report
from edge.cli_support import (
    EXIT_SETUP,
    OneLineErrorGroup,
    emit,
    handles_errors,
    json_option,
    read,
    runtime,
    table,
)
from edge.settings import Settings, SettingsError


@click.group(cls=OneLineErrorGroup)
@click.option("--data-dir", type=click.Path(path_type=Path), envvar="LWAPI_DATA_DIR", default=None,
              help="Local data folder of the embedded PostgreSQL (default .lwapi).")
@click.pass_context
def main(ctx: click.Context, data_dir: Path | None) -> None:
    """Lightweight-API administration."""
    try:
        ctx.obj = Settings.from_env().with_overrides(data_dir=data_dir)
    except SettingsError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_SETUP)


# ---- db ------------------------------------------------------------------------------------

@main.group()
def db() -> None:
    """Database schema."""


@db.command("init")
@click.pass_context
@handles_errors
def db_init(ctx: click.Context) -> None:
    """Create the event store and the read models (idempotent)."""
    with runtime(ctx) as rt:
        position = read(rt, _positions)
        click.echo(f"database ready; read models at position {min(position.values(), default=0)}")


async def _positions(pool: Any) -> dict[str, int]:
    from projections.follower import Follower  # noqa: PLC0415 - only this command needs it directly
    return await Follower(pool).positions()


@db.command("check")
@json_option
@click.pass_context
@handles_errors
def db_check(ctx: click.Context, as_json: bool) -> None:
    """Check the connection, the append-only guard, the hash chain trigger and the read models' lag."""
    with runtime(ctx) as rt:
        report = read(rt, queries.health)
    emit(report, as_json, lambda r: "\n".join(f"{k}: {v}" for k, v in r.items()))
    if not (report["append_only_guard"] and report["hash_chain"]):
        sys.exit(1)


# ---- users ---------------------------------------------------------------------------------

@main.group()
def user() -> None:
    """People who log in."""


@user.command("add")
@click.argument("email")
@click.option("--name", required=True, help="Display name.")
@click.option("--admin", is_flag=True, help="Make a platform administrator.")
@click.option("--password-stdin", is_flag=True, help="Read a local-account password from stdin.")
@click.pass_context
@handles_errors
def user_add(ctx: click.Context, email: str, name: str, admin: bool, password_stdin: bool) -> None:
    password_hash = None
    if password_stdin:
        password_hash = hash_password(sys.stdin.readline().rstrip("\r\n"))
    with runtime(ctx) as rt:
        user_id = rt.accounting.register_user(email, name, password_hash=password_hash, is_admin=admin)
    click.echo(str(user_id))


@user.command("list")
@json_option
@click.pass_context
@handles_errors
def user_list(ctx: click.Context, as_json: bool) -> None:
    with runtime(ctx) as rt:
        rows = read(rt, queries.users)
    emit(rows, as_json, lambda r: table(r, ["email", "display_name", "is_admin", "has_password", "user_id"]))


# ---- projects ------------------------------------------------------------------------------

@main.group()
def project() -> None:
    """Research projects and their balances."""


@project.command("create")
@click.argument("code")
@click.option("--name", required=True)
@click.option("--creator", "creator_email", required=True, help="E-mail of the creator (an existing user).")
@click.pass_context
@handles_errors
def project_create(ctx: click.Context, code: str, name: str, creator_email: str) -> None:
    with runtime(ctx) as rt:
        creator = rt.accounting.find_user_by_email(creator_email)
        project_id = rt.accounting.create_project(SYSTEM, code, name, creator.id)
    click.echo(str(project_id))


@project.command("show")
@click.argument("code")
@json_option
@click.pass_context
@handles_errors
def project_show(ctx: click.Context, code: str, as_json: bool) -> None:
    with runtime(ctx) as rt:
        project_id = rt.accounting.find_project_by_code(code).id
        data = read(rt, queries.project, project_id)
        data["members"] = read(rt, queries.members, project_id)
    emit(data, as_json, _render_project)


def _render_project(p: dict[str, Any]) -> str:
    lines = [f"{p['code']}  {p['name']}{'  (archived)' if p['archived'] else ''}",
             f"granted:   {p['granted_credits'] + p['corrections_credits']}"
             f"  (grants {p['granted_credits']}, corrections {p['corrections_credits']})",
             f"used:      {p['charged_credits']}  ({p['requests']} requests)",
             f"remaining: {p['remaining_credits']}", "members:"]
    lines += [f"  {m['role']:<8} {m['email']}  {m['display_name']}" for m in p["members"]]
    return "\n".join(lines)


@project.command("list")
@json_option
@click.pass_context
@handles_errors
def project_list(ctx: click.Context, as_json: bool) -> None:
    with runtime(ctx) as rt:
        rows = read(rt, queries.projects)
    emit(rows, as_json, lambda r: table(r, ["code", "name", "archived", "granted_credits", "charged_credits",
                                            "remaining_credits"]))


# ---- credits -------------------------------------------------------------------------------

@main.group()
def credits() -> None:
    """Grants and corrections (smallest credit unit, integers)."""


NUMBER_ARGS = {"ignore_unknown_options": True}  # so that "-500" is an amount, not an option


@credits.command("grant", context_settings=NUMBER_ARGS)
@click.argument("code")
@click.argument("amount", type=int)
@click.option("--reason", required=True)
@click.pass_context
@handles_errors
def credits_grant(ctx: click.Context, code: str, amount: int, reason: str) -> None:
    """A positive grant."""
    _adjust_credits(ctx, code, amount, reason, correction=False)


@credits.command("correct", context_settings=NUMBER_ARGS)
@click.argument("code")
@click.argument("amount", type=int)
@click.option("--reason", required=True)
@click.pass_context
@handles_errors
def credits_correct(ctx: click.Context, code: str, amount: int, reason: str) -> None:
    """A signed correction: positive refunds, negative charges."""
    _adjust_credits(ctx, code, amount, reason, correction=True)


def _adjust_credits(ctx: click.Context, code: str, amount: int, reason: str, *, correction: bool) -> None:
    with runtime(ctx) as rt:
        app = rt.accounting
        adjust = app.correct_credits if correction else app.grant_credits
        adjust(SYSTEM, app.find_project_by_code(code).id, amount, reason)
    click.echo(f"{'corrected' if correction else 'granted'} {amount} {'on' if correction else 'to'} {code}")


# ---- members -------------------------------------------------------------------------------

ROLE_CHOICE = click.Choice(["manager", "user"])


@main.group()
def member() -> None:
    """Project members and roles."""


@member.command("add")
@click.argument("code")
@click.argument("email")
@click.option("--role", type=ROLE_CHOICE, default="user", show_default=True)
@click.pass_context
@handles_errors
def member_add(ctx: click.Context, code: str, email: str, role: str) -> None:
    with runtime(ctx) as rt:
        app = rt.accounting
        app.add_member(SYSTEM, app.find_project_by_code(code).id, app.find_user_by_email(email).id, Role(role))
    click.echo(f"{email} is now a {role} of {code}")


@member.command("remove")
@click.argument("code")
@click.argument("email")
@click.pass_context
@handles_errors
def member_remove(ctx: click.Context, code: str, email: str) -> None:
    """Remove a member; their keys in the project are revoked."""
    with runtime(ctx) as rt:
        app = rt.accounting
        app.remove_member(SYSTEM, app.find_project_by_code(code).id, app.find_user_by_email(email).id)
    click.echo(f"{email} removed from {code}")


@member.command("role")
@click.argument("code")
@click.argument("email")
@click.option("--role", type=click.Choice(["creator", "manager", "user"]), required=True,
              help="'creator' hands the creator role over (the old creator becomes a manager).")
@click.pass_context
@handles_errors
def member_role(ctx: click.Context, code: str, email: str, role: str) -> None:
    with runtime(ctx) as rt:
        app = rt.accounting
        project_id, user_id = app.find_project_by_code(code).id, app.find_user_by_email(email).id
        if role == "creator":
            app.hand_over_creator(SYSTEM, project_id, user_id)
        else:
            app.change_role(SYSTEM, project_id, user_id, Role(role))
    click.echo(f"{email} is now the {role} of {code}" if role == "creator" else f"{email} is now a {role}")


# ---- projections ---------------------------------------------------------------------------

@main.group()
def projections() -> None:
    """Read models fed from the event log."""


@projections.command("status")
@json_option
@click.pass_context
@handles_errors
def projections_status(ctx: click.Context, as_json: bool) -> None:
    with runtime(ctx) as rt:
        report = read(rt, queries.projection_status)
    emit(report, as_json, lambda r: table(r, ["projection", "position", "head", "lag_events", "set_aside_events"]))


@projections.command("set-aside")
@json_option
@click.pass_context
@handles_errors
def projections_set_aside(ctx: click.Context, as_json: bool) -> None:
    """Events a read model could not apply and skipped; fix the cause, then `projections rebuild`."""
    with runtime(ctx) as rt:
        report = read(rt, queries.set_aside_events)
    emit(report, as_json, lambda r: table(r, ["position", "projection", "topic", "error", "at"]))


@projections.command("rebuild")
@click.pass_context
@handles_errors
def projections_rebuild(ctx: click.Context) -> None:
    """Recompute every read model from the log (readers keep the old tables until it commits)."""
    with runtime(ctx) as rt:
        result = read(rt, queries.rebuild)
    click.echo(f"rebuilt {result['projections']} read models from {result['events']} events "
               f"({result['usage_entries']} usage entries) in {result['seconds']:.2f} s")


# ---- serve ---------------------------------------------------------------------------------

@main.command("serve")
@click.option("--port", type=int, default=None, help="Port (default 8080, or LWAPI_PORT).")
@click.option("--host", default=None, help="Address (default 127.0.0.1, or LWAPI_HOST).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Same as lwapi --data-dir.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Worker processes (more than one needs LWAPI_REDIS_URL).")
@click.pass_context
@handles_errors
def serve(ctx: click.Context, port: int | None, host: str | None, data_dir: Path | None, workers: int) -> None:
    """Run the service (portal + /v1) until interrupted."""
    if port is not None and not 1 <= port <= 65535:
        raise InvalidValue("--port must be between 1 and 65535")
    from edge.server import run  # noqa: PLC0415 - the web stack loads only for this command
    run(ctx.obj.with_overrides(port=port, host=host, data_dir=data_dir), workers=workers)


main.add_command(model)
main.add_command(key)
main.add_command(audit)
main.add_command(report)


if __name__ == "__main__":
    main(prog_name="lwapi")  # as the installed script names itself, not "python -m edge.cli"
