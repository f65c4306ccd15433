"""Tests for the oidc-provider based test IdP (tests/idp, tests/idp_fixture.py)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import aiohttp
import jwt
import pytest

from tests.idp_fixture import DEFAULT_CLIENTS, IdPError, TestIdP, start_idp


async def _get_json(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def _discover(idp: TestIdP) -> tuple[dict[str, Any], dict[str, Any]]:
    discovery = await _get_json(f"{idp.issuer}/.well-known/openid-configuration")
    jwks = await _get_json(discovery["jwks_uri"])
    return discovery, jwks


def _verify(token: str, jwks: dict[str, Any], *, audience: str, issuer: str) -> dict[str, Any]:
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(jwks)[kid]
    claims: dict[str, Any] = jwt.decode(
        token, key, algorithms=["RS256"], audience=audience, issuer=issuer
    )
    return claims


@pytest.fixture
def private_idp() -> Iterator[TestIdP]:
    server = start_idp(DEFAULT_CLIENTS)
    try:
        yield server
    finally:
        server.stop()


async def test_discovery_and_jwks(idp: TestIdP) -> None:
    discovery, jwks = await _discover(idp)
    assert discovery["issuer"] == idp.issuer
    assert discovery["jwks_uri"] == idp.jwks_uri
    assert discovery["token_endpoint"] == idp.token_endpoint
    assert "client_credentials" in discovery["grant_types_supported"]
    keys = jwks["keys"]
    assert sorted(k["kty"] for k in keys) == ["EC", "RSA"]
    assert len({k["kid"] for k in keys}) == 2
    assert all("d" not in k for k in keys)
    ec = next(k for k in keys if k["kty"] == "EC")
    assert ec["crv"] == "P-256"


async def test_agent_token_claims(idp: TestIdP) -> None:
    token = await idp.token("agent-7")
    discovery, jwks = await _discover(idp)

    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256"
    assert header["typ"] == "at+jwt"
    rsa_kids = {k["kid"] for k in jwks["keys"] if k["kty"] == "RSA"}
    assert header["kid"] in rsa_kids

    claims = _verify(token, jwks, audience="countersign", issuer=discovery["issuer"])
    assert claims["iss"] == idp.issuer
    assert claims["aud"] == "countersign"
    assert claims["sub"] == "agent-7"
    assert claims["client_id"] == "agent-7"
    assert claims["groups"] == ["agents"]
    assert claims["email"] == "agent7@example.com"
    assert claims["act"] == {"sub": "alice@example.com"}
    assert claims["exp"] - claims["iat"] == 600
    assert claims["jti"]


async def test_default_clients(idp: TestIdP) -> None:
    _, jwks = await _discover(idp)
    expected = {
        "ci-bot": (["ci"], None),
        "alice": (["data-owners"], "alice@example.com"),
        "bob": (["data-owners"], "bob@example.com"),
        "mallory": (None, None),
    }
    for client_id, (groups, email) in expected.items():
        claims = _verify(await idp.token(client_id), jwks, audience=idp.audience, issuer=idp.issuer)
        assert claims["sub"] == client_id
        assert claims["client_id"] == client_id
        assert claims.get("groups") == groups
        assert claims.get("email") == email
        assert "act" not in claims


async def test_resource_overrides_audience(idp: TestIdP) -> None:
    token = await idp.token("agent-7", resource="https://other.example")
    _, jwks = await _discover(idp)
    with pytest.raises(jwt.InvalidAudienceError):
        _verify(token, jwks, audience="countersign", issuer=idp.issuer)
    claims = _verify(token, jwks, audience="https://other.example", issuer=idp.issuer)
    assert claims["aud"] == "https://other.example"
    assert claims["sub"] == "agent-7"


async def test_unknown_client_and_bad_secret(idp: TestIdP) -> None:
    with pytest.raises(IdPError, match="unknown test client"):
        await idp.token("nobody")
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            idp.token_endpoint,
            data={"grant_type": "client_credentials"},
            headers={"Authorization": "Basic " + base64.b64encode(b"agent-7:wrong").decode()},
        ) as resp,
    ):
        assert resp.status == 401
        assert (await resp.json())["error"] == "invalid_client"


async def test_user_token_auth_code_pkce(idp: TestIdP) -> None:
    token = await idp.user_token("alice@example.com")
    _, jwks = await _discover(idp)
    claims = _verify(token, jwks, audience="countersign", issuer=idp.issuer)
    assert claims["sub"] == "alice@example.com"
    assert claims["client_id"] == "people"
    assert claims["email"] == "alice@example.com"
    assert claims["groups"] == ["data-owners"]
    with pytest.raises(IdPError, match="access_denied"):
        await idp.user_token("eve@example.com")


async def test_rotate(private_idp: TestIdP) -> None:
    idp = private_idp
    old_token = await idp.token("agent-7")
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    _, old_jwks = await _discover(idp)
    ec_kid = next(k["kid"] for k in old_jwks["keys"] if k["kty"] == "EC")

    new_kid = await idp.rotate()
    assert new_kid != old_kid

    _, jwks = await _discover(idp)
    kids = {k["kid"] for k in jwks["keys"]}
    assert kids == {new_kid, ec_kid}

    token = await idp.token("agent-7")
    assert jwt.get_unverified_header(token)["kid"] == new_kid
    claims = _verify(token, jwks, audience="countersign", issuer=idp.issuer)
    assert claims["sub"] == "agent-7"
    # the new token is not verifiable with the stale JWKS
    with pytest.raises(KeyError):
        jwt.PyJWKSet.from_dict(old_jwks)[new_kid]

    kept_kid = await idp.rotate(keep_old=True)
    _, jwks = await _discover(idp)
    assert {k["kid"] for k in jwks["keys"]} == {kept_kid, new_kid, ec_kid}
    assert jwt.get_unverified_header(await idp.token("ci-bot"))["kid"] == kept_kid


def test_start_failure_reports_stderr() -> None:
    with pytest.raises(IdPError, match=r"exited before becoming ready(.|\n)*duplicate client_id"):
        start_idp([{"client_id": "dup"}, {"client_id": "dup"}])
    bad = {"client_id": "bad", "token_endpoint_auth_method": "bogus"}
    with pytest.raises(IdPError, match="token_endpoint_auth_method must be"):
        start_idp([bad])


async def test_client_secret_post() -> None:
    poster = {"client_id": "poster", "token_endpoint_auth_method": "client_secret_post"}
    with start_idp([poster], audience="https://api.example") as other:
        _, jwks = await _discover(other)
        token = await other.token("poster")
        claims = _verify(token, jwks, audience="https://api.example", issuer=other.issuer)
        assert claims["sub"] == "poster"
        assert "groups" not in claims
