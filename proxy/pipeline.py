"""The pipeline: the request path as stages over one `Exchange` (DESIGN §1, §3).

    check → route → authenticate → recognize → decide → (gate) → forward

Each stage either lets the exchange go on (returns None) or answers (returns the response);
`_STAGES` below is the one list of them. Every refusal is a JSON body with an `error` code and
the request id. The path is normalized once here; the policy judges that path and the very
same path is what goes upstream.

The body is read before forwarding only when something must see it: a SigV4 signature (its
payload hash), the route's protocol recognizer, or a rule whose condition reads it
(`Policy.needs_body`). Otherwise it streams through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import itertools
import os
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import audit
from .approvals.receipts import RECEIPT_HEADER, ReceiptTicket, Relayed
from .audit import AuditLog, AuditUnavailable, ChainPosition
from .authn import Authenticator, AuthError, IdentityUnavailable, SigV4Caller
from .aws_resign import AwsCredentialsUnavailable, AwsUpstreamSigner
from .config import RouteSettings, ServerSettings
from .forward import (
    HOP_BY_HOP,
    Forwarder,
    RequestBodyFailed,
    UpstreamError,
    UpstreamResponse,
    UpstreamUnavailable,
    connection_named,
)
from .front.message import (
    STREAMED,
    Answer,
    Incoming,
    Reply,
    RequestBodyError,
)
from .h1.tunnel import relay_both_ways
from .model import Action, AmbiguousField, Identity, RequestBody, RequestInfo, UnreadableBody
from .paths import (
    AmbiguousRequest,
    check_method,
    check_method_override_headers,
    normalize_path,
)
from .policy import Policy
from .protocols import Message, Recognizer, Unrecognized, recognizer_for
from .routing import RouteTable, upstream_path, upstream_target
from .server.aws_errors import aws_error_answer
from .server.mcp_answers import (
    McpCall,
    filter_tools,
    json_answer,
    mcp_tool_call,
    sse_data,
    tool_error,
)
from .server.metrics import NO_DECISION, NO_ROUTE, Metrics
from .server.responses import (
    APPROVAL_ID_HEADER,
    COUNTERSIGN_REQUEST_ID_HEADER,
    GRANT_ID_HEADER,
    NO_APPROVERS_MESSAGE,
    error_answer,
    error_body,
    error_sentence,
)

if TYPE_CHECKING:
    from .server.gate import ApprovalGate

# Headers the client sends for us, never for the upstream.
_CLIENT_ONLY = frozenset(
    {
        "host",
        "authorization",
        "countersign-reason",
        "countersign-approval",
        "expect",
    }
)
# Rebuilt by the proxy on every request (extended from a trusted proxy's values).
_X_FORWARDED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
_NO_BODY_STATUSES = frozenset({204, 304})
# Refusals of an MCP tools/call answered as a tool result the model reads (401 stays HTTP: the
# client must see it to authenticate; 400s are about the message itself).
_MCP_TOOL_REFUSALS = frozenset({403, 409, 429, 502, 503, 504})
# Checked once per header: what never goes upstream as the client sent it. A route's injected
# headers replace the client's of the same name.
_NOT_FORWARDED = HOP_BY_HOP | _CLIENT_ONLY | _X_FORWARDED
# Answer headers only Countersign sets: an upstream's of these names are dropped.
_OURS = frozenset(
    name.lower()
    for name in (COUNTERSIGN_REQUEST_ID_HEADER, APPROVAL_ID_HEADER, RECEIPT_HEADER, GRANT_ID_HEADER)
)


class _Route:
    """A route's per-request constants, computed once at start."""

    __slots__ = (
        "inject",
        "inject_names",
        "origin",
        "recognizer",
        "settings",
        "signer",
        "sigv4",
    )

    def __init__(self, settings: RouteSettings, signer: AwsUpstreamSigner | None) -> None:
        parts = urlsplit(settings.upstream)
        self.settings = settings
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.inject = tuple(settings.inject_headers.items())
        self.inject_names = frozenset(name.lower() for name in settings.inject_headers)
        self.recognizer: Recognizer | None = (
            recognizer_for(settings.protocol) if settings.protocol else None
        )
        self.signer = signer
        # A SigV4 signature covers the body's hash: it is read before authenticating.
        self.sigv4 = "aws_sigv4" in settings.caller_credentials


class BodyTooLarge(Exception):
    """The body is over `server.max_body_bytes` (413)."""


@dataclass(slots=True)
class Exchange:
    """One request on its way through the proxy, as far as it has got."""

    request: Incoming
    request_id: str
    raw_path: str
    query: str
    path: str = ""
    identity: Identity | None = None
    route: _Route | None = None
    rule: str | None = None
    forwarded: bool = False  # the upstream's answer is what the client gets
    body: bytes | None = None  # None: not read (it streams through when forwarded)
    actions: tuple[str, ...] = ()  # what the route's protocol named
    # Lower-case names of the headers the caller's credential came from: never forwarded, never
    # bound into an approval.
    credential_headers: frozenset[str] = frozenset()
    sigv4: SigV4Caller | None = None
    mcp_call: McpCall | None = None  # a single MCP tools/call: refusals become tool results
    claimed: bool = False  # its approval was used: the request may have reached the upstream
    decision: str = NO_DECISION  # the policy's action, for metrics ("none": refused before it)
    sent_status: int = 0  # the status line the client was sent while relaying (0: none yet)
    # What `request.completed` records, gathered as the exchange goes: the status that counts
    # (a refusal's, even when an MCP client gets it as a tool result in a 200; else the
    # upstream's), the body bytes relayed, why it failed, and a refusal's fields.
    status: int = 0
    bytes_sent: int | None = None
    error: str | None = None
    refusal: dict[str, Any] | None = None
    approval_id: str | None = None
    grant_id: str | None = None
    _identity_log: dict[str, Any] | None = None
    _body_view: RequestBody | None = None

    def body_view(self) -> RequestBody | None:
        """The read body with its JSON and form views, one per request: the recognizer, the
        MCP answer and the policy's conditions share its parses."""
        if self._body_view is None and self.body is not None:
            self._body_view = RequestBody(self.body, self.request.headers.get("Content-Type"))
        return self._body_view

    def identity_log(self) -> dict[str, Any] | None:
        """The identity as audit events show it, built once per request."""
        if self._identity_log is None and self.identity is not None:
            self._identity_log = self.identity.to_log()
        return self._identity_log


class ProxyHandler:
    def __init__(
        self,
        *,
        server: ServerSettings,
        authenticator: Authenticator,
        routes: RouteTable,
        policy: Policy,
        forwarder: Forwarder,
        audit_log: AuditLog,
        metrics: Metrics,
        gate: ApprovalGate | None = None,
        signers: Mapping[str, AwsUpstreamSigner] | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._routes = routes
        self._signers = dict(signers or {})
        self._route_info: dict[str, _Route] = {}
        self._max_body = server.max_body_bytes
        self._policy = policy
        self._forwarder = forwarder
        self._audit = audit_log
        self._metrics = metrics
        self._gate = gate
        self._trusted = tuple(ipaddress.ip_network(n, strict=False) for n in server.trusted_proxies)
        self._public_host = urlsplit(server.public_url).netloc if server.public_url else None
        self._read_timeout = server.upstream_timeout_seconds
        # Request ids: unique, not secret. A random per-process prefix and a counter cost a
        # fraction of uuid4's read of the OS's randomness on every request.
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count(1)

    def _route(self, settings: RouteSettings) -> _Route:
        info = self._route_info.get(settings.name)
        if info is None:
            info = self._route_info[settings.name] = _Route(
                settings, self._signers.get(settings.name)
            )
        return info

    async def handle(self, request: Incoming) -> None:
        """Run one request through the stages and answer it through its front."""
        started = time.monotonic()
        raw_path, _, query = request.target.partition("?")
        request_id = f"{self._id_prefix}{next(self._id_counter):016x}"
        exchange = Exchange(request, request_id, raw_path, query)
        status = 0
        try:
            reply = await self._handle(exchange)
            if isinstance(reply, Answer):
                status = reply.status
                if exchange.bytes_sent is None:  # answered by the proxy itself
                    exchange.bytes_sent = len(reply.body)
                await request.respond(reply)
            else:
                status = exchange.sent_status
        except RequestBodyError as exc:
            # The front answers it (exc.status: 408 for a stalled upload, else 400) and closes.
            status = exchange.sent_status or exc.status
            exchange.error = exchange.error or exc.code
            raise
        except (asyncio.CancelledError, ConnectionError):
            # The client left. Counted as what it was sent: an answer already relayed (its audit
            # fsync was still running), or 499 (nginx's "client closed request") when none was.
            status = exchange.sent_status or 499
            exchange.error = exchange.error or "client_disconnected"
            raise
        except BaseException:
            status = exchange.sent_status or 500
            exchange.error = exchange.error or "internal_error"
            raise
        finally:
            elapsed = time.monotonic() - started
            self._completed(exchange, status, elapsed)
            route = exchange.route
            self._metrics.request(
                route.settings.name if route is not None else NO_ROUTE,
                exchange.decision,
                status,
                elapsed,
            )

    def _completed(self, exchange: Exchange, status: int, elapsed: float) -> None:
        """`request.completed`: the one audit event of every allowed or refused request (a
        privileged one also has its step events), with what the client was answered."""
        request = exchange.request
        route = exchange.route
        decision = exchange.decision
        fields: dict[str, Any] = {
            "event": audit.REQUEST_COMPLETED,
            "request_id": exchange.request_id,
            "method": request.method,
            "path": exchange.path or exchange.raw_path,
            "remote": request.remote,
            "identity": exchange.identity_log(),
            "route": route.settings.name if route is not None else None,
            "rule": exchange.rule,
            "action": None if decision == NO_DECISION else decision,
            "status": exchange.status or status,
            "bytes_sent": exchange.bytes_sent or 0,
            "duration_ms": round(elapsed * 1000, 3),
            "error": exchange.error,
        }
        if exchange.path and exchange.path != exchange.raw_path:
            fields["raw_path"] = exchange.raw_path  # as received, when normalizing changed it
        if exchange.actions:
            fields["actions"] = list(exchange.actions)
        if exchange.approval_id is not None:
            fields["approval_id"] = exchange.approval_id
        if exchange.grant_id is not None:
            fields["grant_id"] = exchange.grant_id
        if exchange.refusal:
            fields.update(exchange.refusal)
        self._audit.emit_soon(fields)

    def refuse(
        self,
        exchange: Exchange,
        status: int,
        error: str,
        *,
        headers: dict[str, str] | None = None,
        **fields: Any,
    ) -> Answer:
        """A JSON refusal, audited in the exchange's `request.completed` (status, error and
        `fields`); `headers` go on the answer only."""
        exchange.status = status
        exchange.error = error
        exchange.refusal = dict(fields)
        if exchange.actions and "actions" not in fields:
            fields["actions"] = list(exchange.actions)
        headers = dict(headers or {})
        route = exchange.route
        call = exchange.mcp_call
        if call is not None and status in _MCP_TOOL_REFUSALS:
            # The model reads tool results, not HTTP statuses: say it as a failed tool call.
            body = error_body(status, error, request_id=exchange.request_id, **fields)
            headers[COUNTERSIGN_REQUEST_ID_HEADER] = exchange.request_id
            headers["Countersign-Error"] = error
            return json_answer(tool_error(call, error_sentence(body)), headers)
        if route is not None and route.settings.protocol == "aws":
            # AWS SDKs read AWS's error shapes, not ours.
            return aws_error_answer(
                exchange.request.headers,
                status,
                error,
                request_id=exchange.request_id,
                headers={COUNTERSIGN_REQUEST_ID_HEADER: exchange.request_id, **headers},
                service=exchange.sigv4.service if exchange.sigv4 is not None else None,
                **fields,
            )
        if status == 401:
            description = str(fields.get("message", "")).replace('"', "'")
            sources = route.settings.caller_credentials if route is not None else ("bearer",)
            if sources[0] == "basic":
                # A browser or curl asks for a user and password; the password is the key.
                headers["WWW-Authenticate"] = 'Basic realm="countersign", charset="UTF-8"'
            else:
                headers["WWW-Authenticate"] = (
                    f'Bearer error="invalid_token", error_description="{description}"'
                )
        return error_answer(
            status, error, request_id=exchange.request_id, headers=headers, **fields
        )

    async def _handle(self, exchange: Exchange) -> Reply:
        # The stages, in order: each returns None to go on, or the answer. Spelled out rather
        # than looped over: the checks that never wait are plain calls, and a route without a
        # recognizer skips that stage (a coroutine per stage per request is measurable).
        answer = self._check(exchange)
        if answer is None:
            answer = await self._find_route(exchange)
        if answer is None:
            answer = await self._authenticate(exchange)
        if answer is None and exchange.route is not None and exchange.route.recognizer is not None:
            answer = await self._recognize(exchange)
        if answer is None:
            answer = await self._decide(exchange)
        if answer is not None:
            return answer
        body: AsyncIterable[bytes] | bytes | None = exchange.body
        if body is None and exchange.request.body_exists:
            await exchange.request.send_continue()  # judged: now the body may come
            body = exchange.request.body()
        try:
            upstream = await self.open_upstream(exchange, body)
        except RequestBodyFailed as exc:
            if isinstance(exc.cause, RequestBodyError):
                # The client's upload stalled or broke off: answered (408, 400) and audited as
                # the client's failure, not as an upstream that failed.
                raise exc.cause from None
            return self.upstream_failed(exchange, exc)
        except UpstreamError as exc:
            return self.upstream_failed(exchange, exc)
        route = exchange.route
        if (
            route is not None
            and route.settings.hide_denied_tools
            and exchange.actions == ("mcp:tools/list",)
        ):
            return await self._relay_tools_list(exchange, upstream)
        return await self.relay(exchange, upstream, time.monotonic())

    def _may_call(self, exchange: Exchange, tool: str) -> bool:
        """Whether the policy could let this caller run `tool` (allow or approve) for some
        arguments; False only when it is denied whatever they are."""
        route = exchange.route
        identity = exchange.identity
        assert route is not None and identity is not None
        info = RequestInfo(
            "POST",
            exchange.path,
            route.settings.name,
            actions=(f"tool:{tool}",),
            headers=exchange.request.headers,
            query=exchange.query,
            fold_case=route.settings.case_insensitive_paths,
        )
        try:
            if self._policy.needs_body(info, identity):
                return True  # a rule on its arguments decides: it may be allowed
            return self._policy.evaluate(info, identity).action is not Action.DENY
        except (AmbiguousField, UnreadableBody):
            return True

    async def _relay_tools_list(self, exchange: Exchange, upstream: UpstreamResponse) -> Reply:
        """A tools/list answer without the tools this caller may never call (the route's
        `hide_denied_tools`). Read whole: a list of tools is small."""
        started = time.monotonic()
        request = exchange.request
        exchange.forwarded = True
        whole = bytearray()
        try:
            while chunk := await upstream.read():
                whole += chunk
                if len(whole) > self._max_body:
                    # Too big to rewrite here: sent as it is, what was read and then the rest.
                    headers = self._answer_headers(exchange, upstream, None)
                    await request.start(upstream.status, headers, reason=upstream.reason)
                    exchange.sent_status = upstream.status
                    await request.write(bytes(whole))
                    while chunk := await upstream.read():
                        await request.write(chunk)
                    await request.finish()
                    upstream.release()
                    return STREAMED
        except UpstreamError as exc:
            upstream.close()
            return self.upstream_failed(exchange, exc)
        upstream.release()
        filtered = filter_tools(bytes(whole), lambda tool: self._may_call(exchange, tool))
        body = bytes(whole) if filtered is None else filtered
        self._forwarded(exchange, started, upstream.status, len(body))
        return Answer(
            upstream.status,
            body,
            self._answer_headers(exchange, upstream, None),
            upstream.reason,
        )

    def _forwarded(
        self,
        exchange: Exchange,
        started: float,
        status: int,
        sent: int,
        *,
        approval_id: str | None = None,
        failure: str | None = None,
        grant_id: str | None = None,
    ) -> ChainPosition | None:
        """The upstream's answer went (or began to go) to the client: noted for the exchange's
        `request.completed`. A privileged request (approved, or let through by a grant) also
        gets its step event, `request.forwarded`; where that landed in the chained audit file
        is returned (receipts cite it)."""
        exchange.status = status
        exchange.bytes_sent = sent
        exchange.error = failure
        if approval_id is None and grant_id is None:
            return None
        exchange.approval_id = approval_id
        exchange.grant_id = grant_id
        return self._audit.emit(
            audit.REQUEST_FORWARDED,
            request_id=exchange.request_id,
            identity=exchange.identity_log(),
            method=exchange.request.method,
            path=exchange.path,
            route=exchange.route.settings.name if exchange.route else None,
            rule=exchange.rule,
            approval_id=approval_id,
            outcome="completed",
            status=status,
            bytes_sent=sent,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            error=failure,
            **({"actions": list(exchange.actions)} if exchange.actions else {}),
            **({"grant_id": grant_id} if grant_id is not None else {}),
        )

    # -- stages: each returns None to go on, or the answer --------------------------------

    def _check(self, exchange: Exchange) -> Reply | None:
        """What no route may receive: CONNECT, lower-case methods, method overrides, ambiguous
        paths."""
        request = exchange.request
        if request.method == "CONNECT":
            return self.refuse(
                exchange, 405, "method_not_allowed", message="CONNECT is not proxied"
            )
        expect = request.headers.get("Expect")
        if expect is not None and expect.strip().lower() != "100-continue":
            # RFC 9110 §10.1.1: an expectation the server does not understand is refused.
            return self.refuse(
                exchange,
                417,
                "expectation_failed",
                message=f"unknown expectation {expect!r}: only 100-continue is understood",
            )
        try:
            check_method(request.method)
            check_method_override_headers(request.headers)
            exchange.path = normalize_path(exchange.raw_path)
        except AmbiguousRequest as exc:
            # Not routed (the path cannot be trusted), but the route its prefix names, if
            # any, chooses how the refusal is said (AWS SDKs read AWS's error shapes).
            settings = self._routes.match_raw(exchange.raw_path)
            if settings is not None:
                exchange.route = self._route(settings)
            return self._ambiguous(exchange, exc.reason, exc.message)
        return None

    async def _find_route(self, exchange: Exchange) -> Reply | None:
        """The route by prefix. With no route the caller is still authenticated first (as a
        bearer), so an anonymous caller learns nothing about which prefixes exist."""
        settings = self._routes.match(exchange.path)
        if settings is None:
            answer = await self._authenticate(exchange)
            return answer or self.refuse(exchange, 404, "no_route", path=exchange.path)
        exchange.route = self._route(settings)
        if not settings.merge_slashes and "//" in exchange.raw_path:
            # The route keeps empty segments (S3 keys): judge and forward them as they are.
            try:
                exchange.path = normalize_path(exchange.raw_path, merge_slashes=False)
            except AmbiguousRequest as exc:
                return self._ambiguous(exchange, exc.reason, exc.message)
        return None

    async def _authenticate(self, exchange: Exchange) -> Reply | None:
        request = exchange.request
        route = exchange.route
        sources = route.settings.caller_credentials if route is not None else ("bearer",)
        if route is not None and route.sigv4 and exchange.body is None:
            answer = await self._read_body(exchange)
            if answer is not None:
                return answer
        try:
            authenticated = await self._authenticator.authenticate_request(
                sources,
                method=request.method,
                target=request.target,
                host=request.headers.get("Host", ""),
                headers=request.headers,
                body=exchange.body,
            )
        except AuthError as exc:
            if (route is not None and route.sigv4) or exc.status == 403:
                # As AWS does: a signature that does not verify is a 403 (an SDK shows it as
                # an access error, and does not retry it).
                return self.refuse(exchange, 403, "invalid_signature", message=exc.description)
            return self.refuse(exchange, 401, "unauthorized", message=exc.description)
        except IdentityUnavailable:
            return self.refuse(
                exchange, 503, "identity_unavailable", message="cannot verify tokens right now"
            )
        exchange.identity = authenticated.identity
        exchange.credential_headers = authenticated.credential_headers
        exchange.sigv4 = authenticated.sigv4
        pinned = route.settings.aws.service if route is not None and route.settings.aws else None
        if pinned and exchange.sigv4 is not None and exchange.sigv4.service != pinned:
            # Actions are named for the service the agent signed for, and the request is
            # re-signed for the route's: they must be one service, or what is judged is not
            # what runs.
            return self.refuse(
                exchange,
                403,
                "invalid_signature",
                message=f"this route forwards to {pinned}, but the request is signed for "
                f"{exchange.sigv4.service}; point the {exchange.sigv4.service} client at its "
                "own route",
            )
        return None

    async def _recognize(self, exchange: Exchange) -> Reply | None:
        """The actions the route's protocol names (`iam:CreateRole`, `tool:delete_repo`)."""
        route = exchange.route
        assert route is not None
        recognizer = route.recognizer
        assert recognizer is not None  # (`_handle` skips this stage without one)
        request = exchange.request
        if exchange.body is None and recognizer.needs_body(request.method):
            answer = await self._read_body(exchange)
            if answer is not None:
                return answer
        target = self.upstream_target(exchange)
        message = Message(
            method=request.method,
            path=upstream_path(route.settings, exchange.path),
            raw_path=target.partition("?")[0],
            query=exchange.query,
            headers=request.headers,
            body=exchange.body_view(),
            service=exchange.sigv4.service if exchange.sigv4 is not None else None,
        )
        if route.settings.protocol == "mcp":
            exchange.mcp_call = mcp_tool_call(request.headers, message.body)
        try:
            exchange.actions = await recognizer.recognize(message)
        except AmbiguousField as exc:
            return self._ambiguous(exchange, "repeated_field", exc.message)
        except (Unrecognized, UnreadableBody) as exc:
            return self.refuse(
                exchange, 400, "invalid_request", route=route.settings.name, message=exc.message
            )
        return None

    async def _decide(self, exchange: Exchange) -> Reply | None:
        """The policy's verdict: deny answers, approve hands over to the gate, allow goes on."""
        request = exchange.request
        route = exchange.route
        identity = exchange.identity
        assert route is not None and identity is not None
        info = RequestInfo(
            request.method,
            exchange.path,
            route.settings.name,
            actions=exchange.actions,
            headers=request.headers,
            query=exchange.query,
            body=exchange.body_view(),
            fold_case=route.settings.case_insensitive_paths,
        )
        try:
            if (
                info.body is None
                and request.body_exists
                and self._policy.needs_body(info, identity)
            ):
                answer = await self._read_body(exchange)
                if answer is not None:
                    return answer
                info.body = exchange.body_view()
            decision = self._policy.evaluate(info, identity)
        except AmbiguousField as exc:
            return self._ambiguous(exchange, "repeated_field", exc.message)
        except UnreadableBody as exc:
            return self.refuse(
                exchange,
                400,
                "invalid_request",
                route=route.settings.name,
                message=f"{exc.message}; a rule judges fields of this body, so it must be JSON",
            )
        exchange.rule = decision.rule
        # (`_value_`: the plain str, without the enum's `value` property call.)
        exchange.decision = decision.action._value_  # audited in `request.completed`
        if decision.action is Action.DENY:
            return self.refuse(
                exchange,
                403,
                "policy_denied",
                rule=decision.rule,
                route=info.route,
            )
        if decision.action is Action.APPROVE:
            if self._gate is None or decision.rule is None:
                # `policy.default: approve` names no approvers: nobody could ever decide.
                message = NO_APPROVERS_MESSAGE if decision.rule is None else None
                return self.refuse(
                    exchange,
                    503,
                    "approvals_unavailable",
                    rule=decision.rule,
                    route=info.route,
                    message=message,
                )
            return await self._gate.handle(self, exchange, self._policy.rule(decision.rule))
        return None

    # -- helpers of the stages -------------------------------------------------------------

    def _ambiguous(self, exchange: Exchange, reason: str, message: str) -> Answer:
        return self.refuse(exchange, 400, "ambiguous_request", reason=reason, message=message)

    async def _read_body(self, exchange: Exchange) -> Reply | None:
        """Read the whole body into `exchange.body`, bounded by `server.max_body_bytes`."""
        request = exchange.request
        if not request.body_exists:
            exchange.body = b""
            return None
        limit = self._max_body
        try:
            if (request.content_length or 0) > limit:
                raise BodyTooLarge
            await request.send_continue()  # judged worth reading: now the body may come
            body = bytearray()
            async for chunk in request.body():
                body += chunk
                if len(body) > limit:
                    raise BodyTooLarge
        except BodyTooLarge:
            return self.refuse(
                exchange,
                413,
                "payload_too_large",
                limit=limit,
                message=f"this request must be read whole to be judged, and may carry at most "
                f"{limit} bytes (server.max_body_bytes)",
            )
        exchange.body = bytes(body)
        return None

    def _upstream_headers(
        self,
        request: Incoming,
        route: _Route,
        request_id: str,
        *,
        held: bool,
        credential: frozenset[str] = frozenset(),
    ) -> list[tuple[str, str]]:
        """The headers sent upstream. For a `held` (approved) request, nothing may come from
        the client that its approval did not bind: `X-Forwarded-*` are the proxy's own (the
        peer, this listener's scheme, the host of `server.public_url` or none), never the
        client's `Host` or a trusted proxy's `Forwarded` / `X-Forwarded-*`."""
        headers = request.headers
        named = connection_named(headers) if "Connection" in headers else ()
        # A held request takes nothing from a trusted proxy's headers either: they are not
        # bound, so a re-send could change them (`Forwarded`, prior `X-Forwarded-*`).
        trusted = not held and self._is_trusted(request.remote)
        out: list[tuple[str, str]] = []
        for key, value in headers.items():
            lower = key.lower()
            if lower in _NOT_FORWARDED or lower in named or lower in route.inject_names:
                continue
            if lower in credential:  # the caller's credential never goes upstream
                continue
            # Ours, never the upstream's (nor bound); a client cannot forge our request id.
            if lower.startswith("countersign-"):
                continue
            if lower == "forwarded" and not trusted:
                continue
            out.append((key, value))
        peer = request.remote or ""
        prior_for = headers.get("X-Forwarded-For") if trusted else None
        scheme = request.scheme
        if held:
            forwarded_host = self._public_host
        else:
            forwarded_host = (
                headers.get("X-Forwarded-Host", request.host) if trusted else request.host
            )
        ours = [
            ("X-Forwarded-For", f"{prior_for}, {peer}" if prior_for else peer),
            ("X-Forwarded-Proto", headers.get("X-Forwarded-Proto", scheme) if trusted else scheme),
            *((("X-Forwarded-Host", forwarded_host),) if forwarded_host else ()),
            (COUNTERSIGN_REQUEST_ID_HEADER, request_id),
        ]
        # A route's injected header replaces ours of the same name, as it does the client's.
        if route.inject_names:
            ours = [item for item in ours if item[0].lower() not in route.inject_names]
        out.extend(ours)
        out.extend(route.inject)
        return out

    def _is_trusted(self, remote: str | None) -> bool:
        if not self._trusted or not remote:
            return False
        try:
            address = ipaddress.ip_address(remote)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    @staticmethod
    def upstream_target(exchange: Exchange) -> str:
        """The path and query the upstream is asked for: what the policy judged, and what an
        approval binds."""
        route = exchange.route
        assert route is not None
        return upstream_target(route.settings, exchange.path, exchange.query, exchange.raw_path)

    async def open_upstream(
        self,
        exchange: Exchange,
        body: AsyncIterable[bytes] | bytes | None,
        *,
        held: bool = False,
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> UpstreamResponse:
        """Send the request upstream (streamed, or the buffered bytes read to judge it or
        approved by a human) and return the response with its body unread. A `held` request
        is an approved one. Raises `UpstreamError`."""
        route = exchange.route
        assert route is not None
        target = route.origin + self.upstream_target(exchange)
        # A read body's Content-Length is set by the forwarder from the very bytes it sends.
        headers = self._upstream_headers(
            exchange.request,
            route,
            exchange.request_id,
            held=held,
            credential=exchange.credential_headers,
        )
        if route.signer is not None and exchange.sigv4 is not None:
            # AWS checks a signature over what it receives: sign exactly that, with the route's
            # real credentials (the agent never holds them).
            signed_body = body if isinstance(body, bytes) else (exchange.body or b"")
            try:
                headers = await route.signer.sign(
                    method=exchange.request.method,
                    url=target,
                    headers=headers,
                    body=signed_body,
                    service=exchange.sigv4.service,
                    payload=exchange.sigv4.payload,
                )
            except AwsCredentialsUnavailable as exc:
                raise UpstreamUnavailable(f"cannot sign for AWS: {exc}") from None
            if body is None and signed_body:
                body = signed_body
        return await self._forwarder.send(
            exchange.request.method,
            target,
            headers,
            body,
            read_timeout=route.settings.timeout_seconds or self._read_timeout,
            before_send=before_send,
            upgrade=_websocket(exchange.request),
        )

    def upstream_failed(self, exchange: Exchange, exc: UpstreamError, **fields: Any) -> Answer:
        """The 502/504 for an upstream that failed. After an approved request was sent, the
        agent is told it may have run and that a retry needs a new approval."""
        route = exchange.route.settings.name if exchange.route else None
        self._metrics.upstream_error(route or NO_ROUTE, exc.code.removeprefix("upstream_"))
        approval_id = fields.get("approval_id")
        if approval_id is not None and exchange.claimed:
            # The approved request may have run: its execution's step event says so.
            self._audit.emit(
                audit.REQUEST_FORWARDED,
                request_id=exchange.request_id,
                identity=exchange.identity_log(),
                method=exchange.request.method,
                path=exchange.path,
                route=route,
                rule=exchange.rule,
                approval_id=approval_id,
                outcome="ambiguous",
                status=None,
                bytes_sent=0,
                error=exc.code,
                **({"actions": list(exchange.actions)} if exchange.actions else {}),
            )
        message = str(exc)
        if fields.get("approval_id") is not None and not exchange.claimed:
            message = (
                f"The upstream could not be reached ({message or exc.code}); nothing was sent "
                "and the approval is still unused: send the identical request again."
            )
        elif fields.get("approval_id") is not None:
            message = (
                f"The upstream failed on the approved request ({message or exc.code})"
                ": it may or may not have run. Check its effect before retrying; a retry needs a "
                "new approval."
            )
        return self.refuse(
            exchange,
            exc.status,
            exc.code,
            route=route,
            rule=exchange.rule,
            message=message,
            **fields,
        )

    @staticmethod
    def _answer_headers(
        exchange: Exchange,
        upstream: UpstreamResponse,
        approval_id: str | None,
        receipt_url: str | None = None,
        grant_id: str | None = None,
    ) -> list[tuple[str, str]]:
        """The upstream's headers as it sent them (its own `X-Request-Id` included), plus ours:
        `Countersign-Request-Id`, `Countersign-Approval-Id`, `Countersign-Receipt` and
        `Countersign-Grant-Id` — only Countersign says these, never the upstream."""
        headers = [item for item in upstream.headers if item[0].lower() not in _OURS]
        headers.append((COUNTERSIGN_REQUEST_ID_HEADER, exchange.request_id))
        if approval_id is not None:
            headers.append((APPROVAL_ID_HEADER, approval_id))
        if receipt_url is not None:
            headers.append((RECEIPT_HEADER, receipt_url))
        if grant_id is not None:
            headers.append((GRANT_ID_HEADER, grant_id))
        return headers

    async def relay(
        self,
        exchange: Exchange,
        upstream: UpstreamResponse,
        started: float,
        *,
        approval_id: str | None = None,
        streaming: bool = False,
        receipt: ReceiptTicket | None = None,
        grant_id: str | None = None,
    ) -> Reply:
        """Send the upstream's answer back to the client, then audit `request.forwarded`.

        `streaming`: an SSE answer is already under way (an MCP call held while a human
        decided): the upstream's answer continues it as SSE events. With a `receipt` (an
        approved request, receipts on) the answer names its receipt, and the SHA-256 of the body
        bytes relayed (when streaming: of the upstream's body) goes into it once relayed."""
        request = exchange.request
        exchange.forwarded = True
        if upstream.status == 101:
            return await self._tunnel(
                exchange, upstream, started, approval_id=approval_id, grant_id=grant_id
            )
        has_body = request.method != "HEAD" and upstream.status not in _NO_BODY_STATUSES
        reply: Reply = STREAMED
        sent = 0
        failure: str | None = None
        digest = hashlib.sha256() if receipt is not None else None
        receipt_url = receipt.url if receipt is not None else None
        try:
            if streaming:
                streamed = any(
                    name.lower() == "content-type" and "text/event-stream" in value
                    for name, value in upstream.headers
                )
                if streamed:  # already SSE: the bytes go on as they come
                    while chunk := await upstream.read():
                        await request.write(chunk)
                        sent += len(chunk)
                        if digest is not None:
                            digest.update(chunk)
                else:
                    whole = bytearray()
                    while chunk := await upstream.read():
                        whole += chunk
                    await request.write(sse_data(bytes(whole)))
                    sent = len(whole)
                    if digest is not None:
                        digest.update(whole)
                await request.finish()
            elif has_body and upstream.body_complete:
                # The whole (small) answer is in already: status, headers and body leave in
                # one write, where streaming would take two.
                body = upstream.read_all()
                headers = self._answer_headers(
                    exchange, upstream, approval_id, receipt_url, grant_id
                )
                answer = Answer(upstream.status, body, headers, upstream.reason)
                if approval_id is None and grant_id is None:
                    reply = answer  # sent by `handle` as this returns
                else:  # sent before its audit line is synced, as a streamed one is
                    await request.respond(answer)
                    exchange.sent_status = upstream.status
                sent = len(body)
                if digest is not None:
                    digest.update(body)
            else:
                headers = self._answer_headers(
                    exchange, upstream, approval_id, receipt_url, grant_id
                )
                await request.start(
                    upstream.status,
                    headers,
                    reason=upstream.reason,
                    content_length=upstream.content_length,
                )
                exchange.sent_status = upstream.status
                if has_body:
                    while chunk := await upstream.read():
                        await request.write(chunk)
                        sent += len(chunk)
                        if digest is not None:
                            digest.update(chunk)
                await request.finish()
            upstream.release()  # fully read: the connection goes back to the pool
        except UpstreamError as exc:
            # The status line is already sent, so the only honest signal left is to cut the
            # client's connection: it sees a truncated body, never a complete-looking one.
            failure = exc.code
            route_name = exchange.route.settings.name if exchange.route else NO_ROUTE
            self._metrics.upstream_error(route_name, "truncated")
            upstream.close()
            request.abort()
        except (ConnectionError, asyncio.CancelledError):
            failure = "client_disconnected"
            upstream.close()
            raise  # the front drops the connection quietly
        finally:
            position = self._forwarded(
                exchange,
                started,
                upstream.status,
                sent,
                approval_id=approval_id,
                failure=failure,
                grant_id=grant_id,
            )
            if receipt is not None and digest is not None:
                # In the background, once the line it cites is on disk (also when the client
                # left mid-body: the request ran and the upstream answered).
                receipt.issue(
                    Relayed(upstream.status, digest.hexdigest(), sent, failure is None, position)
                )
        if approval_id is not None or grant_id is not None:
            # An approved request's execution is on disk before its exchange is over. (The
            # answer has been relayed already or is about to be; a failing disk is logged by
            # the sink.)
            with contextlib.suppress(AuditUnavailable):
                await self._audit.sync()
        return reply

    async def _tunnel(
        self,
        exchange: Exchange,
        upstream: UpstreamResponse,
        started: float,
        *,
        approval_id: str | None,
        grant_id: str | None,
    ) -> Reply:
        """The upstream accepted a WebSocket handshake (`101`): the client gets the upstream's
        `101` and the bytes go both ways until either side closes. Audited when it opens
        (`websocket.opened`) and when it closes (`websocket.closed`, with byte counts); the
        frames themselves are not judged — the handshake was."""
        request = exchange.request
        upstream_end = upstream.tunnel()
        headers = self._answer_headers(exchange, upstream, approval_id, None, grant_id)
        headers += [("Connection", "Upgrade"), ("Upgrade", "websocket")]  # (only one tunnelled)
        try:
            client_end = await request.switch(headers)
        except BaseException:
            upstream_end.abort()
            raise
        exchange.sent_status = exchange.status = 101
        route = exchange.route.settings.name if exchange.route else None
        common = {
            "request_id": exchange.request_id,
            "identity": exchange.identity_log(),
            "path": exchange.path,
            "route": route,
            "rule": exchange.rule,
            **({"approval_id": approval_id} if approval_id is not None else {}),
            **({"grant_id": grant_id} if grant_id is not None else {}),
        }
        self._audit.emit(audit.WEBSOCKET_OPENED, **common)
        opened = time.monotonic()
        failure: str | None = None
        try:
            await relay_both_ways(client_end, upstream_end)
        except asyncio.CancelledError:
            failure = "cancelled"
            client_end.abort()
            upstream_end.abort()
            raise
        finally:
            self._audit.emit(
                audit.WEBSOCKET_CLOSED,
                **common,
                bytes_from_client=client_end.bytes_in,
                bytes_to_client=client_end.bytes_out,
                duration_ms=round((time.monotonic() - opened) * 1000, 3),
                error=failure,
            )
            self._forwarded(
                exchange,
                started,
                101,
                client_end.bytes_out,
                approval_id=approval_id,
                failure=failure,
                grant_id=grant_id,
            )
        return STREAMED


def _websocket(request: Incoming) -> str | None:
    """`websocket` when the request is a WebSocket handshake this front can tunnel (RFC 6455:
    a GET asking to switch); other upgrades go as plain requests, without the switch."""
    if request.upgrade == "websocket" and request.method == "GET":
        return "websocket"
    return None
