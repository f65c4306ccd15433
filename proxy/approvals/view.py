"""An approval as the outside world sees it: the API's JSON, webhook payloads, CLI output.

Everything an approver needs to judge what will run: method, the full target and the upstream
URL, every bound header (secret values already replaced and marked `redacted`), the identity
with its owner, the agent's reason, the rule and actions, quorum progress, expiry, and what
became of it. Passed through the redactor once more on the way out (a channel never relies on
what was stored being clean).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..audit.redact import DEFAULT as DEFAULT_REDACTOR
from ..audit.redact import Redactor
from ..model import Approval, Requester

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


def approval_json(approval: Approval, redactor: Redactor = DEFAULT_REDACTOR) -> dict[str, Any]:
    final = approval.final_decision
    data: dict[str, Any] = {
        "approval_id": approval.id,
        "state": approval.state.value,
        "rule": approval.rule,
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
        },
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
