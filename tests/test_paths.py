"""Request-path normalization: refusals, normalization, canonical re-encoding."""

from __future__ import annotations

import random
import re

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.paths import (
    METHOD_OVERRIDE_HEADERS,
    AmbiguousRequest,
    check_method_override,
    check_method_override_headers,
    encode_path,
    normalize_path,
)

# --------------------------------------------------------------------------------------------
# Refusals: every reason code


REFUSALS = [
    # not absolute
    ("", "not_absolute"),
    ("a/b", "not_absolute"),
    ("*", "not_absolute"),
    ("http://evil.example/a", "not_absolute"),
    ("%2Fa", "not_absolute"),
    # encoded separators and dots
    ("/a%2Fb", "encoded_slash"),
    ("/a%2fb", "encoded_slash"),
    ("/%2F", "encoded_slash"),
    ("/a%5Cb", "encoded_backslash"),
    ("/a%5cb", "encoded_backslash"),
    ("/a%2Eb", "encoded_dot"),
    ("/a/%2e%2e/admin", "encoded_dot"),
    ("/a/%2E", "encoded_dot"),
    ("/.%2e/admin", "encoded_dot"),
    ("/file%2Ejson", "encoded_dot"),
    # double encoding
    ("/a%252Fb", "double_encoding"),
    ("/a%252fb", "double_encoding"),
    ("/a%252e%252e/b", "double_encoding"),
    ("/a%2541", "double_encoding"),
    ("/%25%32%46", "double_encoding"),  # "%" "2" "F" encoded separately still decodes to "%2F"
    ("/a%25C3%25A9", "double_encoding"),
    # backslash
    ("/a\\b", "backslash"),
    ("\\/a", "not_absolute"),
    ("/..\\admin", "backslash"),
    # dot segments
    ("/.", "dot_segment"),
    ("/..", "dot_segment"),
    ("/./", "dot_segment"),
    ("/../", "dot_segment"),
    ("/a/./b", "dot_segment"),
    ("/a/../b", "dot_segment"),
    ("/a/..", "dot_segment"),
    ("/a/.", "dot_segment"),
    ("/a//../b", "dot_segment"),
    ("/a/%20/../b", "dot_segment"),
    ("/caf%C3%A9/../admin", "dot_segment"),
    # path parameters
    ("/admin;/", "path_parameter"),
    ("/a;jsessionid=123/b", "path_parameter"),
    ("/a/b;", "path_parameter"),
    ("/a%20b;x", "path_parameter"),
    # invalid percent escapes
    ("/%zz", "invalid_percent_encoding"),
    ("/a%4", "invalid_percent_encoding"),
    ("/a%", "invalid_percent_encoding"),
    ("/a%g0", "invalid_percent_encoding"),
    ("/a%%41", "invalid_percent_encoding"),
    ("/a% 1", "invalid_percent_encoding"),
    # invalid UTF-8
    ("/%C3", "invalid_utf8"),
    ("/%FF", "invalid_utf8"),
    ("/%C3%28", "invalid_utf8"),
    ("/%C0%AE%C0%AE/admin", "invalid_utf8"),  # overlong "."
    ("/%C0%AF", "invalid_utf8"),  # overlong "/"
    ("/%ED%A0%80", "invalid_utf8"),  # encoded surrogate
    ("/a\udcff", "invalid_utf8"),  # raw byte smuggled in by a surrogateescape decoder
    ("/%E2%82", "invalid_utf8"),  # truncated sequence
    # NUL and control characters, raw and encoded
    ("/a\x00b", "nul"),
    ("/a%00b", "nul"),
    ("/a%00", "nul"),
    ("/a\x01", "control_character"),
    ("/a\tb", "control_character"),
    ("/a\nb", "control_character"),
    ("/a\rb", "control_character"),
    ("/a\x1f", "control_character"),
    ("/a\x7f", "control_character"),
    ("/a%0A", "control_character"),
    ("/a%0d%0aSet-Cookie:x", "control_character"),
    ("/a%09", "control_character"),
    ("/a%1F", "control_character"),
    ("/a%7F", "control_character"),
    ("/a%7f", "control_character"),
]


@pytest.mark.parametrize(("raw", "reason"), REFUSALS)
def test_refusal_reason(raw: str, reason: str) -> None:
    with pytest.raises(AmbiguousRequest) as info:
        normalize_path(raw)
    assert info.value.reason == reason
    assert isinstance(info.value.message, str) and info.value.message
    assert str(info.value) == info.value.message


def test_every_documented_reason_is_covered() -> None:
    covered = {reason for _, reason in REFUSALS} | {"method_override"}
    assert covered == {
        "encoded_slash",
        "encoded_backslash",
        "encoded_dot",
        "dot_segment",
        "backslash",
        "control_character",
        "nul",
        "invalid_percent_encoding",
        "invalid_utf8",
        "double_encoding",
        "path_parameter",
        "not_absolute",
        "method_override",
    }


def test_ambiguous_request_is_a_value_error() -> None:
    exc = AmbiguousRequest("encoded_slash", "the path contains an encoded slash")
    assert isinstance(exc, ValueError)
    assert exc.reason == "encoded_slash"
    assert exc.message == "the path contains an encoded slash"
    assert "encoded_slash" in repr(exc)


# --------------------------------------------------------------------------------------------
# Normalization


NORMALIZED = [
    ("/", "/"),
    ("/a", "/a"),
    ("/a/", "/a/"),
    ("/a/b/c", "/a/b/c"),
    ("//", "/"),
    ("//a", "/a"),
    ("/a//b", "/a/b"),
    ("/a///b//", "/a/b/"),
    ("/a//b%20c//", "/a/b c/"),
    ("/a%20b", "/a b"),
    ("/a+b", "/a+b"),  # '+' is not a space in a path
    ("/caf%C3%A9", "/café"),
    ("/caf%c3%a9", "/café"),
    ("/café", "/café"),
    ("/%E2%82%AC/%F0%9F%98%80", "/€/😀"),
    ("/a%3Bb", "/a;b"),  # encoded ';' is data, not a path parameter
    ("/a%3Fb%23c", "/a?b#c"),
    ("/a%25", "/a%"),  # a literal percent sign
    ("/a%25zz", "/a%zz"),
    ("/a%25%25", "/a%%"),
    ("/a%2B%40%3A", "/a+@:"),
    ("/a%2Db", "/a-b"),
    ("/.well-known/openid-configuration", "/.well-known/openid-configuration"),
    ("/a/.hidden/b", "/a/.hidden/b"),
    ("/a/.../b", "/a/.../b"),
    ("/a/..b/c.", "/a/..b/c."),
    ("/v1/x.json", "/v1/x.json"),
    ("/~user/a_b-c", "/~user/a_b-c"),
    ("/a%C2%A0b", "/a\u00a0b"),  # NBSP is not a control character
    ("/A/B", "/A/B"),  # case is kept
]


@pytest.mark.parametrize(("raw", "expected"), NORMALIZED)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize("raw", ["/a/b", "/a/b/", "/v1/items.json", "/a//b", "/x/.y", "/x-y_z~"])
def test_fast_path_agrees_with_slow_path(raw: str) -> None:
    # Forcing the slow path with a harmless escape of an unreserved char gives the same result.
    slow = normalize_path(raw.replace("/", "/%41", 1))
    fast = normalize_path(raw)
    assert slow == fast.replace("/", "/A", 1)


# --------------------------------------------------------------------------------------------
# Canonical re-encoding


ENCODED = [
    ("/", "/"),
    ("/a/b/", "/a/b/"),
    ("/a b", "/a%20b"),
    ("/café", "/caf%C3%A9"),
    ("/€", "/%E2%82%AC"),
    ("/a;b", "/a%3Bb"),
    ("/a%b", "/a%25b"),
    ("/a?b#c", "/a%3Fb%23c"),
    ('/a"b<c>', "/a%22b%3Cc%3E"),
    ("/a[b]{c}|d^e`f", "/a%5Bb%5D%7Bc%7D%7Cd%5Ee%60f"),
    ("/AZaz09-._~", "/AZaz09-._~"),
    ("/!$&'()*+,=", "/!$&'()*+,="),
    ("/:@", "/:@"),
    ("/user@host:8080/x", "/user@host:8080/x"),
    ("/a\u00a0b", "/a%C2%A0b"),
]


@pytest.mark.parametrize(("path", "expected"), ENCODED)
def test_encode_path(path: str, expected: str) -> None:
    assert encode_path(path) == expected
    assert normalize_path(expected) == path


@pytest.mark.parametrize("raw", [raw for raw, _ in NORMALIZED])
def test_round_trip_of_normalized_paths(raw: str) -> None:
    path = normalize_path(raw)
    assert normalize_path(encode_path(path)) == path


_ALLOWED_IN_ENCODED = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@/]|%[0-9A-F]{2}")


def test_round_trip_random_raw_paths() -> None:
    """Random request-targets: whenever one normalizes, its canonical form round-trips."""
    rng = random.Random(1234)
    pieces = [
        "a", "b", "Z", "0", "-", ".", "_", "~", "/", "//", " ", "é", "€", "😀", "%20", "%41",
        "%C3%A9", "%E2%82%AC", "%3B", "%3F", "%23", "%25", "%2B", "%40", "%3A", "%2F", "%2E",
        "%5C", "%00", "%0A", "%zz", "%C3", "%FF", ";", "\\", "\t", "..", "!", "$", "&", "'", "(",
        ")", "*", "+", ",", "=", ":", "@", '"', "<", ">", "[", "]", "{", "}", "|", "^", "`",
    ]  # fmt: skip
    accepted = 0
    for _ in range(5000):
        raw = "/" + "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 10)))
        try:
            path = normalize_path(raw)
        except AmbiguousRequest:
            continue
        accepted += 1
        encoded = encode_path(path)
        assert "".join(_ALLOWED_IN_ENCODED.findall(encoded)) == encoded, encoded
        assert normalize_path(encoded) == path, (raw, path, encoded)
        assert encode_path(normalize_path(encoded)) == encoded
    assert accepted > 500  # the generator exercises the accepting branch too


def test_round_trip_random_decoded_paths() -> None:
    """Random decoded paths (no dot segments, no escapes inside, no controls) round-trip."""
    rng = random.Random(1234)
    alphabet = "abcXYZ019 -._~!$&'()*+,;=:@%?#\"<>[]{}|^`éß€😀\u00a0\u2028"
    checked = 0
    for _ in range(5000):
        segments = [
            "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 6)))
            for _ in range(rng.randrange(0, 5))
        ]
        path = "/" + "/".join(segments) + ("/" if segments and rng.random() < 0.3 else "")
        if any(s in (".", "..") for s in segments) or re.search(r"%[0-9A-Fa-f]{2}", path):
            continue
        checked += 1
        assert normalize_path(encode_path(path)) == path, path
    assert checked > 4000


# --------------------------------------------------------------------------------------------
# Method override headers


def test_method_override_headers_constant() -> None:
    assert isinstance(METHOD_OVERRIDE_HEADERS, frozenset)
    assert set(METHOD_OVERRIDE_HEADERS) == {
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    }


@pytest.mark.parametrize(
    "name", ["X-HTTP-Method-Override", "x-http-method", "X-Method-Override", "X-HTTP-METHOD"]
)
def test_method_override_refused(name: str) -> None:
    with pytest.raises(AmbiguousRequest) as info:
        check_method_override(["Host", "Accept", name])
    assert info.value.reason == "method_override"
    assert name in info.value.message


def test_no_method_override_passes() -> None:
    check_method_override([])
    check_method_override(["Host", "Content-Type", "X-HTTP-Method-Overrides", "X-Method"])
    check_method_override(iter(["Authorization"]))  # any iterable


@pytest.mark.parametrize(
    "name", ["X-HTTP-Method-Override", "x-http-method", "X-Method-Override", "X-HTTP-METHOD"]
)
def test_method_override_refused_from_request_headers(name: str) -> None:
    """The request path's form looks the names up (any case) and names the header as sent."""
    headers = CIMultiDictProxy(CIMultiDict([("Host", "h"), ("Accept", "*/*"), (name, "DELETE")]))
    with pytest.raises(AmbiguousRequest) as info:
        check_method_override_headers(headers)
    assert info.value.reason == "method_override"
    assert f"({name})" in info.value.message


def test_no_method_override_in_request_headers_passes() -> None:
    names = ["Host", "Content-Type", "X-HTTP-Method-Overrides", "X-Method", "Authorization"]
    check_method_override_headers(CIMultiDictProxy(CIMultiDict((n, "v") for n in names)))
    check_method_override_headers(CIMultiDictProxy(CIMultiDict()))


def test_check_method_refuses_lower_case() -> None:
    from proxy.paths import check_method

    check_method("DELETE")
    check_method("M-SEARCH")
    with pytest.raises(AmbiguousRequest) as info:
        check_method("delete")
    assert info.value.reason == "method_case"
