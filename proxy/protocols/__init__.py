"""Action recognizers: name what a request will make its upstream do (DESIGN.md §1 step 4, §6).

A route that declares `protocol: aws | graphql | mcp` has its requests named as *actions*
(`iam:CreateRole`, `mutation:deleteUser`, `tool:delete_repo`) that policy rules match with globs.
A request may carry several actions (a GraphQL document with several root fields, a JSON-RPC
batch); the policy judges each and the strictest outcome wins.

The one principle: an action comes from what the upstream will execute, never from a label the
client chose for it (a GraphQL `operationName`, a JSON-RPC `id`, an S3 `x-id`). When a
recognizer cannot tell what will run, it refuses (`Unrecognized`, `AmbiguousField`) rather than
guess: a guessed name could be judged more leniently than the action that runs.

Each recognizer is a small object with `needs_body(method)` (does naming this request need its
body read?) and `async recognize(message)`. Recognizers do no network I/O; the AWS one reads
botocore's service models from disk once per service, in a worker thread, and caches them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proxy.model.request import AmbiguousField, HeaderView, RequestBody, UnreadableBody

__all__ = [
    "AmbiguousField",
    "Message",
    "Recognizer",
    "UnreadableBody",
    "Unrecognized",
    "recognizer_for",
]

PROTOCOLS = ("aws", "graphql", "mcp")


@dataclass(frozen=True, slots=True)
class Message:
    """The request as the upstream will get it, for naming its actions."""

    method: str
    # The decoded path as the upstream gets it (route prefix already replaced).
    path: str
    # The same path, percent-encoded exactly as it is forwarded.
    raw_path: str
    # The raw query string as received, without "?".
    query: str
    # Case-insensitive headers (aiohttp's CIMultiDictProxy, multidict.CIMultiDict).
    headers: HeaderView
    # None when the method carries no body (or the body was not read).
    body: RequestBody | None
    # AWS: the signing service from the caller's verified SigV4 credential scope.
    service: str | None = None


class Unrecognized(ValueError):
    """The recognizer cannot name what the request would do (answered `400 invalid_request`)."""

    code = "invalid_request"

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class Recognizer(Protocol):
    """Names a request's actions for one protocol."""

    name: str

    def needs_body(self, method: str) -> bool:
        """Whether `recognize` must see the body of a request with this method."""
        ...

    async def recognize(self, message: Message) -> tuple[str, ...]:
        """The request's actions (at least one). Raises `Unrecognized`, `UnreadableBody` or
        `AmbiguousField` when they cannot be told."""
        ...


def recognizer_for(protocol: str) -> Recognizer:
    """The recognizer of `protocol` ("aws", "graphql" or "mcp").

    Modules are imported on first use so a deployment without AWS routes never imports
    botocore.
    """
    if protocol == "aws":
        from proxy.protocols.aws import RECOGNIZER as aws

        return aws
    if protocol == "graphql":
        from proxy.protocols.graphql import RECOGNIZER as graphql

        return graphql
    if protocol == "mcp":
        from proxy.protocols.mcp import RECOGNIZER as mcp

        return mcp
    raise ValueError(f"unknown protocol {protocol!r} (expected one of {', '.join(PROTOCOLS)})")
