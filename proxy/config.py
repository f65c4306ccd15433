"""YAML configuration → frozen, typed `Settings`.

Every error names the file, the key and the line (`config.yaml:12: routes[0].prefix: ...`), because
an operator fixing a config at 3 a.m. should not have to guess. `${VAR}` in any string is replaced
by the environment variable VAR (`${VAR:-default}` gives a default); a missing variable is an
error that names it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from .model import Action
from .model.binding import DEFAULT_VOLATILE_HEADERS

# --------------------------------------------------------------------------------------------
# Schema


class _Model(BaseModel):
    # strict: a YAML `quorum: "2"` is an error, not silently coerced; frozen: settings never change
    # after start, so every part can hold a reference without copying.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


NonEmpty = Annotated[str, StringConstraints(min_length=1)]
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
FORBIDDEN_ALGORITHMS = re.compile(r"^(HS\d+|none)$", re.IGNORECASE)
ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


def _http_url(value: str) -> SplitResult:
    """`value` split, if it is an absolute http(s) URL with a host; else a ValueError."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return parts


class ServerSettings(_Model):
    listen: NonEmpty = "127.0.0.1:8080"
    public_url: str | None = None
    max_body_bytes: Annotated[int, Field(gt=0)] = 10 * 1024 * 1024
    trusted_proxies: tuple[str, ...] = ()
    # The longest request header line accepted; longer: 431 header_too_large.
    max_header_bytes: Annotated[int, Field(ge=8192, le=1024 * 1024)] = 65536
    # Processes serving the same port (SO_REUSEPORT); more than one needs a shared store.
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    # uvloop (libuv) costs less CPU per request than asyncio's own loop; "asyncio" to compare.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    upstream_connect_timeout_seconds: Annotated[float, Field(gt=0)] = 5.0
    upstream_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"expected host:port, e.g. 127.0.0.1:8080, got {v!r}")
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


class IdentitySettings(_Model):
    issuers: tuple[IssuerSettings, ...] = ()
    claims: ClaimsSettings = ClaimsSettings()
    api_keys: tuple[ApiKeySettings, ...] = ()
    # How long a verified token's identity is reused without re-checking the signature (it is
    # never reused past the token's own `exp`).
    token_cache_size: Annotated[int, Field(ge=0)] = 10_000
    jwks_refresh_cooldown_seconds: Annotated[float, Field(ge=0)] = 30.0


class StoreSettings(_Model):
    url: NonEmpty = "memory://"
    key_prefix: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]+$")] = "countersign"
    # How long decided, expired and executed approvals stay readable (API, CLI, audit lookups).
    retention_seconds: Annotated[int, Field(gt=0)] = 7 * 24 * 3600
    timeout_seconds: Annotated[float, Field(gt=0)] = 2.0  # per Redis command
    max_connections: Annotated[int, Field(ge=1, le=10_000)] = 64  # per process

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        scheme = v.partition("://")[0]
        if v == "memory://" or scheme in ("redis", "rediss", "unix"):
            return v
        raise ValueError(
            f"unknown store {v!r}; use memory:// or redis://[:password@]host:port/db "
            "(rediss:// for TLS)"
        )

    @property
    def shared(self) -> bool:
        """Whether several processes can share this store (needed for server.workers > 1)."""
        return self.url != "memory://"


class RouteSettings(_Model):
    name: NonEmpty
    prefix: NonEmpty
    upstream: NonEmpty
    inject_headers: Mapping[str, str] = Field(default_factory=dict)
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
            raise ValueError("must not have a query or fragment")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "must not hold credentials (user:password@); send them with inject_headers, "
                "e.g. Authorization: Basic ..."
            )
        return v


class WhenSettings(_Model):
    groups: tuple[str, ...] = ()  # identity has at least one of these groups
    subjects: tuple[str, ...] = ()  # identity subject is one of these
    # claim path (dotted, e.g. "act.sub") -> required value or list of accepted values
    claims: Mapping[str, str | tuple[str, ...]] = Field(default_factory=dict)

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


class RuleSettings(_Model):
    name: NonEmpty
    action: Action
    methods: tuple[str, ...] = ()  # empty: any method
    paths: tuple[str, ...] = ()  # globs; empty: any path
    route: str | None = None
    when: WhenSettings | None = None
    approvers: ApproversSettings | None = None
    quorum: Annotated[int, Field(ge=1)] = 1
    timeout_seconds: Annotated[int, Field(gt=0)] | None = None

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

    @model_validator(mode="after")
    def _approvers(self) -> RuleSettings:
        if self.action is Action.APPROVE:
            if self.approvers is None or not (self.approvers.groups or self.approvers.users):
                raise ValueError("an approve rule needs approvers (groups or users)")
        elif self.approvers is not None:
            raise ValueError("approvers only make sense on an approve rule")
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
        for i, rule in enumerate(self.policy.rules):
            if rule.route is not None and rule.route not in names:
                raise _RefError(
                    ("policy", "rules", i, "route"),
                    f"unknown route {rule.route!r}; routes are: {', '.join(names) or '(none)'}",
                )
        return self


class _RefError(ValueError):
    """A cross-reference error that knows which key it is about (for the line number)."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


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
        self.issues: list[ConfigIssue] = []

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(key, str) or key in out:
                    what = "duplicate key" if key in out else "keys must be plain strings"
                    self.issues.append(
                        ConfigIssue(
                            self.file,
                            key_node.start_mark.line + 1,
                            format_loc(loc),
                            f"{what}: {key}",
                        )
                    )
                    continue
                self.lines[(*loc, key)] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, (*loc, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            # tuples, because settings are frozen and strict validation takes no list for a tuple
            return tuple(self.build(item, (*loc, i)) for i, item in enumerate(node.value))
        assert isinstance(node, yaml.ScalarNode)
        value = yaml.SafeLoader.construct_scalar(_SCALAR_LOADER, node)
        tag = node.tag
        if tag == "tag:yaml.org,2002:str":
            return self._interpolate(str(value), loc, node)
        # Resolve ints, bools, floats and nulls the way YAML 1.1 would.
        return _SCALAR_LOADER.construct_object(node, deep=True)

    def _interpolate(self, text: str, loc: Loc, node: yaml.Node) -> str:
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in self.env:
                return self.env[name]
            if default is not None:
                return default
            self.issues.append(
                ConfigIssue(
                    self.file,
                    node.start_mark.line + 1,
                    format_loc(loc),
                    f"environment variable {name} is not set",
                )
            )
            return ""

        return _ENV_REF.sub(replace, text)


_SCALAR_LOADER = yaml.SafeLoader("")


def load_settings_text(
    text: str, file: str = "<config>", env: Mapping[str, str] | None = None
) -> Settings:
    """Parse and validate a configuration; raise `ConfigError` listing every problem found."""
    env = os.environ if env is None else env
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError([ConfigIssue(file, line, "", f"invalid YAML: {exc.problem}")]) from None
    builder = _Builder(file, env)
    data = {} if root is None else builder.build(root, ())
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(file, 1, "", "the top level must be a mapping of sections")])
    if builder.issues:
        raise ConfigError(builder.issues)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_issues_from(exc, file, builder.lines)) from None


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue(str(path), None, "", f"cannot read: {exc.strerror}")]
        ) from None
    return load_settings_text(text, str(path), env)


def _issues_from(exc: ValidationError, file: str, lines: Mapping[Loc, int]) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors():
        loc: Loc = tuple(p for p in err["loc"] if not _is_pydantic_branch(p))
        message = err["msg"]
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _RefError):
            loc = (*loc, *ctx_error.loc)
            message = ctx_error.message
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required key is missing"
        elif err["type"].endswith("_type") and "input" in err:
            message = f"{message} (got {type(err['input']).__name__}: {err['input']!r})"
        issues.append(ConfigIssue(file, _line_for(loc, lines), format_loc(loc), message))
    return issues


def _is_pydantic_branch(part: Any) -> bool:
    # pydantic adds union branch names ("str", "tuple[str, ...]", "function-after[...]") to loc.
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"})


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
        f"{len(settings.routes)} route(s), {len(settings.policy.rules)} rule(s) "
        f"({approve} approve), default {settings.policy.default.value}, "
        f"store {settings.store.url.split('://')[0]}"
    )
