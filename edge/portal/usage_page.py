"""Portal page of a project's usage: tokens and cost per day, by model and by key, for a chosen period.

Imports: everything inward. The figures come from the `usage_rollups` read model; the charts are drawn
in the browser by Plotly (its JavaScript ships inside the `plotly` package and is served by this
service, no CDN), from the same numbers as the table under them.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import plotly
from litestar import get
from litestar.datastructures import CacheControlHeader
from litestar.response import File, Redirect, Template

from edge import queries
from edge.portal.context import AnyRequest, pool_of, render, translator
from edge.portal.project_pages import Visit, page_context, visit_of

DEFAULT_DAYS = 30
PERIOD_DAYS_MAX = 366
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def _period(start: str, end: str) -> tuple[date, date, str | None]:
    """[first, last] days (UTC) of the period asked for; a bad one falls back to the last 30 days."""
    today = datetime.now(UTC).date()
    try:
        last = date.fromisoformat(end) if end else today
        first = date.fromisoformat(start) if start else last - timedelta(days=DEFAULT_DAYS - 1)
    except ValueError:
        return today - timedelta(days=DEFAULT_DAYS - 1), today, "usage.bad_period"
    if first > last or (last - first).days >= PERIOD_DAYS_MAX:
        return today - timedelta(days=DEFAULT_DAYS - 1), today, "usage.bad_period"
    return first, last, None


def series(rows: list[dict[str, Any]], days: list[date], by: str, value: str) -> list[dict[str, Any]]:
    """One chart trace per model (or key): the value summed per day, zero on days without use."""
    totals: dict[str, dict[date, int]] = defaultdict(lambda: defaultdict(int))
    for row in rows:
        totals[row[by]][row["day"]] += row[value] if value != "tokens" else row["tokens_prompt"] + \
            row["tokens_completion"]
    return [{"name": name, "x": [d.isoformat() for d in days], "y": [per_day.get(d, 0) for d in days]}
            for name, per_day in sorted(totals.items())]


@get("/projects/{code:str}/usage")
async def usage_page(request: AnyRequest, code: str, start: str = "", end: str = "") -> Template | Redirect:
    visit = await visit_of(request, code)
    if not isinstance(visit, Visit):
        return visit
    first, last, problem = _period(start[:10], end[:10])
    rows = await queries.usage_rows(pool_of(request), visit.project["project_id"],
                                    datetime.combine(first, time(), UTC), datetime.combine(last + timedelta(days=1),
                                                                                           time(), UTC))
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    t = translator(request)
    charts = {
        "tokens_by_model": series(rows, days, "model", "tokens"),
        "cost_by_model": series(rows, days, "model", "cost_credits"),
        "tokens_by_key": series(rows, days, "key_name", "tokens"),
    }
    totals = {k: sum(r[k] for r in rows) for k in ("requests", "tokens_prompt", "tokens_completion", "cost_credits")}
    return render(request, "usage.html", **page_context(visit), rows=rows, charts=charts, totals=totals,
                  first=first.isoformat(), last=last.isoformat(), error=t(problem) if problem else None)


@get("/vendor/plotly.min.js", cache_control=CacheControlHeader(max_age=86400, public=True))
async def plotly_js() -> File:
    return File(PLOTLY_JS, content_disposition_type="inline", media_type="text/javascript")


usage_routes = [usage_page, plotly_js]
