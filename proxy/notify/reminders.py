"""Reminding approvers once before a pending approval expires, for every chat channel.

When: at 80 % of the approval's lifetime or 5 minutes before it expires, whichever is later;
never for approvals that live less than 2 minutes (`reminder_at`). How: one timer per notifier
over a heap of due times (woken when an earlier one is scheduled), not a task per approval; the
channel's own `fire(approval_id)` says it (once across replicas: that is the channel's business,
with the store's notes and leases).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ..model import Approval, ApprovalState, Verdict
from ..model.persons import canonical_email

REMINDER_MIN_LIFETIME = 120.0
REMINDER_FRACTION = 0.8
REMINDER_BEFORE = 300.0


def reminder_at(approval: Approval, min_lifetime: float = REMINDER_MIN_LIFETIME) -> float | None:
    """When to remind approvers of a pending approval (unix time), or None for a short one."""
    lifetime = approval.expires_at - approval.created_at
    if lifetime < min_lifetime:
        return None
    return max(
        approval.created_at + REMINDER_FRACTION * lifetime, approval.expires_at - REMINDER_BEFORE
    )


def still_deciding(approval: Approval) -> list[str]:
    """Who may still decide: the people the rule or its groups' directory names who have not
    approved yet, never the requester or the agent's owner."""
    excluded = {
        canonical_email(d.person or d.approver_email)
        for d in approval.decisions
        if d.verdict is Verdict.APPROVE
    }
    excluded |= {
        canonical_email(approval.requester.person),
        canonical_email(approval.requester.owner),
    }
    people: list[str] = []
    for listed in (*approval.approver_members, *approval.approver_users):
        email = canonical_email(listed) or listed
        if email not in excluded and email not in people:
            people.append(email)
    return people


class Reminders:
    """Due reminders of one notifier: `schedule` an approval, `fire` runs when it is due."""

    def __init__(
        self,
        fire: Callable[[str], Coroutine[Any, Any, None]],
        *,
        name: str,
        min_lifetime: float = REMINDER_MIN_LIFETIME,
    ) -> None:
        self._fire = fire
        self._name = name
        self._min_lifetime = min_lifetime
        self._due: list[tuple[float, str]] = []
        self._scheduled: set[str] = set()  # scheduled here, not yet fired
        self._wake = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._firing: set[asyncio.Task[None]] = set()

    def schedule(self, approval: Approval) -> None:
        """Remind once before `approval` expires, if it is pending and lives long enough."""
        if approval.state is not ApprovalState.PENDING or approval.id in self._scheduled:
            return
        at = reminder_at(approval, self._min_lifetime)
        if at is None or at >= approval.expires_at:
            return
        self._scheduled.add(approval.id)
        heapq.heappush(self._due, (at, approval.id))
        self._wake.set()
        if self._timer is None or self._timer.done():
            self._timer = asyncio.create_task(self._run(), name=self._name)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            if not self._due:
                await self._wake.wait()
                continue
            at, approval_id = self._due[0]
            delay = at - time.time()
            if delay > 0:
                # Until the first is due, or until an earlier one is scheduled.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                continue
            heapq.heappop(self._due)
            self._scheduled.discard(approval_id)
            task = asyncio.create_task(self._fire(approval_id))
            self._firing.add(task)
            task.add_done_callback(self._firing.discard)

    async def aclose(self) -> None:
        for task in (self._timer, *self._firing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._timer = None
