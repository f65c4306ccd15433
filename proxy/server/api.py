"""The approvals API under `/_countersign/api/`: list, show, decide; list and revoke grants.

Every call authenticates like the proxy does (bearer JWT or API key). Requesters see their own
approvals; approvers see and decide those they are authorized for. Errors are JSON bodies.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..approvals.receipts import ReceiptIssuer
from ..approvals.service import ApprovalService
from ..audit import AuditUnavailable
from ..audit.receipts import CONTENT_TYPE as RECEIPT_CONTENT_TYPE
from ..authn import AuthError, IdentityUnavailable
from ..model import Approval, ApprovalState, Identity, Outcome, Verdict, state
from ..model.grant import Grant
from ..store.base import InvalidCursor, StoreUnavailable, parse_cursor
from .keys import AUTHENTICATOR
from .responses import error_response, status_for

PREFIX = "/_countersign/api/"
# An executed approval without its receipt this long after execution will not get one.
RECEIPT_GRACE_SECONDS = 60.0


def api_routes(
    service: ApprovalService, receipts: ReceiptIssuer | None = None
) -> web.RouteTableDef:
    """The API's routes; callers authenticate through the app's `AUTHENTICATOR` (built once the
    server's loop runs). `receipts`: with `audit.signing_key`, executed approvals' receipts."""
    routes = web.RouteTableDef()

    async def who(request: web.Request) -> Identity:
        try:
            authenticator = request.app[AUTHENTICATOR].get()
            return await authenticator.authenticate(request.headers.get("Authorization"))
        except AuthError as exc:
            description = exc.description.replace('"', "'")
            challenge = f'Bearer error="invalid_token", error_description="{description}"'
            raise _Refusal(
                401,
                "unauthorized",
                headers={"WWW-Authenticate": challenge},
                message=exc.description,
            ) from None
        except IdentityUnavailable:
            raise _Refusal(
                503, "identity_unavailable", message="cannot verify tokens now"
            ) from None

    @routes.get(PREFIX + "approvals")
    @_json_errors
    async def list_approvals(request: web.Request) -> web.Response:
        identity = await who(request)
        wanted = request.query.get("state")
        try:
            approval_state = ApprovalState(wanted) if wanted else None
        except ValueError:
            raise _Refusal(
                400,
                "invalid_request",
                field="state",
                message=f"state must be one of {', '.join(s.value for s in ApprovalState)}",
            ) from None
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            raise _Refusal(
                400,
                "invalid_request",
                field="limit",
                message="limit must be a whole number from 1 to 1000",
            )
        cursor = request.query.get("cursor") or None
        try:
            if cursor is not None:
                parse_cursor(cursor)
            approvals, next_cursor = await service.list_for(identity, approval_state, limit, cursor)
        except InvalidCursor:
            raise _Refusal(
                400,
                "invalid_request",
                field="cursor",
                message="cursor must be a next_cursor this API returned",
            ) from None
        return web.json_response(
            {"approvals": [service.view(a) for a in approvals], "next_cursor": next_cursor}
        )

    async def visible(request: web.Request) -> Approval:
        """The approval the path names, if the caller may see it; else 404 (no oracle)."""
        identity = await who(request)
        approval = await service.get(request.match_info["approval_id"])
        if approval is None or not service.may_see(approval, identity):
            raise _Refusal(404, "approval_not_found", message="no such approval")
        return approval

    @routes.get(PREFIX + "approvals/{approval_id}")
    @_json_errors
    async def show_approval(request: web.Request) -> web.Response:
        return web.json_response(await service.view_live(await visible(request)))

    @routes.get(PREFIX + "approvals/{approval_id}/body")
    @_json_errors
    async def approval_body(request: web.Request) -> web.Response:
        """The exact bytes of the held request's body, for those who may see the approval."""
        approval = await visible(request)
        try:
            body = await service.body(approval.id)
        except state.ApprovalNotFound as exc:
            raise _Refusal(404, "approval_not_found", message=exc.message) from None
        return web.Response(
            body=body,
            headers={
                # Never rendered by a browser as the agent's page: it is evidence, not content.
                "Content-Type": "application/octet-stream",
                "Content-Disposition": f'attachment; filename="{approval.id}.body"',
                "X-Content-Type-Options": "nosniff",
                "Countersign-Body-Content-Type": approval.content_type or "",
                "Countersign-Body-Sha256": approval.body_sha256,
            },
        )

    @routes.get(PREFIX + "approvals/{approval_id}/receipt")
    @_json_errors
    async def approval_receipt(request: web.Request) -> web.Response:
        """The signed receipt of an executed approval (a compact JWS), for those who may see
        the approval; 404 `no_receipt` saying why there is none (yet)."""
        approval = await visible(request)
        token = await receipts.get(approval.id) if receipts is not None else None
        if token is not None:
            return web.Response(
                text=token,
                content_type=RECEIPT_CONTENT_TYPE,
                headers={"X-Content-Type-Options": "nosniff"},
            )
        headers: dict[str, str] | None = None
        if receipts is None:
            message = "this proxy issues no receipts: receipts need audit.signing_key"
        elif approval.state in (ApprovalState.PENDING, ApprovalState.APPROVED):
            message = (
                f"approval {approval.id} has not executed yet (state is "
                f"{approval.state.value}): a receipt is issued once its request has run"
            )
        elif approval.state is not ApprovalState.EXECUTED:
            message = (
                f"approval {approval.id} did not execute (state is {approval.state.value}): "
                "only an executed approval has a receipt"
            )
        elif approval.outcome is Outcome.AMBIGUOUS:
            message = (
                f"approval {approval.id} executed but the upstream failed before answering "
                "(outcome ambiguous): there is no answer to give a receipt for"
            )
        elif time.time() - (approval.executed_at or 0.0) < RECEIPT_GRACE_SECONDS:
            message = (
                f"approval {approval.id} executed; its receipt is being issued: retry in a second"
            )
            headers = {"Retry-After": "1"}
        else:
            message = (
                f"approval {approval.id} executed, but no receipt was issued for it (receipts "
                "were off then, or issuing failed: see the proxy's log)"
            )
        raise _Refusal(
            404,
            "no_receipt",
            headers=headers,
            message=message,
            approval_id=approval.id,
            state=approval.state.value,
        )

    @routes.post(PREFIX + "approvals/{approval_id}/decision")
    @_json_errors
    async def decide(request: web.Request) -> web.Response:
        identity = await who(request)
        payload = await _decision_payload(request, {"verdict", "reason", "grant"})
        verdict, reason = _verdict_and_reason(payload)
        grant_uses, grant_seconds = _grant_request(payload.get("grant"))
        approval_id = request.match_info["approval_id"]
        existing = await service.get(approval_id)
        if existing is None:
            raise _Refusal(404, "approval_not_found", message="no such approval")
        try:
            decided = await service.decide(
                approval_id,
                identity,
                verdict,
                reason,
                channel="api",
                grant_uses=grant_uses,
                grant_seconds=grant_seconds,
            )
        except state.ApprovalError as exc:
            current = exc.approval or existing
            extra: dict[str, Any] = (
                {"field": "grant"} if isinstance(exc, state.InvalidGrant) else {}
            )
            raise _Refusal(
                status_for(exc.code),
                exc.code,
                message=exc.message,
                state=current.state.value,
                **extra,
            ) from None
        return web.json_response(await service.view_live(decided))

    @routes.post(PREFIX + "decisions")
    @_json_errors
    async def decide_many(request: web.Request) -> web.Response:
        """A bulk decision: the verdict on every pending approval the filter selects that the
        caller may decide, each recorded as its own decision; the others are reported."""
        identity = await who(request)
        payload = await _decision_payload(request, {"verdict", "reason", "filter"})
        verdict, reason = _verdict_and_reason(payload)
        rule, requester, ids = _bulk_filter(payload.get("filter"))
        try:
            outcome = await service.decide_many(
                identity, verdict, reason, "api", rule=rule, requester=requester, ids=ids
            )
        except state.ApprovalError as exc:  # a denial without a reason
            raise _Refusal(status_for(exc.code), exc.code, message=exc.message) from None
        return web.json_response(
            {
                "decided": [{"approval_id": a.id, "state": a.state.value} for a in outcome.decided],
                "skipped": [
                    {"approval_id": s.approval_id, "code": s.code, "message": s.message}
                    for s in outcome.skipped
                ],
                "count": len(outcome.decided),
            }
        )

    async def visible_grant(request: web.Request, identity: Identity) -> Grant:
        """The grant the path names, if the caller may see it; else 404 (no oracle)."""
        grant = await service.get_grant(request.match_info["grant_id"])
        if grant is None or not service.may_see_grant(grant, identity):
            raise _Refusal(404, "grant_not_found", message="no such grant")
        return grant

    @routes.get(PREFIX + "grants")
    @_json_errors
    async def list_grants(request: web.Request) -> web.Response:
        """The grants the caller may see (as for approvals: its own, its agents', those of the
        rules it approves), newest first."""
        identity = await who(request)
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            raise _Refusal(
                400,
                "invalid_request",
                field="limit",
                message="limit must be a whole number from 1 to 1000",
            )
        grants = await service.grants_for(identity, limit)
        return web.json_response({"grants": [service.grant_view(g) for g in grants]})

    @routes.get(PREFIX + "grants/{grant_id}")
    @_json_errors
    async def show_grant(request: web.Request) -> web.Response:
        identity = await who(request)
        return web.json_response(service.grant_view(await visible_grant(request, identity)))

    @routes.delete(PREFIX + "grants/{grant_id}")
    @_json_errors
    async def revoke_grant(request: web.Request) -> web.Response:
        """Revoke a grant at once (any approver of its rule); audited as `grant.revoked`."""
        identity = await who(request)
        grant = await visible_grant(request, identity)
        try:
            revoked = await service.revoke_grant(grant.id, identity)
        except state.ApprovalNotFound:
            raise _Refusal(404, "grant_not_found", message="no such grant") from None
        except state.ApprovalError as exc:
            raise _Refusal(status_for(exc.code), exc.code, message=exc.message) from None
        return web.json_response(service.grant_view(revoked))

    return routes


MAX_BULK_IDS = 10_000  # ids one bulk decision may name


async def _decision_payload(request: web.Request, fields: set[str]) -> dict[str, Any]:
    """The JSON object a decision POSTs, with no field but `fields`."""
    try:
        payload = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise _Refusal(
            400, "invalid_request", message="the body is not valid JSON: send a JSON object"
        ) from None
    if not isinstance(payload, dict):
        raise _Refusal(400, "invalid_request", message="the body must be a JSON object")
    unknown = set(payload) - fields
    if unknown:
        raise _Refusal(
            400,
            "invalid_request",
            field=sorted(unknown)[0],
            message=f"unknown field(s): {', '.join(sorted(unknown))}",
        )
    return payload


def _verdict_and_reason(payload: dict[str, Any]) -> tuple[Verdict, str | None]:
    try:
        verdict = Verdict(str(payload.get("verdict")))
    except ValueError:
        raise _Refusal(
            400,
            "invalid_request",
            field="verdict",
            message='verdict must be "approve" or "deny"',
        ) from None
    reason = payload.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise _Refusal(400, "invalid_request", field="reason", message="reason must be a string")
    return verdict, reason


def _bulk_filter(value: Any) -> tuple[str | None, str | None, list[str] | None]:
    """A bulk decision's `"filter": {"rule", "requester", "ids"}` (at least one of them) as
    (rule, requester, ids)."""
    usage = 'filter must be an object with at least one of "rule", "requester", "ids"'
    if not isinstance(value, dict) or not value:
        raise _Refusal(400, "invalid_request", field="filter", message=usage)
    unknown = set(value) - {"rule", "requester", "ids"}
    if unknown:
        raise _Refusal(
            400,
            "invalid_request",
            field="filter",
            message=f"unknown filter key(s): {', '.join(sorted(unknown))}; {usage}",
        )
    found: dict[str, str] = {}
    for key in ("rule", "requester"):
        if key not in value:
            continue
        text = value[key]
        if not isinstance(text, str) or not text.strip():
            raise _Refusal(
                400,
                "invalid_request",
                field="filter",
                message=f"filter {key} must be a non-empty string",
            )
        found[key] = text.strip()
    ids: list[str] | None = None
    if "ids" in value:
        raw = value["ids"]
        if not isinstance(raw, list) or not raw or not all(isinstance(i, str) and i for i in raw):
            raise _Refusal(
                400,
                "invalid_request",
                field="filter",
                message='filter ids must be a non-empty list of approval ids ("apr_…")',
            )
        if len(raw) > MAX_BULK_IDS:
            raise _Refusal(
                400,
                "invalid_request",
                field="filter",
                message=f"filter ids may name at most {MAX_BULK_IDS} approvals per call",
            )
        ids = raw
    return found.get("rule"), found.get("requester"), ids


def _grant_request(value: Any) -> tuple[int | None, int | None]:
    """`"grant": {"uses": N, "seconds": T}` (or `"minutes": M`) as (uses, seconds)."""
    if value is None:
        return None, None
    if not isinstance(value, dict):
        raise _Refusal(
            400,
            "invalid_request",
            field="grant",
            message='grant must be an object: {"uses": N, "seconds": T}',
        )
    unknown = set(value) - {"uses", "seconds", "minutes"}
    if unknown or "uses" not in value or ("seconds" in value) == ("minutes" in value):
        raise _Refusal(
            400,
            "invalid_request",
            field="grant",
            message='grant must be {"uses": N, "seconds": T} or {"uses": N, "minutes": M}',
        )
    numbers = [value["uses"], value.get("seconds", value.get("minutes"))]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in numbers):
        raise _Refusal(
            400,
            "invalid_request",
            field="grant",
            message="grant uses, seconds and minutes must be whole numbers of at least 1",
        )
    uses, amount = numbers
    return uses, amount * 60 if "minutes" in value else amount


class _Refusal(Exception):
    def __init__(
        self, status: int, error: str, headers: dict[str, str] | None = None, **fields: Any
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.headers = headers
        self.fields = fields


Handler = Callable[[web.Request], Awaitable[web.Response]]


def _json_errors(handler: Handler) -> Handler:
    """Map refusals and store outages to JSON answers."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except _Refusal as exc:
            return error_response(exc.status, exc.error, headers=exc.headers, **exc.fields)
        except StoreUnavailable:
            return error_response(
                503, "approvals_unavailable", message="the approval store cannot be reached"
            )
        except AuditUnavailable:
            return error_response(
                503, "audit_unavailable", message="the audit trail cannot be written"
            )

    return wrapped
