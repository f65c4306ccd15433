"""MCP (Streamable HTTP transport, JSON-RPC 2.0): one action per JSON-RPC message.

A POST carries one JSON-RPC message or a batch (a JSON array) of them, and the server acts on
every one, so every one is named:

- a `tools/call` request → `tool:NAME` (`params.name`, the tool that will run);
- any other request or notification → `mcp:METHOD` (`mcp:initialize`, `mcp:tools/list`,
  `mcp:notifications/initialized`);
- a response (the client answering a server's request: `result` or `error`, no `method`) →
  `mcp:response`.

A GET opens the server-to-client SSE stream (`mcp:stream`); a DELETE ends the session
(`mcp:session/delete`). The JSON-RPC `id` and anything else the client labels a message with are
not used. A body that is not JSON raises `UnreadableBody`; JSON that is not JSON-RPC shaped raises
`Unrecognized`: a server might still act on it, and we could not say how.
"""

from __future__ import annotations

from typing import Any

from proxy.protocols import Message, Unrecognized

__all__ = ["RECOGNIZER", "McpRecognizer"]


class McpRecognizer:
    """Names MCP Streamable HTTP requests."""

    name = "mcp"

    def needs_body(self, method: str) -> bool:
        return method.upper() == "POST"

    async def recognize(self, message: Message) -> tuple[str, ...]:
        method = message.method.upper()
        if method == "GET":
            return ("mcp:stream",)
        if method == "DELETE":
            return ("mcp:session/delete",)
        if method != "POST":
            raise Unrecognized(
                f"an MCP endpoint takes POST, GET and DELETE; cannot tell what {method} does"
            )
        if message.body is None or not message.body.data.strip():
            raise Unrecognized("an MCP POST needs a JSON-RPC message in its body")
        document = message.body.json()  # UnreadableBody / AmbiguousField propagate
        if isinstance(document, list):
            if not document:
                raise Unrecognized("the JSON-RPC batch is empty")
            messages: list[Any] = document
        else:
            messages = [document]
        actions: dict[str, None] = {}  # ordered set: first occurrence wins the position
        for index, item in enumerate(messages):
            where = f"message {index + 1} of the batch" if isinstance(document, list) else ""
            actions[_action(item, where)] = None
        return tuple(actions)


def _action(item: Any, where: str) -> str:
    at = f" ({where})" if where else ""
    if not isinstance(item, dict) or item.get("jsonrpc") != "2.0":
        raise Unrecognized(f"the body is not a JSON-RPC 2.0 message{at}")
    if "method" in item:
        method = item["method"]
        if not isinstance(method, str) or not method:
            raise Unrecognized(f"the JSON-RPC method must be a non-empty string{at}")
        if "result" in item or "error" in item:
            raise Unrecognized(f"a JSON-RPC message cannot be both a request and a response{at}")
        if method == "tools/call":
            params = item.get("params")
            name = params.get("name") if isinstance(params, dict) else None
            if not isinstance(name, str) or not name:
                raise Unrecognized(f"a tools/call request needs params.name, a string{at}")
            return f"tool:{name}"
        return f"mcp:{method}"
    if ("result" in item) != ("error" in item) and "id" in item:
        return "mcp:response"
    raise Unrecognized(
        f"the JSON-RPC message is neither a request (method) nor a response (id with result "
        f"or error){at}"
    )


RECOGNIZER = McpRecognizer()
