"""AWS: name a SigV4-signed request as IAM does, `prefix:Operation`, from botocore's models.

The service is the signing name in the caller's verified SigV4 credential scope
(`Message.service`: "iam", "dynamodb", "s3", …). Every botocore model that signs with that name
is consulted (`dynamodb` is DynamoDB and DynamoDB Streams, `s3` is S3 and S3 Control, `rds` is
RDS, Neptune and DocumentDB), and the operation is read the way that service's protocol reads it:

- query / ec2 (IAM, STS, EC2, SNS, RDS, …, and JSON services marked `awsQueryCompatible` such as
  SQS): the `Action` parameter, from the query string or a form body. Both, or repeated:
  `AmbiguousField` (the upstream might take either).
- json (DynamoDB, KMS, SQS, …): the `X-Amz-Target` header, `<targetPrefix>.<Operation>`; the
  prefix must be the model's and the operation must exist. Repeated: `AmbiguousField`.
- smithy-rpc-v2-cbor (CloudWatch, …): the path `/service/<targetPrefix>/operation/<Operation>`.
- rest-json / rest-xml (S3, Lambda, API Gateway, Route 53, …): method, path, query and required
  headers against each operation's `http.method` and `http.requestUri`. `{Label}` is one
  non-empty path segment, `{Label+}` the greedy rest (it may contain '/' and empty segments).
  An operation matches when its literal query keys (`?acl`, `?uploads`, `?list-type=2`), its
  required query members (`uploadId`) and its required headers (`x-amz-copy-source`) are there,
  and every query key is one it takes (an unknown key may be a subresource this botocore does
  not know, so it matches nothing). The most specific match wins: most literal path characters,
  then most required query keys, then most required headers; then an operation that is not
  deprecated, then one the model does not route to a special endpoint (S3 Express control,
  Object Lambda). Operations still tied are all named: the policy judges each. S3 is
  path-style: the bucket is the first path segment.

When several of these apply (a JSON service that is also `awsQueryCompatible`, a signing name
shared by JSON and REST models) and they name different operations, the request is refused:
which one runs depends on how the upstream reads it. Client-chosen labels that do not select
the operation (S3's `x-id`) are ignored.

IAM action prefix = the signing name, except where IAM spells it differently (IAM_PREFIXES):

    monitoring → cloudwatch      email → ses             iotdata → iot
    IoTSecuredTunneling → iot    tagging → tag           cloudcontrolapi → cloudformation
    mturk-requester → mechanicalturk
    (execute-api, states, es, rds, lambda, s3, … are the same in both)

S3 also gets the IAM permission name where it differs from the API operation's (S3_PERMISSIONS),
so rules may use either; `GET /b?list-type=2` is ("s3:ListObjectsV2", "s3:ListBucket"):

    HeadObject, SelectObjectContent         → s3:GetObject
    HeadBucket, ListObjects, ListObjectsV2  → s3:ListBucket
    ListObjectVersions                      → s3:ListBucketVersions
    ListBuckets                             → s3:ListAllMyBuckets
    ListMultipartUploads                    → s3:ListBucketMultipartUploads
    ListParts                               → s3:ListMultipartUploadParts
    DeleteObjects                           → s3:DeleteObject (+ s3:DeleteObjectVersion when
                                              the body names a VersionId)
    PutObject-family: CopyObject, UploadPartCopy → s3:PutObject + s3:GetObject (the source);
                      UploadPart, CreateMultipartUpload, CompleteMultipartUpload → s3:PutObject
    Get/PutBucketLifecycleConfiguration, DeleteBucketLifecycle → s3:Get/PutLifecycleConfiguration
    Get/PutBucketNotificationConfiguration  → s3:Get/PutBucketNotification
    Get/Put/DeleteBucketReplication         → s3:Get/PutReplicationConfiguration
    Get/Put/DeleteBucketEncryption          → s3:Get/PutEncryptionConfiguration
    Get/Put/DeleteBucketCors                → s3:Get/PutBucketCORS
    Get/Put/DeletePublicAccessBlock         → s3:Get/PutBucketPublicAccessBlock
    Get/PutObjectLockConfiguration          → s3:Get/PutBucketObjectLockConfiguration
    DeleteBucketTagging                     → s3:PutBucketTagging
    S3 Control Get/Put/DeletePublicAccessBlock → s3:Get/PutAccountPublicAccessBlock
    with ?versionId=: GetObject, HeadObject → s3:GetObjectVersion; DeleteObject →
      s3:DeleteObjectVersion; Get/PutObjectAcl → s3:Get/PutObjectVersionAcl;
      Get/Put/DeleteObjectTagging → s3:Get/Put/DeleteObjectVersionTagging
    (GetObject, PutObject, DeleteObject, GetObjectAcl, AbortMultipartUpload, … are the same)

Models are read from disk in a worker thread, once per process: first an index of signing names
(only each model's "metadata" object is read, not the whole file), then, per signing name, the
models that sign with it, compiled into small match tables.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os.path
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import parse_qsl, quote, unquote

from botocore.loaders import Loader  # type: ignore[import-untyped]
from botocore.model import ServiceModel  # type: ignore[import-untyped]

from proxy.model.request import AmbiguousField, UnreadableBody
from proxy.protocols import Message, Unrecognized

__all__ = [
    "IAM_PREFIXES",
    "RECOGNIZER",
    "S3_PERMISSIONS",
    "S3_VERSION_PERMISSIONS",
    "AwsRecognizer",
    "preload",
]

# Signing name → IAM action prefix, where they differ. The signing name is what the SigV4
# credential scope carries (botocore's metadata signingName, else endpointPrefix); IAM policies
# use the service prefix of the Service Authorization Reference. Most are equal (s3, iam,
# dynamodb, lambda, states, es, execute-api, rds for Neptune and DocumentDB too).
IAM_PREFIXES: Mapping[str, str] = {
    "monitoring": "cloudwatch",
    "email": "ses",
    "iotdata": "iot",
    "IoTSecuredTunneling": "iot",
    "tagging": "tag",
    "cloudcontrolapi": "cloudformation",
    "mturk-requester": "mechanicalturk",
}

# (botocore model, operation) → IAM permission names that differ from the operation's own.
S3_PERMISSIONS: Mapping[tuple[str, str], tuple[str, ...]] = {
    ("s3", "HeadObject"): ("GetObject",),
    ("s3", "SelectObjectContent"): ("GetObject",),
    ("s3", "HeadBucket"): ("ListBucket",),
    ("s3", "ListObjects"): ("ListBucket",),
    ("s3", "ListObjectsV2"): ("ListBucket",),
    ("s3", "ListObjectVersions"): ("ListBucketVersions",),
    ("s3", "ListBuckets"): ("ListAllMyBuckets",),
    ("s3", "ListMultipartUploads"): ("ListBucketMultipartUploads",),
    ("s3", "ListParts"): ("ListMultipartUploadParts",),
    ("s3", "DeleteObjects"): ("DeleteObject",),
    ("s3", "CopyObject"): ("PutObject", "GetObject"),
    ("s3", "UploadPartCopy"): ("PutObject", "GetObject"),
    ("s3", "UploadPart"): ("PutObject",),
    ("s3", "CreateMultipartUpload"): ("PutObject",),
    ("s3", "CompleteMultipartUpload"): ("PutObject",),
    ("s3", "GetBucketLifecycleConfiguration"): ("GetLifecycleConfiguration",),
    ("s3", "GetBucketLifecycle"): ("GetLifecycleConfiguration",),
    ("s3", "PutBucketLifecycleConfiguration"): ("PutLifecycleConfiguration",),
    ("s3", "PutBucketLifecycle"): ("PutLifecycleConfiguration",),
    ("s3", "DeleteBucketLifecycle"): ("PutLifecycleConfiguration",),
    ("s3", "GetBucketNotificationConfiguration"): ("GetBucketNotification",),
    ("s3", "PutBucketNotificationConfiguration"): ("PutBucketNotification",),
    ("s3", "GetBucketReplication"): ("GetReplicationConfiguration",),
    ("s3", "PutBucketReplication"): ("PutReplicationConfiguration",),
    ("s3", "DeleteBucketReplication"): ("PutReplicationConfiguration",),
    ("s3", "GetBucketEncryption"): ("GetEncryptionConfiguration",),
    ("s3", "PutBucketEncryption"): ("PutEncryptionConfiguration",),
    ("s3", "DeleteBucketEncryption"): ("PutEncryptionConfiguration",),
    ("s3", "GetBucketCors"): ("GetBucketCORS",),
    ("s3", "PutBucketCors"): ("PutBucketCORS",),
    ("s3", "DeleteBucketCors"): ("PutBucketCORS",),
    ("s3", "GetPublicAccessBlock"): ("GetBucketPublicAccessBlock",),
    ("s3", "PutPublicAccessBlock"): ("PutBucketPublicAccessBlock",),
    ("s3", "DeletePublicAccessBlock"): ("PutBucketPublicAccessBlock",),
    ("s3", "GetObjectLockConfiguration"): ("GetBucketObjectLockConfiguration",),
    ("s3", "PutObjectLockConfiguration"): ("PutBucketObjectLockConfiguration",),
    ("s3", "DeleteBucketTagging"): ("PutBucketTagging",),
    ("s3control", "GetPublicAccessBlock"): ("GetAccountPublicAccessBlock",),
    ("s3control", "PutPublicAccessBlock"): ("PutAccountPublicAccessBlock",),
    ("s3control", "DeletePublicAccessBlock"): ("PutAccountPublicAccessBlock",),
}

# S3 operations that IAM authorizes as another permission when they address one version of an
# object (`?versionId=`): deleting a version is permanent, deleting an object is not.
S3_VERSION_PERMISSIONS: Mapping[str, str] = {
    "GetObject": "GetObjectVersion",
    "HeadObject": "GetObjectVersion",
    "DeleteObject": "DeleteObjectVersion",
    "GetObjectAcl": "GetObjectVersionAcl",
    "PutObjectAcl": "PutObjectVersionAcl",
    "GetObjectTagging": "GetObjectVersionTagging",
    "PutObjectTagging": "PutObjectVersionTagging",
    "DeleteObjectTagging": "DeleteObjectVersionTagging",
}

# A VersionId element in a DeleteObjects body (any namespace prefix). A byte search, not an XML
# parse: a false hit only adds a stricter action.
_VERSION_ID_ELEMENT = re.compile(rb"<(?:[\w.-]+:)?VersionId[\s/>]")

# Query keys that never select an operation: S3's `x-id` (a label the SDK adds, not read by the
# service) and SigV4 query signing / hoisted `X-Amz-*` headers (compared case-insensitively).
_IGNORED_QUERY_KEYS = frozenset({"x-id"})
_IGNORED_QUERY_PREFIX = "x-amz-"

# Tie-break: the model sends these operations to a special endpoint (S3 Express control for
# ListDirectoryBuckets, Object Lambda); the same request shape to a path-style endpoint is more
# likely the other operation.
_ELSEWHERE_CONTEXT_PARAMS = frozenset({"UseS3ExpressControlEndpoint", "UseObjectLambdaEndpoint"})

# Path characters left unencoded when comparing paths (RFC 3986 pchar minus '%').
_PCHAR_SAFE = "!$&'()*+,;=:@-._~"

_QUERY_PROTOCOLS = frozenset({"query", "ec2"})
_REST_PROTOCOLS = frozenset({"rest-json", "rest-xml"})
_NOT_FORM_MEDIA = ("application/json", "application/cbor")


@dataclass(frozen=True, slots=True)
class _Route:
    """One REST operation's request shape, compiled."""

    model: str
    operation: str
    pattern: re.Pattern[str]
    literal_chars: int
    literal_query: tuple[tuple[str, str], ...]  # key, required value ("" = any)
    required_query: tuple[str, ...]
    known_query: frozenset[str] | None  # None: takes any key (a query-string map member)
    required_headers: tuple[str, ...]
    rank: tuple[int, int]  # (not deprecated, not sent elsewhere): tie-breaks


@dataclass(frozen=True, slots=True)
class _Service:
    """Every botocore model signing with one name, as match tables."""

    signing_name: str
    prefix: str
    title: str  # serviceId, for messages ("S3", "IAM", "DynamoDB")
    query_ops: Mapping[str, str]  # Action → model
    json_targets: Mapping[str, tuple[str, frozenset[str]]]  # targetPrefix → (model, operations)
    cbor_targets: Mapping[str, tuple[str, frozenset[str]]]
    routes: Mapping[str, tuple[_Route, ...]]  # HTTP method → routes
    # Whether its SDKs read errors as JSON (json, rest-json, cbor) rather than XML.
    json_errors: bool = False


class AwsRecognizer:
    """Names AWS API requests as IAM actions."""

    name = "aws"

    def needs_body(self, method: str) -> bool:
        # Only the query protocol reads the body (a form `Action`) and DeleteObjects looks for
        # version ids, but the service is not known here, so every method with a body needs it.
        return method.upper() in {"POST", "PUT", "PATCH", "DELETE"}

    async def recognize(self, message: Message) -> tuple[str, ...]:
        if not message.service:
            raise Unrecognized("an AWS route needs a SigV4-signed request")
        service = await _service(message.service)
        return _actions(service, _operations(service, message), message)


async def preload(signing_name: str) -> None:
    """Load the models of one signing name now (e.g. at startup) rather than on the first
    request that needs them. Raises `Unrecognized` when no botocore model signs with it."""
    await _service(signing_name)


async def _service(signing_name: str) -> _Service:
    service = _SERVICES.get(signing_name)
    if service is not None:
        return service
    # Once the index exists an unknown name is refused without a thread hop.
    if _CATALOG is None or signing_name in _CATALOG:
        service = await asyncio.to_thread(_load_service, signing_name)
    if service is None:
        raise _unknown_service(signing_name)
    return service


def _unknown_service(signing_name: str) -> Unrecognized:
    return Unrecognized(
        f"no AWS service model signs as {signing_name!r}, so the request's action cannot be named"
    )


# ---------------------------------------------------------------------------------------------
# Naming


def _operations(service: _Service, message: Message) -> list[tuple[str, str]]:
    """(model, operation) pairs the request names; several only for a tie of REST routes."""
    signals: list[tuple[str, str, str]] = []  # (model, operation, what named it)
    if service.json_targets:
        target = _single_header(message, "X-Amz-Target")
        if target is not None:
            prefix, _, operation = target.rpartition(".")
            model, operations = service.json_targets.get(prefix, ("", frozenset()))
            if operation not in operations:
                raise Unrecognized(
                    f"the X-Amz-Target {target!r} names no {service.title} operation"
                )
            signals.append((model, operation, f"X-Amz-Target {target!r}"))
    if service.cbor_targets:
        named = _cbor_operation(service, message.raw_path)
        if named is not None:
            signals.append((*named, f"the path {message.path!r}"))
    if service.query_ops:
        action = _query_action(message)
        if action is not None:
            query_model = service.query_ops.get(action)
            if query_model is None:
                raise Unrecognized(f"{service.title} has no operation {action!r} (Action)")
            signals.append((query_model, action, f"Action={action!r}"))
    rest = _match_rest(service, message) if service.routes else []
    named_ops = {op for _, op, _ in signals} | {op for _, op in rest}
    if signals:
        if len(named_ops) > 1:
            # Which one runs depends on how the upstream reads the request.
            what = ", ".join(f"{why} names {op}" for _, op, why in signals)
            if rest:
                what += ", the method and path name " + " or ".join(op for _, op in rest)
            raise Unrecognized(
                f"cannot tell which {service.title} operation {message.method} "
                f"{_shown(message)} is: {what}"
            )
        return [(model, op) for model, op, _ in signals[:1]]
    if rest:
        return rest
    raise Unrecognized(_unnamed(service, message))


def _unnamed(service: _Service, message: Message) -> str:
    text = f"cannot tell which {service.title} operation {message.method} {_shown(message)} is"
    missing = []
    if service.json_targets:
        missing.append("no X-Amz-Target header")
    if service.query_ops:
        missing.append("no Action parameter")
    if service.cbor_targets:
        missing.append("no /service/…/operation/… path")
    return f"{text}: it has {' and '.join(missing)}" if missing else text


def _shown(message: Message) -> str:
    text = message.path + (f"?{message.query}" if message.query else "")
    return text if len(text) <= 200 else text[:200] + "…"


def _actions(
    service: _Service, operations: list[tuple[str, str]], message: Message
) -> tuple[str, ...]:
    names: dict[str, None] = {}
    for _, operation in operations:
        names[f"{service.prefix}:{operation}"] = None
    if service.signing_name == "s3":
        versioned = any(
            key == "versionId" for key, _ in parse_qsl(message.query, keep_blank_values=True)
        )
        for model, operation in operations:
            for permission in S3_PERMISSIONS.get((model, operation), ()):
                names[f"s3:{permission}"] = None
            if model != "s3":
                continue
            if versioned and operation in S3_VERSION_PERMISSIONS:
                names[f"s3:{S3_VERSION_PERMISSIONS[operation]}"] = None
            if (
                operation == "DeleteObjects"
                and message.body is not None
                and _VERSION_ID_ELEMENT.search(message.body.data)
            ):
                names["s3:DeleteObjectVersion"] = None
    return tuple(names)


def _single_header(message: Message, name: str) -> str | None:
    values = message.headers.getall(name, [])
    if len(values) > 1:
        raise AmbiguousField("header", name)
    return values[0] if values else None


def _query_action(message: Message) -> str | None:
    """The `Action` of a query-protocol request: from the query string or a form body."""
    in_query = [v for k, v in parse_qsl(message.query, keep_blank_values=True) if k == "Action"]
    in_body: list[str] = []
    body = message.body
    if body is not None and body.data:
        media_type = (body.content_type or "").partition(";")[0].strip().lower()
        # A form body is read whatever its Content-Type says (a lenient upstream parses it
        # anyway), except a JSON or CBOR body, which no query-protocol server reads as a form.
        if not (media_type.startswith("application/x-amz-json") or media_type in _NOT_FORM_MEDIA):
            try:
                text = body.data.decode("utf-8")
            except UnicodeDecodeError:
                raise UnreadableBody("the form body is not UTF-8 text") from None
            in_body = [v for k, v in parse_qsl(text, keep_blank_values=True) if k == "Action"]
    if in_query and in_body:
        raise AmbiguousField("query parameter and form field", "Action")
    values = in_query or in_body
    if len(values) > 1:
        raise AmbiguousField("query parameter" if in_query else "form field", "Action")
    return values[0] if values else None


def _cbor_operation(service: _Service, raw_path: str) -> tuple[str, str] | None:
    parts = [unquote(part) for part in raw_path.split("/")]
    if len(parts) != 5 or parts[0] or parts[1] != "service" or parts[3] != "operation":
        return None
    model, operations = service.cbor_targets.get(parts[2], ("", frozenset()))
    if parts[4] not in operations:
        raise Unrecognized(f"the path {raw_path!r} names no {service.title} operation")
    return model, parts[4]


def _canonical_path(path: str) -> str:
    """Percent-encode every segment one way, so template literals and the request's path compare
    whatever encoding the client chose; an encoded '/' stays inside its segment."""
    return "/".join(quote(unquote(segment), safe=_PCHAR_SAFE) for segment in path.split("/"))


def _match_rest(service: _Service, message: Message) -> list[tuple[str, str]]:
    routes = service.routes.get(message.method.upper())
    if not routes:
        return []
    path = _canonical_path(message.raw_path or "/")
    query: dict[str, list[str]] = {}
    for key, value in parse_qsl(message.query, keep_blank_values=True):
        query.setdefault(key, []).append(value)
    keys = [
        key
        for key in query
        if key not in _IGNORED_QUERY_KEYS and not key.lower().startswith(_IGNORED_QUERY_PREFIX)
    ]
    best: tuple[int, int, int] | None = None
    tied: list[_Route] = []
    for route in routes:
        if route.pattern.fullmatch(path) is None:
            continue
        if not _literal_query_matches(route, query):
            continue
        if any(name not in query for name in route.required_query):
            continue
        if route.known_query is not None and any(k not in route.known_query for k in keys):
            continue
        if any(not message.headers.getall(h, []) for h in route.required_headers):
            continue
        score = (
            route.literal_chars,
            len(route.literal_query) + len(route.required_query),
            len(route.required_headers),
        )
        if best is None or score > best:
            best, tied = score, [route]
        elif score == best:
            tied.append(route)
    # Within one model, a deprecated operation, or one sent to a special endpoint, gives way to
    # its replacement (PutBucketLifecycle → PutBucketLifecycleConfiguration). Across models it
    # does not: which model the upstream serves is not known here, so every one is named.
    top_rank: dict[str, tuple[int, int]] = {}
    for route in tied:
        top_rank[route.model] = max(route.rank, top_rank.get(route.model, route.rank))
    return sorted({(r.model, r.operation) for r in tied if r.rank == top_rank[r.model]})


def _literal_query_matches(route: _Route, query: Mapping[str, list[str]]) -> bool:
    for key, value in route.literal_query:
        got = query.get(key)
        if not got:
            return False
        if len(got) > 1:
            raise AmbiguousField("query parameter", key)
        if value and got[0] != value:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Loading botocore's models (worker threads only: this reads files)

_LOCK = threading.Lock()
_CATALOG: dict[str, tuple[str, ...]] | None = None  # signing name → botocore service names
_SERVICES: dict[str, _Service] = {}


def _load_service(signing_name: str) -> _Service | None:
    with _LOCK:  # one load per signing name, even when several requests ask at once
        service = _SERVICES.get(signing_name)
        if service is not None:
            return service
        names = _catalog().get(signing_name)
        if not names:
            return None
        service = _build_service(signing_name, names)
        _SERVICES[signing_name] = service
        return service


def _catalog() -> dict[str, tuple[str, ...]]:
    global _CATALOG
    if _CATALOG is None:
        loader = Loader(file_loader=_MetadataFileLoader())
        index: dict[str, list[str]] = {}
        for name in _available_services(loader):
            metadata = _load_model(loader, name).get("metadata", {})
            signing = metadata.get("signingName") or metadata.get("endpointPrefix")
            if isinstance(signing, str):
                index.setdefault(signing, []).append(name)
        _CATALOG = {signing: tuple(names) for signing, names in index.items()}
    return _CATALOG


def _available_services(loader: Any) -> list[str]:
    names: list[str] = loader.list_available_services("service-2")
    return names


def _load_model(loader: Any, name: str) -> dict[str, Any]:
    model: dict[str, Any] = loader.load_service_model(name, "service-2")
    return model


def _build_service(signing_name: str, names: Iterable[str]) -> _Service:
    # A fresh Loader: its cache would otherwise keep every raw model alive after compiling.
    loader = Loader()
    query_ops: dict[str, str] = {}
    json_targets: dict[str, tuple[str, frozenset[str]]] = {}
    cbor_targets: dict[str, tuple[str, frozenset[str]]] = {}
    routes: dict[str, list[_Route]] = {}
    titles: list[str] = []
    xml_errors = False
    for name in names:
        model = ServiceModel(_load_model(loader, name), service_name=name)
        metadata: dict[str, Any] = model.metadata
        protocols = set(metadata.get("protocols") or [metadata.get("protocol")])
        operations = frozenset(str(op) for op in model.operation_names)
        # Messages name the service by the model named like its signing name, if any.
        titles.insert(
            0 if name == signing_name else len(titles), str(metadata.get("serviceId") or name)
        )
        target = metadata.get("targetPrefix")
        xml_errors = xml_errors or bool(protocols & {"query", "ec2", "rest-xml"})
        if protocols & _QUERY_PROTOCOLS or "awsQueryCompatible" in metadata:
            for op in operations:
                query_ops.setdefault(op, name)
        if "json" in protocols and isinstance(target, str):
            json_targets[target] = (name, operations)
        if "smithy-rpc-v2-cbor" in protocols and isinstance(target, str):
            cbor_targets[target] = (name, operations)
        if protocols & _REST_PROTOCOLS:
            for op in sorted(operations):
                operation = model.operation_model(op)
                method = str(operation.http.get("method", "POST")).upper()
                routes.setdefault(method, []).append(_compile_route(name, operation))
    return _Service(
        signing_name=signing_name,
        prefix=IAM_PREFIXES.get(signing_name, signing_name),
        title=titles[0] if titles else signing_name,
        query_ops=query_ops,
        json_targets=json_targets,
        cbor_targets=cbor_targets,
        routes={method: tuple(items) for method, items in routes.items()},
        json_errors=bool(titles) and not xml_errors,
    )


def speaks_json(signing_name: str) -> bool:
    """Whether the SDKs of the service signing as `signing_name` read errors as JSON; False
    when its model is not loaded yet (then the request's own headers tell)."""
    service = _SERVICES.get(signing_name)
    return service is not None and service.json_errors


def _compile_route(model: str, operation: Any) -> _Route:
    uri = str(operation.http.get("requestUri", "/"))
    path, _, literal = uri.partition("?")
    regex: list[str] = []
    literal_chars = 0
    for part in re.split(r"(\{[^}]+\})", path):
        if part.startswith("{") and part.endswith("}"):
            # Greedy labels may hold '/' and empty segments; others are one non-empty segment.
            regex.append(".+" if part.endswith("+}") else "[^/]+")
        elif part:
            regex.append(re.escape(_canonical_path(part)))
            literal_chars += len(part)
    if not path.endswith(("/", "+}")):
        # "/bucket/" is "/bucket" to S3 and to most REST services.
        regex.append("/?")
    literal_query = tuple(
        (key, value)
        for key, value in parse_qsl(literal, keep_blank_values=True)
        if key not in _IGNORED_QUERY_KEYS
    )
    known: set[str] | None = {key for key, _ in literal_query}
    required_query: list[str] = []
    required_headers: list[str] = []
    shape = operation.input_shape
    if shape is not None:
        required = set(shape.required_members)
        for member, member_shape in shape.members.items():
            location = member_shape.serialization.get("location")
            wire_name = str(member_shape.serialization.get("name", member))
            if location == "querystring":
                if member_shape.type_name == "map":
                    known = None  # takes arbitrary keys
                elif known is not None:
                    known.add(wire_name)
                if member in required:
                    required_query.append(wire_name)
            elif location == "header" and member in required:
                required_headers.append(wire_name)
    elsewhere = any(
        param.name in _ELSEWHERE_CONTEXT_PARAMS and param.value is True
        for param in operation.static_context_parameters
    )
    return _Route(
        model=model,
        operation=str(operation.name),
        pattern=re.compile("".join(regex)),
        literal_chars=literal_chars,
        literal_query=literal_query,
        required_query=tuple(required_query),
        known_query=frozenset(known) if known is not None else None,
        required_headers=tuple(required_headers),
        rank=(0 if operation.deprecated else 1, 0 if elsewhere else 1),
    )


class _MetadataFileLoader:
    """A botocore file loader (what `Loader(file_loader=…)` takes) that reads only a model's
    leading "metadata" object, for indexing signing names without parsing ~450 whole models
    (about 3 s). Falls back to the whole file when the object is not where it is expected."""

    _HEAD_BYTES = 16 * 1024
    _OPENERS: tuple[tuple[str, Any], ...] = ((".json", open), (".json.gz", gzip.open))

    def exists(self, file_path: str) -> bool:
        return any(os.path.isfile(file_path + ext) for ext, _ in self._OPENERS)

    def load_file(self, file_path: str) -> dict[str, Any] | None:
        for ext, opener in self._OPENERS:
            if os.path.isfile(file_path + ext):
                with opener(file_path + ext, "rb") as handle:
                    return self._read(handle)
        return None

    def _read(self, handle: IO[bytes]) -> dict[str, Any]:
        raw = handle.read(self._HEAD_BYTES)
        head = raw.decode("utf-8", errors="replace")
        found = re.search(r'"metadata"\s*:\s*', head)
        operations_at = head.find('"operations"')
        if found is not None and (operations_at < 0 or found.start() < operations_at):
            try:
                metadata, _ = json.JSONDecoder().raw_decode(head, found.end())
            except ValueError:
                metadata = None
            if isinstance(metadata, dict) and "endpointPrefix" in metadata:
                return {"metadata": metadata}
        data: dict[str, Any] = json.loads(raw + handle.read())
        return data


RECOGNIZER = AwsRecognizer()
