"""Where a caller's credential is read: a route's `caller_credentials` (DESIGN §1, step 2).

Sources, tried in the route's order; the first one PRESENT in the request is used, and a present
credential that turns out invalid is refused (401) rather than falling through to the next:
- `bearer`: `Authorization: Bearer X`;
- `token`: `Authorization: token X`, as GitHub clients send;
- `basic`: `Authorization: Basic base64(user:password)`, the password is the credential;
- `header:NAME`: the header's value is the credential (e.g. `header:X-Api-Key`);
- `aws_sigv4`: `Authorization: AWS4-HMAC-SHA256 …`, checked by `proxy.authn.sigv4`.

A header the route reads that appears more than once is refused: the upstream or a later reader
could take another of its values than the one checked. This module only finds the credential;
`Authenticator` turns it into an identity.
"""

from __future__ import annotations

import base64
import binascii
import functools
from dataclasses import dataclass

from ..model.request import HeaderView
from .errors import AuthError
from .sigv4 import SIGV4_CREDENTIAL_HEADERS, is_presigned

__all__ = ["AWS_SIGV4", "Credential", "describe_sources", "find_credential"]

AWS_SIGV4 = "aws_sigv4"
# The Authorization scheme each source reads (compared case-insensitively, RFC 9110 §11.1).
_SCHEMES = {"bearer": "bearer", "token": "token", "basic": "basic"}
_KNOWN_SCHEMES = frozenset(
    {"basic", "bearer", "token", "digest", "negotiate", "ntlm", "bot", "aws", "hoba", "mutual"}
)


@dataclass(frozen=True, slots=True)
class Credential:
    """The credential found in a request.

    `source` is the route's source that held it; `value` the credential itself (a `cs_…` API key
    or a JWT; for `aws_sigv4` the Authorization header, whose signature is checked later);
    `headers` the lower-case names of every header this route reads credentials from, so none
    of them is forwarded upstream or bound into an approval.
    """

    source: str
    value: str
    headers: frozenset[str]


def _header_name(source: str) -> str | None:
    kind, sep, name = source.partition(":")
    return name if kind == "header" and sep else None


def _describe(source: str) -> str:
    name = _header_name(source)
    if name is not None:
        return f"{_article(name)} {name} header"
    return {
        "bearer": "Authorization: Bearer <token>",
        "token": "Authorization: token <token>",
        "basic": "Authorization: Basic <base64 of user:key>",
        AWS_SIGV4: "an AWS SigV4 signature (Authorization: AWS4-HMAC-SHA256 …)",
    }.get(source, source)


def _article(name: str) -> str:
    """The article a header name takes: an Api-Key, an X-Api-Key (ex-), a Private-Token."""
    first, second = name[:1], name[1:2]
    spelled = first in "FHLMNRSX" and not second.islower()  # a letter read out: "ef", "ex"
    return "an" if first.lower() in "aeiou" or spelled else "a"


def describe_sources(sources: tuple[str, ...]) -> str:
    """What a route accepts, in words: `Authorization: Bearer <token> or an X-Api-Key header`."""
    words = [_describe(s) for s in sources]
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]


@functools.cache  # a route's sources: a handful of tuples per configuration
def _read_headers(sources: tuple[str, ...]) -> frozenset[str]:
    """The lower-case names of the headers the route's sources read."""
    names: set[str] = set()
    for source in sources:
        name = _header_name(source)
        if name is not None:
            names.add(name.lower())
        elif source == AWS_SIGV4:
            names |= SIGV4_CREDENTIAL_HEADERS
        else:
            names.add("authorization")
    return frozenset(names)


@functools.cache
def _once_only(sources: tuple[str, ...]) -> tuple[str, ...]:
    """The headers that may carry a credential at most once (the SigV4 verifier checks its own
    X-Amz-* headers), in a stable order for the error message."""
    return tuple(sorted(_read_headers(sources) - (SIGV4_CREDENTIAL_HEADERS - {"authorization"})))


@functools.cache
def _plan(
    sources: tuple[str, ...],
) -> tuple[frozenset[str], tuple[str, ...], tuple[tuple[str, str | None], ...], frozenset[str]]:
    """What `find_credential` works out from `sources` alone, once per route's tuple: the headers
    read, those allowed at most once, each source with the header it names (or None), and the
    headers stripped whatever is present (SigV4's)."""
    always = SIGV4_CREDENTIAL_HEADERS if AWS_SIGV4 in sources else frozenset()
    steps = tuple((source, _header_name(source)) for source in sources)
    return _read_headers(sources), _once_only(sources), steps, always


def find_credential(sources: tuple[str, ...], headers: HeaderView, target: str) -> Credential:
    """The credential of the first of `sources` present in the request; else `AuthError`."""
    read, once_only, steps, always = _plan(sources)
    for name in once_only:
        if len(headers.getall(name, [])) > 1:
            raise AuthError(f"more than one credential: the {name} header appears more than once")
    # Which headers are present among those read: none of them goes upstream.
    present = [n for n in read if headers.getall(n, [])]
    stripped = frozenset(present) | always
    authorization = headers.getall("authorization", [])
    scheme, credential = "", ""
    if authorization:
        scheme, _, rest = authorization[0].strip().partition(" ")
        credential = rest.strip()
    for source, header in steps:
        if header is not None:
            values = headers.getall(header, [])
            if not values:
                continue
            value = values[0].strip()
            if not value:
                raise AuthError(f"the {header} header is empty")
            return Credential(source, value, stripped)
        if source == AWS_SIGV4:
            if scheme.upper().startswith("AWS4-") or is_presigned(target):
                return Credential(source, authorization[0] if authorization else "", stripped)
            continue
        if not authorization or scheme.lower() != _SCHEMES[source]:
            continue
        if source == "basic":
            return Credential(source, _basic_password(credential), stripped)
        if not credential:
            raise AuthError(f"the Authorization header's {scheme} scheme has no token")
        return Credential(source, credential, stripped)
    expected = describe_sources(sources)
    if authorization and "authorization" in read:
        # Only a known scheme's name is repeated: a bare token in the header is a secret.
        if scheme.lower() in _KNOWN_SCHEMES:
            raise AuthError(f"Authorization uses the {scheme} scheme; expected {expected}")
        raise AuthError(f"Authorization has no scheme this route reads; expected {expected}")
    raise AuthError(f"missing credential: expected {expected}")


def _basic_password(encoded: str) -> str:
    """The password of `Authorization: Basic base64(user:password)`: the credential."""
    try:
        decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise AuthError(
            "Authorization: Basic must carry base64 of user:password (the password is the key); "
            "this is not valid base64 of UTF-8 text"
        ) from None
    _, colon, password = decoded.partition(":")
    if not colon:
        raise AuthError(
            "Authorization: Basic must carry base64 of user:password (the password is the key); "
            "there is no ':'"
        )
    if not password:
        raise AuthError("Authorization: Basic has an empty password; the password is the key")
    return password
