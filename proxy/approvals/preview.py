"""What approvers are shown of a request: the body's raw text, the bound headers, the reason.

Previews show the raw text (never a re-serialized document: duplicate JSON keys and text after
a parse error stay visible), with secrets replaced by the redactor's patterns and the cut
marked. The exact bytes stay available to approvers (`GET …/approvals/{id}/body`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from ..audit.redact import DEFAULT as DEFAULT_REDACTOR
from ..audit.redact import Redactor

PREVIEW_BYTES = 4096
REASON_CHARS = 500


def body_preview(body: bytes, redactor: Redactor = DEFAULT_REDACTOR) -> tuple[str, bool]:
    """The body as approvers see it, and whether it was cut."""
    if not body:
        return "", False
    head = body[:PREVIEW_BYTES]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Cut inside a multi-byte character, or not text at all.
        if len(body) > PREVIEW_BYTES and exc.start >= PREVIEW_BYTES - 3:
            text = head[: exc.start].decode("utf-8")
        else:
            return f"<{len(body)} bytes of binary data: download the body to see it>", False
    cut = len(body) > PREVIEW_BYTES
    text = str(redactor.value(text))
    if cut:
        text += f"\n… [cut: the first {PREVIEW_BYTES} of {len(body)} bytes are shown]"
    return text, cut


def header_view(
    headers: Iterable[tuple[bytes, bytes]], redactor: Redactor = DEFAULT_REDACTOR
) -> tuple[tuple[str, str, bool], ...]:
    """The bound headers as (name, value, redacted): secret values replaced and marked."""
    decoded = [
        (name.decode("latin-1"), value.decode("utf-8", "replace")) for name, value in headers
    ]
    return tuple(
        (entry["name"], entry["value"], bool(entry["redacted"]))
        for entry in redactor.headers(decoded)
    )


def clean_reason(reason: str | None, redactor: Redactor = DEFAULT_REDACTOR) -> str | None:
    """The agent's `Countersign-Reason`, redacted and bounded."""
    if not reason:
        return None
    reason = str(redactor.value(reason.strip()))
    return reason[:REASON_CHARS] if reason else None


TOOL_ARGUMENTS_CHARS = 4096


def tool_arguments(body: bytes, redactor: Redactor = DEFAULT_REDACTOR) -> str | None:
    """For an MCP `tools/call`, its arguments pretty-printed (secret fields blanked, cut past
    `TOOL_ARGUMENTS_CHARS`): what an approver reads first. The raw body stays in the preview."""
    try:
        message = json.loads(body)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("method") != "tools/call":
        return None
    params = message.get("params")
    if not isinstance(params, dict):
        return None
    arguments = params.get("arguments", {})
    text = json.dumps(redactor.value(arguments), indent=2, ensure_ascii=False, sort_keys=True)
    if len(text) > TOOL_ARGUMENTS_CHARS:
        text = text[:TOOL_ARGUMENTS_CHARS] + "\n… [cut: download the body to see all]"
    return text
