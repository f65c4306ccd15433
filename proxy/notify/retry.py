"""Retrying a delivery with exponential backoff, for every notifier."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


class GaveUp(Exception):
    """A delivery failed for good (not retryable, or retried until the deadline)."""


async def with_retries(
    call: Callable[[], Awaitable[Any]],
    *,
    what: str,
    retry_seconds: float,
    first_delay: float,
    retryable: Callable[[Exception], bool],
) -> Any:
    """Await `call()` until it succeeds, backing off (doubling to 30 s) on retryable errors."""
    deadline = time.monotonic() + retry_seconds
    delay = first_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except Exception as exc:
            if not retryable(exc) or time.monotonic() + delay > deadline:
                raise GaveUp(f"{what}: {exc or type(exc).__name__} ({attempt} attempts)") from exc
        await asyncio.sleep(delay)
        delay = min(delay * 2, 30.0)
