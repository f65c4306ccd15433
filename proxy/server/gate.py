"""The approval gate: what happens to a request that matched an `approve` rule.

1. Buffer the body, bounded by `server.max_body_bytes` (413 before any approval exists).
2. Fingerprint the exact request; create its approval or join the open one
   (`Countersign-Approval: ID` names one explicitly and must match the request and caller).
3. hold mode: keep the connection open until a decision; async mode: answer 202 + Location.
4. Approved: claim it (at most once, ever), forward exactly the buffered bytes, record the
   upstream's status, relay the answer with `Countersign-Approval-Id`. Denied or expired: 403.

Claim, send and status recording run shielded from the client's disconnect: once an approval is
used, the approved request does reach the upstream and its outcome is recorded.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..approvals import state
from ..approvals.service import ApprovalService
from ..audit import AuditUnavailable
from ..config import RuleSettings
from ..forward import UpstreamError, UpstreamResponse
from ..store.base import StoreUnavailable
from ..types import Approval, ApprovalState
from .responses import APPROVAL_HEADER, APPROVAL_ID_HEADER, REASON_HEADER, error_response

if TYPE_CHECKING:
    from .proxy_handler import Exchange, ProxyHandler

API_PATH = "/_countersign/api/approvals/"


class BodyTooLarge(Exception):
    pass


async def read_bounded(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing (before reading it all) anything above `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


def decision_fields(approval: Approval) -> dict[str, Any]:
    final = approval.final_decision
    return {
        "approval_id": approval.id,
        "rule": approval.rule,
        "reason": final.reason if final else None,
        "decided_by": (final.approver_email or final.approver_subject) if final else None,
    }


class ApprovalGate:
    def __init__(self, service: ApprovalService, max_body_bytes: int) -> None:
        self._service = service
        self._max_body = max_body_bytes

    async def handle(
        self, proxy: ProxyHandler, exchange: Exchange, rule: RuleSettings
    ) -> web.StreamResponse:
        request = exchange.request
        identity = exchange.identity
        route = exchange.route
        assert identity is not None and route is not None
        try:
            body = await read_bounded(request, self._max_body)
        except BodyTooLarge:
            return proxy.refuse(
                exchange,
                413,
                "body_too_large",
                rule=rule.name,
                limit=self._max_body,
                message=f"a request that needs approval may carry at most {self._max_body} bytes",
            )
        service = self._service
        fingerprint = service.fingerprint_of(
            identity=identity,
            method=request.method,
            path=exchange.path,
            query=exchange.query,
            route=route.settings.name,
            body=body,
        )
        try:
            named = request.headers.get(APPROVAL_HEADER)
            if named:
                approval = await service.get(named.strip())
                if approval is None or approval.fingerprint != fingerprint:
                    # Same answer for an unknown id and a mismatch: ids are not an oracle.
                    return proxy.refuse(
                        exchange,
                        403,
                        "approval_mismatch",
                        rule=rule.name,
                        message="this approval does not cover this exact request by this caller",
                    )
            else:
                approval, _ = await service.open(
                    identity=identity,
                    rule=rule,
                    method=request.method,
                    path=exchange.path,
                    query=exchange.query,
                    route=route.settings.name,
                    body=body,
                    content_type=request.headers.get("Content-Type"),
                    reason=request.headers.get(REASON_HEADER),
                    request_id=exchange.request_id,
                    fingerprint=fingerprint,
                )
            if approval.state is ApprovalState.PENDING:
                if service.mode == "async":
                    return self._accepted(exchange, approval)
                approval = await service.wait_for_decision(approval.id)
            return await self._conclude(proxy, exchange, approval, body)
        except AuditUnavailable:
            return proxy.refuse(
                exchange,
                503,
                "audit_unavailable",
                rule=rule.name,
                message="the audit trail cannot be written; nothing was forwarded",
            )
        except StoreUnavailable:
            return proxy.refuse(
                exchange,
                503,
                "approvals_unavailable",
                rule=rule.name,
                message="the approval store cannot be reached; nothing was forwarded",
            )

    def _accepted(self, exchange: Exchange, approval: Approval) -> web.Response:
        location = API_PATH + approval.id
        return error_response(
            202,
            "approval_pending",
            request_id=exchange.request_id,
            headers={"Location": location, APPROVAL_ID_HEADER: approval.id},
            approval_id=approval.id,
            state=approval.state.value,
            rule=approval.rule,
            expires_at=approval.expires_at,
            message=f"re-send this exact request with '{APPROVAL_HEADER}: {approval.id}' "
            "once it is approved",
        )

    async def _conclude(
        self, proxy: ProxyHandler, exchange: Exchange, approval: Approval, body: bytes
    ) -> web.StreamResponse:
        if approval.state is ApprovalState.DENIED:
            return proxy.refuse(exchange, 403, "approval_denied", **decision_fields(approval))
        if approval.state is ApprovalState.EXPIRED:
            return self._expired(proxy, exchange, approval)
        if approval.state is ApprovalState.EXECUTED:
            return self._used(proxy, exchange, approval)
        started = time.monotonic()
        execution = asyncio.ensure_future(self._execute(proxy, exchange, approval, body))
        try:
            upstream = await asyncio.shield(execution)
        except state.NotClaimable as exc:
            current = exc.approval or approval
            if current.state is ApprovalState.EXPIRED:
                return self._expired(proxy, exchange, current)
            return self._used(proxy, exchange, current)
        except UpstreamError as exc:
            return proxy.upstream_failed(exchange, exc, approval_id=approval.id)
        except asyncio.CancelledError:
            # The client left; the approved request still runs to the upstream (it was
            # claimed), and its connection is released once the answer is in.
            execution.add_done_callback(_close_quietly)
            raise
        return await proxy.relay(exchange, upstream, started, approval_id=approval.id)

    def _expired(self, proxy: ProxyHandler, exchange: Exchange, approval: Approval) -> web.Response:
        was_approved = approval.approvals_count >= approval.quorum
        return proxy.refuse(
            exchange,
            403,
            "approval_expired",
            approval_id=approval.id,
            rule=approval.rule,
            reason="approved, but not used before the deadline"
            if was_approved
            else "no decision before the deadline",
        )

    def _used(self, proxy: ProxyHandler, exchange: Exchange, approval: Approval) -> web.Response:
        return proxy.refuse(
            exchange,
            403,
            "approval_used",
            approval_id=approval.id,
            rule=approval.rule,
            message="this approval has already been used; it covers one execution",
        )

    async def _execute(
        self, proxy: ProxyHandler, exchange: Exchange, approval: Approval, body: bytes
    ) -> UpstreamResponse:
        # A store failure here means nothing was sent: the 503 it becomes is the truth.
        await self._service.claim(approval.id)
        # From here on the request may have reached the upstream: whatever the store does, the
        # client gets the upstream's answer, and the outcome is recorded in the background.
        try:
            upstream = await proxy.open_upstream(exchange, body)
        except UpstreamError as exc:
            self._service.record_outcome_soon(approval.id, exc.status)
            raise
        self._service.record_outcome_soon(approval.id, upstream.status)
        return upstream


def _close_quietly(task: asyncio.Future[UpstreamResponse]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()
