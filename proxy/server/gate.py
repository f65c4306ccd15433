"""The approval gate: what happens to a request that matched an `approve` rule.

1. Buffer the body, bounded by `server.max_body_bytes` (413 before any approval exists) and by
   `approvals.max_held_bytes` for the whole process, counted as bytes arrive (429).
2. Bind the exact request (`proxy.model.binding`: target, bound headers, body, route, identity
   with owner); create its approval or join the open one (`Countersign-Approval: ID` names one
   explicitly and must match the binding). An identity past `max_pending_per_identity`: 429.
3. hold mode: keep the connection open until a decision (a client that leaves is recorded as
   abandoned); async mode, or `Prefer: respond-async`: answer 202 + Location.
4. Approved: claim it (at most once, ever), forward exactly the buffered bytes, record the
   outcome (completed with the upstream's status, or ambiguous), relay the answer with
   `Countersign-Approval-Id`. Denied, expired, lapsed or used: 403.

Claim, send and outcome recording run shielded from the client's disconnect: once an approval is
used, the approved request does reach the upstream and its outcome is recorded.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

import structlog
from multidict import CIMultiDictProxy

from ..approvals.receipts import RECEIPT_HEADER, ReceiptIssuer
from ..approvals.service import ApprovalService
from ..audit import AuditUnavailable
from ..config import RuleSettings
from ..forward import UpstreamError, UpstreamResponse
from ..front.message import STREAMED, Answer, Reply
from ..model import Approval, ApprovalState, Outcome, state
from ..model.binding import binding_of, bound_headers, fingerprint
from ..model.grant import Grant
from ..store.base import StoreUnavailable
from .mcp_answers import SSE_CONTENT_TYPE, McpCall, progress_event, sse_data
from .responses import (
    APPROVAL_HEADER,
    APPROVAL_ID_HEADER,
    COUNTERSIGN_REQUEST_ID_HEADER,
    DEFAULT_MESSAGES,
    REASON_HEADER,
    REQUEST_ID_HEADER,
)

if TYPE_CHECKING:
    from ..pipeline import Exchange, ProxyHandler

API_PATH = "/_countersign/api/approvals/"
_RETRY_AFTER_SECONDS = 30
# What an agent is told when an approval cannot (or can no longer) run its request: what
# happened and what to do (the expiry's sentence is built by `_expired_message`).
_REFUSALS = {
    code: DEFAULT_MESSAGES[code]
    for code in ("approval_expired", "approval_lapsed", "approval_used", "approval_mismatch")
}
_HELD_TOO_MUCH = (
    "This proxy holds too many request bodies waiting for approval right now; retry after the "
    "Retry-After seconds."
)
# Abandonment notes outlive the cancelled request that schedules them.
_BACKGROUND: set[asyncio.Future[None]] = set()

log = structlog.get_logger("countersign.approvals")


def _prefers_async(headers: CIMultiDictProxy[str]) -> bool:
    """`Prefer: respond-async` (RFC 7240), among other preferences or not."""
    return any(
        token.strip().split("=", 1)[0].strip().lower() == "respond-async"
        for value in headers.getall("Prefer", ())
        for token in value.split(",")
    )


class BodyTooLarge(Exception):
    pass


class HeldTooMuch(Exception):
    pass


class Draining(Exception):
    """The process is shutting down while a request is held: it is answered `503 shutting_down`
    at once and its approval is left as it is, for the client's retry to join (on another
    replica, with a shared store)."""


def _expired_message(approval: Approval) -> str:
    """`approval_expired`'s sentence, naming the decision window when the approval knows it."""
    window = approval.expires_at - approval.created_at
    if window >= 60:
        within = f" within {round(window / 60)} min"
    elif window > 0:
        within = f" within {round(window)} s"
    else:
        within = " in time"
    return (
        f"Nobody decided{within} (approval {approval.id}). Ask a human to look at the approvals "
        "inbox, then send the request again."
    )


def _too_many_message(limit: int) -> str:
    """`too_many_pending`'s sentence for an identity at `approvals.max_pending_per_identity`."""
    return (
        f"You have too many requests waiting for approval (limit {limit}); wait for decisions, "
        "then retry after the Retry-After seconds."
    )


def _waiting_text(call: McpCall, approval: Approval) -> str:
    """What an MCP client (and its model) hears while a human decides."""
    left = max(0, round((approval.expires_at - time.time()) / 60))
    return (
        f"Waiting for a human to approve tool {call.tool} (approval {approval.id}, rule "
        f"{approval.rule}); it expires in about {left} min."
    )


def decision_fields(approval: Approval) -> dict[str, Any]:
    final = approval.final_decision
    return {
        "approval_id": approval.id,
        "rule": approval.rule,
        "reason": final.reason if final else None,
        "decided_by": final.who if final else None,
    }


class ApprovalGate:
    # How often a held MCP call hears that it is still waiting.
    mcp_progress_seconds = 4.0  # under the 5 s read timeout of a default httpx client

    def __init__(
        self,
        service: ApprovalService,
        max_body_bytes: int,
        max_held_bytes: int,
        *,
        receipts: ReceiptIssuer | None = None,
    ) -> None:
        self._service = service
        self._receipts = receipts  # with `audit.signing_key`: executed approvals get receipts
        self._max_body = max_body_bytes
        self._max_held = max_held_bytes
        self._held = 0  # bytes of bodies this process holds for approvals right now
        # Set on SIGTERM: held requests stop waiting and are answered 503 shutting_down.
        self._draining = asyncio.Event()
        self._drain_retry_after = 5
        # The waits for a decision under way (one task per held request): `drain` cancels them.
        self._deciding: set[asyncio.Future[Approval]] = set()

    def drain(self, retry_after: int = 5) -> None:
        """Stop holding: every request waiting for a decision (and any that would start
        waiting) is answered `503 shutting_down` with `Retry-After: retry_after`. A request
        already being forwarded after its approval is not touched."""
        self._drain_retry_after = retry_after
        self._draining.set()
        for deciding in list(self._deciding):
            deciding.cancel()  # a decision already in is kept (cancel does nothing then)

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def _shutting_down(self, proxy: ProxyHandler, exchange: Exchange, approval: Approval) -> Answer:
        """The refusal of a held request at shutdown; audited, its approval untouched."""
        return proxy.refuse(
            exchange,
            503,
            "shutting_down",
            approval_id=approval.id,
            rule=approval.rule,
            message="the proxy is shutting down; retry this exact request after the Retry-After "
            f"seconds: it joins approval {approval.id}, which stays open",
            headers={"Retry-After": str(self._drain_retry_after)},
        )

    def _too_many(
        self,
        proxy: ProxyHandler,
        exchange: Exchange,
        rule: str,
        message: str,
        retry_after: int = _RETRY_AFTER_SECONDS,
    ) -> Answer:
        return proxy.refuse(
            exchange,
            429,
            "too_many_pending",
            rule=rule,
            message=message,
            headers={"Retry-After": str(retry_after)},
        )

    async def handle(self, proxy: ProxyHandler, exchange: Exchange, rule: RuleSettings) -> Reply:
        request = exchange.request
        route = exchange.route
        assert exchange.identity is not None and route is not None
        if exchange.body is not None:
            # Already read to judge it (a signature, a recognizer or a body condition needed it).
            if self._held + len(exchange.body) > self._max_held:
                return self._too_many(proxy, exchange, rule.name, _HELD_TOO_MUCH)
            self._held += len(exchange.body)
            try:
                return await self._gate(proxy, exchange, rule, exchange.body)
            finally:
                self._held -= len(exchange.body)
        announced = request.content_length or 0
        if self._held + announced > self._max_held:
            return self._too_many(proxy, exchange, rule.name, _HELD_TOO_MUCH)
        reserved = 0  # counted as read, so concurrent uploads share the limit while they arrive
        try:
            try:
                if announced > self._max_body:
                    raise BodyTooLarge
                await request.send_continue()  # judged: now the body may come
                body = bytearray()
                async for chunk in request.body():
                    body += chunk
                    if len(body) > self._max_body:
                        raise BodyTooLarge
                    if self._held + len(chunk) > self._max_held:
                        raise HeldTooMuch
                    self._held += len(chunk)
                    reserved += len(chunk)
            except BodyTooLarge:
                return proxy.refuse(
                    exchange,
                    413,
                    "payload_too_large",
                    rule=rule.name,
                    limit=self._max_body,
                    message=f"a request that needs approval may carry at most {self._max_body} "
                    "bytes",
                )
            except HeldTooMuch:
                return self._too_many(proxy, exchange, rule.name, _HELD_TOO_MUCH)
            held, body = bytes(body), bytearray()  # one copy in memory while it waits
            return await self._gate(proxy, exchange, rule, held)
        finally:
            self._held -= reserved

    async def _gate(
        self, proxy: ProxyHandler, exchange: Exchange, rule: RuleSettings, body: bytes
    ) -> Reply:
        request = exchange.request
        identity = exchange.identity
        route = exchange.route
        assert identity is not None and route is not None
        service = self._service
        target = proxy.upstream_target(exchange)
        binding = binding_of(
            method=request.method,
            target=target.encode("utf-8", "surrogateescape"),
            headers=bound_headers(
                request.raw_headers,
                volatile=route.settings.volatile_headers,
                injected=route.inject_names,
                credential=exchange.credential_headers,
            ),
            body=body,
            route=route.settings.name,
            rule=rule.name,
            identity=identity,
        )
        fingerprint_hex = fingerprint(binding)
        try:
            named = request.headers.get(APPROVAL_HEADER)
            if named:
                approval = await service.get(named.strip())
                if approval is None or approval.fingerprint != fingerprint_hex:
                    # Same answer for an unknown id and a mismatch: ids are not an oracle.
                    return proxy.refuse(
                        exchange,
                        403,
                        "approval_mismatch",
                        rule=rule.name,
                        message=_REFUSALS["approval_mismatch"],
                    )
            else:
                if rule.grant is not None:
                    # A live grant for this identity, rule and shape replaces the human step.
                    grant = await service.use_grant(
                        identity=identity,
                        rule=rule,
                        route=route.settings.name,
                        method=request.method,
                        path=exchange.path,
                        actions=exchange.actions,
                        request_id=exchange.request_id,
                    )
                    if grant is not None:
                        return await self._forward_granted(proxy, exchange, grant, body)
                approval, _ = await service.open(
                    identity=identity,
                    rule=rule,
                    binding=binding,
                    path=exchange.path,
                    query=exchange.query,
                    upstream_url=route.origin + target,
                    reason=request.headers.get(REASON_HEADER),
                    request_id=exchange.request_id,
                    fingerprint_hex=fingerprint_hex,
                    actions=exchange.actions,
                )
            if approval.state is ApprovalState.PENDING:
                asked_async = _prefers_async(request.headers)
                if asked_async or (rule.mode or service.mode) == "async":
                    return self._accepted(exchange, approval, asked_async)
                call = exchange.mcp_call
                if call is not None and call.accepts_sse:
                    return await self._hold_mcp(proxy, exchange, approval, body, call)
                try:
                    approval = await self._wait(approval)
                except Draining:
                    return self._shutting_down(proxy, exchange, approval)
            return await self._conclude(proxy, exchange, approval, body)
        except state.TooManyPending as exc:
            message = _too_many_message(self._service.max_pending_per_identity)
            return self._too_many(proxy, exchange, rule.name, message, exc.retry_after)
        except AuditUnavailable:
            return proxy.refuse(
                exchange,
                503,
                "audit_unavailable",
                rule=rule.name,
                message="the audit trail cannot be written; nothing was forwarded",
            )
        except StoreUnavailable as exc:
            # For the operator: why (the agent is told only that the store cannot be reached).
            log.warning(
                "approvals.store_unavailable", request_id=exchange.request_id, error=str(exc)
            )
            return proxy.refuse(
                exchange,
                503,
                "approvals_unavailable",
                rule=rule.name,
                message="the approval store cannot be reached; nothing was forwarded",
            )

    @staticmethod
    async def _forward_granted(
        proxy: ProxyHandler, exchange: Exchange, grant: Grant, body: bytes
    ) -> Reply:
        """Forward a request a grant covers (one use already taken and audited): exactly the
        buffered bytes, as an approved request is, answered with `Countersign-Grant-Id`. The
        use is spent even if the upstream cannot be reached."""
        started = time.monotonic()
        try:
            upstream = await proxy.open_upstream(exchange, body, held=True)
        except UpstreamError as exc:
            return proxy.upstream_failed(exchange, exc, grant_id=grant.id)
        return await proxy.relay(exchange, upstream, started, grant_id=grant.id)

    async def _hold_mcp(
        self,
        proxy: ProxyHandler,
        exchange: Exchange,
        approval: Approval,
        body: bytes,
        call: McpCall,
    ) -> Reply:
        """An MCP tools/call held while a human decides: answered at once as an SSE stream
        that says it is waiting (progress notifications, or comments), then carries the tool's
        result or the refusal as a tool result. A client that leaves is recorded as abandoned,
        as for any held request."""
        request = exchange.request
        await request.start(
            200,
            [
                ("Content-Type", SSE_CONTENT_TYPE),
                ("Cache-Control", "no-cache"),
                (COUNTERSIGN_REQUEST_ID_HEADER, exchange.request_id),
                (APPROVAL_ID_HEADER, approval.id),
                # Sent before the decision: a refused call's receipt URL answers why it has none.
                *(
                    ((RECEIPT_HEADER, self._receipts.url(approval.id)),)
                    if self._receipts is not None
                    else ()
                ),
            ],
        )
        exchange.sent_status = 200  # what the client has, whatever comes next
        waiting = asyncio.ensure_future(self._wait(approval))
        progress = 0
        try:
            while True:
                progress += 1
                await request.write(progress_event(call, progress, _waiting_text(call, approval)))
                done, _ = await asyncio.wait({waiting}, timeout=self.mcp_progress_seconds)
                if done:
                    break
        except BaseException:
            # The client left (a failed write, or the handler cancelled): `_wait`, cancelled,
            # records the abandonment.
            waiting.cancel()
            raise
        answer: Reply
        try:
            approval = waiting.result()
        except Draining:
            answer = self._shutting_down(proxy, exchange, approval)
        else:
            answer = await self._conclude(proxy, exchange, approval, body, streaming=True)
        if isinstance(answer, Answer):
            # A refusal, already a JSON-RPC tool result: it goes on as the stream's last event.
            await request.write(sse_data(answer.body))
            await request.finish()
        return STREAMED

    async def _wait(self, approval: Approval) -> Approval:
        """Hold until the decision; a client that leaves meanwhile is recorded as abandoned.

        Raises `Draining` when the process starts shutting down first: the approval is left
        pending (not abandoned), for the client's retry to join."""
        if self._draining.is_set():
            raise Draining
        deciding = asyncio.ensure_future(self._service.wait_for_decision(approval.id))
        self._deciding.add(deciding)
        try:
            # Decided (even at the same moment as a drain, which then cannot cancel it): the
            # decision is honoured.
            return await deciding
        except asyncio.CancelledError:
            waiter = asyncio.current_task()
            if self._draining.is_set() and (waiter is None or not waiter.cancelling()):
                raise Draining from None  # `drain` cancelled the wait, not the client
            deciding.cancel()
            task = asyncio.ensure_future(self._service.abandon(approval.id))
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)
            raise
        finally:
            self._deciding.discard(deciding)

    def _accepted(self, exchange: Exchange, approval: Approval, asked: bool) -> Answer:
        """The async answer: not an error, a receipt for a pending approval."""
        location = API_PATH + approval.id
        headers = {
            "Location": location,
            APPROVAL_ID_HEADER: approval.id,
            COUNTERSIGN_REQUEST_ID_HEADER: exchange.request_id,
            REQUEST_ID_HEADER: exchange.request_id,  # our own answer: no upstream id exists
        }
        if asked:
            headers["Preference-Applied"] = "respond-async"
        body = {
            "approval_id": approval.id,
            "state": approval.state.value,
            "expires_at": approval.expires_at,
            "rule": approval.rule,
            "request_id": exchange.request_id,
            "message": f"waiting for approval; re-send this exact request with "
            f"'{APPROVAL_HEADER}: {approval.id}' once it is approved (see {location})",
        }
        return Answer(
            202,
            json.dumps(body).encode(),
            [("Content-Type", "application/json; charset=utf-8"), *headers.items()],
        )

    async def _conclude(
        self,
        proxy: ProxyHandler,
        exchange: Exchange,
        approval: Approval,
        body: bytes,
        *,
        streaming: bool = False,
    ) -> Reply:
        if approval.state is ApprovalState.DENIED:
            return proxy.refuse(exchange, 403, "approval_denied", **decision_fields(approval))
        if approval.state is ApprovalState.EXPIRED:
            return self._refused(proxy, exchange, approval, "approval_expired")
        if approval.state is ApprovalState.LAPSED:
            return self._refused(proxy, exchange, approval, "approval_lapsed")
        if approval.state is ApprovalState.EXECUTED:
            return self._refused(proxy, exchange, approval, "approval_used")
        started = time.monotonic()
        execution = asyncio.ensure_future(self._execute(proxy, exchange, approval, body))
        try:
            upstream = await asyncio.shield(execution)
        except state.NotClaimable as exc:
            current = exc.approval or approval
            if current.state is ApprovalState.LAPSED:
                return self._refused(proxy, exchange, current, "approval_lapsed")
            return self._refused(proxy, exchange, current, "approval_used")
        except UpstreamError as exc:
            return proxy.upstream_failed(exchange, exc, approval_id=approval.id)
        except asyncio.CancelledError:
            # The client left; the approved request still runs to the upstream (it was
            # claimed), and its connection is released once the answer is in.
            execution.add_done_callback(_close_quietly)
            raise
        receipt = (
            self._receipts.ticket(approval, exchange.request_id)
            if self._receipts is not None
            else None
        )
        return await proxy.relay(
            exchange,
            upstream,
            started,
            approval_id=approval.id,
            streaming=streaming,
            receipt=receipt,
        )

    @staticmethod
    def _refused(proxy: ProxyHandler, exchange: Exchange, approval: Approval, code: str) -> Answer:
        """A 403 for an approval that cannot (or can no longer) run this request."""
        return proxy.refuse(
            exchange,
            403,
            code,
            approval_id=approval.id,
            rule=approval.rule,
            message=_expired_message(approval) if code == "approval_expired" else _REFUSALS[code],
        )

    async def _execute(
        self, proxy: ProxyHandler, exchange: Exchange, approval: Approval, body: bytes
    ) -> UpstreamResponse:

        async def claim() -> None:
            # Once a connection to the upstream is open, and not before: a refused connection
            # leaves the approval unused. A store failure here means nothing was sent: the 503
            # it becomes is the truth.
            await self._service.claim(approval.id)
            exchange.claimed = True

        # From the claim on the request may have reached the upstream: whatever the store does,
        # the client gets the upstream's answer, and the outcome is recorded in the background.
        try:
            upstream = await proxy.open_upstream(exchange, body, held=True, before_send=claim)
        except UpstreamError:
            if exchange.claimed:
                # It may have run: a retry needs a new approval, which shows this attempt.
                self._service.record_outcome_soon(approval.id, Outcome.AMBIGUOUS, None)
            raise
        self._service.record_outcome_soon(approval.id, Outcome.COMPLETED, upstream.status)
        return upstream


def _close_quietly(task: asyncio.Future[UpstreamResponse]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()
