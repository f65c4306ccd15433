"""A local fake of Microsoft's side of a Teams bot: the Bot Framework OpenID metadata and JWKS
(keys of a test RSA key), the token service (client credentials for one app id and password) and
the Bot Connector REST API (post, reply in a thread, update, one member or the whole roster, open
a 1:1 conversation and post in it), strict about what Teams refuses: a card message over
`MAX_BYTES`, an unknown conversation, a missing or wrong bearer token. Failures can
be queued (`fail_next`: status, optional Retry-After) to exercise the retry path.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jwt
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import rsa

APP_ID = "00000000-aaaa-bbbb-cccc-000000000001"
APP_PASSWORD = "s3cret-app-password"
TENANT = "11111111-2222-3333-4444-555555555555"
CONVERSATION = "19:approvals@thread.tacv2"
ISSUER = "https://api.botframework.com"
KID = "test-key-1"
MAX_BYTES = 28 * 1024  # Teams' limit of one message (about 28 KB)

_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _b64(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    numbers = key.public_key().public_numbers()
    return {
        "kty": "RSA",
        "use": "sig",
        "kid": kid,
        "n": _b64(numbers.n),
        "e": _b64(numbers.e),
        "endorsements": ["msteams"],
    }


class FakeTeams:
    def __init__(self) -> None:
        self.activities: dict[str, dict[str, Any]] = {}  # id -> latest activity
        self.posts: list[dict[str, Any]] = []  # top-level posts (the cards)
        self.replies: list[dict[str, Any]] = []  # thread replies, each with its `replyToId`
        self.updates: list[tuple[str, dict[str, Any]]] = []
        self.members: dict[str, dict[str, Any]] = {}
        self.directs: dict[str, str] = {}  # 1:1 conversation id -> the member's id
        self.direct_posts: list[dict[str, Any]] = []  # posts in 1:1s, each with `conversation`
        self.roster_reads = 0
        self.tokens_issued = 0
        self.jwks_fetches = 0
        self.failures: list[tuple[int, float | None]] = []
        self.reply_failures: list[int] = []  # statuses for the next thread replies only
        self._tokens: set[str] = set()
        self.server: TestServer | None = None
        self.kids = [KID]

    # -- set-up ---------------------------------------------------------------------------------

    @property
    def base(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/"))

    @property
    def service_url(self) -> str:
        return self.base + "teams/"

    @property
    def openid_metadata_url(self) -> str:
        return self.base + "openid"

    @property
    def token_url(self) -> str:
        return self.base + "token"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/openid", self._metadata)
        app.router.add_get("/keys", self._keys)
        app.router.add_post("/token", self._token)
        base = "/teams/v3/conversations/{conversation}"
        app.router.add_post(base + "/activities", self._post)
        app.router.add_post(base + "/activities/{activity}", self._post)  # a reply
        app.router.add_put(base + "/activities/{activity}", self._put)
        app.router.add_get(base + "/members/{member}", self._member)
        app.router.add_get(base + "/members", self._roster)
        app.router.add_post("/teams/v3/conversations", self._open_direct)
        self.server = TestServer(app)
        await self.server.start_server()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    def add_member(
        self, member_id: str, aad: str, upn: str, email: str | None = None, name: str = "X"
    ) -> None:
        self.members[member_id] = {
            "id": member_id,
            "aadObjectId": aad,
            "userPrincipalName": upn,
            "email": email,
            "name": name,
            "tenantId": TENANT,
        }

    def fail_next(self, status: int, retry_after: float | None = None, times: int = 1) -> None:
        self.failures.extend([(status, retry_after)] * times)

    # -- signing inbound activities --------------------------------------------------------------

    def sign(
        self,
        service_url: str | None = None,
        *,
        forged: bool = False,
        kid: str = KID,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": ISSUER,
            "aud": APP_ID,
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "serviceurl": service_url if service_url is not None else self.service_url,
        }
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        key = _OTHER_KEY if forged else _KEY
        return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})

    def activity(self, **overrides: Any) -> dict[str, Any]:
        activity: dict[str, Any] = {
            "type": "message",
            "id": uuid.uuid4().hex,
            "serviceUrl": self.service_url,
            "channelId": "msteams",
            "from": {"id": "29:alice", "aadObjectId": "aad-alice", "name": "Alice"},
            "conversation": {"id": CONVERSATION, "tenantId": TENANT},
            "recipient": {"id": "28:" + APP_ID},
            "channelData": {"tenant": {"id": TENANT}},
        }
        activity.update(overrides)
        return activity

    # -- handlers -------------------------------------------------------------------------------

    async def _metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"issuer": ISSUER, "jwks_uri": self.base + "keys"})

    async def _keys(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        return web.json_response({"keys": [_jwk(_KEY, kid) for kid in self.kids]})

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if (
            form.get("grant_type") != "client_credentials"
            or form.get("client_id") != APP_ID
            or form.get("client_secret") != APP_PASSWORD
            or form.get("scope") != "https://api.botframework.com/.default"
        ):
            return web.json_response({"error": "invalid_client"}, status=401)
        token = "tok-" + uuid.uuid4().hex
        self._tokens.add(token)
        self.tokens_issued += 1
        return web.json_response(
            {"token_type": "Bearer", "expires_in": 3600, "access_token": token}
        )

    def _refused(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self._tokens:
            return web.json_response({"error": {"code": "Unauthorized"}}, status=401)
        conversation = _root(request.match_info.get("conversation", CONVERSATION))[0]
        if conversation != CONVERSATION and conversation not in self.directs:
            return web.json_response({"error": {"code": "ConversationNotFound"}}, status=404)
        if self.failures:
            status, retry_after = self.failures.pop(0)
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            return web.json_response(
                {"error": {"code": str(status)}}, status=status, headers=headers
            )
        return None

    async def _checked(self, request: web.Request) -> dict[str, Any] | web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        raw = await request.read()
        if len(raw) > MAX_BYTES:
            return web.json_response({"error": {"code": "MessageSizeTooBig"}}, status=413)
        activity = json.loads(raw)
        for attachment in activity.get("attachments") or ():
            if attachment.get("contentType") != "application/vnd.microsoft.card.adaptive":
                return web.json_response({"error": {"code": "BadArgument"}}, status=400)
            if not isinstance((attachment.get("content") or {}).get("body"), list):
                return web.json_response({"error": {"code": "BadArgument"}}, status=400)
        return dict(activity)

    async def _post(self, request: web.Request) -> web.Response:
        checked = await self._checked(request)
        if isinstance(checked, web.Response):
            return checked
        # A reply: to `{conversation};messageid={root}` (how Teams threads in a channel), or
        # Bot Framework's ReplyToActivity path.
        root = _root(request.match_info["conversation"])[1] or request.match_info.get("activity")
        activity_id = f"1{len(self.posts) + len(self.replies):012d}"
        checked["id"] = activity_id
        conversation = request.match_info["conversation"]
        if conversation in self.directs:
            self.direct_posts.append({**checked, "conversation": conversation})
            self.activities[activity_id] = checked
            return web.json_response({"id": activity_id}, status=201)
        if root is not None:
            if root not in self.activities or checked.get("replyToId") != root:
                return web.json_response({"error": {"code": "BadArgument"}}, status=400)
            if self.reply_failures:
                status = self.reply_failures.pop(0)
                return web.json_response({"error": {"code": str(status)}}, status=status)
            self.replies.append(checked)
        else:
            self.posts.append(checked)
        self.activities[activity_id] = checked
        return web.json_response({"id": activity_id}, status=201)

    async def _put(self, request: web.Request) -> web.Response:
        checked = await self._checked(request)
        if isinstance(checked, web.Response):
            return checked
        activity_id = request.match_info["activity"]
        if activity_id not in self.activities:
            return web.json_response({"error": {"code": "ActivityNotFound"}}, status=404)
        self.updates.append((activity_id, checked))
        self.activities[activity_id] = checked
        return web.json_response({"id": activity_id})

    async def _member(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        member = self.members.get(request.match_info["member"])
        if member is None:
            return web.json_response(
                {"error": {"code": "MemberNotFoundInConversation"}}, status=404
            )
        return web.json_response(member)

    async def _roster(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        self.roster_reads += 1
        return web.json_response(list(self.members.values()))

    async def _open_direct(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        body = await request.json()
        members = body.get("members") or []
        tenant = body.get("tenantId") or ((body.get("channelData") or {}).get("tenant") or {})
        tenant = tenant if isinstance(tenant, str) else tenant.get("id")
        if (
            len(members) != 1
            or members[0].get("id") not in self.members
            or tenant != TENANT
            or (body.get("bot") or {}).get("id") != "28:" + APP_ID
            or body.get("isGroup")
        ):
            return web.json_response({"error": {"code": "BadArgument"}}, status=400)
        conversation = "a:direct-" + members[0]["id"]
        self.directs[conversation] = members[0]["id"]
        return web.json_response({"id": conversation}, status=201)

    def direct_to(self, member_id: str) -> list[dict[str, Any]]:
        """The cards posted in the 1:1 conversation with `member_id`."""
        return [
            card_of(p) for p in self.direct_posts if self.directs[p["conversation"]] == member_id
        ]


def _root(conversation: str) -> tuple[str, str | None]:
    """`19:…@thread.tacv2;messageid=123` as (the channel, the thread's root activity)."""
    channel, _, root = conversation.partition(";messageid=")
    return channel, root or None


def replies_to(fake: FakeTeams, activity_id: str) -> list[str]:
    """The text of each reply in the thread of `activity_id`, in order."""
    return [
        card_of(r)["body"][0]["text"] for r in fake.replies if r.get("replyToId") == activity_id
    ]


def card_of(activity: Mapping[str, Any]) -> dict[str, Any]:
    """The Adaptive Card an activity carries."""
    return dict(activity["attachments"][0]["content"])
