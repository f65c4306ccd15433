"""The approvals service: open or join an approval, wait for it, decide it, execute it once.

It owns the rules that need more than one approval at a time (audit, authorization against the
directory, expiry sweeping) and leaves atomicity to the store. No aiohttp here: the server turns
its results and errors into HTTP answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from .. import audit
from ..audit import AuditLog
from ..audit.redact import DEFAULT as DEFAULT_REDACTOR
from ..audit.redact import Redactor
from ..config import ApprovalsSettings, RuleSettings
from ..model import (
    Approval,
    ApprovalState,
    DecisionRecord,
    Identity,
    Outcome,
    Requester,
    Verdict,
    state,
)
from ..model.binding import Binding, fingerprint
from ..model.grant import Grant, scope_of
from ..model.persons import canonical_email
from ..model.state import ApprovalNotFound, ReasonRequired
from ..store.base import Store, StoreUnavailable, cursor_after
from ..tasks import stop_task
from .preview import body_preview, clean_reason, header_view, tool_arguments
from .view import approval_json, grant_json, requester_log

log = structlog.get_logger("countersign.approvals")

ID_PREFIX = "apr_"
_OUTAGE_RETRY_SECONDS = 0.25
# After the deadline, how long a held request keeps trying to read a store that is down.
_OUTAGE_GRACE_SECONDS = 5.0
# How long the upstream status of an executed approval is retried through a store outage.
_OUTCOME_RETRY_SECONDS = 300.0


class ApprovalMetrics(Protocol):
    """What the service reports to metrics (proxy.server.metrics.Metrics is one)."""

    def held(self, delta: int) -> None:
        """`delta` more (or fewer) requests wait for a decision in this process."""

    def decided(self, seconds: float) -> None:
        """An approval was settled `seconds` after it was requested."""


def new_approval_id() -> str:
    return ID_PREFIX + secrets.token_urlsafe(18)  # 144 random bits


__all__ = ["ApprovalNotFound", "ApprovalService", "BulkDecision", "ReasonRequired", "Skipped"]

BODY_NOTE = "body"  # the held body's exact bytes, kept with the approval for approvers


_BULK_PAGE = 1000  # approvals read per listing page while selecting a bulk decision's
# Approvals a bulk decision decides (and releases) per store call: the first chunk small, so the
# first held requests go on at once; then each 4x the last, up to the most. Every chunk costs
# the bulk call a turn of an event loop busy with the requests it released (several turns with
# Redis), so few chunks keep its own answer from being drawn out (10,000: 7 chunks). Measured
# with bench/bench_release.py: the release takes the same time with 100..4000 per chunk.
_RELEASE_FIRST = 100
_RELEASE_GROWTH = 4
_RELEASE_CHUNK = 2000


@dataclass(frozen=True, slots=True)
class Skipped:
    """An approval a bulk decision did not decide, and why (an error code of DESIGN §2)."""

    approval_id: str
    code: str
    message: str


@dataclass(slots=True)
class BulkDecision:
    """What a bulk decision did: the approvals decided (each as it is now), those skipped."""

    decided: list[Approval] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def skip(self, approval_id: str, code: str, message: str) -> None:
        self.skipped.append(Skipped(approval_id, code, message))


def _requested_by(approval: Approval, who: str) -> bool:
    """Whether `who` (a subject, or a person's email) names the approval's requester."""
    requester = approval.requester
    if who == requester.subject:
        return True
    email = canonical_email(who)
    return email is not None and email in (requester.person, canonical_email(requester.email))


# What `state.check_approver` and `may_see` read of an approval (its rule only in messages),
# flat: hashing and comparing plain strings costs less than the `Requester` dataclass's methods.
_ApproverKey = tuple[
    str, str, str | None, str | None, str | None, tuple[str, ...], tuple[str, ...], str
]


def _approver_key(approval: Approval) -> _ApproverKey:
    requester = approval.requester
    return (
        requester.issuer,
        requester.subject,
        requester.person,
        requester.email,
        requester.owner,
        approval.approver_groups,
        approval.approver_users,
        approval.rule,
    )


def _about(approval: Approval) -> dict[str, Any]:
    """The fields every approval event carries."""
    about: dict[str, Any] = {
        "approval_id": approval.id,
        "request_id": approval.request_id,
        "rule": approval.rule,
        "route": approval.route,
        "requester": requester_log(approval.requester),
    }
    if approval.actions:
        about["actions"] = list(approval.actions)
    return about


def _decision_fields(
    record: DecisionRecord, extra: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fields of `approval.decided` that come from the decision alone (before and after the
    approval's counts, in event order): the same for every approval of a bulk decision, so it
    builds them once (each emit copies them into its own event)."""
    grant_uses = record.grant_uses
    before = {
        "approver": {
            "subject": record.approver_subject,
            "issuer": record.approver_issuer,
            "email": record.approver_email,
            "person": record.person,
        },
        "channel": record.channel,
        "verdict": record.verdict.value,
        "reason": record.reason,
    }
    after = {
        **({"grant": {"uses": grant_uses, "seconds": record.grant_seconds}} if grant_uses else {}),
        **extra,
    }
    return before, after


def _about_grant(grant: Grant) -> dict[str, Any]:
    """The fields every grant event carries."""
    about: dict[str, Any] = {
        "grant_id": grant.id,
        "approval_id": grant.approval_id,  # the approval that created it
        "rule": grant.rule,
        "route": grant.route,
        "requester": requester_log(grant.requester),
        "pattern": grant.pattern,
        "uses": grant.uses,
        "uses_left": grant.uses_left,
        "expires_at": grant.expires_at,
    }
    if grant.actions:
        about["actions"] = list(grant.actions)
    return about


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
        metrics: ApprovalMetrics | None = None,
    ) -> None:
        self._redactor = redactor
        self._metrics = metrics
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
    def redactor(self) -> Redactor:
        """This proxy's redactor (configured fields and patterns, known secrets): what every
        channel that shows approvals uses."""
        return self._redactor

    @property
    def max_pending_per_identity(self) -> int:
        """`approvals.max_pending_per_identity`, which agents are told when they reach it."""
        return self._settings.max_pending_per_identity

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
        for grant in await self.store.expire_grants(now):
            await self._audit.emit_durable(audit.GRANT_EXPIRED, **_about_grant(grant))
        return count

    async def _expire(self, approval_id: str, now: float) -> Approval | None:
        expired = await self.store.expire(approval_id, now)
        if expired is not None:
            lapsed = expired.state is ApprovalState.LAPSED
            await self._audit.emit_durable(
                audit.APPROVAL_LAPSED if lapsed else audit.APPROVAL_EXPIRED,
                **_about(expired),
                outcome=expired.state.value,
            )
            self._notify("approval.lapsed" if lapsed else "approval.expired", expired)
        return expired

    # -- the requester's side ----------------------------------------------------------------

    async def open(
        self,
        *,
        identity: Identity,
        rule: RuleSettings,
        binding: Binding,
        path: str,
        query: str,
        upstream_url: str,
        reason: str | None,
        request_id: str,
        fingerprint_hex: str | None = None,
        actions: tuple[str, ...] = (),
    ) -> tuple[Approval, bool]:
        """Create the approval for this exact request, or join the one already open for it.

        Raises `TooManyPending` when the identity already has `max_pending_per_identity`
        pending approvals (joining one of them is always allowed)."""
        now = self._clock()
        timeout = rule.timeout_seconds or self._settings.timeout_seconds
        approvers = rule.approvers
        content_type = binding.content_type
        preview, cut = body_preview(binding.body, self._redactor)
        fingerprint_hex = fingerprint_hex or fingerprint(binding)
        candidate = Approval(
            id=new_approval_id(),
            fingerprint=fingerprint_hex,
            state=ApprovalState.PENDING,
            created_at=now,
            expires_at=now + timeout,
            rule=rule.name,
            route=binding.route,
            method=binding.method,
            path=path,
            query=query,
            requester=Requester.of(identity),
            approver_groups=approvers.groups if approvers else (),
            approver_users=approvers.users if approvers else (),
            quorum=rule.quorum,
            reason=clean_reason(reason, self._redactor),
            body_preview=preview,
            body_bytes=len(binding.body),
            content_type=content_type.decode("utf-8", "replace") if content_type else None,
            request_id=request_id,
            target=binding.target.decode("utf-8", "surrogateescape"),
            upstream_url=upstream_url,
            headers=header_view(binding.headers, self._redactor),
            body_sha256=hashlib.sha256(binding.body).hexdigest(),
            body_truncated=cut,
            claim_seconds=float(self._settings.claim_seconds),
            actions=actions,
            tool_arguments=(
                tool_arguments(binding.body, self._redactor)
                if any(action.startswith("tool:") for action in actions)
                else None
            ),
            earlier_attempt=await self.store.last_ambiguous(fingerprint_hex),
            risk=rule.risk,
            note=rule.note,
            approver_members=self._members(approvers.groups if approvers else ()),
            grant_max_uses=rule.grant.max_uses if rule.grant else None,
            grant_max_seconds=rule.grant.max_seconds if rule.grant else None,
        )
        approval, created = await self.store.create_or_join(
            candidate, max_pending=self._settings.max_pending_per_identity
        )
        if created:
            try:
                await self._announce(approval, binding.body)
            except Exception:
                # Not recorded, so nobody may act on it: end it at once (best effort; the
                # caller answers 503 and a retry opens a fresh one). A cancelled client is no
                # failure: what it started still completes in the sinks.
                with contextlib.suppress(Exception):
                    await self.store.expire(approval.id, approval.expires_at)
                raise
        return approval, created

    def _members(self, groups: Sequence[str]) -> tuple[str, ...]:
        """The people `approvals.groups` lists in `groups`, each once, in order."""
        seen: dict[str, None] = {}
        for group in groups:
            for member in self._directory.get(group, ()):
                seen.setdefault(canonical_email(member) or member, None)
        return tuple(seen)

    async def _announce(self, approval: Approval, body: bytes) -> None:
        """Keep the body, audit the request durably and tell the channels: a new approval."""
        if body:
            # Any replica can hand the exact bytes to an approver (`…/body`).
            await self.store.set_note(
                approval.id, BODY_NOTE, base64.b64encode(body).decode("ascii")
            )
        # Durable before anyone can act on it.
        await self._audit.emit_durable(
            audit.APPROVAL_REQUESTED,
            **_about(approval),
            method=approval.method,
            path=approval.path,
            target=approval.target,
            upstream_url=approval.upstream_url,
            headers=[list(h) for h in approval.headers],
            body_bytes=approval.body_bytes,
            body_sha256=approval.body_sha256,
            fingerprint=approval.fingerprint,
            reason=approval.reason,
            quorum=approval.quorum,
            expires_at=approval.expires_at,
        )
        self._notify("approval.requested", approval)

    async def body(self, approval_id: str) -> bytes:
        """The exact body bytes of an approval's request (b"" when it had none)."""
        approval = await self.store.get(approval_id)
        if approval is None:
            raise ApprovalNotFound("approval not found")
        if not approval.body_bytes:
            return b""
        kept = await self.store.get_note(approval_id, BODY_NOTE)
        if kept is None:
            raise ApprovalNotFound("the body of this approval is no longer kept")
        return base64.b64decode(kept)

    async def abandon(self, approval_id: str) -> None:
        """A held client went away: recorded and shown to approvers; the approval stays open."""
        now = self._clock()
        try:
            approval = await self.store.abandon(approval_id, now)
        except (StoreUnavailable, KeyError):
            return  # best effort: the client is gone either way
        if approval is not None:
            self._audit.emit(audit.REQUEST_ABANDONED, **_about(approval), at=now)
            self._notify("request.abandoned", approval)

    def view(self, approval: Approval, grant: Grant | None = None) -> dict[str, Any]:
        """The approval's JSON for approvers (API, CLI), through this proxy's redactor; with
        `grant` (the grant it created, read from the store) its live uses left and state."""
        return approval_json(approval, self._redactor, grant=grant, now=self._clock())

    async def view_live(self, approval: Approval) -> dict[str, Any]:
        """`view` with the grant the approval created read from the store (one read, only for
        an approval that created a grant)."""
        grant = await self.store.get_grant(approval.grant_id) if approval.grant_id else None
        return self.view(approval, grant)

    async def get(self, approval_id: str) -> Approval | None:
        return await self.store.get(approval_id)

    async def wait_for_decision(self, approval_id: str) -> Approval:
        """Wait until the approval leaves `pending`; at its deadline, expire it (audited).

        If the store becomes unreachable meanwhile, keep waiting and retrying (the request
        stays held, nothing is forwarded) until the approval's deadline has passed; then give up
        with `StoreUnavailable`, since no decision can be read.
        """
        if self._metrics is not None:
            self._metrics.held(1)
        try:
            return await self._wait_for_decision(approval_id)
        finally:
            if self._metrics is not None:
                self._metrics.held(-1)

    async def _wait_for_decision(self, approval_id: str) -> Approval:
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
            if exc.approval is not None and exc.approval.state is ApprovalState.LAPSED:
                await self._expire(approval_id, now)  # approved, but not used in time
            raise

    async def record_outcome(
        self, approval_id: str, outcome: Outcome, upstream_status: int | None
    ) -> Approval:
        approval = await self.store.record_outcome(approval_id, outcome, upstream_status)
        if outcome is Outcome.AMBIGUOUS:
            # A retry of this very request opens a new approval: it will show this attempt.
            await self.store.remember_ambiguous(approval.fingerprint, approval.id)
        self._notify("approval.executed", approval)
        return approval

    def record_outcome_soon(
        self, approval_id: str, outcome: Outcome, upstream_status: int | None
    ) -> None:
        """Record what became of the executed request without holding up the response:
        retried through a store outage (the approval is already `executed`)."""
        task = asyncio.create_task(
            self._record_outcome_retrying(approval_id, outcome, upstream_status)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _record_outcome_retrying(
        self, approval_id: str, outcome: Outcome, upstream_status: int | None
    ) -> None:
        delay = 0.1
        deadline = self._clock() + _OUTCOME_RETRY_SECONDS
        while True:
            try:
                await self.record_outcome(approval_id, outcome, upstream_status)
                return
            except StoreUnavailable as exc:
                if self._clock() > deadline:
                    log.error(
                        "approvals.outcome_not_recorded",
                        approval_id=approval_id,
                        outcome=outcome.value,
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
        """Requesters see their own approvals, the owner an agent acts for sees its requests
        (never deciding them), approvers see those of their rules."""
        requester = approval.requester
        if (requester.issuer, requester.subject) == (identity.issuer, identity.subject):
            return True
        if identity.person is not None and identity.person == canonical_email(requester.owner):
            return True
        return state.is_listed_approver(approval, identity, self._directory)

    async def list_for(
        self,
        identity: Identity,
        approval_state: ApprovalState | None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[Approval], str | None]:
        """Up to `limit` approvals `identity` may see, newest first, and the cursor to read on
        from (None at the end). Reads at most a few store pages, so a page costs the same
        whatever the store holds: it may come back short (even empty) with a cursor when the
        identity may see few of the approvals read. `InvalidCursor` for a bad cursor."""
        found: list[Approval] = []
        for _ in range(5):
            page, next_cursor = await self.store.list(
                approval_state, limit=max(limit, 100), cursor=cursor
            )
            for at, approval in enumerate(page):
                if not self.may_see(approval, identity):
                    continue
                found.append(approval)
                if len(found) == limit:
                    rest = at + 1 < len(page)
                    return found, cursor_after(approval) if rest else next_cursor
            if next_cursor is None:
                return found, None
            cursor = next_cursor
        return found, cursor

    def _record(
        self,
        approver: Identity,
        person: str | None,
        verdict: Verdict,
        channel: str,
        reason: str | None,
        grant_uses: int | None = None,
        grant_seconds: int | None = None,
    ) -> DecisionRecord:
        """One approver's decision, now."""
        return DecisionRecord(
            verdict=verdict,
            approver_subject=approver.subject,
            approver_email=approver.email,
            channel=channel,
            reason=reason,
            at=self._clock(),
            approver_issuer=approver.issuer,
            person=person,
            grant_uses=grant_uses,
            grant_seconds=grant_seconds,
        )

    async def decide(
        self,
        approval_id: str,
        approver: Identity,
        verdict: Verdict,
        reason: str | None,
        channel: str,
        *,
        grant_uses: int | None = None,
        grant_seconds: int | None = None,
    ) -> Approval:
        """Record one approver's verdict. With `grant_uses` and `grant_seconds` (approve only,
        where the rule allows grants, within its limits, else `InvalidGrant`), the approver
        also approves that many more requests of the same shape for that long: the grant is
        made when the approval reaches its quorum, and only if every approving decision asked
        for one (the smallest uses and seconds win)."""
        reason = (reason or "").strip() or None
        if verdict is Verdict.DENY and not reason:
            raise ReasonRequired("a denial needs a reason")
        approval = await self.store.get(approval_id)
        if approval is None:
            raise ApprovalNotFound("approval not found")
        person = state.check_approver(approval, approver, self._directory)
        state.check_grant_request(approval, verdict, grant_uses, grant_seconds)
        record = self._record(approver, person, verdict, channel, reason, grant_uses, grant_seconds)
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
        self._emit_decided(decided, record)
        await self._audit.sync()
        await self._after_decision(decided, record)
        return decided

    def _emit_decided(self, decided: Approval, record: DecisionRecord, **extra: Any) -> None:
        """`approval.decided` for one decision (`record`) on `decided`; not yet durable."""
        self._emit_decided_as(decided, _decision_fields(record, extra))

    def _emit_decided_as(
        self, decided: Approval, decision: tuple[dict[str, Any], dict[str, Any]]
    ) -> None:
        """`approval.decided` with the decision's own fields (`_decision_fields`) made once, so
        a bulk decision builds them once for all its approvals."""
        before, after = decision
        self._audit.emit(
            audit.APPROVAL_DECIDED,
            **_about(decided),
            **before,
            approvals=decided.approvals_count,
            quorum=decided.quorum,
            outcome=decided.state.value,
            **after,
        )

    async def _after_decision(self, decided: Approval, record: DecisionRecord) -> None:
        """Once the decision is durable: its grant, the channels, the metrics."""
        if decided.state is ApprovalState.APPROVED and decided.grant_id is not None:
            # Only the decision that reached the quorum sees `approved`: the grant is made once.
            await self._create_grant(decided)
        self._notify("approval.decided", decided)
        if self._metrics is not None and decided.state is not ApprovalState.PENDING:
            self._metrics.decided(record.at - decided.created_at)

    async def decide_many(
        self,
        approver: Identity,
        verdict: Verdict,
        reason: str | None,
        channel: str,
        *,
        rule: str | None = None,
        requester: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> BulkDecision:
        """A bulk decision: `verdict` on every pending approval the filter selects (all of
        `rule`, `requester` and `ids` that are given) that `approver` may decide, each
        recorded as its own decision (its own `approval.decided`, its own notifications).

        Selected are the pending approvals of the filter that the approver may see (the
        listing's rule: others are left out unmentioned), and every approval `ids` names.
        Those the approver may not decide (`self_approval`, `approver_unidentified`,
        `not_an_approver`), and named ones that are unknown (`approval_not_found`), no longer
        pending (`approval_not_pending`) or outside the other keys (`not_selected`) are
        skipped with their code; so are refusals of the store (`already_approved`, an
        approval that expired meanwhile). The store decides them in growing chunks
        (`Store.decide_many`, one call each), oldest first, and each chunk's held requests go
        on while the next chunk is decided; each chunk's audit events are made durable (one
        sync per chunk) before the next, and the answer lists every approval decided and
        skipped at the end."""
        reason = (reason or "").strip() or None
        if verdict is Verdict.DENY and not reason:
            raise ReasonRequired("a denial needs a reason")
        if rule is None and requester is None and ids is None:
            raise ValueError("a bulk decision needs a filter: rule, requester or ids")
        outcome = BulkDecision()
        selected = await self._select(approver, rule, requester, ids, outcome)
        allowed: list[Approval] = []
        # `check_approver` depends only on these parts of an approval (and on the approver and
        # the directory, the same for the whole call): judged once per distinct key, so a bulk
        # of 10,000 by one requester under one rule compares emails once, not 10,000 times.
        refusals: dict[_ApproverKey, tuple[str, str] | None] = {}
        for approval in selected:
            key = _approver_key(approval)
            if key not in refusals:
                try:
                    state.check_approver(approval, approver, self._directory)
                except state.ApprovalError as exc:
                    refusals[key] = (exc.code, exc.message)
                else:
                    refusals[key] = None
            refused = refusals[key]
            if refused is None:
                allowed.append(approval)
            else:
                outcome.skip(approval.id, *refused)
        if not allowed:
            return outcome
        # check_approver made sure the approver is a person.
        record = self._record(approver, approver.person, verdict, channel, reason)
        decision = _decision_fields(record, {"bulk": True})
        late: list[str] = []
        unavailable: StoreUnavailable | None = None
        synced = 0  # decisions made durable so far
        # Chunk by chunk, so the first requests are released (and forwarded) while the rest
        # are still being decided: each chunk is one store call (one round trip for Redis) and
        # its events, then a yield that lets the requests the chunk woke run.
        size, start = min(_RELEASE_FIRST, _RELEASE_CHUNK), 0
        while start < len(allowed):
            chunk = allowed[start : start + size]
            start, size = start + len(chunk), min(size * _RELEASE_GROWTH, _RELEASE_CHUNK)
            results = await self.store.decide_many([a.id for a in chunk], record, record.at)
            if all(isinstance(result, StoreUnavailable) for result in results):
                # The store is down, not one approval refused: the rest are not tried (each
                # chunk would wait out store.timeout_seconds again).
                unavailable = next(r for r in results if isinstance(r, StoreUnavailable))
                for approval in allowed[start - len(chunk) :]:
                    outcome.skip(
                        approval.id,
                        "approvals_unavailable",
                        "the approval store cannot be reached: this approval may or may not "
                        "be decided; look at it again",
                    )
                break
            for approval, result in zip(chunk, results, strict=True):
                if isinstance(result, Approval):
                    # Every event of the chunk sealed before anything else runs (no await in
                    # this loop): the decisions precede whatever the released requests record.
                    self._emit_decided_as(result, decision)
                    outcome.decided.append(result)
                elif isinstance(result, StoreUnavailable):
                    unavailable = result
                    outcome.skip(
                        approval.id,
                        "approvals_unavailable",
                        "the approval store failed part way: this approval may or may not be "
                        "decided; look at it again",
                    )
                else:
                    current = result.approval
                    if current is not None and current.state is ApprovalState.EXPIRED:
                        late.append(approval.id)
                    outcome.skip(approval.id, result.code, result.message)
            # The requests this chunk released take their turn while its decisions go to disk:
            # durable one commit after they start, as for a single decision (the requests
            # record what they do after these events in the chain, so never before them).
            if len(outcome.decided) > synced:
                synced = len(outcome.decided)
                await self._audit.sync()
            await asyncio.sleep(0)  # a sink with nothing to wait for yields nothing
        if not outcome.decided and unavailable is not None:
            raise unavailable
        for approval in outcome.decided:
            await self._after_decision(approval, record)
        for approval_id in late:
            await self._expire(approval_id, record.at)  # too late: audited once, by whoever
        return outcome

    async def _select(
        self,
        approver: Identity,
        rule: str | None,
        requester: str | None,
        ids: Sequence[str] | None,
        outcome: BulkDecision,
    ) -> list[Approval]:
        """The pending approvals a bulk decision's filter selects, oldest first; what `ids`
        names and is not selected goes into `outcome.skipped` with its reason."""

        def matches(approval: Approval) -> str | None:
            """Why the approval is outside the rule and requester keys, or None."""
            if rule is not None and approval.rule != rule:
                return f"approval {approval.id} is for rule {approval.rule!r}, not {rule!r}"
            if requester is not None and not _requested_by(approval, requester):
                return f"approval {approval.id} was not requested by {requester!r}"
            return None

        if ids is not None:
            named = list(dict.fromkeys(ids))
            found = await asyncio.gather(*(self.store.get(i) for i in named))
            selected: list[Approval] = []
            for approval_id, approval in zip(named, found, strict=True):
                if approval is None:
                    outcome.skip(approval_id, "approval_not_found", "approval not found")
                elif (why := matches(approval)) is not None:
                    outcome.skip(approval_id, "not_selected", why)
                elif approval.state is not ApprovalState.PENDING:
                    outcome.skip(
                        approval_id,
                        state.NotPending.code,
                        f"approval is {approval.state.value}",
                    )
                else:
                    selected.append(approval)
            return selected
        listed: list[Approval] = []
        cursor: str | None = None
        seen: dict[_ApproverKey, bool] = {}  # `may_see` per distinct key, as above

        def visible(approval: Approval) -> bool:
            key = _approver_key(approval)
            shown = seen.get(key)
            if shown is None:
                shown = seen[key] = self.may_see(approval, approver)
            return shown

        while True:
            page, cursor = await self.store.list(
                ApprovalState.PENDING, limit=_BULK_PAGE, cursor=cursor
            )
            listed.extend(
                a
                for a in page
                if a.state is ApprovalState.PENDING and matches(a) is None and visible(a)
            )
            if cursor is None:
                break
        listed.reverse()  # oldest first: released in the order they were asked for
        return listed

    # -- grants ------------------------------------------------------------------------------

    async def _create_grant(self, approval: Approval) -> Grant | None:
        """Store and audit the grant an approval just approved with; its time runs from the
        decision that approved it."""
        final = approval.final_decision
        if (
            approval.grant_id is None
            or approval.grant_uses is None
            or approval.grant_expires_at is None
            or final is None
        ):
            return None
        requester = approval.requester
        grant = Grant(
            id=approval.grant_id,
            approval_id=approval.id,
            scope=scope_of(
                issuer=requester.issuer,
                subject=requester.subject,
                client_id=requester.client_id,
                owner=requester.owner,
                rule=approval.rule,
                route=approval.route,
                method=approval.method,
                path=approval.path,
                actions=approval.actions,
            ),
            rule=approval.rule,
            route=approval.route,
            method=approval.method,
            path=approval.path,
            actions=tuple(sorted(set(approval.actions))),
            requester=requester,
            approver_groups=approval.approver_groups,
            approver_users=approval.approver_users,
            uses=approval.grant_uses,
            uses_left=approval.grant_uses,
            created_at=final.at,
            expires_at=approval.grant_expires_at,
            granted_by=tuple(d.who for d in approval.decisions if d.verdict is Verdict.APPROVE),
        )
        if not await self.store.add_grant(grant):
            return None
        await self._audit.emit_durable(
            audit.GRANT_CREATED, **_about_grant(grant), granted_by=list(grant.granted_by)
        )
        return grant

    async def use_grant(
        self,
        *,
        identity: Identity,
        rule: RuleSettings,
        route: str,
        method: str,
        path: str,
        actions: tuple[str, ...],
        request_id: str,
    ) -> Grant | None:
        """Take one use of a live grant covering this request, if any: the caller forwards it
        without a human. Only for a request the policy judged `approve` under `rule`, and only
        while the rule (as configured now) still allows grants. Audited durably (`grant.used`,
        and `grant.exhausted` for the last use) before the request goes on."""
        if rule.grant is None:
            return None
        scope = scope_of(
            issuer=identity.issuer,
            subject=identity.subject,
            client_id=identity.client_id,
            owner=identity.owner,
            rule=rule.name,
            route=route,
            method=method,
            path=path,
            actions=actions,
        )
        grant = await self.store.use_grant(scope, self._clock())
        if grant is None:
            return None
        await self._audit.emit_durable(
            audit.GRANT_USED, **_about_grant(grant), request_id=request_id
        )
        if grant.uses_left <= 0:
            await self._audit.emit_durable(
                audit.GRANT_EXHAUSTED, **_about_grant(grant), request_id=request_id
            )
        return grant

    def may_see_grant(self, grant: Grant, identity: Identity) -> bool:
        """Like approvals: its requester, the owner the agent acts for, the rule's approvers."""
        requester = grant.requester
        if (requester.issuer, requester.subject) == (identity.issuer, identity.subject):
            return True
        if identity.person is not None and identity.person == canonical_email(requester.owner):
            return True
        return self.may_revoke(grant, identity)

    def may_revoke(self, grant: Grant, identity: Identity) -> bool:
        """Any approver of the grant's rule (a revocation only ever takes permission away)."""
        return state.listed_in(
            grant.approver_groups, grant.approver_users, identity, self._directory
        )

    async def get_grant(self, grant_id: str) -> Grant | None:
        return await self.store.get_grant(grant_id)

    async def grants_for(self, identity: Identity, limit: int = 100) -> list[Grant]:
        """Up to `limit` kept grants `identity` may see, newest first."""
        grants = await self.store.list_grants(max(limit, 100))
        return [g for g in grants if self.may_see_grant(g, identity)][:limit]

    async def revoke_grant(self, grant_id: str, approver: Identity) -> Grant:
        """End a grant at once (audited `grant.revoked`). `ApprovalNotFound` for an unknown
        grant (or one the caller may not see), `NotAnApprover` for others."""
        grant = await self.store.get_grant(grant_id)
        if grant is None or not self.may_see_grant(grant, approver):
            raise ApprovalNotFound("grant not found")
        if not self.may_revoke(grant, approver):
            raise state.NotAnApprover(
                f"only an approver of rule {grant.rule!r} may revoke its grants"
            )
        by = approver.person or approver.email or approver.subject
        try:
            revoked, done = await self.store.revoke_grant(grant_id, by, self._clock())
        except KeyError:
            raise ApprovalNotFound("grant not found") from None
        if done:
            await self._audit.emit_durable(
                audit.GRANT_REVOKED,
                **_about_grant(revoked),
                revoked_by={
                    "subject": approver.subject,
                    "issuer": approver.issuer,
                    "email": approver.email,
                    "person": approver.person,
                },
            )
        return revoked

    def grant_view(self, grant: Grant) -> dict[str, Any]:
        return grant_json(grant, self._redactor, now=self._clock())
