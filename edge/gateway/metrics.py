"""Prometheus metrics for the gateway, kept in plain dicts (no lock: one event loop writes them).

Imports: stdlib. Exposed at GET /metrics in Prometheus' text format (version 0.0.4).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LABEL_SETS_MAX = 10_000  # model names come from requests: bound the label space


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency_counts: dict[tuple[str, int], list[int]] = {}
        self.latency_sum: dict[tuple[str, int], float] = defaultdict(float)
        self.tokens: dict[tuple[str, str], int] = defaultdict(int)
        self.gauges: dict[str, Callable[[], float]] = {}

    def observe(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        if len(self.requests) >= LABEL_SETS_MAX and (endpoint, model, status) not in self.requests:
            model = "_other"
        self.requests[(endpoint, model, status)] += 1
        counts = self.latency_counts.setdefault((model, status), [0] * (len(LATENCY_BUCKETS_S) + 1))
        counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.latency_sum[(model, status)] += seconds

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.tokens[(model, "prompt")] += prompt
        self.tokens[(model, "completion")] += completion

    def render(self) -> bytes:
        lines = ["# HELP lwapi_requests_total Requests answered, by endpoint, model and status.",
                 "# TYPE lwapi_requests_total counter"]
        lines += [f'lwapi_requests_total{{endpoint="{e}",model="{_escape(m)}",status="{s}"}} {n}'
                  for (e, m, s), n in sorted(self.requests.items())]
        lines += ["# HELP lwapi_request_duration_seconds Time from request to last byte, by model and status.",
                  "# TYPE lwapi_request_duration_seconds histogram"]
        for (model, status), counts in sorted(self.latency_counts.items()):
            labels = f'model="{_escape(model)}",status="{status}"'
            total = 0
            for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), counts, strict=True):
                total += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'lwapi_request_duration_seconds_bucket{{{labels},le="{le}"}} {total}')
            lines.append(f"lwapi_request_duration_seconds_sum{{{labels}}} {self.latency_sum[(model, status)]}")
            lines.append(f"lwapi_request_duration_seconds_count{{{labels}}} {total}")
        lines += ["# HELP lwapi_tokens_total Tokens metered, by model and kind.", "# TYPE lwapi_tokens_total counter"]
        lines += [f'lwapi_tokens_total{{model="{_escape(m)}",kind="{k}"}} {n}'
                  for (m, k), n in sorted(self.tokens.items())]
        for name, read in sorted(self.gauges.items()):
            lines += [f"# TYPE {name} gauge", f"{name} {read()}"]
        return ("\n".join(lines) + "\n").encode()
