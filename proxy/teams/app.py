"""`POST /_countersign/teams/messages`: Bot Framework activities, and what a card click does.

Every activity is checked first (`auth.ActivityVerifier`: the Bot Framework token, its
`serviceurl`, the tenant); anything else is our JSON 401 and changes nothing. A verified activity
is then run by the Microsoft 365 Agents SDK (`hosting`: its `CloudAdapter` with the verified
claims as the turn's `ClaimsIdentity`, dispatching to an `ActivityHandler`). An `invoke` named
`adaptiveCard/action` (Universal Actions, `Action.Execute`) with verb `approve`, `deny` or
`approve_grant` is a decision: the clicker is identified by their Entra ID object id
(`from.aadObjectId`) and the email (else UPN) the Teams roster of the approvals conversation
gives for them (`GET …/members/{from.id}`, whose `aadObjectId` must match) - never the display
name - so a Teams decision counts as the same person as their API, Slack and inbox decisions.
The decision goes through `ApprovalService.decide(channel="teams")` with the same person rules
(zero self-approval, approver authorization, quorum). `approve_grant` also asks for a grant:
the uses and time typed into the card, whole numbers within the rule's limits as the approval
has them (else the card comes back with the error in words and nothing is decided). The invoke
is answered with the refreshed card (the notifier updates it in place for everyone); a refusal
is answered with the card and the reason in words on top. Other activities are acknowledged
and ignored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import structlog
from aiohttp import web

from ..approvals.service import ApprovalService
from ..audit import AuditUnavailable
from ..model import Identity, Verdict, state
from ..server.responses import error_response
from ..store.base import StoreUnavailable
from .auth import ActivityVerifier, TeamsAuthError
from .cards import (
    APPROVE,
    APPROVE_GRANT,
    CARD_CONTENT_TYPE,
    DENY,
    GRANT_TIME_INPUT,
    GRANT_USES_INPUT,
    REASON_INPUT,
    fitted_card,
    grant_bounds,
)
from .connector import BotConnector, ConnectorError
from .hosting import ACTION_INVOKE, AgentsHost

log = structlog.get_logger("countersign.teams")

MESSAGES_PATH = "/_countersign/teams/messages"
MAX_ACTIVITY_BYTES = 256 * 1024
_WHOLE = re.compile(r"[0-9]{1,9}")
__all__ = ["ACTION_INVOKE", "MESSAGES_PATH", "TEAMS_BOT", "TeamsBot", "teams_routes"]


class Refused(Exception):
    """The click cannot count; said to the clicker in words."""


class TeamsBot:
    def __init__(
        self,
        verifier: ActivityVerifier,
        connector: BotConnector,
        service: ApprovalService,
        *,
        service_url: str,
        conversation: str,
        tenant_id: str,
        public_url: str | None = None,
    ) -> None:
        self._verifier = verifier
        self._connector = connector
        self._service = service
        self._service_url = service_url
        self._conversation = conversation
        self._tenant_id = tenant_id
        self._public_url = public_url
        self._host = AgentsHost(self._answer)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        authorization = request.headers.get("Authorization")
        if not authorization:
            return _unauthorized("missing bearer token")
        body = await request.content.read(MAX_ACTIVITY_BYTES + 1)
        if len(body) > MAX_ACTIVITY_BYTES:
            return error_response(413, "payload_too_large", message="activity too large")
        try:
            activity = json.loads(body)
        except ValueError:
            activity = None
        if not isinstance(activity, dict):
            # Checked with an empty activity: a bad token is still a 401, not a 400.
            try:
                await self._verifier.verify(authorization, {})
            except TeamsAuthError as exc:
                return _unauthorized(str(exc))
            return error_response(400, "invalid_request", message="expected a JSON activity")
        try:
            claims = await self._verifier.verify(authorization, activity)
        except TeamsAuthError as exc:
            log.info("teams.activity_refused", error=str(exc))
            return _unauthorized(str(exc))
        except Exception as exc:  # the metadata or keys cannot be fetched now
            log.warning("teams.keys_unavailable", error=str(exc) or type(exc).__name__)
            return error_response(
                503,
                "identity_unavailable",
                headers={"Retry-After": "5"},
                message="cannot fetch the Bot Framework signing keys",
            )
        return await self._host.process(request, activity, claims)

    async def _answer(self, activity: Mapping[str, Any]) -> dict[str, Any]:
        """The invoke response body of an `Action.Execute`: the card to show the clicker."""
        card = await self.action(activity)
        return {"statusCode": 200, "type": CARD_CONTENT_TYPE, "value": card}

    async def action(self, activity: Mapping[str, Any]) -> dict[str, Any]:
        """One `Action.Execute`: decided, and the card to show the clicker."""
        action = (activity.get("value") or {}).get("action") or {}
        verb = action.get("verb")
        data = action.get("data") or {}
        approval_id = str(data.get("approval_id") or "")
        notice: str | None = None
        try:
            if verb in (APPROVE, DENY, APPROVE_GRANT):
                grant = await self._grant(approval_id, data) if verb == APPROVE_GRANT else None
                identity = await self.identify(activity)
                reason = data.get(REASON_INPUT)
                await self._service.decide(
                    approval_id,
                    identity,
                    Verdict.DENY if verb == DENY else Verdict.APPROVE,
                    str(reason) if isinstance(reason, str) else None,
                    channel="teams",
                    grant_uses=grant[0] if grant else None,
                    grant_seconds=grant[1] if grant else None,
                )
        except (Refused, state.ApprovalError) as exc:
            notice = _explain(exc)
        except (StoreUnavailable, AuditUnavailable, ConnectorError, TimeoutError, OSError) as exc:
            log.warning("teams.action_failed", approval_id=approval_id, error=str(exc))
            notice = "Countersign could not record that right now; try again."
        try:
            approval = await self._service.get(approval_id) if approval_id else None
        except StoreUnavailable:
            approval = None
        if approval is None:
            return minimal_notice(notice or "This approval no longer exists.")
        return fitted_card(approval, self._public_url, self._service.redactor, notice=notice)

    async def _grant(self, approval_id: str, data: Mapping[str, Any]) -> tuple[int, int]:
        """The (uses, seconds) an "Approve + grant" asks for, checked against the rule's
        limits as the approval has them (not as the card said); `Refused` in words."""
        approval = await self._service.get(approval_id)
        bounds = grant_bounds(approval) if approval is not None else None
        if bounds is None:
            raise Refused("this rule does not offer grants")
        most_uses, most_time, unit = bounds
        unit_name = "minutes" if unit == 60 else "seconds"
        asked: list[int] = []
        for key, most, what in (
            (GRANT_USES_INPUT, most_uses, "uses"),
            (GRANT_TIME_INPUT, most_time, unit_name),
        ):
            text = str(data.get(key) if data.get(key) is not None else "").strip()
            if not _WHOLE.fullmatch(text) or not 1 <= int(text) <= most:
                raise Refused(
                    f"enter a whole number of {what} from 1 to {most} (the rule's limit) for "
                    "the grant"
                )
            asked.append(int(text))
        return asked[0], asked[1] * unit

    async def identify(self, activity: Mapping[str, Any]) -> Identity:
        """The clicker as an approver: Entra ID object id and the roster's email (else UPN)."""
        sender = activity.get("from") or {}
        aad = str(sender.get("aadObjectId") or "")
        member_id = str(sender.get("id") or "")
        if not aad or not member_id:
            raise Refused("Teams did not say who clicked")
        try:
            member = await self._connector.member(self._service_url, self._conversation, member_id)
        except ConnectorError as exc:
            if exc.status == 404:
                raise Refused("only members of the approvals conversation can decide") from None
            raise
        if str(member.get("aadObjectId") or "").lower() != aad.lower():
            raise Refused("Teams could not tell who you are")
        email = member.get("email") or member.get("userPrincipalName")
        if not isinstance(email, str) or "@" not in email:
            raise Refused("your Teams account has no email, so Countersign cannot tell who you are")
        return Identity(
            subject=aad,
            issuer=f"https://login.microsoftonline.com/{self._tenant_id}/v2.0",
            email=email,
            groups=frozenset(),
            email_verified=True,
        )


def minimal_notice(text: str) -> dict[str, Any]:
    """A card of our words alone (the approval it was about is gone)."""
    return {
        "type": "AdaptiveCard",
        "version": "1.5",
        "body": [{"type": "TextBlock", "text": text, "wrap": True, "weight": "Bolder"}],
    }


def _unauthorized(why: str) -> web.Response:
    return error_response(401, "unauthorized", message=f"Teams activity refused: {why}")


def _explain(exc: Exception) -> str:
    if isinstance(exc, state.SelfApproval):
        return "You cannot decide this request: it was made by you or by an agent acting for you."
    if isinstance(exc, state.NotAnApprover):
        return f"You are not an approver of this request: {exc.message}."
    if isinstance(exc, state.DuplicateApprover):
        return "You already approved this request; it needs another approver."
    if isinstance(exc, state.ReasonRequired):
        return "A denial needs a reason: type it in the Reason field, then Deny."
    if isinstance(exc, state.ApprovalError):
        return f"Your decision was not recorded: {exc.message}."
    return f"Your decision was not recorded: {exc}."


TEAMS_BOT: web.AppKey[TeamsBot] = web.AppKey("teams_bot")


def teams_routes() -> web.RouteTableDef:
    """The Bot Framework messaging endpoint; activities go to the app's `TEAMS_BOT`."""
    routes = web.RouteTableDef()

    @routes.post(MESSAGES_PATH)
    async def messages(request: web.Request) -> web.StreamResponse:
        return await request.app[TEAMS_BOT].handle(request)

    return routes
