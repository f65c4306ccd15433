"""Anchors: where signed checkpoints are also kept, out of the reach of whoever administers the
audit file.

A signed checkpoint in the audit file proves what the writer signed only as long as it is still
there: an administrator who truncates the file removes its checkpoints too. So every signed
statement (checkpoints and key rotations, see `signing.py`) is also sent to each anchor of
`audit.anchors`, and `countersign audit verify --anchor URL` holds the file against the latest
statement an anchor kept. Anchors treat every statement the same: a JSON object to keep, sent
as its canonical JSON (`chain.canonical`).

Kinds, by URL scheme:

- `file:///path`: one canonical JSON line per statement, appended and fsynced (another disk, an
  append-only or WORM mount, a file only another user may read). The parent directory is made if
  missing; the file is created with mode 0640 (less the umask).
- `redis://[:password@]host:port/db?stream=KEY[&maxlen=N]` (also `rediss://`, `unix:///socket`):
  `XADD KEY * record <canonical JSON>` to a stream (default key `countersign:checkpoints`), never
  trimmed unless `maxlen` is given (then exactly `MAXLEN N`).
- `https://…` (or `http://`): a witness, a small service somebody else runs. The statement is
  POSTed as the body (`Content-Type: application/json`), signed exactly like a webhook
  (`notify/webhook.py`) when the anchor has a `secret`: `X-Countersign-Event` (`audit.checkpoint`
  or `audit.key_rotated`, from the statement's `type`; `audit.statement` for any other type),
  `X-Countersign-Timestamp` (Unix seconds) and `X-Countersign-Signature: v1=<hex HMAC-SHA256 of
  "<timestamp>.<body>">`. Any 2xx answer means kept; anything else (redirects included) is a
  failure, retried.

The witness protocol, for whoever writes one (`tests/witness.py` is a complete example):

- `POST <url>` with the body above: keep the body (a JSON object) if the signature verifies and
  the timestamp is fresh (a few minutes); answer 2xx once it is stored durably, else 4xx/5xx.
- `GET <url>`: answer 200 with every statement kept, oldest first, either as JSON lines
  (one object a line, `application/x-ndjson` or any type) or as one JSON array. A reader that has
  the secret signs the GET the same way over an empty body (`X-Countersign-Event: audit.read`);
  a witness may require it or serve its statements to anyone (they are signed and public).

Delivery (`AnchorSet`) is at least once and in order: a statement whose acknowledgement was lost
(a timeout after Redis or the witness stored it) is sent again, so a reader may see a statement
twice, never out of order. `send` never blocks and never raises: each anchor has its own bounded
queue (when full, the oldest statement not already on its way is dropped and counted: the newest
checkpoint is the one that matters) and its own task, which retries a failed delivery with
exponential backoff and jitter for as long as the process lives. The first failure of an outage
is reported once (`audit.anchor_failed`), its end once (`audit.anchor_resumed`); every failed
attempt is counted (`countersign_audit_anchor_failures_total{anchor}`).

Reading back (`read_anchor`, for the CLI: synchronous, no event loop) returns every statement an
anchor kept, oldest first. Unparseable entries (a line torn by a crash, garbage) are skipped and
described in the result's `warnings`; an anchor that cannot be read at all raises
`AnchorUnreadable`, naming it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import random
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import aiohttp
import redis
import redis.asyncio as aioredis
import redis.exceptions
import structlog

from ..notify.webhook import sign
from ..tasks import stop_task
from .chain import canonical
from .signing import CHECKPOINT_EVENT, CHECKPOINT_TYPE, KEY_ROTATED_EVENT, ROTATION_TYPE

if TYPE_CHECKING:
    from ..config import AnchorSettings

log = structlog.get_logger("countersign.audit")

ANCHOR_FAILED: Final = "audit.anchor_failed"
ANCHOR_RESUMED: Final = "audit.anchor_resumed"

DEFAULT_STREAM: Final = "countersign:checkpoints"
READ_EVENT: Final = "audit.read"
OTHER_STATEMENT_EVENT: Final = "audit.statement"
USER_AGENT: Final = "countersign-anchor/1"

_EVENTS: Final = {CHECKPOINT_TYPE: CHECKPOINT_EVENT, ROTATION_TYPE: KEY_ROTATED_EVENT}
# Query parameters whose values are shown in an anchor's name; every other value may be a
# password or token (`?password=`, `?token=`) and is shown as ***.
_SHOWN_PARAMS: Final = frozenset({"stream", "maxlen", "db"})
_REDIS_PAGE: Final = 1000  # XRANGE page size when reading a stream back


class AnchorError(Exception):
    """A delivery that failed; the message names no secret."""


class AnchorUnreadable(Exception):
    """An anchor that cannot be read back; the message names the anchor (without secrets)."""


class Anchor(Protocol):
    """One place statements are kept. `deliver` raises (any exception) when not kept."""

    @property
    def name(self) -> str: ...

    async def deliver(self, record: Mapping[str, Any]) -> None: ...

    async def aclose(self) -> None: ...


class EventHook(Protocol):
    """Where anchor outages are reported (the composition root passes `AuditLog.emit`)."""

    def __call__(self, event: str, /, **fields: Any) -> object: ...


def anchor_name(url: str) -> str:
    """`url` as shown in logs and metrics: no user or password, and only the values of
    `stream`, `maxlen` and `db` among the query parameters (the others are shown as ***)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid anchor URL>"
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(
        f"{key}={value if key in _SHOWN_PARAMS else '***'}"
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    return _unsplit(parts.scheme, netloc, parts.path, query)


def _unsplit(scheme: str, netloc: str, path: str, query: str) -> str:
    # Not urlunsplit: it drops the empty host of unix:///path (unix:/path).
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")


def _error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _describe(exc: BaseException) -> str:
    """`exc` in words, its kind included (a bare TimeoutError has no message)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _event_of(record: Mapping[str, Any]) -> str:
    kind = record.get("type")
    if not isinstance(kind, str):
        return OTHER_STATEMENT_EVENT
    return _EVENTS.get(kind, OTHER_STATEMENT_EVENT)


def _file_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme.lower() != "file" or parts.netloc not in ("", "localhost") or not parts.path:
        raise ValueError(f"not a file:///absolute/path URL: {anchor_name(url)}")
    return unquote(parts.path)


# --- the anchors -------------------------------------------------------------------------------


class FileAnchor:
    """Appends one canonical JSON line per statement to a file, fsynced, off the event loop."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.name = "file://" + self.path
        # One thread of its own: a write hung on a dead mount must not take the threads of the
        # loop's default executor, and a retry must not queue a second write behind it.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="countersign-anchor"
        )
        self._writing: asyncio.Future[None] | None = None

    @classmethod
    def from_url(cls, url: str) -> FileAnchor:
        return cls(_file_path(url))

    async def deliver(self, record: Mapping[str, Any]) -> None:
        if self._writing is not None and not self._writing.done():
            raise AnchorError(f"{self.path}: the previous write has not finished (a hung disk?)")
        line = (canonical(record) + "\n").encode("utf-8")
        self._writing = asyncio.get_running_loop().run_in_executor(
            self._executor, self._append, line
        )
        try:
            # Shielded: a timed-out attempt leaves the write running, and `_writing` remembers it.
            await asyncio.shield(self._writing)
        except OSError as exc:
            raise AnchorError(f"{self.path}: {exc.strerror or exc}") from None

    def _append(self, line: bytes) -> None:
        directory = os.path.dirname(self.path)
        if directory and not os.path.isdir(directory):
            os.makedirs(directory, mode=0o750, exist_ok=True)
        existed = os.path.exists(self.path)
        # O_RDWR, not O_WRONLY: the last byte is read back (below).
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            size = os.fstat(fd).st_size
            # A write torn by a crash or a full disk leaves a line without its newline; start
            # on a fresh line so that this statement is not glued to the torn one.
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if not existed and directory:
            # The new file's directory entry must survive a crash too.
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False)


def _redis_parts(url: str) -> tuple[str, str, int | None]:
    """The URL redis-py is given (without our own parameters), the stream key and MAXLEN."""
    parts = urlsplit(url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    ours = {key: value for key, value in params if key in ("stream", "maxlen")}
    stream = ours.get("stream") or DEFAULT_STREAM
    maxlen: int | None = None
    if ours.get("maxlen"):
        try:
            maxlen = int(ours["maxlen"])
        except ValueError:
            raise ValueError(f"maxlen must be a number: {anchor_name(url)}") from None
        if maxlen < 1:
            raise ValueError(f"maxlen must be at least 1: {anchor_name(url)}")
    rest = urlencode([(key, value) for key, value in params if key not in ("stream", "maxlen")])
    return _unsplit(parts.scheme, parts.netloc, parts.path, rest), stream, maxlen


class RedisAnchor:
    """`XADD` to a Redis stream, one field `record` holding the statement's canonical JSON."""

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self.name = anchor_name(url)
        client_url, self.stream, self.maxlen = _redis_parts(url)
        self._redis = aioredis.Redis.from_url(
            client_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    async def deliver(self, record: Mapping[str, Any]) -> None:
        try:
            await self._redis.xadd(
                self.stream,
                {"record": canonical(record)},
                maxlen=self.maxlen,
                approximate=False,  # `maxlen` is a promise of how much is kept, not a hint
            )
        except (redis.exceptions.RedisError, OSError) as exc:
            raise AnchorError(f"{self.name}: {_error_text(exc)}") from None

    async def aclose(self) -> None:
        await self._redis.aclose()


class HttpsAnchor:
    """POSTs the statement to a witness, signed like a webhook when `secret` is set."""

    def __init__(
        self,
        url: str,
        secret: str | None = None,
        session: aiohttp.ClientSession | None = None,
        *,
        timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.name = anchor_name(url)
        self._secret = secret
        self._session = session
        # Without a session given, one is made on first use (inside the running loop, as
        # aiohttp wants) and closed with the anchor.
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def deliver(self, record: Mapping[str, Any]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        body = canonical(record).encode("utf-8")
        timestamp = str(int(time.time()))  # fresh for every attempt, as the witness checks it
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Countersign-Event": _event_of(record),
            "X-Countersign-Timestamp": timestamp,
        }
        if self._secret:
            headers["X-Countersign-Signature"] = sign(self._secret, timestamp, body)
        try:
            async with self._session.post(
                self.url,
                data=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,  # a redirected POST could land anywhere, or as a GET
            ) as resp:
                if not 200 <= resp.status < 300:
                    raise AnchorError(f"{self.name}: answered HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # aiohttp's messages may hold the full URL (and its token): name the anchor instead.
            text = _describe(exc).replace(self.url, self.name)
            raise AnchorError(f"{self.name}: {text}") from None

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None


def anchor_for(
    url: str, secret: str | None = None, session: aiohttp.ClientSession | None = None
) -> Anchor:
    """The anchor of `url`'s kind (ValueError for a scheme that is none)."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "file":
        return FileAnchor.from_url(url)
    if scheme in ("redis", "rediss", "unix"):
        return RedisAnchor(url)
    if scheme in ("http", "https"):
        return HttpsAnchor(url, secret, session)
    raise ValueError(f"an anchor is a file://, redis:// or https:// URL, got {anchor_name(url)}")


# --- delivery ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AnchorStatus:
    """One anchor's delivery, for health pages and tests."""

    name: str
    pending: int  # waiting, the one being sent included
    delivered: int
    dropped: int  # dropped from a full queue, never delivered
    failing: bool


def _ignore_event(event: str, /, **fields: Any) -> None:
    return None


def _ignore_failure(anchor: str) -> None:
    return None


class _Lane:
    """One anchor's queue and the task that empties it, in order."""

    def __init__(
        self,
        anchor: Anchor,
        *,
        queue_limit: int,
        first_delay: float,
        max_delay: float,
        attempt_timeout: float,
        on_event: EventHook,
        on_failure: Callable[[str], object],
    ) -> None:
        self.anchor = anchor
        self.name = anchor.name
        self.queue: deque[dict[str, Any]] = deque()
        self.limit = queue_limit
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.attempt_timeout = attempt_timeout
        self.on_event = on_event
        self.on_failure = on_failure
        self.delivered = 0
        self.dropped = 0
        self.attempting = False
        self.task: asyncio.Task[None] | None = None
        self.wakeup = asyncio.Event()  # a record was queued
        self.flush = asyncio.Event()  # closing: stop waiting out the backoff
        self.idle = asyncio.Event()  # the queue is empty
        self.idle.set()
        # The outage under way: when it began and what it has cost so far.
        self.failing_since: float | None = None
        self.outage_delivered = 0
        self.outage_dropped = 0

    @property
    def pending(self) -> int:
        return len(self.queue)

    def push(self, record: dict[str, Any]) -> None:
        if len(self.queue) >= self.limit:
            # Drop the oldest record not already on its way (an attempt in flight completes with
            # the record it holds); the newest checkpoint is the one worth keeping.
            del self.queue[1 if self.attempting and len(self.queue) > 1 else 0]
            self.dropped += 1
            self.outage_dropped += 1
            if self.outage_dropped == 1:
                log.warning("audit.anchor_dropping", anchor=self.name, queue_limit=self.limit)
        self.queue.append(record)
        self.idle.clear()
        self.wakeup.set()

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        delay = self.first_delay
        while True:
            if not self.queue:
                self.idle.set()
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            record = self.queue[0]
            self.attempting = True
            try:
                async with asyncio.timeout(self.attempt_timeout):
                    await self.anchor.deliver(record)
            except Exception as exc:  # any failure of any anchor: retry, never die
                # Now, not only in `finally`: a full queue may drop this record during the backoff.
                self.attempting = False
                self._failed(exc)
                await self._backoff(delay)
                delay = min(delay * 2, self.max_delay)
                continue
            finally:
                self.attempting = False
            delay = self.first_delay
            if self.queue and self.queue[0] is record:
                self.queue.popleft()  # (unless a full queue dropped it while it was on its way)
            self.delivered += 1
            if self.failing_since is not None:
                self.outage_delivered += 1
                if not self.queue:
                    self._resumed()

    async def _backoff(self, delay: float) -> None:
        # Jitter: replicas that lost the same anchor do not all come back at the same instant.
        jitter = random.uniform(0.5, 1.0)
        if self.flush.is_set():
            # Closing: retry at the shortest interval while aclose's time lasts.
            await asyncio.sleep(min(delay, self.first_delay) * jitter)
            return
        # Until closing begins, which cuts the wait short: the shutdown checkpoint must not wait
        # out a 30-second backoff it does not have.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay * jitter):
                await self.flush.wait()

    def _failed(self, exc: BaseException) -> None:
        error = str(exc) if isinstance(exc, AnchorError) else f"{self.name}: {_describe(exc)}"
        self._call(self.on_failure, self.name)
        if self.failing_since is not None:
            log.debug("audit.anchor_retry_failed", anchor=self.name, error=error)
            return
        self.failing_since = time.monotonic()
        self.outage_delivered = 0
        self.outage_dropped = 0
        fields = {"anchor": self.name, "error": error, "pending": self.pending}
        log.warning(ANCHOR_FAILED, **fields)
        self._call(self.on_event, ANCHOR_FAILED, **fields)

    def _resumed(self) -> None:
        assert self.failing_since is not None
        fields: dict[str, Any] = {
            "anchor": self.name,
            "delivered": self.outage_delivered,
            "dropped": self.outage_dropped,
            "outage_seconds": round(time.monotonic() - self.failing_since, 3),
        }
        self.failing_since = None
        log.info(ANCHOR_RESUMED, **fields)
        self._call(self.on_event, ANCHOR_RESUMED, **fields)

    def _call(self, callback: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        # A callback that raises (a full disk under the audit log) must not stop the deliveries.
        try:
            callback(*args, **kwargs)
        except Exception as exc:
            log.warning("audit.anchor_callback_failed", anchor=self.name, error=str(exc))


class AnchorSet:
    """Sends every statement to every anchor, each on its own queue and task (module docstring).

    `on_event(event, **fields)` hears `audit.anchor_failed` (anchor, error, pending) once when an
    outage begins and `audit.anchor_resumed` (anchor, delivered, dropped, outage_seconds) once
    when its backlog is delivered; `on_failure(anchor)` hears every failed attempt.
    """

    def __init__(
        self,
        anchors: Sequence[Anchor],
        *,
        on_event: EventHook | None = None,
        on_failure: Callable[[str], object] | None = None,
        queue_limit: int = 10_000,
        first_delay: float = 0.5,
        max_delay: float = 30.0,
        attempt_timeout: float = 30.0,
    ) -> None:
        if queue_limit < 1:
            raise ValueError("queue_limit must be at least 1")
        self._lanes = [
            _Lane(
                anchor,
                queue_limit=queue_limit,
                first_delay=first_delay,
                max_delay=max(max_delay, first_delay),
                attempt_timeout=attempt_timeout,
                on_event=on_event or _ignore_event,
                on_failure=on_failure or _ignore_failure,
            )
            for anchor in anchors
        ]
        self._closed = False
        self._stopped = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(lane.name for lane in self._lanes)

    def __len__(self) -> int:
        return len(self._lanes)

    def status(self) -> tuple[AnchorStatus, ...]:
        return tuple(
            AnchorStatus(
                name=lane.name,
                pending=lane.pending,
                delivered=lane.delivered,
                dropped=lane.dropped,
                failing=lane.failing_since is not None,
            )
            for lane in self._lanes
        )

    def send(self, record: Mapping[str, Any]) -> None:
        """Queue `record` for every anchor; returns at once and never raises."""
        try:
            if self._closed:
                log.warning("audit.anchor_send_after_close", anchors=len(self._lanes))
                return
            copy = dict(record)  # the caller may reuse its dict; what was sent stays as it was
            for lane in self._lanes:
                lane.push(copy)
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop yet: the records wait for the first send (or aclose) in one
            for lane in self._lanes:
                lane.start()
        except Exception as exc:  # the caller is the audit writer: it must never fail because
            log.warning("audit.anchor_send_failed", error=str(exc))  # of an anchor

    async def drained(self) -> None:
        """Returns once every queue is empty (for tests; it may wait for ever)."""
        for lane in self._lanes:
            await lane.idle.wait()

    # The timeout bounds the flush only; the stop after it must still run, so no asyncio.timeout.
    async def aclose(self, timeout: float = 5.0) -> int:  # noqa: ASYNC109
        """Deliver what is queued within `timeout` seconds (the shutdown checkpoint must reach
        the anchors), then stop. Returns how many records were left undelivered (and logs it).
        Closing again does nothing but answer that number."""
        self._closed = True
        if self._stopped:
            return sum(len(lane.queue) for lane in self._lanes)
        self._stopped = True
        for lane in self._lanes:
            if lane.queue:
                lane.start()
            lane.flush.set()
        waits = [asyncio.ensure_future(lane.idle.wait()) for lane in self._lanes]
        if waits:
            _, late = await asyncio.wait(waits, timeout=max(timeout, 0.0))
            for wait in late:
                wait.cancel()
        left = 0
        for lane in self._lanes:
            if lane.task is not None:
                await stop_task(lane.task)
            if lane.queue:
                left += len(lane.queue)
                log.warning(
                    "audit.anchor_undelivered",
                    anchor=lane.name,
                    records=len(lane.queue),
                    dropped=lane.dropped,
                )
            try:
                await lane.anchor.aclose()
            except Exception as exc:
                log.warning("audit.anchor_close_failed", anchor=lane.name, error=str(exc))
        return left


def build_anchors(
    settings: Sequence[AnchorSettings],
    *,
    session: aiohttp.ClientSession | None = None,
    on_event: EventHook | None = None,
    on_failure: Callable[[str], object] | None = None,
    **options: Any,
) -> AnchorSet:
    """The `AnchorSet` of `audit.anchors`. Without `session`, https anchors make (and close) their
    own. `options` go to `AnchorSet` (queue_limit, first_delay, max_delay, attempt_timeout)."""
    anchors = [anchor_for(item.url, item.secret, session) for item in settings]
    return AnchorSet(anchors, on_event=on_event, on_failure=on_failure, **options)


# --- reading back ------------------------------------------------------------------------------


class AnchorRecords(list[dict[str, Any]]):
    """The statements an anchor kept, oldest first; `warnings` describes the entries skipped
    because they were not JSON objects (a line torn by a crash, garbage)."""

    def __init__(self) -> None:
        super().__init__()
        self.warnings: list[str] = []

    def take(self, text: str | bytes, where: str) -> None:
        try:
            value = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            self.warnings.append(f"{where}: not JSON ({exc}), skipped")
            return
        if not isinstance(value, dict):
            self.warnings.append(f"{where}: not a JSON object, skipped")
            return
        self.append(value)


def read_anchor(url: str, *, secret: str | None = None, timeout: float = 10.0) -> AnchorRecords:
    """Every statement kept at the anchor `url`, oldest first (see `AnchorRecords.warnings`).

    Synchronous (for the CLI; run it in a thread from async code). AnchorUnreadable, naming the
    anchor, if it cannot be read: a missing file, Redis down, a witness that does not answer 200.
    An empty or missing Redis stream is an empty list (Redis cannot tell them apart)."""
    scheme = url.split(":", 1)[0].lower()
    name = anchor_name(url)
    if scheme == "file":
        try:
            path = _file_path(url)
        except ValueError as exc:
            raise AnchorUnreadable(str(exc)) from None
        return _read_file(path, name)
    if scheme in ("redis", "rediss", "unix"):
        return _read_redis(url, name, timeout)
    if scheme in ("http", "https"):
        return _read_http(url, name, secret, timeout)
    raise AnchorUnreadable(f"an anchor is a file://, redis:// or https:// URL, got {name}")


def _read_file(path: str, name: str) -> AnchorRecords:
    records = AnchorRecords()
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    records.take(line, f"{name} line {number}")
    except OSError as exc:
        raise AnchorUnreadable(f"cannot read anchor {name}: {exc.strerror or exc}") from None
    return records


def _read_redis(url: str, name: str, timeout: float) -> AnchorRecords:
    try:
        client_url, stream, _ = _redis_parts(url)
    except ValueError as exc:
        raise AnchorUnreadable(str(exc)) from None
    records = AnchorRecords()
    client = redis.Redis.from_url(
        client_url, socket_timeout=timeout, socket_connect_timeout=timeout
    )
    try:
        low = "-"
        while True:
            page = client.xrange(stream, min=low, max="+", count=_REDIS_PAGE) or []
            last = ""
            for entry_id, fields in page:
                last = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                where = f"{name} entry {last}"
                value = (fields or {}).get(b"record")
                if value is None:
                    records.warnings.append(f"{where}: no `record` field, skipped")
                    continue
                records.take(value, where)
            if len(page) < _REDIS_PAGE:
                return records
            low = "(" + last  # exclusive (Redis 6.2+): the page after the last entry read
    except (redis.exceptions.RedisError, OSError) as exc:
        raise AnchorUnreadable(f"cannot read anchor {name}: {_error_text(exc)}") from None
    finally:
        client.close()


def _read_http(url: str, name: str, secret: str | None, timeout: float) -> AnchorRecords:
    headers = {"Accept": "application/x-ndjson, application/json", "User-Agent": USER_AGENT}
    if secret:
        timestamp = str(int(time.time()))
        headers["X-Countersign-Event"] = READ_EVENT
        headers["X-Countersign-Timestamp"] = timestamp
        headers["X-Countersign-Signature"] = sign(secret, timestamp, b"")
    request = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status = resp.status
            body: bytes = resp.read()
    except urllib.error.HTTPError as exc:
        raise AnchorUnreadable(f"anchor {name} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        text = str(reason) or type(reason).__name__
        raise AnchorUnreadable(f"cannot read anchor {name}: {text.replace(url, name)}") from None
    if status != 200:
        raise AnchorUnreadable(f"anchor {name} answered HTTP {status}")
    records = AnchorRecords()
    if body.lstrip().startswith(b"["):
        try:
            items = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AnchorUnreadable(f"anchor {name} answered a broken JSON array: {exc}") from None
        for number, item in enumerate(items, 1):
            if isinstance(item, dict):
                records.append(item)
            else:
                records.warnings.append(f"{name} item {number}: not a JSON object, skipped")
        return records
    for number, line in enumerate(body.splitlines(), 1):
        if line.strip():
            records.take(line, f"{name} line {number}")
    return records
