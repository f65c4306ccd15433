"""Pure unit tests: the approval state machine and the request fingerprint / previews."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.approvals.fingerprint import (
    PREVIEW_BYTES,
    REASON_CHARS,
    body_preview,
    canonical_query,
    clean_reason,
    fingerprint,
)
from proxy.approvals.state import (
    ApprovalError,
    DuplicateApprover,
    NotAnApprover,
    NotClaimable,
    NotPending,
    SelfApproval,
    check_approver,
    claim,
    decide,
    expire,
    is_due,
    joinable,
    record_outcome,
)
from proxy.types import Approval, ApprovalState, DecisionRecord, Identity, Requester, Verdict
from tests.store_conformance import approve, deny, make_approval

NOW = 1_700_000_000.0
JWT = (
    "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiJhZ2VudC03IiwiaXNzIjoiaHR0cHM6Ly9pZHAifQ"
    ".c2lnbmF0dXJlLWJ5dGVzLWhlcmU"
)


def pending(**overrides: Any) -> Approval:
    fields: dict[str, Any] = {"created_at": NOW, "expires_at": NOW + 60}
    fields.update(overrides)
    return make_approval(**fields)


def in_state(state: ApprovalState, **overrides: Any) -> Approval:
    approval = pending(**overrides)
    if state is ApprovalState.PENDING:
        return approval
    if state is ApprovalState.EXPIRED:
        return expire(approval, approval.expires_at)
    if state is ApprovalState.DENIED:
        return decide(approval, deny(at=NOW), NOW)
    approved = decide(approval, approve(at=NOW), NOW)
    if state is ApprovalState.APPROVED:
        return approved
    return claim(approved, NOW + 1)


def person(
    subject: str = "dave",
    email: str | None = "dave@example.com",
    groups: tuple[str, ...] = (),
) -> Identity:
    return Identity(subject=subject, issuer="https://idp", email=email, groups=frozenset(groups))


OWNERS = ("data-owners",)
NO_DIRECTORY: dict[str, tuple[str, ...]] = {}


# -- check_approver: zero self-approval -------------------------------------------------------


def requested_by(**requester: Any) -> Approval:
    fields: dict[str, Any] = {"subject": "agent-7", "issuer": "https://idp", "email": None}
    fields.update(requester)
    return pending(requester=Requester(**fields), approver_users=("agent7@example.com",))


def test_requester_subject_cannot_approve_even_in_the_group() -> None:
    approval = requested_by(owner="alice@example.com")
    with pytest.raises(SelfApproval) as info:
        check_approver(approval, person("agent-7", None, OWNERS), NO_DIRECTORY)
    assert info.value.code == "self_approval"
    assert info.value.status == 403


def test_requester_email_cannot_approve_case_insensitive() -> None:
    approval = requested_by(email="Agent7@Example.COM")
    with pytest.raises(SelfApproval):
        check_approver(approval, person("someone-else", "agent7@example.com", OWNERS), {})


def test_requester_email_cannot_approve_even_as_rule_user() -> None:
    approval = requested_by(email="agent7@example.com")  # and listed in approver_users
    with pytest.raises(SelfApproval):
        check_approver(approval, person("other", "AGENT7@example.com"), NO_DIRECTORY)


def test_owner_matching_approver_subject_is_self_approval() -> None:
    approval = requested_by(owner="alice")
    with pytest.raises(SelfApproval):
        check_approver(approval, person("alice", "alice@corp.example", OWNERS), NO_DIRECTORY)


def test_owner_matching_approver_email_is_self_approval() -> None:
    approval = requested_by(owner="alice@example.com")
    with pytest.raises(SelfApproval):
        check_approver(approval, person("u-123", "ALICE@example.com", OWNERS), NO_DIRECTORY)


def test_owner_in_directory_is_still_self_approval() -> None:
    approval = requested_by(owner="alice@example.com")
    directory = {"data-owners": ("alice@example.com",)}
    with pytest.raises(SelfApproval):
        check_approver(approval, person("u-123", "alice@example.com"), directory)


def test_missing_emails_never_match_each_other() -> None:
    """None on both sides is not "the same person"."""
    approval = requested_by(email=None, owner=None)
    check_approver(approval, person("dave", None, OWNERS), NO_DIRECTORY)


# -- check_approver: authorization -----------------------------------------------------------


def test_approver_in_token_groups_is_ok() -> None:
    check_approver(pending(), person(groups=("data-owners", "other")), NO_DIRECTORY)


def test_approver_email_in_rule_users_is_ok_case_insensitive() -> None:
    approval = pending(approver_groups=(), approver_users=("Carol@Example.com",))
    check_approver(approval, person("carol", "carol@EXAMPLE.com"), NO_DIRECTORY)


def test_approver_email_in_directory_group_is_ok() -> None:
    directory = {"data-owners": ("erin@example.com", "Carol@Example.com")}
    check_approver(pending(), person("carol", "carol@example.com"), directory)


def test_directory_of_another_group_does_not_count() -> None:
    directory = {"sre": ("carol@example.com",)}
    with pytest.raises(NotAnApprover):
        check_approver(pending(), person("carol", "carol@example.com"), directory)


def test_token_group_of_another_rule_does_not_count() -> None:
    with pytest.raises(NotAnApprover):
        check_approver(pending(), person(groups=("sre",)), NO_DIRECTORY)


def test_nobody_is_not_an_approver_and_the_message_names_the_rule() -> None:
    approval = pending(rule="exports", approver_users=("carol@example.com",))
    with pytest.raises(NotAnApprover) as info:
        check_approver(approval, person("mallory", "mallory@example.com"), NO_DIRECTORY)
    assert "'exports'" in info.value.message
    assert "data-owners" in info.value.message
    assert "carol@example.com" in info.value.message
    assert info.value.code == "not_an_approver"
    assert info.value.status == 403


def test_approver_without_email_is_not_matched_by_users() -> None:
    approval = pending(approver_groups=(), approver_users=("carol@example.com",))
    with pytest.raises(NotAnApprover):
        check_approver(approval, person("carol", None), NO_DIRECTORY)


# -- decide ----------------------------------------------------------------------------------


def test_approve_reaches_quorum_one() -> None:
    rec = approve("bob", at=NOW)
    decided = decide(pending(), rec, NOW)
    assert decided.state is ApprovalState.APPROVED
    assert decided.decisions == (rec,)
    assert decided.final_decision == rec


def test_deny_is_final_and_keeps_the_record() -> None:
    rec = DecisionRecord(
        verdict=Verdict.DENY,
        approver_subject="bob",
        approver_email="bob@example.com",
        channel="web",
        reason="wrong bucket",
        at=NOW + 5,
    )
    decided = decide(pending(), rec, NOW + 5)
    assert decided.state is ApprovalState.DENIED
    assert decided.decisions == (rec,)
    assert decided.final_decision == rec


def test_decide_does_not_mutate_its_input() -> None:
    approval = pending()
    decide(approval, approve(at=NOW), NOW)
    assert approval.state is ApprovalState.PENDING
    assert approval.decisions == ()


@pytest.mark.parametrize(
    "state",
    [ApprovalState.APPROVED, ApprovalState.DENIED, ApprovalState.EXPIRED, ApprovalState.EXECUTED],
)
@pytest.mark.parametrize("verdict", [Verdict.APPROVE, Verdict.DENY])
def test_decide_when_not_pending(state: ApprovalState, verdict: Verdict) -> None:
    approval = in_state(state)
    rec = approve("carol", at=NOW) if verdict is Verdict.APPROVE else deny("carol", at=NOW)
    with pytest.raises(NotPending) as info:
        decide(approval, rec, NOW)
    assert info.value.approval is approval
    assert info.value.code == "approval_not_pending"
    assert info.value.status == 409


@pytest.mark.parametrize("late", [0, 1])
def test_decide_at_or_after_deadline_reports_expired(late: float) -> None:
    approval = pending()
    with pytest.raises(NotPending) as info:
        decide(approval, approve(at=NOW), approval.expires_at + late)
    assert info.value.approval is not None
    assert info.value.approval.state is ApprovalState.EXPIRED
    assert info.value.approval.decisions == ()
    assert approval.state is ApprovalState.PENDING


def test_quorum_two_needs_two_distinct_approvers() -> None:
    approval = pending(quorum=2)
    once = decide(approval, approve("bob", at=NOW), NOW)
    assert once.state is ApprovalState.PENDING
    assert once.approvals_count == 1
    assert once.final_decision is None
    with pytest.raises(DuplicateApprover) as info:
        decide(once, approve("bob", at=NOW + 1), NOW + 1)
    assert info.value.approval is once
    assert info.value.code == "already_approved"
    twice = decide(once, approve("carol", at=NOW + 2), NOW + 2)
    assert twice.state is ApprovalState.APPROVED
    assert twice.approvals_count == 2
    assert twice.final_decision is not None
    assert twice.final_decision.approver_subject == "carol"


def test_single_denial_before_quorum_is_final() -> None:
    once = decide(pending(quorum=3), approve("bob", at=NOW), NOW)
    denied = decide(once, deny("carol", at=NOW), NOW)
    assert denied.state is ApprovalState.DENIED
    assert denied.final_decision is not None
    assert denied.final_decision.verdict is Verdict.DENY


def test_an_approver_may_still_deny_after_approving() -> None:
    once = decide(pending(quorum=2), approve("bob", at=NOW), NOW)
    denied = decide(once, deny("bob", at=NOW), NOW)
    assert denied.state is ApprovalState.DENIED


# -- approvals_count / final_decision --------------------------------------------------------


def test_approvals_count_counts_distinct_approving_subjects() -> None:
    approval = pending(
        quorum=5,
        decisions=(
            approve("bob", at=NOW),
            approve("bob", at=NOW + 1),
            approve("carol", at=NOW + 2),
            deny("dave", at=NOW + 3),
        ),
    )
    assert approval.approvals_count == 2


def test_final_decision_by_state() -> None:
    assert pending().final_decision is None
    assert pending(decisions=(approve(at=NOW),)).final_decision is None  # quorum not reached
    assert in_state(ApprovalState.EXPIRED).final_decision is None
    for state in (ApprovalState.APPROVED, ApprovalState.DENIED, ApprovalState.EXECUTED):
        approval = in_state(state)
        assert approval.final_decision is approval.decisions[-1]
    denial = in_state(ApprovalState.DENIED).final_decision
    assert denial is not None and denial.verdict is Verdict.DENY


# -- claim -----------------------------------------------------------------------------------


def test_claim_executes_an_approved_approval() -> None:
    approved = in_state(ApprovalState.APPROVED)
    claimed = claim(approved, NOW + 7)
    assert claimed.state is ApprovalState.EXECUTED
    assert claimed.executed_at == NOW + 7
    assert claimed.decisions == approved.decisions
    assert approved.state is ApprovalState.APPROVED


@pytest.mark.parametrize(
    "state",
    [ApprovalState.PENDING, ApprovalState.DENIED, ApprovalState.EXPIRED, ApprovalState.EXECUTED],
)
def test_claim_refuses_everything_but_approved(state: ApprovalState) -> None:
    approval = in_state(state)
    with pytest.raises(NotClaimable) as info:
        claim(approval, NOW + 2)
    assert info.value.approval is approval
    assert info.value.code == "approval_not_approved"
    assert info.value.status == 403


# -- expire / is_due -------------------------------------------------------------------------


def test_expire_before_deadline_returns_it_unchanged() -> None:
    approval = pending()
    assert expire(approval, approval.expires_at - 0.001) is approval
    assert not is_due(approval, approval.expires_at - 0.001)


def test_expire_at_deadline() -> None:
    approval = pending()
    assert is_due(approval, approval.expires_at)
    expired = expire(approval, approval.expires_at)
    assert expired.state is ApprovalState.EXPIRED
    assert approval.state is ApprovalState.PENDING


@pytest.mark.parametrize(
    "state",
    [ApprovalState.DENIED, ApprovalState.EXPIRED, ApprovalState.EXECUTED],
)
def test_expire_leaves_finished_approvals_alone(state: ApprovalState) -> None:
    approval = in_state(state)
    later = approval.expires_at + 3600
    assert not is_due(approval, later)
    assert expire(approval, later) is approval


# -- record_outcome --------------------------------------------------------------------------


def test_record_outcome_on_executed() -> None:
    executed = in_state(ApprovalState.EXECUTED)
    recorded = record_outcome(executed, 502)
    assert recorded.upstream_status == 502
    assert recorded.state is ApprovalState.EXECUTED
    assert recorded.executed_at == executed.executed_at


@pytest.mark.parametrize(
    "state",
    [ApprovalState.PENDING, ApprovalState.APPROVED, ApprovalState.DENIED, ApprovalState.EXPIRED],
)
def test_record_outcome_refuses_unexecuted(state: ApprovalState) -> None:
    with pytest.raises(NotClaimable):
        record_outcome(in_state(state), 200)


# -- joinable / errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (ApprovalState.PENDING, True),
        (ApprovalState.APPROVED, True),
        (ApprovalState.DENIED, False),
        (ApprovalState.EXPIRED, False),
        (ApprovalState.EXECUTED, False),
    ],
)
def test_joinable(state: ApprovalState, expected: bool) -> None:
    assert joinable(in_state(state)) is expected


@pytest.mark.parametrize(
    "error", [NotPending, DuplicateApprover, NotClaimable, SelfApproval, NotAnApprover]
)
def test_errors_are_approval_errors(error: type[ApprovalError]) -> None:
    exc = error("message")
    assert isinstance(exc, ApprovalError)
    assert str(exc) == exc.message == "message"
    assert exc.approval is None


# -- fingerprint -----------------------------------------------------------------------------

BASE_REQUEST: dict[str, Any] = {
    "method": "POST",
    "path": "/cloud/exports/x",
    "query": "a=1&b=2",
    "route": "cloud",
    "issuer": "https://idp",
    "subject": "agent-7",
    "body": b'{"rows": 10}',
}


def test_fingerprint_is_stable_sha256_hex() -> None:
    fp = fingerprint(**BASE_REQUEST)
    assert fp == fingerprint(**BASE_REQUEST)
    assert len(fp) == 64
    int(fp, 16)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("method", "PUT"),
        ("path", "/cloud/exports/y"),
        ("query", "a=1&b=3"),
        ("query", ""),
        ("route", "raw"),
        ("issuer", "https://other-idp"),
        ("subject", "agent-8"),
        ("body", b'{"rows": 11}'),
        ("body", b""),
    ],
)
def test_fingerprint_changes_with_each_part(field: str, value: object) -> None:
    assert fingerprint(**BASE_REQUEST) != fingerprint(**{**BASE_REQUEST, field: value})


def test_fingerprint_ignores_query_parameter_order() -> None:
    assert fingerprint(**{**BASE_REQUEST, "query": "a=1&b=2"}) == fingerprint(
        **{**BASE_REQUEST, "query": "b=2&a=1"}
    )
    assert canonical_query("b=2&a=1") == canonical_query("a=1&b=2") == "a=1&b=2"
    assert canonical_query("") == ""


def test_fingerprint_parts_are_delimited() -> None:
    """Moving bytes from one part to the next must not produce the same fingerprint."""
    shifted = {**BASE_REQUEST, "method": "POST/cloud", "path": "/exports/x"}
    assert fingerprint(**BASE_REQUEST) != fingerprint(**shifted)
    shifted = {**BASE_REQUEST, "issuer": "https://idpagent", "subject": "-7"}
    assert fingerprint(**BASE_REQUEST) != fingerprint(**shifted)


# -- body_preview ----------------------------------------------------------------------------


def test_body_preview_empty() -> None:
    assert body_preview(b"", "application/json") == ""


def test_body_preview_redacts_sensitive_json_fields() -> None:
    body = b'{"user": "alice", "password": "hunter2", "nested": {"Token": "abc123"}, "n": 1}'
    preview = body_preview(body, "application/json; charset=utf-8")
    assert "hunter2" not in preview
    assert "abc123" not in preview
    assert '"password": "[REDACTED]"' in preview
    assert '"Token": "[REDACTED]"' in preview
    assert '"user": "alice"' in preview
    assert '"n": 1' in preview


def test_body_preview_redacts_jwt_in_json_values() -> None:
    body = ('{"note": "use ' + JWT + ' please"}').encode()
    preview = body_preview(body, "application/json")
    assert JWT not in preview
    assert "[REDACTED]" in preview
    assert "please" in preview


def test_body_preview_redacts_jwt_in_text() -> None:
    preview = body_preview(f"Authorization: Bearer {JWT}\n".encode(), "text/plain")
    assert JWT not in preview
    assert "Bearer [REDACTED]" in preview


def test_body_preview_invalid_json_is_still_redacted_as_text() -> None:
    preview = body_preview(f'{{"token": "{JWT}"'.encode(), "application/json")
    assert JWT not in preview


def test_body_preview_truncates_long_text_with_total_bytes() -> None:
    body = ("x" * 5000).encode()
    preview = body_preview(body, "text/plain")
    assert preview.startswith("x" * PREVIEW_BYTES)
    assert preview.endswith("… (5000 bytes in all)")
    assert preview.count("x") == PREVIEW_BYTES


def test_body_preview_total_counts_bytes_not_characters() -> None:
    body = ("é" * 3000).encode()  # 6000 bytes
    preview = body_preview(body, None)
    assert preview.endswith("… (6000 bytes in all)")


def test_body_preview_short_text_is_whole() -> None:
    assert body_preview(b"hello world", "text/plain") == "hello world"


def test_body_preview_binary() -> None:
    body = b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01"
    assert body_preview(body, "image/png") == f"<{len(body)} bytes of binary data>"
    assert body_preview(b"\xff", None) == "<1 bytes of binary data>"


# -- clean_reason ----------------------------------------------------------------------------


@pytest.mark.parametrize("reason", [None, "", "   \n\t"])
def test_clean_reason_empty_is_none(reason: str | None) -> None:
    assert clean_reason(reason) is None


def test_clean_reason_strips() -> None:
    assert clean_reason("  monthly export \n") == "monthly export"


def test_clean_reason_truncates_to_500_chars() -> None:
    cleaned = clean_reason("r" * 2000)
    assert cleaned == "r" * REASON_CHARS
    assert REASON_CHARS == 500


def test_clean_reason_redacts_secrets() -> None:
    cleaned = clean_reason(f"retry with {JWT} and AKIAABCDEFGHIJKLMNOP")
    assert cleaned is not None
    assert JWT not in cleaned
    assert "AKIAABCDEFGHIJKLMNOP" not in cleaned
    assert cleaned.startswith("retry with [REDACTED]")


def test_clean_reason_redacts_before_truncating() -> None:
    """A secret straddling the 500-char limit must not leak its first half."""
    reason = "x" * (REASON_CHARS - 10) + " " + JWT
    cleaned = clean_reason(reason)
    assert cleaned is not None
    assert len(cleaned) <= REASON_CHARS
    assert "eyJhbGci" not in cleaned
