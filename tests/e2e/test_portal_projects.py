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
    # a user neither sees nor may edit or revoke another member's key, even by id
    assert post(member, f"/projects/nlp/keys/{creator_key}/revoke", {}).status_code == 403
    assert post(member, f"/projects/nlp/keys/{creator_key}/edit", {"name": "mine-now"}).status_code == 403
    assert member.get(f"/projects/nlp/keys/{creator_key}/edit").status_code == 403
    assert stack.app.get_key(creator_key).settings.name == "main" and not stack.app.get_key(creator_key).revoked
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


@pytest.mark.parametrize(("form", "english", "chinese"), [
    ({"name": ""}, "Key name must not be empty.", "金鑰名稱不可為空白。"),
    ({"name": "x", "rpm_limit": "many"}, "Requests per minute must be a whole number, or empty for no limit.",
     "每分鐘請求數必須是整數，或留空表示不限制。"),
    ({"name": "x", "rpm_limit": "0"}, "Requests per minute must be between 1 and 1,000,000,000.",
     "每分鐘請求數必須介於 1 與 1,000,000,000 之間。"),
    ({"name": "x", "cap_credits": "-1"}, "Usage cap must be between 0 and 1,000,000,000,000,000.",
     "用量上限必須介於 0 與 1,000,000,000,000,000 之間。"),
    ({"name": "x", "valid_from": "2030-01-02T00:00", "valid_until": "2030-01-01T00:00"},
     "“Valid until” must be later than “valid from”.", "「失效時間」必須晚於「生效時間」。"),
    ({"name": "x", "valid_from": "yesterday"}, "Valid from must be a date and time", "生效時間必須是日期與時間"),
    ({"name": "x" * 600}, "must be at most", "最多"),
    ({"name": "x", "models": "no-such-model"}, "no-such-model", "no-such-model"),
])
def test_bad_key_input_is_explained_in_the_persons_language_and_nothing_is_saved(  # type: ignore[no-untyped-def]
        stack: Stack, browser_of, form: dict[str, str], english: str, chinese: str) -> None:
    before = len(stack.app.keys_of_project(SYSTEM, stack.project_id))
    for language, message in (("en", english), ("zh-TW", chinese)):
        refused = post(browser_of("member@uni.edu", language), "/projects/nlp/keys", form)
        assert refused.status_code == 400 and 'role="alert"' in refused.text
        alert = refused.text.split('role="alert"')[1].split("</")[0]
        assert message in alert, alert
        if language == "zh-TW":
            assert not re.search(r"\b(must|not|between|characters)\b", alert), alert  # no English left in it
    assert len(stack.app.keys_of_project(SYSTEM, stack.project_id)) == before


def test_pages_carry_the_security_headers(stack: Stack, browser_of) -> None:  # type: ignore[no-untyped-def]
    member = browser_of("member@uni.edu")
    for path in ("/login", "/projects/nlp", "/api/reports/projects/nlp/statement"):
        headers = member.get(path).headers
        policy = headers["content-security-policy"]
        assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy and "object-src 'none'" in policy
        assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "same-origin"
    with httpx.Client(base_url=stack.base_url.removesuffix("/v1"), follow_redirects=False, timeout=30) as fresh:
        fresh.get("/login")
        before = fresh.cookies.get("lwapi_session")
        logged_in = login(fresh, "member@uni.edu", PASSWORD)
        session = next(c for c in logged_in.headers.get_list("set-cookie") if c.startswith("lwapi_session="))
        assert "httponly" in session.lower() and "samesite=lax" in session.lower() and "path=/" in session.lower()
        assert fresh.cookies.get("lwapi_session") not in (None, before)  # a new session at login


def test_forms_without_a_csrf_token_are_refused(stack: Stack, browser_of) -> None:  # type: ignore[no-untyped-def]
    member = browser_of("member@uni.edu")
    assert member.post("/projects/nlp/keys", data={"name": "no-token"}).status_code == 403
    assert "no-token" not in member.get("/projects/nlp/keys").text


def test_the_api_guide_and_usage_rules_in_both_languages(stack: Stack) -> None:
    portal = stack.base_url.removesuffix("/v1")
    guide = httpx.get(portal + "/docs", cookies={"lwapi_lang": "en"})
    assert guide.status_code == 200 and "API guide" in guide.text and f"{stack.base_url}/chat/completions" in guide.text
    assert '"model": "llama"' in guide.text and "insufficient_quota" in guide.text
    assert "API 使用說明" in httpx.get(portal + "/docs").text  # zh-TW by default
    assert "使用規範" in httpx.get(portal + "/docs/rules").text
    assert "Usage rules" in httpx.get(portal + "/docs/rules", cookies={"lwapi_lang": "en"}).text


@pytest.mark.parametrize(("path", "form", "english", "chinese"), [
    ("/projects/nlp/members", {"email": "not-an-email"}, "“not-an-email” is not an e-mail address.",
     "「not-an-email」不是電子郵件地址。"),
    ("/projects/nlp/members", {"email": ""}, "E-mail must not be empty.", "電子郵件不可為空白。"),
    ("/projects/nlp/members", {"email": "x@uni.edu", "role": "owner"}, "“owner” is not a role a member can be given",
     "「owner」不是可指派給成員的角色"),
    ("/projects/nlp/members", {"email": "member@uni.edu"}, "already", "此人已是專案成員。"),
    ("/projects/nlp/members/remove", {"user_id": "not-a-uuid"}, "no such member", "找不到此使用者。"),
])
def test_bad_member_input_is_explained_in_the_persons_language(  # type: ignore[no-untyped-def]
        stack: Stack, browser_of, path: str, form: dict[str, str], english: str, chinese: str) -> None:
    members_before = stack.app.get_project(stack.project_id).members
    for language, message in (("en", english), ("zh-TW", chinese)):
        refused = post(browser_of("researcher@uni.edu", language), path, form)
        assert refused.status_code == 400 and 'role="alert"' in refused.text
        assert message in refused.text.split('role="alert"')[1].split("</")[0]
    assert stack.app.get_project(stack.project_id).members == members_before
    with pytest.raises(Exception, match="no user"):
        stack.app.find_user_by_email("x@uni.edu")  # no stray account from a refused invitation


def test_members_by_role(stack: Stack, people: People, browser_of) -> None:  # type: ignore[no-untyped-def]
    creator, manager, member = (browser_of(e) for e in ("researcher@uni.edu", "manager@uni.edu", "member@uni.edu"))
    page = member.get("/projects/nlp/members")
    assert page.status_code == 200 and "manager@uni.edu" in page.text and "Add a member" not in page.text
    # a user may not add members: the form is not shown, and posting is refused
    assert post(member, "/projects/nlp/members", {"email": "x@uni.edu"}).status_code == 403
    # a manager adds users (also people who never logged in) but not managers
    added = post(manager, "/projects/nlp/members", {"email": "newcomer@uni.edu", "role": "user"})
    assert added.status_code == 303 and "newcomer@uni.edu was added." in manager.get(added.headers["location"]).text
    assert post(manager, "/projects/nlp/members", {"email": "boss@uni.edu", "role": "manager"}).status_code == 403
    with pytest.raises(Exception, match="no user"):
        stack.app.find_user_by_email("boss@uni.edu")  # a refused invitation leaves no account behind
    ids = {"member@uni.edu": str(people.member), "manager@uni.edu": str(people.manager),
           "newcomer@uni.edu": str(stack.app.find_user_by_email("newcomer@uni.edu").id)}
    assert post(manager, "/projects/nlp/members/role", {"user_id": ids["member@uni.edu"], "role": "manager"}
                ).status_code == 403  # only the creator appoints managers
    assert post(manager, "/projects/nlp/members/remove", {"user_id": str(people.creator)}).status_code == 403
    # the creator appoints, demotes, removes, and hands the creator role over
    assert post(creator, "/projects/nlp/members/role", {"user_id": ids["member@uni.edu"], "role": "manager"}
                ).status_code == 303
    assert stack.app.get_project(stack.project_id).role_of(people.member) is Role.MANAGER
    assert post(creator, "/projects/nlp/members/remove", {"user_id": ids["newcomer@uni.edu"]}).status_code == 303
    assert post(creator, "/projects/nlp/members/role", {"user_id": ids["manager@uni.edu"], "role": "creator"}
                ).status_code == 303
    project = stack.app.get_project(stack.project_id)
    assert project.role_of(people.manager) is Role.CREATOR and project.role_of(people.creator) is Role.MANAGER
    bad = post(browser_of("manager@uni.edu"), "/projects/nlp/members/remove", {"user_id": "not-a-uuid"})
    assert bad.status_code == 400 and 'role="alert"' in bad.text
    outsider = browser_of("outsider@uni.edu")
    assert outsider.get("/projects/nlp/members").status_code == 404
    assert post(outsider, "/projects/nlp/members", {"email": "x@uni.edu"}).status_code == 404


def test_the_usage_page_by_model_and_key_for_a_period(stack: Stack, people: People, browser_of) -> None:  # type: ignore[no-untyped-def]
    api = openai.OpenAI(base_url=stack.base_url, api_key=stack.secret, max_retries=0)
    for _ in range(2):
        api.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}])
    member = browser_of("member@uni.edu")
    deadline = __import__("time").monotonic() + 5
    while "<code>llama</code>" not in (page := member.get("/projects/nlp/usage")).text:
        assert __import__("time").monotonic() < deadline
    assert page.status_code == 200 and "2 requests" in page.text and "main" in page.text
    assert '"tokens_by_model"' in page.text and 'src="/vendor/plotly.min.js"' in page.text
    assert '/api/reports/projects/nlp/statement?start=' in page.text and 'format=pdf' in page.text
    assert member.get("/vendor/plotly.min.js").headers["content-type"].startswith("text/javascript")
    empty = member.get("/projects/nlp/usage?start=2020-01-01&end=2020-01-31")
    assert empty.status_code == 200 and "No usage in this period." in empty.text
    bad = member.get("/projects/nlp/usage?start=2021-05-01&end=2020-01-01")
    assert bad.status_code == 200 and "That period is not valid" in bad.text and "2 requests" in bad.text
    assert browser_of("outsider@uni.edu").get("/projects/nlp/usage").status_code == 404


def test_hostile_names_are_shown_as_text_never_run(stack: Stack, people: People, browser_of) -> None:  # type: ignore[no-untyped-def]
    hostile = '<script>alert(1)</script><img src=x onerror=alert(2)>"\'&'
    manager = browser_of("manager@uni.edu")
    assert post(manager, "/projects/nlp/keys", {"name": hostile}).status_code == 201
    stack.app.rename_project(SYSTEM, stack.project_id, hostile)
    stack.app.update_profile(people.member, display_name=hostile, email="member@uni.edu")
    deadline = __import__("time").monotonic() + 5
    for path in ("/projects/nlp/keys", "/projects/nlp", "/projects/nlp/members", "/"):
        while "&lt;script&gt;alert(1)&lt;/script&gt;" not in (page := manager.get(path)).text:  # shown, escaped
            assert __import__("time").monotonic() < deadline, path
        assert "<script>alert(1)" not in page.text and "<img src=x" not in page.text, path
