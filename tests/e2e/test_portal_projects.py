"""Portal pages of a project over HTTP: home, keys, and who may do what (every role, others' objects, bad input)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from uuid import UUID

import httpx
import openai
import pytest

from adapters.passwords import hash_password
from domain.access import SYSTEM
from domain.api_key import KeySettings
from domain.project import Role
from tests.e2e.conftest import Stack
from tests.e2e.test_service import login

PASSWORD = "portal-password-1"


@dataclass
class People:
    creator: UUID  # the stack's researcher
    manager: UUID
    member: UUID
    outsider: UUID


def _person(stack: Stack, email: str, name: str) -> UUID:
    user_id = stack.app.register_user(email, name)
    stack.app.set_password_hash(user_id, hash_password(PASSWORD))
    return user_id


@pytest.fixture
def people(stack: Stack) -> People:
    stack.app.set_password_hash(stack.user_id, hash_password(PASSWORD))
    manager, member = _person(stack, "manager@uni.edu", "Manager"), _person(stack, "member@uni.edu", "Member")
    outsider = _person(stack, "outsider@uni.edu", "Outsider")
    stack.app.add_member(SYSTEM, stack.project_id, manager, Role.MANAGER)
    stack.app.add_member(SYSTEM, stack.project_id, member, Role.USER)
    other = stack.app.create_project(SYSTEM, "other", "Other Lab", outsider)
    stack.app.create_key(SYSTEM, other, outsider, KeySettings(name="outsider-key"))
    return People(stack.user_id, manager, member, outsider)


@pytest.fixture
def browser_of(stack: Stack, people: People) -> Iterator:  # type: ignore[type-arg]
    clients: list[httpx.Client] = []

    def open_as(email: str, language: str = "en") -> httpx.Client:
        client = httpx.Client(base_url=stack.base_url.removesuffix("/v1"), follow_redirects=False, timeout=30,
                              cookies={"lwapi_lang": language})
        clients.append(client)
        assert login(client, email, PASSWORD).status_code in (302, 303)
        return client
    yield open_as
    for client in clients:
        client.close()


def post(client: httpx.Client, path: str, data: dict[str, object]) -> httpx.Response:
    return client.post(path, data={**data, "_csrf_token": client.cookies.get("csrftoken") or ""})


def test_the_project_home_shows_balance_keys_and_models(stack: Stack, browser_of) -> None:  # type: ignore[no-untyped-def]
    creator = browser_of("researcher@uni.edu")
    projects = creator.get("/")
    assert "NLP Lab" in projects.text and 'href="/projects/nlp"' in projects.text
    home = creator.get("/projects/nlp")
    assert home.status_code == 200
    assert "10,000,000" in home.text and "<code>llama</code>" in home.text and "Creator" in home.text
    zh = browser_of("researcher@uni.edu", "zh-TW").get("/projects/nlp")
    assert "餘額" in zh.text and "建立者" in zh.text


def test_create_use_and_revoke_a_key_from_the_portal(stack: Stack, browser_of) -> None:  # type: ignore[no-untyped-def]
    member = browser_of("member@uni.edu")
    created = post(member, "/projects/nlp/keys", {"name": "notebook", "rpm_limit": "60", "tpm_limit": "",
                                                   "cap_credits": "5000", "models": "llama"})
    assert created.status_code == 201
    secret = re.search(r'id="new-secret" class="secret">(sk-lw-[^<]+)<', created.text).group(1)  # type: ignore[union-attr]
    assert "shown only this once" in created.text and f'api_key="{secret}"' in created.text
    assert secret not in member.get("/projects/nlp/keys").text  # never again
    api = openai.OpenAI(base_url=stack.base_url, api_key=secret, max_retries=0)
    assert api.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}]).choices
    keys = member.get("/projects/nlp/keys").text
    row = re.search(r'<tr data-key="notebook">.*?</tr>', keys, re.S).group(0)  # type: ignore[union-attr]
    assert "60 RPM" in row and "5,000" in row and "Active" in row
    key_id = re.search(r"/keys/([0-9a-f-]{36})/edit", row).group(1)  # type: ignore[union-attr]
    edited = post(member, f"/projects/nlp/keys/{key_id}/edit", {"name": "notebook-2", "rpm_limit": "120"})
    assert edited.status_code == 303 and "notebook-2" in member.get(edited.headers["location"]).text
    revoked = post(member, f"/projects/nlp/keys/{key_id}/revoke", {})
    assert revoked.status_code == 303
    page = member.get(revoked.headers["location"]).text
    assert "The key notebook-2 was revoked." in page and "Revoked" in page

    def refused() -> bool:
        try:
            api.models.list()
        except openai.AuthenticationError:
            return True
        return False
    deadline = __import__("time").monotonic() + 3
    while not refused():
        assert __import__("time").monotonic() < deadline


def test_what_each_role_may_do_with_keys(stack: Stack, people: People, browser_of) -> None:  # type: ignore[no-untyped-def]
    member_key, _ = stack.app.create_key(SYSTEM, stack.project_id, people.member, KeySettings(name="members-own"))
    creator_key = stack.key_id  # the creator's key "main"
    member, manager = browser_of("member@uni.edu"), browser_of("manager@uni.edu")
    assert "members-own" in member.get("/projects/nlp/keys").text
    assert "main" not in re.findall(r'data-key="([^"]+)"', member.get("/projects/nlp/keys").text)  # users: own only
    # a user cannot edit or revoke another member's key, even by id: it is not there for them
    assert post(member, f"/projects/nlp/keys/{creator_key}/revoke", {}).status_code == 404
    assert member.get(f"/projects/nlp/keys/{creator_key}/edit").status_code == 404
    # a manager manages every key of the project
    assert {"main", "members-own"} <= set(re.findall(r'data-key="([^"]+)"', manager.get("/projects/nlp/keys").text))
    assert post(manager, f"/projects/nlp/keys/{member_key}/revoke", {}).status_code == 303
    assert stack.app.get_key(member_key).revoked


def test_other_projects_and_their_keys_are_invisible(stack: Stack, people: People, browser_of) -> None:  # type: ignore[no-untyped-def]
    outsider = browser_of("outsider@uni.edu")
    assert outsider.get("/projects/nlp").status_code == 404
    assert outsider.get("/projects/nlp/keys").status_code == 404
    assert post(outsider, f"/projects/nlp/keys/{stack.key_id}/revoke", {}).status_code == 404
    assert post(outsider, "/projects/nlp/keys", {"name": "sneaky"}).status_code == 404
    creator = browser_of("researcher@uni.edu")
    other_key = next(k for k in re.findall(r"/keys/([0-9a-f-]{36})/edit", outsider.get("/projects/other/keys").text))
    assert post(creator, f"/projects/nlp/keys/{other_key}/revoke", {}).status_code == 404  # wrong project in the URL
    assert not stack.app.get_key(UUID(other_key)).revoked
    assert not stack.app.get_key(stack.key_id).revoked
    with httpx.Client(base_url=stack.base_url.removesuffix("/v1"), follow_redirects=False) as anonymous:
        assert anonymous.get("/projects/nlp").headers["location"] == "/login"


@pytest.mark.parametrize(("form", "message"), [
    ({"name": ""}, "key name"),
    ({"name": "x", "rpm_limit": "many"}, "requests per minute"),
    ({"name": "x", "rpm_limit": "0"}, "rpm"),
    ({"name": "x", "cap_credits": "-1"}, "usage cap"),
    ({"name": "x", "valid_from": "2030-01-02T00:00", "valid_until": "2030-01-01T00:00"}, "valid until must be after"),
    ({"name": "x", "valid_from": "yesterday"}, "not an ISO 8601 time"),
    ({"name": "x" * 600}, "at most"),
])
def test_bad_key_input_is_explained_and_nothing_is_saved(stack: Stack, browser_of, form: dict[str, str],  # type: ignore[no-untyped-def]
                                                         message: str) -> None:
    member = browser_of("member@uni.edu")
    before = len(stack.app.keys_of_project(SYSTEM, stack.project_id))
    refused = post(member, "/projects/nlp/keys", form)
    assert refused.status_code == 400 and message in refused.text and 'role="alert"' in refused.text
    assert len(stack.app.keys_of_project(SYSTEM, stack.project_id)) == before


def test_forms_without_a_csrf_token_are_refused(stack: Stack, browser_of) -> None:  # type: ignore[no-untyped-def]
    member = browser_of("member@uni.edu")
    assert member.post("/projects/nlp/keys", data={"name": "no-token"}).status_code == 403
    assert "no-token" not in member.get("/projects/nlp/keys").text
