"""Pure unit tests: the approval state machine, persons and who may decide (proxy/model/state.py)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.model import (
    Approval,
    ApprovalState,
    DecisionRecord,
    Identity,
    Outcome,
    Requester,
    Verdict,
)
from proxy.model.state import (
    ApprovalError,
    ApproverUnidentified,
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
    return Identity(
        subject=subject,
        issuer="https://idp",
        email=email,
        groups=frozenset(groups),
        email_verified=email is not None,
    )


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


def test_an_approver_without_a_person_cannot_decide() -> None:
    """No verified email, no person: refused before anything else, even in the group."""
    approval = requested_by(email=None, owner=None)
    with pytest.raises(ApproverUnidentified) as info:
        check_approver(approval, person("dave", None, OWNERS), NO_DIRECTORY)
    assert info.value.code == "approver_unidentified"


def test_an_unverified_email_is_no_person() -> None:
    unverified = Identity(
        subject="dave", issuer="https://idp", email="dave@example.com", groups=frozenset(OWNERS)
    )
    assert unverified.person is None
    with pytest.raises(ApproverUnidentified):
        check_approver(requested_by(), unverified, NO_DIRECTORY)


def test_owner_that_is_not_an_email_fails_closed() -> None:
    approval = requested_by(owner="u-12345")
    with pytest.raises(SelfApproval) as info:
        check_approver(approval, person("carol", "carol@example.com", OWNERS), NO_DIRECTORY)
    assert "not an email" in info.value.message


def test_owner_alias_address_is_still_self_approval() -> None:
    approval = requested_by(owner="alice@example.com")
    with pytest.raises(SelfApproval):
        check_approver(approval, person("u-9", " Alice+ops@Example.com ", OWNERS), {})


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


def test_approver_without_email_is_not_matched_by_users() -> None:
    approval = pending(approver_groups=(), approver_users=("carol@example.com",))
    with pytest.raises(ApproverUnidentified):
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
    assert info.value.code == "approval_used"


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
    recorded = record_outcome(executed, Outcome.COMPLETED, 502)
    assert recorded.upstream_status == 502
    assert recorded.state is ApprovalState.EXECUTED
    assert recorded.executed_at == executed.executed_at


@pytest.mark.parametrize(
    "state",
    [ApprovalState.PENDING, ApprovalState.APPROVED, ApprovalState.DENIED, ApprovalState.EXPIRED],
)
def test_record_outcome_refuses_unexecuted(state: ApprovalState) -> None:
    with pytest.raises(NotClaimable):
        record_outcome(in_state(state), Outcome.COMPLETED, 200)


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


# -- persons in a quorum ---------------------------------------------------------------------


def test_one_person_with_two_credentials_counts_once() -> None:
    """Same email, different subjects (a token and an API key): one person, quorum 2 unmet."""
    approval = pending(quorum=2)
    first = approve("bob-token", at=NOW, person="bob@example.com", approver_issuer="https://idp")
    once = decide(approval, first, NOW)
    second = approve("bob", at=NOW + 1, person="bob@example.com", approver_issuer="api-key")
    with pytest.raises(DuplicateApprover):
        decide(once, second, NOW + 1)


def test_same_subject_counts_once_even_with_another_email() -> None:
    approval = pending(quorum=2)
    once = decide(approval, approve("bob", at=NOW, person="bob@example.com"), NOW)
    with pytest.raises(DuplicateApprover):
        decide(once, approve("bob", at=NOW + 1, person="robert@example.com"), NOW + 1)


def test_lapse_after_claim_window() -> None:
    approved = decide(pending(claim_seconds=30.0), approve(at=NOW), NOW)
    assert approved.expires_at == NOW + 30
    lapsed = expire(approved, NOW + 30)
    assert lapsed.state is ApprovalState.LAPSED
    with pytest.raises(NotClaimable):
        claim(approved, NOW + 31)


@pytest.mark.parametrize("owner", [4242, ["alice@example.com"], {"sub": "alice@example.com"}])
def test_an_owner_claim_that_is_no_string_fails_closed(owner: object) -> None:
    """`act: {sub: 4242}`: an owner is there, but names nobody comparable: nobody decides."""
    from proxy.authn.oidc import identity_from_claims
    from proxy.config import ClaimsSettings

    agent = identity_from_claims(
        "https://idp", {"sub": "agent-x", "act": {"sub": owner}}, ClaimsSettings()
    )
    assert agent.owner is not None
    approval = pending(requester=Requester.of(agent))
    with pytest.raises(SelfApproval):
        check_approver(approval, person("carol", "carol@example.com", OWNERS), NO_DIRECTORY)


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        (" Alice@Example.COM ", "alice@example.com"),
        ("bob.o'neil+ops@mail.example.co.uk", "bob.o'neil+ops@mail.example.co.uk"),
        ("alice@example.com.", None),
        ('["alice@example.com"]', None),
        ('"alice"@example.com', None),
        ("alice@localhost", None),
        ("alice", None),
        (4242, None),
    ],
)
def test_canonical_email(raw: object, canonical: str | None) -> None:
    from proxy.model.persons import canonical_email

    assert canonical_email(raw) == canonical
