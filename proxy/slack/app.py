"""The Slack app on slack-bolt: one `AsyncApp`, reached by HTTP or by Socket Mode.

HTTP mode (`notify.slack.signing_secret`): `POST /_countersign/slack/events` on the proxy's own
aiohttp server. Each request must carry a valid v0 signature (HMAC-SHA256 of
`v0:<timestamp>:<body>` keyed with the app's signing secret) and a timestamp within 5 minutes;
anything else gets our JSON `401` before the body is even parsed, so a forged or replayed-late
request changes nothing. The verified request is then dispatched by bolt.

Socket Mode (`notify.slack.app_token`, an `xapp-` token): bolt's aiohttp Socket Mode adapter over
an outbound WebSocket (no inbound exposure). The connection is opened in the background and
retried until Slack answers; once up, slack_sdk reconnects by itself.

Either way the listeners acknowledge at once and the work (who clicked, the decision) runs after
(`interactions.SlackActions`). Bolt authorizes every request with the configured bot token, with
no `auth.test` on the way: a click never waits for Slack.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Coroutine, Sequence
from typing import Any
from urllib.parse import parse_qs

import structlog
from aiohttp import web
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncAck, AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from ..server.keys import SLACK_APP
from ..server.responses import error_response
from ..tasks import stop_task
from .blocks import APPROVE, APPROVE_GRANT, APPROVE_WITH_NOTE, DENY
from .interactions import SlackActions

log = structlog.get_logger("countersign.slack")

EVENTS_PATH = "/_countersign/slack/events"
_BUTTONS = re.compile(f"^({APPROVE}|{APPROVE_WITH_NOTE}|{APPROVE_GRANT}|{DENY})$")
_MODALS = re.compile(f"^({APPROVE_WITH_NOTE}|{APPROVE_GRANT}|{DENY})$")


class SlackApp:
    """The bolt app and its adapters; `actions` does the work."""

    def __init__(
        self,
        client: AsyncWebClient,
        actions: SlackActions,
        *,
        signing_secret: str | None = None,
        app_token: str | None = None,
    ) -> None:
        self.actions = actions
        token = client.token

        async def authorize(
            enterprise_id: str | None = None, team_id: str | None = None, **_: Any
        ) -> AuthorizeResult:
            return AuthorizeResult(enterprise_id=enterprise_id, team_id=team_id, bot_token=token)

        self.bolt = AsyncApp(
            # Without a token of its own: `authorize` gives it, with no auth.test on the way.
            client=AsyncWebClient(
                base_url=client.base_url, session=client.session, timeout=client.timeout
            ),
            authorize=authorize,
            signing_secret=signing_secret or "",
            # The HTTP adapter below checks the signature itself (our JSON 401s); Socket Mode
            # needs none.
            request_verification_enabled=False,
            ssl_check_enabled=False,
            ignoring_self_events_enabled=False,
            process_before_response=False,
            raise_error_for_unhandled_request=False,
        )
        self.bolt.action(_BUTTONS)(self._on_button)
        self.bolt.view(_MODALS)(self._on_modal)
        self._socket: AsyncSocketModeHandler | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._checking: asyncio.Task[Any] | None = None
        if app_token:
            self._socket = AsyncSocketModeHandler(self.bolt, app_token, web_client=client)

    async def _on_button(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        self.actions.ack_block_action(body)

    async def _on_modal(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        answer = self.actions.ack_view_submission(body)
        if answer is None:
            await ack()
        else:
            await ack(**answer)

    async def dispatch(self, body: str, headers: dict[str, str | Sequence[str]]) -> web.Response:
        """One verified HTTP request through bolt, its answer as aiohttp's."""
        resp = await self.bolt.async_dispatch(AsyncBoltRequest(body=body, headers=headers))
        if resp.status == 404:  # an interaction we do not listen to: acknowledged, ignored
            return web.Response(status=200)
        content_type = (resp.headers.get("content-type") or ["text/plain"])[0]
        return web.Response(
            status=resp.status,
            body=resp.body.encode() if resp.body else b"",
            content_type=content_type.split(";")[0],
        )

    # -- Socket Mode ----------------------------------------------------------------------------

    def start(self, setup_check: Coroutine[Any, Any, Any] | None = None) -> None:
        """Connect Socket Mode (when configured) and run `setup_check`, in the background."""
        if setup_check is not None:
            self._checking = asyncio.create_task(setup_check, name="slack-setup-check")
        if self._socket is not None:
            self._connecting = asyncio.create_task(self._connect(), name="slack-socket-mode")

    async def _connect(self) -> None:
        assert self._socket is not None
        delay = 0.5
        while True:
            try:
                await self._socket.connect_async()  # type: ignore[no-untyped-call]
                log.info("slack.socket_mode_connected")
                return
            except Exception as exc:
                problem = str(exc) or type(exc).__name__
                log.warning("slack.socket_mode_connect_failed", error=problem)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def aclose(self) -> None:
        for task in (self._checking, self._connecting):
            if task is not None:
                await stop_task(task)
        if self._socket is not None:
            await self._socket.close_async()  # type: ignore[no-untyped-call]
        await self.actions.aclose()


def slack_routes(signing_secret: str) -> web.RouteTableDef:
    """Slack's interactivity endpoint; requests go to the app's `SLACK_APP` (built once the
    server's loop runs)."""
    routes = web.RouteTableDef()
    verifier = SignatureVerifier(signing_secret)  # checks the 5-minute window too

    @routes.post(EVENTS_PATH)
    async def events(request: web.Request) -> web.Response:
        body = await request.read()
        if not verifier.is_valid(
            body,
            request.headers.get("X-Slack-Request-Timestamp", ""),
            request.headers.get("X-Slack-Signature", ""),
        ):
            return error_response(
                401,
                "unauthorized",
                message="missing or invalid Slack signature, or a stale timestamp",
            )
        try:
            text = body.decode()
            form = parse_qs(text, strict_parsing=False)
            payload = json.loads(form["payload"][0])
        except (UnicodeDecodeError, KeyError, IndexError, ValueError):
            return error_response(
                400, "invalid_request", field="payload", message="expected a payload form field"
            )
        if not isinstance(payload, dict):
            return error_response(
                400, "invalid_request", field="payload", message="payload must be a JSON object"
            )
        headers: dict[str, str | Sequence[str]] = {
            name.lower(): value for name, value in request.headers.items()
        }
        return await request.app[SLACK_APP].get().dispatch(text, headers)

    return routes
