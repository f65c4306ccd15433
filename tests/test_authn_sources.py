"""Credential sources (a route's caller_credentials) with real API keys through `Authenticator`."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.authn import Authenticated, Authenticator, AuthError
from proxy.authn.apikeys import ApiKeyAuthenticator, key_digest
from proxy.authn.sources import describe_sources
from proxy.config import ApiKeySettings

AGENT = "cs_agent_key_for_sources_000000000000000"
REVIEWER = "cs_reviewer_key_for_sources_00000000000"
UNKNOWN = "cs_nobody_has_this_key_000000000000000000"


@pytest.fixture
def authenticator() -> Authenticator:
    keys = ApiKeyAuthenticator(
        [
            ApiKeySettings(sha256=key_digest(AGENT), subject="agent", owner="bob@example.com"),
            ApiKeySettings(
                sha256=key_digest(REVIEWER), subject="reviewer", email="carol@example.com"
            ),
        ]
    )
    return Authenticator(keys, None)


def _headers(*items: tuple[str, str]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in items:
        headers.add(name, value)
    return headers


async def authenticate(
    authenticator: Authenticator, sources: tuple[str, ...], *items: tuple[str, str], **kw: Any
) -> Authenticated:
    return await authenticator.authenticate_request(
        sources,
        method=kw.get("method", "GET"),
        target=kw.get("target", "/api/x"),
        host="proxy.example.com",
        headers=_headers(*items),
        body=kw.get("body"),
    )


async def refused(
    authenticator: Authenticator, sources: tuple[str, ...], *items: tuple[str, str]
) -> str:
    with pytest.raises(AuthError) as caught:
        await authenticate(authenticator, sources, *items)
    assert caught.value.status == 401
    return caught.value.description


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("sources", "header"),
    [
        (("bearer",), ("Authorization", f"Bearer {AGENT}")),
        (("bearer",), ("authorization", f"bearer   {AGENT}  ")),  # scheme is case-insensitive
        (("token",), ("Authorization", f"token {AGENT}")),
        (("token",), ("Authorization", f"Token {AGENT}")),
        (("basic",), ("Authorization", basic("x-access-token", AGENT))),
        (("basic",), ("Authorization", basic("", AGENT))),
        (("basic",), ("Authorization", basic("user", f"{AGENT}"))),
        (("header:X-Api-Key",), ("X-Api-Key", AGENT)),
        (("header:X-Api-Key",), ("x-api-key", f" {AGENT} ")),
    ],
)
async def test_each_source_reads_an_api_key(
    authenticator: Authenticator, sources: tuple[str, ...], header: tuple[str, str]
) -> None:
    authenticated = await authenticate(authenticator, sources, header)
    assert authenticated.identity.subject == "agent"
    assert authenticated.identity.owner == "bob@example.com"
    assert authenticated.credential_headers == frozenset({header[0].lower()})
    assert authenticated.sigv4 is None


async def test_first_present_source_wins(authenticator: Authenticator) -> None:
    both = (("Authorization", f"Bearer {AGENT}"), ("X-Api-Key", REVIEWER))
    first = await authenticate(authenticator, ("header:X-Api-Key", "bearer"), *both)
    assert first.identity.subject == "reviewer"
    second = await authenticate(authenticator, ("bearer", "header:X-Api-Key"), *both)
    assert second.identity.subject == "agent"
    # Neither credential is forwarded, whichever was used.
    assert first.credential_headers == second.credential_headers == {"authorization", "x-api-key"}


async def test_an_absent_source_is_skipped(authenticator: Authenticator) -> None:
    authenticated = await authenticate(
        authenticator, ("bearer", "token", "header:X-Api-Key"), ("X-Api-Key", AGENT)
    )
    assert authenticated.identity.subject == "agent"
    assert authenticated.credential_headers == {"x-api-key"}


async def test_a_scheme_the_route_does_not_read_is_not_its_credential(
    authenticator: Authenticator,
) -> None:
    # Authorization: token … on a route that reads Bearer first, then token.
    authenticated = await authenticate(
        authenticator, ("bearer", "token"), ("Authorization", f"token {AGENT}")
    )
    assert authenticated.identity.subject == "agent"


async def test_present_but_invalid_does_not_fall_through(authenticator: Authenticator) -> None:
    sources = ("bearer", "header:X-Api-Key")
    items = (("Authorization", f"Bearer {UNKNOWN}"), ("X-Api-Key", AGENT))
    assert await refused(authenticator, sources, *items) == "unknown API key"
    items = (("Authorization", "Bearer"), ("X-Api-Key", AGENT))
    assert await refused(authenticator, sources, *items) == (
        "the Authorization header's Bearer scheme has no token"
    )
    sources = ("header:X-Api-Key", "bearer")
    items = (("X-Api-Key", "  "), ("Authorization", f"Bearer {AGENT}"))
    assert await refused(authenticator, sources, *items) == "the X-Api-Key header is empty"


@pytest.mark.parametrize(
    ("sources", "items", "name"),
    [
        (
            ("bearer",),
            (("Authorization", f"Bearer {AGENT}"), ("Authorization", f"Bearer {AGENT}")),
            "authorization",
        ),
        (
            ("bearer", "header:X-Api-Key"),
            (("Authorization", f"Bearer {AGENT}"), ("X-Api-Key", AGENT), ("X-Api-Key", AGENT)),
            "x-api-key",
        ),
        (
            ("header:X-Api-Key",),
            (("X-Api-Key", AGENT), ("x-api-key", REVIEWER)),
            "x-api-key",
        ),
    ],
)
async def test_repeated_credential_header_is_refused(
    authenticator: Authenticator,
    sources: tuple[str, ...],
    items: tuple[tuple[str, str], ...],
    name: str,
) -> None:
    assert await refused(authenticator, sources, *items) == (
        f"more than one credential: the {name} header appears more than once"
    )


async def test_a_repeated_header_the_route_does_not_read_is_not_its_business(
    authenticator: Authenticator,
) -> None:
    items = (("X-Api-Key", AGENT), ("Authorization", "Basic a"), ("Authorization", "Basic b"))
    authenticated = await authenticate(authenticator, ("header:X-Api-Key",), *items)
    assert authenticated.credential_headers == {"x-api-key"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "Basic not base64!",
            "Authorization: Basic must carry base64 of user:password (the password is the key); "
            "this is not valid base64 of UTF-8 text",
        ),
        (
            "Basic " + base64.b64encode(b"\xff\xfe:x").decode(),
            "Authorization: Basic must carry base64 of user:password (the password is the key); "
            "this is not valid base64 of UTF-8 text",
        ),
        (
            "Basic " + base64.b64encode(AGENT.encode()).decode(),
            "Authorization: Basic must carry base64 of user:password (the password is the key); "
            "there is no ':'",
        ),
        (
            "Basic " + base64.b64encode(b"user:").decode(),
            "Authorization: Basic has an empty password; the password is the key",
        ),
        (
            "Basic",
            "Authorization: Basic must carry base64 of user:password (the password is the key); "
            "there is no ':'",
        ),
    ],
)
async def test_bad_basic_credentials_are_refused(
    authenticator: Authenticator, value: str, message: str
) -> None:
    assert await refused(authenticator, ("basic",), ("Authorization", value)) == message


async def test_basic_with_an_unknown_key_is_refused(authenticator: Authenticator) -> None:
    items = (("Authorization", basic("u", UNKNOWN)),)
    assert await refused(authenticator, ("basic",), *items) == "unknown API key"


async def test_no_credential_names_what_the_route_accepts(authenticator: Authenticator) -> None:
    assert await refused(authenticator, ("bearer", "header:X-Api-Key")) == (
        "missing credential: expected Authorization: Bearer <token> or an X-Api-Key header"
    )
    assert await refused(authenticator, ("bearer",)) == (
        "missing credential: expected Authorization: Bearer <token>"
    )
    assert await refused(authenticator, ("token", "basic", "header:Private-Token")) == (
        "missing credential: expected Authorization: token <token>, "
        "Authorization: Basic <base64 of user:key> or a Private-Token header"
    )


async def test_an_unread_scheme_is_named_but_a_bare_token_is_never_echoed(
    authenticator: Authenticator,
) -> None:
    message = await refused(authenticator, ("bearer",), ("Authorization", basic("u", AGENT)))
    assert message == "Authorization uses the Basic scheme; expected Authorization: Bearer <token>"
    message = await refused(authenticator, ("bearer",), ("Authorization", AGENT))
    assert AGENT not in message
    assert message == (
        "Authorization has no scheme this route reads; expected Authorization: Bearer <token>"
    )
    message = await refused(authenticator, ("aws_sigv4",), ("Authorization", "AWS AKIA:sig"))
    assert message == (
        "Authorization uses the AWS scheme; expected an AWS SigV4 signature "
        "(Authorization: AWS4-HMAC-SHA256 …)"
    )


async def test_a_credential_that_is_not_an_api_key_goes_to_oidc(
    authenticator: Authenticator,
) -> None:
    items = (("X-Api-Key", "eyJhbGciOiJSUzI1NiJ9.e30.sig"),)
    assert await refused(authenticator, ("header:X-Api-Key",), *items) == (
        "no OIDC issuer is configured"
    )


async def test_aws_sigv4_needs_the_body(authenticator: Authenticator) -> None:
    with pytest.raises(TypeError, match="needs the request's complete body"):
        await authenticate(
            authenticator, ("aws_sigv4",), ("Authorization", "AWS4-HMAC-SHA256 Credential=x")
        )


async def test_authenticate_reads_bearer_as_before(authenticator: Authenticator) -> None:
    assert (await authenticator.authenticate(f"Bearer {AGENT}")).subject == "agent"
    with pytest.raises(AuthError, match="missing bearer token"):
        await authenticator.authenticate(None)
    with pytest.raises(AuthError, match="expected 'Authorization: Bearer <token>'"):
        await authenticator.authenticate(basic("u", AGENT))


def test_describe_sources() -> None:
    assert describe_sources(("bearer",)) == "Authorization: Bearer <token>"
    assert describe_sources(("header:X-Api-Key", "aws_sigv4")) == (
        "an X-Api-Key header or an AWS SigV4 signature (Authorization: AWS4-HMAC-SHA256 …)"
    )
