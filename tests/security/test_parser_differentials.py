"""Attack: make the upstream read the request differently from the policy.

A rule that judges a field (a JSON value, a header, a query parameter) or an action named from
the body (a GraphQL mutation) is only as good as the reading it judges. If Countersign reads
one thing and the upstream another — the other of two repeated values, JSON a lenient parser
accepts and a strict one does not, a mutation behind a harmless operation name — the upstream
runs what nobody judged. Each of these is refused before anything is sent (DESIGN §1: "anything
that could make the upstream execute something other than what was judged is refused").
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.security.conftest import JSON, Recorder, StartProxy, Tokens, jbody, send

APPROVERS = {"groups": ["data-owners"]}
ROUTES = [
    {"name": "gql", "prefix": "/gql", "upstream": "{upstream}/graphql", "protocol": "graphql"}
]
RULES = [
    # Production jobs wait for a human; every other job runs.
    {
        "name": "prod-jobs",
        "route": "cloud",
        "methods": ["POST"],
        "paths": ["/cloud/jobs/**"],
        "when": {"json": {"/env": "prod"}},
        "action": "approve",
        "approvers": APPROVERS,
    },
    {
        "name": "dry-runs",
        "route": "cloud",
        "paths": ["/cloud/jobs/**"],
        "when": {"query": {"dry_run": "true"}, "headers": {"X-Env": "dev"}},
        "action": "allow",
    },
    {
        "name": "jobs",
        "route": "cloud",
        "methods": ["POST"],
        "paths": ["/cloud/jobs/**"],
        "action": "allow",
    },
    # GraphQL: reads run, no mutation ever does.
    {"name": "gql-reads", "route": "gql", "actions": ["query:*"], "action": "allow"},
]


@pytest.fixture
def proxy_url(start_proxy: StartProxy) -> str:
    return start_proxy(extra_routes=ROUTES, extra_rules=RULES).url


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("byte-order mark", b'\xef\xbb\xbf{"env": "prod"}'),
        ("trailing comma", b'{"env": "prod",}'),
        ("comment", b'{"env": "prod" /* later */}'),
        ("single quotes", b"{'env': 'prod'}"),
        ("invalid UTF-8", b'{"env": "prod", "note": "\xff"}'),
        ("nested too deeply", b'{"env": "prod", "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"),
    ],
)
async def test_json_a_lenient_upstream_would_read_is_refused_not_judged_absent(
    proxy_url: str,
    recorder: Recorder,
    tokens: Tokens,
    session: aiohttp.ClientSession,
    name: str,
    body: bytes,
) -> None:
    agent = {**(await tokens("agent-7")), **JSON}
    reply = await send(session, "POST", f"{proxy_url}/cloud/jobs/nightly", headers=agent, data=body)
    assert (reply.status, reply.code) == (400, "invalid_request"), (name, str(reply))
    assert recorder.requests == [], f"{name}: reached the upstream unjudged"


async def test_a_key_given_twice_is_refused(
    proxy_url: str, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    # Python keeps the last "env", many parsers the first: the upstream might run prod.
    agent = {**(await tokens("agent-7")), **JSON}
    reply = await send(
        session,
        "POST",
        f"{proxy_url}/cloud/jobs/nightly",
        headers=agent,
        data=b'{"env": "prod", "env": "dev"}',
    )
    assert (reply.status, reply.code) == (400, "ambiguous_request"), str(reply)
    assert recorder.requests == []


async def test_repeated_query_parameters_and_headers_a_rule_reads_are_refused(
    proxy_url: str, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    agent = await tokens("agent-7")
    url = f"{proxy_url}/cloud/jobs/nightly"
    reply = await send(
        session, "DELETE", f"{url}?dry_run=true&dry_run=false", headers={**agent, "X-Env": "dev"}
    )
    assert (reply.status, reply.code) == (400, "ambiguous_request"), str(reply)
    two_envs = {**agent, "X-Env": "dev, prod"}
    reply = await send(session, "DELETE", f"{url}?dry_run=true", headers=two_envs)
    assert (reply.status, reply.code) == (403, "policy_denied"), "a list value is not 'dev'"
    assert recorder.requests == []
    # The unambiguous request is judged as written: a dry run in dev runs.
    reply = await send(session, "DELETE", f"{url}?dry_run=true", headers={**agent, "X-Env": "dev"})
    assert reply.status == 200, str(reply)
    assert len(recorder.requests) == 1


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        (
            "a mutation behind a query's operation name",
            {"query": "query Safe { users } mutation Drop { dropAll }", "operationName": "Safe"},
        ),
        ("an alias that looks like a query", {"query": "mutation { users: dropAll }"}),
        (
            "a fragment spread at the root",
            {"query": "mutation { ...F } fragment F on Mutation { dropAll }"},
        ),
        ("a batch", [{"query": "{ users }"}, {"query": "mutation { dropAll }"}]),
    ],
)
async def test_a_graphql_mutation_cannot_hide(
    proxy_url: str,
    recorder: Recorder,
    tokens: Tokens,
    session: aiohttp.ClientSession,
    name: str,
    payload: object,
) -> None:
    agent = {**(await tokens("agent-7")), **JSON}
    reply = await send(session, "POST", f"{proxy_url}/gql", headers=agent, data=jbody(payload))
    assert (reply.status, reply.code) == (403, "policy_denied"), (name, str(reply))
    assert recorder.requests == [], f"{name}: reached the upstream"
