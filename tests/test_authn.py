"""Authentication against a real OIDC provider, and against a local issuer whose keys we hold
(to mint the expired, not-yet-valid, wrongly signed and alg-confused tokens no honest IdP gives).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.app import build_app
from proxy.audit import AuditLog
from proxy.authn.oidc import OIDCVerifier
from proxy.config import ClaimsSettings, IssuerSettings
from tests.helpers import ListSink, bearer, settings_for
from tests.idp_fixture import DEFAULT_CLIENTS, TestIdP, start_idp


class LocalIssuer:
    """A real HTTP issuer (discovery + JWKS) whose private keys the test holds."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.kid = "rsa-1"
        self.jwks_hits = 0
        self.server: TestServer | None = None

    @property
    def issuer(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key()))
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key()))
        return {
            "keys": [
                {**rsa_jwk, "kid": self.kid, "use": "sig", "alg": "RS256"},
                {**ec_jwk, "kid": "ec-1", "use": "sig", "alg": "ES256"},
            ]
        }

    def app(self) -> web.Application:
        async def discovery(_: web.Request) -> web.Response:
            return web.json_response({"issuer": self.issuer, "jwks_uri": self.issuer + "/jwks"})

        async def jwks(_: web.Request) -> web.Response:
            self.jwks_hits += 1
            return web.json_response(self.jwks())

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks", jwks)
        return app

    def mint(
        self,
        *,
        alg: str = "RS256",
        kid: str | None = None,
        key: Any = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload = {
            "iss": self.issuer,
            "aud": "countersign",
            "sub": "agent-x",
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            **claims,
        }
        payload = {k: v for k, v in payload.items() if v is not None}
        if key is None:
            key = self.ec if alg.startswith("ES") else self.rsa
        headers = {
            "kid": kid if kid is not None else ("ec-1" if alg.startswith("ES") else self.kid)
        }
        return jwt.encode(payload, key, algorithm=alg, headers=headers)


@pytest.fixture
async def local_issuer() -> AsyncIterator[LocalIssuer]:
    issuer = LocalIssuer()
    issuer.server = TestServer(issuer.app())
    await issuer.server.start_server()
    yield issuer
    await issuer.server.close()


async def _proxy(
    upstream: TestServer, issuers: list[dict[str, Any]]
) -> tuple[TestClient[web.Request, web.Application], ListSink]:
    sink = ListSink()
    settings = settings_for(str(upstream.make_url("/")), issuers=json.dumps(issuers))
    client = TestClient(TestServer(build_app(settings, audit_log=AuditLog([sink]))))
    await client.start_server()
    return client, sink


async def test_real_idp_token_is_accepted_and_identity_is_complete(
    idp: TestIdP, upstream: TestServer
) -> None:
    client, sink = await _proxy(upstream, [{"issuer": idp.issuer, "audiences": ["countersign"]}])
    try:
        token = await idp.token("agent-7")
        resp = await client.get("/cloud/buckets", headers=bearer(token))
        assert resp.status == 200
        assert "authorization" not in (await resp.json())["headers"]
        identity = sink.named("request.completed")[0]["identity"]
        assert identity == {
            "subject": "agent-7",
            "issuer": idp.issuer,
            "client_id": "agent-7",
            "email": "agent7@example.com",
            "groups": ["agents"],
            "owner": "alice@example.com",
        }
        assert token not in json.dumps(sink.events), "tokens never reach the audit trail"
    finally:
        await client.close()


async def test_real_idp_token_for_another_audience_is_refused(
    idp: TestIdP, upstream: TestServer
) -> None:
    client, _ = await _proxy(upstream, [{"issuer": idp.issuer, "audiences": ["countersign"]}])
    try:
        token = await idp.token("agent-7", resource="https://other.example")
        resp = await client.get("/cloud/buckets", headers=bearer(token))
        assert resp.status == 401
        assert (await resp.json())["error"]["message"] == "token audience is not accepted"
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    finally:
        await client.close()


async def test_key_rotation_at_the_idp_is_picked_up(upstream: TestServer) -> None:
    idp = start_idp(DEFAULT_CLIENTS[:1])
    try:
        client, _ = await _proxy(
            upstream,
            [{"issuer": idp.issuer, "audiences": ["countersign"]}],
        )
        try:
            before = await idp.token("agent-7")
            assert (await client.get("/cloud/x", headers=bearer(before))).status == 200
            await idp.rotate()
            after = await idp.token("agent-7")
            assert (
                jwt.get_unverified_header(after)["kid"] != jwt.get_unverified_header(before)["kid"]
            )
            # The new kid is unknown to the proxy: it refetches the JWKS once and accepts.
            assert (await client.get("/cloud/x", headers=bearer(after))).status == 200
        finally:
            await client.close()
    finally:
        idp.stop()


def _issuer_cfg(issuer: LocalIssuer, **extra: Any) -> list[dict[str, Any]]:
    return [{"issuer": issuer.issuer, "audiences": ["countersign"], **extra}]


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": int(time.time()) - 3600}, "token expired"),
        ({"nbf": int(time.time()) + 3600}, "token not yet valid"),
        ({"aud": "someone-else"}, "token audience is not accepted"),
        ({"exp": None}, 'invalid token: Token is missing the "exp" claim'),
        ({"sub": None}, 'invalid token: Token is missing the "sub" claim'),
    ],
)
async def test_invalid_claims_are_refused(
    local_issuer: LocalIssuer, upstream: TestServer, claims: dict[str, Any], message: str
) -> None:
    client, _ = await _proxy(upstream, _issuer_cfg(local_issuer))
    try:
        resp = await client.get("/cloud/x", headers=bearer(local_issuer.mint(**claims)))
        assert resp.status == 401
        assert (await resp.json())["error"]["message"] == message
    finally:
        await client.close()


async def test_small_clock_skew_is_tolerated(
    local_issuer: LocalIssuer, upstream: TestServer
) -> None:
    client, _ = await _proxy(upstream, _issuer_cfg(local_issuer))
    try:
        now = int(time.time())
        token = local_issuer.mint(exp=now - 5, nbf=now + 5)  # within the 30 s default leeway
        assert (await client.get("/cloud/x", headers=bearer(token))).status == 200
    finally:
        await client.close()


async def test_hs256_and_none_are_refused_even_with_the_public_key(
    local_issuer: LocalIssuer, upstream: TestServer
) -> None:
    client, _ = await _proxy(upstream, _issuer_cfg(local_issuer))
    try:
        # The classic confusion attack: HMAC "signed" with the issuer's public key.
        pem = local_issuer.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        header, payload, _ = local_issuer.mint().split(".")
        import base64
        import hashlib
        import hmac

        signing_input = f"{header}.{payload}".encode()
        forged_header = base64.urlsafe_b64encode(
            json.dumps({"alg": "HS256", "kid": local_issuer.kid}).encode()
        ).rstrip(b"=")
        forged_input = forged_header + b"." + payload.encode()
        sig = base64.urlsafe_b64encode(hmac.new(pem, forged_input, hashlib.sha256).digest())
        forged = (forged_input + b"." + sig.rstrip(b"=")).decode()
        assert signing_input  # the genuine token shape was used as the base
        resp = await client.get("/cloud/x", headers=bearer(forged))
        assert resp.status == 401
        assert (await resp.json())["error"]["message"] == "algorithm 'HS256' is not accepted"

        none_header = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
        resp = await client.get("/cloud/x", headers=bearer(f"{none_header}.{payload}."))
        assert resp.status == 401
        assert (await resp.json())["error"]["message"] == "algorithm 'none' is not accepted"
    finally:
        await client.close()


async def test_algorithm_outside_the_issuer_allow_list_is_refused(
    local_issuer: LocalIssuer, upstream: TestServer
) -> None:
    client, _ = await _proxy(upstream, _issuer_cfg(local_issuer, algorithms=["RS256"]))
    try:
        resp = await client.get("/cloud/x", headers=bearer(local_issuer.mint(alg="ES256")))
        assert resp.status == 401
        assert (await resp.json())["error"]["message"] == "algorithm 'ES256' is not accepted"
    finally:
        await client.close()
    client, _ = await _proxy(upstream, _issuer_cfg(local_issuer))  # default: RS256, ES256
    try:
        resp = await client.get("/cloud/x", headers=bearer(local_issuer.mint(alg="ES256")))
        assert resp.status == 200
    finally:
        await client.close()


async def test_wrong_signature_and_untrusted_issuer_are_refused(
    local_issuer: LocalIssuer, upstream: TestServer
) -> None:
    client, _ = await _proxy(upstream, _issuer_cfg(local_issuer))
    try:
        stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        resp = await client.get("/cloud/x", headers=bearer(local_issuer.mint(key=stranger)))
        assert resp.status == 401
        error = (await resp.json())["error"]
        assert error["message"] == "invalid token: Signature verification failed"
        resp = await client.get(
            "/cloud/x", headers=bearer(local_issuer.mint(iss="https://evil.example"))
        )
        assert resp.status == 401
        assert (await resp.json())["error"]["message"] == "token issuer is not trusted"
        resp = await client.get("/cloud/x", headers=bearer("eyJhbGciOi.garbage"))
        assert resp.status == 401
        assert (await resp.json())["error"]["message"] == "malformed token"
    finally:
        await client.close()


async def test_random_kids_cannot_hammer_the_idp(
    local_issuer: LocalIssuer, upstream: TestServer
) -> None:
    client, _ = await _proxy(upstream, _issuer_cfg(local_issuer))
    try:
        assert (await client.get("/cloud/x", headers=bearer(local_issuer.mint()))).status == 200
        assert local_issuer.jwks_hits == 1
        for i in range(50):
            token = local_issuer.mint(kid=f"random-{i}")
            resp = await client.get("/cloud/x", headers=bearer(token))
            assert resp.status == 401
            assert (await resp.json())["error"]["message"] == "token signed with an unknown key"
        # At most one refetch inside the cooldown window, whatever the number of unknown kids.
        assert local_issuer.jwks_hits <= 2
    finally:
        await client.close()


async def test_unreachable_idp_is_503_not_401(upstream: TestServer) -> None:
    client, _ = await _proxy(upstream, [{"issuer": "http://127.0.0.1:9", "audiences": ["c"]}])
    try:
        now = int(time.time())
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        token = jwt.encode(
            {"iss": "http://127.0.0.1:9", "aud": "c", "sub": "a", "exp": now + 60},
            key,
            algorithm="RS256",
            headers={"kid": "k"},
        )
        resp = await client.get("/cloud/x", headers=bearer(token))
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "identity_unavailable"
    finally:
        await client.close()


async def test_verified_tokens_are_cached_until_they_expire(local_issuer: LocalIssuer) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        verifier = OIDCVerifier(
            [
                IssuerSettings(
                    issuer=local_issuer.issuer, audiences=("countersign",), leeway_seconds=0
                )
            ],
            ClaimsSettings(),
            session,
        )
        calls = 0
        original = verifier._verify_uncached

        async def counting(token: str) -> Any:
            nonlocal calls
            calls += 1
            return await original(token)

        verifier._verify_uncached = counting  # type: ignore[method-assign]
        token = local_issuer.mint(exp=int(time.time()) + 2)
        for _ in range(100):
            assert (await verifier.verify(token)).subject == "agent-x"
        assert calls == 1, "signature checked once, then served from the cache"
        await asyncio.sleep(2.1)
        with pytest.raises(Exception, match="token expired"):
            await verifier.verify(token)


def _with_header(header: Any, token: str) -> str:
    """`token` with its header segment replaced by `header` (JSON, base64url), signature kept."""
    import base64

    _, payload, signature = token.split(".")
    encoded = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return f"{encoded}.{payload}.{signature}"


# pyjwt's own words follow "invalid token header: " (they name the fault, and may change).
@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"alg": "RS256", "kid": 123}, "invalid token header: "),
        ({"alg": "RS256", "kid": ["a"]}, "invalid token header: "),
        ({"alg": "RS256", "crit": ["x"]}, "invalid token header: "),
        ({"alg": "RS256", "crit": "x"}, "invalid token header: "),
        ({"alg": "RS256", "crit": [1]}, "invalid token header: "),
        ({"alg": 256, "kid": "rsa-1"}, "algorithm 256 is not accepted"),
        ({"alg": ["RS256"], "kid": "rsa-1"}, "algorithm ['RS256'] is not accepted"),
        (["RS256"], "malformed token"),
        ("RS256", "malformed token"),
        (None, "malformed token"),
    ],
)
async def test_malformed_token_headers_are_401_not_500(
    local_issuer: LocalIssuer, upstream: TestServer, header: Any, message: str
) -> None:
    client, sink = await _proxy(upstream, _issuer_cfg(local_issuer))
    try:
        token = _with_header(header, local_issuer.mint())
        resp = await client.get("/cloud/x", headers=bearer(token))
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
        error = (await resp.json())["error"]
        assert error["code"] == "unauthorized" and error["message"].startswith(message)
        assert error["request_id"] == resp.headers["X-Request-Id"]
        completed = sink.named("request.completed")
        assert [(e["status"], e["error"]) for e in completed] == [(401, "unauthorized")]
        assert completed[0]["identity"] is None and completed[0]["action"] is None
    finally:
        await client.close()
