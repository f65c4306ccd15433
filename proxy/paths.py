"""Request-path normalization: the policy sees exactly what the upstream will execute.

The request-target's path is percent-decoded and normalized **once**, here. The policy judges that
decoded path and the very same path is forwarded, re-encoded canonically by `encode_path`. Any
input whose meaning could differ between this proxy and an upstream (an encoded slash, a dot
segment, a path parameter, double encoding, a backslash …) is refused with `AmbiguousRequest`
rather than guessed at; the server answers
`400 {"error": "ambiguous_request", "reason": ..., "message": ...}`.

Pure code: no I/O, no aiohttp. Called on every request, so the common case (a plain ASCII path
without '%', '\\', ';' or control characters) takes a fast path of one regex search.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote_to_bytes

__all__ = [
    "METHOD_OVERRIDE_HEADERS",
    "AmbiguousRequest",
    "check_method",
    "check_method_override",
    "check_method_override_headers",
    "encode_path",
    "normalize_path",
]


class AmbiguousRequest(ValueError):
    """A request the proxy refuses because the upstream might execute something else.

    `reason` is a short machine code (e.g. ``"encoded_slash"``), `message` a human sentence.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"AmbiguousRequest(reason={self.reason!r}, message={self.message!r})"


# Anything that needs a closer look: percent escapes, backslash, path parameters, control
# characters and lone surrogates (undecodable bytes smuggled in by a surrogateescape decoder).
_SUSPICIOUS = re.compile("[%\\\\;\x00-\x1f\x7f\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Escapes whose decoded character would change how the path splits into segments.
_STRUCTURAL_ESCAPE = re.compile(r"%(?:2[Ff]|5[Cc]|2[Ee])")
_STRUCTURAL_REASONS = {
    "%2F": ("encoded_slash", "the path contains an encoded slash (%2F)"),
    "%5C": ("encoded_backslash", "the path contains an encoded backslash (%5C)"),
    "%2E": ("encoded_dot", "the path contains an encoded dot (%2E)"),
}
_ESCAPE_IN_DECODED = re.compile(r"%[0-9A-Fa-f]{2}")
_SLASHES = re.compile(r"//+")

# RFC 3986 unreserved characters are always safe for `quote`; add the sub-delims except ';'
# (a path-parameter separator for some servers), ':' and '@' (pchar) and '/' (the separator).
_SAFE = "/:@!$&'()*+,="
_NEEDS_ENCODING = re.compile(r"[^A-Za-z0-9\-._~/:@!$&'()*+,=]")


def _refuse_control(text: str, where: str) -> None:
    match = _CONTROL.search(text)
    if match is None:
        return
    if "\x00" in text:
        raise AmbiguousRequest("nul", f"the path contains a NUL byte ({where})")
    code = ord(match.group())
    raise AmbiguousRequest(
        "control_character", f"the path contains the control character 0x{code:02X} ({where})"
    )


def _refuse_dot_segments(path: str) -> None:
    # A dot segment is "/." or "/.." followed by "/" or the end of the path (repeated slashes
    # or not).
    if "/." not in path:
        return
    for segment in path.split("/"):
        if segment == "." or segment == "..":
            raise AmbiguousRequest(
                "dot_segment", f"the path contains a {segment!r} segment; send the resolved path"
            )


def normalize_path(raw: str, *, merge_slashes: bool = True) -> str:
    """Decode and normalize the path part of a request-target, or raise `AmbiguousRequest`.

    `raw` is the path as received: still percent-encoded, the query already removed. The result
    is percent-decoded (UTF-8) with repeated slashes collapsed (kept with
    ``merge_slashes=False``, for upstreams such as S3 where "a//b" is its own key); a trailing
    slash is kept. It is what the policy judges and (through `encode_path`, or byte-exact for a
    route that keeps its slashes) what is forwarded.

    Refused, with `AmbiguousRequest.reason`:

    - ``not_absolute``: does not start with "/".
    - ``nul`` / ``control_character``: a byte 0x00-0x1F or 0x7F, raw or percent-encoded.
    - ``backslash``: a literal backslash (some servers treat it as a separator).
    - ``path_parameter``: a ';' (e.g. Tomcat's "/admin;/" bypass). An encoded ``%3B`` is data and
      is accepted; it is forwarded encoded.
    - ``invalid_percent_encoding``: '%' not followed by two hex digits.
    - ``encoded_slash`` / ``encoded_backslash`` / ``encoded_dot``: ``%2F``, ``%5C``, ``%2E``
      anywhere (either case).
    - ``invalid_utf8``: the decoded bytes are not UTF-8 (this includes overlong forms).
    - ``double_encoding``: the decoded path still holds a percent escape (``%252F``).
    - ``dot_segment``: a "." or ".." segment.
    """
    if not raw.startswith("/"):
        raise AmbiguousRequest("not_absolute", "the path must start with '/'")
    if _SUSPICIOUS.search(raw) is None:
        # Fast path: nothing to decode, only dot segments and repeated slashes to look at.
        path = _SLASHES.sub("/", raw) if merge_slashes and "//" in raw else raw
        _refuse_dot_segments(path)
        return path
    return _normalize_slow(raw, merge_slashes)


def _normalize_slow(raw: str, merge_slashes: bool) -> str:
    _refuse_control(raw, "raw")
    if "\\" in raw:
        raise AmbiguousRequest("backslash", "the path contains a backslash")
    if ";" in raw:
        raise AmbiguousRequest(
            "path_parameter", "the path contains ';' (path parameters are not accepted)"
        )
    if "%" in raw:
        bad = _BAD_PERCENT.search(raw)
        if bad is not None:
            snippet = raw[bad.start() : bad.start() + 3]
            raise AmbiguousRequest(
                "invalid_percent_encoding",
                f"the path contains an invalid percent escape {snippet!r}",
            )
        structural = _STRUCTURAL_ESCAPE.search(raw)
        if structural is not None:
            reason, message = _STRUCTURAL_REASONS[structural.group().upper()]
            raise AmbiguousRequest(reason, message)
    try:
        path = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeError:  # decode errors, and lone surrogates that cannot be encoded
        raise AmbiguousRequest("invalid_utf8", "the decoded path is not valid UTF-8") from None
    if "%" in raw:
        _refuse_control(path, "percent-encoded")
        if _ESCAPE_IN_DECODED.search(path) is not None:
            raise AmbiguousRequest(
                "double_encoding", "the path is percent-encoded twice (e.g. %252F)"
            )
    if merge_slashes and "//" in path:
        path = _SLASHES.sub("/", path)
    _refuse_dot_segments(path)
    return path


def encode_path(path: str) -> str:
    """Re-encode a normalized (decoded) path canonically, for forwarding.

    Everything is percent-encoded (UTF-8, upper-case hex) except the unreserved characters
    ``A-Z a-z 0-9 - . _ ~``, the sub-delims other than ';' (``! $ & ' ( ) * + , =``), ':', '@'
    and '/'. For every path ``p`` returned by `normalize_path`,
    ``normalize_path(encode_path(p)) == p``.
    """
    if _NEEDS_ENCODING.search(path) is None:
        return path
    return quote(path, safe=_SAFE)


METHOD_OVERRIDE_HEADERS: frozenset[str] = frozenset(
    {"x-http-method-override", "x-http-method", "x-method-override"}
)


def check_method(method: str) -> None:
    """Refuse methods that are not upper-case: some servers treat `delete` as DELETE, others as
    an unknown method, so the policy could judge something other than what runs."""
    if not method.isupper():
        raise AmbiguousRequest(
            "method_case", f"the method {method!r} is not upper-case; methods are case-sensitive"
        )


def check_method_override(header_names: Iterable[str]) -> None:
    """Refuse a request that carries a method-override header (any case).

    Such a header asks the upstream to execute another method than the one the policy judged.
    """
    for name in header_names:
        if name.lower() in METHOD_OVERRIDE_HEADERS:
            raise AmbiguousRequest(
                "method_override",
                f"method-override headers are not accepted ({name}); send the real method",
            )


def check_method_override_headers(headers: Mapping[str, str]) -> None:
    """`check_method_override` for a case-insensitive header mapping (the fronts'
    `CIMultiDictProxy`): three lookups instead of reading every name. (Iterating a multidict's
    names also makes it keep a key object per header for as long as the request lives, ~100
    bytes a header for every held request.)"""
    for name in METHOD_OVERRIDE_HEADERS:
        if name in headers:
            check_method_override(headers.keys())  # raises, naming the header as it was sent
