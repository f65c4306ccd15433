"""`RedisStore`: approvals shared by every replica through one Redis (`store.url: redis://...`).

Transitions stay in Python (`proxy.approvals.state`, the single source of the rules) and are made
atomic with compare-and-set: read the approval, compute the next one, and let a Lua script swap
it in only if the stored JSON is still exactly what was read (else re-read and retry). The same
script keeps the indexes (fingerprint → open approval, deadline sorted set) and publishes the
change, in one atomic step.

Wake-ups: one pub/sub subscription per process, dispatching change notices to local waiters
(10,000 held requests need no more Redis connections than one). A notice is published only when
an approval changes while `pending` (what waiters wait for: claims and outcomes publish nothing),
and it carries the approval's new JSON, so a woken waiter needs no read: that JSON is exactly
what the same atomic step stored. After every (re)subscription all local waiters re-read their
approval, so a decision published while the subscription was down is not missed; while it is
down, waiters poll.

Reads and scripts leave in pipelines: what the event loop issues in one turn (a burst of claims
after a bulk decision) goes out in one write on one connection, each command still atomic on its
own. redis-py's per-command overhead (pool checkout, packing, timeouts) was most of the CPU a
release cost.

All keys share one hash tag (`{prefix}`), so every script runs in one slot and works on Redis
Cluster; approvals are human-paced, so one slot's throughput is ample. Any Redis failure is
raised as `StoreUnavailable`: privileged requests fail closed with 503 and nothing is forwarded
without a decision read from Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
import structlog
from redis.commands.core import AsyncScript

from ..approvals import state as transitions
from ..tasks import stop_task
from ..types import Approval, ApprovalState, DecisionRecord
from . import codec
from .base import StoreUnavailable

log = structlog.get_logger("countersign.store")

_FINISHED = (ApprovalState.DENIED, ApprovalState.EXPIRED, ApprovalState.EXECUTED)
_EXPIRABLE = (ApprovalState.PENDING, ApprovalState.APPROVED)
_CAS_ATTEMPTS = 200
_RECENT_MAX = 20_000  # approvals whose last known JSON this process keeps
_PIPELINE_MAX = 1000  # commands in one pipeline

# KEYS: fingerprint index, approval, deadlines, created
# ARGV: expected current index value ('' for none), approval json, id, expires_at, created_at,
#       ttl ms, oldest creation time worth listing
_CREATE = """
local current = redis.call('GET', KEYS[1])
if current == false then current = '' end
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[6])
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[7])
return 1
"""

# KEYS: approval, fingerprint index, deadlines, notes
# ARGV: expected json, new json, id, joinable 1/0, expirable 1/0, expires_at, ttl ms, channel,
#       publish 1/0
# The notice is "<id> <new json>": a waiter takes the new value from it without reading Redis.
_SWAP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[7])
redis.call('PEXPIRE', KEYS[4], ARGV[7])
if ARGV[4] == '1' then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[7])
elseif redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
if ARGV[5] == '1' then
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[3])
else
  redis.call('ZREM', KEYS[3], ARGV[3])
end
if ARGV[9] == '1' then
  redis.call('PUBLISH', ARGV[8], ARGV[3] .. ' ' .. ARGV[2])
end
return 1
"""

# Notes live in one hash per approval and share its TTL (refreshed by _SWAP on every change).
# KEYS: approval, notes; ARGV: name, value
_SET_NOTE = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""

# KEYS: lock; ARGV: owner, ttl ms
_LEASE = """
local owner = redis.call('GET', KEYS[1])
if owner == false or owner == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def _unavailable(cause: BaseException) -> StoreUnavailable:
    """What a connection failure to Redis becomes for the store's callers."""
    error = StoreUnavailable(f"redis: {cause or type(cause).__name__}")
    error.__cause__ = cause
    return error


def _pack(args: tuple[Any, ...]) -> bytes:
    """One command in the Redis protocol (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            # surrogateescape: an id taken from a header holds the client's raw bytes this way
            # (aiohttp decodes headers so); they go back as those bytes, a key like any other.
            data = arg.encode("utf-8", "surrogateescape")
        elif isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis")
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class _Waiter:
    """One `wait` call: woken by a change notice, with the approval's new value when the
    notice carried one (else None: read Redis)."""

    __slots__ = ("event", "noticed")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.noticed: tuple[str, Approval] | None = None


class RedisStore:
    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "countersign",
        retention_seconds: float = 24 * 3600,
        timeout_seconds: float = 2.0,
        max_connections: int = 64,
    ) -> None:
        self._url = url
        self._timeout = timeout_seconds
        self._retention_ms = int(retention_seconds * 1000)
        # No approval outlives its window plus the retention; a generous bound for trimming.
        self._max_age_seconds = retention_seconds + 7 * 24 * 3600
        common: dict[str, Any] = {
            "socket_connect_timeout": timeout_seconds,
            "health_check_interval": 10,
            "socket_keepalive": True,
        }
        # Commands queue for one of `max_connections` slots in arrival order (a FIFO
        # semaphore), so a burst of thousands of waiters shares a few connections fairly and a
        # busy pool is never mistaken for Redis being down: only a command that Redis itself
        # does not answer within `timeout_seconds` raises StoreUnavailable.
        self._slots = asyncio.Semaphore(max_connections)
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=None,
            socket_timeout=timeout_seconds,
            decode_responses=True,
            **common,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        # The subscription is one bare connection in RESP2, where a notice is a plain array:
        # read directly, it costs a third of what redis-py's PubSub spends per message (every
        # replica receives every notice). It blocks reading for as long as nothing happens: no
        # read timeout (redis-py's 5 s default would tear it down every 5 quiet seconds).
        self._subscriber = aioredis.Redis.from_url(
            url, socket_timeout=None, decode_responses=True, protocol=2, **common
        )
        tag = "{" + key_prefix + "}"
        self._approval_key = f"{tag}:apr:"
        self._fingerprint_key = f"{tag}:fp:"
        self._deadlines = f"{tag}:deadlines"
        self._created = f"{tag}:created"
        self._lease_key = f"{tag}:lease:"
        self._notes_key = f"{tag}:notes:"
        self._channel = f"{tag}:changes"
        self._owner = secrets.token_hex(8)
        self._create = self._redis.register_script(_CREATE)
        self._swap = self._redis.register_script(_SWAP)
        self._lease = self._redis.register_script(_LEASE)
        self._set_note = self._redis.register_script(_SET_NOTE)
        self._waiters: dict[str, set[_Waiter]] = {}
        self._recent: OrderedDict[str, tuple[str | bytes, Approval]] = OrderedDict()
        self._subscribed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        # Commands waiting to leave in the next pipeline, and the pipelines in flight.
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._max_pipelines = max_connections
        self._pipelines: set[asyncio.Task[None]] = set()

    # -- plumbing ------------------------------------------------------------------------------

    async def _guard(self, operation: Awaitable[Any]) -> Any:
        # Any: redis-py types replies loosely (bytes | str | ...); callers annotate what
        # decode_responses=True gives them.
        """Await a Redis operation; any connection failure becomes `StoreUnavailable`."""
        try:
            async with self._slots:
                return await operation
        except _REDIS_DOWN as exc:
            raise _unavailable(exc) from exc

    def _command(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; its reply (or its error) arrives in the future. Commands queued
        in the same turn of the event loop leave together in one pipeline, and while every
        connection has a pipeline in flight they keep gathering for the next one: one write,
        one read and one pool checkout for a whole burst of claims. No MULTI: each command (each
        script) is atomic on its own, as when sent alone. A Redis failure is `StoreUnavailable`.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._queue and len(self._pipelines) < self._max_pipelines:
            batch = self._queue[:_PIPELINE_MAX]
            del self._queue[:_PIPELINE_MAX]
            task = asyncio.create_task(self._send(batch))
            self._pipelines.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._pipelines.discard(task)
        if self._queue and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        """Write a batch in one go on one pooled connection, then hand each reply to its caller
        as it is read. Never retried: a script that may have run is not run again."""
        pool = self._redis.connection_pool
        async with self._slots:
            packed: list[bytes] = []
            sendable = []
            for args, future in batch:
                if future.done():
                    continue  # nobody awaits it any more: not sent (as a cancelled call never was)
                try:
                    packed.append(_pack(args))
                except (TypeError, UnicodeEncodeError) as exc:
                    # A command that cannot be encoded fails alone, before anything is sent.
                    future.set_exception(ValueError(f"cannot send to Redis: {exc}"))
                else:
                    sendable.append((args, future))
            batch = sendable
            if not batch:
                return
            connection = None
            try:
                connection = await pool.get_connection()  # type: ignore[no-untyped-call]
                await connection.send_packed_command(b"".join(packed))
                for _, future in batch:
                    try:
                        reply = await connection.read_response()
                    except redis.exceptions.ResponseError as exc:  # that command's own error
                        reply = exc
                    if future.done():  # its caller was cancelled
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
            except BaseException as exc:
                # A failing connection is closed by redis-py; whatever was not answered fails.
                for _, future in batch:
                    if future.done():
                        continue
                    if isinstance(exc, _REDIS_DOWN):
                        future.set_exception(_unavailable(exc))
                    elif isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:
                        future.cancel()
                if not isinstance(exc, Exception):
                    raise
            finally:
                if connection is not None:
                    await pool.release(connection)

    async def _script(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """Run a registered script through the pipelines (loading it into Redis if needed)."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self._command(*command)
        except redis.exceptions.NoScriptError:
            await self._guard(self._redis.script_load(script.script))
            return await self._command(*command)

    def _ttl_ms(self, approval: Approval) -> int:
        if approval.state in _FINISHED:
            return self._retention_ms
        remaining = max(approval.expires_at - time.time(), 0.0)
        return int(remaining * 1000) + self._retention_ms

    async def _read(self, approval_id: str) -> tuple[str | None, Approval | None]:
        raw: str | None = await self._command("GET", self._approval_key + approval_id)
        if raw is None:
            self._recent.pop(approval_id, None)
            return None, None
        approval = codec.loads(raw)
        self._remember(approval_id, raw, approval)
        return raw, approval

    def _remember(self, approval_id: str, raw: str | bytes, approval: Approval) -> None:
        self._recent[approval_id] = (raw, approval)
        self._recent.move_to_end(approval_id)
        if len(self._recent) > _RECENT_MAX:
            self._recent.popitem(last=False)

    async def _transition(
        self, approval_id: str, step: Callable[[Approval], Approval | None]
    ) -> Approval | None:
        """Compare-and-set loop: apply `step` to the current value until the swap succeeds.

        `step` raises to refuse the transition, or returns None for "nothing to do".

        The first attempt starts from the value this process read or wrote last, if any (a
        release reads the approval on waking, then claims it and records the outcome: that
        saves a read each). The swap itself checks it is still current; and a refusal or a
        "nothing to do" is only trusted on a value just read, never on a remembered one."""
        recent = self._recent.pop(approval_id, None)
        for _ in range(_CAS_ATTEMPTS):
            if recent is not None:
                (raw, current), from_memory = recent, True
                recent = None
            else:
                fresh, current_or_none = await self._read(approval_id)
                if fresh is None or current_or_none is None:
                    raise KeyError(approval_id)
                raw, current, from_memory = fresh, current_or_none, False
            try:
                updated = step(current)
            except transitions.ApprovalError:
                if from_memory:
                    continue  # maybe stale: decide on what Redis holds now
                raise
            if updated is None:
                if from_memory:
                    continue
                return None
            swapped = await self._script(
                self._swap,
                [
                    self._approval_key + approval_id,
                    self._fingerprint_key + updated.fingerprint,
                    self._deadlines,
                    self._notes_key + approval_id,
                ],
                [
                    raw,
                    new_raw := codec.dumps(updated),
                    approval_id,
                    "1" if transitions.joinable(updated) else "0",
                    "1" if updated.state in _EXPIRABLE else "0",
                    repr(updated.expires_at),
                    self._ttl_ms(updated),
                    self._channel,
                    # Waiters wait for an approval to leave `pending`: nothing to tell them
                    # about a claim or an outcome.
                    "1" if current.state is ApprovalState.PENDING else "0",
                ],
            )
            if swapped:
                self._remember(approval_id, new_raw, updated)
                return updated
            if not from_memory:
                await asyncio.sleep(0)  # someone else changed it first: read again
        raise StoreUnavailable(f"approval {approval_id} is changing too fast to update")

    # -- the Store protocol --------------------------------------------------------------------

    async def create_or_join(self, approval: Approval) -> tuple[Approval, bool]:
        index = self._fingerprint_key + approval.fingerprint
        for _ in range(_CAS_ATTEMPTS):
            expected: str = await self._command("GET", index) or ""
            if expected:
                _, existing = await self._read(expected)
                if (
                    existing is not None
                    and transitions.joinable(existing)
                    and not transitions.is_due(existing, approval.created_at)
                ):
                    return existing, False
            created = await self._script(
                self._create,
                [index, self._approval_key + approval.id, self._deadlines, self._created],
                [
                    expected,
                    codec.dumps(approval),
                    approval.id,
                    repr(approval.expires_at),
                    repr(approval.created_at),
                    self._ttl_ms(approval),
                    # Older entries of the listing index point at expired keys: trim them.
                    repr(approval.created_at - self._max_age_seconds),
                ],
            )
            if created:
                return approval, True
        raise StoreUnavailable("could not create the approval (too much contention)")

    async def get(self, approval_id: str) -> Approval | None:
        return (await self._read(approval_id))[1]

    async def decide(self, approval_id: str, record: DecisionRecord, now: float) -> Approval:
        result = await self._transition(approval_id, lambda a: transitions.decide(a, record, now))
        assert result is not None
        return result

    async def claim(self, approval_id: str, now: float) -> Approval:
        result = await self._transition(approval_id, lambda a: transitions.claim(a, now))
        assert result is not None
        return result

    async def record_outcome(self, approval_id: str, upstream_status: int) -> Approval:
        result = await self._transition(
            approval_id, lambda a: transitions.record_outcome(a, upstream_status)
        )
        assert result is not None
        return result

    async def expire(self, approval_id: str, now: float) -> Approval | None:
        def step(approval: Approval) -> Approval | None:
            return transitions.expire(approval, now) if transitions.is_due(approval, now) else None

        try:
            return await self._transition(approval_id, step)
        except KeyError:
            # Gone (its retention ran out): drop it from the deadline index too.
            await self._guard(self._redis.zrem(self._deadlines, approval_id))
            return None

    async def due(self, now: float, limit: int = 100) -> list[str]:
        ids: list[str] = await self._guard(
            self._redis.zrangebyscore(self._deadlines, "-inf", now, start=0, num=limit)
        )
        return ids

    async def list(self, state: ApprovalState | None = None, limit: int = 100) -> list[Approval]:
        found: list[Approval] = []
        start, page = 0, max(limit, 100)
        while len(found) < limit and start < 10 * page:
            ids: list[str] = await self._guard(
                self._redis.zrevrange(self._created, start, start + page - 1)
            )
            if not ids:
                break
            keys = [self._approval_key + i for i in ids]
            values: list[str | None] = await self._guard(self._redis.mget(keys))
            gone = [i for i, v in zip(ids, values, strict=True) if v is None]
            if gone:  # retention ran out: forget them in the listing index too
                await self._guard(self._redis.zrem(self._created, *gone))
                start -= len(gone)
            for value in values:
                if value is not None:
                    approval = codec.loads(value)
                    if state is None or approval.state is state:
                        found.append(approval)
            start += page
        return found[:limit]

    async def wait(self, approval_id: str, seconds: float) -> Approval | None:
        self._ensure_listener()
        waiter = _Waiter()
        self._waiters.setdefault(approval_id, set()).add(waiter)
        deadline = time.monotonic() + seconds
        try:
            while True:
                # Take the notice and clear, then read only without a notice: a change
                # published after this point sets the event again, so it is never missed.
                noticed, waiter.noticed = waiter.noticed, None
                waiter.event.clear()
                approval: Approval | None
                if noticed is not None:
                    raw, approval = noticed
                    self._remember(approval_id, raw, approval)
                else:
                    approval = await self.get(approval_id)
                remaining = deadline - time.monotonic()
                if approval is None or approval.state is not ApprovalState.PENDING:
                    return approval
                if remaining <= 0:
                    return approval
                if not self._subscribed.is_set():
                    remaining = min(remaining, 0.5)  # no subscription right now: poll
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await waiter.event.wait()
        finally:
            waiters = self._waiters.get(approval_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[approval_id]

    async def set_note(self, approval_id: str, name: str, value: str) -> None:
        keys = [self._approval_key + approval_id, self._notes_key + approval_id]
        if not await self._guard(self._set_note(keys=keys, args=[name, value])):
            raise KeyError(approval_id)

    async def get_note(self, approval_id: str, name: str) -> str | None:
        value: str | None = await self._guard(self._redis.hget(self._notes_key + approval_id, name))
        return value

    async def lease(self, name: str, seconds: float) -> bool:
        """Hold the named lease for `seconds` (renewable by its holder); one replica at a time
        does periodic work such as sweeping expiries."""
        return bool(
            await self._guard(
                self._lease(keys=[self._lease_key + name], args=[self._owner, int(seconds * 1000)])
            )
        )

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (*_REDIS_DOWN, redis.exceptions.RedisError):
            return False

    async def aclose(self) -> None:
        if self._listener is not None:
            await stop_task(self._listener)
            self._listener = None
        self._wake_all()
        if self._pipelines:  # let commands already sent have their answers
            await asyncio.wait(set(self._pipelines), timeout=self._timeout)
        await self._redis.aclose()
        await self._subscriber.aclose()

    # -- the subscription ----------------------------------------------------------------------

    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="redis-store-listener")

    def _notice(self, data: str) -> None:
        """A change notice, "<id> <json>": wake that approval's waiters with its new value,
        decoded once for all of them (a bare id, or JSON that does not decode: they read)."""
        approval_id, _, raw = data.partition(" ")
        waiters = self._waiters.get(approval_id)
        if not waiters:
            return
        noticed: tuple[str, Approval] | None = None
        if raw:
            try:
                noticed = (raw, codec.loads(raw))
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("store.unreadable_notice", approval_id=approval_id, error=str(exc))
        for waiter in waiters:
            waiter.noticed = noticed
            waiter.event.set()

    def _wake_all(self) -> None:
        """Every local waiter reads its approval from Redis again."""
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.noticed = None
                waiter.event.set()

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            connection = self._subscriber.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            try:
                await connection.connect()
                await connection.send_command("SUBSCRIBE", self._channel)
                await connection.read_response(timeout=math.inf)  # ["subscribe", channel, 1]
                self._subscribed.set()
                backoff = 0.1
                self._wake_all()  # re-read everything: changes may have been missed
                while True:
                    reply = await connection.read_response(timeout=math.inf)
                    if reply[0] == "message":  # ["message", channel, data]
                        self._notice(reply[2])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._subscribed.is_set():
                    log.warning("store.subscription_lost", error=str(exc) or type(exc).__name__)
                self._subscribed.clear()
                self._wake_all()  # waiters fall back to polling
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                self._subscribed.clear()
                with contextlib.suppress(Exception):
                    await connection.disconnect()
