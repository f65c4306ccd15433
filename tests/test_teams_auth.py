"""Inbound Teams activities: only a Bot Framework token for this bot, this service URL and this
tenant is accepted; keys come from the (local) OpenID metadata, refetched on an unknown kid at
most once per cooldown."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from proxy.teams.auth import ActivityVerifier, TeamsAuthError
from tests.teams_fake import APP_ID, TENANT, FakeTeams


@pytest.fixture
async def fake() -> AsyncIterator[FakeTeams]:
    teams = FakeTeams()
    await teams.start()
    yield teams
    await teams.close()


@pytest.fixture
async def verifier(fake: FakeTeams) -> AsyncIterator[ActivityVerifier]:
    async with aiohttp.ClientSession() as session:
        yield ActivityVerifier(APP_ID, TENANT, fake.openid_metadata_url, session)


async def test_a_genuine_activity_is_accepted(fake: FakeTeams, verifier: ActivityVerifier) -> None:
    await verifier.verify("Bearer " + fake.sign(), fake.activity())
    # The service URL compares without case or a trailing slash.
    await verifier.verify(
        "Bearer " + fake.sign(fake.service_url.upper().rstrip("/")), fake.activity()
    )


def _cases(fake: FakeTeams) -> list[tuple[str, str | None, dict[str, Any]]]:
    now = int(time.time())
    good = fake.activity()
    return [
        ("no header", None, good),
        ("not bearer", "Basic abc", good),
        ("garbage", "Bearer not.a.jwt", good),
        ("forged key", "Bearer " + fake.sign(forged=True), good),
        ("unknown kid", "Bearer " + fake.sign(kid="nope"), good),
        ("wrong issuer", "Bearer " + fake.sign(iss="https://evil.example"), good),
        ("wrong audience", "Bearer " + fake.sign(aud="someone-else"), good),
        ("expired", "Bearer " + fake.sign(exp=now - 3600, iat=now - 7200, nbf=now - 7200), good),
        ("no serviceurl", "Bearer " + fake.sign(serviceurl=None), good),
        ("other serviceurl", "Bearer " + fake.sign("https://evil.example/teams/"), good),
        (
            "activity steered elsewhere",
            "Bearer " + fake.sign(),
            fake.activity(serviceUrl="https://evil.example/teams/"),
        ),
        (
            "other tenant",
            "Bearer " + fake.sign(),
            fake.activity(channelData={"tenant": {"id": "other-tenant"}}),
        ),
        ("no tenant", "Bearer " + fake.sign(), fake.activity(channelData={})),
    ]


async def test_anything_else_is_refused(fake: FakeTeams, verifier: ActivityVerifier) -> None:
    for name, header, activity in _cases(fake):
        with pytest.raises(TeamsAuthError):
            await verifier.verify(header, activity)
            pytest.fail(f"accepted: {name}")


async def test_unknown_kids_refetch_keys_at_most_once_per_cooldown(
    fake: FakeTeams, verifier: ActivityVerifier
) -> None:
    await verifier.verify("Bearer " + fake.sign(), fake.activity())
    assert fake.jwks_fetches == 1
    for n in range(20):
        with pytest.raises(TeamsAuthError):
            await verifier.verify("Bearer " + fake.sign(kid=f"random-{n}"), fake.activity())
    assert fake.jwks_fetches == 2  # one refetch, then the cooldown holds
    await verifier.verify("Bearer " + fake.sign(), fake.activity())
    assert fake.jwks_fetches == 2


async def test_a_rotated_key_is_picked_up(fake: FakeTeams) -> None:
    async with aiohttp.ClientSession() as session:
        verifier = ActivityVerifier(
            APP_ID, TENANT, fake.openid_metadata_url, session, refresh_cooldown=0.0
        )
        await verifier.verify("Bearer " + fake.sign(), fake.activity())
        fake.kids = ["test-key-2"]
        await verifier.verify("Bearer " + fake.sign(kid="test-key-2"), fake.activity())
        assert fake.jwks_fetches == 2
