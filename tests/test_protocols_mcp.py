"""The MCP recognizer: one action per JSON-RPC message of a Streamable HTTP request."""

from __future__ import annotations

import json
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.model.request import AmbiguousField, RequestBody, UnreadableBody
from proxy.protocols import Message, Unrecognized, recognizer_for

MCP = recognizer_for("mcp")


def post(payload: Any) -> Message:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = CIMultiDict(
        {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    )
    return Message("POST", "/mcp", "/mcp", "", headers, RequestBody(data, "application/json"))


def request(method: str, params: Any = None, id_: int = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": id_, "method": method}
    if params is not None:
        message["params"] = params
    return message


async def test_tools_call_names_the_tool() -> None:
    msg = post(request("tools/call", {"name": "delete_repo", "arguments": {"repo": "x"}}))
    assert await MCP.recognize(msg) == ("tool:delete_repo",)


async def test_other_methods() -> None:
    init = request("initialize", {"protocolVersion": "2025-06-18", "capabilities": {}})
    assert await MCP.recognize(post(init)) == ("mcp:initialize",)
    assert await MCP.recognize(post(request("tools/list"))) == ("mcp:tools/list",)


async def test_notification() -> None:
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert await MCP.recognize(post(note)) == ("mcp:notifications/initialized",)


async def test_response_to_a_server_request() -> None:
    answer = {"jsonrpc": "2.0", "id": 7, "result": {"roots": []}}
    assert await MCP.recognize(post(answer)) == ("mcp:response",)
    failed = {"jsonrpc": "2.0", "id": 8, "error": {"code": -1, "message": "no"}}
    assert await MCP.recognize(post(failed)) == ("mcp:response",)


async def test_batch_names_every_message() -> None:
    batch = [
        request("tools/call", {"name": "read_file"}, 1),
        request("tools/call", {"name": "delete_repo"}, 2),
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}},
        request("tools/call", {"name": "read_file"}, 3),
    ]
    assert await MCP.recognize(post(batch)) == (
        "tool:read_file",
        "tool:delete_repo",
        "mcp:notifications/cancelled",
    )


async def test_get_and_delete() -> None:
    stream = Message("GET", "/mcp", "/mcp", "", CIMultiDict(), None)
    assert await MCP.recognize(stream) == ("mcp:stream",)
    end = Message("DELETE", "/mcp", "/mcp", "", CIMultiDict({"Mcp-Session-Id": "s"}), None)
    assert await MCP.recognize(end) == ("mcp:session/delete",)


@pytest.mark.parametrize(
    "params",
    [None, {}, {"name": 3}, {"name": ""}, {"name": ["delete_repo"]}, ["delete_repo"]],
)
async def test_tools_call_needs_a_string_name(params: Any) -> None:
    with pytest.raises(Unrecognized, match=r"params\.name"):
        await MCP.recognize(post(request("tools/call", params)))


@pytest.mark.parametrize(
    "payload",
    [
        {"id": 1, "method": "tools/list"},  # no jsonrpc
        {"jsonrpc": "1.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 1},  # neither request nor response
        {"jsonrpc": "2.0", "id": 1, "method": 5},
        {"jsonrpc": "2.0", "id": 1, "method": "x", "result": {}},
        {"jsonrpc": "2.0", "id": 1, "result": {}, "error": {}},
        [],
        "tools/call",
        42,
    ],
)
async def test_not_json_rpc_is_unrecognized(payload: Any) -> None:
    with pytest.raises(Unrecognized):
        await MCP.recognize(post(payload))


async def test_bad_entry_in_a_batch_is_named() -> None:
    batch = [request("tools/list"), {"jsonrpc": "2.0", "id": 2, "method": "tools/call"}]
    with pytest.raises(Unrecognized, match="message 2 of the batch"):
        await MCP.recognize(post(batch))


async def test_not_json_is_unreadable() -> None:
    with pytest.raises(UnreadableBody):
        await MCP.recognize(post(b"tools/call delete_repo"))


async def test_duplicate_key_is_ambiguous() -> None:
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "read_file", "name": "delete_repo"}}'
    with pytest.raises(AmbiguousField, match="JSON key 'name'"):
        await MCP.recognize(post(body))


async def test_empty_post_and_other_methods() -> None:
    with pytest.raises(Unrecognized, match="needs a JSON-RPC message"):
        await MCP.recognize(post(b""))
    with pytest.raises(Unrecognized, match="takes POST, GET and DELETE"):
        await MCP.recognize(Message("PUT", "/mcp", "/mcp", "", CIMultiDict(), None))


def test_needs_body() -> None:
    assert MCP.needs_body("POST")
    assert not MCP.needs_body("GET")
    assert not MCP.needs_body("DELETE")
