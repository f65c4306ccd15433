"""Binding: the fingerprint that ties an approval to one exact request by one identity.

An approval is permission for one execution of one exact request. The fingerprint is SHA-256
over everything the upstream will act on and everything that says who asks:
- the method and the target exactly as forwarded (path and query bytes: no sorting, no
  re-encoding, so `?a=1&b=2` and `?b=2&a=1` are different requests);
- the client's end-to-end headers as received, byte for byte, except those in `UNBOUND` (the
  caller's credential, hop-by-hop and framing headers, headers Countersign sets itself), any
  `Countersign-*` header, headers the client's `Connection` names, headers the route injects
  (they replace the client's) and the route's `volatile_headers` (trace ids, SDK retry
  counters). Names are compared case-insensitively; repeated headers keep their order;
- the body; for `multipart/form-data` its parts (the bytes between boundaries) and not the
  boundary itself, which SDKs draw anew on every retry — so the `boundary` parameter of the
  bound `Content-Type` is left out too;
- the route, and the whole identity: issuer, subject, client id and owner.

Headers Countersign itself sets (`Host`, `X-Forwarded-*`, injected credentials) are not bound:
they are the same for every replica and every retry. Pure code, no I/O; `docs/security.md`
lists what is and is not bound and why.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from .identity import Identity

DEFAULT_VOLATILE_HEADERS = (
    "traceparent",
    "tracestate",
    "x-request-id",
    "user-agent",
    "x-stainless-retry-count",
    "amz-sdk-invocation-id",
    "amz-sdk-request",
)

# Never bound: the credential (it is replaced by the identity), hop-by-hop and framing headers
# (they describe one connection or one encoding of the body, not the action), and what the
# proxy sets or rebuilds itself.
UNBOUND = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        # A WebSocket handshake's nonce, new on every attempt: proof of this one connection,
        # not part of the action (a re-sent handshake joins its approval).
        "sec-websocket-key",
    }
)
_OURS_PREFIX = b"countersign-"
_VERSION = b"countersign-binding-2"

# A boundary as RFC 2046 allows it (bchars, at most 70, no trailing space).
_BCHARS = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
# The boundary parameter of a Content-Type, quoted or not.
_BOUNDARY = re.compile(rb';[ \t]*boundary[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|[^;]*)', re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Binding:
    """The exact request an approval is for, as the fingerprint sees it."""

    method: str
    target: bytes  # path?query as forwarded
    headers: tuple[tuple[bytes, bytes], ...]  # bound headers: lower-cased name, raw value
    body: bytes
    route: str
    rule: str  # the rule that asked for approval: an approval under one rule is not another's
    issuer: str
    subject: str
    client_id: str | None
    owner: str | None

    @property
    def content_type(self) -> bytes | None:
        for name, value in self.headers:
            if name == b"content-type":
                return value
        return None


def bound_headers(
    raw_headers: Iterable[tuple[bytes, bytes]],
    *,
    volatile: Collection[str] = DEFAULT_VOLATILE_HEADERS,
    injected: Collection[str] = (),
    credential: Collection[str] = (),
) -> tuple[tuple[bytes, bytes], ...]:
    """The headers a request binds, from the raw (name, value) pairs the client sent.

    `injected` are the route's injected header names (they replace the client's), `credential`
    any header the caller's credential was read from besides `Authorization`. Names are
    lower-cased and the pairs sorted by name, keeping the order of repeated headers.
    """
    pairs = [(name.lower(), value) for name, value in raw_headers]
    skip = set(UNBOUND)
    skip.update(n.lower() for n in volatile)
    skip.update(n.lower() for n in injected)
    skip.update(n.lower() for n in credential)
    for name, value in pairs:
        if name == b"connection":  # headers it names are hop-by-hop for this connection
            skip.update(connection_tokens(value.decode("latin-1")))
    kept = [
        (name, value)
        for name, value in pairs
        if not name.startswith(_OURS_PREFIX) and name.decode("latin-1") not in skip
    ]
    kept.sort(key=lambda pair: pair[0])  # stable: repeated headers keep their order
    return tuple(kept)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def connection_tokens(value: str) -> set[str]:
    """The header names a `Connection` value declares hop-by-hop, exactly as both the binding and
    the forwarder read them: split at commas, only spaces and tabs trimmed, only ASCII lowered
    (so no Unicode space or case folding makes one side drop what the other kept)."""
    return {token.strip(" \t").translate(_ASCII_LOWER) for token in value.split(",")}


def multipart_boundary(content_type: bytes | None) -> bytes | None:
    """The boundary of a `multipart/form-data` body, or None (not multipart, or ambiguous)."""
    if content_type is None:
        return None
    media = content_type.split(b";", 1)[0].strip().lower()
    if media != b"multipart/form-data":
        return None
    found = _BOUNDARY.findall(content_type)
    if len(found) != 1:
        return None  # none, or two: which one the upstream uses is not ours to guess
    boundary: bytes = found[0].strip()
    if boundary.startswith(b'"'):
        if len(boundary) < 2 or not boundary.endswith(b'"'):
            return None
        boundary = boundary[1:-1]
    # RFC 2046: 1 to 70 of these characters, not ending in a space. Anything else is bound raw.
    if not _BCHARS.fullmatch(boundary):
        return None
    return boundary


def _without_boundary(content_type: bytes) -> bytes:
    return _BOUNDARY.sub(b"", content_type)


def _update(digest: hashlib._Hash, part: bytes) -> None:
    # Length-prefixed, so no two different sequences of parts give the same byte stream.
    digest.update(len(part).to_bytes(8, "big"))
    digest.update(part)


def _text(value: str | None) -> bytes:
    if value is None:
        return b"\x00"  # absent, distinct from ""
    return b"\x01" + value.encode("utf-8", "surrogateescape")


def multipart_pieces(body: bytes, boundary: bytes) -> list[bytes] | None:
    """The body split at its delimiters, or None when it cannot be split the same way by every
    parser.

    Only the exact delimiters of RFC 2046 count (CRLF "--" boundary, then CRLF or the closing
    "--"; at the very start without the CRLF), and only when the boundary text stands nowhere
    else (a bare LF before it, padding after it, inside a part): lenient parsers may split
    there too. Bodies with equal pieces are then equal but for their boundary, and carry the
    same parts with the same bytes. The pieces alternate with the captured delimiter kinds.
    """
    delimiter = re.compile(rb"(?:\A|\r\n)--" + re.escape(boundary) + rb"(\r\n|--)")
    pieces = delimiter.split(body)
    if body.count(b"--" + boundary) != len(pieces) // 2:
        return None
    return pieces


def fingerprint(binding: Binding) -> str:
    """SHA-256 (hex) of everything `binding` holds; equal only for the same exact request."""
    digest = hashlib.sha256(_VERSION)
    for text in (
        binding.method,
        binding.route,
        binding.rule,
        binding.issuer,
        binding.subject,
        binding.client_id,
        binding.owner,
    ):
        _update(digest, _text(text))
    _update(digest, binding.target)
    boundary = multipart_boundary(binding.content_type)
    pieces = multipart_pieces(binding.body, boundary) if boundary else None
    digest.update(len(binding.headers).to_bytes(8, "big"))
    for name, value in binding.headers:
        _update(digest, name)
        # A multipart body bound by its parts binds its Content-Type without the boundary.
        _update(digest, _without_boundary(value) if pieces and name == b"content-type" else value)
    if pieces is None:
        digest.update(b"body")
        _update(digest, binding.body)
    else:
        digest.update(b"multipart")
        digest.update(len(pieces).to_bytes(8, "big"))
        for piece in pieces:
            _update(digest, piece)
    return digest.hexdigest()


def binding_of(
    *,
    method: str,
    target: bytes,
    headers: tuple[tuple[bytes, bytes], ...],
    body: bytes,
    route: str,
    rule: str,
    identity: Identity,
) -> Binding:
    return Binding(
        method=method,
        target=target,
        headers=headers,
        body=body,
        route=route,
        rule=rule,
        issuer=identity.issuer,
        subject=identity.subject,
        client_id=identity.client_id,
        owner=identity.owner,
    )
