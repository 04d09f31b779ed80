"""The portal's model catalog for administrators: every change an event that the gateway follows."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from adapters.passwords import hash_password
from tests.e2e.conftest import Stack
from tests.e2e.test_service import login


def portal(stack: Stack, language: str = "en") -> httpx.Client:
    return httpx.Client(base_url=stack.base_url.removesuffix("/v1"), follow_redirects=False, timeout=30,
                        cookies={"lwapi_lang": language})


@pytest.fixture
def admin(stack: Stack) -> Iterator[httpx.Client]:
    with portal(stack) as client:
        assert login(client, "ops@uni.edu", "admin-password-1").status_code in (302, 303)
        yield client


def post(client: httpx.Client, path: str, **form: str) -> httpx.Response:
    return client.post(path, data={**form, "_csrf_token": client.cookies.get("csrftoken") or ""})


def models_of(stack: Stack) -> set[str]:
    api = openai.OpenAI(base_url=stack.base_url, api_key=stack.secret, max_retries=0)
    return {m.id for m in api.models.list()}


def wait_for(condition, timeout_s: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_an_administrator_manages_the_catalog_from_the_portal(stack: Stack, admin: httpx.Client) -> None:
    page = admin.get("/admin/models")
    assert page.status_code == 200 and "llama" in page.text and "Add a model" in page.text
    added = post(admin, "/admin/models", name="portal-model", description="Added in the portal",
                 deployment="fake1", backend="openai", base_url=stack.upstream_url, upstream_model="fake-upstream",
                 weight="2", timeout_s="30", price_prompt="100", price_completion="300")
    assert added.status_code in (302, 303), added.text
    shown = admin.get(added.headers["location"])
    assert "Model portal-model added." in shown.text and "Added in the portal" in shown.text
    wait_for(lambda: "portal-model" in models_of(stack))  # the gateway follows within a second
    api = openai.OpenAI(base_url=stack.base_url, api_key=stack.secret, max_retries=0)
    assert api.chat.completions.create(model="portal-model", messages=[{"role": "user", "content": "hi"}]).choices

    assert post(admin, "/admin/models/portal-model/deployments", deployment="fake2", backend="openai",
                base_url=stack.upstream_url, upstream_model="fake-upstream").status_code == 303
    assert post(admin, "/admin/models/portal-model/prices", price_prompt="150", price_completion="450",
                effective_at="2030-01-01T00:00").status_code == 303
    assert post(admin, "/admin/models/portal-model/description", description="Now load-balanced").status_code == 303
    assert post(admin, "/admin/models/portal-model/deployments/fake1/remove").status_code == 303
    model = stack.app.get_model("portal-model")
    assert [d.name for d in model.deployments] == ["fake2"] and model.description == "Now load-balanced"
    assert [(p.prompt_per_mtok, p.effective_at.year) for p in model.price_schedule] == [(100, model.price_schedule[0]
                                                                                         .effective_at.year), (150, 2030)]
    assert post(admin, "/admin/models/portal-model/remove").status_code == 303
    wait_for(lambda: "portal-model" not in models_of(stack))


@pytest.mark.parametrize(("form", "message"), [
    ({"name": "bad", "deployment": "d", "backend": "openai", "base_url": "ftp://x"}, "“ftp://x” is not an http(s) address"),
    ({"name": "bad", "deployment": "d", "backend": "openai", "base_url": "http://h", "weight": "lots"}, "Weight must be a number."),
    ({"name": "bad", "deployment": "d", "backend": "openai", "base_url": "http://h", "price_prompt": "-5"},
     "Prompt price must be between 0 and"),
    ({"name": "bad", "deployment": "d", "backend": "carrier-pigeon", "base_url": "http://h"},
     "“carrier-pigeon” is not a backend"),
    ({"name": "llama", "deployment": "d", "backend": "openai", "base_url": "http://h"}, "already exists"),
    ({"name": "bad", "deployment": "d", "backend": "openai", "base_url": "http://h", "tokenizer": "magic"},
     "The tokenizer must be vllm, estimate or file:"),
])
def test_refused_changes_are_explained_on_the_page(stack: Stack, admin: httpx.Client, form: dict[str, str],
                                                   message: str) -> None:
    refused = post(admin, "/admin/models", **form)
    assert refused.status_code == 400 and message in refused.text and 'role="alert"' in refused.text


def test_the_catalog_speaks_traditional_chinese_by_default(stack: Stack) -> None:
    with httpx.Client(base_url=stack.base_url.removesuffix("/v1"), follow_redirects=False, timeout=30) as client:
        assert login(client, "ops@uni.edu", "admin-password-1").status_code in (302, 303)
        page = client.get("/admin/models")
        assert page.status_code == 200 and "模型目錄" in page.text and '<html lang="zh-TW"' in page.text
        refused = post(client, "/admin/models", name="bad", deployment="d", backend="openai", base_url="ftp://x")
        assert refused.status_code == 400 and "「ftp://x」不是不含查詢字串的 http(s) 網址。" in refused.text


def test_people_who_are_not_administrators_cannot_see_or_change_the_catalog(stack: Stack) -> None:
    with portal(stack) as anonymous:
        assert anonymous.get("/admin/models").headers["location"] == "/login"
    stack.app.set_password_hash(stack.user_id, hash_password("researcher-password-1"))
    with portal(stack) as researcher:
        assert login(researcher, "researcher@uni.edu", "researcher-password-1").status_code in (302, 303)
        assert researcher.get("/admin/models").status_code == 403
        refused = post(researcher, "/admin/models", name="sneaky", deployment="d", backend="openai",
                       base_url=stack.upstream_url)
        assert refused.status_code == 403
    assert "sneaky" not in models_of(stack)


def test_an_administrator_creates_projects_and_grants_and_corrects_credits(stack: Stack, admin: httpx.Client) -> None:
    page = admin.get("/admin/projects")
    assert page.status_code == 200 and 'data-project="nlp"' in page.text
    created = post(admin, "/admin/projects", code="astro", name="Astro Lab", creator_email="new.lead@uni.edu",
                   amount="250,000", reason="2027 allocation")
    assert created.status_code == 303 and "Project astro was created." in admin.get("/admin/projects").text
    project = stack.app.find_project_by_code("astro")
    lead = stack.app.find_user_by_email("new.lead@uni.edu")  # invited: registered by e-mail
    assert project.role_of(lead.id) is not None and project.granted_credits == 250_000
    project_id = str(project.id)
    assert post(admin, "/admin/projects/credits", project_id=project_id, kind="grant", amount="1000",
                reason="top-up").status_code == 303
    assert post(admin, "/admin/projects/credits", project_id=project_id, kind="correction", amount="-500",
                reason="double grant").status_code == 303
    astro = stack.app.find_project_by_code("astro")
    assert (astro.granted_credits, astro.corrections_credits) == (251_000, -500)
    row = admin.get("/admin/projects").text.split('data-project="astro"')[1].split("</tr>")[0]
    assert "250,500" in row


@pytest.mark.parametrize(("path", "form", "english", "chinese"), [
    ("/admin/projects", {"code": "nlp", "name": "Again", "creator_email": "x@uni.edu"},
     "project code nlp is taken", "此專案代碼已被使用。"),
    ("/admin/projects", {"code": "new", "name": "New", "creator_email": "x@uni.edu", "amount": "-5"},
     "An initial grant must be a positive number of credits.", "初始撥款必須是正整數點數。"),
    ("/admin/projects", {"code": "new", "name": "New", "creator_email": "x@uni.edu", "amount": "lots"},
     "Amount must be a whole number of credits.", "金額必須是整數點數。"),
    ("/admin/projects", {"code": "new", "name": "New", "creator_email": "not-an-email"},
     "“not-an-email” is not an e-mail address.", "「not-an-email」不是電子郵件地址。"),
    ("/admin/projects", {"code": "N E W", "name": "New", "creator_email": "x@uni.edu"},
     "A project code is 2 to 40 characters", "專案代碼為 2 至 40 個字元"),
    ("/admin/projects", {"code": "new", "name": "", "creator_email": "x@uni.edu"},
     "Project name must not be empty.", "專案名稱不可為空白。"),
    ("/admin/projects", {"code": "new", "name": "New", "creator_email": "x@uni.edu", "amount": "10" * 10},
     "Amount must be between 1 and 1,000,000,000,000,000.", "金額必須介於 1 與 1,000,000,000,000,000 之間。"),
    ("/admin/projects/credits", {"project_id": "nope", "amount": "5", "reason": "r"},
     "no such project", "找不到此專案。"),
    ("/admin/projects/credits", {"project_id": "", "amount": "0", "reason": "r", "kind": "correction"},
     "no such project", "找不到此專案。"),
])
def test_refused_project_changes_are_explained_and_save_nothing(stack: Stack, admin: httpx.Client, path: str,
                                                                form: dict[str, str], english: str,
                                                                chinese: str) -> None:
    for language, message in (("en", english), ("zh-TW", chinese)):
        admin.cookies.set("lwapi_lang", language)
        refused = post(admin, path, **form)
        assert refused.status_code == 400 and 'role="alert"' in refused.text
        assert message in refused.text.split('role="alert"')[1].split("</")[0]
    with pytest.raises(Exception, match="no user"):
        stack.app.find_user_by_email("x@uni.edu")  # no stray account from a refused creation
    with pytest.raises(Exception, match="no project"):
        stack.app.find_project_by_code("new")


def test_only_administrators_reach_the_projects_administration(stack: Stack) -> None:
    stack.app.set_password_hash(stack.user_id, hash_password("researcher-password-1"))
    with portal(stack) as researcher:
        assert login(researcher, "researcher@uni.edu", "researcher-password-1").status_code in (302, 303)
        assert researcher.get("/admin/projects").status_code == 403
        assert post(researcher, "/admin/projects/credits", project_id=str(stack.project_id), amount="1000000",
                    reason="free money").status_code == 403
    assert stack.app.get_project(stack.project_id).granted_credits == 10_000_000
