"""The hash-chained audit file: JSON lines with `seq`, `prev_hash` and `hash` (see `chain`).

Durability without a slow hot path:
- every event is sealed into the chain at once, in emit order, on the event loop (one SHA-256);
- lines are written and fsynced by a worker thread in batches (group commit): at most every
  `commit_interval` seconds or `commit_lines` lines, so allowed traffic never waits on the disk;
- `sync()` asks for an immediate commit and returns once everything emitted so far is on disk;
  privileged steps (approval requested and decided, approved request forwarded) await it before
  the request proceeds, so a crash can lose at most the last uncommitted pass-through batch and
  never a decision.

The chain continues across restarts and rotation: at start the head is read from the end of the
file (or, if the file is new, from the newest rotated file beside it). A torn last line left by
a crash is moved aside to `<file>.torn-<time>` (never deleted) and the chain goes on from the last
complete line. With `max_bytes`, the file is rotated to `<file>.<UTC time>` once it grows past it;
the next file's first line links to the rotated file's last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from .chain import GENESIS, ChainHead, last_head_of, seal_line
from .sinks import AuditUnavailable, ChainPosition, Sink

log = structlog.get_logger("countersign.audit")


def rotated_files(path: Path) -> list[Path]:
    """Rotated siblings of `path`, oldest first (their names sort by rotation time)."""
    prefix = path.name + "."
    found = [
        p
        for p in path.parent.glob(prefix + "*")
        if p.name[len(prefix) :][:1].isdigit() and ".torn-" not in p.name
    ]
    return sorted(found)


class ChainedFileSink(Sink):
    def __init__(
        self,
        path: str | Path,
        *,
        commit_interval: float = 0.1,
        commit_lines: int = 256,
        max_bytes: int | None = None,
    ) -> None:
        self.path = Path(path)
        self._interval = commit_interval
        self._commit_lines = commit_lines
        self._max_bytes = max_bytes
        self._fd: int | None = None
        self._size = 0
        self._seq = 0  # the chain's head: seq and hash of the last line sealed (the last pending)
        self._hash = GENESIS
        self._pending: list[bytes] = []
        self._synced_seq = 0  # seq of the last line known to be on disk
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._committing: asyncio.Task[None] | None = None
        self._failed: AuditUnavailable | None = None
        self._chain: str | None = None  # the chain's id, once it is signed

    # -- opening -------------------------------------------------------------------------------

    def open(self) -> None:
        """Find the chain's head and open the file for appending (blocking: call at start)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        head: ChainHead | None = None
        if self.path.exists():
            head, end = last_head_of(self.path)
            size = self.path.stat().st_size
            if size > end:
                self._set_torn_tail_aside(end)
        if head is None:
            for older in reversed(rotated_files(self.path)):
                head, _ = last_head_of(older)
                if head is not None:
                    break
        head = head or ChainHead(0, GENESIS)
        self._seq, self._hash = head.seq, head.hash
        self._synced_seq = head.seq
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size

    def _set_torn_tail_aside(self, end: int) -> None:
        torn = self.path.with_name(f"{self.path.name}.torn-{time.strftime('%Y%m%dT%H%M%S')}")
        with open(self.path, "r+b") as f:
            f.seek(end)
            tail = f.read()
            torn.write_bytes(tail)
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        log.warning("audit.torn_tail_moved", file=str(self.path), bytes=len(tail), to=str(torn))

    @property
    def head(self) -> ChainHead:
        return ChainHead(self._seq, self._hash)

    # -- writing -------------------------------------------------------------------------------

    def write(self, event: Mapping[str, Any]) -> ChainPosition:
        seq = self._seq + 1
        line, self._hash = seal_line(event, seq, self._hash)
        self._seq = seq
        self._pending.append(line)
        position = ChainPosition(self._chain, seq, self._hash)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._commit_now_blocking()  # no loop (a CLI command): write through
            return position
        if len(self._pending) >= self._commit_lines:
            self._kick(loop)
        elif self._timer is None and self._committing is None:
            self._timer = loop.call_later(self._interval, self._kick, loop)
        return position

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._committing is None and self._pending:
            self._committing = loop.create_task(self._commit_loop())

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                seq = self._seq
                try:
                    await loop.run_in_executor(None, self._append, batch)
                except OSError as exc:
                    # The audit trail cannot be written: privileged steps must not proceed.
                    self._failed = AuditUnavailable(f"cannot write {self.path}: {exc}")
                    log.error("audit.write_failed", file=str(self.path), error=str(exc))
                    self._release_waiters(self._failed)
                    return
                self._synced_seq = seq
                self._release_waiters()
        finally:
            self._committing = None
            if self._pending and self._failed is None:
                self._kick(loop)

    def _release_waiters(self, error: BaseException | None = None) -> None:
        keep = []
        for seq, future in self._waiters:
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            elif seq <= self._synced_seq:
                future.set_result(None)
            else:
                keep.append((seq, future))
        self._waiters = keep

    def _append(self, batch: list[bytes]) -> None:
        """Write and fsync one batch; rotate when the file has grown past `max_bytes`."""
        assert self._fd is not None
        data = b"".join(batch)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)
        self._size += len(data)
        if self._max_bytes is not None and self._size >= self._max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        counter = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.{stamp}-{counter:03d}")
            counter += 1
        os.rename(self.path, target)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = 0
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make both names durable
        finally:
            os.close(directory)
        log.info("audit.rotated", file=str(self.path), rotated_to=str(target))

    def _commit_now_blocking(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            self._append(batch)
            self._synced_seq = self._seq

    async def sync(self) -> None:
        if self._failed is not None:
            raise self._failed
        target = self._seq
        if self._synced_seq >= target:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiters.append((target, future))
        self._kick(loop)
        await future

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._committing is not None:
            with contextlib.suppress(Exception):
                await self._committing
        if self._pending and self._failed is None:
            await asyncio.get_running_loop().run_in_executor(None, self._commit_now_blocking)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
