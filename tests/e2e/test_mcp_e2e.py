"""An MCP agent behind Countersign: the official `mcp` SDK's client, through the real
`countersign run`, to a real MCP server (the SDK's own, over Streamable HTTP).

A held `tools/call` keeps the client informed while a human decides (progress notifications it
hands to its callback), then gets the tool's real result; a denial, by a human or by the policy,
is a tool result with `isError` whose text the model reads; the upstream runs only what was
approved. Both the current stateless protocol and the legacy session one are exercised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Process, free_port
from tests.e2e.test_approvals_e2e import decide_pending
from tests.idp_fixture import TestIdP
from tests.mcp_client import call_tool, list_tools
from tests.mcp_upstream import McpUpstream, mcp_upstream

StartFn = Callable[[str, int], Process]
WAIT = 20  # seconds: the bound on every wait in this file


def config(port: int, upstream: str, issuer: str) -> str:
    return f"""
server:
  listen: "127.0.0.1:{port}"
identity:
  issuers: [{{issuer: "{issuer}", audiences: [countersign]}}]
routes:
  - {{name: tools, prefix: /mcp, upstream: "{upstream}", protocol: mcp}}
  - {{name: curated, prefix: /curated, upstream: "{upstream}", protocol: mcp,
     hide_denied_tools: true}}
approvals:
  timeout_seconds: 60
policy:
  rules:
    - {{name: plumbing, actions: ["mcp:*"], action: allow}}
    - {{name: reads, actions: ["tool:list_repos"], action: allow}}
    - {{name: no-sleeping, actions: ["tool:slow"], action: deny}}
    - name: deletes-need-a-human
      actions: ["tool:delete_repo"]
      when: {{json: {{"/params/arguments/name": [alpha, prod]}}}}
      action: approve
      approvers: {{groups: [data-owners]}}
    - {{name: other-deletes, actions: ["tool:delete_repo"], action: deny}}
"""


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpUpstream]:
    with mcp_upstream(Path(tmp_path_factory.mktemp("mcp"))) as upstream:
        yield upstream


@pytest.fixture
async def proxy(run_countersign: StartFn, tools: McpUpstream, idp: TestIdP) -> Process:
    port = free_port()
    return run_countersign(config(port, tools.url, idp.issuer), port)


async def agent(idp: TestIdP) -> dict[str, str]:
    return {"Authorization": f"Bearer {await idp.token('agent-7')}"}


def deletes(tools: McpUpstream) -> list[Any]:
    return [call["arguments"] for call in tools.calls() if call["tool"] == "delete_repo"]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_reads_pass_and_a_held_delete_runs_once_approved(
    proxy: Process, tools: McpUpstream, idp: TestIdP, mode: str
) -> None:
    headers = await agent(idp)
    names = await list_tools(f"{proxy.url}/mcp", headers, mode=mode)
    assert {"list_repos", "delete_repo"} <= set(names)
    listed = await call_tool(f"{proxy.url}/mcp", headers, "list_repos", {}, mode=mode)
    assert not listed.is_error
    before = len(deletes(tools))

    heard: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        heard.append(message or "")

    call = asyncio.create_task(
        call_tool(
            f"{proxy.url}/mcp",
            headers,
            "delete_repo",
            {"name": "alpha"},
            on_progress=on_progress,
            timeout=WAIT + 10,
            mode=mode,
        )
    )
    shown = await decide_pending(proxy.url, idp, "approve", "cleanup is due")
    assert shown["actions"] == ["tool:delete_repo"]
    assert shown["tool_arguments"] == '{\n  "name": "alpha"\n}'
    result = await asyncio.wait_for(call, WAIT)
    assert not result.is_error
    assert result.content[0].text == "deleted alpha"
    assert heard and heard[0].startswith("Waiting for a human to approve tool delete_repo")
    assert deletes(tools)[before:] == [{"name": "alpha"}], "ran once, as approved"


async def test_a_human_denial_is_a_tool_error_the_model_reads(
    proxy: Process, tools: McpUpstream, idp: TestIdP
) -> None:
    headers = await agent(idp)
    before = len(deletes(tools))
    call = asyncio.create_task(
        call_tool(f"{proxy.url}/mcp", headers, "delete_repo", {"name": "prod"}, timeout=WAIT + 10)
    )
    await decide_pending(proxy.url, idp, "deny", "prod stays")
    result = await asyncio.wait_for(call, WAIT)
    assert result.is_error
    text = result.content[0].text
    assert text.startswith("Denied by bob@example.com: prod stays. Do not retry this request")
    assert "approval apr_" in text
    assert len(deletes(tools)) == before, "nothing ran"


async def test_a_policy_denial_is_a_tool_error_too(
    proxy: Process, tools: McpUpstream, idp: TestIdP
) -> None:
    headers = await agent(idp)
    before = len(deletes(tools))
    result = await call_tool(f"{proxy.url}/mcp", headers, "delete_repo", {"name": "beta"})
    assert result.is_error
    assert result.content[0].text.startswith("the policy denies this request (rule other-deletes)")
    assert len(deletes(tools)) == before


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_curated_route_lists_only_the_tools_the_caller_may_call(
    proxy: Process, idp: TestIdP, mode: str
) -> None:
    headers = await agent(idp)
    everything = await list_tools(f"{proxy.url}/mcp", headers, mode=mode)
    assert {"list_repos", "delete_repo", "slow"} <= set(everything)
    curated = await list_tools(f"{proxy.url}/curated", headers, mode=mode)
    # slow is denied whatever its arguments; delete_repo may be approved for some, so it stays.
    assert "slow" not in curated
    assert {"list_repos", "delete_repo"} <= set(curated)
    # Hidden or not, a call is judged as always.
    result = await call_tool(f"{proxy.url}/curated", headers, "slow", {"seconds": 0}, mode=mode)
    assert result.is_error and "no-sleeping" in result.content[0].text
