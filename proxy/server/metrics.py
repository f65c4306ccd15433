"""Prometheus metrics (DESIGN §5), with `prometheus_client`.

One view across workers: with `server.workers > 1` the supervisor sets `PROMETHEUS_MULTIPROC_DIR`
to a fresh directory before forking (`multiprocess_directory`), every worker's values live in
memory-mapped files there, and a scrape of any worker renders them all (`MultiProcessCollector`).
Without it, values live in this process and a private registry renders them (so apps built
side by side in one process, as tests do, never share counters).

The hot path (`Metrics.request`) looks its label children up in a dict: prometheus_client's own
`labels()` validates and copies the label values on every call.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

__all__ = ["CONTENT_TYPE", "Metrics", "multiprocess_directory", "worker_exited"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Requests: fast allowed calls (ms) up to held ones that wait for a human (minutes).
REQUEST_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
)  # fmt: skip
# From an approval's request to its decision: seconds to an hour (approvals' default timeout
# is 15 minutes).
DECISION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0)

# `decision` of a request refused before the policy judged it (no route, 401, bad path, 413).
NO_DECISION = "none"
NO_ROUTE = "none"


class Metrics:
    """The families of DESIGN §5 and the calls that record them."""

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        if self.multiprocess_dir and not getattr(values.ValueClass, "_multiprocess", False):
            # prometheus_client picks its value class when first imported; the supervisor sets
            # the directory later (just before forking), so pick again now.
            values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)
        registry = self.registry
        self.requests = Counter(
            "countersign_requests",
            "Requests answered, by route, policy decision and the status the client was sent.",
            ["route", "decision", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "countersign_request_duration_seconds",
            "Time from a request's arrival to the end of its answer (held requests included).",
            ["route", "decision"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.approvals_pending = Gauge(
            "countersign_approvals_pending",
            "Requests held waiting for an approver's decision.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.approval_decision = Histogram(
            "countersign_approval_decision_seconds",
            "Time from an approval's request to the decision that settled it.",
            buckets=DECISION_BUCKETS,
            registry=registry,
        )
        self.notify_failures = Counter(
            "countersign_notify_failures",
            "Notifications that could not be delivered, by channel.",
            ["channel"],
            registry=registry,
        )
        self.slack_fallback_messages = Counter(
            "countersign_slack_fallback_messages",
            "Approval messages Slack refused, sent instead as a minimal message with the link.",
            registry=registry,
        )
        self.teams_fallback_cards = Counter(
            "countersign_teams_fallback_cards",
            "Approval cards Teams refused, sent instead as a minimal card with the link.",
            registry=registry,
        )
        self.upstream_errors = Counter(
            "countersign_upstream_errors",
            "Upstream failures (unreachable, timeout, broken answer), by route and kind.",
            ["route", "kind"],
            registry=registry,
        )
        self.audit_checkpoints = Counter(
            "countersign_audit_checkpoints",
            "Signed audit checkpoints written.",
            registry=registry,
        )
        self.audit_anchor_failures = Counter(
            "countersign_audit_anchor_failures",
            "Failed attempts to deliver a signed audit checkpoint to an anchor, by anchor.",
            ["anchor"],
            registry=registry,
        )
        self.connections_open = Gauge(
            "countersign_connections_open",
            "Client connections open on the front (the public port).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.connections_closed = Counter(
            "countersign_connections_closed",
            "Client connections the front closed or refused for a limit, by reason "
            "(header_timeout, body_timeout, idle_timeout, max_connections, header_too_large, "
            "invalid_request).",
            ["reason"],
            registry=registry,
        )
        self._front_counted: dict[str, int] = {}
        # Run before each render: values kept elsewhere (the front's counters) are copied in.
        self.before_render: list[Callable[[], None]] = []
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def request(self, route: str, decision: str, status: int, seconds: float) -> None:
        """One answered request: `status` is what the client was actually sent."""
        key = (route, decision, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(route, decision, str(status)),
                self.request_duration.labels(route, decision),
            )
        children[0].inc()
        children[1].observe(seconds)

    def upstream_error(self, route: str, kind: str) -> None:
        self.upstream_errors.labels(route, kind).inc()

    def notify_failure(self, channel: str) -> None:
        self.notify_failures.labels(channel).inc()

    def slack_fallback(self) -> None:
        """Slack refused an approval's message; the minimal one with the link was sent."""
        self.slack_fallback_messages.inc()

    def teams_fallback(self) -> None:
        """Teams refused an approval's card; the minimal one with the link was sent."""
        self.teams_fallback_cards.inc()

    def checkpoint(self) -> None:
        """A signed checkpoint was written to the audit file."""
        self.audit_checkpoints.inc()

    def anchor_failure(self, anchor: str) -> None:
        """An attempt to deliver to `anchor` (its URL without secrets) failed."""
        self.audit_anchor_failures.labels(anchor).inc()

    def front(self, open_connections: int, closed: Mapping[str, int]) -> None:
        """The front's connections now, and its running totals of closes by reason (only the
        growth since the last call is added)."""
        self.connections_open.set(open_connections)
        for reason, total in closed.items():
            grown = total - self._front_counted.get(reason, 0)
            if grown > 0:
                self.connections_closed.labels(reason).inc(grown)
                self._front_counted[reason] = total

    def held(self, delta: int) -> None:
        """`delta` more (or fewer) requests of this process wait for a decision."""
        self.approvals_pending.inc(delta)

    def decided(self, seconds: float) -> None:
        """An approval settled (approved or denied) `seconds` after it was requested."""
        self.approval_decision.observe(max(seconds, 0.0))

    def render(self) -> bytes:
        """The Prometheus text exposition of every family (of every worker, in multiprocess
        mode)."""
        for hook in self.before_render:
            hook()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


@contextlib.contextmanager
def multiprocess_directory() -> Iterator[str]:
    """For a supervisor of workers: a fresh, empty `PROMETHEUS_MULTIPROC_DIR` for this run, set
    in the environment the workers inherit, and removed at exit (stale files of an earlier run
    would add its counts to this one's)."""
    directory = tempfile.mkdtemp(prefix="countersign-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = directory
    try:
        yield directory
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(directory, ignore_errors=True)


def worker_exited(pid: int) -> None:
    """A worker is gone: its live gauges (held requests) stop counting; its counters stay."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
