"""A small GraphQL server for the tests: graphql-core executing a real schema over aiohttp.

It records the root fields it executed, so a test can assert what actually ran upstream.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from graphql import build_schema, graphql

SCHEMA = build_schema(
    """
    type User { id: ID!, name: String! }
    type Query { users: [User!]!, user(id: ID!): User }
    type Mutation { deleteUser(id: ID!): Boolean!, renameUser(id: ID!, name: String!): User }
    """
)


class GraphQLUpstream:
    def __init__(self) -> None:
        self.users = {"1": "ada", "2": "grace"}
        self.executed: list[str] = []  # root fields run, in order
        self.server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/graphql"))

    def root(self) -> dict[str, Any]:
        def users(info: Any) -> list[dict[str, str]]:
            self.executed.append("users")
            return [{"id": k, "name": v} for k, v in self.users.items()]

        def user(info: Any, id: str) -> dict[str, str] | None:
            self.executed.append("user")
            return {"id": id, "name": self.users[id]} if id in self.users else None

        def delete_user(info: Any, id: str) -> bool:
            self.executed.append("deleteUser")
            return self.users.pop(id, None) is not None

        def rename_user(info: Any, id: str, name: str) -> dict[str, str]:
            self.executed.append("renameUser")
            self.users[id] = name
            return {"id": id, "name": name}

        return {"users": users, "user": user, "deleteUser": delete_user, "renameUser": rename_user}

    async def handle(self, request: web.Request) -> web.Response:
        payload = await request.json()
        result = await graphql(
            SCHEMA,
            payload["query"],
            root_value=self.root(),
            variable_values=payload.get("variables"),
            operation_name=payload.get("operationName"),
        )
        body: dict[str, Any] = {"data": result.data}
        if result.errors:
            body["errors"] = [{"message": e.message} for e in result.errors]
        return web.json_response(body)


@contextlib.asynccontextmanager
async def graphql_upstream() -> AsyncIterator[GraphQLUpstream]:
    upstream = GraphQLUpstream()
    app = web.Application()
    app.router.add_post("/graphql", upstream.handle)
    upstream.server = TestServer(app)
    await upstream.server.start_server()
    try:
        yield upstream
    finally:
        await upstream.server.close()
