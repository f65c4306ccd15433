"""Stopping background tasks for good.

On Python 3.11 a cancellation can be lost: `asyncio.wait_for` and `asyncio.timeout` racing it
(client libraries use both around their reads) may swallow it, and a loop that retries on errors
then simply goes on. A single `cancel()` followed by `await task` would wait forever, and the
process would hang at shutdown (seen with the expiry sweeper in a worker). So: cancel, and
cancel again, until the task has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def stop_task(task: asyncio.Task[Any], *, patience: float = 0.5) -> None:
    """Cancel `task` and return once it has ended (its result or error is discarded)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=patience)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
