"""The binding (proxy/model/binding.py): what an approval covers, byte for byte."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from proxy.model import Identity
from proxy.model.binding import (
    Binding,
    binding_of,
    bound_headers,
    connection_tokens,
    fingerprint,
    multipart_boundary,
)

AGENT = Identity(
    subject="agent-7", issuer="https://idp", client_id="agent-7", owner="alice@example.com"
)


def make(
    headers: list[tuple[bytes, bytes]] | None = None, body: bytes = b"{}", **over: Any
) -> Binding:
    raw = headers if headers is not None else [(b"Content-Type", b"application/json")]
    binding = binding_of(
        method="POST",
        target=b"/api/exports?a=1&b=2",
        headers=bound_headers(raw),
        body=body,
        route="cloud",
        rule="exports",
        identity=AGENT,
    )
    return replace(binding, **over) if over else binding


def test_stable_sha256_hex() -> None:
    assert fingerprint(make()) == fingerprint(make())
    assert len(fingerprint(make())) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"method": "PUT"},
        {"target": b"/api/exports?b=2&a=1"},  # no reordering: another request
        {"target": b"/api/exports?a=%31&b=2"},  # no re-encoding either
        {"body": b"{ }"},
        {"route": "other"},
        {"rule": "stricter"},
        {"issuer": "https://other"},
        {"subject": "agent-8"},
        {"client_id": "other-client"},
        {"client_id": None},
        {"owner": "bob@example.com"},
        {"owner": None},
    ],
)
def test_every_bound_part_changes_the_fingerprint(change: dict[str, Any]) -> None:
    assert fingerprint(make(**change)) != fingerprint(make())


def test_action_headers_are_bound() -> None:
    describe = make([(b"X-Amz-Target", b"DynamoDB_20120810.DescribeTable")])
    delete = make([(b"X-Amz-Target", b"DynamoDB_20120810.DeleteTable")])
    assert fingerprint(describe) != fingerprint(delete)
    assert fingerprint(make([(b"X-HTTP-Method-Override", b"DELETE")])) != fingerprint(make([]))
    assert fingerprint(make([(b"Content-Type", b"text/plain")])) != fingerprint(make())


def test_header_names_are_case_insensitive_and_order_of_different_names_free() -> None:
    one = make([(b"X-A", b"1"), (b"x-b", b"2")])
    other = make([(b"x-b", b"2"), (b"X-a", b"1")])
    assert fingerprint(one) == fingerprint(other)


def test_repeated_headers_keep_their_order() -> None:
    one = make([(b"X-A", b"1"), (b"X-A", b"2")])
    other = make([(b"X-A", b"2"), (b"X-A", b"1")])
    assert fingerprint(one) != fingerprint(other)


def test_values_are_exact_bytes() -> None:
    assert fingerprint(make([(b"X-A", b"v")])) != fingerprint(make([(b"X-A", b"v ")]))
    assert fingerprint(make([(b"X-A", b"\xe9")])) != fingerprint(make([(b"X-A", b"\xc3\xa9")]))


def test_what_is_not_bound() -> None:
    base = [(b"Content-Type", b"application/json")]
    noise = [
        (b"Authorization", b"Bearer other-token"),
        (b"Host", b"replica-2:8080"),
        (b"Content-Length", b"2"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"per-connection"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-Forwarded-For", b"10.0.0.1"),
        (b"Countersign-Reason", b"retrying"),
        (b"Countersign-Approval", b"apr_x"),
        (b"traceparent", b"00-abc-def-01"),
        (b"User-Agent", b"OpenAI/Python 1.2"),
        (b"X-Stainless-Retry-Count", b"2"),
        (b"amz-sdk-invocation-id", b"uuid"),
        (b"X-Request-Id", b"req-2"),
    ]
    assert fingerprint(make(base + noise)) == fingerprint(make(base))


def test_injected_and_configured_volatile_headers_are_not_bound() -> None:
    headers = bound_headers(
        [(b"X-Cloud-Token", b"client-value"), (b"X-Trace", b"1"), (b"X-Keep", b"k")],
        injected=["X-Cloud-Token"],
        volatile=["x-trace"],
    )
    assert headers == ((b"x-keep", b"k"),)


def _multipart(boundary: bytes, parts: list[tuple[bytes, bytes]]) -> bytes:
    out = b""
    for disposition, content in parts:
        out += b"--" + boundary + b"\r\n" + disposition + b"\r\n\r\n" + content + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


FILE = (b'Content-Disposition: form-data; name="file"; filename="a.csv"', b"id,name\n1,x\n")
PURPOSE = (b'Content-Disposition: form-data; name="purpose"', b"fine-tune")


def _form(boundary: bytes, parts: list[tuple[bytes, bytes]]) -> Binding:
    content_type = b"multipart/form-data; boundary=" + boundary
    return make([(b"Content-Type", content_type)], body=_multipart(boundary, parts))


def test_a_new_multipart_boundary_is_the_same_request() -> None:
    first = _form(b"a1b2c3", [FILE, PURPOSE])
    retry = _form(b"zz99-other", [FILE, PURPOSE])
    assert fingerprint(first) == fingerprint(retry)


def test_multipart_parts_are_bound() -> None:
    base = fingerprint(_form(b"a1b2c3", [FILE, PURPOSE]))
    assert fingerprint(_form(b"a1b2c3", [FILE])) != base
    assert fingerprint(_form(b"a1b2c3", [PURPOSE, FILE])) != base
    other_name = (FILE[0].replace(b"a.csv", b"b.csv"), FILE[1])
    assert fingerprint(_form(b"a1b2c3", [other_name, PURPOSE])) != base
    other_content = (FILE[0], b"id,name\n2,y\n")
    assert fingerprint(_form(b"a1b2c3", [other_content, PURPOSE])) != base


def test_multipart_boundary_parsing() -> None:
    assert multipart_boundary(b'multipart/form-data; boundary="a b"') == b"a b"
    assert multipart_boundary(b"Multipart/Form-Data;boundary=xyz") == b"xyz"
    assert multipart_boundary(b"application/json") is None
    assert multipart_boundary(b"multipart/form-data") is None
    # Two boundaries: which one the upstream takes is unknowable, so the body is bound raw.
    assert multipart_boundary(b"multipart/form-data; boundary=a; boundary=b") is None


def test_text_that_merely_contains_the_boundary_is_still_bound() -> None:
    body = b"--xyz\r\nraw\r\n--xyz--"
    one = make([(b"Content-Type", b"text/plain; boundary=xyz")], body=body)
    two = make([(b"Content-Type", b"text/plain; boundary=abc")], body=body.replace(b"xyz", b"abc"))
    assert fingerprint(one) != fingerprint(two)


def test_boundary_text_inside_a_part_is_content() -> None:
    """`--boundary` that is no delimiter is part of the content, whose bytes differ between the
    two bodies: they are different requests."""
    tricky = (PURPOSE[0], b"see --BOUNDARY inline")
    one = _form(b"aaaa", [(tricky[0], tricky[1].replace(b"BOUNDARY", b"aaaa"))])
    two = _form(b"bbbb", [(tricky[0], tricky[1].replace(b"BOUNDARY", b"bbbb"))])
    assert fingerprint(one) != fingerprint(two)
    padded = make(
        [(b"Content-Type", b"multipart/form-data; boundary=aaaa")],
        body=b"--aaaa \r\n" + PURPOSE[0] + b"\r\n\r\nx\r\n--aaaa--",
    )
    other = make(
        [(b"Content-Type", b"multipart/form-data; boundary=bbbb")],
        body=b"--bbbb \r\n" + PURPOSE[0] + b"\r\n\r\nx\r\n--bbbb--",
    )
    assert fingerprint(padded) != fingerprint(other)  # unusual padding: bound as it is


def test_boundary_text_where_lenient_parsers_split_binds_the_raw_body() -> None:
    """A bare-LF `--X` inside a part of a `boundary=Y` upload is content to a strict parser and a
    delimiter to a lenient one: such a body is bound raw, boundary and all, so it cannot share a
    fingerprint with the same bytes under `boundary=X`."""
    inner = b'PNG...\n--X\nContent-Disposition: form-data; name="role"\r\n\r\nadmin'

    def upload(boundary: bytes) -> Binding:
        body = (
            b"--"
            + boundary
            + b'\r\nContent-Disposition: form-data; name="avatar"\r\n\r\n'
            + inner
            + b"\r\n--"
            + boundary
            + b"--\r\n"
        )
        return make([(b"Content-Type", b"multipart/form-data; boundary=" + boundary)], body=body)

    as_y = upload(b"Y")
    as_x = make([(b"Content-Type", b"multipart/form-data; boundary=X")], body=as_y.body)
    assert fingerprint(as_y) != fingerprint(as_x)


def test_malformed_boundaries_are_not_canonicalized() -> None:
    assert multipart_boundary(b'multipart/form-data; boundary="abc') is None
    assert multipart_boundary(b"multipart/form-data; boundary=" + b"a" * 71) is None
    assert multipart_boundary(b"multipart/form-data; boundary=a\x00b") is None


def test_connection_tokens_trim_and_fold_ascii_only() -> None:
    assert connection_tokens("keep-alive, X-Hop\t") == {"keep-alive", "x-hop"}
    assert connection_tokens("dry-run\u00a0") == {"dry-run\u00a0"}  # no Unicode trimming
    assert connection_tokens("x-\u212aeep") == {"x-\u212aeep"}  # no Unicode case folding
