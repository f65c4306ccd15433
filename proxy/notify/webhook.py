"""Signed webhooks: each approval event POSTed as JSON to `notify.webhooks[].url`.

Headers: `X-Countersign-Event`, `X-Countersign-Timestamp` (Unix seconds) and
`X-Countersign-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>" with the webhook's secret>`.
A receiver recomputes the HMAC over the exact body bytes and rejects timestamps older than a few
minutes (replays). Deliveries are retried with exponential backoff on connection errors, timeouts,
429 and 5xx answers, for up to `retry_seconds`; a delivery that gives up raises `GaveUp`, which the
hub logs and counts. Payloads are redacted like every other channel.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import aiohttp

from ..approvals.view import approval_json
from ..audit.redact import Redactor
from ..model import Approval
from .retry import with_retries


class _Refused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, _Refused):
        return exc.status == 429 or exc.status >= 500
    return isinstance(exc, aiohttp.ClientError | TimeoutError)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


class WebhookNotifier:
    def __init__(
        self,
        url: str,
        secret: str | None,
        session: aiohttp.ClientSession,
        redactor: Redactor,
        *,
        public_url: str | None = None,
        retry_seconds: float = 300.0,
        first_delay: float = 0.5,
    ) -> None:
        self._url = url
        self._secret = secret
        self._session = session
        self._redactor = redactor
        self._public_url = public_url.rstrip("/") if public_url else None
        self._retry_seconds = retry_seconds
        self._first_delay = first_delay

    def payload(self, event: str, approval: Approval) -> dict[str, Any]:
        data: dict[str, Any] = {"event": event, "approval": approval_json(approval)}
        if self._public_url:
            data["link"] = f"{self._public_url}/_countersign/api/approvals/{approval.id}"
        redacted: dict[str, Any] = self._redactor.value(data)
        return redacted

    async def notify(self, event: str, approval: Approval) -> None:
        body = json.dumps(self.payload(event, approval), ensure_ascii=False).encode()

        async def deliver() -> None:
            timestamp = str(int(time.time()))  # fresh for every attempt
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "countersign-webhook/1",
                "X-Countersign-Event": event,
                "X-Countersign-Timestamp": timestamp,
            }
            if self._secret:
                headers["X-Countersign-Signature"] = sign(self._secret, timestamp, body)
            async with self._session.post(
                self._url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=10)
            ) as resp:
                if resp.status >= 300:
                    raise _Refused(resp.status)

        # A delivery that gives up raises `GaveUp` (its message names the URL and the attempts):
        # the hub logs it once and counts it (`countersign_notify_failures_total`).
        await with_retries(
            deliver,
            what=f"POST {self._url}",
            retry_seconds=self._retry_seconds,
            first_delay=self._first_delay,
            retryable=_retryable,
        )

    async def aclose(self) -> None:
        return None
