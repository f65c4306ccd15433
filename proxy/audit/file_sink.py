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

With a signing key (`Signing`), the sink also writes signed checkpoints (`signing`): every
`interval` seconds while events arrive, and at close, an `audit.checkpoint` line whose signed
statement names the head before it; once that line is on disk the statement goes to the anchors.
At open it finds the chain's id and its last checkpoint (the live file, else the newest rotated
one) and, if the key changed since, writes an `audit.key_rotated` line. A torn tail set aside at
open is recorded in the chain too (`audit.tail_set_aside`, with the bytes' SHA-256).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from . import SCHEMA_VERSION
from .chain import GENESIS, ChainHead, last_head_of, seal_line
from .evidence import last_signed_in
from .signing import (
    CHECKPOINT_EVENT,
    KEY_ROTATED_EVENT,
    TAIL_SET_ASIDE_EVENT,
    SigningKey,
    checkpoint_statement,
    rotation_statement,
)
from .sinks import AuditUnavailable, ChainPosition, Sink
from .timestamp import IsoUtcStamper

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


@dataclass(frozen=True, slots=True)
class Signing:
    """How the sink signs its chain: the key, how often, and where statements also go.

    `on_statement` receives every signed statement (checkpoints, key rotations) once the line
    holding it is on disk: the anchors (it must not block). `on_checkpoint` counts them."""

    key: SigningKey
    interval: float = 10.0
    on_statement: Callable[[dict[str, Any]], None] | None = None
    on_checkpoint: Callable[[], None] | None = None


_stamp = IsoUtcStamper("ts")


def _now() -> str:
    return str(_stamp(None, "", {})["ts"])


class ChainedFileSink(Sink):
    def __init__(
        self,
        path: str | Path,
        *,
        commit_interval: float = 0.1,
        commit_lines: int = 256,
        max_bytes: int | None = None,
        signing: Signing | None = None,
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
        self._signing = signing
        self._checkpointed_seq = 0  # the head seq the last checkpoint signed
        self._prev_checkpoint = 0  # seq of the last checkpoint line (0: none yet)
        self._checkpoint_timer: asyncio.TimerHandle | None = None
        self._unsent: list[dict[str, Any]] = []  # signed, waiting for their line to be on disk
        self._anchoring: asyncio.Task[None] | None = None

    # -- opening -------------------------------------------------------------------------------

    def open(self) -> None:
        """Find the chain's head and open the file for appending (blocking: call at start)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        head: ChainHead | None = None
        set_aside: dict[str, Any] | None = None
        if self.path.exists():
            head, end = last_head_of(self.path)
            size = self.path.stat().st_size
            if size > end:
                set_aside = self._set_torn_tail_aside(end)
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
        if set_aside is not None:
            # In the chain itself: a torn tail set aside is evidence an auditor should see.
            self.write(
                {"event": TAIL_SET_ASIDE_EVENT, "ts": _now(), "v": SCHEMA_VERSION, **set_aside}
            )
        if self._signing is not None:
            self._open_signed(self._signing)

    def _open_signed(self, signing: Signing) -> None:
        """Continue the signed chain: its id, its last checkpoint, a rotation if the key changed."""
        files = [self.path, *reversed(rotated_files(self.path))]
        last = last_signed_in([f for f in files if f.exists()])
        if last is None:
            self._chain = secrets.token_hex(8)
            self._checkpointed_seq = -1  # the first checkpoint comes at the first chance
            return
        self._chain = last.chain
        self._prev_checkpoint = self._checkpointed_seq = last.checkpoint_seq
        if last.key_id != signing.key.key_id:
            head = self.head
            statement = rotation_statement(
                signing.key,
                chain=last.chain,
                seq=head.seq,
                head_hash=head.hash,
                ts=_now(),
                previous_key_id=last.key_id,
            )
            self.write(
                {
                    "event": KEY_ROTATED_EVENT,
                    "ts": statement["ts"],
                    "v": SCHEMA_VERSION,
                    "rotation": statement,
                }
            )
            self._unsent.append(statement)
            log.info(
                "audit.key_rotated",
                file=str(self.path),
                previous_key_id=last.key_id,
                key_id=signing.key.key_id,
            )

    def _set_torn_tail_aside(self, end: int) -> dict[str, Any]:
        torn = self.path.with_name(f"{self.path.name}.torn-{time.strftime('%Y%m%dT%H%M%S')}")
        with open(self.path, "r+b") as f:
            f.seek(end)
            tail = f.read()
            torn.write_bytes(tail)
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        log.warning("audit.torn_tail_moved", file=str(self.path), bytes=len(tail), to=str(torn))
        return {
            "file": str(self.path),
            "to": str(torn),
            "bytes": len(tail),
            "sha256": hashlib.sha256(tail).hexdigest(),
        }

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
        if self._signing is not None and self._checkpoint_timer is None:
            delay = 0 if self._checkpointed_seq < 0 else self._signing.interval
            self._checkpoint_timer = loop.call_later(delay, self._checkpoint_due, loop)
        return position

    # -- signing -------------------------------------------------------------------------------

    def _checkpoint_due(self, loop: asyncio.AbstractEventLoop) -> None:
        self._checkpoint_timer = None
        if self._failed is None:
            self.checkpoint()
            self._anchor_soon(loop)

    def checkpoint(self) -> ChainPosition | None:
        """Sign the head now (if it moved since the last checkpoint): the checkpoint line is
        written at once; its statement goes to the anchors once the line is on disk."""
        signing = self._signing
        if signing is None or self._chain is None or self._seq == self._checkpointed_seq:
            return None
        if self._seq == 0:
            return None  # nothing to sign yet
        ts = _now()
        statement = signing.key.sign_statement(
            checkpoint_statement(
                chain=self._chain,
                seq=self._seq,
                head_hash=self._hash,
                ts=ts,
                prev_checkpoint=self._prev_checkpoint,
            )
        )
        position = self.write(
            {"event": CHECKPOINT_EVENT, "ts": ts, "v": SCHEMA_VERSION, "checkpoint": statement}
        )
        self._checkpointed_seq = self._prev_checkpoint = position.seq
        self._unsent.append(statement)
        if signing.on_checkpoint is not None:
            signing.on_checkpoint()
        return position

    def _anchor_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._anchoring is None or self._anchoring.done():
            self._anchoring = loop.create_task(self._anchor_when_synced())

    async def _anchor_when_synced(self) -> None:
        """Hand the signed statements to the anchors once their lines are durable: an anchor
        must never hold a checkpoint the file could lose in a crash."""
        try:
            await self.sync()
        except AuditUnavailable:
            return
        self._send_unsent()

    def _send_unsent(self) -> None:
        statements, self._unsent = self._unsent, []
        signing = self._signing
        if signing is not None and signing.on_statement is not None:
            for statement in statements:
                signing.on_statement(statement)

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
        if self._checkpoint_timer is not None:
            self._checkpoint_timer.cancel()
            self._checkpoint_timer = None
        if self._signing is not None and self._failed is None and self._fd is not None:
            self.checkpoint()  # at shutdown: the head of everything written
            with contextlib.suppress(AuditUnavailable):
                await self.sync()
                self._send_unsent()
        if self._anchoring is not None:
            with contextlib.suppress(Exception):
                await self._anchoring
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
