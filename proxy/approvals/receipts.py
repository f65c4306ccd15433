"""Issuing receipts: once an approved request's answer has been relayed, a signed statement of
what ran and what came back (`proxy.audit.receipts`), kept with the approval as its note
`receipt` and served at `GET /_countersign/api/approvals/{id}/receipt`.

Only with `audit.signing_key`. Issued in the background, after the `request.forwarded` line it
cites is on disk: the answer never waits for it (an API caller that asks in between is told to
retry in a second). A store or disk failure is logged, never raised; the approval still ran.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog

from .. import audit
from ..audit import AuditLog, AuditUnavailable, ChainPosition
from ..audit.receipts import receipt_payload, receipt_sha256, sign_receipt
from ..audit.signing import SigningKey
from ..model import Approval
from ..store.base import StoreUnavailable
from .service import ApprovalService

log = structlog.get_logger("countersign.receipts")

RECEIPT_NOTE: Final = "receipt"
RECEIPT_PATH: Final = "/_countersign/api/approvals/{id}/receipt"
RECEIPT_HEADER: Final = "Countersign-Receipt"
# How long issuing retries through a store outage before it gives up (and logs it).
_RETRY_SECONDS: Final = 60.0


@dataclass(frozen=True, slots=True)
class Relayed:
    """What the client was sent for an approved request: the upstream's status, the SHA-256
    and size of the body bytes relayed, whether the relay finished, and where its
    `request.forwarded` event landed in the chained audit file."""

    status: int
    response_sha256: str
    response_bytes: int
    complete: bool
    audit: ChainPosition | None


class ReceiptIssuer:
    def __init__(
        self,
        key: SigningKey,
        service: ApprovalService,
        audit_log: AuditLog,
        *,
        issuer: str = "countersign",
        public_url: str | None = None,
        clock: Callable[[], float] = time.time,
        retry_seconds: float = _RETRY_SECONDS,
    ) -> None:
        self._key = key
        self._service = service
        self._audit = audit_log
        self._issuer = issuer
        self._base = (public_url or "").rstrip("/")
        self._clock = clock
        self._retry_seconds = retry_seconds
        self._background: set[asyncio.Task[str | None]] = set()

    @property
    def key_id(self) -> str:
        return self._key.key_id

    def url(self, approval_id: str) -> str:
        """Where the receipt of `approval_id` is served (absolute with `server.public_url`)."""
        return self._base + RECEIPT_PATH.format(id=approval_id)

    def ticket(self, approval: Approval, request_id: str) -> ReceiptTicket:
        """What the relay of `approval`'s request needs: the header's URL, and how to issue."""
        return ReceiptTicket(self, approval, request_id)

    async def get(self, approval_id: str) -> str | None:
        """The receipt kept for `approval_id` (its compact JWS), or None."""
        return await self._service.store.get_note(approval_id, RECEIPT_NOTE)

    def issue_soon(self, approval: Approval, request_id: str, relayed: Relayed) -> None:
        """Issue in the background; returns at once."""
        task = asyncio.create_task(self.issue(approval, request_id, relayed))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def issue(self, approval: Approval, request_id: str, relayed: Relayed) -> str | None:
        """Sign and keep the receipt; audited as `approval.receipt`. None when it could not
        be (logged)."""
        try:
            # The receipt cites the `request.forwarded` line: it must be on disk first.
            await self._audit.sync()
        except AuditUnavailable as exc:
            log.error("receipt.not_issued", approval_id=approval.id, error=str(exc) or "audit")
            return None
        delay = 0.1
        deadline = self._clock() + self._retry_seconds
        while True:
            try:
                # Read again: it now says when it was executed.
                current = await self._service.get(approval.id) or approval
                payload = receipt_payload(
                    current,
                    status=relayed.status,
                    response_sha256=relayed.response_sha256,
                    response_bytes=relayed.response_bytes,
                    response_complete=relayed.complete,
                    audit=relayed.audit,
                    issued_at=self._clock(),
                    issuer=self._issuer,
                    redactor=self._service.redactor,
                )
                token = sign_receipt(self._key, payload)
                await self._service.store.set_note(approval.id, RECEIPT_NOTE, token)
                break
            except StoreUnavailable as exc:
                if self._clock() > deadline:
                    log.error("receipt.not_issued", approval_id=approval.id, error=str(exc))
                    return None
            except Exception as exc:  # never raised to anyone: the approval still ran
                log.error(
                    "receipt.not_issued",
                    approval_id=approval.id,
                    error=str(exc) or type(exc).__name__,
                )
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        self._audit.emit(
            audit.APPROVAL_RECEIPT,
            approval_id=approval.id,
            request_id=request_id,
            key_id=self._key.key_id,
            receipt_sha256=receipt_sha256(token),
        )
        return token

    async def aclose(self) -> None:
        """Let receipts being issued finish, briefly."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=5)


class ReceiptTicket:
    """One approved request's receipt, from the gate to the relay: the `Countersign-Receipt`
    URL for its answer, and `issue` once the answer went out."""

    __slots__ = ("_approval", "_issuer", "_request_id", "url")

    def __init__(self, issuer: ReceiptIssuer, approval: Approval, request_id: str) -> None:
        self._issuer = issuer
        self._approval = approval
        self._request_id = request_id
        self.url = issuer.url(approval.id)

    def issue(self, relayed: Relayed) -> None:
        self._issuer.issue_soon(self._approval, self._request_id, relayed)
