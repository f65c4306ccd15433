"""Audit events to a Redis Stream (`XADD ... MAXLEN ~ N`), for collecting every replica's trail
in one place. Each entry has one field, `event`, holding the JSON line.

Batched: events are sent in one pipeline at most every `interval` seconds. If Redis is down, up to
`buffer_limit` events wait; beyond that the oldest are dropped and counted (the hash-chained file
remains the durable record).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from ..tasks import stop_task
from .sinks import Sink, render

log = structlog.get_logger("countersign.audit")


class RedisStreamSink(Sink):
    def __init__(
        self,
        url: str,
        stream: str,
        *,
        maxlen: int = 100_000,
        interval: float = 0.1,
        buffer_limit: int = 50_000,
    ) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._stream = stream
        self._maxlen = maxlen
        self._interval = interval
        self._pending: deque[str] = deque(maxlen=buffer_limit)
        self.dropped = 0
        self._task: asyncio.Task[None] | None = None

    def write(self, event: Mapping[str, Any]) -> None:
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1
        self._pending.append(render(event))
        if self._task is None:
            try:
                self._task = asyncio.get_running_loop().create_task(self._run())
            except RuntimeError:
                return  # no loop (a CLI command): nothing to ship to

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._interval)
            if not self._pending:
                continue
            batch = list(self._pending)
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for line in batch:
                        pipe.xadd(self._stream, {"event": line}, maxlen=self._maxlen)
                    await pipe.execute()
            except (redis.exceptions.RedisError, OSError) as exc:
                if not failing:
                    log.warning("audit.stream_failed", stream=self._stream, error=str(exc))
                failing = True
                continue
            if failing:
                log.info("audit.stream_resumed", stream=self._stream, dropped=self.dropped)
            failing = False
            for _ in batch:
                self._pending.popleft()

    async def aclose(self) -> None:
        if self._task is not None:
            await asyncio.sleep(self._interval * 1.5)  # one last batch
            await stop_task(self._task)
        await self._redis.aclose()
