"""Every state-changing portal form under hostile input (issue 7, "Bad input").

For each form a project manager or a platform administrator can post (keys, members, projects, credits,
the model catalog, login, language, logout) and for each of its text and number fields, hostile values
(a 1 MB string, NUL and other control characters, bidi overrides and zero-width characters, numbers such
as 1e309 or NaN, impossible dates, SQL- and template-looking text, path traversal), hostile ids in the
URL, and hostile bodies (no or a forged CSRF token, JSON, multipart, text, 20 MB, 10,000 fields,
invalid UTF-8). Every answer must be:

* not a 5xx, and within a few seconds;
* when refused: a page with a readable message in the page's language (never a traceback, never JSON),
  and nothing stored — not one event was appended to the log;
* when accepted: stored exactly as given (surrounding space aside), as the read models show it;

and after each test the read models have caught up with the log and the pages still render (a value
that reached the log but cannot be projected would stop every read model).

One service for the whole module (a fresh one per test would cost ~9 s each); each test leaves it as it
found it, apart from the objects it created under names of its own.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import markupsafe
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import dict_row

from adapters.database import eventstore_env
from domain.access import SYSTEM
from domain.accounting import Accounting
from domain.api_key import KeySettings
from domain.catalog import BackendKind, Deployment
from domain.pricing import Prices
from domain.project import Role
from tests.conftest import fresh_database
from tests.e2e.conftest import Stack, start_service, stop_service
from tests.e2e.test_portal_projects import PASSWORD, _person, post
from tests.e2e.test_service import login

REPLY_S = 5.0  # "within a few seconds" (a page waiting on stuck read models takes 3 s or more)
REFUSED = {400, 401, 403, 404, 413, 415}
CJK = re.compile(r"[\u4e00-\u9fff]")
UNREADABLE = ("Traceback", "Internal Server Error", "Something went wrong", '"status_code"', "\\n  File ")
ADMIN_EMAIL, ADMIN_PASSWORD = "ops@uni.edu", "admin-password-1"
MB = "x" * 1_000_000

HOSTILE: dict[str, str] = {
    "1 MB string": MB,
    "NUL": "a\x00b",
    "control characters": "a\x01\x08\x1b[2J\x7fb",
    "RTL override": "\u202egnp.exe\u202c",
    "zero-width": "a\u200b\u200c\u200d\ufeffb",
    "SQL": "'; DROP TABLE x; --",
    "template": "{{7*7}}{% raw %}",
    "path traversal": "../../etc/passwd",
    "markup": "\"<script>alert(1)</script>'&",
    "1e309": "1e309",
    "-1": "-1",
    "huge number": "99999999999999999999999",
    "NaN": "NaN",
    "0x10": "0x10",
    "decimal comma": "1,5",
    "date 9999-99-99": "9999-99-99",
    "date 0001-01-01T00:00": "0001-01-01T00:00",
    "date 0001 east of UTC": "0001-01-01T00:00+01:00",
    "date 9999 west of UTC": "9999-12-31T23:59:59-01:00",
    "e-mail of 300 characters": "a" * 291 + "@uni.edu",
    "e-mail with quotes": '"a b"@uni.edu',
    "e-mail with angle brackets": "<a@uni.edu>",
    "e-mail with zero-width space": "a\u200bb@uni.edu",
    "empty": "",
    "only spaces": "   ",
}
HOSTILE_IDS: dict[str, str] = {  # already percent-encoded: they go into a URL path segment
    "not a UUID": "not-a-uuid",
    "unknown UUID": "00000000-0000-4000-8000-000000000000",
    "path traversal": quote("../../etc/passwd", safe=""),
    "NUL": "%00",
    "invalid UTF-8": "%FF%FE",
    "SQL": quote("'; DROP TABLE x; --", safe=""),
    "template": quote("{{7*7}}", safe=""),
    "2,000 characters": "a" * 2_000,
}


# ---- the running service, its people and their browsers

@dataclass
class World:
    stack: Stack
    database_url: str
    manager: uuid.UUID
    member: uuid.UUID
    victim_model: str = "victim"
    edit_target: uuid.UUID | None = None
    browsers: dict[tuple[str, str], httpx.Client] = field(default_factory=dict)

    @property
    def portal(self) -> str:
        return self.stack.base_url.removesuffix("/v1")

    def browser(self, role: str, language: str = "en") -> httpx.Client:
        """A logged-in browser (kept for the module); "anonymous" has only the login page's CSRF cookie."""
        if (role, language) not in self.browsers:
            client = httpx.Client(base_url=self.portal, follow_redirects=False, timeout=REPLY_S * 3,
                                  cookies={"lwapi_lang": language})
            if role == "anonymous":
                assert client.get("/login").status_code == 200
            else:
                email, password = {"manager": ("manager@uni.edu", PASSWORD),
                                   "admin": (ADMIN_EMAIL, ADMIN_PASSWORD)}[role]
                assert login(client, email, password).status_code == 303
            self.browsers[role, language] = client
        return self.browsers[role, language]

    def log_position(self) -> int:
        return int(self.stack.app.recorder.max_notification_id() or 0)

    def query(self, sql: str, *args: object) -> list[dict[str, Any]]:
        with psycopg.connect(self.database_url, row_factory=dict_row) as conn:
            return conn.execute(sql, args).fetchall()  # type: ignore[arg-type]

    def caught_up(self, timeout_s: float = 10.0) -> None:
        """The read models have applied every event in the log (none was refused by PostgreSQL)."""
        wanted, deadline = self.log_position(), time.monotonic() + timeout_s
        while (self.query("SELECT min(position) AS p FROM lwapi_read.positions")[0]["p"] or 0) < wanted:
            assert time.monotonic() < deadline, "the read models stopped following the log"
            time.sleep(0.05)

    def new_key(self, name: str) -> uuid.UUID:
        key_id, _ = self.stack.app.create_key(SYSTEM, self.stack.project_id, self.manager, KeySettings(name=name))
        self.caught_up()
        return key_id


@pytest.fixture(scope="module")
def world(pg_server_url: str) -> Iterator[World]:
    with fresh_database(pg_server_url) as database_url:
        app = Accounting(env=eventstore_env(database_url), key_pepper=bytes(range(32)))
        creator = app.register_user("researcher@uni.edu", "Researcher")
        project = app.create_project(SYSTEM, "nlp", "NLP Lab", creator)
        app.grant_credits(SYSTEM, project, 10_000_000, "allocation")
        key_id, secret = app.create_key(SYSTEM, project, creator, KeySettings(name="main"))
        upstream = "http://127.0.0.1:9/v1"  # never called: these tests only post forms
        for model in ("llama", "victim"):
            app.add_model(SYSTEM, model, Deployment("fake", BackendKind.OPENAI, upstream, "fake-upstream"),
                          Prices(1_000, 2_000, datetime(2020, 1, 1, tzinfo=UTC)), "A fake model")
        data_dir = Path(tempfile.mkdtemp(prefix="lwapi-hostile.", dir="/tmp"))
        service, base_url = start_service(database_url, data_dir)
        stack = Stack(base_url, upstream, app, project, creator, secret, key_id, data_dir, service)
        manager, member = _person(stack, "manager@uni.edu", "Manager"), _person(stack, "member@uni.edu", "Member")
        app.add_member(SYSTEM, project, manager, Role.MANAGER)
        app.add_member(SYSTEM, project, member, Role.USER)
        world = World(stack, database_url, manager, member)
        try:
            world.caught_up()
            yield world
        finally:
            for client in world.browsers.values():
                client.close()
            stop_service(service)
            app.close()
            shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def still_healthy(world: World) -> Iterator[None]:
    """After each test: the read models follow the log, and the pages every form lives on still render."""
    yield
    world.caught_up()
    manager, admin = world.browser("manager"), world.browser("admin")
    for client, path in ((manager, "/projects/nlp"), (manager, "/projects/nlp/keys"), (manager, "/projects/nlp/members"),
                         (admin, "/admin/projects"), (admin, "/admin/models"), (manager, "/")):
        page = client.get(path)
        assert page.status_code == 200, f"{path} after the test: {page.status_code} {page.text[:300]}"


# ---- what an answer must be

def timed(send: Callable[[], httpx.Response]) -> httpx.Response:
    started = time.monotonic()
    response = send()  # the client's timeout turns a hang into a failure
    elapsed = time.monotonic() - started
    assert elapsed < REPLY_S, f"answered after {elapsed:.1f} s"
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    return response


def message_of(response: httpx.Response, language: str) -> str:
    """The readable message of a refusal page, checked to be in the page's language."""
    assert response.headers.get("content-type", "").startswith("text/html"), \
        f"{response.status_code} {response.headers.get('content-type')}: {response.text[:300]}"
    text = response.text
    assert not any(marker in text for marker in UNREADABLE), text[:2000]
    assert f'<html lang="{language}"' in text
    found = re.search(r'role="alert">(.*?)</', text, re.S) or re.search(r"<main[^>]*>.*?<h1>(.*?)</h1>", text, re.S)
    assert found, f"no message on the page: {text[:2000]}"
    message = html.unescape(re.sub(r"<[^>]+>", "", found.group(1))).strip()
    assert message, text[:2000]
    if language == "zh-TW":
        assert CJK.search(message), f"not in Traditional Chinese: {message!r}"
    else:
        assert re.search(r"[A-Za-z]{3,}", message), f"not in English: {message!r}"
    return message


def flat(value: Any) -> list[Any]:
    """Every scalar inside a row (JSON columns included)."""
    if isinstance(value, dict):
        return [v for item in value.values() for v in flat(item)]
    if isinstance(value, list | tuple):
        return [v for item in value for v in flat(item)]
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return flat(json.loads(value))
        except ValueError:
            pass
    return [value]


# ---- the forms

@dataclass(frozen=True)
class Form:
    """One state-changing portal form: who posts it, where, a valid submission, and how to read back what
    an accepted one stored (rows of the read models)."""

    role: str  # "manager", "admin" or "anonymous"
    path: str  # "{key}", "{model}", "{deployment}" and "{code}" stand for ids a test fills in
    fields: dict[str, str]  # a valid submission; "{tag}" makes names unique
    accepted: tuple[int, ...]
    stored: Callable[[World, dict[str, str]], list[dict[str, Any]]] | None = None
    stored_as: dict[str, Callable[[str], Any]] = field(default_factory=dict)  # how a field's text is kept
    url_ids: tuple[str, ...] = ()

    @property
    def attackable(self) -> list[str]:
        return [name for name in self.fields if not name.startswith("_")]


def _newest_key(w: World, _f: dict[str, str]) -> list[dict[str, Any]]:
    return w.query("SELECT * FROM lwapi_read.api_keys WHERE project_id = %s ORDER BY created_at DESC LIMIT 1",
                   w.stack.project_id)


def _key(w: World, f: dict[str, str]) -> list[dict[str, Any]]:
    return w.query("SELECT * FROM lwapi_read.api_keys WHERE key_id = %s", uuid.UUID(f["_key"]))


def _member(w: World, f: dict[str, str]) -> list[dict[str, Any]]:
    return w.query("SELECT u.email, m.role FROM lwapi_read.users u JOIN lwapi_read.memberships m USING (user_id) "
                   "WHERE m.project_id = %s AND u.email = %s", w.stack.project_id, f["email"].strip().lower())


def _project(w: World, f: dict[str, str]) -> list[dict[str, Any]]:
    rows = w.query("SELECT * FROM lwapi_read.projects WHERE code = %s", f["code"].strip().lower())
    if rows:
        rows += w.query("SELECT email FROM lwapi_read.users WHERE user_id = %s", rows[0]["creator_id"])
        rows += w.query("SELECT amount_credits, reason FROM lwapi_read.ledger_credits WHERE project_id = %s",
                        rows[0]["project_id"])
    return rows


def _newest_credit(w: World, _f: dict[str, str]) -> list[dict[str, Any]]:
    return w.query("SELECT kind, amount_credits, reason FROM lwapi_read.ledger_credits WHERE project_id = %s "
                   "ORDER BY position DESC LIMIT 1", w.stack.project_id)


def _model(w: World, f: dict[str, str]) -> list[dict[str, Any]]:
    return w.query("SELECT * FROM lwapi_read.models WHERE name = %s", f.get("name", w.victim_model).strip())


KEY_FIELDS = {"name": "k-{tag}", "rpm_limit": "60", "tpm_limit": "", "cap_credits": "5000", "valid_from": "",
              "valid_until": "", "models": "llama"}
DEPLOYMENT_FIELDS = {"deployment": "d-{tag}", "backend": "openai", "base_url": "http://127.0.0.1:9/v1",
                     "upstream_model": "up", "api_key_env": "", "weight": "1", "timeout_s": "30", "tokenizer": ""}
PRICE_FIELDS = {"price_prompt": "1000", "price_completion": "2000", "price_cached": "", "effective_at": ""}
CATALOG_STORED_AS: dict[str, Callable[[str], Any]] = {
    "api_key_env": lambda v: f"env:{v.strip()}", "timeout_s": lambda v: int(float(v) * 1000)}

FORMS: dict[str, Form] = {
    "create a key": Form("manager", "/projects/{code}/keys", KEY_FIELDS, (201,), _newest_key, url_ids=("code",)),
    "edit a key": Form("manager", "/projects/nlp/keys/{key}/edit", {**KEY_FIELDS, "name": "e-{tag}"}, (303,), _key,
                       url_ids=("key",)),
    "revoke a key": Form("manager", "/projects/nlp/keys/{key}/revoke", {}, (303,), url_ids=("key",)),
    "add a member": Form("manager", "/projects/{code}/members", {"email": "m-{tag}@uni.edu", "role": "user"}, (303,),
                         _member, {"email": lambda v: v.strip().lower()}, url_ids=("code",)),
    "change a member's role": Form("admin", "/projects/nlp/members/role", {"user_id": "{member}", "role": "user"},
                                   (303,)),
    "remove a member": Form("manager", "/projects/nlp/members/remove", {"user_id": "{member}"}, (303,)),
    "create a project": Form("admin", "/admin/projects", {"code": "p-{tag}", "name": "P {tag}",
                                                          "creator_email": "c-{tag}@uni.edu", "amount": "100",
                                                          "reason": "start"}, (303,), _project,
                             {"creator_email": lambda v: v.strip().lower(), "code": lambda v: v.strip().lower()}),
    "grant or correct credits": Form("admin", "/admin/projects/credits", {"project_id": "{project}", "kind": "grant",
                                                                          "amount": "5", "reason": "r {tag}"}, (303,),
                                     _newest_credit),
    "add a model": Form("admin", "/admin/models", {"name": "m-{tag}", **DEPLOYMENT_FIELDS, **PRICE_FIELDS,
                                                   "description": "d {tag}"}, (303,), _model, CATALOG_STORED_AS),
    "add a deployment": Form("admin", "/admin/models/{model}/deployments", DEPLOYMENT_FIELDS, (303,), _model,
                             CATALOG_STORED_AS, url_ids=("model",)),
    "remove a deployment": Form("admin", "/admin/models/{model}/deployments/{deployment}/remove", {}, (303,),
                                url_ids=("model", "deployment")),
    "change prices": Form("admin", "/admin/models/{model}/prices", PRICE_FIELDS, (303,), _model, url_ids=("model",)),
    "describe a model": Form("admin", "/admin/models/{model}/description", {"description": "d {tag}"}, (303,), _model,
                             url_ids=("model",)),
    "remove a model": Form("admin", "/admin/models/{model}/remove", {}, (303,), url_ids=("model",)),
    "log in": Form("anonymous", "/login", {"email": "nobody-{tag}@uni.edu", "password": "wrong-{tag}"}, ()),
    "choose a language": Form("manager", "/language", {"language": "en", "next": "/projects/nlp"}, (303,)),
    "log out": Form("manager", "/logout", {}, (303,)),
}
_tags = iter(range(1_000_000))


def fill(world: World, form: Form, ids: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """The form's path and a valid submission with unique names (and fresh objects to act on)."""
    tag = f"{uuid.uuid4().hex[:6]}{next(_tags)}"
    values = {"tag": tag, "code": "nlp", "model": world.victim_model, "deployment": "fake",
              "member": str(world.member), "project": str(world.stack.project_id)}
    if form.path.endswith("{key}/revoke"):  # a key of its own each time (a revoke that is accepted is final)
        values["key"] = str(world.new_key(f"target-{tag}"))
    elif "{key}" in form.path:  # edits can share one
        if world.edit_target is None:
            world.edit_target = world.new_key("edit-target")
        values["key"] = str(world.edit_target)
    values.update(ids or {})
    fields = {name: value.format(**values) for name, value in form.fields.items()}
    if "key" in values:
        fields["_key"] = values["key"]
    return form.path.format(**values), fields


def browser_for(world: World, form: Form, language: str) -> httpx.Client:
    if form.path == "/logout":  # logging out ends the session: a browser of its own each time
        client = httpx.Client(base_url=world.portal, follow_redirects=False, timeout=REPLY_S * 3,
                              cookies={"lwapi_lang": language})
        assert login(client, "manager@uni.edu", PASSWORD).status_code == 303
        world.browsers["logout", str(uuid.uuid4())] = client
        return client
    if form.path == "/language":  # its cookie would change every later page's language
        client = httpx.Client(base_url=world.portal, follow_redirects=False, timeout=REPLY_S * 3,
                              cookies={"lwapi_lang": language})
        assert client.get("/login").status_code == 200
        world.browsers["language", str(uuid.uuid4())] = client
        return client
    return world.browser(form.role, language)


def body_of(fields: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in fields.items() if not name.startswith("_")}


def check_refused(world: World, response: httpx.Response, language: str, position: int, what: str) -> str:
    assert response.status_code in REFUSED, f"{what}: {response.status_code}"
    message = message_of(response, language)
    assert world.log_position() == position, f"{what}: refused ({message!r}) yet something was stored"
    return message


def check_accepted(world: World, form: Form, fields: dict[str, str], attacked: str, value: str) -> None:
    """What an accepted hostile value became: exactly what was given (the portal strips surrounding space)."""
    if form.stored is None or not value.strip():
        return
    world.caught_up()
    rows = form.stored(world, fields)
    assert rows, f"{attacked}={value[:40]!r} was accepted but nothing can be found"
    kept = form.stored_as.get(attacked)
    expected = kept(value) if kept else value.strip()
    stored = [v for row in rows for v in flat(row)]
    as_number = None
    if kept is None:
        with contextlib.suppress(ValueError):
            as_number = int(value.strip())
    assert expected in stored or (as_number is not None and as_number in stored), \
        f"{attacked}={value[:60]!r} accepted, but stored as none of {[s for s in stored if s is not None][:20]}"


# ---- 0. the valid submissions the hostile ones start from are accepted (else every refusal below is vacuous)

@pytest.mark.parametrize("form_name", [name for name, form in FORMS.items() if form.accepted])
def test_the_valid_submission_of_every_form_is_accepted(world: World, form_name: str) -> None:
    form, app, tag = FORMS[form_name], world.stack.app, uuid.uuid4().hex[:8]
    ids: dict[str, str] = {}
    if form_name == "remove a member":  # objects of its own to remove, so that the shared ones stay
        user = app.register_user(f"leaver-{tag}@uni.edu", "Leaver")
        app.add_member(SYSTEM, world.stack.project_id, user, Role.USER)
        ids["member"] = str(user)
    elif form_name == "change a member's role":
        ids["member"] = str(world.manager)  # a manager made a user, then back below
    elif form_name == "remove a model":
        ids["model"] = f"gone-{tag}"
        app.add_model(SYSTEM, ids["model"], Deployment("fake", BackendKind.OPENAI, world.stack.upstream_url, "up"),
                      Prices(1, 2, datetime(2020, 1, 1, tzinfo=UTC)))
    elif form_name == "remove a deployment":
        ids["deployment"] = f"gone-{tag}"
        app.change_model(SYSTEM, world.victim_model, lambda m: m.add_deployment(
            Deployment(ids["deployment"], BackendKind.OPENAI, world.stack.upstream_url, "up")))
    world.caught_up()
    path, fields = fill(world, form, ids)
    client = browser_for(world, form, "en")
    position = world.log_position()
    try:
        response = timed(lambda: post(client, path, body_of(fields)))
    finally:
        if form_name == "change a member's role" and \
                app.get_project(world.stack.project_id).role_of(world.manager) is not Role.MANAGER:
            app.change_role(SYSTEM, world.stack.project_id, world.manager, Role.MANAGER)
    assert response.status_code in form.accepted, (response.status_code, response.text[:1000])
    if form.path not in ("/language", "/logout"):
        assert world.log_position() > position  # it was stored


# ---- 1. every field of every form, with every hostile value

@pytest.mark.parametrize("form_name", [name for name, form in FORMS.items() if form.attackable])
def test_hostile_values_in_every_field(world: World, form_name: str) -> None:
    form = FORMS[form_name]
    problems: list[str] = []
    n = 0
    for attacked in form.attackable:
        for label, value in HOSTILE.items():
            language = ("en", "zh-TW")[n % 2]
            n += 1
            path, fields = fill(world, form)
            fields[attacked] = value
            client = browser_for(world, form, language)
            position = world.log_position()
            what = f"{form_name} / {attacked} = {label} ({language})"
            try:
                response = timed(lambda: post(client, path, body_of(fields)))  # noqa: B023 (called at once)
                if response.status_code in form.accepted:
                    check_accepted(world, form, fields, attacked, value)
                    if form.path == "/language":
                        target = response.headers["location"]
                        assert target.startswith("/") and not target.startswith("//") and len(target) <= 2_000
                        assert "\x00" not in target and "\n" not in target
                else:
                    check_refused(world, response, language, position, what)
            except AssertionError as e:
                problems.append(f"{what}: {e}")
    assert not problems, f"{len(problems)} of {n} cases:\n" + "\n".join(p[:600] for p in problems)


# ---- 2. hostile ids in the URL

@pytest.mark.parametrize("form_name", [name for name, form in FORMS.items() if form.url_ids])
def test_hostile_ids_in_the_url(world: World, form_name: str) -> None:
    form = FORMS[form_name]
    problems: list[str] = []
    n = 0
    for slot in form.url_ids:
        for label, raw in HOSTILE_IDS.items():
            language = ("en", "zh-TW")[n % 2]
            n += 1
            path, fields = fill(world, form, {slot: raw})
            client = browser_for(world, form, language)
            position = world.log_position()
            what = f"{form_name} / {slot} = {label} ({language})"
            try:
                # (a decoded "/" that splits the segment matches no route at all: edge/portal/unmatched.py's page)
                response = timed(lambda: post(client, path, body_of(fields)))  # noqa: B023
                check_refused(world, response, language, position, what)
            except AssertionError as e:
                problems.append(f"{what}: {e}")
    assert not problems, f"{len(problems)} of {n} cases:\n" + "\n".join(p[:600] for p in problems)


def test_hostile_codes_in_the_pages_the_forms_live_on(world: World) -> None:
    """The pages a refused form falls back to, and the report links on them, take the same hostile ids."""
    client = world.browser("manager", "zh-TW")
    for code in ("a%00b", "%FF%FE", quote("'; DROP TABLE x; --", safe=""), "a" * 2_000):
        for path in (f"/projects/{code}", f"/projects/{code}/keys", f"/projects/{code}/members",
                     f"/projects/{code}/usage"):
            page = timed(lambda: client.get(path))  # noqa: B023
            assert page.status_code == 404 and "找不到頁面" in message_of(page, "zh-TW"), path
        report = timed(lambda: client.get(f"/api/reports/projects/{code}/statement"))  # noqa: B023
        assert report.status_code == 404 and report.json()["error"]["code"] == "not_found"
    for query in ("model=%00", "model=" + "m" * 5_000, "key=%00", "start=9999-99-99", "as_of=1e309"):
        report = timed(lambda: client.get(f"/api/reports/projects/nlp/entries?{query}"))  # noqa: B023
        assert report.status_code == 400 and report.json()["error"]["message"], query


def test_paths_and_methods_no_route_takes_get_a_page_or_the_apis_json(world: World) -> None:
    """Not the framework's bare JSON: a page in the person's language (405 with `Allow`), and under /api
    the reports' own JSON error shape."""
    for language, not_found, wrong_method in (("en", "Not found", "does not take that kind of request"),
                                              ("zh-TW", "找不到頁面", "不接受這種請求")):
        client = world.browser("manager", language)
        position = world.log_position()
        for path in ("/nope", "/projects/nlp/keys/x/y/z", "/%FF", "/admin/models/a%2Fb/prices/x"):
            for response in (timed(lambda: client.get(path)), timed(lambda: post(client, path, {}))):  # noqa: B023
                assert response.status_code == 404, (path, response.status_code)
                assert response.headers["content-type"].startswith("text/html"), path
                assert not_found in response.text and "content-security-policy" in response.headers
        page = timed(lambda: client.get("/logout"))  # noqa: B023
        assert page.status_code == 405 and set(page.headers["allow"].split(", ")) == {"POST", "OPTIONS"}
        assert wrong_method in message_of(page, language)
        put = timed(lambda: client.put("/admin/models"))  # noqa: B023
        assert put.status_code == 405 and set(put.headers["allow"].split(", ")) == {"GET", "POST", "OPTIONS"}
        for path, status in (("/api/nope", 404), ("/api/reports/platform/x", 404)):
            answer = timed(lambda: client.get(path))  # noqa: B023
            assert answer.status_code == status and answer.json()["error"]["code"] == "not_found", path
        answer = timed(lambda: client.post("/api/reports/platform"))  # noqa: B023
        assert answer.status_code == 405 and answer.json()["error"]["code"] == "method_not_allowed"
        assert set(answer.headers["allow"].split(", ")) == {"GET", "OPTIONS"}
        assert world.log_position() == position


def test_traversal_that_the_client_normalises_reaches_no_form(world: World) -> None:
    client = world.browser("manager")
    position = world.log_position()
    for path in ("/projects/nlp/keys/../../etc/passwd/revoke", "/projects/nlp/../../etc/passwd/members",
                 "/admin/models/../../../etc/passwd/remove"):
        response = timed(lambda: post(client, path, {}))  # noqa: B023
        assert response.status_code in (403, 404, 405), (path, response.status_code)
    assert world.log_position() == position


# ---- 3. hostile bodies: the CSRF token, the content type, the size, the encoding

URL_ENCODED = "application/x-www-form-urlencoded"


def _raw(client: httpx.Client, path: str, body: bytes, content_type: str, **headers: str) -> httpx.Response:
    return client.post(path, content=body, headers={"content-type": content_type, **headers})


def _token(client: httpx.Client) -> str:
    return client.cookies.get("csrftoken") or ""


def _encoded(fields: dict[str, str], token: str) -> bytes:
    return urlencode({**body_of(fields), "_csrf_token": token}).encode()


BODIES: dict[str, tuple[Callable[[httpx.Client, str, dict[str, str]], httpx.Response], int]] = {
    "no CSRF token": (lambda c, p, f: c.post(p, data=body_of(f)), 403),
    "a forged CSRF token": (lambda c, p, f: c.post(p, data={**body_of(f), "_csrf_token": "forged"}), 403),
    "JSON without a token": (lambda c, p, f: c.post(p, json=body_of(f)), 403),
    "JSON with the token header": (lambda c, p, f: c.post(p, json=body_of(f), headers={"x-csrftoken": _token(c)}), 415),
    "multipart": (lambda c, p, f: c.post(p, data={**body_of(f), "_csrf_token": _token(c)},
                                          files={"upload": ("a.txt", b"hello", "text/plain")}), 415),
    "multipart with invalid UTF-8": (lambda c, p, f: c.post(p, data={"_csrf_token": _token(c)},
                                                             files={"name": (None, b"\xff\xfe")}), 400),
    "text/plain": (lambda c, p, f: _raw(c, p, b"name=x", "text/plain", **{"x-csrftoken": _token(c)}), 415),
    "20 MB form": (lambda c, p, f: _raw(c, p, _encoded(f, _token(c)) + b"&pad=" + b"a" * 20_000_000, URL_ENCODED), 413),
    "20 MB multipart": (lambda c, p, f: c.post(p, data={"_csrf_token": _token(c)},
                                                files={"pad": ("big", b"a" * 20_000_000)}), 413),
    "10,000 repeated fields": (lambda c, p, f: _raw(c, p, _encoded(f, _token(c)) + b"&name=x" * 10_000,
                                                    URL_ENCODED), 400),
    "invalid UTF-8 percent-encoded": (lambda c, p, f: _raw(c, p, _encoded(f, _token(c)) + b"&name=%FF%FE&email=%C0%AF",
                                                           URL_ENCODED), 400),
    "invalid UTF-8 in a field name": (lambda c, p, f: _raw(c, p, _encoded(f, _token(c)) + b"&%FF=1", URL_ENCODED), 400),
    "raw bytes, not percent-encoded": (lambda c, p, f: _raw(c, p, _encoded(f, _token(c)) + "&name=中文".encode(),
                                                            URL_ENCODED), 400),
    "latin-1 declared charset": (lambda c, p, f: _raw(c, p, _encoded(f, _token(c)) + b"&name=%E9",
                                                      URL_ENCODED + "; charset=iso-8859-1"), 400),
}


@pytest.mark.parametrize("form_name", FORMS)
def test_hostile_bodies_are_refused_with_a_page(world: World, form_name: str) -> None:
    form = FORMS[form_name]
    problems: list[str] = []
    for n, (label, (send, status)) in enumerate(BODIES.items()):
        language = ("en", "zh-TW")[n % 2]
        path, fields = fill(world, form)
        client = browser_for(world, form, language)
        position = world.log_position()
        what = f"{form_name} / {label} ({language})"
        try:
            response = timed(lambda: send(client, path, fields))  # noqa: B023
            assert response.status_code == status, f"{response.status_code}, expected {status}"
            check_refused(world, response, language, position, what)
        except AssertionError as e:
            problems.append(f"{what}: {e}")
        if "key" in fields:
            assert world.stack.app.get_key(uuid.UUID(fields["_key"])).revoked is False, what
    assert not problems, "\n".join(p[:600] for p in problems)


def test_refusals_name_what_was_wrong_in_the_persons_language(world: World) -> None:
    """Named cases: the message says what to fix, in English and in Traditional Chinese."""
    cases = [
        ("create a key", "valid_from", "0001-01-01T00:00", "between 1970-01-01 and 9000-01-01", "介於 1970-01-01 與"),
        ("create a key", "name", "a\x00b", "must not contain control characters", "不可包含控制字元"),
        ("create a key", "rpm_limit", "1e309", "whole number", "整數"),
        ("add a member", "email", "a\u200bb@uni.edu", "is not an e-mail address", "不是電子郵件地址"),
        ("add a member", "email", "a" * 291 + "@uni.edu", "at most 254 characters", "最多 254 個字元"),
        ("change a member's role", "role", "'; DROP TABLE x; --", "is not a role", "不是可指派給成員的角色"),
        ("grant or correct credits", "amount", "1,5", "whole number of credits", "整數點數"),
        ("grant or correct credits", "kind", "bogus", "is not a kind of change", "不是可用的異動類型"),
        ("add a model", "tokenizer", "file:/a\x00", "must not contain control characters", "不可包含控制字元"),
        ("describe a model", "description", MB, "at most 2,000 characters", "最多 2,000 個字元"),
        ("change prices", "effective_at", "9999-99-99", "must be a date and time", "必須是日期與時間"),
    ]
    for form_name, name, value, english, chinese in cases:
        form = FORMS[form_name]
        for language, wanted in (("en", english), ("zh-TW", chinese)):
            path, fields = fill(world, form)
            position = world.log_position()
            response = timed(lambda: post(world.browser(form.role, language), path,  # noqa: B023
                                          body_of({**fields, name: value})))  # noqa: B023
            message = check_refused(world, response, language, position, f"{form_name} / {name}")
            assert wanted in message, (form_name, name, language, message)
    for language, wanted in (("en", "expired or did not come from this site"), ("zh-TW", "表單已過期")):
        refused = world.browser("manager", language).post("/projects/nlp/keys", data={"name": "no-token"})
        assert wanted in check_refused(world, refused, language, world.log_position(), "no CSRF token")


def test_a_refused_form_creates_nothing_anywhere(world: World) -> None:
    """Beyond the log: the read models hold no key, member, user, project or model from refused input."""
    def counts() -> dict[str, int]:
        return {table: world.query(f"SELECT count(*) AS n FROM lwapi_read.{table}")[0]["n"]
                for table in ("api_keys", "memberships", "users", "projects", "models", "ledger_credits")}
    before = counts()
    manager, admin = world.browser("manager"), world.browser("admin", "zh-TW")
    attempts = [
        (manager, "/projects/nlp/keys", {"name": "x", "valid_until": "0001-01-01T00:00+01:00"}),
        (manager, "/projects/nlp/keys", {"name": "y", "models": ["llama"] * 10_000}),
        (manager, "/projects/nlp/members", {"email": "\u202eevil@uni.edu"}),
        (admin, "/admin/projects", {"code": "zz-new", "name": "n", "creator_email": "fresh@uni.edu", "amount": "0x10"}),
        (admin, "/admin/projects", {"code": "zz-new", "name": "n\x00", "creator_email": "fresh@uni.edu"}),
        (admin, "/admin/projects/credits", {"project_id": str(world.stack.project_id), "kind": "grant ",
                                            "amount": "1_0", "reason": "r"}),
        (admin, "/admin/models", {"name": "evil", "deployment": "d", "backend": "openai",
                                  "base_url": "http://127.0.0.1:9/v1", "description": "d\x00"}),
    ]
    for client, path, form in attempts:
        response = timed(lambda: post(client, path, form))  # noqa: B023
        assert response.status_code in REFUSED, (path, form, response.status_code)
    world.caught_up()
    assert counts() == before
    for email in ("fresh@uni.edu", "\u202eevil@uni.edu"):
        with pytest.raises(Exception, match="no user"):
            world.stack.app.find_user_by_email(email)


def test_a_refused_login_logs_nobody_in_and_the_language_switch_stays_on_this_site(world: World) -> None:
    anonymous = world.browser("anonymous", "zh-TW")
    for email, password in (("' OR 1=1 --", "' OR 1=1 --"), (ADMIN_EMAIL + "\x00", ADMIN_PASSWORD),
                            ("{{7*7}}", MB), ([ADMIN_EMAIL, "x@y.z"], "wrong")):
        refused = timed(lambda: post(anonymous, "/login", {"email": email, "password": password}))  # noqa: B023
        assert refused.status_code == 401 and "電子郵件或密碼錯誤" in message_of(refused, "zh-TW")
    assert anonymous.get("/").status_code in (302, 303)  # still nobody
    switch = browser_for(world, FORMS["choose a language"], "en")
    for target, expected in (("https://evil.example/", "/"), ("//evil.example", "/"), ("/" + "a" * 5_000, "/"),
                             ("/projects/nlp?x=1", "/projects/nlp?x=1"), ("/a\r\nSet-Cookie: x=1", None)):
        moved = timed(lambda: post(switch, "/language", {"language": "zh-TW", "next": target}))  # noqa: B023
        assert moved.status_code == 303 and "x=1;" not in moved.headers.get("set-cookie", "")
        location = moved.headers["location"]
        assert location == expected if expected else (location.startswith("/") and "\n" not in location)


# ---- 4. accepted values are stored exactly as given (hypothesis, a bounded number of examples)

PROPERTY = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=140)  # a browser cannot send a lone surrogate


def _control(c: str) -> bool:
    return ord(c) < 32 or ord(c) == 127


def _name_is_refused(text: str) -> bool:
    """The rule: no control character anywhere (tab and line breaks only around the name, which is stripped),
    not empty, at most 120 characters."""
    name = text.strip()
    return any(_control(c) and c not in "\t\n\r" for c in text) or not name or len(name) > 120 \
        or any(_control(c) for c in name)


@PROPERTY
@given(name=ANY_TEXT | st.sampled_from(list(HOSTILE.values())[2:]))
def test_a_key_name_is_stored_exactly_or_refused_with_a_reason(world: World, name: str) -> None:
    client, position = world.browser("manager", "zh-TW"), world.log_position()
    response = timed(lambda: post(client, "/projects/nlp/keys", {"name": name}))
    if _name_is_refused(name):
        check_refused(world, response, "zh-TW", position, f"key name {name!r}")
        return
    assert response.status_code == 201, (name, response.status_code, response.text[:500])
    world.caught_up()
    stored = _newest_key(world, {})[0]
    assert stored["name"] == name.strip()
    assert world.stack.app.get_key(stored["key_id"]).settings.name == name.strip()
    assert f'data-key="{markupsafe.escape(name.strip())}"' in client.get("/projects/nlp/keys").text  # text, not markup


@PROPERTY
@given(value=st.one_of(st.integers(-10, 2 * 10**9).map(str), st.floats().map(str),
                       st.text(st.sampled_from("0123456789-+_,. eExXaN١٢"), max_size=25)))
def test_a_limit_is_stored_as_the_number_given_or_refused(world: World, value: str) -> None:
    client, position = world.browser("manager"), world.log_position()
    response = timed(lambda: post(client, "/projects/nlp/keys", {"name": "limit", "rpm_limit": value}))
    try:
        number: int | None = int(value.strip()) if value.strip() else None
    except ValueError:
        number = -1
    if number is not None and not 1 <= number <= 10**9:
        check_refused(world, response, "en", position, f"rpm_limit {value!r}")
        return
    assert response.status_code == 201, (value, response.status_code)
    world.caught_up()
    assert _newest_key(world, {})[0]["rpm_limit"] == number


@PROPERTY
@given(amount=st.one_of(st.integers(-10**16, 10**16).map(str), st.integers(0, 10**12).map(lambda n: f"{n:,}"),
                        st.text(st.sampled_from("0123456789,_-+ .e"), min_size=1, max_size=12)))
def test_a_grant_adds_exactly_the_amount_given_or_nothing(world: World, amount: str) -> None:
    client, position = world.browser("admin"), world.log_position()
    granted = world.stack.app.get_project(world.stack.project_id).granted_credits
    response = timed(lambda: post(client, "/admin/projects/credits", {
        "project_id": str(world.stack.project_id), "kind": "grant", "amount": amount, "reason": "property"}))
    text = amount.strip()
    whole = re.fullmatch(r"[+-]?(?:[0-9]+|[0-9]{1,3}(?:[,_][0-9]{3})+)", text)
    number = int(text.replace(",", "").replace("_", "")) if whole else None
    if number is None or not 1 <= number <= 10**15:
        check_refused(world, response, "en", position, f"amount {amount!r}")
        assert world.stack.app.get_project(world.stack.project_id).granted_credits == granted
        return
    assert response.status_code == 303, (amount, response.status_code, response.text[:300])
    assert world.stack.app.get_project(world.stack.project_id).granted_credits == granted + number


def _offsets() -> st.SearchStrategy[timezone]:
    return st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))


@PROPERTY
@given(when=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=_offsets()))
def test_a_validity_time_is_stored_as_the_instant_given_or_refused(world: World, when: datetime) -> None:
    client, position = world.browser("manager", "zh-TW"), world.log_position()
    response = timed(lambda: post(client, "/projects/nlp/keys", {"name": "timed", "valid_until": when.isoformat()}))
    if not datetime(1970, 1, 1, tzinfo=UTC) <= when < datetime(9000, 1, 1, tzinfo=UTC):
        check_refused(world, response, "zh-TW", position, f"valid_until {when.isoformat()}")
        return
    assert response.status_code == 201, (when, response.status_code, response.text[:300])
    world.caught_up()
    assert _newest_key(world, {})[0]["valid_until"] == when


@PROPERTY
@given(text=ANY_TEXT)
def test_a_model_description_is_stored_exactly_or_refused(world: World, text: str) -> None:
    client, position = world.browser("admin", "zh-TW"), world.log_position()
    response = timed(lambda: post(client, f"/admin/models/{world.victim_model}/description", {"description": text}))
    if any(_control(c) and c not in "\t\n\r" for c in text):
        check_refused(world, response, "zh-TW", position, f"description {text!r}")
        return
    assert response.status_code == 303, (text, response.status_code, response.text[:300])
    world.caught_up()
    assert _model(world, {})[0]["description"] == text.strip()
