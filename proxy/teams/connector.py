"""The Bot Connector REST API, as much of it as Countersign uses: a client-credentials token
from the token endpoint (`notify.teams.token_url`, cached until shortly before it expires), post
an activity to a conversation, reply in a card's thread, update one in place, read one member
or the whole roster, and open a 1:1 conversation with a member (the owner's direct message).
Every call's outcome is kept (`seen`) as evidence for readyz (`delivery.TeamsHealth`).

Errors are `ConnectorError` (with the HTTP status and the `Retry-After` Microsoft gave); what is
worth retrying is `retryable`'s business, the waiting `notify.retry`'s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import quote

import aiohttp

from ..store.base import StoreUnavailable
from .cards import encoded

SCOPE = "https://api.botframework.com/.default"
CALL_TIMEOUT = 10.0
_TOKEN_MARGIN = 300.0  # renew this long before the token expires


class ConnectorError(Exception):
    def __init__(self, what: str, status: int, retry_after: float | None, detail: str = ""):
        super().__init__(f"{what} answered HTTP {status}{': ' + detail if detail else ''}")
        self.status = status
        self.retry_after = retry_after


def retryable(exc: BaseException) -> bool:
    """Microsoft (or the store) did not answer usefully now; the same call may work later."""
    if isinstance(exc, ConnectorError):
        return exc.status == 429 or exc.status >= 500
    return isinstance(exc, aiohttp.ClientError | TimeoutError | StoreUnavailable)


def retry_after(exc: BaseException) -> float | None:
    return exc.retry_after if isinstance(exc, ConnectorError) else None


def refused_payload(exc: BaseException) -> bool:
    """Teams refused the message itself (too large, or a card it does not take)."""
    return isinstance(exc, ConnectorError) and exc.status in (400, 413)


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    try:
        return max(float(resp.headers.get("Retry-After", "")), 0.0)
    except ValueError:
        return None


class BotConnector:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        app_id: str,
        app_password: str,
        token_url: str,
        call_timeout: float = CALL_TIMEOUT,
    ) -> None:
        self._session = session
        self._app_id = app_id
        self._app_password = app_password
        self._token_url = token_url
        self._timeout = aiohttp.ClientTimeout(total=call_timeout)
        self._token: tuple[str, float] | None = None  # (token, monotonic expiry)
        self._lock = asyncio.Lock()
        # (monotonic time, Microsoft answered and took our credentials) of the last call.
        self.seen: tuple[float, bool] | None = None

    def _record(self, status: int | None) -> None:
        ok = status is not None and status < 500 and status not in (401, 403)
        self.seen = (time.monotonic(), ok)

    async def token(self) -> str:
        """A client-credentials token: the cached one while it is valid, else a new one."""
        return await self._bearer()

    async def _bearer(self) -> str:
        async with self._lock:
            if self._token is not None and time.monotonic() < self._token[1]:
                return self._token[0]
            form = {
                "grant_type": "client_credentials",
                "client_id": self._app_id,
                "client_secret": self._app_password,
                "scope": SCOPE,
            }
            try:
                async with self._session.post(
                    self._token_url, data=form, timeout=self._timeout, allow_redirects=False
                ) as resp:
                    self.seen = (time.monotonic(), resp.status == 200)
                    if resp.status != 200:
                        raise ConnectorError("the token endpoint", resp.status, _retry_after(resp))
                    data = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError):
                self._record(None)
                raise
            token = str(data.get("access_token") or "")
            if not token:
                raise ConnectorError("the token endpoint", 502, None, "no access_token")
            lifetime = float(data.get("expires_in") or 3600)
            self._token = (token, time.monotonic() + max(lifetime - _TOKEN_MARGIN, 30.0))
            return token

    async def _call(
        self, method: str, url: str, what: str, payload: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        data = await self._json(method, url, what, payload)
        return data if isinstance(data, dict) else {}

    async def _json(
        self, method: str, url: str, what: str, payload: dict[str, Any] | None = None
    ) -> Any:
        headers = {"Authorization": "Bearer " + await self._bearer()}
        body = None
        if payload is not None:
            body = encoded(payload)
            headers["Content-Type"] = "application/json; charset=utf-8"
        try:
            async with self._session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                self._record(resp.status)
                if resp.status == 401:
                    self._token = None  # fetch a new one next time
                if resp.status >= 300:
                    detail = (await resp.text())[:200]
                    raise ConnectorError(what, resp.status, _retry_after(resp), detail)
                data = await resp.json(content_type=None) if resp.content_length != 0 else {}
        except (aiohttp.ClientError, TimeoutError):
            self._record(None)
            raise
        return data

    @staticmethod
    def _base(service_url: str, conversation: str) -> str:
        return f"{service_url.rstrip('/')}/v3/conversations/{quote(conversation, safe='')}"

    async def post(self, service_url: str, conversation: str, activity: dict[str, Any]) -> str:
        """Post `activity`; its id."""
        url = self._base(service_url, conversation) + "/activities"
        data = await self._call("POST", url, "posting the card", activity)
        return str(data.get("id") or "")

    async def reply(
        self, service_url: str, conversation: str, activity_id: str, activity: dict[str, Any]
    ) -> str:
        """Post `activity` as a reply in the thread of `activity_id` (a channel message); its
        id. Teams threads by the conversation id `<channel>;messageid=<root id>`."""
        url = self._base(service_url, f"{conversation};messageid={activity_id}") + "/activities"
        data = await self._call(
            "POST", url, "replying in the thread", {**activity, "replyToId": activity_id}
        )
        return str(data.get("id") or "")

    async def update(
        self, service_url: str, conversation: str, activity_id: str, activity: dict[str, Any]
    ) -> None:
        url = f"{self._base(service_url, conversation)}/activities/{quote(activity_id, safe='')}"
        await self._call("PUT", url, "updating the card", {**activity, "id": activity_id})

    async def member(self, service_url: str, conversation: str, member_id: str) -> dict[str, Any]:
        url = f"{self._base(service_url, conversation)}/members/{quote(member_id, safe='')}"
        return await self._call("GET", url, "reading the roster")

    async def members(self, service_url: str, conversation: str) -> list[dict[str, Any]]:
        """The whole roster of `conversation`."""
        url = f"{self._base(service_url, conversation)}/members"
        data = await self._json("GET", url, "reading the roster")
        return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []

    async def open_direct(self, service_url: str, member_id: str, tenant_id: str) -> str:
        """A 1:1 conversation between the bot and `member_id` (Teams gives the existing one if
        there is one); its id."""
        url = f"{service_url.rstrip('/')}/v3/conversations"
        payload = {
            "bot": {"id": f"28:{self._app_id}"},
            "members": [{"id": member_id}],
            "isGroup": False,
            "tenantId": tenant_id,
            "channelData": {"tenant": {"id": tenant_id}},
        }
        data = await self._call("POST", url, "opening a direct conversation", payload)
        conversation = str(data.get("id") or "")
        if not conversation:
            raise ConnectorError("opening a direct conversation", 502, None, "no id")
        return conversation
