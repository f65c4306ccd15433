"""The bot hosted on the Microsoft 365 Agents SDK (`microsoft-agents-hosting-aiohttp`).

Countersign verifies every activity itself first (`auth.ActivityVerifier`); the SDK's own JWT
middleware and validator are never used (they hard-code Microsoft's key URLs and do not check
the issuer). Once an activity passed, its verified claims become the SDK's `ClaimsIdentity`,
handed to the SDK's aiohttp request adapter (in place of `request["claims_identity"]`, which its
JWT middleware would set) with the body Countersign already read, and the SDK's `CloudAdapter`
runs the turn (`process_request`, what `CloudAdapter.process` calls): it parses the activity
into its `Activity` model, builds the `TurnContext`, runs its middleware pipeline and dispatches
to `CountersignAgent` (an `ActivityHandler`): `adaptiveCard/action` invokes are decided by
`TeamsBot.action`, everything else (messages included) is acknowledged and ignored. The SDK
turns the handler's `InvokeResponse` into the HTTP answer.

Outbound calls (posting cards, replies, updates, the roster) stay on `connector.BotConnector`,
whose token endpoint and service URL are configurable; the turn's SDK connector client is a stub
that refuses to send (nothing in a turn sends through it), so no turn makes a call of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

from aiohttp import web
from microsoft_agents.activity import Activity, InvokeResponse, TurnContextProtocol
from microsoft_agents.hosting.aiohttp import CloudAdapter
from microsoft_agents.hosting.aiohttp._aiohttp_request_adapter import AiohttpRequestAdapter
from microsoft_agents.hosting.core import ActivityHandler, ClaimsIdentity, TurnContext
from pydantic import ValidationError

from ..server.responses import error_response

ACTION_INVOKE = "adaptiveCard/action"

# What an `adaptiveCard/action` invoke is answered with: the body of the invoke response.
ActionHandler = Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]


class NoOutbound:
    """The SDK's per-turn connector and user-token clients: Countersign sends through its own
    `BotConnector`, so these refuse everything and hold no resources."""

    base_uri = ""

    @property
    def attachments(self) -> Any:
        raise NotImplementedError("Countersign sends through its own Bot Connector client")

    @property
    def conversations(self) -> Any:
        raise NotImplementedError("Countersign sends through its own Bot Connector client")

    @property
    def user_token(self) -> Any:
        raise NotImplementedError("Countersign does not use user sign-in")

    async def close(self) -> None:
        return None


class NoOutboundFactory:
    """`ChannelServiceClientFactoryBase` for the adapter: no token fetch, no session."""

    async def create_connector_client(
        self,
        context: TurnContext | None,
        claims_identity: ClaimsIdentity,
        service_url: str,
        audience: str,
        scopes: list[str] | None = None,
        use_anonymous: bool = False,
    ) -> Any:
        return NoOutbound()

    async def create_user_token_client(
        self, context: TurnContext, claims_identity: ClaimsIdentity, use_anonymous: bool = False
    ) -> Any:
        return NoOutbound()


class CountersignAgent(ActivityHandler):
    """What a turn does: a card click is decided by `on_action`; the rest is ignored."""

    def __init__(self, on_action: ActionHandler) -> None:
        self._on_action = on_action

    async def on_invoke_activity(
        self, turn_context: TurnContextProtocol[Any]
    ) -> InvokeResponse | None:
        activity = turn_context.activity
        if activity.name != ACTION_INVOKE:
            return InvokeResponse(status=int(HTTPStatus.OK))
        raw = activity.model_dump(by_alias=True, exclude_none=True, mode="json")
        body = await self._on_action(raw)
        return InvokeResponse(status=int(HTTPStatus.OK), body=body)

    async def on_message_activity(self, turn_context: TurnContextProtocol[Any]) -> None:
        return None  # nothing to say to chat: decisions are made on the card


async def _turn_failed(context: TurnContext, error: Exception) -> None:
    # The SDK's default posts the exception text back to the conversation; ours raises it, so
    # the route answers 500 and says nothing in Teams.
    raise error


class _Verified(AiohttpRequestAdapter):
    """The SDK's aiohttp request adapter, with the body Countersign already read (bounded) and
    parsed."""

    def __init__(
        self, request: web.Request, activity: dict[str, Any], identity: ClaimsIdentity
    ) -> None:
        super().__init__(request)
        self._activity = activity
        self._identity = identity

    async def json(self) -> dict[str, Any]:
        return self._activity

    def get_claims_identity(self) -> ClaimsIdentity:
        return self._identity


class AgentsHost:
    """The SDK's `CloudAdapter` and our agent, for verified activities."""

    def __init__(self, on_action: ActionHandler) -> None:
        self.adapter = CloudAdapter(channel_service_client_factory=NoOutboundFactory())
        self.adapter.on_turn_error = _turn_failed
        self.agent = CountersignAgent(on_action)

    async def process(
        self, request: web.Request, activity: dict[str, Any], claims: Mapping[str, Any]
    ) -> web.StreamResponse:
        """Run one verified activity through the SDK; `claims` are the verified token's."""
        try:
            Activity.model_validate(activity)  # what the SDK parses it as, checked here: a 400
        except ValidationError:
            return error_response(400, "invalid_request", message="not a Bot Framework activity")
        identity = ClaimsIdentity(dict(claims), authentication_type="Bearer")
        answer = await self.adapter.process_request(
            _Verified(request, activity, identity), self.agent
        )
        if answer.status_code == HTTPStatus.ACCEPTED and answer.body is None:
            return web.Response(status=200)  # acknowledged, as before (Bot Framework: any 2xx)
        response: web.StreamResponse = CloudAdapter._to_aiohttp_response(answer)
        return response
