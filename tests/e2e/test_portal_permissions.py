"""Every role × every portal action over HTTP: what a role may not do is refused (403 / 404), never done.

Roles: the project's creator, a manager, a user, a member of another project only (outsider), a platform
administrator who is not a member, and nobody logged in. Actions address this project's objects by id,
so refusals cannot hide behind hidden buttons.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from uuid import UUID

import httpx
import psycopg
import pytest

from adapters.passwords import hash_password
from domain.access import SYSTEM
from domain.api_key import KeySettings
from domain.project import Role
from tests.e2e.conftest import Stack
from tests.e2e.test_service import login

PASSWORD = "matrix-password-1"
EMAILS = {"creator": "researcher@uni.edu", "manager": "manager@uni.edu", "user": "member@uni.edu",
          "outsider": "outsider@uni.edu", "admin": "ops@uni.edu"}


@dataclass
class World:
    ids: dict[str, UUID]
    keys: dict[str, UUID]  # the key of each member, by role


@pytest.fixture
def world(stack: Stack) -> World:
    stack.app.set_password_hash(stack.user_id, hash_password(PASSWORD))
    ids = {"creator": stack.user_id}
    for role, email in EMAILS.items():
        if role not in ("creator", "admin"):
            ids[role] = stack.app.register_user(email, role.title())
            stack.app.set_password_hash(ids[role], hash_password(PASSWORD))
    stack.app.add_member(SYSTEM, stack.project_id, ids["manager"], Role.MANAGER)
    stack.app.add_member(SYSTEM, stack.project_id, ids["user"], Role.USER)
    stack.app.create_project(SYSTEM, "elsewhere", "Elsewhere", ids["outsider"])
    keys = {role: stack.app.create_key(SYSTEM, stack.project_id, ids[role], KeySettings(name=f"{role}-key"))[0]
            for role in ("creator", "manager", "user")}
    return World(ids, keys)


@pytest.fixture
def as_role(stack: Stack, world: World) -> Iterator[Callable[[str], httpx.Client]]:
    clients: list[httpx.Client] = []

    def open_as(role: str) -> httpx.Client:
        client = httpx.Client(base_url=stack.base_url.removesuffix("/v1"), follow_redirects=False, timeout=30,
                              cookies={"lwapi_lang": "en"})
        clients.append(client)
        if role != "anonymous":
            password = "admin-password-1" if role == "admin" else PASSWORD
            assert login(client, EMAILS[role], password).status_code in (302, 303)
        return client
    yield open_as
    for client in clients:
        client.close()


def projected(database_url: str, key_id: UUID, member: UUID, timeout_s: float = 5.0) -> None:
    """Wait until the read models show the objects just made (the portal reads them)."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(database_url, autocommit=True) as conn:
        while not (conn.execute("SELECT 1 FROM lwapi_read.api_keys WHERE key_id = %s", (key_id,)).fetchone()
                   and conn.execute("SELECT 1 FROM lwapi_read.memberships WHERE user_id = %s", (member,)).fetchone()):
            assert time.monotonic() < deadline, "the read models did not catch up"
            time.sleep(0.02)


def send(client: httpx.Client, method: str, path: str, form: dict[str, str] | None = None) -> int:
    if method == "GET":
        return client.get(path).status_code
    return client.post(path, data={**(form or {}), "_csrf_token": client.cookies.get("csrftoken") or ""}).status_code


OK, REDIRECT, FORBIDDEN, MISSING, LOGIN = 200, 303, 403, 404, 302
ROLES = ("creator", "manager", "user", "outsider", "admin", "anonymous")
# action: (method, path template, form template, expected status per role in ROLES order)
ACTIONS: dict[str, tuple[str, str, dict[str, str], tuple[int, ...]]] = {
    "see the project": ("GET", "/projects/nlp", {}, (OK, OK, OK, MISSING, OK, LOGIN)),
    "see the keys": ("GET", "/projects/nlp/keys", {}, (OK, OK, OK, MISSING, OK, LOGIN)),
    "see the usage": ("GET", "/projects/nlp/usage", {}, (OK, OK, OK, MISSING, OK, LOGIN)),
    "see the members": ("GET", "/projects/nlp/members", {}, (OK, OK, OK, MISSING, OK, LOGIN)),
    "create a key": ("POST", "/projects/nlp/keys", {"name": "k"}, (201, 201, 201, MISSING, FORBIDDEN, LOGIN)),
    "edit the creator's key": ("POST", "/projects/nlp/keys/{creator_key}/edit", {"name": "renamed"},
                               (REDIRECT, REDIRECT, FORBIDDEN, MISSING, REDIRECT, LOGIN)),
    "revoke the manager's key": ("POST", "/projects/nlp/keys/{manager_key}/revoke", {},
                                 (REDIRECT, REDIRECT, FORBIDDEN, MISSING, REDIRECT, LOGIN)),
    "add a user": ("POST", "/projects/nlp/members", {"email": "fresh@uni.edu"},
                   (REDIRECT, REDIRECT, FORBIDDEN, MISSING, REDIRECT, LOGIN)),
    "add a manager": ("POST", "/projects/nlp/members", {"email": "boss@uni.edu", "role": "manager"},
                      (REDIRECT, FORBIDDEN, FORBIDDEN, MISSING, REDIRECT, LOGIN)),
    "appoint a manager": ("POST", "/projects/nlp/members/role", {"user_id": "{user}", "role": "manager"},
                          (REDIRECT, FORBIDDEN, FORBIDDEN, MISSING, REDIRECT, LOGIN)),
    "remove the manager": ("POST", "/projects/nlp/members/remove", {"user_id": "{manager}"},
                           (REDIRECT, FORBIDDEN, FORBIDDEN, MISSING, REDIRECT, LOGIN)),
    "see all projects": ("GET", "/admin/projects", {}, (FORBIDDEN,) * 4 + (OK, LOGIN)),
    "grant credits": ("POST", "/admin/projects/credits", {"project_id": "{project}", "amount": "5", "reason": "r"},
                      (FORBIDDEN,) * 4 + (REDIRECT, LOGIN)),
    "see the catalog": ("GET", "/admin/models", {}, (FORBIDDEN,) * 4 + (OK, LOGIN)),
}


@pytest.mark.parametrize("action", ACTIONS)
def test_each_role_may_do_exactly_what_its_role_allows(stack: Stack, world: World, as_role, action: str,  # type: ignore[no-untyped-def]
                                                       database_url: str) -> None:
    method, path, form, expected = ACTIONS[action]
    clients = {role: as_role(role) for role in ROLES}
    for n, role in enumerate(ROLES):
        # fresh objects for every role, so that what one role did cannot change what the next one meets
        manager = stack.app.register_user(f"manager{n}@uni.edu", f"Manager {n}")
        user = stack.app.register_user(f"user{n}@uni.edu", f"User {n}")
        stack.app.add_member(SYSTEM, stack.project_id, manager, Role.MANAGER)
        stack.app.add_member(SYSTEM, stack.project_id, user, Role.USER)
        manager_key = stack.app.create_key(SYSTEM, stack.project_id, manager, KeySettings(name=f"m{n}"))[0]
        projected(database_url, manager_key, user)
        values = {"creator_key": str(world.keys["creator"]), "manager_key": str(manager_key), "user": str(user),
                  "manager": str(manager), "project": str(stack.project_id)}
        filled = {k: v.format(**values) for k, v in form.items()}
        if "email" in filled:
            filled["email"] = f"{n}.{filled['email']}"
        if "name" in filled:
            filled["name"] = f"{filled['name']}-{role}"
        granted_before = stack.app.get_project(stack.project_id).granted_credits
        status = send(clients[role], method, path.format(**values), filled)
        wanted = expected[ROLES.index(role)]
        if role == "anonymous" and method == "POST":
            wanted = FORBIDDEN  # a visitor without a session has no CSRF token either: refused before anything
        assert status == wanted, f"{role} / {action}: {status}, expected {wanted}"
        if wanted in (FORBIDDEN, MISSING, LOGIN):  # refused: nothing changed
            project = stack.app.get_project(stack.project_id)
            assert stack.app.get_key(world.keys["creator"]).settings.name != filled.get("name")
            assert not stack.app.get_key(manager_key).revoked
            assert project.role_of(manager) is Role.MANAGER and project.role_of(user) is Role.USER
            assert project.granted_credits == granted_before
            if "email" in filled:
                with pytest.raises(Exception, match="no user"):
                    stack.app.find_user_by_email(filled["email"])
