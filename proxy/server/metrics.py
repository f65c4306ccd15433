"""A few Prometheus counters, rendered in the text exposition format.

Hand-written because the set is tiny and the hot path only increments dict entries.
"""

from __future__ import annotations

from collections import Counter


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (outcome, status) -> count
        self.duration_sum = 0.0
        self.duration_count = 0

    def observe(self, outcome: str, status: int, seconds: float) -> None:
        self.requests[(outcome, status)] += 1
        self.duration_sum += seconds
        self.duration_count += 1

    def render(self) -> str:
        lines = [
            "# HELP countersign_requests_total Requests handled, by outcome and status.",
            "# TYPE countersign_requests_total counter",
        ]
        for (outcome, status), count in sorted(self.requests.items()):
            lines.append(
                f'countersign_requests_total{{outcome="{outcome}",status="{status}"}} {count}'
            )
        lines += [
            "# HELP countersign_request_duration_seconds Time from request to response end.",
            "# TYPE countersign_request_duration_seconds summary",
            f"countersign_request_duration_seconds_sum {self.duration_sum:.6f}",
            f"countersign_request_duration_seconds_count {self.duration_count}",
        ]
        return "\n".join(lines) + "\n"
