"""Who may do what in a project: pure rules over roles, shared by every entrypoint.

Imports: stdlib, domain. Platform administrators may do everything; otherwise the creator appoints
and demotes managers and hands the role over, managers manage users and every key, and users see
the project and manage their own keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from domain.errors import PermissionDenied
from domain.project import Role


@dataclass(frozen=True)
class Actor:
    """Who issues a command. The CLI acts as `SYSTEM` (it holds the database's credentials)."""

    user_id: UUID | None
    is_admin: bool

    @property
    def label(self) -> str:
        return "system" if self.user_id is None else str(self.user_id)


SYSTEM = Actor(user_id=None, is_admin=True)


def _deny(message: str) -> PermissionDenied:
    return PermissionDenied(message)


def require_admin(actor: Actor) -> None:
    if not actor.is_admin:
        raise _deny("only a platform administrator may do this")


def require_member(actor: Actor, role: Role | None) -> None:
    if not actor.is_admin and role is None:
        raise _deny("not a member of this project")


def require_member_management(actor: Actor, actor_role: Role | None, target_role: Role) -> None:
    """Managers add/remove users; only the creator (or an admin) touches managers."""
    if actor.is_admin or actor_role is Role.CREATOR:
        return
    if actor_role is Role.MANAGER and target_role is Role.USER:
        return
    raise _deny("your role in this project does not allow managing this member")


def require_creator(actor: Actor, actor_role: Role | None) -> None:
    if not (actor.is_admin or actor_role is Role.CREATOR):
        raise _deny("only the project's creator may do this")


def require_key_management(actor: Actor, actor_role: Role | None, owner_id: UUID) -> None:
    """Managers and the creator manage every key; a user only their own."""
    if actor.is_admin or actor_role in (Role.CREATOR, Role.MANAGER):
        return
    if actor_role is Role.USER and actor.user_id == owner_id:
        return
    raise _deny("you may manage only your own keys in this project")
