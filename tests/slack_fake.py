"""A local fake of the Slack Web API and of Socket Mode, plus signed interaction requests.

Slack cannot be reached from here. `FakeSlack` is a real aiohttp server speaking the parts of
the Web API Countersign uses (auth.test, chat.postMessage, chat.update, chat.postEphemeral,
users.info, views.open, apps.connections.open) and recording every call; `apps.connections.open`
hands out a ws:// URL on the same server that speaks the Socket Mode envelope protocol (`hello`,
then the envelopes a test pushes; acks are recorded). `signed_request` builds what Slack would
POST to the proxy, signed with the real v0 scheme.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl, urlencode

from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

TEAM = "T0COUNTER"
CHANNEL = "C0APPROVALS"
SIGNING_SECRET = "test-signing-secret-8f1c2e"
BOT_TOKEN = "xoxb-test-bot-token"
APP_TOKEN = "xapp-test-app-token"


def user(user_id: str, email: str | None, **extra: Any) -> dict[str, Any]:
    profile = {"email": email} if email else {}
    return {"id": user_id, "team_id": TEAM, "deleted": False, "is_bot": False, "profile": profile,
            **extra}  # fmt: skip


USERS = {
    "UCAROL": user("UCAROL", "carol@example.com"),
    "UALICE": user("UALICE", "alice@example.com"),
    "UBOB": user("UBOB", "bob@example.com"),  # owns the agent: self-approval
    "UMALLORY": user("UMALLORY", "mallory@example.com"),  # not an approver
    "UBOT": user("UBOT", "carol@example.com", is_bot=True),
    "UGONE": user("UGONE", "carol@example.com", deleted=True),
    "UNOMAIL": user("UNOMAIL", None),
    "UGUEST": user("UGUEST", "carol@example.com", team_id="T0OTHER"),
}


class FakeSlack:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.messages: dict[str, dict[str, Any]] = {}  # ts -> latest params
        self.fail_status: int | None = None  # answer every Web API call with this status
        self.users = dict(USERS)
        self.acks: list[dict[str, Any]] = []
        self.sockets: list[web.WebSocketResponse] = []
        self._envelopes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._ts = 1_700_000_000
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)  # users.info is a GET
        app.router.add_get("/socket", self._socket)
        self.server = TestServer(app)

    async def start(self) -> None:
        await self.server.start_server()

    async def close(self) -> None:
        for ws in self.sockets:
            await ws.close()
        await self.server.close()

    @property
    def api_url(self) -> str:
        return str(self.server.make_url("/api/"))

    def called(self, method: str) -> list[dict[str, Any]]:
        return [params for name, params in self.calls if name == method]

    async def push(self, envelope: dict[str, Any]) -> None:
        """Send an envelope to the connected Socket Mode client."""
        await self._envelopes.put(envelope)

    # -- Web API --------------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await _params(request)
        params["_token"] = request.headers.get("Authorization", "")
        self.calls.append((method, params))
        if self.fail_status is not None:
            return web.Response(status=self.fail_status, text="slack is having a bad day")
        handler = getattr(self, "_" + method.replace(".", "_"), None)
        if handler is None:
            return web.json_response({"ok": False, "error": "unknown_method"})
        answer: dict[str, Any] = handler(params)
        return web.json_response(answer)

    def _auth_test(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "team_id": TEAM, "user_id": "UCOUNTERSIGN", "bot_id": "B1"}

    def _chat_postMessage(self, params: dict[str, Any]) -> dict[str, Any]:
        self._ts += 1
        ts = f"{self._ts}.000100"
        self.messages[ts] = params
        return {"ok": True, "channel": params["channel"], "ts": ts}

    def _chat_update(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("ts") not in self.messages:
            return {"ok": False, "error": "message_not_found"}
        self.messages[params["ts"]] = params
        return {"ok": True, "channel": params["channel"], "ts": params["ts"]}

    def _chat_postEphemeral(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "message_ts": f"{self._ts}.000200"}

    def _users_info(self, params: dict[str, Any]) -> dict[str, Any]:
        found = self.users.get(params.get("user", ""))
        if found is None:
            return {"ok": False, "error": "user_not_found"}
        return {"ok": True, "user": found}

    def _views_open(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "view": {"id": "V" + uuid.uuid4().hex[:8], **params["view"]}}

    def _apps_connections_open(self, params: dict[str, Any]) -> dict[str, Any]:
        url = self.server.make_url("/socket").with_scheme("ws")
        return {"ok": True, "url": str(url)}

    # -- Socket Mode ----------------------------------------------------------------------------

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.append(ws)
        await ws.send_json({"type": "hello", "num_connections": 1, "debug_info": {}})

        async def pump() -> None:
            while True:
                await ws.send_json(await self._envelopes.get())

        pumping = asyncio.create_task(pump())
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self.acks.append(json.loads(msg.data))
        finally:
            pumping.cancel()
        return ws


async def _params(request: web.Request) -> dict[str, Any]:
    """slack_sdk sends JSON bodies for some methods and forms for others (with JSON-encoded
    `blocks`/`view` values)."""
    if request.content_type == "application/json":
        data: dict[str, Any] = await request.json()
        return data
    params: dict[str, Any] = dict(request.query)
    params.update(parse_qsl((await request.read()).decode()))
    for key in ("blocks", "view"):
        if isinstance(params.get(key), str):
            params[key] = json.loads(params[key])
    return params


# -- what Slack POSTs to the proxy --------------------------------------------------------------


def signed_request(
    payload: dict[str, Any], *, secret: str = SIGNING_SECRET, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    body = urlencode({"payload": json.dumps(payload)}).encode()
    ts = str(int(time.time()) if timestamp is None else timestamp)
    mac = hmac.new(secret.encode(), b"v0:" + ts.encode() + b":" + body, hashlib.sha256)
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": "v0=" + mac.hexdigest(),
    }
    return body, headers


def block_action(
    user_id: str, approval_id: str, action_id: str, *, channel: str = CHANNEL
) -> dict[str, Any]:
    return {
        "type": "block_actions",
        "team": {"id": TEAM},
        "user": {"id": user_id, "team_id": TEAM},
        "channel": {"id": channel},
        "trigger_id": "trigger-" + uuid.uuid4().hex,
        "actions": [
            {
                "type": "button",
                "action_id": action_id,
                "block_id": "countersign_decision",
                "value": approval_id,
                "action_ts": f"{time.time():.6f}",
            }
        ],
    }


def view_submission(
    user_id: str, callback_id: str, approval_id: str, reason: str | None, *, channel: str = CHANNEL
) -> dict[str, Any]:
    return {
        "type": "view_submission",
        "team": {"id": TEAM},
        "user": {"id": user_id, "team_id": TEAM},
        "view": {
            "id": "V" + uuid.uuid4().hex[:8],
            "callback_id": callback_id,
            "private_metadata": json.dumps({"approval_id": approval_id, "channel": channel}),
            "state": {
                "values": {"reason": {"reason": {"type": "plain_text_input", "value": reason}}}
            },
        },
    }


def envelope(payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "envelope_id": uuid.uuid4().hex,
        "type": "interactive",
        "accepts_response_payload": True,
        "payload": payload,
    }
