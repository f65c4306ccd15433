"""A witness for https:// audit anchors (the protocol is in proxy/audit/anchors.py), on a free
loopback port, that tests can turn off and on.

    async with Witness(secret="s3cret") as witness:
        ...  # anchor URL: witness.url
        witness.failing = True   # every request answered 503 (an outage)
        witness.failing = False
        assert witness.records == [...]

- POST `url`: the body must be a JSON object; with a `secret`, the webhook-style signature must
  verify and the timestamp be fresh (else 401, counted in `rejected`). Kept in `records`, its
  `X-Countersign-Event` in `events`; answered 204.
- GET `url`: every record, oldest first, as JSON lines (`as_array = True`: one JSON array). With a
  `secret` and `read_needs_signature` (the default), the GET must be signed over an empty body.

`attempts` counts every request received, failed or not.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

PATH = "/anchor"
MAX_AGE_SECONDS = 300


class Witness:
    def __init__(self, secret: str | None = None, *, read_needs_signature: bool = True) -> None:
        self.secret = secret  # may be changed while running (a rotated secret)
        self.read_needs_signature = read_needs_signature
        self.records: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.failing = False
        self.as_array = False
        self.attempts = 0
        self.rejected = 0
        app = web.Application()
        app.router.add_post(PATH, self._post)
        app.router.add_get(PATH, self._get)
        self._server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        """The anchor URL (valid once started)."""
        return str(self._server.make_url(PATH))

    async def start(self) -> Witness:
        await self._server.start_server()
        return self

    async def close(self) -> None:
        await self._server.close()

    async def __aenter__(self) -> Witness:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _signed(self, request: web.Request, body: bytes) -> bool:
        if self.secret is None:
            return True
        timestamp = request.headers.get("X-Countersign-Timestamp", "")
        signature = request.headers.get("X-Countersign-Signature", "")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > MAX_AGE_SECONDS:
            return False
        mac = hmac.new(self.secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
        return hmac.compare_digest("v1=" + mac.hexdigest(), signature)

    async def _post(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.failing:
            return web.Response(status=503, text="witness unavailable")
        body = await request.read()
        if not self._signed(request, body):
            self.rejected += 1
            return web.Response(status=401, text="bad signature")
        try:
            record = json.loads(body)
        except ValueError:
            return web.Response(status=400, text="not JSON")
        if not isinstance(record, dict):
            return web.Response(status=400, text="not a JSON object")
        self.records.append(record)
        self.events.append(request.headers.get("X-Countersign-Event", ""))
        return web.Response(status=204)

    async def _get(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.failing:
            return web.Response(status=503, text="witness unavailable")
        if self.read_needs_signature and not self._signed(request, b""):
            self.rejected += 1
            return web.Response(status=401, text="bad signature")
        if self.as_array:
            return web.json_response(self.records)
        text = "".join(json.dumps(record) + "\n" for record in self.records)
        return web.Response(text=text, content_type="application/x-ndjson")
