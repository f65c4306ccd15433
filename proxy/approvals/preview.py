"""What an approval is about: the request fingerprint and what approvers are shown of it.

Pure code. The fingerprint binds an approval to one exact request by one identity: SHA-256 over
method, normalized path, sorted query, route, the requester's issuer and subject, and the body
bytes. Any difference means a different request, which needs its own approval.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode

from ..audit.redact import DEFAULT as DEFAULT_REDACTOR
from ..audit.redact import REDACTED, Redactor

_FORM = re.compile(r"[\w.\-\[\]%+]+=[^&]*(&[\w.\-\[\]%+]+=[^&]*)*")

PREVIEW_BYTES = 2048
REASON_CHARS = 500


def canonical_query(query: str) -> str:
    """The query with its parameters sorted, so `b=2&a=1` and `a=1&b=2` are the same request."""
    if not query:
        return ""
    pairs = parse_qsl(query, keep_blank_values=True)
    # Sorted by name only (a stable sort): repeated parameters keep their order, which some
    # upstreams give meaning to ("last one wins").
    return urlencode(sorted(pairs, key=lambda pair: pair[0]))


def fingerprint(
    *,
    method: str,
    path: str,
    query: str,
    route: str,
    issuer: str,
    subject: str,
    body: bytes,
) -> str:
    digest = hashlib.sha256()
    for part in (method, path, canonical_query(query), route, issuer, subject):
        encoded = part.encode("utf-8", "surrogateescape")
        # Length-prefixed, so no two different tuples can produce the same byte stream.
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    digest.update(len(body).to_bytes(8, "big"))
    digest.update(body)
    return digest.hexdigest()


def body_preview(
    body: bytes, content_type: str | None, redactor: Redactor = DEFAULT_REDACTOR
) -> str:
    """A redacted, truncated view of the body for approvers; never the raw secret values."""
    if not body:
        return ""
    text: str | None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None:
        return f"<{len(body)} bytes of binary data>"
    text = _redact_structured(text, (content_type or "").lower(), redactor)
    if len(text) > PREVIEW_BYTES:
        return text[:PREVIEW_BYTES] + f"… ({len(body)} bytes in all)"
    return text


def _redact_structured(text: str, content_type: str, redactor: Redactor) -> str:
    """Redact secret-named fields in JSON or form bodies (whatever the declared type), then
    secret-looking values anywhere."""
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        try:
            parsed: Any = json.loads(text)
        except ValueError:
            pass
        else:
            return json.dumps(redactor.value(parsed), ensure_ascii=False)
    if "form-urlencoded" in content_type or _FORM.fullmatch(stripped.rstrip()):
        pairs = parse_qsl(stripped, keep_blank_values=True)
        return "&".join(
            f"{name}={REDACTED if redactor.is_sensitive_field(name) else redactor.value(value)}"
            for name, value in pairs
        )
    return str(redactor.value(text))


def clean_reason(reason: str | None, redactor: Redactor = DEFAULT_REDACTOR) -> str | None:
    """The agent's `Countersign-Reason`, redacted and bounded."""
    if not reason:
        return None
    reason = str(redactor.value(reason.strip()))
    return reason[:REASON_CHARS] if reason else None
