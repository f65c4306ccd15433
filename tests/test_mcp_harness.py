"""The MCP harness itself, with no proxy: the SDK server (tests/mcp_upstream.py) answers the SDK
client (tests/mcp_client.py) directly, so a proxy test that fails can blame the proxy."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.mcp_client import Mode, call_tool, list_tools, open_client
from tests.mcp_upstream import McpUpstream, mcp_upstream

MODES: list[Mode] = ["auto", "legacy"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpUpstream]:
    with mcp_upstream(tmp_path_factory.mktemp("mcp")) as server:
        yield server


@pytest.mark.parametrize("mode", MODES)
async def test_list_tools(upstream: McpUpstream, mode: Mode) -> None:
    names = await list_tools(upstream.url, {"Authorization": "Bearer ignored"}, mode=mode)
    assert names == ["list_repos", "delete_repo", "slow"]


@pytest.mark.parametrize("mode", MODES)
async def test_delete_repo_runs_and_is_recorded(upstream: McpUpstream, mode: Mode) -> None:
    before = len(upstream.calls())
    result = await call_tool(upstream.url, {}, "delete_repo", {"name": f"repo-{mode}"}, mode=mode)
    assert not result.is_error
    assert [c.model_dump()["text"] for c in result.content] == [f"deleted repo-{mode}"]
    assert result.structured_content == {"result": f"deleted repo-{mode}"}
    assert upstream.calls()[before:] == [
        {"tool": "delete_repo", "arguments": {"name": f"repo-{mode}"}}
    ]


async def test_list_repos(upstream: McpUpstream) -> None:
    result = await call_tool(upstream.url, {}, "list_repos", {})
    assert result.structured_content == {"result": ["alpha", "beta"]}


@pytest.mark.parametrize("mode", MODES)
async def test_progress_reaches_the_callback(upstream: McpUpstream, mode: Mode) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    result = await call_tool(
        upstream.url, {}, "slow", {"seconds": 0.3}, on_progress=on_progress, mode=mode
    )
    assert [c.model_dump()["text"] for c in result.content] == ["slept 0.3"]
    assert sorted(seen) == [
        (1.0, 3.0, "step 1 of 3"),
        (2.0, 3.0, "step 2 of 3"),
        (3.0, 3.0, "step 3 of 3"),
    ]


async def test_unknown_tool_is_an_error_result(upstream: McpUpstream) -> None:
    result = await call_tool(upstream.url, {}, "no_such_tool", {})
    assert result.is_error
    assert [c.model_dump()["text"] for c in result.content] == ["Unknown tool: no_such_tool"]


async def test_several_calls_on_one_connection(upstream: McpUpstream) -> None:
    async with open_client(upstream.url, mode="legacy") as client:
        first = await client.call_tool("list_repos", {})
        second = await client.call_tool("delete_repo", {"name": "gamma"})
    assert first.structured_content == {"result": ["alpha", "beta"]}
    assert second.structured_content == {"result": "deleted gamma"}


async def test_a_proxys_host_header_is_accepted(upstream: McpUpstream) -> None:
    """DNS-rebinding protection is off: a request forwarded with the proxy's Host still runs."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "list_repos", "arguments": {}, "_meta": meta},
    }
    headers = {
        "Host": "countersign.example:8443",
        "Origin": "https://elsewhere.example",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "list_repos",
    }
    async with httpx.AsyncClient() as http:
        response = await http.post(upstream.url, json=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["result"]["structuredContent"] == {"result": ["alpha", "beta"]}


def test_starts_fast_and_stops_cleanly(tmp_path: Path) -> None:
    started = time.monotonic()
    with mcp_upstream(tmp_path) as server:
        assert time.monotonic() - started < 10
        assert server.proc.poll() is None
        assert server.calls() == []
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: -15 is a clean stop.
    assert server.proc.returncode == -signal.SIGTERM
    assert "Traceback" not in server.log_file.read_text()
    server.stop()  # idempotent
