"""Render a project's billing statement (a plain dict) into a printable, reproducible A4 PDF.

Imports: stdlib, fpdf2. The caller passes the statement (money in integer credits) and the
translated words from its message catalog; this module only lays them out: a header, a summary
box, the credits table and the usage tables by day, model and key, each with a total row, their
column headings repeated on every page they run onto, and a footer on every page naming the
event log position and chain digest the statement was computed at, and "page n of N".

All text is set in one embedded, subsetted Traditional Chinese face (Noto Sans TC, which also
covers Latin), found at run time and never downloaded: first a font package installed from PyPI
(`pylopdf-fonts-zh-tw`, if the environment has it), then Debian's `fonts-noto-cjk` and the other
well-known paths of Noto Sans CJK, then fontconfig. None found raises `StatementFontMissing`.

The same statement, labels, language and font file give byte-identical PDF bytes: the creation
date derives from the statement's period, the file /ID is a hash of the content, no XMP
metadata (whose modify date would be "now") is written, and nothing is encrypted or signed.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, Final, Literal

from fpdf import FPDF
from fpdf.enums import MethodReturnValue, WrapMode

SUPPORTED_LANGUAGES: Final = frozenset({"zh-TW", "en"})

# A statement covers one period, so a month has at most 31 days; keys and models can be many,
# but a table past this many rows is a caller bug, not a statement anyone could read on paper.
MAX_ROWS_PER_TABLE: Final = 5_000
# Bounds the work of measuring one cell: nothing legitimate in a statement is longer.
MAX_CELL_CHARS: Final = 500
# A wrapped cell (a credit's reason, a key's name) shows at most this many lines, the last cut with "…".
MAX_WRAP_LINES: Final = 3
MAX_FONTCONFIG_CANDIDATES: Final = 200
FONTCONFIG_TIMEOUT_S: Final = 5.0

FONT_FAMILY: Final = "statement-cjk"
ELLIPSIS: Final = "…"
DIGEST_SHOWN_HEX: Final = 16

# Millimetres, A4 portrait.
MARGIN_MM: Final = 15.0
FOOTER_HEIGHT_MM: Final = 14.0
LINE_MM: Final = 5.0
CELL_PAD_MM: Final = 1.0

TEXT_GREY: Final = 30
MUTED_GREY: Final = 110
RULE_GREY: Final = 190
HEADING_FILL: Final = 232
TOTAL_FILL: Final = 244


class StatementFontMissing(RuntimeError):
    """No font with Traditional Chinese glyphs was found; install `fonts-noto-cjk`."""


@dataclass(frozen=True, slots=True)
class _FontFace:
    path: Path
    collection_index: int = 0


# (module, file): fonts that `uv sync` alone would bring, tried before the system's.
_PACKAGED_FONTS: Final[tuple[tuple[str, str], ...]] = (("pylopdf_fonts_zh_tw", "NotoSansTC-Regular.otf"),)

# In Noto Sans CJK's collections the faces are JP, KR, SC, TC, HK in that order (since 2.000), so
# Traditional Chinese (Taiwan) is face 3; the family name is still checked once it is loaded.
_NOTO_CJK_TC_INDEX: Final = 3
_SYSTEM_FONTS: Final[tuple[_FontFace, ...]] = (
    _FontFace(Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"), _NOTO_CJK_TC_INDEX),  # Debian, Ubuntu
    _FontFace(Path("/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc"), _NOTO_CJK_TC_INDEX),  # Arch
    _FontFace(Path("/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc"), _NOTO_CJK_TC_INDEX),  # Fedora <= 38
    _FontFace(Path("/usr/share/fonts/opentype/noto/NotoSansCJKtc-Regular.otf")),
    _FontFace(Path("/usr/share/fonts/truetype/noto/NotoSansTC-Regular.otf")),
)
# fpdf2 embeds TrueType and OpenType (CFF) outlines; bitmap and Type 1 fonts fontconfig may list are of no use.
_LOADABLE_SUFFIXES: Final = (".ttf", ".otf", ".ttc", ".otc")
# Family names of faces drawn for Taiwan's glyph forms, preferred over a merely covering face.
_TRADITIONAL_MARKERS: Final = ("TC", "TW", "HK", "Traditional")


def _packaged_faces() -> list[_FontFace]:
    faces: list[_FontFace] = []
    for module, filename in _PACKAGED_FONTS:
        # find_spec rather than import: the package is optional and has no code worth running.
        if importlib.util.find_spec(module) is None:
            continue
        resource = importlib.resources.files(module) / filename
        faces.append(_FontFace(Path(str(resource))))
    return faces


def _fontconfig_faces() -> list[_FontFace]:
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        return []
    try:
        listed = subprocess.run(  # noqa: S603 - fixed arguments, no shell, binary found on PATH
            [fc_list, "--format", "%{file}\t%{index}\t%{family}\n", ":lang=zh-tw"],
            capture_output=True,
            text=True,
            timeout=FONTCONFIG_TIMEOUT_S,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    ranked: list[tuple[int, str, int]] = []
    for line in listed.splitlines()[:MAX_FONTCONFIG_CANDIDATES]:
        parts = line.split("\t")
        if len(parts) != 3 or not parts[0].lower().endswith(_LOADABLE_SUFFIXES) or not parts[1].isdigit():
            continue
        traditional = any(marker in parts[2] for marker in _TRADITIONAL_MARKERS)
        # Sorted so the choice does not depend on fontconfig's listing order.
        ranked.append((0 if traditional else 1, parts[0], int(parts[1])))
    return [_FontFace(Path(path), index) for _, path, index in sorted(ranked)]


def _family_name(pdf: FPDF) -> str:
    font = pdf.fonts[FONT_FAMILY]
    ttfont = getattr(font, "ttfont", None)
    if ttfont is None:
        return ""
    return str(ttfont["name"].getDebugName(1) or "")


@functools.cache
def _statement_font() -> _FontFace:
    """The first usable Traditional Chinese face; cached once found (a failure is not cached)."""
    tried: list[str] = []
    for face in [*_packaged_faces(), *(f for f in _SYSTEM_FONTS if f.path.is_file()), *_fontconfig_faces()]:
        probe = FPDF()
        try:
            probe.add_font(FONT_FAMILY, "", str(face.path), collection_font_number=face.collection_index)
        except Exception as error:  # noqa: BLE001 - a font fpdf2 cannot read is skipped, whatever the reason
            tried.append(f"{face.path}#{face.collection_index} ({error})")
            continue
        family = _family_name(probe)
        if face.collection_index and not any(marker in family for marker in _TRADITIONAL_MARKERS):
            # A collection whose face order differs from Noto's: wrong glyph forms, so keep looking.
            tried.append(f"{face.path}#{face.collection_index} (is {family!r})")
            continue
        return face
    detail = f" Tried: {'; '.join(tried)}." if tried else ""
    raise StatementFontMissing(
        "No Traditional Chinese font found for PDF statements: install Debian's `fonts-noto-cjk` "
        "(apt-get install fonts-noto-cjk), which provides "
        "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc." + detail
    )


def _label(labels: Mapping[str, str], key: str) -> str:
    return labels.get(key) or key


def _money(value: Any) -> str:
    return f"{int(value):,}"


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 1] + ELLIPSIS


Align = Literal["L", "R", "C"]


@dataclass(frozen=True, slots=True)
class _Column:
    heading: str
    width: float
    align: Align = "L"
    wrap: bool = False


class _StatementDocument(FPDF):
    """FPDF with the statement's running header and footer, and the table drawing it needs."""

    def __init__(self, running_header: str, footer_left: str, page_label: str) -> None:
        super().__init__(orientation="P", unit="mm", format="A4")
        self.running_header = running_header
        self.footer_left = footer_left
        self.page_label = page_label
        # Tables break pages themselves, so heading rows repeat and rows never split.
        self.set_auto_page_break(auto=False)
        self.set_margins(MARGIN_MM, MARGIN_MM, MARGIN_MM)
        self.c_margin = CELL_PAD_MM

    @property
    def content_width(self) -> float:
        return self.w - self.l_margin - self.r_margin

    @property
    def content_bottom(self) -> float:
        return self.h - MARGIN_MM - FOOTER_HEIGHT_MM

    def header(self) -> None:
        if self.page_no() == 1:
            return
        self.set_font(FONT_FAMILY, size=8)
        self.set_text_color(MUTED_GREY)
        self.set_xy(self.l_margin, MARGIN_MM - 6)
        self.cell(self.content_width, 4, self.fit(self.running_header, self.content_width))
        self.set_draw_color(RULE_GREY)
        self.line(self.l_margin, MARGIN_MM - 1.5, self.w - self.r_margin, MARGIN_MM - 1.5)
        self.set_text_color(TEXT_GREY)
        self.set_xy(self.l_margin, MARGIN_MM + 2)

    def footer(self) -> None:
        top = self.h - MARGIN_MM - FOOTER_HEIGHT_MM + 6
        self.set_draw_color(RULE_GREY)
        self.line(self.l_margin, top, self.w - self.r_margin, top)
        self.set_font(FONT_FAMILY, size=7.5)
        self.set_text_color(MUTED_GREY)
        page = self.page_label.replace("{n}", str(self.page_no())).replace("{total}", "{nb}")
        if "{nb}" not in page:
            page = f"{page} {self.page_no()}/{{nb}}"
        # "{nb}" is measured at its own width; fpdf2 substitutes the page count at output.
        page_width = self.get_string_width(page.replace("{nb}", "000")) + 2 * CELL_PAD_MM
        self.set_xy(self.l_margin, top + 1.5)
        self.cell(self.content_width - page_width, 4, self.fit(self.footer_left, self.content_width - page_width))
        self.cell(page_width, 4, page, align="R")
        self.set_text_color(TEXT_GREY)

    def fit(self, text: str, width: float) -> str:
        """`text` cut with "…" to fit one line of `width` mm, cell padding included."""
        text = _shorten(text.replace("\n", " "))
        room = width - 2 * self.c_margin
        if self.get_string_width(text) <= room:
            return text
        # Binary search on the prefix length: at most log2(MAX_CELL_CHARS) measurements.
        low, high = 0, len(text)
        while low < high:
            middle = (low + high + 1) // 2
            if self.get_string_width(text[:middle] + ELLIPSIS) <= room:
                low = middle
            else:
                high = middle - 1
        return text[:low].rstrip() + ELLIPSIS

    def wrap(self, text: str, width: float) -> list[str]:
        """`text` broken into at most MAX_WRAP_LINES lines of `width` mm, the last cut with "…"."""
        text = _shorten(text)
        result = self.multi_cell(
            width, LINE_MM, text, dry_run=True, output=MethodReturnValue.LINES, wrapmode=WrapMode.WORD
        )
        lines = [str(line) for line in result] if isinstance(result, list) else [text]
        if len(lines) > MAX_WRAP_LINES:
            lines = [*lines[: MAX_WRAP_LINES - 1], self.fit(" ".join(lines[MAX_WRAP_LINES - 1 :]), width)]
        return lines or [""]

    def section_heading(self, text: str, room_after: float) -> None:
        """A heading kept on the same page as `room_after` mm of what follows it."""
        height = 9.0
        if self.get_y() + height + room_after > self.content_bottom:
            self.add_page()
        self.ln(2)
        self.set_font(FONT_FAMILY, size=11.5)
        self.set_x(self.l_margin)
        self.cell(self.content_width, 7, self.fit(text, self.content_width), new_x="LMARGIN", new_y="NEXT")

    def draw_table(
        self,
        columns: Sequence[_Column],
        rows: Sequence[Sequence[str]],
        total: Sequence[str] | None = None,
    ) -> None:
        if len(rows) > MAX_ROWS_PER_TABLE:
            raise ValueError(f"a statement table has {len(rows)} rows, more than {MAX_ROWS_PER_TABLE}")
        self.set_font(FONT_FAMILY, size=8.5)
        heading = [column.heading for column in columns]
        self._row(columns, heading, fill=HEADING_FILL, always_wrap=True)
        for row in rows:
            if self._row_height(columns, row) + self.get_y() > self.content_bottom:
                self.add_page()
                self._row(columns, heading, fill=HEADING_FILL, always_wrap=True)
            self._row(columns, row)
        if total is not None:
            if self._row_height(columns, total) + self.get_y() > self.content_bottom:
                self.add_page()
                self._row(columns, heading, fill=HEADING_FILL, always_wrap=True)
            self._row(columns, total, fill=TOTAL_FILL)

    def _cell_lines(self, column: _Column, text: str, always_wrap: bool) -> list[str]:
        if column.wrap or always_wrap:
            return self.wrap(text, column.width)
        return [self.fit(text, column.width)]

    def _row_height(self, columns: Sequence[_Column], row: Sequence[str], always_wrap: bool = False) -> float:
        most = max(len(self._cell_lines(column, text, always_wrap)) for column, text in zip(columns, row, strict=True))
        return most * LINE_MM + 2 * CELL_PAD_MM

    def _row(
        self, columns: Sequence[_Column], row: Sequence[str], fill: int | None = None, always_wrap: bool = False
    ) -> None:
        height = self._row_height(columns, row, always_wrap)
        top = self.get_y()
        if fill is not None:
            self.set_fill_color(fill)
            self.rect(self.l_margin, top, sum(column.width for column in columns), height, style="F")
        x = self.l_margin
        for column, text in zip(columns, row, strict=True):
            for number, line in enumerate(self._cell_lines(column, text, always_wrap)):
                self.set_xy(x, top + CELL_PAD_MM + number * LINE_MM)
                self.cell(column.width, LINE_MM, line, align=column.align)
            x += column.width
        self.set_draw_color(RULE_GREY)
        self.line(self.l_margin, top + height, x, top + height)
        self.set_xy(self.l_margin, top + height)


def _creation_date(statement: Mapping[str, Any]) -> datetime:
    # A statement is final once its period has ended: stamp it at the period's last second, so
    # the same statement always carries the same date (the /ID hash includes it too).
    last_day = date.fromisoformat(str(statement["period"]["to"]))
    return datetime.combine(last_day, time(23, 59, 59), tzinfo=UTC)


def _usage_row(first: str, counters: Mapping[str, Any]) -> list[str]:
    return [
        first,
        _money(counters.get("requests", 0)),
        _money(counters.get("tokens_prompt", 0)),
        _money(counters.get("tokens_completion", 0)),
        _money(counters.get("cost", 0)),
    ]


def _key_title(row: Mapping[str, Any]) -> str:
    prefix = str(row.get("key_prefix") or row.get("key_id") or "")
    name = str(row.get("key_name") or "")
    return f"{prefix} {name}".strip()


def _summary(pdf: _StatementDocument, statement: Mapping[str, Any], labels: Mapping[str, str]) -> None:
    entries = [
        (_label(labels, "opening_balance"), statement["opening_balance"]),
        (_label(labels, "grants"), statement["granted"]),
        (_label(labels, "corrections"), statement["corrected"]),
        (_label(labels, "charges"), -int(statement["charged"])),
    ]
    width = pdf.content_width
    label_width = width * 0.6
    row_height = 6.0
    top = pdf.get_y()
    box_height = (len(entries) + 1) * row_height + 2 * CELL_PAD_MM + 1.5
    pdf.set_draw_color(RULE_GREY)
    pdf.rect(pdf.l_margin, top, width, box_height)
    pdf.set_font(FONT_FAMILY, size=10)
    pdf.set_xy(pdf.l_margin, top + CELL_PAD_MM)
    for text, amount in entries:
        pdf.set_x(pdf.l_margin + 2)
        pdf.cell(label_width - 2, row_height, pdf.fit(text, label_width - 2))
        pdf.cell(width - label_width - 2, row_height, _money(amount), align="R", new_x="LMARGIN", new_y="NEXT")
    rule = pdf.get_y() + 0.75
    pdf.line(pdf.l_margin + 2, rule, pdf.l_margin + width - 2, rule)
    pdf.set_fill_color(TOTAL_FILL)
    pdf.rect(pdf.l_margin + 0.2, rule + 0.2, width - 0.4, top + box_height - rule - 0.4, style="F")
    pdf.set_font(FONT_FAMILY, size=11.5)
    pdf.set_xy(pdf.l_margin + 2, rule + 0.75)
    pdf.cell(label_width - 2, row_height, pdf.fit(_label(labels, "closing_balance"), label_width - 2))
    pdf.cell(width - label_width - 2, row_height, _money(statement["closing_balance"]), align="R")
    pdf.set_xy(pdf.l_margin, top + box_height + 4)


def render_statement_pdf(statement: Mapping[str, Any], labels: Mapping[str, str], *, language: str) -> bytes:
    """The statement as PDF bytes: A4, in `language` ("zh-TW" or "en"), the same bytes for the same input."""
    if language not in SUPPORTED_LANGUAGES:
        raise ValueError(f"unsupported statement language {language!r}; expected one of {sorted(SUPPORTED_LANGUAGES)}")
    face = _statement_font()
    project = statement["project"]
    period = statement["period"]
    as_of = statement["as_of"]
    title = _label(labels, "title")
    name, code = str(project.get("name") or ""), str(project.get("code") or "")
    period_text = f"{period['from']} – {period['to']}"
    digest = str(as_of["chain_digest"])
    position = _money(as_of["position"])
    short_digest = digest[:DIGEST_SHOWN_HEX] + ELLIPSIS

    pdf = _StatementDocument(
        running_header=f"{title} · {name} ({code}) · {period_text}",
        footer_left=f"{_label(labels, 'as_of')} {position} · {_label(labels, 'chain_digest')} {short_digest}",
        page_label=_label(labels, "page"),
    )
    pdf.add_font(FONT_FAMILY, "", str(face.path), collection_font_number=face.collection_index)
    pdf.set_creation_date(_creation_date(statement))
    pdf.set_lang(language)
    pdf.set_title(f"{title} {code} {period['from']}/{period['to']}")
    pdf.set_subject(name)
    pdf.set_creator("Lightweight-API")
    pdf.set_text_color(TEXT_GREY)
    pdf.add_page()
    width = pdf.content_width

    pdf.set_font(FONT_FAMILY, size=20)
    pdf.cell(width, 10, pdf.fit(title, width), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(FONT_FAMILY, size=13)
    for line in pdf.wrap(f"{name} ({code})", width)[:2]:
        pdf.cell(width, 7, line, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(FONT_FAMILY, size=9.5)
    facts = [
        (_label(labels, "project"), f"{code} · {project.get('id', '')}"),
        (_label(labels, "period"), period_text),
        (_label(labels, "as_of"), position),
        (_label(labels, "chain_digest"), digest),
    ]
    key_width = 48.0
    for key, value in facts:
        pdf.set_text_color(MUTED_GREY)
        pdf.cell(key_width, 5.2, pdf.fit(key, key_width))
        pdf.set_text_color(TEXT_GREY)
        pdf.cell(width - key_width, 5.2, pdf.fit(value, width - key_width), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)
    _summary(pdf, statement, labels)

    credits = statement.get("credits") or []
    if credits:
        kinds = {"grant": _label(labels, "grant"), "correction": _label(labels, "correction")}
        credit_columns = [
            _Column(_label(labels, "date"), 36),
            _Column(_label(labels, "kind"), 20),
            _Column(_label(labels, "amount"), 26, "R"),
            _Column(_label(labels, "reason"), 58, wrap=True),
            _Column(_label(labels, "by"), width - 36 - 20 - 26 - 58),
        ]
        credit_rows = [
            [
                str(credit["at"]).replace("T", " "),
                kinds.get(str(credit["kind"]), str(credit["kind"])),
                _money(credit["amount"]),
                str(credit.get("reason") or ""),
                str(credit.get("by") or ""),
            ]
            for credit in credits
        ]
        pdf.section_heading(_label(labels, "credits_section"), room_after=3 * LINE_MM)
        pdf.draw_table(credit_columns, credit_rows)

    totals = statement["totals"]
    numbers = [
        (_label(labels, "requests"), 24.0),
        (_label(labels, "tokens_prompt"), 34.0),
        (_label(labels, "tokens_completion"), 34.0),
        (_label(labels, "cost"), 32.0),
    ]
    first_width = width - sum(column_width for _, column_width in numbers)
    sections: list[tuple[str, str, bool, list[list[str]]]] = [
        ("by_day", "day", False, [_usage_row(str(row["day"]), row) for row in statement.get("by_day") or []]),
        ("by_model", "model", True, [_usage_row(str(row["model"]), row) for row in statement.get("by_model") or []]),
        ("by_key", "key", True, [_usage_row(_key_title(row), row) for row in statement.get("by_key") or []]),
    ]
    for section, first_heading, wrap_first, rows in sections:
        columns = [
            _Column(_label(labels, first_heading), first_width, wrap=wrap_first),
            *(_Column(heading, column_width, "R") for heading, column_width in numbers),
        ]
        pdf.section_heading(_label(labels, section), room_after=3 * LINE_MM + 4 * CELL_PAD_MM)
        pdf.draw_table(columns, rows, total=_usage_row(_label(labels, "total"), totals))

    return bytes(pdf.output())
