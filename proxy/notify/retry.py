"""Retrying a delivery with exponential backoff, for every notifier.

One mechanism for webhooks, Slack and Teams: each try optionally bounded (`call_timeout`), a
retryable failure waits the service's `Retry-After` when it gave one (`retry_after`) else the
backoff (doubling to `max_delay`), plus optional jitter so replicas do not retry in lockstep;
past `retry_seconds` it gives up (`GaveUp`, which the hub logs and counts).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any


class GaveUp(Exception):
    """A delivery failed for good (not retryable, or retried until the deadline)."""


def wait_for(
    exc: BaseException,
    backoff: float,
    retry_after: Callable[[BaseException], float | None] | None = None,
    jitter: float = 0.0,
) -> float:
    """How long to wait before the next try: the service's `Retry-After` when it gave one (at
    least 50 ms), else `backoff`; plus up to `jitter` (a fraction) more."""
    wait = retry_after(exc) if retry_after is not None else None
    base = backoff if wait is None else max(wait, 0.05)
    return base * (1.0 + jitter * random.random()) if jitter else base


async def with_retries(
    call: Callable[[], Awaitable[Any]],
    *,
    what: str,
    retry_seconds: float,
    first_delay: float,
    retryable: Callable[[Exception], bool],
    retry_after: Callable[[BaseException], float | None] | None = None,
    call_timeout: float | None = None,
    describe: Callable[[BaseException], str] | None = None,
    jitter: float = 0.0,
    max_delay: float = 30.0,
) -> Any:
    """Await `call()` until it succeeds, backing off (doubling to `max_delay`) on retryable
    errors, honouring `retry_after`, until `retry_seconds` have passed; then `GaveUp`."""
    deadline = time.monotonic() + retry_seconds
    backoff = first_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            async with asyncio.timeout(call_timeout):
                return await call()
        except Exception as exc:
            delay = wait_for(exc, backoff, retry_after, jitter)
            if not retryable(exc) or time.monotonic() + delay > deadline:
                said = describe(exc) if describe is not None else str(exc) or type(exc).__name__
                raise GaveUp(f"{what}: {said} ({attempt} attempts)") from exc
        await asyncio.sleep(delay)
        backoff = min(backoff * 2, max_delay)
