"""Socket Mode: Slack interactions over an outbound WebSocket (no inbound exposure).

Enabled by `notify.slack.app_token` (an `xapp-` token). Each `interactive` envelope is handled
like an HTTP interaction and acknowledged with the handler's answer (e.g. a modal's errors);
other envelopes are just acknowledged. The connection is opened in the background and retried
until Slack answers; once up, slack_sdk reconnects by itself.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.async_client import AsyncBaseSocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.web.async_client import AsyncWebClient

from ..tasks import stop_task
from .slack_actions import SlackActions

log = structlog.get_logger("countersign.slack")


class SlackSocket:
    def __init__(self, app_token: str, web_client: AsyncWebClient, actions: SlackActions) -> None:
        self._actions = actions
        self._client = SocketModeClient(app_token=app_token, web_client=web_client)
        self._client.socket_mode_request_listeners.append(self._on_request)
        self._connecting: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._connecting = asyncio.create_task(self._connect(), name="slack-socket-mode")

    async def _connect(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._client.connect()  # type: ignore[no-untyped-call]
                log.info("slack.socket_mode_connected")
                return
            except Exception as exc:
                problem = str(exc) or type(exc).__name__
                log.warning("slack.socket_mode_connect_failed", error=problem)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _on_request(self, client: AsyncBaseSocketModeClient, req: SocketModeRequest) -> None:
        answer: dict[str, Any] | None = None
        try:
            if req.type == "interactive":
                answer = await self._actions.handle(req.payload)
        finally:
            # Always acknowledge, or Slack redelivers the envelope.
            await client.send_socket_mode_response(
                SocketModeResponse(envelope_id=req.envelope_id, payload=answer)
            )

    async def aclose(self) -> None:
        if self._connecting is not None:
            await stop_task(self._connecting)
        await self._client.close()  # type: ignore[no-untyped-call]
