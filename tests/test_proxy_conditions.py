"""Credential sources, body/header/query conditions and a GraphQL route, through the real app
in process, against real upstreams (the echo server and a graphql-core server)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import build_app
from proxy.audit import AuditLog
from proxy.authn.apikeys import key_digest
from proxy.config import Settings, load_settings_text
from tests.graphql_upstream import GraphQLUpstream, graphql_upstream
from tests.helpers import AGENT_KEY, ALICE_KEY, ListSink, bearer

AGENT = bearer(AGENT_KEY)
ALICE = bearer(ALICE_KEY)
API = "/_countersign/api/approvals"

CONFIG = """
server: {{listen: "127.0.0.1:0", max_body_bytes: 2048}}
identity:
  api_keys:
    - {{sha256: "{agent}", subject: agent-key, groups: [agents], owner: "bob@example.com"}}
    - {{sha256: "{alice}", subject: alice, groups: [data-owners], email: "alice@example.com"}}
routes:
  - {{name: gh, prefix: /gh/, upstream: "{echo}/api/", caller_credentials: [token]}}
  - {{name: basic, prefix: /basic/, upstream: "{echo}/api/", caller_credentials: [basic]}}
  - name: keyed
    prefix: /keyed/
    upstream: "{echo}/api/"
    caller_credentials: ["header:X-Api-Key", bearer]
  - {{name: data, prefix: /data/, upstream: "{echo}/api/"}}
  - {{name: gql, prefix: /graphql, upstream: "{graphql}", protocol: graphql}}
  - {{name: files, prefix: /Files/, upstream: "{echo}/api/", case_insensitive_paths: true}}
  - {{name: keep, prefix: /keep/, upstream: "{echo}/api/", merge_slashes: false}}
approvals: {{timeout_seconds: 30}}
policy:
  rules:
    - name: prod-exports
      route: data
      methods: [POST]
      paths: ["/data/exports"]
      when: {{json: {{"/format": [csv, parquet]}}, headers: {{X-Env: prod}}}}
      action: approve
      approvers: {{groups: [data-owners]}}
    - {{name: form-delete, route: data, when: {{form: {{op: delete}}}}, action: deny}}
    - {{name: dry-runs, route: data, when: {{query: {{dry_run: "true"}}}}, action: allow}}
    - {{name: data-posts, route: data, methods: [POST], action: allow}}
    - {{name: no-secrets, route: files, paths: ["/files/secret/**"], action: deny}}
    - {{name: reads, methods: [GET], action: allow}}
    - {{name: gql-reads, route: gql, actions: ["query:*"], action: allow}}
    - name: gql-delete
      route: gql
      actions: ["mutation:deleteUser"]
      action: approve
      approvers: {{groups: [data-owners]}}
    - {{name: gql-other-writes, route: gql, actions: ["mutation:*"], action: deny}}
"""


def settings(echo: str, graphql: str) -> Settings:
    text = CONFIG.format(
        agent=key_digest(AGENT_KEY),
        alice=key_digest(ALICE_KEY),
        echo=echo.rstrip("/"),
        graphql=graphql,
    )
    return load_settings_text(text, "conditions.yaml", env={})


@pytest.fixture
async def gql() -> AsyncIterator[GraphQLUpstream]:
    async with graphql_upstream() as server:
        yield server


@pytest.fixture
async def proxy(
    upstream: TestServer, gql: GraphQLUpstream
) -> AsyncIterator[tuple[TestClient[Any, Any], ListSink]]:
    sink = ListSink()
    app = build_app(settings(str(upstream.make_url("/")), gql.url), audit_log=AuditLog([sink]))
    client: TestClient[Any, Any] = TestClient(TestServer(app, handler_cancellation=True))
    await client.start_server()
    yield client, sink
    await client.close()


Proxy = tuple[TestClient[Any, Any], ListSink]


async def error_of(resp: Any) -> dict[str, Any]:
    body: dict[str, Any] = await resp.json()
    return dict(body["error"])


# -- credential sources ----------------------------------------------------------------------


async def test_token_source_reads_authorization_token_and_never_forwards_it(proxy: Proxy) -> None:
    client, _ = proxy
    resp = await client.get("/gh/repos", headers={"Authorization": f"token {AGENT_KEY}"})
    assert resp.status == 200
    echo = await resp.json()
    assert "authorization" not in echo["headers"]
    # A bearer token is not what this route reads.
    resp = await client.get("/gh/repos", headers=AGENT)
    assert resp.status == 401
    assert "token" in (await error_of(resp))["message"]


async def test_basic_source_takes_the_password_as_the_credential(proxy: Proxy) -> None:
    client, _ = proxy
    encoded = base64.b64encode(f"anyone:{AGENT_KEY}".encode()).decode()
    resp = await client.get("/basic/x", headers={"Authorization": f"Basic {encoded}"})
    assert resp.status == 200
    assert "authorization" not in (await resp.json())["headers"]
    resp = await client.get("/basic/x", headers={"Authorization": "Basic %%%not-base64"})
    assert resp.status == 401
    # The challenge asks for what the route reads (a browser or curl prompts for a password).
    assert resp.headers["WWW-Authenticate"].startswith('Basic realm="countersign"')


async def test_header_source_is_read_first_and_stripped_before_forwarding(proxy: Proxy) -> None:
    client, _ = proxy
    resp = await client.get("/keyed/x", headers={"X-Api-Key": AGENT_KEY})
    assert resp.status == 200
    assert "x-api-key" not in (await resp.json())["headers"]
    # The route's second source still works when the first is absent.
    resp = await client.get("/keyed/x", headers=AGENT)
    assert resp.status == 200
    # Present but wrong: refused, not tried against the next source.
    resp = await client.get("/keyed/x", headers={"X-Api-Key": "cs_wrong", **AGENT})
    assert resp.status == 401


# -- conditions on headers, query, JSON and form fields --------------------------------------


async def test_json_and_header_conditions_hold_only_the_matching_export(proxy: Proxy) -> None:
    client, _ = proxy
    dev = await client.post(
        "/data/exports", json={"format": "csv"}, headers={**AGENT, "X-Env": "dev"}
    )
    assert dev.status == 200, "another environment is not held"
    assert (await dev.json())["body"] == '{"format": "csv"}', "the body read is forwarded intact"
    pdf = await client.post(
        "/data/exports", json={"format": "pdf"}, headers={**AGENT, "X-Env": "prod"}
    )
    assert pdf.status == 200, "another format is not held"
    held = asyncio.create_task(
        client.post("/data/exports", json={"format": "csv"}, headers={**AGENT, "X-Env": "prod"})
    )
    for _ in range(100):
        listed = await (await client.get(f"{API}?state=pending", headers=ALICE)).json()
        if listed["approvals"]:
            break
        await asyncio.sleep(0.02)
    assert listed["approvals"] and listed["approvals"][0]["rule"] == "prod-exports"
    assert not held.done()
    approval_id = listed["approvals"][0]["approval_id"]
    decided = await client.post(
        f"{API}/{approval_id}/decision", json={"verdict": "approve"}, headers=ALICE
    )
    assert decided.status == 200
    resp = await asyncio.wait_for(held, 10)
    assert resp.status == 200
    assert json.loads((await resp.json())["body"]) == {"format": "csv"}


async def test_a_repeated_field_a_condition_reads_is_ambiguous(proxy: Proxy) -> None:
    client, _ = proxy
    resp = await client.post(
        "/data/exports",
        data=b'{"format": "pdf", "format": "csv"}',
        headers={**AGENT, "X-Env": "prod", "Content-Type": "application/json"},
    )
    assert resp.status == 400
    error = await error_of(resp)
    assert error["code"] == "ambiguous_request"
    assert "format" in error["message"]
    resp = await client.get("/data/x?dry_run=true&dry_run=false", headers=AGENT)
    assert resp.status == 400
    assert (await error_of(resp))["code"] == "ambiguous_request"


async def test_a_body_meant_as_json_that_does_not_parse_is_refused(proxy: Proxy) -> None:
    client, sink = proxy
    # A byte-order mark: some upstreams read this as {"format": "csv"}, which the rule holds.
    resp = await client.post(
        "/data/exports",
        data=b'\xef\xbb\xbf{"format": "csv"}',
        headers={**AGENT, "X-Env": "prod", "Content-Type": "application/json"},
    )
    assert resp.status == 400
    error = await error_of(resp)
    assert error["code"] == "invalid_request"
    assert error["message"].endswith("a rule judges fields of this body, so it must be JSON")
    completed = sink.named("request.completed")
    assert [(e["status"], e["error"]) for e in completed] == [(400, "invalid_request")]


async def test_form_and_query_conditions(proxy: Proxy) -> None:
    client, _ = proxy
    resp = await client.post("/data/items", data={"op": "delete", "id": "7"}, headers=AGENT)
    assert resp.status == 403
    assert (await error_of(resp))["rule"] == "form-delete"
    resp = await client.post("/data/items", data={"op": "create"}, headers=AGENT)
    assert resp.status == 200
    resp = await client.delete("/data/items/7?dry_run=true", headers=AGENT)
    assert resp.status == 200
    resp = await client.delete("/data/items/7", headers=AGENT)
    assert resp.status == 403


async def test_a_body_too_large_to_judge_is_refused_413(proxy: Proxy) -> None:
    client, _ = proxy
    resp = await client.post(
        "/data/exports",
        json={"format": "csv", "pad": "x" * 4096},
        headers={**AGENT, "X-Env": "prod"},
    )
    assert resp.status == 413
    assert (await error_of(resp))["code"] == "payload_too_large"


# -- GraphQL: actions from the parsed document ------------------------------------------------


async def test_graphql_queries_pass_and_mutations_are_judged_per_root_field(
    proxy: Proxy, gql: GraphQLUpstream
) -> None:
    client, sink = proxy
    resp = await client.post(
        "/graphql", json={"query": "query Q { users { id name } }"}, headers=AGENT
    )
    assert resp.status == 200
    assert (await resp.json())["data"]["users"][0]["name"] == "ada"
    # A rename is a mutation no rule allows.
    resp = await client.post(
        "/graphql",
        json={"query": 'mutation { renameUser(id: "1", name: "x") { id } }'},
        headers=AGENT,
    )
    assert resp.status == 403
    assert "renameUser" not in gql.executed
    # An alias and a harmless operation name change nothing: the field is what runs.
    resp = await client.post(
        "/graphql",
        json={
            "query": 'query ListUsers { users { id } } mutation M { ok: deleteUser(id: "2") }',
            "operationName": "ListUsers",
        },
        headers={**AGENT, "Prefer": "respond-async"},
    )
    assert resp.status == 202, "a document holding a deleteUser waits for a human"
    assert "deleteUser" not in gql.executed
    approval_id = (await resp.json())["approval_id"]
    shown = await (await client.get(f"{API}/{approval_id}", headers=ALICE)).json()
    assert shown["actions"] == ["query:users", "mutation:deleteUser"]
    events = [e for e in sink.events if e["event"] == "approval.requested"]
    assert events and events[0]["actions"] == ["query:users", "mutation:deleteUser"]


async def test_graphql_fragments_at_the_root_are_seen_through(proxy: Proxy) -> None:
    client, _ = proxy
    query = 'mutation { ...F } fragment F on Mutation { renameUser(id: "1", name: "y") { id } }'
    resp = await client.post("/graphql", json={"query": query}, headers=AGENT)
    assert resp.status == 403
    resp = await client.post("/graphql", json={"query": "mutation {"}, headers=AGENT)
    assert resp.status == 400
    assert (await error_of(resp))["code"] == "invalid_request"


# -- paths: case-insensitive upstreams, and upstreams where "//" matters ----------------------


async def test_a_case_insensitive_route_judges_the_folded_path(proxy: Proxy) -> None:
    client, _ = proxy
    for path in ("/files/secret/x", "/FILES/Secret/x", "/Files/SECRET/"):
        resp = await client.get(path, headers=AGENT)
        assert resp.status == 403, path
        assert (await error_of(resp))["rule"] == "no-secrets"
    resp = await client.get("/FILES/public/Report.txt", headers=AGENT)
    assert resp.status == 200
    assert (await resp.json())["path"] == "/api/public/Report.txt", "forwarded as sent"


async def test_merge_slashes_false_forwards_the_path_bytes_as_sent(proxy: Proxy) -> None:
    client, _ = proxy
    resp = await client.get("/keep/logs//2024/a%2Bb%C3%BC%20d.txt?x=1", headers=AGENT)
    assert resp.status == 200
    echo = await resp.json()
    assert echo["path"] == "/api/logs//2024/a%2Bb%C3%BC%20d.txt"
    assert echo["query"] == "x=1"
    # Other routes still collapse repeated slashes and re-encode canonically.
    resp = await client.get("/data//a%2Bb", headers=AGENT)
    assert (await resp.json())["path"] == "/api/a+b"
