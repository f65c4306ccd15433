"""A tiny OpenAI-compatible upstream for the SDK tests, on a loopback aiohttp TestServer.

- GET /v1/models: a model list
- POST /v1/chat/completions: a fixed completion in OpenAI's schema
- DELETE /v1/models/{id}: {"id", "object": "model", "deleted": true}

Every answer carries `X-Request-Id: req_upstream_<n>`; every request is recorded in
`OpenAIUpstream.requests` (method, path, headers, body).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

MODEL = "gpt-test-1"
COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-countersign-1",
    "object": "chat.completion",
    "created": 1767225600,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello from the fake upstream."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15},
}


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class OpenAIUpstream:
    server: TestServer
    requests: list[Recorded] = field(default_factory=list)

    @property
    def v1(self) -> str:
        """The upstream URL a Countersign route points at."""
        return str(self.server.make_url("/v1/"))


def openai_app(requests: list[Recorded]) -> web.Application:
    counter = itertools.count(1)

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        requests.append(
            Recorded(
                request.method,
                request.raw_path,
                {k.lower(): v for k, v in request.headers.items()},
                await request.read(),
            )
        )
        response: web.StreamResponse = await handler(request)
        response.headers["X-Request-Id"] = f"req_upstream_{next(counter)}"
        return response

    async def models(_: web.Request) -> web.Response:
        model = {"id": MODEL, "object": "model", "created": 1767225600, "owned_by": "countersign"}
        return web.json_response({"object": "list", "data": [model]})

    async def chat(_: web.Request) -> web.Response:
        return web.json_response(COMPLETION)

    async def delete_model(request: web.Request) -> web.Response:
        model_id = request.match_info["id"]
        return web.json_response({"id": model_id, "object": "model", "deleted": True})

    app = web.Application(middlewares=[record])
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_delete("/v1/models/{id}", delete_model)
    return app


@asynccontextmanager
async def openai_upstream() -> AsyncIterator[OpenAIUpstream]:
    requests: list[Recorded] = []
    server = TestServer(openai_app(requests))
    await server.start_server()
    try:
        yield OpenAIUpstream(server, requests)
    finally:
        await server.close()
