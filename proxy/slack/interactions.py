"""What a click in Slack does: acknowledged at once, decided right after.

The bolt app (`slack.app`, HTTP and Socket Mode alike) hands each verified interaction here.
`ack_*` answers Slack at once (within its 3 s) from the payload alone - the only thing a click
must hear is a modal's validation error - and the work runs after, in the background: the
clicker becomes an `Identity` from `users.info` (their workspace profile email), and
`ApprovalService.decide` authorizes them exactly like an API approver (rule users, groups from the
`approvals.groups` directory, zero self-approval, quorum). A refused click gets an ephemeral
explanation and changes nothing; the message itself is updated by the notifier, from whichever
replica made the decision. A slow `users.info` delays the decision, never the acknowledgement.

Duplicate deliveries (Slack retrying, the same payload twice) are ignored: each delivery is
remembered as a note on its approval, and the store refuses double decisions anyway.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

import structlog
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from ..approvals.service import ApprovalService
from ..audit import AuditUnavailable
from ..model import Approval, ApprovalState, Identity, Verdict, state
from ..notify.retry import GaveUp
from ..store.base import StoreUnavailable
from .blocks import (
    APPROVE,
    APPROVE_GRANT,
    APPROVE_WITH_NOTE,
    DENY,
    GRANT_TIME_BLOCK,
    GRANT_TIME_INPUT,
    GRANT_USES_BLOCK,
    GRANT_USES_INPUT,
    REASON_BLOCK,
    REASON_INPUT,
    grant_bounds,
    grant_modal,
    reason_modal,
)
from .delivery import with_retries

log = structlog.get_logger("countersign.slack")

_ACTIONS = (APPROVE, APPROVE_WITH_NOTE, APPROVE_GRANT, DENY)
_MODALS = (APPROVE_WITH_NOTE, APPROVE_GRANT, DENY)


class Refused(Exception):
    """The click cannot count; the message is shown to the clicker only."""


class SlackActions:
    def __init__(
        self,
        client: AsyncWebClient,
        service: ApprovalService,
        directory: Mapping[str, Sequence[str]],
        *,
        ephemeral_retry_seconds: float = 30.0,
        modal_wait_seconds: float = 1.5,
    ) -> None:
        self._client = client
        self._service = service
        self._directory = directory
        self._ephemeral_retry = ephemeral_retry_seconds
        self._modal_wait = modal_wait_seconds
        self._team_id: str | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def handle(self, payload: Mapping[str, Any]) -> dict[str, Any] | None:
        """Acknowledge one interaction at once and do its work in the background; the return
        value (if any) is the JSON answer to Slack."""
        kind = payload.get("type")
        if kind == "block_actions":
            self.ack_block_action(payload)
        elif kind == "view_submission":
            return self.ack_view_submission(payload)
        return None

    def ack_block_action(self, payload: Mapping[str, Any]) -> None:
        """A button: nothing to answer; the work runs after."""
        actions = [a for a in payload.get("actions") or () if a.get("action_id") in _ACTIONS]
        if actions:
            self._spawn(self._block_action(payload, actions[0]))

    def ack_view_submission(self, payload: Mapping[str, Any]) -> dict[str, Any] | None:
        """A modal's submit: a denial without a reason is answered with the modal's error (the
        one check that needs nothing but the payload); anything else closes the modal and is
        decided after."""
        view = payload.get("view") or {}
        callback = view.get("callback_id")
        if callback not in _MODALS:
            return None
        if callback == DENY and not _reason(view):
            return {
                "response_action": "errors",
                "errors": {REASON_BLOCK: "A denial needs a reason."},
            }
        if callback == APPROVE_GRANT:
            errors = _grant_errors(view)
            if errors:  # shown in the modal; nothing is decided
                return {"response_action": "errors", "errors": errors}
        self._spawn(self._view_submission(payload))
        return None  # closes the modal

    # -- the work after the acknowledgement ------------------------------------------------------

    async def _block_action(self, payload: Mapping[str, Any], action: Mapping[str, Any]) -> None:
        approval_id = str(action.get("value", ""))
        user_id = str(payload.get("user", {}).get("id", ""))
        channel = str((payload.get("channel") or {}).get("id", ""))
        delivery = f"{user_id}:{action.get('action_ts')}"
        try:
            if not await self._first_delivery(approval_id, delivery):
                return
            if action["action_id"] == APPROVE:
                await self._decide(approval_id, await self.identify(user_id), Verdict.APPROVE, None)
                return
            # The modals ask for a reason. Say "no" before asking when we know it in time; the
            # modal must open within Slack's trigger window (3 s), so a slow lookup opens it
            # anyway and the submission is checked like any decision.
            identifying = asyncio.ensure_future(self.identify(user_id))
            identifying.add_done_callback(_consume)
            try:
                identity: Identity | None = await asyncio.wait_for(
                    asyncio.shield(identifying), self._modal_wait
                )
            except TimeoutError:
                identity = None
            approval = await self._service.get(approval_id)
            if approval is None:
                raise Refused("this approval no longer exists")
            if approval.state is not ApprovalState.PENDING:
                raise Refused(f"this approval is already {approval.state.value}")
            if identity is not None:
                state.check_approver(approval, identity, self._directory)
            view = self._modal(str(action["action_id"]), approval, channel)
            await self._client.views_open(trigger_id=str(payload.get("trigger_id")), view=view)
        except (Refused, state.ApprovalError) as exc:
            self._tell(channel, user_id, _explain(exc))
        except (StoreUnavailable, AuditUnavailable, SlackApiError, GaveUp, TimeoutError) as exc:
            log.warning("slack.action_failed", approval_id=approval_id, error=str(exc))
            self._tell(channel, user_id, "Countersign could not record that right now; try again.")

    def _modal(self, action_id: str, approval: Approval, channel: str) -> dict[str, Any]:
        redactor = self._service.redactor
        metadata: dict[str, Any] = {"approval_id": approval.id, "channel": channel}
        if action_id != APPROVE_GRANT:
            return reason_modal(action_id, approval, json.dumps(metadata), redactor)
        bounds = grant_bounds(approval)
        if bounds is None:
            raise Refused("this rule does not offer grants")
        # The bounds travel with the modal: its submission is checked from the payload alone,
        # within Slack's 3 s (the decision checks them again against the approval).
        metadata["grant"] = list(bounds)
        return grant_modal(approval, json.dumps(metadata), redactor)

    async def _view_submission(self, payload: Mapping[str, Any]) -> None:
        view = payload.get("view") or {}
        try:
            metadata = json.loads(view.get("private_metadata") or "{}")
        except ValueError:
            return
        approval_id = str(metadata.get("approval_id", ""))
        channel = str(metadata.get("channel", ""))
        user_id = str(payload.get("user", {}).get("id", ""))
        reason = _reason(view)
        verdict = Verdict.DENY if view.get("callback_id") == DENY else Verdict.APPROVE
        grant = _grant(view) if view.get("callback_id") == APPROVE_GRANT else None
        # A resubmission after a validation error is a new delivery: only remembered once valid.
        delivery = f"{user_id}:view:{view.get('id')}"
        try:
            if await self._first_delivery(approval_id, delivery):
                identity = await self.identify(user_id)
                await self._decide(approval_id, identity, verdict, reason, grant)
        except (Refused, state.ApprovalError) as exc:
            self._tell(channel, user_id, _explain(exc))
        except (StoreUnavailable, AuditUnavailable, SlackApiError, GaveUp, TimeoutError) as exc:
            log.warning("slack.action_failed", approval_id=approval_id, error=str(exc))
            self._tell(channel, user_id, "Countersign could not record that right now; try again.")

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        async def guarded() -> None:
            try:
                await work
            except Exception as exc:  # e.g. Slack unreachable mid-way: said, not raised
                log.warning("slack.action_failed", error=str(exc) or type(exc).__name__)

        task = asyncio.create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- parts --------------------------------------------------------------------------------

    async def _first_delivery(self, approval_id: str, delivery: str) -> bool:
        """True the first time this delivery is seen (Slack retries and replays are not)."""
        name = "slack.delivery." + hashlib.sha256(delivery.encode()).hexdigest()[:32]
        if await self._service.store.get_note(approval_id, name) is not None:
            return False
        try:
            await self._service.store.set_note(approval_id, name, "1")
        except KeyError:
            raise Refused("this approval no longer exists") from None
        return True

    async def _decide(
        self,
        approval_id: str,
        identity: Identity,
        verdict: Verdict,
        reason: str | None,
        grant: tuple[int, int] | None = None,
    ) -> None:
        """The same decision as the API's (`channel: slack`); `grant`: (uses, seconds)."""
        uses, seconds = grant if grant is not None else (None, None)
        await self._service.decide(
            approval_id,
            identity,
            verdict,
            reason,
            channel="slack",
            grant_uses=uses,
            grant_seconds=seconds,
        )

    async def identify(self, user_id: str) -> Identity:
        """The clicker as an approver: their workspace email, or a refusal."""
        if not user_id:
            raise Refused("Slack did not say who clicked")
        team_id = await self._workspace()
        try:
            resp = await self._client.users_info(user=user_id)
        except SlackApiError as exc:
            if exc.response.status_code != 200:
                raise  # Slack is down: "try again", not "no"
            error = exc.response.get("error")
            raise Refused(f"Slack could not tell who you are ({error})") from None
        user: Mapping[str, Any] = resp.get("user") or {}
        if user.get("deleted"):
            raise Refused("deactivated users cannot decide approvals")
        if user.get("is_bot") or user.get("is_app_user") or user_id == "USLACKBOT":
            raise Refused("bots cannot decide approvals")
        if user.get("is_stranger") or (team_id and user.get("team_id") != team_id):
            raise Refused("only members of this workspace can decide approvals")
        email = (user.get("profile") or {}).get("email")
        if not email:
            raise Refused("your Slack profile has no email, so Countersign cannot tell who you are")
        email = str(email)
        # The workspace's own record of the clicker's email: the same person as their API, CLI
        # and inbox credentials with that email.
        return Identity(
            subject=email, issuer="slack", email=email, groups=frozenset(), email_verified=True
        )

    async def _workspace(self) -> str | None:
        if self._team_id is None:
            resp = await self._client.auth_test()
            self._team_id = str(resp.get("team_id") or "") or None
        return self._team_id

    def _tell(self, channel: str, user_id: str, text: str) -> None:
        """An ephemeral note to the clicker, in the background (Slack wants an answer in 3 s)."""
        if not channel or not user_id:
            return

        async def send() -> None:
            try:
                await with_retries(
                    lambda: self._client.chat_postEphemeral(
                        channel=channel, user=user_id, text=text
                    ),
                    what="chat.postEphemeral",
                    retry_seconds=self._ephemeral_retry,
                    first_delay=0.5,
                )
            except GaveUp as exc:
                log.warning("slack.ephemeral_failed", error=str(exc))

        self._spawn(send())

    async def aclose(self) -> None:
        if self._background:
            await asyncio.wait(set(self._background), timeout=5)
        for task in list(self._background):
            task.cancel()


def _reason(view: Mapping[str, Any]) -> str | None:
    values = view.get("state", {}).get("values", {})
    reason = ((values.get(REASON_BLOCK) or {}).get(REASON_INPUT) or {}).get("value") or ""
    return reason.strip() or None


_WHOLE = re.compile(r"[0-9]{1,9}")


def _number(view: Mapping[str, Any], block: str, action: str) -> str:
    values = view.get("state", {}).get("values", {})
    return str(((values.get(block) or {}).get(action) or {}).get("value") or "").strip()


def _grant_errors(view: Mapping[str, Any]) -> dict[str, str]:
    """What is wrong with a grant modal's numbers, by block (empty: nothing), checked against
    the rule's bounds the modal carries."""
    try:
        metadata = json.loads(view.get("private_metadata") or "{}")
        most_uses, most_time, unit = (int(n) for n in metadata["grant"])
    except (ValueError, KeyError, TypeError):
        return {GRANT_USES_BLOCK: "This form is out of date: open it again from the message."}
    unit_name = "minutes" if unit == 60 else "seconds"
    errors: dict[str, str] = {}
    for block, action, most, what in (
        (GRANT_USES_BLOCK, GRANT_USES_INPUT, most_uses, "uses"),
        (GRANT_TIME_BLOCK, GRANT_TIME_INPUT, most_time, unit_name),
    ):
        text = _number(view, block, action)
        if not _WHOLE.fullmatch(text) or not 1 <= int(text) <= most:
            errors[block] = f"Enter a whole number of {what} from 1 to {most} (the rule's limit)."
    return errors


def _grant(view: Mapping[str, Any]) -> tuple[int, int] | None:
    """The (uses, seconds) a valid grant modal asks for."""
    if _grant_errors(view):
        return None
    metadata = json.loads(view.get("private_metadata") or "{}")
    unit = int(metadata["grant"][2])
    uses = int(_number(view, GRANT_USES_BLOCK, GRANT_USES_INPUT))
    return uses, int(_number(view, GRANT_TIME_BLOCK, GRANT_TIME_INPUT)) * unit


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve a background lookup's error (it is reported where it is awaited, if it is)."""
    if not task.cancelled():
        task.exception()


def _explain(exc: Exception) -> str:
    if isinstance(exc, state.SelfApproval):
        return "You cannot decide this request: it was made by you or by an agent acting for you."
    if isinstance(exc, state.NotAnApprover):
        return f"You are not an approver of this request: {exc.message}."
    if isinstance(exc, state.DuplicateApprover):
        return "You already approved this request; it needs another approver."
    if isinstance(exc, state.ApprovalError):
        return f"Your decision was not recorded: {exc.message}."
    return f"Your decision was not recorded: {exc}."
