"""The official MCP client (SDK `mcp` 2.x) as the tests' agent, over Streamable HTTP.

A test that puts Countersign in front of an MCP server must speak to it exactly as a real agent
does, so these helpers drive the SDK's own `Client` + `streamable_http_client`; the only
additions are extra HTTP headers on every request (the proxy wants `Authorization: Bearer …`).

What the client sends depends on `mode` (the SDK's `Client(mode=...)`):

- `"auto"` (the SDK's default, so what an agent gets): one `server/discover` POST first; a
  server that answers it (the SDK's `MCPServer` does) is then spoken to in the stateless
  2026-07-28 protocol: every request a self-contained POST carrying `MCP-Protocol-Version`,
  `Mcp-Method` (and `Mcp-Name` for `tools/call`) headers and a `params._meta` envelope; no
  `initialize`, no `Mcp-Session-Id`, no GET stream, no DELETE at close. A server that refuses
  `server/discover` (any JSON-RPC error, or any HTTP 4xx) gets the `"legacy"` handshake instead.
- `"legacy"`: `initialize` POST, `notifications/initialized` POST (answered 202), then a GET
  SSE stream for server-initiated messages stays open for the whole session, and at close a
  DELETE ends the `Mcp-Session-Id` session.

Either way, after a tools/call whose result is not `isError`, a client that has not listed that
tool on this connection sends `tools/list` (to check the result against the tool's output
schema): a refused `tools/list` then fails a call that did run.

Each helper opens a connection, does its one thing and closes it. Errors are raised as the SDK
raises them at the call site (an exception leaving `async with Client(...)` would come out
wrapped twice in `ExceptionGroup` by the SDK's task groups; the helpers re-raise it bare):

- a JSON-RPC error answer (any HTTP status, JSON body) → `mcp.shared.exceptions.MCPError` with
  its code, message and data;
- an HTTP 4xx/5xx whose body is not a JSON-RPC error → `MCPError` with a stand-in, the body
  unseen: -32603 "Server returned an error response" (a 404: -32600 "Session terminated", or
  -32601 "Not Found" before a session exists);
- a result the SDK cannot validate → `pydantic.ValidationError` (at 2026-07-28 a result without
  `"resultType": "complete"` is one);
- a tool result with `isError: true` is returned, not raised.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal

from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.dispatcher import ProgressFnT
from mcp_types import CallToolResult

Mode = Literal["auto", "legacy"]
ProgressCallback = ProgressFnT
"""`async def on_progress(progress: float, total: float | None, message: str | None) -> None`,
called once per `notifications/progress` (the SDK's `ProgressFnT`)."""


@asynccontextmanager
async def open_client(
    url: str,
    headers: Mapping[str, str] | None = None,
    *,
    timeout: float | None = 30.0,  # noqa: ASYNC109 - the SDK's per-request read timeout
    mode: Mode = "auto",
) -> AsyncIterator[Client]:
    """A connected SDK `Client` (handshake done) for several calls on one connection.

    `timeout` is the SDK's per-request read timeout (`Client(read_timeout_seconds=...)`): how
    long one request may wait for its answer, progress notifications or not; `None` waits
    forever. Underneath, the HTTP client keeps the SDK's defaults (`create_mcp_http_client`):
    30 s to connect/write, 300 s between two reads of a response.
    """
    async with (
        create_mcp_http_client(headers=dict(headers or {})) as http,
        Client(
            streamable_http_client(url, http_client=http),
            mode=mode,
            read_timeout_seconds=timeout,
        ) as client,
    ):
        yield client


async def call_tool(
    url: str,
    headers: Mapping[str, str] | None,
    name: str,
    arguments: dict[str, Any] | None = None,
    *,
    on_progress: ProgressCallback | None = None,
    timeout: float | None = 30.0,  # noqa: ASYNC109 - the SDK's per-request read timeout
    mode: Mode = "auto",
) -> CallToolResult:
    """Connect, call tool `name`, close. With `on_progress` the request carries
    `params._meta.progressToken` (the JSON-RPC id, an int) and every matching
    `notifications/progress` reaches the callback.

    Returns the result as the agent sees it (`isError` results included: they are not raised);
    raises `MCPError` for a JSON-RPC error or an HTTP refusal.
    """
    failure: Exception | None = None
    async with open_client(url, headers, timeout=timeout, mode=mode) as client:
        try:
            return await client.call_tool(name, arguments or {}, progress_callback=on_progress)
        except Exception as error:  # raised below, outside the SDK's task groups
            failure = error
    assert failure is not None
    raise failure


async def list_tools(
    url: str,
    headers: Mapping[str, str] | None = None,
    *,
    timeout: float | None = 30.0,  # noqa: ASYNC109 - the SDK's per-request read timeout
    mode: Mode = "auto",
) -> list[str]:
    """Connect, list the tools' names, close."""
    failure: Exception | None = None
    async with open_client(url, headers, timeout=timeout, mode=mode) as client:
        try:
            result = await client.list_tools()
            return [tool.name for tool in result.tools]
        except Exception as error:  # raised below, outside the SDK's task groups
            failure = error
    assert failure is not None
    raise failure
