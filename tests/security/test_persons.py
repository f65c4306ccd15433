"""Attack: decide an approval as a credential that is not (provably) another person.

Every decision is made by a person, one canonical email (DESIGN §2, Persons): an unverified or
missing email names nobody (`approver_unidentified`); the requester and the owner the agent acts
for never decide (`self_approval`), whatever credential, alias or letter case they use; a quorum
counts distinct persons (`already_approved`); an owner that is not an email fails closed.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.security.conftest import (
    JSON,
    ApiKey,
    Headers,
    Process,
    Recorder,
    StartProxy,
    Tokens,
    decide,
    get_approval,
    send,
    start,
    wait_pending,
)

ALICE_OPS = ApiKey(
    "cs_sec_alice_ops_key_000000000000000000000",
    "alice-ops",
    ("data-owners",),
    email="Alice+ops@Example.com",
)
ALICE_UPPER = ApiKey(
    "cs_sec_alice_upper_key_0000000000000000000",
    "alice-upper",
    ("data-owners",),
    email="  ALICE@EXAMPLE.COM ",
)
CAROL_KEY = ApiKey(
    "cs_sec_carol_key_0000000000000000000000000",
    "carol-key",
    ("data-owners",),
    email="carol@example.com",
)
CAROL_PLUS = ApiKey(
    "cs_sec_carol_plus_key_00000000000000000000",
    "carol-plus",
    ("data-owners",),
    email="Carol+work@example.com",
)
MALLORY_KEY = ApiKey(
    "cs_sec_mallory_key_00000000000000000000000", "mallory-key", email="mallory@example.com"
)
NO_EMAIL_OWNER = ApiKey(
    "cs_sec_agent_u123_key_00000000000000000000", "agent-u123", ("agents",), owner="u-123"
)
BOB_KEY = ApiKey(
    "cs_sec_bob_key_000000000000000000000000000", "bob-key", ("data-owners",), "bob@example.com"
)
AGENT7_ALIAS = ApiKey(
    "cs_sec_agent7_alias_key_000000000000000000",
    "agent7-human",
    ("data-owners",),
    email="Agent7+approver@EXAMPLE.com",
)
KEYS = (
    AGENT7_ALIAS,
    ALICE_OPS,
    ALICE_UPPER,
    CAROL_KEY,
    CAROL_PLUS,
    MALLORY_KEY,
    NO_EMAIL_OWNER,
    BOB_KEY,
)


async def held_export(
    session: aiohttp.ClientSession, proc: Process, who: Headers, path: str = "exports/x"
) -> str:
    """An async-mode request of `who`: the approval id of its 202."""
    reply = await send(
        session, "POST", f"{proc.url}/cloud/{path}", headers={**who, **JSON}, data=b"{}"
    )
    assert reply.status == 202, str(reply)
    approval_id: str = reply.json()["approval_id"]
    return approval_id


async def assert_untouched(
    session: aiohttp.ClientSession,
    proc: Process,
    recorder: Recorder,
    approval_id: str,
    viewer: Headers,
) -> None:
    shown = await get_approval(session, proc.url, viewer, approval_id)
    assert (shown["state"], shown["approvals"], shown["decisions"]) == ("pending", 0, [])
    assert recorder.requests == []


@pytest.mark.parametrize("client", ["alice-noemail", "alice-unverified", "alice-unverified-false"])
async def test_credential_without_a_verified_email_cannot_decide(
    start_proxy: StartProxy,
    recorder: Recorder,
    tokens: Tokens,
    session: aiohttp.ClientSession,
    client: str,
) -> None:
    """alice's own credentials (data-owners) without a verified email: agent-7 acts for alice,
    and nothing proves this caller is someone else, so it decides nothing."""
    proc = start_proxy(mode="async", api_keys=KEYS)
    approval_id = await held_export(session, proc, await tokens("agent-7"))
    who = await tokens(client)
    for verdict, reason in (("approve", None), ("deny", "no")):
        reply = await decide(session, proc.url, approval_id, who, verdict, reason)
        assert (reply.status, reply.code) == (403, "approver_unidentified"), (verdict, str(reply))
    await assert_untouched(session, proc, recorder, approval_id, await tokens("bob"))


@pytest.mark.parametrize("key", [ALICE_OPS, ALICE_UPPER], ids=["plus-alias", "case-and-space"])
async def test_owner_alias_is_self_approval(
    start_proxy: StartProxy,
    recorder: Recorder,
    tokens: Tokens,
    session: aiohttp.ClientSession,
    key: ApiKey,
) -> None:
    proc = start_proxy(mode="async", api_keys=KEYS)
    approval_id = await held_export(session, proc, await tokens("agent-7"))  # acts for alice
    reply = await decide(session, proc.url, approval_id, key.headers, "approve")
    assert (reply.status, reply.code) == (403, "self_approval"), str(reply)
    await assert_untouched(session, proc, recorder, approval_id, await tokens("bob"))


async def test_quorum_counts_persons_not_credentials(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    proc = start_proxy(api_keys=KEYS)
    url = f"{proc.url}/cloud/iam/roles"
    body = b'{"role": "admin", "user": "agent-7"}'
    call = start(session, "POST", url, headers={**(await tokens("agent-7")), **JSON}, data=body)
    bob = await tokens("bob")
    [pending] = await wait_pending(session, proc.url, bob)
    approval_id = pending["approval_id"]
    assert pending["quorum"] == 2

    first = await decide(session, proc.url, approval_id, await tokens("carol"), "approve")
    assert first.status == 200 and first.json()["state"] == "pending", str(first)
    # carol again: another subject of hers (Carol@Example.com), her API key, her +alias.
    for again in (await tokens("carol-2"), CAROL_KEY.headers, CAROL_PLUS.headers):
        reply = await decide(session, proc.url, approval_id, again, "approve")
        assert (reply.status, reply.code) == (409, "already_approved"), str(reply)
        shown = await get_approval(session, proc.url, bob, approval_id)
        assert (shown["state"], shown["approvals"]) == ("pending", 1)
    await asyncio.sleep(0.2)
    assert not call.done() and recorder.requests == []

    second = await decide(session, proc.url, approval_id, bob, "approve")
    assert second.status == 200 and second.json()["state"] == "approved", str(second)
    reply = await asyncio.wait_for(call, 10)
    assert reply.status == 200 and reply.headers["Countersign-Approval-Id"] == approval_id
    await asyncio.sleep(0.2)
    assert [(r.target, r.body) for r in recorder.requests] == [("/iam/roles", body)]
    shown = await get_approval(session, proc.url, bob, approval_id)
    assert {d["approver"]["person"] for d in shown["decisions"]} == {
        "carol@example.com",
        "bob@example.com",
    }


async def test_requester_and_strangers_cannot_decide(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    proc = start_proxy(mode="async", api_keys=KEYS)
    agent = await tokens("agent-7")
    approval_id = await held_export(session, proc, agent)
    for who, verdict, reason in (
        (agent, "approve", None),
        (await tokens.fresh("agent-7"), "approve", None),  # another token, the same agent
        (agent, "deny", "changed my mind"),
        # another credential (in data-owners) with the requester's own email, as an alias
        (AGENT7_ALIAS.headers, "approve", None),
    ):
        reply = await decide(session, proc.url, approval_id, who, verdict, reason)
        assert (reply.status, reply.code) == (403, "self_approval"), str(reply)
    # A person who is in no approver group.
    reply = await decide(session, proc.url, approval_id, MALLORY_KEY.headers, "approve")
    assert (reply.status, reply.code) == (403, "not_an_approver"), str(reply)
    # mallory's token names no person at all (no email): DESIGN §2 "A credential with no person
    # cannot decide (403 approver_unidentified)" comes before any approver check.
    reply = await decide(session, proc.url, approval_id, await tokens("mallory"), "approve")
    assert (reply.status, reply.code) == (403, "approver_unidentified"), str(reply)
    await assert_untouched(session, proc, recorder, approval_id, await tokens("bob"))


async def test_agent_whose_owner_is_not_an_email_can_never_be_approved(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    """owner `u-123` cannot be compared with any approver's email: nobody can be shown not to
    be u-123, so every approval is refused (fails closed) and the request never runs."""
    proc = start_proxy(api_keys=KEYS, timeout_seconds=3)
    url = f"{proc.url}/cloud/exports/u123"
    call = start(session, "POST", url, headers={**NO_EMAIL_OWNER.headers, **JSON}, data=b"{}")
    bob = await tokens("bob")
    [pending] = await wait_pending(session, proc.url, bob)
    approval_id = pending["approval_id"]
    assert pending["owner"] == "u-123"
    for who in (
        bob,
        await tokens("carol"),
        await tokens("carol-2"),
        await tokens("alice"),
        BOB_KEY.headers,
        CAROL_KEY.headers,
    ):
        reply = await decide(session, proc.url, approval_id, who, "approve")
        assert (reply.status, reply.code) == (403, "self_approval"), str(reply)
    assert (await get_approval(session, proc.url, bob, approval_id))["state"] == "pending"
    reply = await asyncio.wait_for(call, 10)
    assert (reply.status, reply.code) == (403, "approval_expired"), str(reply)
    await asyncio.sleep(0.2)
    assert recorder.requests == []
