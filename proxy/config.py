"""YAML configuration → frozen, typed `Settings`.

Every error names the file, the key and the line (`config.yaml:12: routes[0].prefix: ...`), because
an operator fixing a config at 3 a.m. should not have to guess. `${VAR}` in any string is replaced
by the environment variable VAR (`${VAR:-default}` gives a default); a missing variable is an
error that names it.
"""

from __future__ import annotations

import datetime
import difflib
import enum
import ipaddress
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from .model import Action
from .model.binding import DEFAULT_VOLATILE_HEADERS
from .model.grant import MAX_GRANT_SECONDS, MAX_GRANT_USES
from .paths import AmbiguousRequest, normalize_path

# --------------------------------------------------------------------------------------------
# Schema


class _Model(BaseModel):
    # strict: a YAML `quorum: "2"` is an error, not silently coerced; frozen: settings never change
    # after start, so every part can hold a reference without copying. No .inf or .nan: a timeout
    # or a size that is not a finite number is a typo.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


NonEmpty = Annotated[str, StringConstraints(min_length=1)]
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
FORBIDDEN_ALGORITHMS = re.compile(r"^(HS\d+|none)$", re.IGNORECASE)
ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


def _shown_url(value: str) -> str:
    """`value` quoted for an error message, any password in it replaced by ***."""
    return repr(re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", value))


def _split_url(value: str) -> SplitResult:
    """`value` split; a ValueError (in plain words) if it cannot be parsed or has a bad port."""
    if not value.strip():
        raise ValueError("must not be empty")
    if re.search(r"\s", value):
        raise ValueError(f"must not contain spaces, got {_shown_url(value)}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parses the port, raising ValueError if it is not one
    except ValueError:
        raise ValueError(
            f"{_shown_url(value)} is not a valid URL (is the port a number from 1 to 65535? "
            "is an IPv6 address in brackets?)"
        ) from None
    return parts


def _http_url(value: str) -> SplitResult:
    """`value` split, if it is an absolute http(s) URL with a host; else a ValueError."""
    parts = _split_url(value)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"must be an http:// or https:// URL, got {_shown_url(value)}")
    if not parts.hostname:
        raise ValueError(f"the URL has no host (e.g. https://host/), got {_shown_url(value)}")
    return parts


def _redis_url(value: str, *, store: bool) -> str:
    """`value` if it is a Redis URL redis-py can connect to; else a ValueError."""
    parts = _split_url(value)
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ValueError(
                f"the Redis URL has no host (e.g. redis://redis:6379/0), got {_shown_url(value)}"
            )
        if not re.fullmatch(r"/?|/\d+", parts.path):
            raise ValueError(
                "the database after the host must be a number "
                f"(e.g. redis://redis:6379/0), got {_shown_url(value)}"
            )
        return value
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(
                f"a unix:// URL needs the socket's path (e.g. unix:///run/redis.sock), "
                f"got {_shown_url(value)}"
            )
        return value
    raise ValueError(
        f"{'unknown store' if store else 'not a Redis URL:'} {_shown_url(value)}; use "
        f"{'memory:// or ' if store else ''}redis://[:password@]host:port/db "
        "(rediss:// for TLS, unix:///path/to/socket)"
    )


def check_listen(value: str) -> str:
    """`value` if it is a `host:port` to listen on (port 0: any free port); else a ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ValueError(f"expected host:port, e.g. 127.0.0.1:8080, got {value!r}")
    if not (port.isascii() and port.isdigit()):
        raise ValueError(
            f"the port after the last ':' must be a number, e.g. 127.0.0.1:8080, got {value!r}"
        )
    if int(port) > 65535:
        raise ValueError(
            f"port {int(port)} is out of range; use 1 to 65535 (or 0 for any free port)"
        )
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not bare.strip():
        raise ValueError(
            f"the host before ':{port}' is missing; e.g. 127.0.0.1:{port} (this machine only) "
            f"or 0.0.0.0:{port} (every interface)"
        )
    if ":" in host and bare == host:
        raise ValueError(f"an IPv6 address needs brackets, e.g. [{host}]:{port}")
    if re.search(r"[\s/\[\]@]", bare):
        raise ValueError(f"{host!r} is not a host name or IP address")
    return value


class ServerSettings(_Model):
    listen: NonEmpty = "127.0.0.1:8080"
    # When set, metrics, healthz and readyz are served on this host:port only (not on `listen`).
    admin_listen: str | None = None
    public_url: str | None = None
    max_body_bytes: Annotated[int, Field(gt=0)] = 10 * 1024 * 1024
    trusted_proxies: tuple[str, ...] = ()
    # The largest request head (request line and headers) accepted; larger: 431
    # header_too_large.
    max_header_bytes: Annotated[int, Field(ge=8192, le=1024 * 1024)] = 65536
    # A request head must be complete this long after its first byte (or after the connection
    # opened): slow heads (slowloris) are closed, and hold no file descriptor longer.
    header_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 10.0
    # A keep-alive connection with no request in progress is closed after this long.
    idle_timeout_seconds: Annotated[float, Field(gt=0, le=86400)] = 60.0
    # A request body being read must deliver a byte at least this often (slow uploads, and
    # slow-body attacks on what is read before authentication: control-plane and SigV4 bodies).
    body_timeout_seconds: Annotated[float, Field(gt=0, le=86400)] = 60.0
    # Client connections open at once, per process; more are refused (closed at once). Keep it
    # below the process's open-file limit (`ulimit -n`) less the upstream and store connections.
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    # Processes serving the same port (SO_REUSEPORT); more than one needs a shared store.
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    # uvloop (libuv) costs less CPU per request than asyncio's own loop; "asyncio" to compare.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    upstream_connect_timeout_seconds: Annotated[float, Field(gt=0)] = 5.0
    upstream_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    # On SIGTERM, how long requests already being forwarded may take to finish (held requests
    # are answered 503 shutting_down at once).
    drain_seconds: Annotated[float, Field(ge=0, le=3600)] = 20.0
    # Where `run` writes its process id (removed at exit), for `countersign reload`.
    pid_file: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return check_listen(v)

    @field_validator("admin_listen")
    @classmethod
    def _admin_listen(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        check_listen(v)
        if v == info.data.get("listen") and not v.endswith(":0"):
            raise ValueError("must differ from server.listen (metrics and health move there)")
        return v

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = _http_url(v)
        if parts.query or parts.fragment:
            raise ValueError("must not have a query (?...) or fragment (#...)")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not hold credentials (user:password@)")
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"not an IP address or CIDR network: {item!r}") from None
        return v

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """`admin_listen` as (host, port), or None when it is not set."""
        if self.admin_listen is None:
            return None
        host, _, port = self.admin_listen.rpartition(":")
        return host.strip("[]"), int(port)


class IssuerSettings(_Model):
    issuer: NonEmpty
    audiences: Annotated[tuple[NonEmpty, ...], Field(min_length=1)]
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    # Where to find the discovery document; defaults to {issuer}/.well-known/openid-configuration.
    discovery_url: str | None = None
    leeway_seconds: Annotated[int, Field(ge=0, le=300)] = 30
    # A token's email names a person (who may decide, who counts towards a quorum, who may not
    # approve their own agent's requests) only when the token says `email_verified: true`.
    require_email_verified: bool = True

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for alg in v:
            if FORBIDDEN_ALGORITHMS.match(alg):
                raise ValueError(f"algorithm {alg!r} is never accepted (HS* and none are refused)")
            if alg not in ALLOWED_ALGORITHMS:
                raise ValueError(
                    f"unknown algorithm {alg!r}; "
                    f"use some of {', '.join(sorted(ALLOWED_ALGORITHMS))}"
                )
        if not v:
            raise ValueError("at least one algorithm is required")
        return v

    @field_validator("discovery_url")
    @classmethod
    def _discovery_url(cls, v: str | None) -> str | None:
        if v is not None:
            _http_url(v)
        return v


class ClaimsSettings(_Model):
    groups: NonEmpty = "groups"
    email: NonEmpty = "email"
    owner: NonEmpty = "act.sub"


class ApiKeySettings(_Model):
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    subject: NonEmpty
    groups: tuple[str, ...] = ()
    email: str | None = None
    owner: str | None = None


_AWS_ACCESS_KEY_ID = re.compile(r"[A-Z0-9]{16,128}")


class AwsKeySettings(_Model):
    """An AWS-style access key Countersign issued to an agent (`countersign keys new --aws`).

    SigV4 is an HMAC, so the secret itself must be known to check a signature: keep it out of
    the file with `${VAR}`.
    """

    access_key_id: NonEmpty
    secret: Annotated[str, StringConstraints(min_length=16)]
    subject: NonEmpty
    groups: tuple[str, ...] = ()
    email: str | None = None
    owner: str | None = None

    @field_validator("access_key_id")
    @classmethod
    def _access_key_id(cls, v: str) -> str:
        if not _AWS_ACCESS_KEY_ID.fullmatch(v):
            raise ValueError(
                "an access key id is 16 or more upper-case letters and digits "
                f"(e.g. AKIACS...), got {v!r}"
            )
        return v


class WebLoginSettings(_Model):
    """`identity.web_login`: how approvers log in to the web inbox (`/_countersign/ui/`), by
    OpenID Connect authorization code + PKCE (S256) at `issuer`. Without `client_secret` the
    client is public (PKCE alone). The ID token's issuer entry in `identity.issuers`, when there
    is one, gives its algorithms and `require_email_verified` (else RS256/ES256, and true)."""

    issuer: NonEmpty
    client_id: NonEmpty
    client_secret: str | None = None
    scopes: tuple[NonEmpty, ...] = ("openid", "email", "profile")
    # Signs the inbox's session cookies (HMAC-SHA256): the same on every worker and replica, so
    # any of them accepts a session; changing it logs everyone out. Keep it in `${VAR}`.
    session_secret: Annotated[str, StringConstraints(min_length=32)]
    # A session ends this long after login at the latest, and at most `session_grace_seconds`
    # after the ID token it was made from expires: then the person logs in again.
    session_seconds: Annotated[int, Field(ge=60, le=7 * 86400)] = 8 * 3600
    session_grace_seconds: Annotated[int, Field(ge=0, le=86400)] = 3600
    discovery_url: str | None = None  # default: {issuer}/.well-known/openid-configuration

    @field_validator("issuer", "discovery_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None:
            _http_url(v)
        return v

    @field_validator("scopes")
    @classmethod
    def _openid(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if "openid" not in v:
            raise ValueError("must include openid (the login needs an ID token)")
        return v


class IdentitySettings(_Model):
    issuers: tuple[IssuerSettings, ...] = ()
    web_login: WebLoginSettings | None = None
    claims: ClaimsSettings = ClaimsSettings()
    api_keys: tuple[ApiKeySettings, ...] = ()
    aws_keys: tuple[AwsKeySettings, ...] = ()
    # How long a verified token's identity is reused without re-checking the signature (it is
    # never reused past the token's own `exp`).
    token_cache_size: Annotated[int, Field(ge=0)] = 10_000
    # Zero would let a flood of tokens with invented key ids refetch the JWKS on every request.
    jwks_refresh_cooldown_seconds: Annotated[float, Field(gt=0)] = 30.0


class SentinelSettings(_Model):
    """`store.sentinel` (with `store.mode: sentinel`): where the sentinels are, and the name
    they know the master by."""

    master: NonEmpty
    nodes: Annotated[tuple[NonEmpty, ...], Field(min_length=1)]
    password: str | None = None  # the sentinels' own (the master's is in store.url)

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for node in v:
            host, sep, port = node.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{node!r} is not host:port (e.g. 10.0.0.5:26379)")
        return v

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """`nodes` as (host, port) pairs ([::1] loses its brackets)."""
        pairs = []
        for node in self.nodes:
            host, _, port = node.rpartition(":")
            pairs.append((host.strip("[]"), int(port)))
        return pairs


class StoreSettings(_Model):
    url: NonEmpty = "memory://"
    # standalone: one Redis at `url`; cluster: `url` is any node of a Redis Cluster; sentinel:
    # the master is the one `sentinel` names (`url` gives its password, database and TLS).
    mode: Literal["standalone", "cluster", "sentinel"] = "standalone"
    sentinel: SentinelSettings | None = None
    key_prefix: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]+$")] = "countersign"
    # How long decided, expired and executed approvals stay readable (API, CLI, audit lookups).
    retention_seconds: Annotated[int, Field(gt=0)] = 7 * 24 * 3600
    timeout_seconds: Annotated[float, Field(gt=0)] = 2.0  # per Redis command
    max_connections: Annotated[int, Field(ge=1, le=10_000)] = 64  # per process

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return v if v == "memory://" else _redis_url(v, store=True)

    @model_validator(mode="after")
    def _mode(self) -> StoreSettings:
        if self.mode != "standalone" and not self.url.startswith(("redis://", "rediss://")):
            raise _RefError(
                ("url",),
                f"mode: {self.mode} needs a redis:// (or rediss://) URL"
                + (
                    ", any node of the cluster (e.g. redis://redis-1:6379)"
                    if self.mode == "cluster"
                    else " for the master's password and database (e.g. redis://:PASSWORD@"
                    "mymaster/0; its host is not used: Sentinel names the master)"
                ),
            )
        if self.mode == "sentinel" and self.sentinel is None:
            raise _RefError(
                ("sentinel",),
                'mode: sentinel needs sentinel: {master: NAME, nodes: ["host:port", ...]}',
            )
        if self.mode != "sentinel" and self.sentinel is not None:
            raise _RefError(("sentinel",), "only makes sense with mode: sentinel")
        if self.mode == "cluster" and not re.fullmatch(r"/?|/0", _split_url(self.url).path):
            raise _RefError(("url",), "a Redis Cluster has only database 0")
        return self

    @property
    def shared(self) -> bool:
        """Whether several processes can share this store (needed for server.workers > 1)."""
        return self.url != "memory://"


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
_HEADER_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # a tab is allowed in a value
_AUTH_SCHEMES = frozenset({"basic", "bearer", "bot", "digest", "negotiate", "token"})
_ENCODED = {"encoded_slash": "%2F", "encoded_backslash": "%5C", "encoded_dot": "%2E"}


def _upstream_path_problem(path: str, exc: AmbiguousRequest) -> str:
    """Why the path of an upstream URL cannot be forwarded, from `normalize_path`'s refusal."""
    code = _ENCODED.get(exc.reason)
    if code is not None:
        return (
            f"the path {path!r} contains {code} (an encoded {chr(int(code[1:], 16))!r}), which "
            "the proxy cannot forward: it decodes every path and sends it re-encoded; "
            f"write the path without {code}"
        )
    if exc.reason == "dot_segment":
        return f"the path {path!r} has a '.' or '..' segment; write the resolved path"
    return f"the path {path!r} cannot be forwarded: {exc.message}"


CREDENTIAL_SOURCES = ("bearer", "token", "basic", "aws_sigv4")
PROTOCOLS = ("aws", "graphql", "mcp")


def check_credential_source(value: str) -> str:
    """`value` if it names where a caller's credential is read (DESIGN §1); else a ValueError."""
    if value in CREDENTIAL_SOURCES:
        return value
    kind, sep, name = value.partition(":")
    if kind == "header" and sep:
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid header name (letters, digits and -)")
        if name.lower() in ("authorization", "host", "cookie") or name.lower().startswith(
            "countersign-"
        ):
            raise ValueError(
                f"header:{name} cannot carry a credential here; use bearer, token or basic "
                "for Authorization"
            )
        return f"header:{name}"
    raise ValueError(
        f"unknown credential source {value!r}; use bearer, token, basic, header:NAME "
        "(e.g. header:X-Api-Key) or aws_sigv4"
    )


class AwsStaticCredentials(_Model):
    access_key_id: NonEmpty
    secret_access_key: NonEmpty
    session_token: str | None = None


class AwsProfileCredentials(_Model):
    profile: NonEmpty


class AwsRouteSettings(_Model):
    """How Countersign signs what it forwards to AWS: the route's real credentials."""

    region: NonEmpty
    # `default`: the standard AWS chain (environment, shared config and profile, container and
    # instance roles); or `{profile: NAME}`; or static keys (use ${VAR}).
    credentials: Literal["default"] | AwsProfileCredentials | AwsStaticCredentials = "default"
    # The service to sign for; default: the one the agent's own signature names.
    service: str | None = None


class RouteSettings(_Model):
    name: NonEmpty
    prefix: NonEmpty
    upstream: NonEmpty
    inject_headers: Mapping[str, str] = Field(default_factory=dict)
    # Where the caller's credential is read, in order (the first one present is used).
    caller_credentials: Annotated[tuple[str, ...], Field(min_length=1)] = ("bearer",)
    # Names the request's actions (DESIGN §6): aws, graphql or mcp.
    protocol: Literal["aws", "graphql", "mcp"] | None = None
    aws: AwsRouteSettings | None = None
    # false: the path is judged and forwarded with its empty segments ("a//b"), byte-exact.
    merge_slashes: bool = True
    # true: rules match the case-folded path (for upstreams that ignore case).
    case_insensitive_paths: bool = False
    # protocol: mcp only: tools/list answers leave out the tools the policy denies this caller
    # whatever the arguments (calls are judged anyway; this keeps them out of the model's view).
    hide_denied_tools: bool = False
    # Keep the prefix when forwarding (/cloud/x → upstream/cloud/x) instead of replacing it with
    # the upstream's path (/cloud/x → upstream/x, the default).
    strip_prefix: bool = True
    timeout_seconds: Annotated[float, Field(gt=0)] | None = None
    # Client headers forwarded upstream but not bound into an approval's fingerprint: they change
    # on every retry of the same call (trace ids, SDK retry counters) and carry no action.
    volatile_headers: tuple[str, ...] = DEFAULT_VOLATILE_HEADERS

    @field_validator("volatile_headers")
    @classmethod
    def _volatile(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(name.strip().lower() for name in v)

    @field_validator("caller_credentials")
    @classmethod
    def _caller_credentials(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        sources = tuple(check_credential_source(item.strip()) for item in v)
        seen = [s.lower() for s in sources]
        dup = sorted({s for s in seen if seen.count(s) > 1})
        if dup:
            raise ValueError(f"lists {', '.join(dup)} more than once")
        if "aws_sigv4" in sources and len(sources) > 1:
            raise ValueError("aws_sigv4 cannot be combined with other sources on one route")
        return sources

    @model_validator(mode="after")
    def _aws(self) -> RouteSettings:
        sigv4 = "aws_sigv4" in self.caller_credentials
        if sigv4 and self.protocol != "aws":
            raise _RefError(
                ("caller_credentials",),
                "aws_sigv4 needs protocol: aws on the same route (it names the actions)",
            )
        if sigv4 and self.aws is None:
            raise _RefError(
                ("aws",),
                "a route with caller_credentials [aws_sigv4] needs aws: {region: ..., "
                "credentials: default} to re-sign what it forwards",
            )
        if self.hide_denied_tools and self.protocol != "mcp":
            raise _RefError(("hide_denied_tools",), "only makes sense with protocol: mcp")
        if self.aws is not None and not sigv4:
            raise _RefError(("aws",), "only makes sense with caller_credentials: [aws_sigv4]")
        return self

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"must start with '/', got {v!r}")
        from .routing import check_prefix  # late: routing imports these settings

        check_prefix(v)
        return v

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str) -> str:
        parts = _http_url(v)
        if parts.query or parts.fragment:
            raise ValueError("must not have a query (?...) or fragment (#...)")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "must not hold credentials (user:password@); send them with inject_headers, "
                "e.g. Authorization: Basic ..."
            )
        # The forwarder decodes the upstream's path once and re-encodes it canonically for every
        # request (proxy.routing.upstream_path): a path it would refuse from a client cannot be
        # an upstream either.
        path = parts.path or "/"
        try:
            normalize_path(path)
        except AmbiguousRequest as exc:
            raise ValueError(_upstream_path_problem(path, exc)) from None
        return v

    @field_validator("inject_headers")
    @classmethod
    def _inject_headers(cls, v: Mapping[str, str]) -> Mapping[str, str]:
        for name, value in v.items():
            if not _HEADER_NAME.fullmatch(name):
                raise _RefError(
                    (name,), f"{name!r} is not a valid header name (letters, digits and -)"
                )
            if not value.strip():
                raise _InjectedValueError((name,), "is empty")
            if _HEADER_CONTROL.search(value):
                raise _InjectedValueError(
                    (name,), "contains a line break or another control character"
                )
            scheme, _, credentials = value.strip().partition(" ")
            if (
                name.lower() in ("authorization", "proxy-authorization")
                and scheme.lower() in _AUTH_SCHEMES
                and not credentials.strip()
            ):
                raise _InjectedValueError((name,), f"is {scheme!r} with nothing after it")
        return v


# A condition's accepted value(s), as written in YAML: JSON fields may be numbers or booleans,
# compared by their JSON text (1 → "1", true → "true"), as claims are.
Accepted = str | int | bool | tuple[str | int | bool, ...]


def accepted_texts(value: Accepted) -> tuple[str, ...]:
    """A condition's accepted values as text (`true` → "true", `1` → "1")."""
    items = value if isinstance(value, tuple) else (value,)
    return tuple(
        ("true" if item else "false") if isinstance(item, bool) else str(item) for item in items
    )


def _check_accepted(kind: str, v: Mapping[str, Accepted]) -> Mapping[str, Accepted]:
    for name, accepted in v.items():
        if isinstance(accepted, tuple) and not accepted:
            raise ValueError(f"{kind} {name!r} lists no accepted value; the rule could never match")
    return v


class WhenSettings(_Model):
    groups: tuple[str, ...] = ()  # identity has at least one of these groups
    subjects: tuple[str, ...] = ()  # identity subject is one of these
    # claim path (dotted, e.g. "act.sub") -> required value or list of accepted values
    claims: Mapping[str, str | tuple[str, ...]] = Field(default_factory=dict)
    # header name (any case) -> value or list of accepted values (exact, case-sensitive)
    headers: Mapping[str, str | tuple[str, ...]] = Field(default_factory=dict)
    # query parameter (decoded name) -> value or list of accepted values (decoded)
    query: Mapping[str, str | tuple[str, ...]] = Field(default_factory=dict)
    # JSON Pointer into the request body ("/format") -> value or list of accepted values
    json_fields: Mapping[str, Accepted] = Field(default_factory=dict, alias="json")
    # form field (application/x-www-form-urlencoded body) -> value or list of accepted values
    form: Mapping[str, str | tuple[str, ...]] = Field(default_factory=dict)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: Mapping[str, Any]) -> Mapping[str, Any]:
        for name in v:
            if not _HEADER_NAME.fullmatch(name):
                raise _RefError(
                    (name,), f"{name!r} is not a valid header name (letters, digits and -)"
                )
        return _check_accepted("header", v)

    @field_validator("query", "form")
    @classmethod
    def _fields(cls, v: Mapping[str, Any]) -> Mapping[str, Any]:
        return _check_accepted("field", v)

    @field_validator("json_fields")
    @classmethod
    def _json(cls, v: Mapping[str, Accepted]) -> Mapping[str, Accepted]:
        for pointer in v:
            if pointer and not pointer.startswith("/"):
                raise _RefError(
                    (pointer,),
                    f"{pointer!r} is not a JSON Pointer; write it from the root, e.g. "
                    f"'/{pointer.lstrip('.')}' (RFC 6901)",
                )
            if re.search(r"~(?![01])", pointer):
                raise _RefError(
                    (pointer,), f"{pointer!r}: '~' must be written ~0 and '/' in a name ~1"
                )
        return _check_accepted("JSON field", v)

    @field_validator("claims")
    @classmethod
    def _claims(cls, v: Mapping[str, str | tuple[str, ...]]) -> Mapping[str, Any]:
        for name, accepted in v.items():
            if isinstance(accepted, tuple) and not accepted:
                raise ValueError(
                    f"claim {name!r} lists no accepted value; the rule could never match"
                )
        return v


class ApproversSettings(_Model):
    groups: tuple[str, ...] = ()
    users: tuple[str, ...] = ()


class GrantSettings(_Model):
    """A rule's `grant`: approvers may approve "this and the next `max_uses` like it for up to
    `max_seconds`" (`proxy.model.grant`)."""

    max_uses: Annotated[int, Field(ge=1, le=MAX_GRANT_USES)]
    max_seconds: Annotated[int, Field(ge=1, le=MAX_GRANT_SECONDS)]


class RuleSettings(_Model):
    name: NonEmpty
    action: Action
    methods: tuple[str, ...] = ()  # empty: any method
    paths: tuple[str, ...] = ()  # globs; empty: any path
    route: str | None = None
    # Action globs ("iam:Create*", "tool:delete_*", "mutation:*"); empty: any action. A rule
    # with actions never matches a request whose route names none.
    actions: tuple[str, ...] = ()
    when: WhenSettings | None = None
    approvers: ApproversSettings | None = None
    quorum: Annotated[int, Field(ge=1)] = 1
    timeout_seconds: Annotated[int, Field(gt=0)] | None = None
    # How this rule's held requests wait; default `approvals.mode`. A client may always ask for
    # async itself (`Prefer: respond-async`).
    mode: Literal["hold", "async"] | None = None
    # Approve rules only: the grants approvers may give; and what approvers are shown besides
    # the request (a risk hint, and a free-text note about this rule).
    grant: GrantSettings | None = None
    risk: Literal["low", "medium", "high"] | None = None
    note: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = None

    @field_validator("action", mode="before")
    @classmethod
    def _action(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return Action(v)
            except ValueError:
                raise ValueError(f"must be one of allow, deny, approve; got {v!r}") from None
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        upper = tuple(m.upper() for m in v)
        for m in upper:
            if m not in HTTP_METHODS:
                raise ValueError(f"unknown HTTP method {m!r}")
        return upper

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from .policy import check_glob  # late: policy imports these settings

        for p in v:
            if not p.startswith("/"):
                raise ValueError(f"path globs must start with '/', got {p!r}")
            check_glob(p)
        return v

    @field_validator("actions")
    @classmethod
    def _actions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for glob in v:
            if not glob.strip() or glob != glob.strip():
                raise ValueError(f"an action glob must not be empty or padded, got {glob!r}")
            if ":" not in glob:
                raise ValueError(
                    f"action {glob!r} has no kind; write service:Operation (iam:CreateRole), "
                    "tool:NAME, mcp:METHOD, query:FIELD or mutation:FIELD"
                )
        return v

    @model_validator(mode="after")
    def _approvers(self) -> RuleSettings:
        if self.action is Action.APPROVE:
            if self.approvers is None or not (self.approvers.groups or self.approvers.users):
                raise ValueError("an approve rule needs approvers (groups or users)")
        elif self.approvers is not None:
            raise ValueError("approvers only make sense on an approve rule")
        elif self.mode is not None:
            raise ValueError("mode only makes sense on an approve rule")
        elif self.grant is not None:
            raise ValueError("grant only makes sense on an approve rule")
        elif self.risk is not None or self.note is not None:
            raise ValueError("risk and note only make sense on an approve rule")
        return self


class PolicySettings(_Model):
    default: Action = Action.DENY
    rules: tuple[RuleSettings, ...] = ()

    @field_validator("default", mode="before")
    @classmethod
    def _default(cls, v: Any) -> Any:
        return RuleSettings._action(v)


class ApprovalsSettings(_Model):
    mode: Literal["hold", "async"] = "hold"
    timeout_seconds: Annotated[int, Field(gt=0)] = 900
    # An approved request must run within this many seconds of its approval, or it lapses.
    claim_seconds: Annotated[int, Field(gt=0)] = 600
    # Beyond these, a new privileged request gets 429 too_many_pending (with Retry-After).
    max_pending_per_identity: Annotated[int, Field(gt=0)] = 20
    max_held_bytes: Annotated[int, Field(gt=0)] = 256 * 1024 * 1024  # per process
    groups: Mapping[str, tuple[str, ...]] = Field(default_factory=dict)


class SlackSettings(_Model):
    bot_token: str | None = None  # xoxb-: posts messages, reads who clicked
    signing_secret: str | None = None  # HTTP mode: POST /_countersign/slack/events
    app_token: str | None = None  # xapp-: Socket Mode (no inbound exposure)
    channel: str | None = None  # where approval messages are posted (an id like C0123)
    api_url: str = "https://slack.com/api/"

    @field_validator("bot_token", "signing_secret", "app_token", "channel", mode="before")
    @classmethod
    def _blank_is_unset(cls, v: Any) -> Any:
        # `${SLACK_BOT_TOKEN:-}` in a shared config turns Slack off where the variable is unset.
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, v: str) -> str:
        _http_url(v)
        return v if v.endswith("/") else v + "/"

    @model_validator(mode="after")
    def _needs_bot_token(self) -> SlackSettings:
        if (self.channel or self.signing_secret or self.app_token) and not self.bot_token:
            raise ValueError("bot_token is required to post messages and identify who clicked")
        return self


class TeamsSettings(_Model):
    """Microsoft Teams (proxy/teams/): the Azure Bot's app id and password, the tenant allowed
    to send activities, and the conversation (channel) where approval cards are posted."""

    app_id: str | None = None  # the bot's Microsoft App ID (audience of inbound tokens)
    app_password: str | None = None  # its client secret (outbound client-credentials tokens)
    tenant_id: str | None = None  # the only tenant whose activities are accepted
    conversation: str | None = None  # e.g. 19:...@thread.tacv2
    service_url: str = "https://smba.trafficmanager.net/teams/"
    openid_metadata_url: str = "https://login.botframework.com/v1/.well-known/openidconfiguration"
    token_url: str = "https://login.microsoftonline.com/botframework.com/oauth2/v2.0/token"

    @field_validator("app_id", "app_password", "tenant_id", "conversation", mode="before")
    @classmethod
    def _blank_is_unset(cls, v: Any) -> Any:
        # `${TEAMS_APP_ID:-}` in a shared config turns Teams off where the variable is unset.
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("service_url", "openid_metadata_url", "token_url")
    @classmethod
    def _urls(cls, v: str) -> str:
        _http_url(v)
        return v

    @field_validator("service_url")
    @classmethod
    def _slash(cls, v: str) -> str:
        return v if v.endswith("/") else v + "/"

    @property
    def enabled(self) -> bool:
        return self.app_id is not None

    @model_validator(mode="after")
    def _complete(self) -> TeamsSettings:
        given = [self.app_id, self.app_password, self.tenant_id, self.conversation]
        if any(given) and not all(given):
            raise ValueError(
                "app_id, app_password, tenant_id and conversation are all required for Teams"
            )
        return self


class WebhookSettings(_Model):
    url: NonEmpty
    secret: str | None = None  # HMAC-SHA256 signing key; strongly recommended

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        _http_url(v)
        return v


class NotifySettings(_Model):
    slack: SlackSettings | None = None
    teams: TeamsSettings | None = None
    webhooks: tuple[WebhookSettings, ...] = ()


class RedactSettings(_Model):
    patterns: tuple[str, ...] = ()  # extra regular expressions whose matches are redacted
    fields: tuple[str, ...] = ()  # extra field names whose values are redacted

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        return v


class AnchorSettings(_Model):
    """Where signed checkpoints are also sent, out of the reach of whoever administers the
    audit file: `file:///path` (another disk, a WORM mount), `redis://host:port/db?stream=KEY`
    (a stream; default key `countersign:checkpoints`) or `https://` (POSTed as JSON, signed like
    webhooks with `secret`). Written as a bare URL string or as `{url, secret}`."""

    url: NonEmpty
    secret: str | None = None  # HMAC-SHA256 key of the https:// witness

    @field_validator("url")
    @classmethod
    def _anchor_url(cls, v: str) -> str:
        parts = _split_url(v)
        scheme = parts.scheme.lower()
        if scheme == "file":
            if not parts.path or parts.netloc not in ("", "localhost"):
                raise ValueError(
                    "a file:// anchor needs an absolute path "
                    f"(file:///mnt/worm/checkpoints.jsonl), got {_shown_url(v)}"
                )
        elif scheme in ("http", "https"):
            _http_url(v)
        elif scheme in ("redis", "rediss", "unix"):
            _redis_url(v.split("?", 1)[0], store=False)
        else:
            raise ValueError(
                f"an anchor is a file://, redis:// or https:// URL, got {_shown_url(v)}"
            )
        return v

    @model_validator(mode="before")
    @classmethod
    def _bare_url(cls, data: Any) -> Any:
        return {"url": data} if isinstance(data, str) else data


class AuditSettings(_Model):
    stdout: bool = True
    file: str | None = None  # the hash-chained JSON-lines file
    file_max_bytes: Annotated[int, Field(gt=0)] | None = 100 * 1024 * 1024  # rotate beyond
    commit_interval_ms: Annotated[int, Field(ge=1, le=1000)] = 100  # group commit: at most ...
    commit_max_events: Annotated[int, Field(ge=1)] = 256  # ... or this many events
    redis_stream: str | None = None
    redis_url: str | None = None  # default: store.url when it is a Redis
    redis_stream_maxlen: Annotated[int, Field(gt=0)] = 100_000
    redact: RedactSettings = RedactSettings()
    # Ed25519 private key (PEM; `countersign keys new --audit`): signs checkpoints and receipts.
    signing_key: str | None = None
    checkpoint_seconds: Annotated[float, Field(gt=0, le=3600)] = 10.0
    anchors: tuple[AnchorSettings, ...] = ()

    @model_validator(mode="after")
    def _signing_needs_file(self) -> AuditSettings:
        if self.signing_key is not None and not self.file:
            raise ValueError(
                "signing_key needs audit.file: checkpoints sign the chain of the audit file"
            )
        if self.anchors and self.signing_key is None:
            raise ValueError(
                "anchors need audit.signing_key: what they keep are signed checkpoints"
            )
        return self

    @field_validator("redis_url")
    @classmethod
    def _audit_redis_url(cls, v: str | None) -> str | None:
        return None if v is None else _redis_url(v, store=False)


class Settings(_Model):
    server: ServerSettings = ServerSettings()
    identity: IdentitySettings = IdentitySettings()
    store: StoreSettings = StoreSettings()
    routes: tuple[RouteSettings, ...] = ()
    policy: PolicySettings = PolicySettings()
    approvals: ApprovalsSettings = ApprovalsSettings()
    notify: NotifySettings = NotifySettings()
    audit: AuditSettings = AuditSettings()

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        names = [r.name for r in self.routes]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise _RefError(("routes",), f"duplicate route name(s): {', '.join(sorted(dup))}")
        # "/cloud" and "/cloud/" are the same route prefix.
        prefixes = [r.prefix.rstrip("/") or "/" for r in self.routes]
        dup = {p for p in prefixes if prefixes.count(p) > 1}
        if dup:
            raise _RefError(("routes",), f"duplicate route prefix(es): {', '.join(sorted(dup))}")
        if self.audit.redis_stream and not (self.audit.redis_url or self.store.shared):
            raise _RefError(
                ("audit", "redis_stream"),
                "needs audit.redis_url, or a redis:// store.url to share",
            )
        if self.server.workers > 1 and not self.store.shared:
            raise _RefError(
                ("server", "workers"),
                "more than one worker needs a shared store (store.url: redis://...); "
                "with memory:// each worker would hold its own approvals",
            )
        rule_names = [r.name for r in self.policy.rules]
        dup = {n for n in rule_names if rule_names.count(n) > 1}
        if dup:
            raise _RefError(
                ("policy", "rules"), f"duplicate rule name(s): {', '.join(sorted(dup))}"
            )
        protocols = {r.name: r.protocol for r in self.routes}
        for i, rule in enumerate(self.policy.rules):
            if rule.route is not None and rule.route not in names:
                raise _RefError(
                    ("policy", "rules", i, "route"),
                    f"unknown route {rule.route!r}; routes are: {', '.join(names) or '(none)'}",
                )
            if rule.actions and rule.route is not None and protocols[rule.route] is None:
                raise _RefError(
                    ("policy", "rules", i, "actions"),
                    f"route {rule.route!r} has no protocol, so its requests name no actions and "
                    "this rule could never match; set protocol: aws, graphql or mcp on the route",
                )
            if rule.actions and not any(protocols.values()):
                raise _RefError(
                    ("policy", "rules", i, "actions"),
                    "no route has a protocol, so no request names actions and this rule could "
                    "never match; set protocol: aws, graphql or mcp on a route",
                )
        _check_web_login(self)
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_web_login(settings: Settings) -> None:
    """The inbox's redirect URI is `{server.public_url}/_countersign/ui/callback`; without a
    public URL it is taken from the request, which only a loopback listener may trust."""
    if settings.identity.web_login is None or settings.server.public_url is not None:
        return
    if not _is_loopback(settings.server.host):
        raise _RefError(
            ("identity", "web_login"),
            "needs server.public_url (the inbox's login redirect URI is "
            "{public_url}/_countersign/ui/callback); without it only a loopback "
            "server.listen may serve the inbox",
        )


class _RefError(ValueError):
    """A cross-reference error that knows which key it is about (for the line number)."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


class _InjectedValueError(_RefError):
    """An unusable injected header value; the message gains the `${VAR}`s its text came from."""


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    """One or more problems in a configuration file; `str()` lists them, one per line."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
Loc = tuple[str | int, ...]
YAML_KEY = "(yaml)"  # the key of an issue in the YAML syntax itself


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


class _Builder:
    """Turns a composed YAML node tree into plain Python data, remembering each key's line."""

    def __init__(self, file: str, env: Mapping[str, str]) -> None:
        self.file = file
        self.env = env
        self.lines: dict[Loc, int] = {}
        self.raw: dict[Loc, str] = {}  # each scalar's text as written, before ${VAR}s
        self.issues: list[ConfigIssue] = []

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                    self._issue(line, loc, f"a key must be a plain name, not a {kind}")
                    continue
                key = str(key_node.value)
                if key in first:
                    self._issue(
                        line, loc, f"key {key!r} appears twice (first on line {first[key]})"
                    )
                    continue
                first[key] = line
                self.lines[(*loc, key)] = line
                out[key] = self.build(value_node, (*loc, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            # tuples, because settings are frozen and strict validation takes no list for a tuple
            return tuple(self.build(item, (*loc, i)) for i, item in enumerate(node.value))
        assert isinstance(node, yaml.ScalarNode)
        self.raw[loc] = node.value
        if node.tag == "tag:yaml.org,2002:str":
            return self._interpolate(str(node.value), loc, node)
        # Resolve ints, bools, floats and nulls the way YAML 1.1 would.
        try:
            return _SCALAR_LOADER.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError):
            # An explicit tag: `!!int abc`, `!vault secret`, ...
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            self._issue(
                node.start_mark.line + 1,
                loc,
                f"cannot read {node.value!r} as {tag}; remove the tag "
                "(only plain strings, numbers, booleans, lists and mappings are used)",
            )
            return None

    def _issue(self, line: int, loc: Loc, message: str) -> None:
        self.issues.append(ConfigIssue(self.file, line, format_loc(loc), message))

    def _interpolate(self, text: str, loc: Loc, node: yaml.Node) -> str:
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in self.env:
                return self.env[name]
            if default is not None:
                return default
            self._issue(
                node.start_mark.line + 1,
                loc,
                f"environment variable {name} is not set",
            )
            return ""

        return _ENV_REF.sub(replace, text)

    def blank_variables(self, loc: Loc) -> str:
        """A hint naming the `${VAR}`s in the text at `loc` that came out blank, or ""."""
        hints = []
        for match in _ENV_REF.finditer(self.raw.get(loc, "")):
            name, default = match.group(1), match.group(2)
            ref = f"${{{name}}}"
            value = self.env.get(name)
            if value is None and not (default or "").strip():
                hints.append(f"is {ref} set?")
            elif value is not None and not value.strip():
                hints.append(f"{ref} is set but empty")
        return f" ({'; '.join(hints)})" if hints else ""


_SCALAR_LOADER = yaml.SafeLoader("")


def load_settings_text(
    text: str, file: str = "<config>", env: Mapping[str, str] | None = None
) -> Settings:
    """Parse and validate a configuration; raise `ConfigError` listing every problem found."""
    env = os.environ if env is None else env
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        line, message = _yaml_problem(exc, text)
        raise ConfigError([ConfigIssue(file, line, YAML_KEY, message)]) from None
    builder = _Builder(file, env)
    data = {} if root is None else builder.build(root, ())
    if not isinstance(data, dict):
        raise ConfigError(
            [
                ConfigIssue(
                    file,
                    1,
                    "",
                    "the top level must be a mapping of sections (server:, routes:, policy:, "
                    f"...), got {_kind(data)}",
                )
            ]
        )
    if builder.issues:
        raise ConfigError(builder.issues)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_issues_from(exc, file, builder)) from None


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue(str(path), None, "", f"cannot read: {exc.strerror}")]
        ) from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [ConfigIssue(str(path), line, "", "the file is not UTF-8 text")]
        ) from None
    return load_settings_text(text, str(path), env)


# --------------------------------------------------------------------------------------------
# YAML syntax errors in plain words

_INDENTATION = "the indentation of this line does not match the lines above it"
_OPENERS = {"]": "[", "}": "{"}


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[int | None, str]:
    """The line and a plain sentence for a YAML syntax error (PyYAML's gist in parentheses)."""
    if isinstance(exc, yaml.reader.ReaderError):
        return text[: exc.position].count("\n") + 1, (
            f"the character {chr(exc.character)!r} (#x{exc.character:04x}) "
            "is not allowed in YAML; remove it"
        )
    if not isinstance(exc, yaml.MarkedYAMLError):
        return None, f"this is not valid YAML ({exc})"
    problem, context = exc.problem or "", exc.context or ""
    at = exc.problem_mark.line + 1 if exc.problem_mark else None
    context_line = exc.context_mark.line + 1 if exc.context_mark else None
    line = at or context_line
    lines = text.splitlines()

    found = re.search(r"found character '(.*)' that cannot start any token", problem)
    if found and found.group(1) == "\\t":
        return line, "a tab is used for indentation here; YAML indents with spaces only"
    if found:
        return line, f"a value cannot start with {found.group(1)!r}; put the value in quotes"
    if "quoted scalar" in context and "end of stream" in problem:
        return context_line or line, "unclosed quote: the quote opened on this line is never closed"
    escape = re.search(r"found unknown escape character '(.*)'", problem)
    if escape:
        return line, (
            f"'\\{escape.group(1)}' is not an escape sequence in a double-quoted string; "
            "use single quotes, or write '\\\\' for a backslash"
        )
    if "could not find expected ':'" in problem:
        return context_line or line, "a ':' is missing after the key on this line"
    if problem == "mapping values are not allowed here" and exc.problem_mark:
        return _misplaced_colon(lines, exc.problem_mark.line, exc.problem_mark.column)
    if problem == "sequence entries are not allowed here":
        return line, "a list item ('- ') cannot start here; put it on its own line, indented"
    block_end = re.fullmatch(r"expected <block end>, but found '(.*)'", problem)
    if block_end:
        token = block_end.group(1)
        if token in ("?", "-", "<block mapping start>", "<block sequence start>"):
            return line, _INDENTATION
        if token == "<scalar>" and exc.problem_mark:
            before = lines[exc.problem_mark.line][: exc.problem_mark.column].rstrip()
            if before.endswith(("'", '"')):
                return line, "text after the closing quote; put the whole value in quotes"
        if token in _OPENERS:
            return line, f"a {token!r} that closes nothing"
    flow = re.fullmatch(r"expected ',' or '(.)', but got '(.*)'", problem)
    if flow and "flow" in context:
        closer, got = flow.group(1), flow.group(2)
        opener = _OPENERS[closer]
        if got == "<stream end>":
            return context_line, f"the {opener!r} opened on this line is never closed"
        if got in _OPENERS:
            return line, (
                f"{got!r} does not match the {opener!r} opened on line {context_line}; "
                f"close it with {closer!r}"
            )
        return line, (
            f"a ',' or {closer!r} is missing before this (in the {opener!r} opened on line "
            f"{context_line})"
        )
    if problem == "expected the node content, but found '<stream end>'":
        bracket = _unclosed_bracket(text)
        if bracket is not None:
            return bracket[0], f"the {bracket[1]!r} opened on this line is never closed"
        return line, "the file ends where a value was expected"
    node = re.fullmatch(r"expected the node content, but found '(.)'", problem)
    if node:
        return line, f"a value cannot start with {node.group(1)!r}; put the value in quotes"
    alias = re.fullmatch(r"found undefined alias '(.*)'", problem)
    if alias:
        name = alias.group(1)
        return line, f"'*{name}' refers to an anchor '&{name}' that is not defined above it"
    anchor = re.fullmatch(r"found duplicate anchor '(.*)'; first occurrence", context)
    if anchor:
        return line, f"anchor '&{anchor.group(1)}' is defined twice (first on line {context_line})"
    if "expected a single document" in context:
        return line, (
            "a second YAML document ('---') starts here; a configuration is a single document"
        )
    gist = "; ".join(part for part in (context, problem) if part)
    return line, f"this is not valid YAML ({gist})"


def _misplaced_colon(lines: list[str], index: int, column: int) -> tuple[int, str]:
    """PyYAML's "mapping values are not allowed here": a ': ' where a key cannot start.

    Either the line holds a second "key: value" ("a: b: c"), or a plain value on a line above
    runs on to this one: that line lacks its ':' ("listen x"), or this line is indented deeper
    than its siblings and reads as the rest of the value above.
    """
    current = lines[index] if index < len(lines) else ""
    content = current[:column].lstrip()
    content = content[2:] if content.startswith("- ") else content
    if re.search(r":(\s|$)", content):
        return index + 1, (
            "a second ': ' on this line; put the value in quotes if it contains ': '"
        )
    for above in range(index - 1, -1, -1):
        text = lines[above].strip()
        if not text or text.startswith("#"):
            continue
        text = text[2:] if text.startswith("- ") else text
        if not re.search(r":(\s|$)", text):
            return above + 1, "a ':' is missing after the key on this line"
        break
    return index + 1, _INDENTATION


def _unclosed_bracket(text: str) -> tuple[int, str] | None:
    """The line and character of the innermost '[' or '{' still open where the scanner stops."""
    stack: list[tuple[int, str]] = []
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(token, (yaml.FlowSequenceStartToken, yaml.FlowMappingStartToken)):
                opener = "[" if isinstance(token, yaml.FlowSequenceStartToken) else "{"
                stack.append((token.start_mark.line + 1, opener))
            elif stack and isinstance(token, (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken)):
                stack.pop()
    except yaml.YAMLError:
        pass
    return stack[-1] if stack else None


# --------------------------------------------------------------------------------------------
# Validation errors in plain words

# What pydantic's "wrong type" errors expected, for a union whose every branch failed.
_TYPE_ERRORS = {
    "string_type": "a string",
    "int_type": "a whole number",
    "float_type": "a number",
    "bool_type": "true or false",
    "tuple_type": "a list",
    "list_type": "a list",
    "dict_type": "a mapping",
    "mapping_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "enum": "one of the listed words",
    "literal_error": "one of the listed words",
}
_PATTERNS = {
    r"^[0-9a-f]{64}$": (
        "must be 64 lowercase hexadecimal digits: the SHA-256 of the API key, not the key itself"
    ),
    r"^[A-Za-z0-9_.:-]+$": "may hold only letters, digits and _ . : -",
}
_SECRET = re.compile(r"secret|token|password|sha256", re.IGNORECASE)
_UNITS = {"_seconds": " of seconds", "_ms": " of milliseconds", "_bytes": " of bytes"}


def _issues_from(exc: ValidationError, file: str, builder: _Builder) -> list[ConfigIssue]:
    issues = []
    for loc, err, alternatives in _collapse_unions(exc.errors()):
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _RefError):
            loc = (*loc, *ctx_error.loc)
            message = ctx_error.message
            if isinstance(ctx_error, _InjectedValueError):
                message += builder.blank_variables(loc)
        elif alternatives:
            message = (
                f"expected {' or '.join(alternatives)}, {_got(err.get('input'), loc, builder)}"
            )
        else:
            message = _message(err, loc, builder)
        issues.append(ConfigIssue(file, _line_for(loc, builder.lines), format_loc(loc), message))
    return issues


def _collapse_unions(errors: list[ErrorDetails]) -> list[tuple[Loc, ErrorDetails, list[str]]]:
    """`errors` with pydantic's union branch names taken out of each location.

    A value that fits no branch of a union (`str | tuple[str, ...]`) gives one error per branch;
    they become one "expected a string or a list" (the third item). When the value has the
    right kind for a branch but a wrong part or item, only that branch's errors are kept.
    """
    groups: dict[Loc, list[ErrorDetails]] = {}  # by location up to the first branch name
    for err in errors:
        raw = tuple(err["loc"])
        branch = next((i for i, p in enumerate(raw) if _is_pydantic_branch(p)), len(raw))
        groups.setdefault(raw[:branch], []).append(err)
    result: list[tuple[Loc, ErrorDetails, list[str]]] = []
    for loc, group in groups.items():
        plain = [e for e in group if len(e["loc"]) == len(loc)]
        branches = [e for e in group if len(e["loc"]) > len(loc)]
        result.extend((loc, e, []) for e in plain)
        if not branches:
            continue
        specific = [
            e for e in branches if len(e["loc"]) > len(loc) + 1 or e["type"] not in _TYPE_ERRORS
        ]
        if specific:
            result.extend((_without_branches(e["loc"]), e, []) for e in specific)
        else:
            kinds = list(dict.fromkeys(_TYPE_ERRORS[e["type"]] for e in branches))
            result.append((loc, branches[0], kinds))
    return result


def _without_branches(loc: Iterable[str | int]) -> Loc:
    return tuple(p for p in loc if not _is_pydantic_branch(p))


def _is_pydantic_branch(part: Any) -> bool:
    # pydantic adds union branch names ("str", "tuple[str, ...]", "function-after[...]") to loc.
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"})


def _message(err: ErrorDetails, loc: Loc, builder: _Builder) -> str:
    """One pydantic error as a sentence an operator understands; no pydantic words in it."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    field = _field_at(loc)
    ann, meta = field if field is not None else (None, [])
    name = next((p for p in reversed(loc) if isinstance(p, str)), "")
    got = _got(value, loc, builder)

    if kind == "value_error":
        return str(ctx.get("error") or err["msg"].removeprefix("Value error, "))
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "missing":
        return "required key is missing"
    options = _options(ann) or re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
    if kind in ("literal_error", "enum") or (kind == "is_instance_of" and options):
        shown = repr(value) if isinstance(value, str) else got.removeprefix("got ")
        return f"must be one of {', '.join(options)}; got {shown}"
    if kind in ("int_type", "float_type", "int_parsing", "float_parsing", "finite_number") or (
        kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
    ):
        number = ann if ann in (int, float) else (int if kind.startswith("int") else float)
        phrase = _number_phrase(number, meta, ctx, name)
        if kind == "finite_number":
            phrase = phrase.replace("number", "finite number", 1)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"must be {phrase}, got {builder.raw.get(loc, value)}"
        unquote = isinstance(value, str) and bool(re.fullmatch(r"\s*[-+]?\d+(\.\d*)?\s*", value))
        return f"must be {phrase}, {got}" + ("; write it without quotes" if unquote else "")
    if kind in ("bool_type", "bool_parsing"):
        unquote = isinstance(value, str) and value.strip().lower() in ("true", "false")
        return f"expected true or false, {got}" + ("; write it without quotes" if unquote else "")
    if kind == "string_type":
        hint = "; put it in quotes" if isinstance(value, (bool, int, float)) else ""
        return f"expected a string, {got}{hint}"
    if kind in ("tuple_type", "list_type"):
        return _expected_list(ann, value, got, loc)
    if kind in ("dict_type", "mapping_type"):
        return f"expected a mapping (key: value lines, or {{key: value}}), {got}"
    if kind in ("model_type", "model_attributes_type"):
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return f"expected a mapping with keys {', '.join(ann.model_fields)}; {got}"
        return f"expected a mapping, {got}"
    if kind == "string_too_short":
        least = ctx.get("min_length", 1)
        return "must not be empty" if least == 1 else f"must be at least {least} characters long"
    if kind in ("too_short", "too_long"):
        bound = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        items = "item" if bound == 1 else "items"
        most = "at least" if kind == "too_short" else "at most"
        return f"must list {most} {bound} {items}, got {ctx.get('actual_length', '?')}"
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", ""))
        plain = _PATTERNS.get(pattern, f"must match the pattern {pattern}")
        return plain if _is_secret(loc) or pattern not in _PATTERNS else f"{plain}; {got}"
    # Anything else: pydantic's sentence without its own vocabulary.
    message = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    message = re.sub(r"\s*or instance of \w+", "", message)
    return re.sub(r"^Input should be", "must be", message)


def _unknown_key(loc: Loc) -> str:
    """ "unknown key", with the likely meant key, or the keys this mapping takes."""
    parent = _field_at(loc[:-1]) if loc[:-1] else (Settings, [])
    model = parent[0] if parent is not None else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return "unknown key"
    names = list(model.model_fields)
    key = str(loc[-1])
    if key == "<<":
        return "YAML merge keys ('<<: *anchor') are not supported; write the keys out"
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6) or [
        n for n in names if n.replace("_", "") == key.lower().replace("-", "").replace("_", "")
    ]
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; the keys here are {', '.join(names)}"


def _kind(value: Any) -> str:
    """The YAML type of a loaded value, as an operator would name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (tuple, list)):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return "a date"
    return "a value of an unsupported kind"


def _is_secret(loc: Loc) -> bool:
    return "inject_headers" in loc or any(isinstance(p, str) and _SECRET.search(p) for p in loc)


def _got(value: Any, loc: Loc, builder: _Builder) -> str:
    """ "got a string ('abc')": the kind of `value`, and the value itself unless it is secret."""
    kind = _kind(value)
    if value is None:
        return "got null (an empty value)"
    if _is_secret(loc) or isinstance(value, (tuple, list, Mapping)):
        return f"got {kind}"
    if isinstance(value, str):
        shown = repr(value if len(value) <= 60 else value[:57] + "...")
    else:
        shown = builder.raw.get(loc) or str(value)
    return f"got {kind} ({shown})"


def _expected_list(ann: Any, value: Any, got: str, loc: Loc) -> str:
    item = typing.get_args(ann)[0] if typing.get_origin(ann) is tuple else None
    if isinstance(item, type) and issubclass(item, BaseModel):
        return f"expected a list of mappings, each item starting with '- '; {got}"
    example = "[a, b]"
    if isinstance(value, (str, int, float)) and not _is_secret(loc):
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        example = f"[{shown}]" if len(shown) <= 40 else example
    return f"expected a list (e.g. {example}), {got.split(' (')[0]}"


def _options(ann: Any) -> list[str]:
    if typing.get_origin(ann) is Literal:
        return [str(a) for a in typing.get_args(ann)]
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return [str(m.value) for m in ann]
    return []


def _number_phrase(number: Any, meta: Iterable[Any], ctx: Mapping[str, Any], name: str) -> str:
    """ "a whole number from 1 to 64", "a number of seconds greater than 0", ..."""
    phrase = "a whole number" if number is int else "a number"
    phrase += next((words for suffix, words in _UNITS.items() if name.endswith(suffix)), "")
    bounds = _bounds(meta) or {k: ctx[k] for k in ("gt", "ge", "lt", "le") if k in ctx}
    gt, ge, lt, le = (bounds.get(k) for k in ("gt", "ge", "lt", "le"))
    if ge is not None and le is not None:
        return f"{phrase} from {_num(ge)} to {_num(le)}"
    if number is int and ge == 1 and gt is None:
        gt, ge = 0, None  # "greater than 0" is plainer than "at least 1"
    if ge == 0 and not (gt or lt or le):
        return f"{phrase}, 0 or more"
    parts = []
    if gt is not None:
        parts.append(f"greater than {_num(gt)}")
    if ge is not None:
        parts.append(f"of at least {_num(ge)}")
    if lt is not None:
        parts.append(f"less than {_num(lt)}")
    if le is not None:
        parts.append(f"of at most {_num(le)}")
    return " ".join([phrase, " and ".join(parts)]) if parts else phrase


def _bounds(meta: Iterable[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in meta:
        if isinstance(item, FieldInfo):
            out.update(_bounds(item.metadata))
        elif isinstance(item, Gt):
            out["gt"] = item.gt
        elif isinstance(item, Ge):
            out["ge"] = item.ge
        elif isinstance(item, Lt):
            out["lt"] = item.lt
        elif isinstance(item, Le):
            out["le"] = item.le
    return out


def _num(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _unwrap(ann: Any) -> tuple[Any, list[Any]]:
    """`ann` without `| None` and `Annotated`, and the Annotated metadata found on the way."""
    meta: list[Any] = []
    while True:
        origin = typing.get_origin(ann)
        if origin is Annotated:
            ann, *extra = typing.get_args(ann)
            meta.extend(extra)
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) != 1:
                return ann, meta
            ann = args[0]
        else:
            return ann, meta


def _field_at(loc: Loc) -> tuple[Any, list[Any]] | None:
    """The type and constraints of the setting at `loc`, walking the schema from `Settings`."""
    ann: Any = Settings
    meta: list[Any] = []
    for part in loc:
        ann, _ = _unwrap(ann)
        origin = typing.get_origin(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            field = ann.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            ann, meta = field.annotation, list(field.metadata)
        elif origin is tuple and isinstance(part, int):
            ann, meta = typing.get_args(ann)[0], []
        elif origin is Mapping and isinstance(part, str):
            ann, meta = typing.get_args(ann)[1], []
        else:
            return None
    ann, extra = _unwrap(ann)
    return ann, meta + extra


def _line_for(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    # The key itself if present, else the closest enclosing key that exists in the file.
    for end in range(len(loc), -1, -1):
        line = lines.get(loc[:end])
        if line is not None:
            return line
    return None


def summary(settings: Settings) -> str:
    """The short line `countersign check` prints on success."""
    approve = sum(1 for r in settings.policy.rules if r.action is Action.APPROVE)
    return (
        f"{len(settings.identity.issuers)} issuer(s), "
        f"{len(settings.identity.api_keys)} API key(s), "
        + (f"{len(settings.identity.aws_keys)} AWS key(s), " if settings.identity.aws_keys else "")
        + f"{len(settings.routes)} route(s), {len(settings.policy.rules)} rule(s) "
        f"({approve} approve), default {settings.policy.default.value}, "
        f"store {settings.store.url.split('://')[0]}"
    )
