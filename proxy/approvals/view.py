"""An approval as the outside world sees it: the API's JSON, webhook payloads, CLI output."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..types import Approval, Requester


def requester_log(requester: Requester) -> dict[str, Any]:
    return {
        "subject": requester.subject,
        "issuer": requester.issuer,
        "client_id": requester.client_id,
        "email": requester.email,
        "owner": requester.owner,
    }


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def approval_json(approval: Approval) -> dict[str, Any]:
    final = approval.final_decision
    return {
        "approval_id": approval.id,
        "state": approval.state.value,
        "rule": approval.rule,
        "route": approval.route,
        "method": approval.method,
        "path": approval.path,
        "query": approval.query,
        "requester": requester_log(approval.requester),
        "reason": approval.reason,
        "body_preview": approval.body_preview,
        "body_bytes": approval.body_bytes,
        "content_type": approval.content_type,
        "quorum": approval.quorum,
        "approvals": approval.approvals_count,
        "approvers": {
            "groups": list(approval.approver_groups),
            "users": list(approval.approver_users),
        },
        "decisions": [
            {
                "verdict": d.verdict.value,
                "approver": {"subject": d.approver_subject, "email": d.approver_email},
                "channel": d.channel,
                "reason": d.reason,
                "at": _iso(d.at),
            }
            for d in approval.decisions
        ],
        "decided_by": (final.approver_email or final.approver_subject) if final else None,
        "created_at": _iso(approval.created_at),
        "expires_at": _iso(approval.expires_at),
        "executed_at": _iso(approval.executed_at),
        "upstream_status": approval.upstream_status,
        "request_id": approval.request_id,
    }
