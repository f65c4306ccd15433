"""`POST /_countersign/slack/events`: Slack's interactivity requests (HTTP mode).

Each request must carry a valid v0 signature (HMAC-SHA256 of `v0:<timestamp>:<body>` keyed with
the app's signing secret) and a timestamp within 5 minutes; anything else gets 401 before the
body is even parsed, so a forged or replayed-late request changes nothing.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from aiohttp import web
from slack_sdk.signature import SignatureVerifier

from .keys import SLACK_ACTIONS
from .responses import error_response

EVENTS_PATH = "/_countersign/slack/events"


def slack_routes(signing_secret: str) -> web.RouteTableDef:
    """Slack's interactivity endpoint; clicks go to the app's `SLACK_ACTIONS` (built once the
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
            form = parse_qs(body.decode(), strict_parsing=False)
            payload = json.loads(form["payload"][0])
        except (UnicodeDecodeError, KeyError, IndexError, ValueError):
            return error_response(
                400, "invalid_request", field="payload", message="expected a payload form field"
            )
        if not isinstance(payload, dict):
            return error_response(
                400, "invalid_request", field="payload", message="payload must be a JSON object"
            )
        answer = await request.app[SLACK_ACTIONS].handle(payload)
        if answer is None:
            return web.Response(status=200)
        return web.json_response(answer)

    return routes
