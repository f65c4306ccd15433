"""The approvals service: open or join an approval, wait for it, decide it, execute it once.

It owns the rules that need more than one approval at a time (audit, authorization against the
directory, expiry sweeping) and leaves atomicity to the store. No aiohttp here: the server turns
its results and errors into HTTP answers.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from .. import audit
from ..audit import AuditLog
from ..audit.redact import DEFAULT as DEFAULT_REDACTOR
from ..audit.redact import Redactor
from ..config import ApprovalsSettings, RuleSettings
from ..store.base import Store, StoreUnavailable
from ..tasks import stop_task
from ..types import Approval, ApprovalState, DecisionRecord, Identity, Requester, Verdict
from . import state
from .fingerprint import body_preview, clean_reason, fingerprint
from .view import requester_log

log = structlog.get_logger("countersign.approvals")

ID_PREFIX = "apr_"
_OUTAGE_RETRY_SECONDS = 0.25
# After the deadline, how long a held request keeps trying to read a store that is down.
_OUTAGE_GRACE_SECONDS = 5.0
# How long the upstream status of an executed approval is retried through a store outage.
_OUTCOME_RETRY_SECONDS = 300.0


def new_approval_id() -> str:
    return ID_PREFIX + secrets.token_urlsafe(18)  # 144 random bits


class ApprovalNotFound(state.ApprovalError):
    code = "approval_not_found"
    status = 404


class ReasonRequired(state.ApprovalError):
    code = "reason_required"
    status = 400


def _about(approval: Approval) -> dict[str, Any]:
    """The fields every approval event carries."""
    return {
        "approval_id": approval.id,
        "request_id": approval.request_id,
        "rule": approval.rule,
        "route": approval.route,
        "requester": requester_log(approval.requester),
    }


class ApprovalService:
    def __init__(
        self,
        store: Store,
        settings: ApprovalsSettings,
        audit_log: AuditLog,
        *,
        clock: Callable[[], float] = time.time,
        sweep_interval: float = 0.5,
        redactor: Redactor = DEFAULT_REDACTOR,
        notify: Callable[[str, Approval], None] | None = None,
    ) -> None:
        self._redactor = redactor
        # Told of every transition (Slack, webhooks); must return at once (it schedules).
        self._notify = notify or (lambda event, approval: None)
        self.store = store
        self._settings = settings
        self._directory: Mapping[str, Sequence[str]] = settings.groups
        self._audit = audit_log
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def mode(self) -> str:
        return self._settings.mode

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="approval-expiry")

    async def aclose(self) -> None:
        if self._background:  # let pending outcome records finish, briefly
            await asyncio.wait(set(self._background), timeout=5)
        if self._sweeper is not None:
            await stop_task(self._sweeper)
            self._sweeper = None

    async def _sweep_forever(self) -> None:
        failing = False
        while True:
            try:
                # One replica at a time sweeps; if it dies, its lease lapses and another takes
                # over within a few intervals.
                if await self.store.lease("expiry-sweeper", self._sweep_interval * 4):
                    await self.expire_due()
                if failing:
                    log.info("approvals.sweep_resumed")
                failing = False
            except Exception as exc:  # a store outage must not end the sweeper
                if not failing:  # say it once per outage, not twice a second
                    log.warning("approvals.sweep_failed", error=str(exc) or type(exc).__name__)
                failing = True
            await asyncio.sleep(self._sweep_interval)

    async def expire_due(self) -> int:
        """Expire every pending approval past its deadline; each is audited exactly once."""
        now = self._clock()
        count = 0
        for approval_id in await self.store.due(now):
            if await self._expire(approval_id, now) is not None:
                count += 1
        return count

    async def _expire(self, approval_id: str, now: float) -> Approval | None:
        expired = await self.store.expire(approval_id, now)
        if expired is not None:
            await self._audit.emit_durable(
                audit.APPROVAL_EXPIRED,
                **_about(expired),
                outcome="expired",
            )
            self._notify("approval.expired", expired)
        return expired

    # -- the requester's side ----------------------------------------------------------------

    def fingerprint_of(
        self, *, identity: Identity, method: str, path: str, query: str, route: str, body: bytes
    ) -> str:
        return fingerprint(
            method=method,
            path=path,
            query=query,
            route=route,
            issuer=identity.issuer,
            subject=identity.subject,
            body=body,
        )

    async def open(
        self,
        *,
        identity: Identity,
        rule: RuleSettings,
        method: str,
        path: str,
        query: str,
        route: str,
        body: bytes,
        content_type: str | None,
        reason: str | None,
        request_id: str,
        fingerprint: str | None = None,
    ) -> tuple[Approval, bool]:
        """Create the approval for this exact request, or join the one already open for it."""
        now = self._clock()
        timeout = rule.timeout_seconds or self._settings.timeout_seconds
        approvers = rule.approvers
        candidate = Approval(
            id=new_approval_id(),
            fingerprint=fingerprint
            or self.fingerprint_of(
                identity=identity, method=method, path=path, query=query, route=route, body=body
            ),
            state=ApprovalState.PENDING,
            created_at=now,
            expires_at=now + timeout,
            rule=rule.name,
            route=route,
            method=method,
            path=path,
            query=query,
            requester=Requester.of(identity),
            approver_groups=approvers.groups if approvers else (),
            approver_users=approvers.users if approvers else (),
            quorum=rule.quorum,
            reason=clean_reason(reason, self._redactor),
            body_preview=body_preview(body, content_type, self._redactor),
            body_bytes=len(body),
            content_type=content_type,
            request_id=request_id,
        )
        approval, created = await self.store.create_or_join(candidate)
        if created:
            # Durable before anyone can act on it.
            await self._audit.emit_durable(
                audit.APPROVAL_REQUESTED,
                **_about(approval),
                method=method,
                path=path,
                reason=approval.reason,
                quorum=approval.quorum,
                expires_at=approval.expires_at,
            )
            self._notify("approval.requested", approval)
        return approval, created

    async def get(self, approval_id: str) -> Approval | None:
        return await self.store.get(approval_id)

    async def wait_for_decision(self, approval_id: str) -> Approval:
        """Wait until the approval leaves `pending`; at its deadline, expire it (audited).

        If the store becomes unreachable meanwhile, keep waiting and retrying (the request
        stays held, nothing is forwarded) until the approval's deadline has passed; then give up
        with `StoreUnavailable`, since no decision can be read.
        """
        deadline: float | None = None
        approval: Approval | None = None
        while True:
            try:
                if approval is None:
                    approval = await self.store.get(approval_id)
                if approval is None:
                    raise ApprovalNotFound("approval not found")
                deadline = approval.expires_at
                if approval.state is not ApprovalState.PENDING:
                    return approval
                remaining = approval.expires_at - self._clock()
                if remaining <= 0:
                    await self._expire(approval_id, self._clock())
                    approval = None  # read it again: expired, or decided just in time
                    continue
                # wait() hands back what it read last: no second read per wake-up.
                approval = await self.store.wait(approval_id, remaining)
            except StoreUnavailable:
                approval = None
                if deadline is None or self._clock() > deadline + _OUTAGE_GRACE_SECONDS:
                    raise
                await asyncio.sleep(_OUTAGE_RETRY_SECONDS)

    async def claim(self, approval_id: str) -> Approval:
        now = self._clock()
        try:
            return await self.store.claim(approval_id, now)
        except state.NotClaimable as exc:
            if exc.approval is not None and exc.approval.state is ApprovalState.EXPIRED:
                await self._expire(approval_id, now)  # approved, but not used in time
            raise

    async def record_outcome(self, approval_id: str, upstream_status: int) -> Approval:
        approval = await self.store.record_outcome(approval_id, upstream_status)
        self._notify("approval.executed", approval)
        return approval

    def record_outcome_soon(self, approval_id: str, upstream_status: int) -> None:
        """Record the upstream's status without holding up the response: retried through a
        store outage (the approval is already `executed`; only the status is pending)."""
        task = asyncio.create_task(self._record_outcome_retrying(approval_id, upstream_status))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _record_outcome_retrying(self, approval_id: str, upstream_status: int) -> None:
        delay = 0.1
        deadline = self._clock() + _OUTCOME_RETRY_SECONDS
        while True:
            try:
                await self.record_outcome(approval_id, upstream_status)
                return
            except StoreUnavailable as exc:
                if self._clock() > deadline:
                    log.error(
                        "approvals.outcome_not_recorded",
                        approval_id=approval_id,
                        upstream_status=upstream_status,
                        error=str(exc),
                    )
                    return
            except (state.ApprovalError, KeyError) as exc:
                log.error("approvals.outcome_not_recorded", approval_id=approval_id, error=str(exc))
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    # -- the approver's side -----------------------------------------------------------------

    def may_see(self, approval: Approval, identity: Identity) -> bool:
        """Requesters see their own approvals; approvers see those they could decide."""
        if (approval.requester.issuer, approval.requester.subject) == (
            identity.issuer,
            identity.subject,
        ):
            return True
        try:
            state.check_approver(approval, identity, self._directory)
        except state.SelfApproval:
            return True  # the owner of the agent may look, never decide
        except state.NotAnApprover:
            return False
        return True

    async def list_for(
        self, identity: Identity, approval_state: ApprovalState | None, limit: int = 100
    ) -> list[Approval]:
        approvals = await self.store.list(approval_state, limit=max(limit * 4, 200))
        return [a for a in approvals if self.may_see(a, identity)][:limit]

    async def decide(
        self,
        approval_id: str,
        approver: Identity,
        verdict: Verdict,
        reason: str | None,
        channel: str,
    ) -> Approval:
        reason = (reason or "").strip() or None
        if verdict is Verdict.DENY and not reason:
            raise ReasonRequired("a denial needs a reason")
        approval = await self.store.get(approval_id)
        if approval is None:
            raise ApprovalNotFound("approval not found")
        state.check_approver(approval, approver, self._directory)
        record = DecisionRecord(
            verdict=verdict,
            approver_subject=approver.subject,
            approver_email=approver.email,
            channel=channel,
            reason=reason,
            at=self._clock(),
        )
        try:
            decided = await self.store.decide(approval_id, record, record.at)
        except state.NotPending as exc:
            if exc.approval is not None and exc.approval.state is ApprovalState.EXPIRED:
                # Too late: make the expiry happen now (audited once, by whoever makes it).
                await self._expire(approval_id, record.at)
            raise
        except KeyError:
            raise ApprovalNotFound("approval not found") from None
        # Durable before the decider hears back (and before this replica forwards anything).
        await self._audit.emit_durable(
            audit.APPROVAL_DECIDED,
            **_about(decided),
            approver={"subject": approver.subject, "email": approver.email},
            channel=channel,
            verdict=verdict.value,
            reason=reason,
            approvals=decided.approvals_count,
            quorum=decided.quorum,
            outcome=decided.state.value,
        )
        self._notify("approval.decided", decided)
        return decided
