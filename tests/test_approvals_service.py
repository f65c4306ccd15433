"""The approvals service on a fake clock: expiry is audited exactly once, however it happens."""

from __future__ import annotations

import pytest

from proxy.approvals.service import ApprovalService
from proxy.audit import AuditLog
from proxy.config import ApprovalsSettings, ApproversSettings, RuleSettings
from proxy.model import Action, Approval, ApprovalState, Identity, Verdict
from proxy.model.binding import binding_of
from proxy.model.state import NotPending
from proxy.store.memory import MemoryStore
from tests.helpers import ListSink

AGENT = Identity(subject="agent-7", issuer="https://idp", groups=frozenset({"agents"}))
ALICE = Identity(
    subject="alice",
    issuer="https://idp",
    email="alice@example.com",
    groups=frozenset({"data-owners"}),
    email_verified=True,
)
RULE = RuleSettings(
    name="exports",
    action=Action.APPROVE,
    approvers=ApproversSettings(groups=("data-owners",)),
    timeout_seconds=60,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def open_export(service: ApprovalService, request_id: str) -> tuple[Approval, bool]:
    return await service.open(
        identity=AGENT,
        rule=RULE,
        binding=binding_of(
            method="POST",
            target=b"/api/exports/x",
            headers=((b"content-type", b"application/json"),),
            body=b"{}",
            route="cloud",
            rule="exports",
            identity=AGENT,
        ),
        path="/cloud/exports/x",
        query="",
        upstream_url="http://upstream/api/exports/x",
        reason=None,
        request_id=request_id,
    )


async def opened(clock: Clock) -> tuple[ApprovalService, ListSink, str]:
    sink = ListSink()
    service = ApprovalService(MemoryStore(), ApprovalsSettings(), AuditLog([sink]), clock=clock)
    approval, created = await open_export(service, "r1")
    assert created
    return service, sink, approval.id


async def test_a_late_decision_expires_the_approval_and_audits_it_once() -> None:
    clock = Clock()
    service, sink, approval_id = await opened(clock)
    clock.now += 61
    with pytest.raises(NotPending):
        await service.decide(approval_id, ALICE, Verdict.APPROVE, None, "api")
    approval = await service.get(approval_id)
    assert approval is not None and approval.state is ApprovalState.EXPIRED
    assert await service.expire_due() == 0
    assert [e["approval_id"] for e in sink.named("approval.expired")] == [approval_id]
    assert not sink.named("approval.decided")


async def test_the_sweeper_expires_due_approvals_once() -> None:
    clock = Clock()
    service, sink, approval_id = await opened(clock)
    assert await service.expire_due() == 0
    clock.now += 60
    assert await service.expire_due() == 1
    assert await service.expire_due() == 0
    assert len(sink.named("approval.expired")) == 1
    waited = await service.wait_for_decision(approval_id)
    assert waited.state is ApprovalState.EXPIRED


async def test_a_retry_after_the_deadline_opens_a_new_approval() -> None:
    clock = Clock()
    service, _, first = await opened(clock)
    clock.now += 61
    approval, created = await open_export(service, "r2")
    assert created and approval.id != first
