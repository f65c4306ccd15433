"""JSON error answers: every refusal the proxy makes has a JSON body naming the error."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

REQUEST_ID_HEADER = "X-Request-Id"
APPROVAL_ID_HEADER = "Countersign-Approval-Id"  # on the answer to an approved request
APPROVAL_HEADER = "Countersign-Approval"  # async mode: the client names the approval to use
REASON_HEADER = "Countersign-Reason"  # the agent's stated intent, shown to approvers


def error_response(
    status: int,
    error: str,
    *,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> web.Response:
    body: dict[str, Any] = {"error": error, **{k: v for k, v in fields.items() if v is not None}}
    if request_id is not None:
        body["request_id"] = request_id
    out_headers = dict(headers or {})
    if request_id is not None:
        out_headers[REQUEST_ID_HEADER] = request_id
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=out_headers,
    )
