"""Delivering approval cards to Teams: one card per approval, posted once, updated in place,
with what happened to it said in the card's thread.

`TeamsNotifier.notify` brings the approval's card in step with the approval as the store has it
*now*: posts it when it is not posted yet (keeping its activity id as a store note, so whichever
replica sees the next event can update it; a store lease makes one replica the one that posts),
else updates it in place. Each call goes through the shared `notify.retry.with_retries`, as
Slack's do: connection errors, timeouts, 429 and 5xx are retried, honouring `Retry-After`, with
jitter, until `retry_seconds`; then `GaveUp` to the hub, which logs and counts it
(`countersign_notify_failures_total{channel="teams"}`). When Teams refuses the card itself (413,
400) the minimal card with the inbox link is sent instead and counted (`on_fallback`).

Once the card shows the stored state, the notifier replies in the card's thread what it has not
said yet: each decision and how the approval ended. Each is said once across replicas (`_once`:
a store note `teams.once.<key>` records it, a store lease picks the replica that says it). One
timer per notifier (not a task per approval) posts a reminder in the thread before expiry, with
Slack's timing (`notify.reminders.reminder_at`: 80 % of the lifetime or 5 minutes before expiry,
whichever is later; none for approvals shorter than 2 minutes), through the same `_once`.

`TeamsHealth` is what readyz reports: the freshest of the last Bot Connector call's outcome and
a client-credentials token (the cached one while it is valid).

Once the approval is decided (approved, denied, expired...), the agent's owner is told in a direct
message, once across replicas (the same `_once`): the owner (`requester.owner`) is looked up in
the approvals conversation's roster by email or UPN (case-insensitively), a 1:1 conversation is
opened with them and a short card posted; skipped quietly when the owner is not in the roster.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from ..audit.redact import DEFAULT as DEFAULT_REDACTOR
from ..audit.redact import Redactor
from ..model import Approval, ApprovalState
from ..model.persons import canonical_email
from ..notify.once import SaidOnce
from ..notify.reminders import REMINDER_BEFORE, REMINDER_MIN_LIFETIME, Reminders, still_deciding
from ..notify.retry import GaveUp, with_retries
from ..store.base import Store
from .cards import (
    activity,
    decision_reply,
    fitted_card,
    minimal_card,
    outcome_reply,
    owner_card,
    reminder_reply,
    reply_card,
)
from .connector import CALL_TIMEOUT, BotConnector, refused_payload, retry_after, retryable

log = structlog.get_logger("countersign.teams")

MESSAGE_NOTE = "teams.activity"
# What was said once per approval in the card's thread (a decision, the outcome, the reminder)
# is kept as a note named `teams.once.<key>` (the reply's id, or why it failed).
ONCE_NOTE = "teams.once."  # what SaidOnce keeps (see proxy/notify/once.py)
_LOCKS = 10_000


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class TeamsHealth:
    """What readyz reports for Teams: "ok" or "down", from the freshest evidence - the last Bot
    Connector call's outcome, or a client-credentials token (the cached one while it is valid,
    else one fetch bounded by `timeout`) when nothing newer than `ttl` seconds is known."""

    def __init__(self, connector: BotConnector, *, ttl: float = 30.0, timeout: float = 1.5):
        self._connector = connector
        self._ttl = ttl
        self._timeout = timeout

    def _fresh(self) -> bool:
        seen = self._connector.seen
        return seen is not None and time.monotonic() - seen[0] < self._ttl

    async def state(self) -> str:
        seen = self._connector.seen
        if self._fresh() and seen is not None:
            return "ok" if seen[1] else "down"
        try:
            async with asyncio.timeout(self._timeout):
                await self._connector.token()
        except Exception:
            return "down"
        return "ok"


class TeamsNotifier:
    def __init__(
        self,
        connector: BotConnector,
        store: Store,
        *,
        service_url: str,
        conversation: str,
        public_url: str | None = None,
        redactor: Redactor = DEFAULT_REDACTOR,
        retry_seconds: float = 3600.0,
        first_delay: float = 0.5,
        call_timeout: float = CALL_TIMEOUT,
        on_fallback: Callable[[], None] | None = None,
        reminder_min_lifetime: float = REMINDER_MIN_LIFETIME,
        tenant_id: str | None = None,
    ) -> None:
        self._connector = connector
        self._store = store
        self._service_url = service_url
        self._conversation = conversation
        self._public_url = public_url
        self._redactor = redactor
        self._retry_seconds = retry_seconds
        self._first_delay = first_delay
        self._call_timeout = call_timeout
        self._on_fallback = on_fallback
        self._tenant_id = tenant_id
        self._locks: OrderedDict[str, asyncio.Lock] = OrderedDict()
        self._said_once = SaidOnce(
            store,
            channel="teams",
            lease_seconds=retry_seconds + 600,
            retryable=retryable,
            describe=describe,
        )
        self._reminders = Reminders(
            self._remind, name="teams-reminders", min_lifetime=reminder_min_lifetime
        )
        self._background: set[asyncio.Task[None]] = set()

    def _lock(self, approval_id: str) -> asyncio.Lock:
        lock = self._locks.get(approval_id)
        if lock is None:
            lock = self._locks[approval_id] = asyncio.Lock()
            while len(self._locks) > _LOCKS:
                self._locks.popitem(last=False)
        return lock

    async def _retrying(
        self, what: str, call: Callable[[], Awaitable[Any]], retry_seconds: float | None = None
    ) -> Any:
        return await with_retries(
            call,
            what=what,
            retry_seconds=self._retry_seconds if retry_seconds is None else retry_seconds,
            first_delay=self._first_delay,
            retryable=retryable,
            retry_after=retry_after,
            call_timeout=self._call_timeout,
            describe=describe,
            jitter=0.2,
        )

    async def notify(self, event: str, approval: Approval) -> None:
        self._schedule_reminder(approval)
        async with self._lock(approval.id):
            shown = await self._retrying(
                f"teams card of {approval.id}", lambda: self._sync(approval)
            )
            if shown is not None:
                await self._retrying(
                    f"teams thread of {approval.id}", lambda: self._follow_up(*shown)
                )

    async def _sync(self, approval: Approval) -> tuple[Approval, str] | None:
        """Post or update the card; what it shows and its activity id (None: another replica
        is posting it, and says what follows)."""
        latest = await self._store.get(approval.id) or approval
        ref = await self._store.get_note(approval.id, MESSAGE_NOTE)
        if ref is None:
            if not await self._store.lease(f"teams.{approval.id}.post", self._retry_seconds + 600):
                return None  # another replica is posting it; it updates it to the latest state
            ref = await self._send(latest, None)
            await self._store.set_note(approval.id, MESSAGE_NOTE, ref)
            again = await self._store.get(approval.id)
            if again is None or again == latest:
                return latest, ref
            latest = again  # decided while we posted: show that
        await self._send(latest, ref)
        return latest, ref

    async def _send(self, approval: Approval, ref: str | None) -> str:
        """Post (ref None) or update the card; the minimal card when Teams refuses the full
        one. The activity id."""
        card = fitted_card(approval, self._public_url, self._redactor)
        try:
            return await self._put(ref, activity(card))
        except Exception as exc:
            if not refused_payload(exc):
                raise
            log.warning("teams.card_refused", approval_id=approval.id, error=describe(exc))
        sent = await self._put(ref, activity(minimal_card(approval, self._public_url)))
        if self._on_fallback is not None:
            self._on_fallback()
        return sent

    async def _put(self, ref: str | None, payload: dict[str, Any]) -> str:
        if ref is None:
            return await self._connector.post(self._service_url, self._conversation, payload)
        await self._connector.update(self._service_url, self._conversation, ref, payload)
        return ref

    # -- the thread: decisions and the outcome ---------------------------------------------------

    async def _follow_up(self, approval: Approval, ref: str) -> None:
        """Say once, in the card's thread, each decision and how the approval ended. A
        retryable failure raises at once (the whole follow-up is tried again: what was said is
        not said twice); other failures are recorded and raised after the rest was tried."""
        steps: list[tuple[str, str]] = [
            (f"decision.{i}", decision_reply(approval, i, self._redactor))
            for i in range(len(approval.decisions))
        ]
        ended = outcome_reply(approval, self._redactor)
        if ended is not None:
            steps.append(("outcome", ended))
        acts = [(key, self._replier(ref, text)) for key, text in steps]
        if approval.state is not ApprovalState.PENDING and approval.requester.owner:
            acts.append(("owner", lambda: self._tell_owner(approval)))
        failed: BaseException | None = None
        for key, act in acts:
            try:
                await self._said_once.say(approval.id, key, act)
            except Exception as exc:
                if retryable(exc):
                    raise
                failed = failed or exc
        if failed is not None:
            raise failed

    def _replier(self, ref: str, text: str) -> Callable[[], Awaitable[str]]:
        async def reply() -> str:
            sent = await self._connector.reply(
                self._service_url, self._conversation, ref, activity(reply_card(text))
            )
            return sent or "posted"

        return reply

    # -- the owner's direct message ----------------------------------------------------------

    async def _tell_owner(self, approval: Approval) -> str:
        """A direct message to the agent's owner: what became of its request. Skipped (said at
        debug) when the owner is not in the approvals conversation's roster."""
        owner = canonical_email(approval.requester.owner)
        member = await self._roster_member(owner) if owner else None
        if member is None:
            log.debug("teams.owner_not_in_roster", approval_id=approval.id)
            return "skipped: the owner is not in the Teams roster"
        tenant = self._tenant_id or str(member.get("tenantId") or "")
        direct = await self._connector.open_direct(self._service_url, str(member["id"]), tenant)
        card = owner_card(approval, self._public_url, self._redactor)
        sent = await self._connector.post(self._service_url, direct, activity(card))
        return sent or "posted"

    async def _roster_member(self, email: str) -> dict[str, Any] | None:
        """The roster entry of whoever in the approvals conversation has `email` as their
        email or UPN (case-insensitively), else None."""
        for member in await self._connector.members(self._service_url, self._conversation):
            for field in ("email", "userPrincipalName"):
                value = member.get(field)
                if isinstance(value, str) and canonical_email(value) == email and member.get("id"):
                    return member
        return None

    # -- the reminder ---------------------------------------------------------------------------

    def _schedule_reminder(self, approval: Approval) -> None:
        """Remind approvers once before a pending approval expires (one timer for all)."""
        if not self._said_once.known(approval.id, "reminder"):
            self._reminders.schedule(approval)

    async def _remind(self, approval_id: str) -> None:
        try:
            await self._retrying(
                f"teams reminder of {approval_id}",
                lambda: self._remind_once(approval_id),
                retry_seconds=REMINDER_BEFORE,
            )
        except GaveUp as exc:
            log.warning("teams.reminder_failed", approval_id=approval_id, error=str(exc))
        except Exception as exc:  # refused for good: said, never retried
            log.warning("teams.reminder_failed", approval_id=approval_id, error=describe(exc))

    async def _remind_once(self, approval_id: str) -> None:
        approval = await self._store.get(approval_id)
        if approval is None or approval.state is not ApprovalState.PENDING:
            return
        if time.time() >= approval.expires_at:
            return
        ref = await self._store.get_note(approval_id, MESSAGE_NOTE)
        if ref is None:
            return  # never posted: nothing to reply to (the post itself is being retried)
        text = reminder_reply(approval, still_deciding(approval), self._redactor)
        await self._said_once.say(approval_id, "reminder", self._replier(ref, text))

    async def aclose(self) -> None:
        await self._reminders.aclose()
        for task in self._background:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
