"""GraphQL over HTTP: one action per root field of every operation in the document.

Actions are `query:FIELD`, `mutation:FIELD` and `subscription:FIELD`, for the field's *name*
(never its alias), for every root field of EVERY operation in the document. The client's
`operationName` is not used: a server that ignores it, or a document whose operations share a
name, would run another operation than the one named. Fragment spreads and inline fragments at
the root are resolved (recursively, each fragment once); `__typename` is named like any field
(`query:__typename`). The shorthand `{ a }` is a query. A GET carrying a mutation is still named
`mutation:…`: whether the server refuses it is the server's business, judging it is the policy's.

Where the document comes from (graphql-over-http and the common servers):
- GET: the `query` query parameter;
- POST `application/graphql`: the body is the document;
- POST `application/x-www-form-urlencoded`: the `query` field;
- POST otherwise (`application/json`): `{"query": …}`, or an array of those (a batch).
A POST may also carry `?query=`, which some servers prefer to the body's, so its fields are named
too. The document is parsed with graphql-core; large documents are parsed in a worker thread so
the event loop is not held up. Persisted queries (a hash, no document) cannot be named and are
refused.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qsl

from graphql import GraphQLError, parse
from graphql.language import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionNode,
    SelectionSetNode,
)

from proxy.model.request import AmbiguousField, RequestBody
from proxy.protocols import Message, Unrecognized

__all__ = ["RECOGNIZER", "GraphqlRecognizer", "document_actions"]

# Above this many characters a document is parsed in a worker thread: parsing is CPU work that
# grows with the document, and a body can be as large as server.max_body_bytes.
_THREAD_PARSE_CHARS = 64 * 1024


class GraphqlRecognizer:
    """Names GraphQL requests by their operations' root fields."""

    name = "graphql"

    def needs_body(self, method: str) -> bool:
        return method.upper() == "POST"

    async def recognize(self, message: Message) -> tuple[str, ...]:
        documents = _documents(message)
        if not documents:
            raise Unrecognized("the GraphQL document cannot be parsed: the request carries none")
        actions: dict[str, None] = {}
        for text in documents:
            if len(text) > _THREAD_PARSE_CHARS:
                names = await asyncio.to_thread(document_actions, text)
            else:
                names = document_actions(text)
            actions.update(dict.fromkeys(names))
        return tuple(actions)


def _documents(message: Message) -> list[str]:
    """Every document the server might execute for this request."""
    found: list[str] = []
    from_url = _query_parameter(message.query)
    if from_url is not None:
        found.append(from_url)
    if message.method.upper() != "POST" or message.body is None:
        return found
    body = message.body
    media_type = (body.content_type or "").partition(";")[0].strip().lower()
    if media_type == "application/graphql":
        try:
            found.append(body.data.decode("utf-8"))
        except UnicodeDecodeError:
            raise Unrecognized("the GraphQL document cannot be parsed: it is not UTF-8") from None
    elif body.is_form:
        value = body.form_value("query")
        if value is not None:
            found.append(value)
    elif body.data.strip():
        found.extend(_json_documents(body))
    return found


def _query_parameter(query: str) -> str | None:
    values = [value for key, value in parse_qsl(query, keep_blank_values=True) if key == "query"]
    if len(values) > 1:
        raise AmbiguousField("query parameter", "query")
    return values[0] if values else None


def _json_documents(body: RequestBody) -> list[str]:
    payload: Any = body.json()  # UnreadableBody / AmbiguousField propagate
    batch = payload if isinstance(payload, list) else [payload]
    if not batch:
        raise Unrecognized("the GraphQL document cannot be parsed: the batch is empty")
    documents: list[str] = []
    for index, entry in enumerate(batch):
        at = f" (entry {index + 1} of the batch)" if isinstance(payload, list) else ""
        if not isinstance(entry, dict):
            raise Unrecognized(f"the GraphQL request must be a JSON object{at}")
        query = entry.get("query")
        if not isinstance(query, str):
            raise Unrecognized(
                f'the GraphQL document cannot be parsed: no "query" string{at} '
                "(persisted queries are not supported)"
            )
        documents.append(query)
    return documents


def document_actions(text: str) -> tuple[str, ...]:
    """The actions of one GraphQL document: `OPERATION_TYPE:FIELD` per root field of every
    operation, in document order, without repeats. Raises `Unrecognized`."""
    try:
        document = parse(text, no_location=True)
    except GraphQLError as exc:
        raise Unrecognized(f"the GraphQL document cannot be parsed: {exc.message}") from None
    except RecursionError:
        raise Unrecognized("the GraphQL document cannot be parsed: it nests too deeply") from None
    return _actions(document)


def _actions(document: DocumentNode) -> tuple[str, ...]:
    fragments: dict[str, list[FragmentDefinitionNode]] = {}
    for definition in document.definitions:
        if isinstance(definition, FragmentDefinitionNode):
            # Two fragments with one name are invalid; name the fields of both rather than guess
            # which one a lenient server would use.
            fragments.setdefault(definition.name.value, []).append(definition)
    actions: dict[str, None] = {}
    operations = 0
    for definition in document.definitions:
        if not isinstance(definition, OperationDefinitionNode):
            continue
        operations += 1
        kind = definition.operation.value  # "query" | "mutation" | "subscription"
        for field in _root_fields(definition.selection_set, fragments):
            actions[f"{kind}:{field}"] = None
    if not operations:
        raise Unrecognized("the GraphQL document cannot be parsed: it has no operation")
    return tuple(actions)


def _root_fields(
    selection_set: SelectionSetNode, fragments: dict[str, list[FragmentDefinitionNode]]
) -> list[str]:
    """Field names selected at the root, through fragments. Iterative with a visited set, so
    neither a fragment cycle nor a long chain of fragments can exhaust the stack."""
    names: list[str] = []
    visited: set[str] = set()
    # A depth-first walk over selections (reversed onto the stack so they come off in document
    # order).
    stack: list[SelectionNode] = list(reversed(selection_set.selections))
    while stack:
        selection = stack.pop()
        if isinstance(selection, FieldNode):
            names.append(selection.name.value)
        elif isinstance(selection, InlineFragmentNode):
            stack.extend(reversed(selection.selection_set.selections))
        elif isinstance(selection, FragmentSpreadNode):
            name = selection.name.value
            if name in visited:
                continue
            visited.add(name)
            definitions = fragments.get(name)
            if not definitions:
                raise Unrecognized(
                    f"the GraphQL document cannot be parsed: fragment {name!r} is not defined"
                )
            for definition in reversed(definitions):
                stack.extend(reversed(definition.selection_set.selections))
    return names


RECOGNIZER = GraphqlRecognizer()
