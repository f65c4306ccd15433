"""A local, strict fake of the Slack Web API and of Socket Mode, plus signed interactions.

Slack cannot be reached from here. `FakeSlack` is a real aiohttp server speaking the parts of
the Web API Countersign uses (auth.test, chat.postMessage - in a channel, in a message's thread
with `thread_ts`, or in a direct message - chat.update, chat.postEphemeral, users.info,
users.lookupByEmail, views.open, conversations.info, conversations.open, apps.connections.open)
and recording every call; thread replies are kept per message (`threads`), direct messages per
user (`dms`);
`apps.connections.open` hands out a ws:// URL on the same server that speaks the Socket Mode
envelope protocol (`hello`, then the envelopes a test pushes; acks are recorded).
`signed_request` builds what Slack would POST to the proxy, signed with the real v0 scheme.

It is strict the way Slack is: every message and view is checked against Block Kit's documented
limits (`proxy.slack.limits`, the one place they are written down; `block_errors`), and refusals
are answered exactly as Slack answers them - HTTP 200 with `{"ok": false, "error":
"invalid_blocks", "errors": [...]}`, `msg_too_long`, `channel_not_found`, `not_in_channel`,
`invalid_auth` - and a rate limit as HTTP 429 with `Retry-After` and `{"ok": false, "error":
"ratelimited"}`; `users_not_found`, `user_not_found`, `user_disabled`, `cannot_dm_bot` and
`thread_not_found` as the method pages list them. Tests can make it fail (`fail_status`, `fail_error`, `refuse_blocks`,
`rate_limited`), slow (`delays`) or forget the bot (`channels`).
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

from proxy.slack import limits
from proxy.slack.limits import units

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


# The scope each method needs (its method page), for `missing_scope` answers.
_SCOPES = {
    "users.lookupByEmail": "users:read.email",
    "users.info": "users:read",
    "conversations.open": "im:write",
    "conversations.info": "channels:read",
    "chat.postMessage": "chat:write",
}


class FakeSlack:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.call_times: list[tuple[str, float]] = []  # (method, monotonic time received)
        self.messages: dict[str, dict[str, Any]] = {}  # ts -> latest params (top level)
        self.threads: dict[str, list[dict[str, Any]]] = {}  # parent ts -> its replies
        self.dms: dict[str, list[dict[str, Any]]] = {}  # user id -> messages sent to them
        self._ims: dict[str, str] = {}  # DM channel id -> user id
        self.fail_status: int | None = None  # answer every Web API call with this status
        self.fail_methods: set[str] | None = None  # ... or only these methods
        # Answer chat.postMessage / chat.update with {"ok": false, "error": fail_error}.
        self.fail_error: str | None = None
        self.refuse_blocks = False  # answer any message with blocks `invalid_blocks`
        # Answer these methods {"ok": false, "error": ...} (e.g. "missing_scope").
        self.errors: dict[str, str] = {}
        self.rate_limited = 0  # answer this many next calls 429 ratelimited
        self.retry_after = 1  # ... with this Retry-After
        self.delays: dict[str, float] = {}  # method -> seconds before answering
        self.refusals: list[tuple[str, str]] = []  # (method, error) of every refused call
        self.channels: dict[str, dict[str, Any]] = {
            CHANNEL: {"id": CHANNEL, "name": "approvals", "is_member": True, "is_archived": False}
        }
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

    def posts(self) -> list[dict[str, Any]]:
        """chat.postMessage calls that post a channel message (not a reply, not a DM)."""
        return [
            p
            for p in self.called("chat.postMessage")
            if not p.get("thread_ts") and str(p.get("channel")) not in self._ims
        ]

    def replies(self, ts: str | None = None) -> list[str]:
        """The texts replied in the thread of message `ts` (of the only message by default)."""
        if ts is None:
            assert len(self.messages) == 1, list(self.messages)
            ts = next(iter(self.messages))
        return [str(r.get("text")) for r in self.threads.get(ts, [])]

    async def push(self, envelope: dict[str, Any]) -> None:
        """Send an envelope to the connected Socket Mode client."""
        await self._envelopes.put(envelope)

    # -- Web API --------------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await _params(request)
        params["_token"] = request.headers.get("Authorization", "")
        self.calls.append((method, params))
        self.call_times.append((method, time.monotonic()))
        delay = self.delays.get(method)
        if delay:
            await asyncio.sleep(delay)
        if self.fail_status is not None and (
            self.fail_methods is None or method in self.fail_methods
        ):
            return web.Response(status=self.fail_status, text="slack is having a bad day")
        if self.rate_limited > 0:
            self.rate_limited -= 1
            self.refusals.append((method, "ratelimited"))
            return web.json_response(
                {"ok": False, "error": "ratelimited"},
                status=429,
                headers={"Retry-After": str(self.retry_after)},
            )
        token = APP_TOKEN if method == "apps.connections.open" else BOT_TOKEN
        if params["_token"] != f"Bearer {token}":
            return self._refuse(method, "invalid_auth")
        handler = getattr(self, "_" + method.replace(".", "_"), None)
        if handler is None:
            return self._refuse(method, "unknown_method")
        if method in self.errors:
            error = self.errors[method]
            # Slack names the scope a refused call needed (and those the token has).
            extra = (
                {"needed": _SCOPES.get(method, "?"), "provided": "chat:write"}
                if error == "missing_scope"
                else {}
            )
            return self._refuse(method, error, **extra)
        answer: dict[str, Any] = handler(params)
        if not answer.get("ok"):
            self.refusals.append((method, str(answer.get("error"))))
        return web.json_response(answer)

    def _refuse(self, method: str, error: str, **extra: Any) -> web.Response:
        self.refusals.append((method, error))
        return web.json_response({"ok": False, "error": error, **extra})

    def _message_error(self, params: dict[str, Any]) -> dict[str, Any] | None:
        """What Slack answers a chat.postMessage / chat.update it refuses, or None."""
        if self.fail_error is not None:
            return {"ok": False, "error": self.fail_error}
        channel = self.channels.get(str(params.get("channel")))
        if channel is None:
            return {"ok": False, "error": "channel_not_found"}
        if not channel["is_member"]:
            return {"ok": False, "error": "not_in_channel"}
        if channel["is_archived"]:
            return {"ok": False, "error": "is_archived"}
        blocks = params.get("blocks")
        text = params.get("text")
        if not blocks and not text:
            return {"ok": False, "error": "no_text"}
        if isinstance(text, str) and units(text) > limits.MESSAGE_TEXT:
            return {"ok": False, "error": "msg_too_long"}
        if blocks:
            errors = block_errors(blocks, limits.MESSAGE_BLOCKS)
            if self.refuse_blocks:
                errors.append("refused by the test")
            if errors:
                return _invalid_blocks(errors)
        return None

    def _auth_test(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "team_id": TEAM, "user_id": "UCOUNTERSIGN", "user": "countersign",
                "bot_id": "B1"}  # fmt: skip

    def _chat_postMessage(self, params: dict[str, Any]) -> dict[str, Any]:
        refused = self._message_error(params)
        if refused is not None:
            return refused
        parent = params.get("thread_ts")
        if parent is not None:
            found = self.messages.get(str(parent))
            if found is None or found.get("channel") != params.get("channel"):
                return {"ok": False, "error": "thread_not_found"}
        self._ts += 1
        ts = f"{self._ts}.000100"
        im_user = self._ims.get(str(params.get("channel")))
        if parent is not None:
            self.threads.setdefault(str(parent), []).append(params)
        elif im_user is not None:
            self.dms.setdefault(im_user, []).append(params)
        else:
            self.messages[ts] = params
        return {"ok": True, "channel": params["channel"], "ts": ts}

    def _chat_update(self, params: dict[str, Any]) -> dict[str, Any]:
        refused = self._message_error(params)
        if refused is not None:
            return refused
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

    def _users_lookupByEmail(self, params: dict[str, Any]) -> dict[str, Any]:
        email = str(params.get("email", "")).lower()
        if not email:
            return {"ok": False, "error": "invalid_arguments"}
        for found in self.users.values():
            if str(found.get("profile", {}).get("email", "")).lower() == email:
                return {"ok": True, "user": found}
        return {"ok": False, "error": "users_not_found"}

    def _conversations_open(self, params: dict[str, Any]) -> dict[str, Any]:
        users = [u for u in str(params.get("users", "")).split(",") if u]
        if not users:
            return {"ok": False, "error": "not_enough_users"}
        if len(users) > 1:
            return {"ok": False, "error": "method_not_supported_for_channel_type"}
        found = self.users.get(users[0])
        if found is None:
            return {"ok": False, "error": "user_not_found"}
        if found.get("deleted"):
            return {"ok": False, "error": "user_disabled"}
        if found.get("is_bot"):
            return {"ok": False, "error": "cannot_dm_bot"}
        channel = "D" + users[0]
        self._ims[channel] = users[0]
        self.channels.setdefault(
            channel, {"id": channel, "is_im": True, "is_member": True, "is_archived": False}
        )
        return {"ok": True, "channel": {"id": channel}}

    def _conversations_info(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self.channels.get(str(params.get("channel")))
        if channel is None:
            return {"ok": False, "error": "channel_not_found"}
        return {"ok": True, "channel": channel}

    def _views_open(self, params: dict[str, Any]) -> dict[str, Any]:
        errors = view_errors(params.get("view"))
        if errors:
            return {
                "ok": False,
                "error": "invalid_arguments",
                "response_metadata": {"messages": [f"[ERROR] {e}" for e in errors]},
            }
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


def _invalid_blocks(errors: list[str]) -> dict[str, Any]:
    return {
        "ok": False,
        "error": "invalid_blocks",
        "errors": errors,
        "response_metadata": {"messages": [f"[ERROR] {e}" for e in errors]},
    }


# -- Block Kit, as strictly as Slack documents it -----------------------------------------------


def _text_errors(obj: Any, where: str, limit: int, *, plain_only: bool = False) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: a text object is required"]
    kind = obj.get("type")
    if kind not in ("plain_text", "mrkdwn") or (plain_only and kind != "plain_text"):
        return [f"{where}: must be {'plain_text' if plain_only else 'a text object'}"]
    text = obj.get("text")
    if not isinstance(text, str) or units(text) < limits.TEXT_MIN:
        return [f"{where}: must be more than 0 characters"]
    if units(text) > limit:
        return [f"{where}: must be less than {limit + 1} characters"]
    if kind == "plain_text" and "verbatim" in obj:
        return [f"{where}: verbatim is only allowed on mrkdwn"]
    if kind == "mrkdwn" and "emoji" in obj:
        return [f"{where}: emoji is only allowed on plain_text"]
    return []


def _element_errors(element: Any, where: str) -> list[str]:
    if not isinstance(element, dict):
        return [f"{where}: must be an object"]
    kind = element.get("type")
    errors: list[str] = []
    if kind == "button":
        errors += _text_errors(element.get("text"), f"{where}/text", limits.BUTTON_TEXT,
                               plain_only=True)  # fmt: skip
        if len(str(element.get("value", ""))) > limits.BUTTON_VALUE:
            errors.append(f"{where}/value: must be less than {limits.BUTTON_VALUE + 1} characters")
        if element.get("style") not in (None, "primary", "danger"):
            errors.append(f"{where}/style: must be primary or danger")
    elif kind == "plain_text_input":
        if int(element.get("max_length", 0)) > limits.PLAIN_TEXT_INPUT_MAX:
            errors.append(f"{where}/max_length: must be at most {limits.PLAIN_TEXT_INPUT_MAX}")
    elif kind == "number_input":
        errors += _number_input_errors(element, where)
    else:
        errors.append(f"{where}: unsupported element type {kind!r}")
    if len(str(element.get("action_id", ""))) > limits.ACTION_ID:
        errors.append(f"{where}/action_id: too long")
    return errors


def _number_input_errors(element: dict[str, Any], where: str) -> list[str]:
    """A number_input: `is_decimal_allowed` required; initial, min and max values are strings
    holding numbers (whole ones unless decimals are allowed), min <= initial <= max."""
    decimals = element.get("is_decimal_allowed")
    if not isinstance(decimals, bool):
        return [f"{where}/is_decimal_allowed: required boolean"]
    values: dict[str, float] = {}
    for name in ("initial_value", "min_value", "max_value"):
        raw = element.get(name)
        if raw is None:
            continue
        if not isinstance(raw, str):
            return [f"{where}/{name}: must be a string"]
        try:
            number = float(raw) if decimals else int(raw)
        except ValueError:
            return [f"{where}/{name}: must be a {'number' if decimals else 'whole number'}"]
        values[name] = number
    low, high = values.get("min_value"), values.get("max_value")
    if low is not None and high is not None and low > high:
        return [f"{where}/min_value: must be at most max_value"]
    initial = values.get("initial_value")
    if initial is not None and (
        (low is not None and initial < low) or (high is not None and initial > high)
    ):
        return [f"{where}/initial_value: must be between min_value and max_value"]
    return []


def block_errors(blocks: Any, max_blocks: int) -> list[str]:
    """Every way `blocks` breaks Block Kit's documented limits (empty: Slack accepts them)."""
    if not isinstance(blocks, list):
        return ["blocks: must be an array"]
    errors: list[str] = []
    if len(blocks) > max_blocks:
        errors.append(f"blocks: must have at most {max_blocks} items")
    for i, block in enumerate(blocks):
        where = f"/blocks/{i}"
        if not isinstance(block, dict):
            errors.append(f"{where}: must be an object")
            continue
        if len(str(block.get("block_id", ""))) > limits.BLOCK_ID:
            errors.append(f"{where}/block_id: too long")
        kind = block.get("type")
        if kind == "header":
            errors += _text_errors(block.get("text"), f"{where}/text", limits.HEADER_TEXT,
                                   plain_only=True)  # fmt: skip
        elif kind == "section":
            if "text" not in block and "fields" not in block:
                errors.append(f"{where}: must have text or fields")
            if "text" in block:
                errors += _text_errors(block["text"], f"{where}/text", limits.SECTION_TEXT)
            fields = block.get("fields", [])
            if len(fields) > limits.SECTION_FIELDS:
                errors.append(f"{where}/fields: must have at most {limits.SECTION_FIELDS} items")
            for j, f in enumerate(fields):
                errors += _text_errors(f, f"{where}/fields/{j}", limits.SECTION_FIELD_TEXT)
        elif kind == "context":
            elements = block.get("elements") or []
            if not 1 <= len(elements) <= limits.CONTEXT_ELEMENTS:
                errors.append(f"{where}/elements: must have 1 to {limits.CONTEXT_ELEMENTS} items")
            for j, e in enumerate(elements):
                errors += _text_errors(e, f"{where}/elements/{j}", limits.CONTEXT_TEXT)
        elif kind == "actions":
            elements = block.get("elements") or []
            if not 1 <= len(elements) <= limits.ACTIONS_ELEMENTS:
                errors.append(f"{where}/elements: must have 1 to {limits.ACTIONS_ELEMENTS} items")
            for j, e in enumerate(elements):
                errors += _element_errors(e, f"{where}/elements/{j}")
        elif kind == "input":
            errors += _text_errors(block.get("label"), f"{where}/label", limits.INPUT_LABEL,
                                   plain_only=True)  # fmt: skip
            errors += _element_errors(block.get("element"), f"{where}/element")
        elif kind != "divider":
            errors.append(f"{where}: unsupported block type {kind!r}")
    return errors


def view_errors(view: Any) -> list[str]:
    if not isinstance(view, dict):
        return ["view: must be an object"]
    errors = block_errors(view.get("blocks", []), limits.VIEW_BLOCKS)
    for name in ("title", "submit", "close"):
        if name in view or name == "title":
            errors += _text_errors(view.get(name), f"/view/{name}", limits.VIEW_TITLE,
                                   plain_only=True)  # fmt: skip
    if len(str(view.get("private_metadata", ""))) > limits.VIEW_PRIVATE_METADATA:
        errors.append("/view/private_metadata: too long")
    if len(str(view.get("callback_id", ""))) > limits.VIEW_CALLBACK_ID:
        errors.append("/view/callback_id: too long")
    return errors


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
            "type": "modal",
            "callback_id": callback_id,
            "private_metadata": json.dumps({"approval_id": approval_id, "channel": channel}),
            "state": {
                "values": {"reason": {"reason": {"type": "plain_text_input", "value": reason}}}
            },
        },
    }


def grant_submission(
    user_id: str,
    private_metadata: str,
    uses: str | None,
    time_value: str | None,
    note: str | None = None,
) -> dict[str, Any]:
    """The "Approve + grant…" modal submitted: `private_metadata` as the modal was opened
    with (from the recorded views.open), the numbers as Slack sends them (strings)."""
    number = "number_input"
    return {
        "type": "view_submission",
        "team": {"id": TEAM},
        "user": {"id": user_id, "team_id": TEAM},
        "view": {
            "id": "V" + uuid.uuid4().hex[:8],
            "type": "modal",
            "callback_id": "countersign_approve_grant",
            "private_metadata": private_metadata,
            "state": {
                "values": {
                    "grant_uses": {"grant_uses": {"type": number, "value": uses}},
                    "grant_time": {"grant_time": {"type": number, "value": time_value}},
                    "reason": {"reason": {"type": "plain_text_input", "value": note}},
                }
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
