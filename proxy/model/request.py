"""What the policy and the recognizers read of a request: plain data, parsed lazily, no I/O.

`RequestInfo` is built once per request by the server (and by `countersign explain`). The
method, the normalized path and the route are always there; the headers, the raw query and the
body are there for the conditions and recognizers that read them, and each is parsed at most
once, the first time something asks.

A field that appears more than once where a condition or a recognizer reads it (`?a=1&a=2`,
two `X-Env` headers, a JSON object with a key twice) is refused with `AmbiguousField`: the
upstream might take another of the values than the one judged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import parse_qsl

__all__ = [
    "AmbiguousField",
    "HeaderView",
    "RequestBody",
    "RequestInfo",
    "UnreadableBody",
]


class HeaderView(Protocol):
    """The request headers, case-insensitive (aiohttp's `CIMultiDictProxy` is one)."""

    def getall(self, key: str, default: list[str], /) -> list[str]: ...


class _NoHeaders:
    def getall(self, key: str, default: list[str], /) -> list[str]:
        return default


NO_HEADERS: HeaderView = _NoHeaders()


class AmbiguousField(ValueError):
    """A field read for a decision appears more than once (code `ambiguous_request`)."""

    code = "ambiguous_request"

    def __init__(self, where: str, name: str) -> None:
        self.where = where
        self.name = name
        self.message = (
            f"the {where} {name!r} appears more than once; the upstream might use another of "
            "its values than the one judged, so the request is refused"
        )
        super().__init__(self.message)


class UnreadableBody(ValueError):
    """A body a recognizer must read cannot be parsed (code `invalid_request`)."""

    code = "invalid_request"

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise AmbiguousField("JSON key", key)
        out[key] = value
    return out


_NOT_PARSED: Any = object()


def _media_type(content_type: str | None) -> str:
    return (content_type or "").partition(";")[0].strip().lower()


class RequestBody:
    """The exact body bytes, with JSON and form views parsed on first use."""

    __slots__ = ("_form", "_json", "content_type", "data")

    def __init__(self, data: bytes, content_type: str | None = None) -> None:
        self.data = data
        self.content_type = content_type
        self._json: Any = _NOT_PARSED
        self._form: dict[str, list[str]] | None = None

    @property
    def is_form(self) -> bool:
        return _media_type(self.content_type) == "application/x-www-form-urlencoded"

    def json(self) -> Any:
        """The body as a JSON document (whatever its Content-Type: a lenient upstream parses it
        anyway). Raises `UnreadableBody` when it is not JSON, `AmbiguousField` for a repeated
        key anywhere in it."""
        if self._json is _NOT_PARSED:
            try:
                text = self.data.decode("utf-8")
            except UnicodeDecodeError:
                self._json = UnreadableBody("the body is not UTF-8 text")
            else:
                try:
                    self._json = json.loads(text, object_pairs_hook=_no_duplicate_keys)
                except AmbiguousField as exc:
                    self._json = exc
                except ValueError as exc:
                    self._json = UnreadableBody(f"the body is not JSON ({exc})")
                except RecursionError:
                    self._json = UnreadableBody("the body's JSON is nested too deeply to judge")
        if isinstance(self._json, AmbiguousField | UnreadableBody):
            raise self._json
        return self._json

    def form(self) -> Mapping[str, list[str]]:
        """The fields of an `application/x-www-form-urlencoded` body (decoded names → values in
        order); empty for any other Content-Type. Raises `UnreadableBody` for bytes that are not
        UTF-8."""
        if self._form is None:
            if not self.is_form:
                self._form = {}
            else:
                try:
                    text = self.data.decode("utf-8")
                except UnicodeDecodeError:
                    raise UnreadableBody("the form body is not UTF-8 text") from None
                self._form = _multi(parse_qsl(text, keep_blank_values=True))
        return self._form

    def form_value(self, name: str) -> str | None:
        """The one value of form field `name` (None when absent); `AmbiguousField` if repeated."""
        return _single(self.form(), "form field", name)


def _multi(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in pairs:
        out.setdefault(key, []).append(value)
    return out


def _single(fields: Mapping[str, list[str]], where: str, name: str) -> str | None:
    values = fields.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise AmbiguousField(where, name)
    return values[0]


class RequestInfo:
    """What the policy judges: method, the normalized path that will be forwarded, the route,
    the actions the route's protocol named, and (for conditions) headers, query and body.

    `fold_case` is the route's `case_insensitive_paths`: rules then match the case-folded path.
    """

    __slots__ = (
        "_query",
        "actions",
        "body",
        "fold_case",
        "headers",
        "method",
        "path",
        "query",
        "route",
    )

    def __init__(
        self,
        method: str,
        path: str,
        route: str | None,
        *,
        actions: tuple[str, ...] = (),
        headers: HeaderView = NO_HEADERS,
        query: str = "",
        body: RequestBody | None = None,
        fold_case: bool = False,
    ) -> None:
        self.method = method
        self.path = path  # percent-decoded, normalized; exactly what is forwarded upstream
        self.route = route  # route name, None when no route matched
        self.actions = actions
        self.headers = headers
        self.query = query  # the raw query string, as received
        self.body = body  # None: not read (no condition or recognizer needed it)
        self.fold_case = fold_case
        self._query: dict[str, list[str]] | None = None

    def __repr__(self) -> str:
        return (
            f"RequestInfo(method={self.method!r}, path={self.path!r}, route={self.route!r}, "
            f"actions={self.actions!r})"
        )

    def header_value(self, name: str) -> str | None:
        """The one value of header `name` (None when absent); `AmbiguousField` if repeated."""
        values = self.headers.getall(name, [])
        if not values:
            return None
        if len(values) > 1:
            raise AmbiguousField("header", name)
        return values[0]

    def query_fields(self) -> Mapping[str, list[str]]:
        """The query's parameters, decoded (names → values in order); parsed once."""
        if self._query is None:
            self._query = _multi(parse_qsl(self.query, keep_blank_values=True))
        return self._query

    def query_value(self, name: str) -> str | None:
        """The one value of query parameter `name` (None when absent); `AmbiguousField` if
        repeated."""
        return _single(self.query_fields(), "query parameter", name)
