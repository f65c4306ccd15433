"""What an MCP client hears from Countersign (DESIGN §2 "MCP"), shaped as MCP, not as HTTP.

An MCP client (and the model behind it) reads tool results, not HTTP statuses: a 403 surfaces
as a transport error and the model never learns that a human said no, or why. So on a route with
`protocol: mcp`, for a single JSON-RPC `tools/call`:

- a refusal (policy deny, approval denied, expired, lapsed, used, an upstream that failed after
  the approved call was sent) is a JSON-RPC *result* with `isError: true` whose text is the
  sentence a model can act on ("Denied by bob@example.com: not on Fridays. …");
- a held call, when the client accepts `text/event-stream` (every Streamable HTTP client does),
  is answered at once as an SSE stream that carries `notifications/progress` while a human
  decides (when the client sent a progress token; an SSE comment otherwise, so that nothing on
  the way times the connection out), then the tool's own result, relayed.

Everything else on an MCP route (initialize, tools/list, batches, notifications) is judged and
answered like any request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDictProxy

from ..front.message import Answer
from ..model import RequestBody

__all__ = [
    "McpCall",
    "filter_tools",
    "json_answer",
    "mcp_tool_call",
    "progress_event",
    "sse_data",
    "sse_event",
    "tool_error",
]

SSE_CONTENT_TYPE = "text/event-stream"
_VERSION_META = "io.modelcontextprotocol/protocolVersion"
_STATELESS_SINCE = "2026-07-28"  # protocol versions are dates: they compare as text


@dataclass(frozen=True, slots=True)
class McpCall:
    """A single JSON-RPC `tools/call` request: what its answer must echo and allow."""

    id: Any  # the JSON-RPC id, echoed as sent (string or number)
    tool: str
    progress_token: Any  # params._meta.progressToken, or None
    accepts_sse: bool  # the client takes a text/event-stream answer
    # Spoken in the stateless protocol revisions (2026-07-28 on), whose results must say
    # `resultType` (the official SDK refuses a result without it).
    stateless: bool = False


def mcp_tool_call(headers: CIMultiDictProxy[str], body: RequestBody | None) -> McpCall | None:
    """The `tools/call` this request is, or None (another method, a batch, a notification)."""
    if body is None:
        return None
    try:
        message = body.json()
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("method") != "tools/call":
        return None
    if "id" not in message:
        return None
    params = message.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("name"), str):
        return None
    meta = params.get("_meta")
    token = meta.get("progressToken") if isinstance(meta, dict) else None
    accept = ",".join(headers.getall("Accept", ())).lower()
    version = headers.get("MCP-Protocol-Version", "")
    if isinstance(meta, dict) and isinstance(meta.get(_VERSION_META), str):
        version = meta[_VERSION_META]
    return McpCall(
        id=message["id"],
        tool=params["name"],
        progress_token=token,
        accepts_sse=SSE_CONTENT_TYPE in accept,
        stateless=version >= _STATELESS_SINCE,
    )


def tool_error(call: McpCall, text: str) -> dict[str, Any]:
    """A JSON-RPC result saying the tool did not run, in words the model reads."""
    result: dict[str, Any] = {"content": [{"type": "text", "text": text}], "isError": True}
    if call.stateless:
        result["resultType"] = "complete"
    return {"jsonrpc": "2.0", "id": call.id, "result": result}


def sse_event(message: dict[str, Any]) -> bytes:
    """One JSON-RPC message as an SSE `message` event."""
    return b"event: message\ndata: " + json.dumps(message).encode() + b"\n\n"


def sse_data(body: bytes) -> bytes:
    """An upstream's JSON answer as one SSE `message` event (a line break inside the JSON
    becomes a new `data:` line, which SSE joins back with a line break)."""
    lines = body.strip().splitlines() or [b""]
    return b"event: message\n" + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


def progress_event(call: McpCall, progress: int, text: str) -> bytes:
    """A progress notification for `call` (or a comment, when it carries no progress token:
    bytes on the wire keep proxies and load balancers from closing an idle stream)."""
    if call.progress_token is None:
        return b": " + text.replace("\n", " ").encode() + b"\n\n"
    return sse_event(
        {
            "jsonrpc": "2.0",
            "method": "notifications/progress",
            "params": {"progressToken": call.progress_token, "progress": progress, "message": text},
        }
    )


def json_answer(message: dict[str, Any], headers: dict[str, str]) -> Answer:
    """A JSON-RPC message as a plain `application/json` answer (HTTP 200, as MCP expects)."""
    return Answer(
        200,
        json.dumps(message).encode(),
        [("Content-Type", "application/json; charset=utf-8"), *headers.items()],
    )


def filter_tools(body: bytes, keep: Callable[[str], bool]) -> bytes | None:
    """A tools/list answer (JSON, or SSE events as a legacy server sends them) without the
    tools `keep` refuses; None when it is not one that can be read (relayed unchanged then:
    hiding is a courtesy, every call is judged anyway)."""
    text = body.decode("utf-8", "replace")
    if text.lstrip().startswith("{"):
        filtered = _filtered_message(text, keep)
        return None if filtered is None else filtered.encode()
    # SSE: rewrite the data of the event that carries the result; the rest stays as it was.
    out: list[str] = []
    changed = False
    for event in re.split(r"(\r?\n\r?\n)", text):
        lines = event.splitlines()
        data = [line[5:].lstrip() for line in lines if line.startswith("data:")]
        filtered = _filtered_message("\n".join(data), keep) if data else None
        if filtered is None:
            out.append(event)
            continue
        others = [line for line in lines if not line.startswith("data:")]
        out.append("\n".join([*others, f"data: {filtered}"]))
        changed = True
    return "".join(out).encode() if changed else None


def _filtered_message(text: str, keep: Callable[[str], bool]) -> str | None:
    try:
        message = json.loads(text)
    except ValueError:
        return None
    result = message.get("result") if isinstance(message, dict) else None
    tools = result.get("tools") if isinstance(result, dict) else None
    if not isinstance(tools, list) or not isinstance(result, dict):
        return None
    result["tools"] = [
        tool
        for tool in tools
        if not (isinstance(tool, dict) and isinstance(tool.get("name"), str)) or keep(tool["name"])
    ]
    return json.dumps(message)
