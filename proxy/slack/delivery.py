"""Delivering approval messages to Slack: one message per approval, kept in step with its state.

`SlackNotifier.notify` never talks to Slack itself: it marks the approval's message as due and
waits for the channel's worker. The worker takes due messages in order (an update never overtakes
the post it updates: they are one entry) and brings each in step with the approval as the store
has it *now*: posts it when it is not posted yet (keeping where it is, channel and ts, as a store
note, so whichever replica sees the next event can update it), then chat.update until it shows the
stored state. Events that race (two decisions on two replicas, a decision made while Slack was
down) converge on the latest state instead of leaving a stale message.

When Slack cannot be reached (connection errors, the ~10 s per-call timeout, 429, 5xx) the worker
waits (`Retry-After` when Slack gives one, else exponential backoff, both with jitter) and tries
again: for as long as the approval is pending, and `retry_seconds` longer once it is not, so the
final state is shown once Slack is back. When Slack refuses the payload itself (`invalid_blocks`,
`msg_too_long`), a minimal message with the link to the approval is sent instead and counted
(`on_fallback`). A delivery that gives up raises `GaveUp` to the hub, which logs and counts it
(`countersign_notify_failures_total{channel="slack"}`).

Once the message shows the stored state, the worker says in its thread what it has not said yet:
each decision, the grant the approval made, how it ended; and tells the agent's owner by direct
message once it is decided. Each is said once across replicas (`_once`: a store note records it,
a store lease picks the replica that says it). One timer per notifier (not a task per approval)
posts the reminder before expiry, through the same `_once`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from ..audit.redact import DEFAULT as DEFAULT_REDACTOR
from ..audit.redact import Redactor
from ..model import Approval, ApprovalState
from ..model.grant import Grant
from ..model.persons import canonical_email
from ..notify import REQUESTED
from ..notify.once import SaidOnce
from ..notify.reminders import (
    REMINDER_BEFORE,
    REMINDER_MIN_LIFETIME,
    Reminders,
    still_deciding,
)
from ..notify.retry import GaveUp, wait_for
from ..notify.retry import with_retries as shared_with_retries
from ..store.base import Store, StoreUnavailable
from .blocks import (
    approval_blocks,
    decision_reply,
    fallback_text,
    grant_reply,
    minimal_text,
    outcome_reply,
    owner_message,
    reminder_reply,
)
from .mrkdwn import literal

log = structlog.get_logger("countersign.slack")

MESSAGE_NOTE = "slack.message"
# What was said once per approval (a thread reply, the reminder, the owner's message) is kept as
# a note named `slack.once.<key>` (its ts, or why it was skipped), so no replica says it again.
ONCE_NOTE = "slack.once."  # what SaidOnce keeps (see proxy/notify/once.py)
MAX_MENTIONS = 20
# users.lookupByEmail answers (found or not), kept this long, at most this many.
LOOKUP_TTL = 3600.0
_LOOKUP_CACHE = 2000
_USER_ID = re.compile(r"[UW][A-Z0-9]{2,40}")
# Per Web API call: slack_sdk's own client timeout, and this bound around every call.
CALL_TIMEOUT = 10.0
MAX_DELAY = 30.0
# Re-renders after a post or update when the approval changed meanwhile; a bound, not a loop.
_MAX_CONVERGE = 5

# Slack's answers that mean "not now" (HTTP 200 with ok: false), "not this payload", and what
# the payload's owner must fix.
_TRANSIENT = {"ratelimited", "internal_error", "fatal_error", "service_unavailable",
              "request_timeout"}  # fmt: skip
REFUSED_PAYLOAD = {"invalid_blocks", "invalid_blocks_format", "msg_too_long",
                   "too_many_attachments", "invalid_attachments", "no_text"}  # fmt: skip
_EXPLAINED = {
    "not_in_channel": "the bot is not in channel {channel}: /invite @{bot} there",
    "channel_not_found": "channel {channel} does not exist or the bot cannot see it: check "
    "notify.slack.channel (use the channel's id, e.g. C0123) and /invite @{bot} there",
    "is_archived": "channel {channel} is archived: unarchive it or set notify.slack.channel",
    "invalid_auth": "Slack refuses the bot token (invalid_auth): check notify.slack.bot_token",
    "not_authed": "no bot token was sent (not_authed): check notify.slack.bot_token",
    "token_revoked": "the bot token was revoked: reinstall the app, update notify.slack.bot_token",
    "account_inactive": "the bot token belongs to a deactivated app or user: reinstall the app",
    "missing_scope": "the app lacks a scope it needs ({needed}): add it to the app and reinstall",
}


def slack_error(exc: BaseException) -> str | None:
    """Slack's `error` code of a refused call ("channel_not_found"), when it gave one."""
    if not isinstance(exc, SlackApiError):
        return None
    data = exc.response.data
    error = data.get("error") if isinstance(data, dict) else None
    return str(error) if error else None


def explain(exc: BaseException, channel: str = "?", bot: str = "countersign") -> str:
    """One sentence saying what is wrong, with the fix when we know it."""
    error = slack_error(exc)
    if error in _EXPLAINED:
        data = exc.response.data if isinstance(exc, SlackApiError) else {}
        needed = data.get("needed", "?") if isinstance(data, dict) else "?"
        return _EXPLAINED[error].format(channel=channel, bot=bot, needed=needed)
    if error:
        return error
    if isinstance(exc, SlackApiError):
        return f"HTTP {exc.response.status_code}"
    return str(exc) or type(exc).__name__


def retryable(exc: BaseException) -> bool:
    """Slack (or the store) did not answer usefully now; the same call may work later."""
    if isinstance(exc, SlackApiError):
        status: int = exc.response.status_code
        return status == 429 or status >= 500 or slack_error(exc) in _TRANSIENT
    return isinstance(exc, aiohttp.ClientError | TimeoutError | ConnectionError | StoreUnavailable)


def retry_after(exc: BaseException) -> float | None:
    """Seconds Slack asked us to wait (`Retry-After` of a 429), if it said."""
    if not isinstance(exc, SlackApiError):
        return None
    for name, value in (exc.response.headers or {}).items():
        if str(name).lower() == "retry-after":
            try:
                return max(float(value), 0.0)
            except (TypeError, ValueError):
                return None
    return None


def next_delay(exc: BaseException, backoff: float) -> float:
    """How long to wait before the next try: Slack's `Retry-After` when it gave one, else the
    backoff; plus up to 20% jitter, so replicas and channels do not retry in lockstep."""
    return wait_for(exc, backoff, retry_after, jitter=0.2)


async def with_retries(
    call: Callable[[], Awaitable[Any]],
    *,
    what: str,
    retry_seconds: float,
    first_delay: float,
    call_timeout: float = CALL_TIMEOUT,
) -> Any:
    """Await `call()` (each try bounded by `call_timeout`) until it succeeds; retryable errors are
    retried (honouring `Retry-After`) until `retry_seconds` have passed, then `GaveUp`. The
    shared mechanism of `notify.retry`, with Slack's notion of retryable and its explanations."""
    return await shared_with_retries(
        call,
        what=what,
        retry_seconds=retry_seconds,
        first_delay=first_delay,
        retryable=retryable,
        retry_after=retry_after,
        call_timeout=call_timeout,
        describe=explain,
        jitter=0.2,
        max_delay=MAX_DELAY,
    )


# Causes of a failure that say Slack itself did not answer usefully (not the store).
_SLACK_UNREACHABLE = (SlackApiError, aiohttp.ClientError, TimeoutError)


class SlackHealth:
    """What readyz reports for Slack: "ok" or "down", from the freshest evidence - the last
    delivery's outcome or an `auth.test` call. `auth.test` runs only when nothing newer than
    `ttl` seconds is known, bounded by `timeout`: probes stay cheap and never hammer Slack."""

    def __init__(self, client: AsyncWebClient, *, ttl: float = 30.0, timeout: float = 1.5):
        self._client = client
        self._ttl = ttl
        self._timeout = timeout
        self._seen: tuple[float, bool] | None = None  # (monotonic time, reachable)
        self._who: dict[str, Any] | None = None  # the last auth.test answer
        self._lock = asyncio.Lock()

    def record(self, ok: bool) -> None:
        self._seen = (time.monotonic(), ok)

    def _stale(self) -> bool:
        return self._seen is None or time.monotonic() - self._seen[0] >= self._ttl

    async def auth_test(self, call_timeout: float | None = None) -> dict[str, Any]:
        """Slack's `auth.test` answer, recorded as evidence; a fresh one is reused (the start-up
        check and readyz share it). Raises what the call raised."""
        async with self._lock:  # concurrent probes share one auth.test
            if self._who is not None and not self._stale() and self._seen and self._seen[1]:
                return self._who
            try:
                async with asyncio.timeout(call_timeout or self._timeout):
                    resp = await self._client.auth_test()
            except Exception:
                self.record(False)
                raise
            self.record(True)
            self._who = dict(resp.data) if isinstance(resp.data, dict) else {}
            return self._who

    async def state(self) -> str:
        if self._stale():
            with contextlib.suppress(Exception):
                await self.auth_test()
        return "ok" if self._seen is not None and self._seen[1] else "down"


@dataclass(eq=False)
class _Due:
    """One approval whose message must be brought in step with its state."""

    approval: Approval  # the latest we know
    post: bool  # `approval.requested` was seen here: post the message if it is not posted
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    generation: int = 0  # bumped by every event, so one arriving mid-sync is not lost
    ref: tuple[str, str] | None = None  # (channel, ts) once known
    saved: bool = False  # the reference is in the store
    shown: Approval | None = None  # what the message shows, when we know
    failing_since: float | None = None  # monotonic; set while failing after it left pending


class SlackNotifier:
    def __init__(
        self,
        client: AsyncWebClient,
        channel: str,
        store: Store,
        *,
        public_url: str | None = None,
        redactor: Redactor = DEFAULT_REDACTOR,
        retry_seconds: float = 24 * 3600.0,
        first_delay: float = 0.5,
        max_delay: float = MAX_DELAY,
        call_timeout: float = CALL_TIMEOUT,
        health: SlackHealth | None = None,
        on_fallback: Callable[[], None] | None = None,
        reminder_min_lifetime: float = REMINDER_MIN_LIFETIME,
    ) -> None:
        self._client = client
        self._channel = channel
        self._store = store
        self._public_url = public_url
        self._redactor = redactor
        # How long to keep trying once the approval is no longer pending (while it is pending,
        # there is no limit: someone may still decide it). A day: a Slack outage ends well
        # within it, and then the message shows how the request ended.
        self._retry_seconds = retry_seconds
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._call_timeout = call_timeout
        self._health = health
        self._on_fallback = on_fallback
        # The channel's queue: approval id -> what is due, in the order it became due.
        self._due: dict[str, _Due] = {}
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._reminders = Reminders(
            self._remind, name=f"slack-reminders-{channel}", min_lifetime=reminder_min_lifetime
        )
        self._background: set[asyncio.Task[None]] = set()
        self._said_once = SaidOnce(
            store,
            channel="slack",
            lease_seconds=retry_seconds + 600,
            retryable=retryable,
            describe=explain,
        )
        # Slack user ids by email (None: not on Slack) with when the answer goes stale.
        self._users: OrderedDict[str, tuple[str | None, float]] = OrderedDict()

    async def notify(self, event: str, approval: Approval) -> None:
        """Mark the approval's message due and wait until it shows this event (or later). Raises
        `GaveUp` when the delivery gives up: the hub logs and counts it."""
        due = self._due.get(approval.id)
        if due is None:
            due = self._due[approval.id] = _Due(approval=approval, post=event == REQUESTED)
        else:
            due.approval = approval
            due.post = due.post or event == REQUESTED
        due.generation += 1
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        due.waiters.append(done)
        self._schedule_reminder(approval)
        self._wake.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name=f"slack-{self._channel}")
        await done

    # -- the channel's worker -------------------------------------------------------------------

    async def _work(self) -> None:
        backoff = self._first_delay
        while True:
            if not self._due:
                self._wake.clear()
                await self._wake.wait()
                continue
            due = next(iter(self._due.values()))
            generation, waiting = due.generation, len(due.waiters)
            try:
                await self._sync(due)
            except Exception as exc:
                if self._health is not None and isinstance(exc, _SLACK_UNREACHABLE):
                    self._health.record(False)
                if retryable(exc) and not self._expired(due):
                    delay = next_delay(exc, backoff)
                    log.info(
                        "slack.retrying",
                        approval_id=due.approval.id,
                        error=explain(exc, self._channel),
                        delay=round(delay, 2),
                    )
                    await asyncio.sleep(delay)
                    backoff = min(backoff * 2, self._max_delay)
                    continue
                self._finish(due, GaveUp(self._gave_up(exc)), len(due.waiters))
                continue
            backoff = self._first_delay
            due.failing_since = None
            if self._health is not None:
                self._health.record(True)
            if due.generation == generation:
                self._finish(due, None, len(due.waiters))
            else:  # an event arrived meanwhile: answer the earlier ones, go round once more
                self._finish(due, None, waiting, keep=True)

    def _gave_up(self, exc: BaseException) -> str:
        return f"slack: {explain(exc, self._channel)}"

    def _finish(self, due: _Due, error: GaveUp | None, count: int, *, keep: bool = False) -> None:
        answered, due.waiters = due.waiters[:count], due.waiters[count:]
        if not keep:
            self._due.pop(due.approval.id, None)
        else:  # to the back of the queue: others go first
            self._due.pop(due.approval.id, None)
            self._due[due.approval.id] = due
        for waiter in answered:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)
        if not keep and due.waiters:  # should not happen; never leave a caller waiting
            for waiter in due.waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _expired(self, due: _Due) -> bool:
        """Whether to stop trying: never while the approval can still be decided; then after
        `retry_seconds` of failures."""
        approval = due.approval
        if approval.state is ApprovalState.PENDING and time.time() < approval.expires_at:
            return False
        now = time.monotonic()
        if due.failing_since is None:
            due.failing_since = now
        return now - due.failing_since >= self._retry_seconds

    # -- one message ----------------------------------------------------------------------------

    async def _sync(self, due: _Due) -> None:
        """Post (when due and not posted) and update the message until it shows the stored
        state. Raises on the first failure; the worker decides whether to try again."""
        approval_id = due.approval.id
        if due.ref is None:
            due.ref = await self._message_ref(approval_id)
            due.saved = due.ref is not None
        if due.ref is None:
            if not due.post:
                # Not posted yet (or by another replica that has not saved the reference):
                # the poster re-reads the approval once it has, so this event is not lost.
                return
            due.approval = await self._latest(due.approval)
            shown = due.approval
            resp = await self._send("chat.postMessage", shown, None)
            due.ref = (str(resp["channel"]), str(resp["ts"]))
            due.shown = shown
        if not due.saved:  # posted here: a failed save is retried, never a second post
            await self._save_ref(approval_id, due.ref)
            due.saved = True
        await self._converge(due)
        await self._follow_up(due.shown or due.approval, due.ref)

    async def _save_ref(self, approval_id: str, ref: tuple[str, str]) -> None:
        saved = await self._store.get_note(approval_id, MESSAGE_NOTE)
        if saved is not None:
            return
        try:
            await self._store.set_note(
                approval_id, MESSAGE_NOTE, json.dumps({"channel": ref[0], "ts": ref[1]})
            )
        except KeyError:
            return  # the approval is gone from the store: nothing will update it

    async def _converge(self, due: _Due) -> None:
        assert due.ref is not None
        for _ in range(_MAX_CONVERGE):
            current = await self._store.get(due.approval.id)
            if current is None or current == due.shown:
                return
            due.approval = current
            await self._send("chat.update", current, due.ref)
            due.shown = current

    async def _latest(self, approval: Approval) -> Approval:
        """The approval as stored now; what we were told if the store cannot say."""
        try:
            return await self._store.get(approval.id) or approval
        except StoreUnavailable:
            return approval

    async def _message_ref(self, approval_id: str) -> tuple[str, str] | None:
        raw = await self._store.get_note(approval_id, MESSAGE_NOTE)
        if raw is None:
            return None
        ref = json.loads(raw)
        return str(ref["channel"]), str(ref["ts"])

    async def _grant_of(self, approval: Approval) -> Grant | None:
        """The grant the approval made, as the store has it now (its uses left)."""
        if approval.grant_id is None:
            return None
        return await self._store.get_grant(approval.grant_id)

    async def _send(self, method: str, approval: Approval, ref: tuple[str, str] | None) -> Any:
        """One chat.postMessage / chat.update of the full message; when Slack refuses the
        payload itself, the minimal message with the link instead (and counted)."""
        grant = await self._grant_of(approval)
        try:
            return await self._call(
                ref,
                text=fallback_text(approval, self._redactor),
                blocks=approval_blocks(approval, self._public_url, self._redactor, grant),
            )
        except SlackApiError as exc:
            if slack_error(exc) not in REFUSED_PAYLOAD:
                raise
            log.warning(
                "slack.message_refused",
                approval_id=approval.id,
                slack_method=method,
                error=slack_error(exc),
            )
        resp = await self._call(ref, text=minimal_text(approval, self._public_url), blocks=[])
        if self._on_fallback is not None:
            self._on_fallback()
        return resp

    async def _call(
        self, ref: tuple[str, str] | None, *, text: str, blocks: list[dict[str, Any]]
    ) -> Any:
        async with asyncio.timeout(self._call_timeout):
            if ref is None:
                return await self._client.chat_postMessage(
                    channel=self._channel,
                    text=text,
                    blocks=blocks or None,
                    unfurl_links=False,
                    unfurl_media=False,
                )
            return await self._client.chat_update(
                channel=ref[0], ts=ref[1], text=text, blocks=blocks
            )

    # -- the thread: decisions, the grant, the outcome; the owner's direct message ---------------

    async def _follow_up(self, approval: Approval, ref: tuple[str, str]) -> None:
        """Say once, in the message's thread, each decision, the grant it made and how it
        ended; and tell the agent's owner once it is decided. A retryable failure raises at
        once (the worker tries the whole sync again: what was said is not said twice); other
        failures are recorded and raised after the rest was tried."""
        steps: list[tuple[str, Callable[[], Awaitable[str]]]] = []
        for index in range(len(approval.decisions)):
            text = decision_reply(approval, index, self._redactor)
            steps.append((f"decision.{index}", self._replier(ref, text)))
        if approval.grant_id is not None:
            grant = await self._grant_of(approval)
            text_or_none = grant_reply(approval, grant, self._redactor)
            if text_or_none is not None:
                steps.append(("grant", self._replier(ref, text_or_none)))
        ended = outcome_reply(approval, self._redactor)
        if ended is not None:
            steps.append(("outcome", self._replier(ref, ended)))
        if approval.state is not ApprovalState.PENDING and approval.requester.owner:
            steps.append(("owner", lambda: self._tell_owner(approval)))
        failed: BaseException | None = None
        for key, act in steps:
            try:
                await self._said_once.say(approval.id, key, act)
            except Exception as exc:
                if retryable(exc):
                    raise
                failed = failed or exc
        if failed is not None:
            raise failed

    def _replier(self, ref: tuple[str, str], text: str) -> Callable[[], Awaitable[str]]:
        async def reply() -> str:
            async with asyncio.timeout(self._call_timeout):
                resp = await self._client.chat_postMessage(
                    channel=ref[0],
                    thread_ts=ref[1],
                    text=text,
                    unfurl_links=False,
                    unfurl_media=False,
                )
            return str(resp.get("ts") or "posted")

        return reply

    async def _tell_owner(self, approval: Approval) -> str:
        """A direct message to the agent's owner: what became of its request. Skipped (said at
        debug) when the owner has no Slack account in this workspace."""
        owner = canonical_email(approval.requester.owner)
        user_id = await self.slack_user(owner) if owner else None
        if user_id is None:
            log.debug("slack.owner_not_on_slack", approval_id=approval.id)
            return "skipped: the owner is not on Slack"
        async with asyncio.timeout(self._call_timeout):
            opened = await self._client.conversations_open(users=user_id)
        channel = str((opened.get("channel") or {}).get("id") or "")
        async with asyncio.timeout(self._call_timeout):
            resp = await self._client.chat_postMessage(
                channel=channel,
                text=owner_message(approval, self._public_url, self._redactor),
                unfurl_links=False,
                unfurl_media=False,
            )
        return str(resp.get("ts") or "posted")

    async def slack_user(self, email: str) -> str | None:
        """The Slack user id of `email` (users.lookupByEmail, cached), or None when nobody in
        the workspace has it (or only a bot or a deactivated account). Raises on other
        errors."""
        email = email.lower()
        cached = self._users.get(email)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        try:
            async with asyncio.timeout(self._call_timeout):
                resp = await self._client.users_lookupByEmail(email=email)
            found: dict[str, Any] = resp.get("user") or {}
            user_id: str | None = str(found.get("id") or "")
            if found.get("deleted") or found.get("is_bot") or not _USER_ID.fullmatch(user_id or ""):
                user_id = None
        except SlackApiError as exc:
            if slack_error(exc) not in ("users_not_found", "user_not_found"):
                raise
            user_id = None
        self._users[email] = (user_id, time.monotonic() + LOOKUP_TTL)
        self._users.move_to_end(email)
        while len(self._users) > _LOOKUP_CACHE:
            self._users.popitem(last=False)
        return user_id

    # -- the reminder ---------------------------------------------------------------------------

    def _schedule_reminder(self, approval: Approval) -> None:
        """Remind approvers once before a pending approval expires (one timer for all)."""
        if not self._said_once.known(approval.id, "reminder"):
            self._reminders.schedule(approval)

    async def _remind(self, approval_id: str) -> None:
        try:
            await with_retries(
                lambda: self._remind_once(approval_id),
                what="reminder",
                retry_seconds=REMINDER_BEFORE,
                first_delay=self._first_delay,
                call_timeout=self._call_timeout * (MAX_MENTIONS + 3),  # the lookups, then the post
            )
        except GaveUp as exc:
            log.warning("slack.reminder_failed", approval_id=approval_id, error=str(exc))

    async def _remind_once(self, approval_id: str) -> None:
        approval = await self._store.get(approval_id)
        if approval is None or approval.state is not ApprovalState.PENDING:
            return
        if time.time() >= approval.expires_at:
            return
        ref = await self._message_ref(approval_id)
        if ref is None:
            return  # never posted: nothing to reply to (the post itself is being retried)

        async def remind() -> str:
            text = await self._reminder_text(approval)
            return await self._replier(ref, text)()

        await self._said_once.say(approval_id, "reminder", remind)

    async def _reminder_text(self, approval: Approval) -> str:
        """Who may still decide: people named by the rule or its groups' directory who have
        not approved yet (never the requester or the owner), as `<@U…>` when Slack knows
        their email, else the email; never a broadcast."""
        candidates = still_deciding(approval)
        mentions: list[str] = []
        for email in candidates[:MAX_MENTIONS]:
            try:
                user_id = await self.slack_user(email)
            except Exception as exc:  # named by email instead: a reminder is still a reminder
                log.debug("slack.lookup_failed", error=explain(exc))
                user_id = None
            mentions.append(f"<@{user_id}>" if user_id else literal(email, 200, self._redactor))
        if len(candidates) > MAX_MENTIONS:
            mentions.append(f"and {len(candidates) - MAX_MENTIONS} more")
        return reminder_reply(approval, mentions, list(approval.approver_groups), self._redactor)

    async def aclose(self) -> None:
        await self._reminders.aclose()
        for task in self._background:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
        for due in self._due.values():
            for waiter in due.waiters:
                waiter.cancel()
        self._due.clear()


async def check_setup(
    client: AsyncWebClient,
    channel: str | None,
    *,
    health: SlackHealth | None = None,
    call_timeout: float = CALL_TIMEOUT,
) -> list[str]:
    """What is wrong with the Slack setup, each as one sentence (an empty list: nothing), logged
    as it is found: the token (`auth.test`) and, when a channel is set, that the bot is in it
    (`conversations.info`). Never raises: Slack being down at start-up is said, not fatal."""
    problems: list[str] = []
    bot = "countersign"
    try:
        if health is not None:
            who: Any = await health.auth_test(call_timeout)
        else:
            async with asyncio.timeout(call_timeout):
                who = await client.auth_test()
        bot = str(who.get("user") or bot)
    except Exception as exc:
        problem = (
            f"cannot reach Slack to check the setup ({explain(exc)}); messages wait until it is "
            "back"
            if retryable(exc)
            else explain(exc, channel or "?", bot)
        )
        log.warning("slack.setup_problem", problem=problem)
        return [problem]
    if channel:
        try:
            async with asyncio.timeout(call_timeout):
                info = await client.conversations_info(channel=channel)
            found: dict[str, Any] = info.get("channel") or {}
            if found.get("is_archived"):
                problems.append(_EXPLAINED["is_archived"].format(channel=channel))
            elif found.get("is_member") is False:
                problems.append(_EXPLAINED["not_in_channel"].format(channel=channel, bot=bot))
        except Exception as exc:
            if slack_error(exc) == "missing_scope":
                problems.append(
                    f"cannot check that the bot is in channel {channel}: the app lacks the "
                    "channels:read (or groups:read) scope; add it, or make sure the bot was "
                    f"invited (/invite @{bot})"
                )
            else:
                problems.append(explain(exc, channel, bot))
    for problem in problems:
        log.warning("slack.setup_problem", problem=problem)
    if not problems:
        log.info("slack.setup_ok", bot=bot, channel=channel)
    return problems
