"""JSON error answers: every refusal the proxy makes has one JSON shape.

    {"error": {"code": "approval_denied",
               "message": "Denied by carol@example.com: not this quarter",
               "approval_id": "apr_…", "rule": "exports", "reason": "…", "decided_by": "…",
               "request_id": "…"}}

`code` is stable and machine-readable; `message` is a sentence for humans (SDKs of the OpenAI and
Anthropic kind show it as the exception's text) and is always present; every other field is
context, present when known.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from aiohttp import web

from ..front.message import Answer

# Countersign's own id of a request: sent upstream and on every answer. `X-Request-Id` is the
# client's going up and the upstream's coming back; only answers Countersign makes itself carry
# ours under that name too (no upstream id exists there).
COUNTERSIGN_REQUEST_ID_HEADER = "Countersign-Request-Id"
REQUEST_ID_HEADER = "X-Request-Id"
APPROVAL_ID_HEADER = "Countersign-Approval-Id"  # on the answer to an approved request
GRANT_ID_HEADER = "Countersign-Grant-Id"  # on the answer to a request a grant let through
APPROVAL_HEADER = "Countersign-Approval"  # async mode: the client names the approval to use
REASON_HEADER = "Countersign-Reason"  # the agent's stated intent, shown to approvers


# A refusal an agent gets on a privileged request says what happened and what to do next: SDKs
# show the message to the model as the exception's text, so it must be a sentence it can act on.
_DO_NOT_RETRY = "Do not retry this request; it will be denied again unless something changes."

# The sentence an error carries when its maker gives none (keyed by code).
DEFAULT_MESSAGES: dict[str, str] = {
    "unauthorized": "a valid credential is required",
    "policy_denied": "the policy does not allow this request",
    "approval_denied": "The request was denied by an approver. " + _DO_NOT_RETRY,
    "approval_expired": "Nobody decided in time. Ask a human to look at the approvals inbox, "
    "then send the request again.",
    "approval_lapsed": "Approved, but not sent again within approvals.claim_seconds; send the "
    "request again to ask for a new approval.",
    "approval_used": "This approval was already used once; each approval covers one execution. "
    f"Send the request again (without {APPROVAL_HEADER}) to ask for a new one.",
    "approval_mismatch": "This approval does not cover this exact request by this caller: "
    "re-send the identical request (same method, path, query, headers and body) or ask for a "
    "new approval.",
    "self_approval": "nobody may decide their own request",
    "approver_unidentified": "the approver could not be identified",
    "not_an_approver": "you are not an approver of this request",
    "ambiguous_request": "the request is ambiguous and was refused",
    "invalid_request": "the request is not valid",
    "reason_required": "a reason is required for this decision",
    "no_route": "no route matches this path",
    "approval_not_found": "no such approval",
    "method_not_allowed": "this method is not allowed here",
    "approval_not_pending": "the approval is no longer pending",
    "already_approved": "you have already approved this request",
    "payload_too_large": "the request body is too large",
    "header_too_large": "the request head is too large",
    "too_many_pending": "You have too many requests waiting for approval; wait for decisions, "
    "then retry after the Retry-After seconds.",
    "approvals_unavailable": "the approval store cannot be reached; nothing was forwarded",
    "identity_unavailable": "credentials cannot be verified right now; retry later",
    "shutting_down": "the proxy is shutting down; retry shortly",
    "upstream_unavailable": "the upstream could not be reached",
    "upstream_timeout": "the upstream did not answer in time",
    "audit_unavailable": "the audit trail cannot be written; nothing was forwarded",
    "internal_error": "Countersign failed to handle this request",
}
# What an agent hears when `policy.default: approve` held its request: nobody can decide it.
NO_APPROVERS_MESSAGE = (
    "no rule matched and policy.default is approve, which names no approvers; nothing was forwarded"
)
# Retry-After (seconds) for statuses that mean "later", unless the caller names its own.
DEFAULT_RETRY_AFTER: dict[int, str] = {429: "30", 503: "5"}


def full_stop(text: str) -> str:
    """`text` ending as a sentence: a full stop added unless it already ends with one."""
    text = text.rstrip()
    return text if text.endswith((".", "!", "?")) else text + "."


def default_message(code: str, status: int, fields: dict[str, Any] | None = None) -> str:
    """A sentence for `code`, using the context in `fields` where it says more."""
    fields = fields or {}
    decided_by, reason, rule = fields.get("decided_by"), fields.get("reason"), fields.get("rule")
    if code == "approval_denied" and decided_by:
        denied = f"Denied by {decided_by}: {reason}" if reason else f"Denied by {decided_by}"
        return f"{full_stop(denied)} {_DO_NOT_RETRY}"
    if code == "approval_expired" and reason:
        return f"the approval expired: {reason}"
    if code == "policy_denied" and rule:
        return f"the policy denies this request (rule {rule})"
    if code == "no_route" and fields.get("path"):
        return f"no route matches {fields['path']}"
    if code in DEFAULT_MESSAGES:
        return DEFAULT_MESSAGES[code]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return code.replace("_", " ")


def error_body(
    status: int,
    code: str,
    *,
    message: str | None = None,
    request_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """`{"error": {"code", "message", …fields, "request_id"}}`; None fields are dropped."""
    context = {k: v for k, v in fields.items() if v is not None}
    detail: dict[str, Any] = {
        "code": code,
        "message": message or default_message(code, status, context),
        **context,
    }
    if request_id is not None:
        detail["request_id"] = request_id
    return {"error": detail}


def error_sentence(body: dict[str, Any]) -> str:
    """An error body as one line of text, for clients that show text and no JSON (AWS SDKs,
    MCP tool results): the message, then what an operator needs to find the approval."""
    error = body["error"]
    context = [
        f"{label} {error[name]}"
        for name, label in (
            ("approval_id", "approval"),
            ("rule", "rule"),
            ("request_id", "request"),
        )
        if error.get(name) is not None
    ]
    message = str(error["message"])
    return f"{message} [countersign {error['code']}: {', '.join(context)}]" if context else message


def error_answer(
    status: int,
    error: str,
    *,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
    message: str | None = None,
    **fields: Any,
) -> Answer:
    """A JSON error answer; `error` is the code. `Countersign-Request-Id` and `X-Request-Id`
    are set when the id is known; 429 and 503 carry `Retry-After` unless `headers` name one."""
    body = error_body(status, error, message=message, request_id=request_id, **fields)
    out_headers = dict(headers or {})
    if request_id is not None:
        out_headers[COUNTERSIGN_REQUEST_ID_HEADER] = request_id
        out_headers[REQUEST_ID_HEADER] = request_id
    retry_after = DEFAULT_RETRY_AFTER.get(status)
    if retry_after is not None and not any(k.lower() == "retry-after" for k in out_headers):
        out_headers["Retry-After"] = retry_after
    return Answer(
        status,
        json.dumps(body).encode(),
        [("Content-Type", "application/json"), *out_headers.items()],
    )


_FRAMING = frozenset({"content-length", "transfer-encoding"})


def to_web(answer: Answer) -> web.Response:
    """An `Answer` as aiohttp's response (the control plane, and the aiohttp front)."""
    response = web.Response(status=answer.status, reason=answer.reason, body=answer.body)
    # The framing is the body's own, as a front sets it (an upstream's length may describe a
    # body the proxy rewrote).
    response.headers.extend(item for item in answer.headers if item[0].lower() not in _FRAMING)
    if answer.close:
        response.force_close()
    return response


def error_response(
    status: int,
    error: str,
    *,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
    message: str | None = None,
    **fields: Any,
) -> web.Response:
    """`error_answer` as aiohttp's response."""
    return to_web(
        error_answer(
            status, error, request_id=request_id, headers=headers, message=message, **fields
        )
    )


# The one table from the codes of domain errors (`proxy.model.state`) to HTTP statuses: the
# model names what went wrong, the edge chooses how to say it.
STATUS_BY_CODE: dict[str, int] = {
    "approval_denied": 403,
    "approval_expired": 403,
    "approval_lapsed": 403,
    "approval_used": 403,
    "approval_mismatch": 403,
    "self_approval": 403,
    "approver_unidentified": 403,
    "not_an_approver": 403,
    "reason_required": 400,
    "invalid_request": 400,
    "approval_not_found": 404,
    "grant_not_found": 404,
    "approval_not_pending": 409,
    "already_approved": 409,
    "too_many_pending": 429,
}


def status_for(code: str) -> int:
    """The HTTP status for a domain error's code (409 for a conflict not listed)."""
    return STATUS_BY_CODE.get(code, 409)
