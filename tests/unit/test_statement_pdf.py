"""The statement PDF: zh-TW text in an embedded CJK subset, several pages, and reproducible bytes."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pytest
from pypdf import PdfReader

from adapters import statement_pdf
from adapters.statement_pdf import StatementFontMissing, render_statement_pdf

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".artifacts" / "statements"
DAYS = 120
PROJECT_NAME = "自然語言處理實驗室"
KEY_NAME = "notebook 筆電"
LONG_MODEL = "meta-llama/Llama-3.3-70B-Instruct-with-an-unreasonably-long-deployment-suffix-v2"
DIGEST = "0123456789abcdef" + "f" * 48

LABELS = {
    "zh-TW": {
        "title": "帳單明細",
        "project": "專案",
        "period": "期間",
        "as_of": "事件日誌位置",
        "chain_digest": "鏈摘要",
        "opening_balance": "期初餘額",
        "grants": "核發額度",
        "corrections": "更正",
        "charges": "使用費用",
        "closing_balance": "期末餘額",
        "credits_section": "額度異動",
        "by_day": "每日用量",
        "by_model": "各模型用量",
        "by_key": "各金鑰用量",
        "day": "日期",
        "model": "模型",
        "key": "金鑰",
        "requests": "請求數",
        "tokens_prompt": "輸入詞元",
        "tokens_completion": "輸出詞元",
        "cost": "費用",
        "date": "時間",
        "kind": "類型",
        "amount": "金額",
        "reason": "原因",
        "by": "操作者",
        "grant": "核發",
        "correction": "更正",
        "total": "合計",
        "page": "第 {n} 頁，共 {total} 頁",
    },
    "en": {
        "title": "Statement",
        "project": "Project",
        "period": "Period",
        "as_of": "As of event log position",
        "chain_digest": "Chain digest",
        "opening_balance": "Opening balance",
        "grants": "Grants",
        "corrections": "Corrections",
        "charges": "Charges",
        "closing_balance": "Closing balance",
        "credits_section": "Credits",
        "by_day": "Usage by day",
        "by_model": "Usage by model",
        "by_key": "Usage by key",
        "day": "Day",
        "model": "Model",
        "key": "Key",
        "requests": "Requests",
        "tokens_prompt": "Prompt tokens",
        "tokens_completion": "Completion tokens",
        "cost": "Cost",
        "date": "Date",
        "kind": "Kind",
        "amount": "Amount",
        "reason": "Reason",
        "by": "By",
        "grant": "Grant",
        "correction": "Correction",
        "total": "Total",
        "page": "Page {n} of {total}",
    },
}


def _counters(i: int) -> dict[str, int]:
    return {
        "requests": 10 + i,
        "tokens_prompt": 12_345 * (i + 1),
        "tokens_prompt_cached": 100 * i,
        "tokens_completion": 6_789 * (i + 1),
        "cost": 1_000 + i,
    }


def make_statement() -> dict[str, object]:
    first = date(2026, 8, 3)
    by_day = [{"day": (first + timedelta(days=i)).isoformat(), **_counters(i)} for i in range(DAYS)]
    return {
        "project": {"id": "7d4f7c1e-3f0a-4d7e-9a55-0c1f2b3c4d5e", "code": "nlp", "name": PROJECT_NAME},
        "period": {"from": by_day[0]["day"], "to": by_day[-1]["day"]},
        "as_of": {"position": 123456, "chain_digest": DIGEST},
        "opening_balance": 1_000_000,
        "granted": 500_000,
        "corrected": -1_500,
        "charged": 123_456,
        "closing_balance": 1_375_044,
        "credits": [
            {
                "at": "2026-08-03T04:05:06Z",
                "kind": "grant",
                "amount": 500_000,
                "reason": "國科會計畫 NSTC 115-2221-E-002 第二期經費撥入，供語言模型評估實驗使用 " * 2,
                "by": "ops@uni.edu",
                "position": 17,
            },
            {
                "at": "2026-09-14T10:00:00Z",
                "kind": "correction",
                "amount": -1_500,
                "reason": "duplicate charge refund",
                "by": "a-very-long-operator-address@department.example.edu",
                "position": 4_021,
            },
        ],
        "totals": {
            "requests": 99_999,
            "tokens_prompt": 1_234_567_890,
            "tokens_prompt_cached": 0,
            "tokens_completion": 987_654_321,
            "cost": 123_456,
        },
        "by_day": by_day,
        "by_model": [{"model": "llama-3", **_counters(1)}, {"model": LONG_MODEL, **_counters(2)}],
        "by_key": [
            {
                "key_id": "1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed",
                "key_prefix": "sk-lw-abc123",
                "key_name": KEY_NAME,
                **_counters(3),
            },
            {
                "key_id": "6ec0bd7f-11c0-43da-975e-2a8ad9ebae0b",
                "key_prefix": "sk-lw-def456",
                "key_name": "研究助理共用金鑰（長名稱測試用，不應超出欄位邊界）" * 3,
                **_counters(4),
            },
        ],
    }


def _flat(text: str) -> str:
    # pypdf reads the codes of fpdf2's CFF CID fonts (a custom /Encoding CMap) a byte at a time, so it
    # puts NULs or spaces between glyphs (poppler's pdftotext does not); compare without them.
    return re.sub(r"[\s\x00]+", "", text)


@pytest.fixture(scope="module")
def rendered() -> dict[str, bytes]:
    statement = make_statement()
    try:
        out = {language: render_statement_pdf(statement, LABELS[language], language=language) for language in LABELS}
    except StatementFontMissing as error:
        pytest.skip(f"no CJK font on this machine: {error}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for language, pdf in out.items():
        (ARTIFACTS / f"statement-{language}.pdf").write_bytes(pdf)
    pdftoppm = shutil.which("pdftoppm")
    if pdftoppm:
        for page in (1, 2):
            subprocess.run(
                [
                    pdftoppm,
                    "-png",
                    "-r",
                    "80",
                    "-f",
                    str(page),
                    "-l",
                    str(page),
                    "-singlefile",
                    str(ARTIFACTS / "statement-zh-TW.pdf"),
                    str(ARTIFACTS / f"statement-zh-TW-page{page}"),
                ],
                check=True,
                timeout=60,
            )
    return out


@pytest.mark.parametrize("language", ["zh-TW", "en"])
def test_is_a_pdf_and_deterministic(rendered: dict[str, bytes], language: str) -> None:
    pdf = rendered[language]
    assert pdf.startswith(b"%PDF-")
    again = render_statement_pdf(make_statement(), LABELS[language], language=language)
    assert again == pdf


def test_bytes_do_not_depend_on_the_process() -> None:
    """Hash seeds differ between processes; the bytes must not (a set's order must not leak in)."""
    code = (
        "import hashlib, sys; sys.path[:0] = [sys.argv[1], sys.argv[2]];"
        "from test_statement_pdf import make_statement, LABELS;"
        "from adapters.statement_pdf import render_statement_pdf;"
        "print(hashlib.sha256(render_statement_pdf(make_statement(), LABELS['zh-TW'], language='zh-TW')).hexdigest())"
    )
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        try:
            done = subprocess.run(
                [sys.executable, "-c", code, str(ROOT), str(Path(__file__).parent)],
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
                check=True,
            )
        except subprocess.CalledProcessError as error:
            if "StatementFontMissing" in error.stderr:
                pytest.skip("no CJK font on this machine")
            raise
        digests.add(done.stdout.strip())
    assert len(digests) == 1


@pytest.mark.parametrize("language", ["zh-TW", "en"])
def test_text_labels_and_amounts(rendered: dict[str, bytes], language: str) -> None:
    reader = PdfReader(io.BytesIO(rendered[language]))
    first = _flat(reader.pages[0].extract_text())
    everything = _flat("".join(page.extract_text() for page in reader.pages))
    labels = LABELS[language]
    assert _flat(PROJECT_NAME) in first
    assert "1,375,044" in first
    for key in ("title", "opening_balance", "grants", "corrections", "charges", "closing_balance", "credits_section"):
        assert _flat(labels[key]) in first, key
    for key in ("by_day", "by_model", "by_key", "total", "requests", "tokens_prompt", "tokens_completion", "cost"):
        assert _flat(labels[key]) in everything, key
    assert "sk-lw-abc123" in everything
    assert _flat(KEY_NAME) in everything
    assert "1,234,567,890" in everything  # the totals row
    assert "…" in everything  # the long model and key names were cut, not let overflow
    assert reader.trailer["/Root"]["/Lang"] == language


def test_embedded_font_is_the_cjk_subset(rendered: dict[str, bytes]) -> None:
    reader = PdfReader(io.BytesIO(rendered["zh-TW"]))
    fonts = {}
    for page in reader.pages:
        for reference in page["/Resources"]["/Font"].values():
            font = reference.get_object()
            fonts[str(font["/BaseFont"])] = font
    assert len(fonts) == 1, fonts.keys()
    ((name, font),) = fonts.items()
    # "ABCDEF+" marks a subset; Noto Sans CJK TC or Noto Sans TC, whichever the machine provides.
    assert re.fullmatch(r"/[A-Z]{6}\+NotoSans(CJK)?TC", name), name
    descendant = font["/DescendantFonts"][0].get_object()
    descriptor = descendant["/FontDescriptor"].get_object()
    embedded = descriptor.get("/FontFile3") or descriptor.get("/FontFile2")
    assert embedded is not None
    # A subset of a ~16 MB face: a few hundred glyphs, far under a megabyte.
    assert len(embedded.get_object().get_data()) < 500_000


@pytest.mark.parametrize("language", ["zh-TW", "en"])
def test_several_pages_each_with_footer(rendered: dict[str, bytes], language: str) -> None:
    reader = PdfReader(io.BytesIO(rendered[language]))
    total = len(reader.pages)
    assert total > 1
    labels = LABELS[language]
    for number, page in enumerate(reader.pages, start=1):
        text = _flat(page.extract_text())
        expected_page = _flat(labels["page"].replace("{n}", str(number)).replace("{total}", str(total)))
        assert expected_page in text, (number, text[-200:])
        assert _flat(labels["as_of"]) + "123,456" in text
        assert DIGEST[:16] in text
        assert DIGEST not in text or number == 1  # the footer shows it shortened; only page 1 spells it out


def test_rejects_unknown_language() -> None:
    with pytest.raises(ValueError, match="language"):
        render_statement_pdf(make_statement(), LABELS["en"], language="fr")


def test_missing_labels_fall_back_to_keys(rendered: dict[str, bytes]) -> None:
    pdf = render_statement_pdf(make_statement(), {}, language="en")
    text = _flat("".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages))
    assert "closing_balance" in text
    assert "by_day" in text


def test_no_font_raises_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statement_pdf, "_packaged_faces", list)
    monkeypatch.setattr(statement_pdf, "_fontconfig_faces", list)
    monkeypatch.setattr(statement_pdf, "_SYSTEM_FONTS", (statement_pdf._FontFace(Path("/nonexistent/font.ttc"), 3),))
    statement_pdf._statement_font.cache_clear()
    try:
        with pytest.raises(StatementFontMissing, match="fonts-noto-cjk"):
            render_statement_pdf(make_statement(), LABELS["en"], language="en")
    finally:
        statement_pdf._statement_font.cache_clear()
