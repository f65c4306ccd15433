"""`when.json`: for each JSON Pointer (RFC 6901) the rule names, the value it points to in the
request's JSON body is one of those listed.

A pointer to an array passes when any element does (as a list claim); numbers and booleans
compare by their JSON text (`1` → "1", `true` → "true"); objects and null never pass. A body
that is not meant as JSON (a form, a file, nothing), one not read (`request.body` is None) or a
pointer leading nowhere fails the condition; a body meant as JSON (a JSON Content-Type, or `{` /
`[` first) that does not parse raises `UnreadableBody` (the server answers 400), since a more
lenient upstream might find the fields in it. A key repeated anywhere in the
document raises `AmbiguousField` (the server answers 400): the upstream might keep the other
value. The body is parsed once, the
first time a rule still in the running asks. Pure code: no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ...model import UnreadableBody
from .fields import FieldCondition, FieldEntry

if TYPE_CHECKING:
    from ...config import Accepted, RuleSettings
    from ...model import Identity, RequestInfo

__all__ = ["JsonFieldsCondition", "json_pointer", "resolve_pointer"]

_INDEX = re.compile(r"0|[1-9][0-9]*")
_MISSING: Any = object()


def json_pointer(pointer: str) -> tuple[str, ...]:
    """A JSON Pointer's reference tokens, unescaped ("/a~1b/0" → ("a/b", "0"))."""
    if not pointer:
        return ()
    return tuple(token.replace("~1", "/").replace("~0", "~") for token in pointer[1:].split("/"))


def resolve_pointer(document: Any, tokens: Sequence[str]) -> Any:
    """The value `tokens` point to in `document`, or `_MISSING`."""
    value = document
    for token in tokens:
        if isinstance(value, dict):
            value = value.get(token, _MISSING)
            if value is _MISSING:
                return _MISSING
        elif isinstance(value, list):
            if not _INDEX.fullmatch(token) or int(token) >= len(value):
                return _MISSING  # also "-", the element after the last
            value = value[int(token)]
        else:
            return _MISSING
    return value


_BOM = b"\xef\xbb\xbf"


def _looks_like_json(data: bytes, content_type: str | None) -> bool:
    """Whether a body is meant as JSON: a JSON Content-Type, or an object or array after
    whitespace and a byte-order mark."""
    if "json" in (content_type or "").lower():
        return True
    head = data[:64].lstrip()
    if head.startswith(_BOM):
        head = head[len(_BOM) :].lstrip()
    return head[:1] in (b"{", b"[")


def _text(value: Any) -> str | None:
    """A scalar's JSON text (strings as they are); None for objects, arrays and null."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    return None


class JsonFieldsCondition(FieldCondition):
    __slots__ = ()

    name = "json"
    kind = "JSON"
    reads_body = True

    @classmethod
    def fields_of(cls, rule: RuleSettings) -> Mapping[str, Accepted]:
        return {} if rule.when is None else rule.when.json_fields

    @classmethod
    def prepare(cls, key: str) -> Any:
        return json_pointer(key)

    def read(self, request: RequestInfo, identity: Identity, entry: FieldEntry) -> list[str] | None:
        body = request.body
        if body is None:
            return None
        try:
            document = body.json()
        except UnreadableBody:
            if body.data.strip() and _looks_like_json(body.data, body.content_type):
                # Meant as JSON but not JSON to us: a more lenient upstream (a byte-order mark,
                # comments, a trailing comma) might read the very fields the rule judges, so
                # "the condition fails" would let it pass unjudged. The server answers 400.
                raise
            return None  # a form, a file, nothing: it has no JSON fields
        value = resolve_pointer(document, entry.parsed)
        if value is _MISSING:
            return None
        if isinstance(value, list):
            return [text for item in value if (text := _text(item)) is not None]
        text = _text(value)
        return [] if text is None else [text]

    def absent(self, request: RequestInfo, identity: Identity, entry: FieldEntry) -> str:
        body = request.body
        if body is None:
            return "is not known: the body was not read"
        try:
            body.json()
        except UnreadableBody as exc:
            return f"is missing: {exc.message}"
        return "is missing"
