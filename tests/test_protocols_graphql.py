"""The GraphQL recognizer: every root field of every operation, through fragments."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import pytest
from multidict import CIMultiDict

from proxy.model.request import AmbiguousField, RequestBody, UnreadableBody
from proxy.protocols import Message, Unrecognized, recognizer_for

GRAPHQL = recognizer_for("graphql")


def post_json(payload: Any, query: str = "") -> Message:
    data = json.dumps(payload).encode()
    return Message(
        "POST",
        "/graphql",
        "/graphql",
        query,
        CIMultiDict({"Content-Type": "application/json"}),
        RequestBody(data, "application/json"),
    )


def post(data: bytes, content_type: str) -> Message:
    return Message(
        "POST",
        "/graphql",
        "/graphql",
        "",
        CIMultiDict({"Content-Type": content_type}),
        RequestBody(data, content_type),
    )


def get(query: str) -> Message:
    return Message("GET", "/graphql", "/graphql", query, CIMultiDict(), None)


async def test_shorthand_query() -> None:
    assert await GRAPHQL.recognize(post_json({"query": "{ viewer { login } }"})) == (
        "query:viewer",
    )


async def test_field_name_not_alias() -> None:
    doc = "mutation { harmless: deleteUser(id: 1) { id } other: createUser { id } }"
    assert await GRAPHQL.recognize(post_json({"query": doc})) == (
        "mutation:deleteUser",
        "mutation:createUser",
    )


async def test_every_operation_is_named_whatever_operation_name_says() -> None:
    doc = """
        query Safe { me { id } }
        mutation Danger { dropDatabase }
        subscription Watch { events { id } }
    """
    payload = {"query": doc, "operationName": "Safe", "variables": {}}
    assert await GRAPHQL.recognize(post_json(payload)) == (
        "query:me",
        "mutation:dropDatabase",
        "subscription:events",
    )


async def test_fragments_at_the_root_are_resolved() -> None:
    doc = """
        mutation M { a ...Outer ... on Mutation { c ... { d } } }
        fragment Outer on Mutation { b ...Inner }
        fragment Inner on Mutation { deleteRepo(id: 1) }
    """
    assert await GRAPHQL.recognize(post_json({"query": doc})) == (
        "mutation:a",
        "mutation:b",
        "mutation:deleteRepo",
        "mutation:c",
        "mutation:d",
    )


async def test_fragment_cycle_terminates() -> None:
    doc = """
        query { ...A }
        fragment A on Query { a ...B }
        fragment B on Query { b ...A }
    """
    assert await GRAPHQL.recognize(post_json({"query": doc})) == ("query:a", "query:b")


async def test_undefined_fragment_is_unrecognized() -> None:
    with pytest.raises(Unrecognized, match="fragment 'Missing' is not defined"):
        await GRAPHQL.recognize(post_json({"query": "mutation { ...Missing }"}))


async def test_typename_is_an_action() -> None:
    assert await GRAPHQL.recognize(post_json({"query": "{ __typename a: __typename }"})) == (
        "query:__typename",
    )


async def test_batch() -> None:
    batch = [
        {"query": "query { me { id } }"},
        {"query": "mutation { deleteUser(id: 2) }", "operationName": None},
    ]
    assert await GRAPHQL.recognize(post_json(batch)) == ("query:me", "mutation:deleteUser")


async def test_batch_entry_without_a_document() -> None:
    persisted = {"extensions": {"persistedQuery": {"version": 1, "sha256Hash": "ab"}}}
    with pytest.raises(Unrecognized, match=r"no \"query\" string \(entry 2 of the batch\)"):
        await GRAPHQL.recognize(post_json([{"query": "{ a }"}, persisted]))
    with pytest.raises(Unrecognized, match="the batch is empty"):
        await GRAPHQL.recognize(post_json([]))


async def test_get_query_parameter() -> None:
    query = urlencode({"query": '{ repository(name: "x") { id } }'})
    assert await GRAPHQL.recognize(get(query)) == ("query:repository",)


async def test_get_with_a_mutation_is_still_a_mutation() -> None:
    query = urlencode({"query": "mutation { deleteUser(id: 1) }"})
    assert await GRAPHQL.recognize(get(query)) == ("mutation:deleteUser",)


async def test_repeated_query_parameter_is_ambiguous() -> None:
    query = urlencode([("query", "{ a }"), ("query", "mutation { b }")])
    with pytest.raises(AmbiguousField, match="query parameter 'query'"):
        await GRAPHQL.recognize(get(query))


async def test_post_with_a_url_document_names_both() -> None:
    # Some servers prefer ?query= to the body's: both documents are named.
    msg = post_json({"query": "{ a }"}, query=urlencode({"query": "mutation { wipe }"}))
    assert await GRAPHQL.recognize(msg) == ("mutation:wipe", "query:a")


async def test_application_graphql_body() -> None:
    msg = post(b'mutation { createIssue(title: "x") { id } }', "application/graphql")
    assert await GRAPHQL.recognize(msg) == ("mutation:createIssue",)


async def test_form_body() -> None:
    body = urlencode({"query": "mutation { x }"}).encode()
    assert await GRAPHQL.recognize(post(body, "application/x-www-form-urlencoded")) == (
        "mutation:x",
    )


async def test_parse_errors() -> None:
    with pytest.raises(Unrecognized, match="the GraphQL document cannot be parsed: Syntax Error"):
        await GRAPHQL.recognize(post_json({"query": "mutation { deleteUser("}))
    with pytest.raises(Unrecognized, match="cannot be parsed: it has no operation"):
        await GRAPHQL.recognize(post_json({"query": "fragment F on Query { a }"}))
    with pytest.raises(Unrecognized, match="cannot be parsed: the request carries none"):
        await GRAPHQL.recognize(get(""))
    with pytest.raises(Unrecognized, match="cannot be parsed"):
        await GRAPHQL.recognize(post_json({"query": 42}))


async def test_body_that_is_not_json() -> None:
    with pytest.raises(UnreadableBody):
        await GRAPHQL.recognize(post(b"{ a }", "application/json"))


async def test_duplicate_json_key_is_ambiguous() -> None:
    body = b'{"query": "{ a }", "query": "mutation { b }"}'
    with pytest.raises(AmbiguousField, match="JSON key 'query'"):
        await GRAPHQL.recognize(post(body, "application/json"))


async def test_large_document_is_parsed_off_the_loop() -> None:
    fields = " ".join(f"f{i}: me {{ id }}" for i in range(5000))
    doc = f"query {{ {fields} }} mutation {{ drop }}"
    assert len(doc) > 64 * 1024
    assert await GRAPHQL.recognize(post_json({"query": doc})) == ("query:me", "mutation:drop")


async def test_deep_nesting_is_unrecognized_not_a_crash() -> None:
    doc = "{ a " + "{ a " * 5000 + "}" * 5001
    with pytest.raises(Unrecognized, match="cannot be parsed"):
        await GRAPHQL.recognize(post_json({"query": doc}))


def test_needs_body() -> None:
    assert GRAPHQL.needs_body("POST")
    assert not GRAPHQL.needs_body("GET")
