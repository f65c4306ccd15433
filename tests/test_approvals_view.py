"""What approvers see (DESIGN §2): the rule's risk and note, who may approve, the upstream URL,
a state label every channel shares; carried on the approval, kept by the stores, in the API's
JSON and in webhook payloads."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Any

import aiohttp
import pytest

from proxy.approvals.service import ApprovalService
from proxy.approvals.view import approval_json
from proxy.audit import AuditLog
from proxy.audit.redact import DEFAULT as REDACTOR
from proxy.config import ApprovalsSettings, ApproversSettings, RuleSettings
from proxy.model import Action, Approval, ApprovalState, Identity, Outcome, state_label
from proxy.model.binding import binding_of
from proxy.notify.webhook import WebhookNotifier
from proxy.store import codec
from proxy.store.memory import MemoryStore
from tests.helpers import ListSink
from tests.store_conformance import approve, make_approval


@pytest.mark.parametrize(
    ("changes", "label"),
    [
        ({"state": ApprovalState.PENDING}, "Pending"),
        ({"state": ApprovalState.APPROVED}, "Approved"),
        ({"state": ApprovalState.DENIED}, "Denied"),
        ({"state": ApprovalState.EXPIRED}, "Expired"),
        ({"state": ApprovalState.LAPSED}, "Lapsed"),
        ({"state": ApprovalState.EXECUTED}, "Executed"),  # outcome not recorded yet
        (
            {"state": ApprovalState.EXECUTED, "outcome": Outcome.COMPLETED, "upstream_status": 201},
            "Executed",
        ),
        (
            {"state": ApprovalState.EXECUTED, "outcome": Outcome.COMPLETED, "upstream_status": 404},
            "Executed",
        ),
        (
            {"state": ApprovalState.EXECUTED, "outcome": Outcome.COMPLETED, "upstream_status": 502},
            "Failed",
        ),
        ({"state": ApprovalState.EXECUTED, "outcome": Outcome.AMBIGUOUS}, "Ambiguous"),
    ],
)
def test_the_state_label_follows_the_state(changes: dict[str, Any], label: str) -> None:
    approval = make_approval(**changes)
    assert state_label(approval) == label
    assert approval_json(approval)["state_label"] == label


def described() -> Approval:
    return make_approval(
        risk="high",
        note="exports leave the company",
        approver_users=("dave@example.com",),
        approver_members=("carol@example.com", "erin@example.com"),
        upstream_url="https://cloud.example.com/api/exports/x",
        grant_max_uses=5,
        grant_max_seconds=600,
        decisions=(replace(approve(), grant_uses=2, grant_seconds=60),),
        grant_id="grt_x",
        grant_uses=2,
        grant_seconds=60,
        state=ApprovalState.APPROVED,
    )


def test_the_codec_round_trips_the_new_fields() -> None:
    approval = described()
    assert codec.loads(codec.dumps(approval)) == approval


def test_records_written_before_these_fields_read_with_defaults() -> None:
    old = asdict(make_approval(decisions=(approve(),)))
    for name in (
        "risk",
        "note",
        "approver_members",
        "grant_max_uses",
        "grant_max_seconds",
        "grant_id",
        "grant_uses",
        "grant_seconds",
    ):
        del old[name]
    for decision in old["decisions"]:
        del decision["grant_uses"], decision["grant_seconds"]
    loaded = codec.loads(json.dumps(old))
    assert (loaded.risk, loaded.note, loaded.approver_members) == (None, None, ())
    assert loaded.grant_max_uses is None and loaded.grant_id is None
    assert loaded.decisions[0].grant_uses is None
    assert approval_json(loaded)["grant"]["offered"] is False


def test_the_json_shows_risk_note_approvers_and_upstream() -> None:
    shown = approval_json(described())
    assert shown["risk"] == "high" and shown["note"] == "exports leave the company"
    assert shown["approvers"] == {
        "groups": ["data-owners"],
        "users": ["dave@example.com"],
        "members": ["carol@example.com", "erin@example.com"],
    }
    assert shown["upstream_url"] == "https://cloud.example.com/api/exports/x"
    assert shown["state_label"] == "Approved"
    assert shown["grant"]["grant_id"] == "grt_x" and shown["grant"]["uses"] == 2
    assert shown["grant"]["uses_left"] is None  # only the live grant knows


def test_a_note_is_redacted_like_everything_shown() -> None:
    shown = approval_json(make_approval(note="call with token ghp_" + "a" * 36), REDACTOR)
    assert "ghp_" + "a" * 36 not in shown["note"]


async def test_opening_carries_the_rules_risk_note_and_members() -> None:
    rule = RuleSettings(
        name="exports",
        action=Action.APPROVE,
        approvers=ApproversSettings(groups=("data-owners", "security"), users=("x@example.com",)),
        risk="medium",
        note="check the recipient",
    )
    directory = {
        "data-owners": ("Carol@Example.com", "erin@example.com"),
        "security": ("carol@example.com", "sam@example.com"),
    }
    service = ApprovalService(
        MemoryStore(), ApprovalsSettings(groups=directory), AuditLog([ListSink()])
    )
    agent = Identity(subject="agent-7", issuer="https://idp")
    approval, _ = await service.open(
        identity=agent,
        rule=rule,
        binding=binding_of(
            method="POST",
            target=b"/x",
            headers=(),
            body=b"",
            route="cloud",
            rule="exports",
            identity=agent,
        ),
        path="/cloud/x",
        query="",
        upstream_url="http://up/x",
        reason=None,
        request_id="r1",
    )
    assert (approval.risk, approval.note) == ("medium", "check the recipient")
    assert approval.approver_members == (
        "carol@example.com",
        "erin@example.com",
        "sam@example.com",
    )
    assert approval.grant_max_uses is None
    stored = await service.get(approval.id)
    assert stored == approval


async def test_webhook_payloads_carry_what_approvers_see() -> None:
    async with aiohttp.ClientSession() as session:
        notifier = WebhookNotifier("http://127.0.0.1:9/hook", None, session, REDACTOR)
        payload = notifier.payload("approval.decided", described())
    approval = payload["approval"]
    assert payload["event"] == "approval.decided"
    assert approval["risk"] == "high" and approval["note"] == "exports leave the company"
    assert approval["approvers"]["members"] == ["carol@example.com", "erin@example.com"]
    assert approval["upstream_url"] == "https://cloud.example.com/api/exports/x"
    assert approval["state_label"] == "Approved"
    assert approval["grant"]["grant_id"] == "grt_x"
