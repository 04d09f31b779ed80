"""The reports' HTTP API against the running service: who may read what, in which format, and clear
JSON refusals for everything else."""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import UTC, datetime

import httpx
import openai

from tests.e2e.conftest import Stack
from tests.e2e.test_portal_projects import People, browser_of, people  # noqa: F401 - fixtures
from tests.e2e.test_service import login

TODAY = datetime.now(UTC).date().isoformat()
PERIOD = f"start={TODAY}&end={TODAY}"


def _use_the_gateway(stack: Stack, times: int) -> None:
    api = openai.OpenAI(base_url=stack.base_url, api_key=stack.secret, max_retries=0)
    for _ in range(times):
        api.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}])


def _statement(client: httpx.Client, query: str = "", **headers: str) -> httpx.Response:
    return client.get(f"/api/reports/projects/nlp/statement?{PERIOD}{query}", headers=headers)


def test_members_and_project_keys_read_statements_in_every_format(stack: Stack, people: People,  # noqa: F811
                                                                   browser_of) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    _use_the_gateway(stack, 3)
    member = browser_of("member@uni.edu")
    deadline = time.monotonic() + 10
    while (s := _statement(member).json())["totals"]["requests"] < 3:
        assert time.monotonic() < deadline, s
        time.sleep(0.1)
    assert s["project"]["code"] == "nlp" and s["charged"] > 0 and s["by_key"][0]["key_name"] == "main"
    as_csv = _statement(member, "&format=csv")
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert as_csv.headers["content-disposition"] == f'attachment; filename="statement-nlp-{TODAY}-{TODAY}.csv"'
    rows = list(csv.reader(io.StringIO(as_csv.text)))
    assert ["summary", "charged", "", "", "", "", "", "", str(s["charged"])] in rows
    pdf = _statement(member, "&format=pdf&language=zh-TW")
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF") and pdf.headers["content-type"] == \
        "application/pdf"
    # a program with one of the project's keys, no portal session
    with httpx.Client(base_url=stack.base_url.removesuffix("/v1"), timeout=30) as program:
        by_key = _statement(program, authorization=f"Bearer {stack.secret}")
        assert by_key.status_code == 200 and by_key.json()["charged"] == s["charged"]
        entries = program.get(f"/api/reports/projects/nlp/entries?{PERIOD}&format=jsonl",
                              headers={"authorization": f"Bearer {stack.secret}"})
        lines = [json.loads(line) for line in entries.text.splitlines()]
        assert len(lines) == 3 and sum(e["cost"] for e in lines) == s["charged"]
        assert all(e["price_prompt"] == 1_000 and e["price_completion"] == 2_000 for e in lines)
    # the same position later gives the same bytes, however much happened since
    position = s["as_of"]["position"]
    _use_the_gateway(stack, 1)
    deadline = time.monotonic() + 10
    while _statement(member).json()["totals"]["requests"] < 4:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert _statement(member, f"&as_of={position}").content == _statement(member, f"&as_of={position}").content
    assert _statement(member, f"&as_of={position}").json() == s


def test_everyone_else_is_refused_with_a_clear_json_error(stack: Stack, people: People,  # noqa: F811
                                                          browser_of) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    base = stack.base_url.removesuffix("/v1")
    with httpx.Client(base_url=base, timeout=30) as anonymous:
        refused = _statement(anonymous)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthenticated"
        bad_key = _statement(anonymous, authorization="Bearer sk-lw-not-a-real-key")
        assert bad_key.status_code == 401 and bad_key.json()["error"]["code"] == "invalid_api_key"
        assert anonymous.get("/api/reports/platform").status_code == 401
    outsider = browser_of("outsider@uni.edu")
    assert _statement(outsider).status_code == 404  # another's project reads as absent
    member = browser_of("member@uni.edu")
    assert member.get("/api/reports/platform").json()["error"]["code"] == "permission_denied"
    for query, code in (("&format=xml", "invalid_format"), ("&as_of=-3", "invalid_value"),
                        ("&as_of=99999999999", "invalid_value")):
        bad = _statement(member, query)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == code, (query, bad.text)
    backwards = member.get("/api/reports/projects/nlp/statement?start=2026-12-01&end=2026-11-01")
    assert backwards.status_code == 400 and "runs forward" in backwards.json()["error"]["message"]
    zh = browser_of("member@uni.edu", "zh-TW").get("/api/reports/projects/nlp/statement?start=tomorrow")
    assert zh.status_code == 400 and zh.json()["error"]["message"] == "期間為兩個日期，格式 YYYY-MM-DD。"
    assert member.get("/api/reports/projects/nope/statement").status_code == 404


def test_administrators_download_the_platform_report(stack: Stack) -> None:
    with httpx.Client(base_url=stack.base_url.removesuffix("/v1"), timeout=30,
                      cookies={"lwapi_lang": "en"}) as admin:
        assert login(admin, "ops@uni.edu", "admin-password-1").status_code in (302, 303)
        assert 'action="/api/reports/platform"' in admin.get("/admin/projects").text
        report = admin.get(f"/api/reports/platform?{PERIOD}")
        assert report.status_code == 200 and [p["code"] for p in report.json()["projects"]] == ["nlp"]
        as_csv = admin.get(f"/api/reports/platform?{PERIOD}&format=csv")
        assert as_csv.text.splitlines()[0].startswith("code,name,opening_balance")
        statement = admin.get(f"/api/reports/projects/nlp/statement?{PERIOD}")  # administrators see every project
        assert statement.status_code == 200
