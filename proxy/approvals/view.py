"""An approval as the outside world sees it: the API's JSON, webhook payloads, CLI output.

Everything an approver needs to judge what will run: method, the full target and the upstream
URL, every bound header (secret values already replaced and marked `redacted`), the identity
with its owner, the agent's reason, the rule and actions, quorum progress, expiry, and what
became of it. Passed through the redactor once more on the way out (a channel never relies on
what was stored being clean).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from ..audit.redact import DEFAULT as DEFAULT_REDACTOR
from ..audit.redact import Redactor
from ..model import Approval, Requester, state_label
from ..model.grant import Grant, pattern_of

BODY_PATH = "/_countersign/api/approvals/{id}/body"


def requester_log(requester: Requester) -> dict[str, Any]:
    return {
        "subject": requester.subject,
        "issuer": requester.issuer,
        "client_id": requester.client_id,
        "email": requester.email,
        "person": requester.person,
        "owner": requester.owner,
    }


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def grant_json(
    grant: Grant, redactor: Redactor = DEFAULT_REDACTOR, now: float | None = None
) -> dict[str, Any]:
    """A grant as approvers and the API see it: what it covers, for whom, how much is left."""
    data: dict[str, Any] = {
        "grant_id": grant.id,
        "approval_id": grant.approval_id,
        "state": grant.state(time.time() if now is None else now).value,
        "rule": grant.rule,
        "route": grant.route,
        "method": grant.method,
        "path": grant.path,
        "actions": list(grant.actions),
        "pattern": grant.pattern,
        "requester": requester_log(grant.requester),
        "owner": grant.requester.owner,
        "uses": grant.uses,
        "uses_left": grant.uses_left,
        "created_at": _iso(grant.created_at),
        "expires_at": _iso(grant.expires_at),
        "granted_by": list(grant.granted_by),
        "revoked_at": _iso(grant.revoked_at),
        "revoked_by": grant.revoked_by,
    }
    scrubbed: dict[str, Any] = redactor.value(data)
    return scrubbed


def _grant_part(approval: Approval, grant: Grant | None, now: float | None) -> dict[str, Any]:
    """What the approval says about grants: whether its rule offers them (and up to how much),
    and the grant it created (uses left and state only when the live grant is at hand)."""
    offered = approval.grant_max_uses is not None
    part: dict[str, Any] = {
        "offered": offered,
        "max_uses": approval.grant_max_uses,
        "max_seconds": approval.grant_max_seconds,
        "pattern": pattern_of(approval.method, approval.path, approval.actions)
        if offered
        else None,
        "grant_id": approval.grant_id,
    }
    if approval.grant_id is not None:
        part.update(
            uses=approval.grant_uses,
            seconds=approval.grant_seconds,
            expires_at=_iso(approval.grant_expires_at),
            uses_left=grant.uses_left if grant is not None else None,
            state=grant.state(time.time() if now is None else now).value
            if grant is not None
            else None,
        )
    return part


def approval_json(
    approval: Approval,
    redactor: Redactor = DEFAULT_REDACTOR,
    *,
    grant: Grant | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The approval's JSON. `grant`: the grant it created, as the store has it now (for its
    uses left); without it the grant part says what the approval itself knows."""
    final = approval.final_decision
    data: dict[str, Any] = {
        "approval_id": approval.id,
        "state": approval.state.value,
        "state_label": state_label(approval),
        "rule": approval.rule,
        "risk": approval.risk,
        "note": approval.note,
        "route": approval.route,
        "method": approval.method,
        "path": approval.path,
        "query": approval.query,
        "target": approval.target,
        "upstream_url": approval.upstream_url,
        "headers": [
            {"name": name, "value": value, "redacted": redacted}
            for name, value, redacted in approval.headers
        ],
        "actions": list(approval.actions),
        "tool_arguments": approval.tool_arguments,
        "earlier_attempt": approval.earlier_attempt,
        "requester": requester_log(approval.requester),
        "owner": approval.requester.owner,
        "reason": approval.reason,
        "body_preview": approval.body_preview,
        "body_truncated": approval.body_truncated,
        "body_bytes": approval.body_bytes,
        "body_sha256": approval.body_sha256 or None,
        "body_url": BODY_PATH.format(id=approval.id) if approval.body_bytes else None,
        "content_type": approval.content_type,
        "quorum": approval.quorum,
        "approvals": approval.approvals_count,
        "approvers": {
            "groups": list(approval.approver_groups),
            "users": list(approval.approver_users),
            # Members of those groups that `approvals.groups` lists (a token's groups claim
            # may make others approvers too).
            "members": list(approval.approver_members),
        },
        "grant": _grant_part(approval, grant, now),
        "decisions": [
            {
                "verdict": d.verdict.value,
                "approver": {
                    "subject": d.approver_subject,
                    "issuer": d.approver_issuer or None,
                    "email": d.approver_email,
                    "person": d.person,
                },
                "channel": d.channel,
                "reason": d.reason,
                "at": _iso(d.at),
            }
            for d in approval.decisions
        ],
        "decided_by": final.who if final else None,
        "created_at": _iso(approval.created_at),
        "expires_at": _iso(approval.expires_at),
        "executed_at": _iso(approval.executed_at),
        "outcome": approval.outcome.value if approval.outcome else None,
        "upstream_status": approval.upstream_status,
        "abandoned_at": _iso(approval.abandoned_at),
        "request_id": approval.request_id,
    }
    scrubbed: dict[str, Any] = redactor.value(data)
    return scrubbed
