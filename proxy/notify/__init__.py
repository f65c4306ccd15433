"""Telling people about approvals: the `Notifier` protocol and the hub that fans out to them.

Notifying never blocks or fails an approval: the hub schedules each delivery in the background,
and a notifier that is down only delays its own messages (the approval stays decidable through
the API). Events: `approval.requested`, `approval.decided`, `approval.expired`,
`approval.executed`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from ..model import Approval

log = structlog.get_logger("countersign.notify")

REQUESTED = "approval.requested"
DECIDED = "approval.decided"
EXPIRED = "approval.expired"
EXECUTED = "approval.executed"


class Notifier(Protocol):
    async def notify(self, event: str, approval: Approval) -> None:
        """Deliver one event; retrying is the notifier's business. May raise: the hub logs."""
        ...

    async def aclose(self) -> None: ...


def channel_of(notifier: Notifier) -> str:
    """The channel a notifier delivers to, as metrics label it: `SlackNotifier` -> "slack"."""
    return type(notifier).__name__.removesuffix("Notifier").lower() or "unknown"


class NotifyHub:
    def __init__(
        self,
        notifiers: Sequence[Notifier] = (),
        *,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self._notifiers = list(notifiers)
        self._tasks: set[asyncio.Task[None]] = set()
        # Told the channel of every delivery that failed (metrics count them).
        self._on_failure = on_failure

    def add(self, notifier: Notifier) -> None:
        self._notifiers.append(notifier)

    def __call__(self, event: str, approval: Approval) -> None:
        """Schedule `event` for every notifier and return at once."""
        for notifier in self._notifiers:
            task = asyncio.create_task(self._deliver(notifier, event, approval))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, notifier: Notifier, event: str, approval: Approval) -> None:
        try:
            await notifier.notify(event, approval)
        except Exception as exc:
            if self._on_failure is not None:
                self._on_failure(channel_of(notifier))
            log.warning(
                "notify.failed",
                notifier=type(notifier).__name__,
                notify_event=event,
                approval_id=approval.id,
                error=str(exc) or type(exc).__name__,
            )

    async def aclose(self, grace_seconds: float = 5.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_seconds)
        for task in list(self._tasks):
            task.cancel()
        for notifier in self._notifiers:
            with contextlib.suppress(Exception):
                await notifier.aclose()
