"""`RedisStore`: approvals shared by every replica through one Redis (`store.url: redis://...`).

Transitions stay in Python (`proxy.model.state`, the single source of the rules) and are made
atomic with compare-and-set: read the approval, compute the next one, and let a Lua script swap
it in only if the stored JSON is still exactly what was read (else re-read and retry). The same
script keeps the indexes and publishes the change, in one atomic step.

Keys (`{p}` is the hash tag `{key_prefix}`), every one with a TTL:

    {p}:apr:<id>           the approval's JSON; TTL: what is left of its window + retention
    {p}:notes:<id>         hash of its notes (`set_note`); the approval's TTL
    {p}:fp:<fingerprint>   id of the open (joinable) approval with that fingerprint
    {p}:amb:<fingerprint>  id of the last approval of that request whose outcome is ambiguous;
                           TTL: the retention
    {p}:deadlines          zset id → expires_at of pending and approved (unused) approvals
    {p}:created            zset id → created_at of every approval: the listing of all states
    {p}:state:<state>      zset id → created_at of the approvals in that state: its listing
    {p}:pending:<sha256>   set of the ids of one requester's pending approvals (sha256 of
                           `requester_key`), for `max_pending`
    {p}:lease:<name>       holder of a lease;  {p}:changes is the pub/sub channel (not a key)
    {p}:grant:<id>         hash of one grant: data (JSON), left (uses), expires_at, revoked_*;
                           TTL: what is left of its time + retention
    {p}:gscope:<scope>     set of the ids of the grants of one scope (`model.grant.scope_of`)
    {p}:grant-deadlines    zset id → expires_at of the grants still usable
    {p}:grants             zset id → created_at of every grant kept: their listing

A shared index gets at least the TTL of each approval written into it, so it outlives all it
names; the listing zsets are also trimmed by age on every write, and of entries whose approval
is gone as listings meet them; a requester's set loses an id when its approval leaves `pending`,
and the ids of approvals gone (never swept) before it refuses a creation.

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

Topologies (`store.mode`): `standalone` (one Redis, or anything behind one address);
`sentinel`: redis-py's Sentinel client finds the master and follows a failover (connections to
the old master fail, and the next ones go to the new one); `cluster`: redis-py's cluster client
(any node as the seed) follows MOVED/ASK and slot moves. All keys share one hash tag
(`{prefix}`), so every command and script names keys of one slot only; approvals are
human-paced, so one slot's throughput is ample. On a cluster, commands go one by one through the
cluster client (no pipelines), and the subscription is on any node (a PUBLISH reaches every node
of a cluster). Any Redis failure, and any error Redis answers that the code does not expect
(a cluster down, a failover under way, a read-only replica), is raised as `StoreUnavailable`:
privileged requests fail closed with 503 and nothing is forwarded without a decision read from
Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelManagedSSLConnection

from ..model import Approval, ApprovalState, DecisionRecord, Outcome
from ..model import state as transitions
from ..model.grant import Grant
from ..tasks import stop_task
from . import codec
from .base import StoreUnavailable, encode_cursor, parse_cursor, settle

log = structlog.get_logger("countersign.store")

_FINISHED = (
    ApprovalState.DENIED,
    ApprovalState.EXPIRED,
    ApprovalState.EXECUTED,
    ApprovalState.LAPSED,
)
_EXPIRABLE = (ApprovalState.PENDING, ApprovalState.APPROVED)
_CAS_ATTEMPTS = 200
_RECENT_MAX = 20_000  # approvals whose last known JSON this process keeps
_PIPELINE_MAX = 1000  # commands in one pipeline
_LIST_ROUNDS = 8  # reads of a listing set per page (more only when entries have expired)
_BULK_CHUNK = 500  # approvals per script of a bulk decision

# Every key expires. An index shared by many approvals (deadlines, the listing sets, a
# requester's pending set) is given at least the TTL of the approval just written into it
# (`keep`), so it outlives every approval it names; the listing sets are also trimmed by age.
_KEEP = """
local function keep(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"""

# KEYS: fingerprint index, approval, deadlines, created, the `pending` state's set,
#       the requester's pending set
# ARGV: expected current index value ('' for none), approval json, id, expires_at, created_at,
#       ttl ms, oldest creation time worth listing, max pending ('' for no limit)
# Returns 1 (created), 0 (the fingerprint index changed: look again) or -1 - n (the requester
# already has n >= max pending approvals: nothing stored; see `_FORGET_GONE`).
_CREATE = (
    _KEEP
    + """
local current = redis.call('GET', KEYS[1])
if current == false then current = '' end
if current ~= ARGV[1] then return 0 end
if ARGV[8] ~= '' then
  local count = redis.call('SCARD', KEYS[6])
  if count >= tonumber(ARGV[8]) then return -1 - count end
end
local ttl = tonumber(ARGV[6])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[6])
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
keep(KEYS[3], ttl)
for i = 4, 5 do
  redis.call('ZADD', KEYS[i], ARGV[5], ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', '(' .. ARGV[7])
  keep(KEYS[i], ttl)
end
redis.call('SADD', KEYS[6], ARGV[3])
keep(KEYS[6], ttl)
return 1
"""
)

# KEYS: approval, fingerprint index, deadlines, notes, created, the old state's set, the new
#       state's set, the requester's pending set
# ARGV: expected json, new json, id, joinable 1/0, expirable 1/0, expires_at, ttl ms, channel,
#       publish 1/0, created_at, still pending 1/0, oldest creation time worth listing
# The notice is "<id> <new json>": a waiter takes the new value from it without reading Redis.
# The approval moves from its old state's listing set to the new one's (ZADD even when the
# state is unchanged: idempotent, and it indexes an approval written before these sets
# existed), and leaves its requester's pending set once it is no longer pending.
_SWAP_FUNCTION = (
    _KEEP
    + """
local function swap(K, A)
  if redis.call('GET', K[1]) ~= A[1] then return 0 end
  local ttl = tonumber(A[7])
  redis.call('SET', K[1], A[2], 'PX', A[7])
  redis.call('PEXPIRE', K[4], A[7])
  if A[4] == '1' then
    redis.call('SET', K[2], A[3], 'PX', A[7])
  elseif redis.call('GET', K[2]) == A[3] then
    redis.call('DEL', K[2])
  end
  if A[5] == '1' then
    redis.call('ZADD', K[3], A[6], A[3])
    keep(K[3], ttl)
  else
    redis.call('ZREM', K[3], A[3])
  end
  keep(K[5], ttl)
  if K[6] ~= K[7] then redis.call('ZREM', K[6], A[3]) end
  redis.call('ZADD', K[7], A[10], A[3])
  redis.call('ZREMRANGEBYSCORE', K[7], '-inf', '(' .. A[12])
  keep(K[7], ttl)
  if A[11] == '1' then
    redis.call('SADD', K[8], A[3])
    keep(K[8], ttl)
  else
    redis.call('SREM', K[8], A[3])
  end
  if A[9] == '1' then
    redis.call('PUBLISH', A[8], A[3] .. ' ' .. A[2])
  end
  return 1
end
"""
)
_SWAP = _SWAP_FUNCTION + "return swap(KEYS, ARGV)\n"

# Many swaps in one script (a bulk decision): KEYS and ARGV are those of `_SWAP`, one group of
# 8 keys and 12 arguments per approval, in the same order. Each swap is its own compare-and-set:
# a reply per approval, 1 (swapped) or 0 (it changed meanwhile: the caller reads it again).
_SWAP_MANY = (
    _SWAP_FUNCTION
    + """
local replies = {}
local k, a = {}, {}
for j = 0, #KEYS / 8 - 1 do
  for x = 1, 8 do k[x] = KEYS[j * 8 + x] end
  for x = 1, 12 do a[x] = ARGV[j * 12 + x] end
  replies[j + 1] = swap(k, a)
end
return replies
"""
)

# Before a creation is refused for the requester's pending set being full: drop the ids whose
# approval is gone (its key expired or was evicted while it was pending), so they do not count
# forever. Every key it reads is declared (Redis Cluster), hence a script of its own.
# KEYS: the requester's pending set, then the approval key of each id; ARGV: the ids
_FORGET_GONE = """
local removed = 0
for i, id in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    removed = removed + redis.call('SREM', KEYS[1], id)
  end
end
return removed
"""

# One page of a listing set, newest first: (id, score) pairs at or below the highest score,
# `count` of them plus as many as share the cursor's own score (the caller drops those at or
# before the cursor's id: equal scores page correctly).
# KEYS: the listing set; ARGV: highest score ('+inf' or the cursor's), count, cursor 1/0
_PAGE = """
local extra = 0
if ARGV[3] == '1' then extra = redis.call('ZCOUNT', KEYS[1], ARGV[1], ARGV[1]) end
return redis.call('ZREVRANGEBYSCORE', KEYS[1], ARGV[1], '-inf', 'WITHSCORES', 'LIMIT', 0,
  tonumber(ARGV[2]) + extra)
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

# Grants (`proxy.model.grant`): one hash each, `data` (the grant's JSON as created), `left` (uses
# left: the one counter a use decrements), `expires_at`, and `revoked_at` / `revoked_by` once
# revoked. A use is one script: check and decrement in one atomic step, so a grant of N uses is
# never used N+1 times, whatever the replicas.
# KEYS: grant, scope set, grant deadlines, grant listing
# ARGV: id, json, uses, expires_at, created_at, ttl ms, oldest creation time worth listing
_ADD_GRANT = (
    _KEEP
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local ttl = tonumber(ARGV[6])
redis.call('HSET', KEYS[1], 'data', ARGV[2], 'left', ARGV[3], 'expires_at', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('SADD', KEYS[2], ARGV[1])
keep(KEYS[2], ttl)
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
keep(KEYS[3], ttl)
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[7])
keep(KEYS[4], ttl)
return 1
"""
)

# KEYS: grant, grant deadlines; ARGV: id, now
# Returns -2 (gone), -1 (revoked or exhausted: for good), -3 (expired by `now`'s clock) or
# {uses left after this use, json}.
_USE_GRANT = """
local left = redis.call('HGET', KEYS[1], 'left')
if not left then return -2 end
if redis.call('HEXISTS', KEYS[1], 'revoked_at') == 1 then return -1 end
if tonumber(ARGV[2]) >= tonumber(redis.call('HGET', KEYS[1], 'expires_at')) then return -3 end
if tonumber(left) <= 0 then return -1 end
local now_left = redis.call('HINCRBY', KEYS[1], 'left', -1)
if now_left <= 0 then redis.call('ZREM', KEYS[2], ARGV[1]) end
return {now_left, redis.call('HGET', KEYS[1], 'data')}
"""

# KEYS: grant, grant deadlines; ARGV: id, now, by. Returns -1 (unknown), 0 (already), 1.
_REVOKE_GRANT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[1], 'revoked_at') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'revoked_at', ARGV[2], 'revoked_by', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
# Everything redis-py raises: what is not expected (a cluster down, a slot not covered, MOVED
# not followed, READONLY during a failover, a script failing on a failing node) is an
# unavailable store too, never an error of the request.
_REDIS_ERRORS = (*_REDIS_DOWN, redis.exceptions.RedisError, redis.exceptions.RedisClusterException)

MODES = ("standalone", "cluster", "sentinel")


class _Script:
    """A Lua script, run by its SHA1 (EVALSHA) and sent whole (EVAL) to a server without it."""

    __slots__ = ("script", "sha")

    def __init__(self, script: str) -> None:
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()


def _as_dict(reply: Any) -> dict[str, str]:
    """A HGETALL reply as a dict (RESP3 answers a map, RESP2 a flat list)."""
    if isinstance(reply, dict):
        return reply
    if isinstance(reply, list):
        return dict(zip(reply[::2], reply[1::2], strict=True))
    return {}


def _unavailable(cause: BaseException) -> StoreUnavailable:
    """What a connection failure to Redis becomes for the store's callers."""
    error = StoreUnavailable(f"redis: {cause or type(cause).__name__}")
    error.__cause__ = cause
    return error


def _encode(args: tuple[Any, ...]) -> list[bytes]:
    """The arguments of one command as the bytes Redis receives."""
    encoded = []
    for arg in args:
        if isinstance(arg, str):
            # surrogateescape: an id taken from a header holds the client's raw bytes this way
            # (aiohttp decodes headers so); they go back as those bytes, a key like any other.
            encoded.append(arg.encode("utf-8", "surrogateescape"))
        elif isinstance(arg, bytes):
            encoded.append(arg)
        elif isinstance(arg, int):
            encoded.append(b"%d" % arg)
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis")
    return encoded


def _same_json(kept: str | bytes, raw: str) -> bool:
    """Whether a remembered value (as written, or as read) is the JSON a notice carries."""
    if isinstance(kept, str):
        return kept == raw
    return kept == raw.encode("utf-8", "surrogateescape")


def _pack(args: tuple[Any, ...]) -> bytes:
    """One command in the Redis protocol (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for data in _encode(args):
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class _Waiter:
    """One `wait` call: woken by a change notice, with the approval's new value when the
    notice carried one (else None: read Redis).

    An event of its own, lighter than `asyncio.Event` (which keeps a deque, ~0.9 KiB, and
    `asyncio.timeout` adds more): one of these lives for every held request."""

    __slots__ = ("_future", "_woken", "noticed")

    def __init__(self) -> None:
        self._woken = False
        self._future: asyncio.Future[None] | None = None
        self.noticed: tuple[str, Approval] | None = None

    def set(self) -> None:
        self._woken = True
        if self._future is not None:
            settle(self._future)

    def clear(self) -> None:
        self._woken = False

    async def wait(self, seconds: float) -> None:
        """Until `set` (at once if it was set since `clear`), or `seconds` have passed."""
        if self._woken:
            return
        loop = asyncio.get_running_loop()
        future = self._future = loop.create_future()
        timer = loop.call_later(seconds, settle, future)
        try:
            await future
        finally:
            timer.cancel()
            self._future = None


class RedisStore:
    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "countersign",
        retention_seconds: float = 24 * 3600,
        timeout_seconds: float = 2.0,
        max_connections: int = 64,
        mode: str = "standalone",
        sentinel_master: str | None = None,
        sentinel_nodes: Sequence[tuple[str, int]] = (),
        sentinel_password: str | None = None,
    ) -> None:
        """`url`: the Redis (standalone), any node of the cluster (cluster), or with Sentinel
        what applies to the master found (scheme for TLS, username, password, database; its
        host is not used)."""
        if mode not in MODES:
            raise ValueError(f"unknown store mode {mode!r}; use one of {', '.join(MODES)}")
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
        self._cluster: RedisCluster | None = None
        self._sentinel: Sentinel | None = None
        self._subscriber: aioredis.Redis | None = None
        self._subscribed_node = 0  # on a cluster: which node the subscription tries next
        self._cluster_lock = asyncio.Lock()
        self._cluster_ready = False
        # The subscription is one bare connection in RESP2, where a notice is a plain array:
        # read directly, it costs a third of what redis-py's PubSub spends per message (every
        # replica receives every notice). It blocks reading for as long as nothing happens: no
        # read timeout (redis-py's 5 s default would tear it down every 5 quiet seconds).
        if mode == "cluster":
            self._cluster = RedisCluster.from_url(
                url,
                max_connections=max_connections,
                socket_timeout=timeout_seconds,
                decode_responses=True,
                protocol=2,
                **common,
            )
            self._redis: aioredis.Redis | RedisCluster = self._cluster
        elif mode == "sentinel":
            if not sentinel_master or not sentinel_nodes:
                raise ValueError("store.mode sentinel needs store.sentinel.master and nodes")
            options = aioredis.connection.parse_url(url)
            master: dict[str, Any] = {
                key: options[key] for key in ("username", "password", "db") if key in options
            }
            if url.startswith("rediss://"):
                master["connection_class"] = SentinelManagedSSLConnection
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(sentinel_nodes),
                sentinel_kwargs={
                    "password": sentinel_password,
                    "socket_timeout": timeout_seconds,
                    "socket_connect_timeout": timeout_seconds,
                },
            )
            self._redis = self._sentinel.master_for(
                sentinel_master,
                max_connections=max_connections,
                socket_timeout=timeout_seconds,
                decode_responses=True,
                **master,
                **common,
            )
            self._subscriber = self._sentinel.master_for(
                sentinel_master,
                socket_timeout=None,
                decode_responses=True,
                protocol=2,
                **master,
                **common,
            )
        else:
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=None,
                socket_timeout=timeout_seconds,
                decode_responses=True,
                **common,
            )
            self._redis = aioredis.Redis(connection_pool=pool)
            self._subscriber = aioredis.Redis.from_url(
                url, socket_timeout=None, decode_responses=True, protocol=2, **common
            )
        tag = "{" + key_prefix + "}"
        self._approval_key = f"{tag}:apr:"
        self._fingerprint_key = f"{tag}:fp:"
        self._deadlines = f"{tag}:deadlines"
        self._created = f"{tag}:created"
        self._state_key = f"{tag}:state:"
        self._requester_key = f"{tag}:pending:"
        self._lease_key = f"{tag}:lease:"
        self._notes_key = f"{tag}:notes:"
        self._ambiguous_key = f"{tag}:amb:"
        self._channel = f"{tag}:changes"
        self._grant_key = f"{tag}:grant:"
        self._grant_scope_key = f"{tag}:gscope:"
        self._grant_deadlines = f"{tag}:grant-deadlines"
        self._grants = f"{tag}:grants"
        self._add_grant = _Script(_ADD_GRANT)
        self._use_grant = _Script(_USE_GRANT)
        self._revoke_grant = _Script(_REVOKE_GRANT)
        self._owner = secrets.token_hex(8)
        self._create = _Script(_CREATE)
        self._swap = _Script(_SWAP)
        self._swap_many = _Script(_SWAP_MANY)
        self._lease = _Script(_LEASE)
        self._set_note = _Script(_SET_NOTE)
        self._page = _Script(_PAGE)
        self._forget_gone = _Script(_FORGET_GONE)
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
        """Await a Redis operation; any Redis failure or error becomes `StoreUnavailable`
        (but NOSCRIPT: `_script` then sends the script itself)."""
        try:
            async with self._slots:
                return await operation
        except redis.exceptions.NoScriptError:
            raise
        except _REDIS_ERRORS as exc:
            raise _unavailable(exc) from exc

    async def _command(self, *args: Any) -> Any:
        """One command; its reply. Commands queued in the same turn of the event loop leave
        together in one pipeline, and while every connection has a pipeline in flight they keep
        gathering for the next one: one write, one read and one pool checkout for a whole burst
        of claims. No MULTI: each command (each script) is atomic on its own, as when sent
        alone. On a cluster, the cluster client sends each (to the node of the slot, following
        MOVED and ASK). A Redis failure or error is `StoreUnavailable` (but NOSCRIPT)."""
        if self._cluster is not None:
            try:
                encoded = _encode(args[1:])  # the arguments; the command's name stays a str
            except (TypeError, UnicodeEncodeError) as exc:
                raise ValueError(f"cannot send to Redis: {exc}") from exc
            if not self._cluster_ready:
                await self._initialize_cluster()
            return await self._guard(self._cluster.execute_command(args[0], *encoded))
        try:
            return await self._enqueue(*args)
        except redis.exceptions.NoScriptError:
            raise
        except _REDIS_ERRORS as exc:
            raise _unavailable(exc) from exc

    async def _initialize_cluster(self) -> None:
        """Learn the cluster's nodes and slots once before the first command: redis-py
        initializes lazily in every command that finds it not done, and concurrent first
        commands then tear down each other's new connections."""
        assert self._cluster is not None
        async with self._cluster_lock:
            if not self._cluster_ready:
                await self._guard(self._cluster.initialize())
                self._cluster_ready = True

    def _enqueue(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command for the next pipeline; its reply (or its error) arrives in the
        future."""
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
        assert isinstance(self._redis, aioredis.Redis)
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

    async def _script(self, script: _Script, keys: list[str], args: list[Any]) -> Any:
        """Run a script by its SHA1; sent whole to a server that does not have it yet (a new
        master after a failover, a node that just took the slot, a restarted Redis)."""
        try:
            return await self._command("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return await self._command("EVAL", script.script, len(keys), *keys, *args)

    def _pending_set(self, approval: Approval) -> str:
        """The set of the ids of the requester's pending approvals."""
        requester = approval.requester_key.encode("utf-8", "surrogatepass")
        return self._requester_key + hashlib.sha256(requester).hexdigest()

    async def _forget_gone_pending(self, approval: Approval) -> int:
        """Drop from the requester's pending set the ids whose approval is gone; how many."""
        key = self._pending_set(approval)
        ids: list[str] = list(await self._command("SMEMBERS", key))
        if not ids:
            return 0
        keys = [key, *(self._approval_key + approval_id for approval_id in ids)]
        return int(await self._script(self._forget_gone, keys, ids))

    def _oldest_listed(self, approval: Approval) -> str:
        """Listing sets drop entries created before this: their approvals are gone."""
        return repr(approval.created_at - self._max_age_seconds)

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

    def _swap_keys(self, approval_id: str, current: Approval, updated: Approval) -> list[str]:
        """The KEYS of `_SWAP` for the change of one approval from `current` to `updated`."""
        return [
            self._approval_key + approval_id,
            self._fingerprint_key + updated.fingerprint,
            self._deadlines,
            self._notes_key + approval_id,
            self._created,
            self._state_key + current.state.value,
            self._state_key + updated.state.value,
            self._pending_set(updated),
        ]

    def _swap_args(
        self,
        approval_id: str,
        raw: str | bytes,
        current: Approval,
        new_raw: str | bytes,
        updated: Approval,
    ) -> list[Any]:
        """The ARGV of `_SWAP`: `raw` (what `current` was read as) is swapped for `new_raw`."""
        return [
            raw,
            new_raw,
            approval_id,
            "1" if transitions.joinable(updated) else "0",
            "1" if updated.state in _EXPIRABLE else "0",
            repr(updated.expires_at),
            self._ttl_ms(updated),
            self._channel,
            # Waiters wait for an approval to leave `pending`: nothing to tell them about a
            # claim or an outcome.
            "1" if current.state is ApprovalState.PENDING else "0",
            repr(updated.created_at),
            "1" if updated.state is ApprovalState.PENDING else "0",
            self._oldest_listed(updated),
        ]

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
            new_raw = codec.dumps(updated)
            swapped = await self._script(
                self._swap,
                self._swap_keys(approval_id, current, updated),
                self._swap_args(approval_id, raw, current, new_raw, updated),
            )
            if swapped:
                self._remember(approval_id, new_raw, updated)
                return updated
            if not from_memory:
                await asyncio.sleep(0)  # someone else changed it first: read again
        raise StoreUnavailable(f"approval {approval_id} is changing too fast to update")

    # -- the Store protocol --------------------------------------------------------------------

    async def create_or_join(
        self, approval: Approval, max_pending: int | None = None
    ) -> tuple[Approval, bool]:
        index = self._fingerprint_key + approval.fingerprint
        pruned = False
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
                [
                    index,
                    self._approval_key + approval.id,
                    self._deadlines,
                    self._created,
                    self._state_key + approval.state.value,
                    self._pending_set(approval),
                ],
                [
                    expected,
                    codec.dumps(approval),
                    approval.id,
                    repr(approval.expires_at),
                    repr(approval.created_at),
                    self._ttl_ms(approval),
                    # Older entries of the listing sets point at expired keys: trim them.
                    self._oldest_listed(approval),
                    "" if max_pending is None else max_pending,
                ],
            )
            if created < 0:
                if not pruned:
                    pruned = True
                    if await self._forget_gone_pending(approval):
                        continue  # slots were held by approvals now gone: try again
                pending = -1 - created
                raise transitions.TooManyPending(
                    f"this identity already has {pending} pending approvals "
                    f"(approvals.max_pending_per_identity is {max_pending})"
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

    async def decide_many(
        self, approval_ids: Sequence[str], record: DecisionRecord, now: float
    ) -> list[Approval | transitions.ApprovalError | StoreUnavailable]:
        """Chunks of `_BULK_CHUNK` ids, all under way at once (their commands share
        pipelines): per chunk, the approvals this process does not remember (a listing just
        read them all) are read with one MGET, and every swap leaves in one `_SWAP_MANY`
        script. An approval that changed meanwhile, or that a remembered (maybe stale) value
        refused, is decided again on its own from what Redis holds. A chunk the store fails
        on answers `StoreUnavailable` for its ids (decided or not: unknown); the other chunks
        are not held up by it."""
        results: list[Approval | transitions.ApprovalError | StoreUnavailable | None]
        results = [None] * len(approval_ids)
        await asyncio.gather(
            *(
                self._decide_chunk(
                    approval_ids,
                    range(start, min(start + _BULK_CHUNK, len(approval_ids))),
                    record,
                    now,
                    results,
                )
                for start in range(0, len(approval_ids), _BULK_CHUNK)
            )
        )
        done = [result for result in results if result is not None]
        assert len(done) == len(approval_ids)
        return done

    async def _decide_chunk(
        self,
        approval_ids: Sequence[str],
        chunk: range,
        record: DecisionRecord,
        now: float,
        results: list[Approval | transitions.ApprovalError | StoreUnavailable | None],
    ) -> None:
        try:
            await self._decide_chunk_once(approval_ids, chunk, record, now, results)
        except StoreUnavailable as exc:
            for at in chunk:
                if results[at] is None:
                    results[at] = exc

    async def _decide_chunk_once(
        self,
        approval_ids: Sequence[str],
        chunk: range,
        record: DecisionRecord,
        now: float,
        results: list[Approval | transitions.ApprovalError | StoreUnavailable | None],
    ) -> None:
        # at -> (raw, approval, from memory)
        known: dict[int, tuple[str | bytes, Approval, bool]] = {}
        unread: list[int] = []
        for at in chunk:
            remembered = self._recent.get(approval_ids[at])
            if remembered is None:
                unread.append(at)
            else:
                known[at] = (remembered[0], remembered[1], True)
        if unread:
            values: list[str | None] = await self._command(
                "MGET", *(self._approval_key + approval_ids[at] for at in unread)
            )
            for at, value in zip(unread, values, strict=True):
                if value is None:
                    results[at] = transitions.ApprovalNotFound("approval not found")
                else:
                    known[at] = (value, codec.loads(value), False)
        keys: list[str] = []
        args: list[Any] = []
        swaps: list[tuple[int, str | bytes, Approval]] = []
        again: list[int] = []
        for at in chunk:
            if at not in known:
                continue
            raw, current, from_memory = known[at]
            try:
                updated = transitions.decide(current, record, now)
            except transitions.ApprovalError as exc:
                if from_memory:
                    again.append(at)  # maybe stale: decide on what Redis holds now
                else:
                    results[at] = exc
                continue
            encoded = codec.dumps(updated)
            approval_id = approval_ids[at]
            keys.extend(self._swap_keys(approval_id, current, updated))
            args.extend(self._swap_args(approval_id, raw, current, encoded, updated))
            swaps.append((at, encoded, updated))
        if swaps:
            replies: list[int] = await self._script(self._swap_many, keys, args)
            for (at, written, updated), swapped in zip(swaps, replies, strict=True):
                if swapped:
                    self._remember(approval_ids[at], written, updated)
                    results[at] = updated
                else:
                    again.append(at)  # it changed meanwhile
        if again:
            await asyncio.gather(
                *(self._decide_again(approval_ids, at, record, now, results) for at in again)
            )

    async def _decide_again(
        self,
        approval_ids: Sequence[str],
        at: int,
        record: DecisionRecord,
        now: float,
        results: list[Approval | transitions.ApprovalError | StoreUnavailable | None],
    ) -> None:
        """One approval of a bulk decision, decided alone from a fresh read."""
        approval_id = approval_ids[at]
        self._recent.pop(approval_id, None)
        try:
            results[at] = await self.decide(approval_id, record, now)
        except transitions.ApprovalError as exc:
            results[at] = exc
        except KeyError:
            results[at] = transitions.ApprovalNotFound("approval not found")

    async def claim(self, approval_id: str, now: float) -> Approval:
        result = await self._transition(approval_id, lambda a: transitions.claim(a, now))
        assert result is not None
        return result

    async def record_outcome(
        self, approval_id: str, outcome: Outcome, upstream_status: int | None
    ) -> Approval:
        result = await self._transition(
            approval_id, lambda a: transitions.record_outcome(a, outcome, upstream_status)
        )
        assert result is not None
        return result

    async def abandon(self, approval_id: str, now: float) -> Approval | None:
        def step(approval: Approval) -> Approval | None:
            abandoned = transitions.abandon(approval, now)
            return None if abandoned is approval else abandoned

        return await self._transition(approval_id, step)

    async def expire(self, approval_id: str, now: float) -> Approval | None:
        def step(approval: Approval) -> Approval | None:
            return transitions.expire(approval, now) if transitions.is_due(approval, now) else None

        try:
            return await self._transition(approval_id, step)
        except KeyError:
            # Gone (its retention ran out): drop it from the deadline index too.
            await self._command("ZREM", self._deadlines, approval_id)
            return None

    async def due(self, now: float, limit: int = 100) -> list[str]:
        ids: list[str] = await self._command(
            "ZRANGEBYSCORE", self._deadlines, "-inf", repr(now), "LIMIT", 0, limit
        )
        return ids

    async def list(
        self, state: ApprovalState | None = None, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[Approval], str | None]:
        """Pages through one listing set (`created`, or the state's own), newest first: a page
        reads about `limit` entries whatever else the store holds. Entries whose approval is
        gone are dropped from the set as they are met; a page that met many of them may come
        back short, with a cursor to go on."""
        index = self._created if state is None else self._state_key + state.value
        after = None if cursor is None else parse_cursor(cursor)
        limit = max(limit, 1)
        found: list[Approval] = []
        for _ in range(_LIST_ROUNDS):
            want = limit - len(found)
            reply: list[str] = await self._script(
                self._page,
                [index],
                ["+inf", want + 1, "0"] if after is None else [repr(after[0]), want + 1, "1"],
            )
            batch: list[tuple[float, str]] = []
            for member, score in zip(reply[::2], reply[1::2], strict=True):
                position = (float(score), member)
                if after is None or position < after:
                    batch.append(position)
            more = len(batch) > want
            del batch[want:]
            if not batch:
                return found, None
            values: list[str | None] = await self._command(
                "MGET", *(self._approval_key + approval_id for _, approval_id in batch)
            )
            gone = [i for (_, i), v in zip(batch, values, strict=True) if v is None]
            if gone:  # retention ran out: forget them in the listing set too
                await self._command("ZREM", index, *gone)
            for value in values:
                if value is not None:
                    approval = codec.loads(value)
                    # A bulk decision lists, then swaps from these values without reading.
                    self._remember(approval.id, value, approval)
                    # It may have changed state since the set was read: it is in the other now.
                    if state is None or approval.state is state:
                        found.append(approval)
            after = batch[-1]
            if not more:
                return found, None
            if len(found) >= limit:
                break
        assert after is not None  # every round read a batch
        return found, encode_cursor(*after)

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
                waiter.clear()
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
                await waiter.wait(remaining)
        finally:
            waiters = self._waiters.get(approval_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[approval_id]

    async def set_note(self, approval_id: str, name: str, value: str) -> None:
        keys = [self._approval_key + approval_id, self._notes_key + approval_id]
        if not await self._script(self._set_note, keys, [name, value]):
            raise KeyError(approval_id)

    async def get_note(self, approval_id: str, name: str) -> str | None:
        value: str | None = await self._command("HGET", self._notes_key + approval_id, name)
        return value

    async def lease(self, name: str, seconds: float) -> bool:
        """Hold the named lease for `seconds` (renewable by its holder); one replica at a time
        does periodic work such as sweeping expiries."""
        keys = [self._lease_key + name]
        return bool(await self._script(self._lease, keys, [self._owner, int(seconds * 1000)]))

    async def remember_ambiguous(self, fingerprint: str, approval_id: str) -> None:
        key = self._ambiguous_key + fingerprint
        await self._command("SET", key, approval_id, "PX", self._retention_ms)

    async def last_ambiguous(self, fingerprint: str) -> str | None:
        value: str | None = await self._command("GET", self._ambiguous_key + fingerprint)
        return value

    # -- grants --------------------------------------------------------------------------------

    def _grant_ttl_ms(self, grant: Grant) -> int:
        return max(int((grant.expires_at - time.time()) * 1000), 0) + self._retention_ms

    def _grant_of(self, fields: dict[str, str] | None) -> Grant | None:
        """A grant from its hash (None when the hash is gone)."""
        if not fields or "data" not in fields:
            return None
        grant = codec.loads_grant(fields["data"])
        revoked_at = fields.get("revoked_at")
        return replace(
            grant,
            uses_left=int(fields.get("left", grant.uses_left)),
            revoked_at=float(revoked_at) if revoked_at is not None else None,
            revoked_by=fields.get("revoked_by"),
        )

    async def add_grant(self, grant: Grant) -> bool:
        added = await self._script(
            self._add_grant,
            [
                self._grant_key + grant.id,
                self._grant_scope_key + grant.scope,
                self._grant_deadlines,
                self._grants,
            ],
            [
                grant.id,
                codec.dumps_grant(grant),
                grant.uses_left,
                repr(grant.expires_at),
                repr(grant.created_at),
                self._grant_ttl_ms(grant),
                repr(grant.created_at - self._max_age_seconds),
            ],
        )
        return bool(added)

    async def use_grant(self, scope: str, now: float) -> Grant | None:
        scope_key = self._grant_scope_key + scope
        ids: list[str] = sorted(await self._command("SMEMBERS", scope_key))
        for grant_id in ids:
            reply = await self._script(
                self._use_grant,
                [self._grant_key + grant_id, self._grant_deadlines],
                [grant_id, repr(now)],
            )
            if isinstance(reply, list):
                grant = codec.loads_grant(reply[1])
                if grant.scope != scope:  # never: the index names only grants of its scope
                    continue
                return replace(grant, uses_left=int(reply[0]))
            if reply in (-1, -2):
                # Gone, or never usable again (exhausted or revoked): the next lookup of this
                # scope need not try it. (Expired is left to its retention: clocks differ.)
                await self._command("SREM", scope_key, grant_id)
        return None

    async def get_grant(self, grant_id: str) -> Grant | None:
        fields: dict[str, str] = await self._command("HGETALL", self._grant_key + grant_id)
        return self._grant_of(_as_dict(fields))

    async def list_grants(self, limit: int = 100) -> Sequence[Grant]:
        ids: list[str] = await self._command("ZREVRANGE", self._grants, 0, max(limit, 1) - 1)
        replies = await asyncio.gather(
            *(self._command("HGETALL", self._grant_key + grant_id) for grant_id in ids)
        )
        grants: list[Grant] = []
        gone: list[str] = []
        for grant_id, fields in zip(ids, replies, strict=True):
            grant = self._grant_of(_as_dict(fields))
            if grant is None:
                gone.append(grant_id)
            else:
                grants.append(grant)
        if gone:
            await self._command("ZREM", self._grants, *gone)
        return grants

    async def revoke_grant(self, grant_id: str, by: str, now: float) -> tuple[Grant, bool]:
        done = await self._script(
            self._revoke_grant,
            [self._grant_key + grant_id, self._grant_deadlines],
            [grant_id, repr(now), by],
        )
        grant = await self.get_grant(grant_id)
        if done == -1 or grant is None:
            raise KeyError(grant_id)
        return grant, done == 1

    async def expire_grants(self, now: float, limit: int = 100) -> Sequence[Grant]:
        ids: list[str] = await self._command(
            "ZRANGEBYSCORE", self._grant_deadlines, "-inf", repr(now), "LIMIT", 0, limit
        )
        ended: list[Grant] = []
        for grant_id in ids:
            # ZREM answers 1 to exactly one caller: that one reports the expiry.
            if await self._command("ZREM", self._grant_deadlines, grant_id):
                grant = await self.get_grant(grant_id)
                if grant is not None:
                    ended.append(grant)
        return ended

    async def ping(self) -> bool:
        """Whether Redis answers; on a cluster, the node that serves the store's slot."""
        try:
            if self._cluster is not None:
                await self._command("EXISTS", self._deadlines)  # a key of the slot
                return True
            return bool(await self._redis.ping())
        except (*_REDIS_ERRORS, StoreUnavailable):
            return False

    async def aclose(self) -> None:
        if self._listener is not None:
            await stop_task(self._listener)
            self._listener = None
        self._wake_all()
        if self._pipelines:  # let commands already sent have their answers
            await asyncio.wait(set(self._pipelines), timeout=self._timeout)
        await self._redis.aclose()
        if self._subscriber is not None:
            await self._subscriber.aclose()
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                await sentinel.aclose()

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
        remembered = self._recent.get(approval_id)
        if raw and remembered is not None and _same_json(remembered[0], raw):
            # This process made the change (a bulk decision makes thousands): it knows the
            # value already, no need to decode it again.
            noticed = (raw, remembered[1])
        elif raw:
            try:
                noticed = (raw, codec.loads(raw))
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("store.unreadable_notice", approval_id=approval_id, error=str(exc))
        for waiter in waiters:
            waiter.noticed = noticed
            waiter.set()

    def _wake_all(self) -> None:
        """Every local waiter reads its approval from Redis again."""
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.noticed = None
                waiter.set()

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            connection: Any = None
            try:
                connection = await self._subscription_connection()
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
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.disconnect()

    async def _subscription_connection(self) -> Any:
        """A new connection for the subscription: to the Redis, to the master Sentinel names,
        or to a node of the cluster (the next one after each failure)."""
        if self._cluster is None:
            assert self._subscriber is not None
            return self._subscriber.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        if not self._cluster_ready:
            await self._initialize_cluster()
        nodes = self._cluster.get_nodes()
        if not nodes:
            raise StoreUnavailable("redis: no cluster node known")
        self._subscribed_node += 1
        node = nodes[self._subscribed_node % len(nodes)]
        options = {**node.connection_kwargs, "socket_timeout": None, "protocol": 2}
        return node.connection_class(**options)
