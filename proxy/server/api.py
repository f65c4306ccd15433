"""The approvals API under `/_countersign/api/`: list, show, decide.

Every call authenticates like the proxy does (bearer JWT or API key). Requesters see their own
approvals; approvers see and decide those they are authorized for. Errors are JSON bodies.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..approvals import state
from ..approvals.service import ApprovalService
from ..approvals.view import approval_json
from ..audit import AuditUnavailable
from ..authn import Authenticator, AuthError, IdentityUnavailable
from ..store.base import StoreUnavailable
from ..types import ApprovalState, Identity, Verdict
from .responses import error_response

PREFIX = "/_countersign/api/"


def api_routes(
    authenticator: Callable[[], Authenticator], service: ApprovalService
) -> web.RouteTableDef:
    """`authenticator` is looked up per call: it is built once the server's loop runs."""
    routes = web.RouteTableDef()

    async def who(request: web.Request) -> Identity:
        try:
            return await authenticator().authenticate(request.headers.get("Authorization"))
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
                "invalid_state",
                message=f"state must be one of {', '.join(s.value for s in ApprovalState)}",
            ) from None
        try:
            limit = max(1, min(int(request.query.get("limit", "100")), 1000))
        except ValueError:
            raise _Refusal(400, "invalid_limit", message="limit must be a number") from None
        approvals = await service.list_for(identity, approval_state, limit)
        return web.json_response({"approvals": [approval_json(a) for a in approvals]})

    @routes.get(PREFIX + "approvals/{approval_id}")
    @_json_errors
    async def show_approval(request: web.Request) -> web.Response:
        identity = await who(request)
        approval = await service.get(request.match_info["approval_id"])
        if approval is None or not service.may_see(approval, identity):
            raise _Refusal(404, "approval_not_found", message="no such approval")
        return web.json_response(approval_json(approval))

    @routes.post(PREFIX + "approvals/{approval_id}/decision")
    @_json_errors
    async def decide(request: web.Request) -> web.Response:
        identity = await who(request)
        try:
            payload = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise _Refusal(400, "invalid_json", message="the body must be a JSON object") from None
        if not isinstance(payload, dict):
            raise _Refusal(400, "invalid_json", message="the body must be a JSON object")
        unknown = set(payload) - {"verdict", "reason"}
        if unknown:
            raise _Refusal(400, "invalid_field", message=f"unknown field(s): {sorted(unknown)}")
        try:
            verdict = Verdict(str(payload.get("verdict")))
        except ValueError:
            raise _Refusal(
                400, "invalid_verdict", message='verdict must be "approve" or "deny"'
            ) from None
        reason = payload.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise _Refusal(400, "invalid_reason", message="reason must be a string")
        approval_id = request.match_info["approval_id"]
        existing = await service.get(approval_id)
        if existing is None:
            raise _Refusal(404, "approval_not_found", message="no such approval")
        try:
            decided = await service.decide(approval_id, identity, verdict, reason, channel="api")
        except state.ApprovalError as exc:
            current = exc.approval or existing
            raise _Refusal(
                exc.status, exc.code, message=exc.message, state=current.state.value
            ) from None
        return web.json_response(approval_json(decided))

    return routes


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
