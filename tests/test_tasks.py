"""proxy/tasks.py: a background task is stopped even when it swallows a cancellation."""

from __future__ import annotations

import asyncio

from proxy.tasks import stop_task


async def test_a_task_that_swallows_a_cancellation_is_still_stopped() -> None:
    swallowed = 0

    async def stubborn_loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                # What a client library racing a timeout against the cancellation can do.
                if swallowed == 0:
                    swallowed += 1
                    continue
                raise

    task = asyncio.create_task(stubborn_loop())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task, patience=0.05), 2)
    assert task.cancelled() and swallowed == 1


async def test_a_task_that_failed_is_stopped_quietly() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await stop_task(task)  # no "exception was never retrieved", no raise
    assert task.done()
