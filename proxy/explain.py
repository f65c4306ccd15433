"""`countersign explain`: which route and rule a request would meet, and why — without serving.

It runs the same normalization, routing and policy code as the server, so what it prints is
what the proxy would do: the route and the URL the request would be forwarded to, every rule
before the deciding one with the first condition it failed, the decision and, for an approve
rule, who may approve, how many must and for how long.

Exit codes of `countersign explain` (`Explained.exit_code`): 0 allow, 1 deny (also a request
refused before the policy: 400 ambiguous_request, 404 no_route), 3 approve.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from multidict import CIMultiDict

from .config import RouteSettings, RuleSettings, Settings
from .model import Action, AmbiguousField, Identity, RequestBody, RequestInfo, UnreadableBody
from .paths import AmbiguousRequest, normalize_path
from .policy import Explanation, Policy
from .protocols import Message, Unrecognized, recognizer_for
from .routing import RouteTable, upstream_path, upstream_target
from .server.responses import NO_APPROVERS_MESSAGE, error_body

__all__ = ["EXIT_ALLOW", "EXIT_APPROVE", "EXIT_DENY", "Explained", "explain", "explain_request"]

EXIT_ALLOW = 0
EXIT_DENY = 1
EXIT_APPROVE = 3
_EXIT = {Action.ALLOW: EXIT_ALLOW, Action.DENY: EXIT_DENY, Action.APPROVE: EXIT_APPROVE}
DEFAULT_RULE = "default (no rule matched)"


@dataclass(frozen=True)
class Explained:
    """What the proxy would do with one request, and why."""

    method: str
    raw_path: str
    query: str
    subject: str
    groups: frozenset[str]
    email: str | None
    path: str | None = None  # normalized; None when refused as ambiguous
    route: RouteSettings | None = None
    upstream_url: str | None = None
    explanation: Explanation | None = None  # None when refused before the policy
    rule: RuleSettings | None = None  # the deciding rule; None: the default (or no decision)
    timeout_seconds: int | None = None  # of an approval the deciding rule asks for
    refusal: tuple[int, dict[str, Any]] | None = None  # (status, body) the proxy answers with
    refused_as: str | None = None  # a readable reason for a refusal before the policy
    routes: tuple[RouteSettings, ...] = field(default=())
    actions: tuple[str, ...] = ()  # what the route's protocol named (or --action gave)

    @property
    def action(self) -> Action | None:
        return None if self.explanation is None else self.explanation.decision.action

    @property
    def exit_code(self) -> int:
        action = self.action
        return EXIT_DENY if action is None else _EXIT[action]

    def reasons(self) -> list[tuple[str, str]]:
        """(rule, why it did not match) for every rule looked at before the deciding one."""
        if self.explanation is None:
            return []
        return [
            (step.rule, step.reason)
            for step in self.explanation.trace
            if step.evaluated and not step.matched
        ]

    def matched(self) -> str | None:
        """Why the deciding rule matched (None: the default decided)."""
        if self.explanation is None:
            return None
        return next((s.reason for s in self.explanation.trace if s.matched), None)

    def outcome(self) -> str:
        """What the client would get."""
        if self.refusal is not None:
            status, body = self.refusal
            return f"{status} {json.dumps(body)}"
        action = self.action
        if action is Action.ALLOW:
            return f"forwarded to {self.upstream_url}"
        if action is Action.APPROVE and self.rule is not None:
            return f"held for approval by a human, then forwarded to {self.upstream_url}"
        return "(none)"

    # -- rendering ---------------------------------------------------------------------------

    def text(self) -> str:
        """The readable report `countersign explain` prints."""
        lines = [f"request:  {self.method} {self.raw_path}"]
        if self.path is None:
            lines.append(f"refused:  {self.refused_as}")
            lines.append(f"outcome:  {self.outcome()}")
            return "\n".join(lines)
        if self.path != self.raw_path.partition("?")[0]:
            lines.append(f"normalized path: {self.path}")
        lines.append(
            f"identity: subject={self.subject} groups=[{', '.join(sorted(self.groups))}]"
            + (f" email={self.email}" if self.email else "")
        )
        if self.route is None:
            prefixes = ", ".join(r.prefix for r in self.routes) or "(none)"
            lines.append(f"route:    none matches (prefixes: {prefixes})")
            lines.append(f"outcome:  {self.outcome()}")
            return "\n".join(lines)
        lines.append(f"route:    {self.route.name} (prefix {self.route.prefix})")
        lines.append(f"upstream: {self.upstream_url}")
        if self.actions:
            lines.append(f"actions:  {', '.join(self.actions)}")
        if self.explanation is None:
            lines.append(f"refused:  {self.refused_as}")
            lines.append(f"outcome:  {self.outcome()}")
            return "\n".join(lines)
        lines.append("rules:")
        if not self.explanation.trace:
            lines.append("  (none)")
        for step in self.explanation.trace:
            if not step.evaluated:
                continue  # first match wins: later rules are never looked at
            mark = "✔" if step.matched else "✘"
            lines.append(f"  {mark} {step.rule}: {step.reason}")
        decision = self.explanation.decision
        if decision.rule is None:
            lines.append(f"decision: {decision.action.value} by {DEFAULT_RULE}")
        else:
            lines.append(
                f"decision: {decision.action.value} by rule {decision.rule} — {decision.reason}"
            )
        if decision.action is Action.APPROVE:
            lines.append(f"approval: {self._approval_text()}")
        lines.append(f"outcome:  {self.outcome()}")
        return "\n".join(lines)

    def _approval_text(self) -> str:
        rule = self.rule
        if rule is None:
            return "no approvers (policy.default has none): answered 503"
        approvers = rule.approvers
        groups = _listing(approvers.groups) if approvers else "[]"
        users = _listing(approvers.users) if approvers else "[]"
        return (
            f"approvers groups {groups}, users {users}; quorum {rule.quorum}; "
            f"timeout {self.timeout_seconds}s"
        )

    def as_json(self) -> dict[str, Any]:
        """The same information as one JSON object (`countersign explain --json`)."""
        rule = self.rule
        approvers = rule.approvers if rule is not None else None
        action = self.action
        decision = self.explanation.decision if self.explanation is not None else None
        return {
            "request": {
                "method": self.method,
                "path": self.raw_path.partition("?")[0],
                "query": self.query,
                "normalized_path": self.path,
            },
            "identity": {
                "subject": self.subject,
                "groups": sorted(self.groups),
                "email": self.email,
            },
            "route": (
                None
                if self.route is None
                else {
                    "name": self.route.name,
                    "prefix": self.route.prefix,
                    "upstream": self.route.upstream,
                }
            ),
            "upstream_url": self.upstream_url,
            "actions": list(self.actions),
            "action": None if action is None else action.value,
            "rule": None if decision is None else decision.rule,
            "default": decision is not None and decision.rule is None,
            "decision_reason": None if decision is None else decision.reason,
            "matched": self.matched(),
            "reasons": [{"rule": name, "why": why} for name, why in self.reasons()],
            "approvers": (
                None
                if approvers is None
                else {"groups": list(approvers.groups), "users": list(approvers.users)}
            ),
            "quorum": rule.quorum if rule is not None and approvers is not None else None,
            "timeout_seconds": self.timeout_seconds,
            "refused": (
                None
                if self.refusal is None
                else {"status": self.refusal[0], "body": self.refusal[1]}
            ),
            "outcome": self.outcome(),
            "exit_code": self.exit_code,
        }

    def json_text(self) -> str:
        return json.dumps(self.as_json(), ensure_ascii=False)


def _listing(items: Any) -> str:
    return "[" + ", ".join(str(item) for item in items) + "]"


def forwarded_url(
    route: RouteSettings, path: str, query: str = "", raw_path: str | None = None
) -> str:
    """The URL the proxy would request upstream for the normalized `path` on `route`."""
    parts = urlsplit(route.upstream)
    return f"{parts.scheme}://{parts.netloc}{upstream_target(route, path, query, raw_path)}"


def _run(coroutine: Any) -> Any:
    """Run a recognizer's coroutine to its end from synchronous code (a thread of its own when
    the caller already runs an event loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _recognized(
    route: RouteSettings,
    method: str,
    path: str,
    raw_path: str,
    query: str,
    headers: CIMultiDict[str],
    body: RequestBody | None,
    aws_service: str | None,
) -> tuple[str, ...]:
    """The actions the route's protocol names for this request, as the proxy would."""
    assert route.protocol is not None
    service = aws_service or (route.aws.service if route.aws is not None else None)
    if route.protocol == "aws" and service is None:
        raise Unrecognized(
            "name the AWS service the agent signs for with --aws-service (e.g. iam, s3), or "
            "the actions with --action"
        )
    target = upstream_target(route, path, query, raw_path).partition("?")[0]
    message = Message(
        method=method,
        path=upstream_path(route, path),
        raw_path=target,
        query=query,
        headers=headers,
        body=body,
        service=service,
    )
    actions: tuple[str, ...] = _run(recognizer_for(route.protocol).recognize(message))
    return actions


def explain_request(
    settings: Settings,
    method: str,
    raw_path: str,
    *,
    subject: str,
    groups: frozenset[str] = frozenset(),
    email: str | None = None,
    claims: Mapping[str, Any] | None = None,
    policy: Policy | None = None,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
    actions: Sequence[str] | None = None,
    aws_service: str | None = None,
) -> Explained:
    """What the proxy would do with `method raw_path` from this identity (nothing is served).

    `headers` and `body` are the request's, for the conditions and the route's protocol that
    read them; `actions` names the actions outright instead of recognizing them (an AWS route
    needs `aws_service`, the service the agent signs for, to recognize them itself).
    """
    path_only, _, query = raw_path.partition("?")
    base = Explained(
        method=method,
        raw_path=raw_path,
        query=query,
        subject=subject,
        groups=groups,
        email=email,
        routes=settings.routes,
    )
    try:
        path = normalize_path(path_only)
    except AmbiguousRequest as exc:
        return replace(
            base,
            refused_as=f"400 ambiguous_request ({exc.reason}): {exc.message}",
            refusal=(
                400,
                error_body(400, "ambiguous_request", reason=exc.reason, message=exc.message),
            ),
        )
    route = RouteTable(settings.routes).match(path)
    if route is None:
        return replace(base, path=path, refusal=(404, error_body(404, "no_route", path=path)))
    if not route.merge_slashes and "//" in path_only:
        path = normalize_path(path_only, merge_slashes=False)
    header_view: CIMultiDict[str] = CIMultiDict(headers)
    request_body = None if body is None else RequestBody(body, header_view.get("Content-Type"))
    base = replace(
        base,
        path=path,
        route=route,
        upstream_url=forwarded_url(route, path, query, path_only),
    )

    def refused(status: int, code: str, message: str, reason: str | None = None) -> Explained:
        return replace(
            base,
            refused_as=f"{status} {code}: {message}",
            refusal=(status, error_body(status, code, message=message, reason=reason)),
        )

    found: tuple[str, ...] = tuple(actions or ())
    if actions is None and route.protocol is not None:
        try:
            found = _recognized(
                route, method, path, path_only, query, header_view, request_body, aws_service
            )
        except AmbiguousField as exc:
            return refused(400, "ambiguous_request", exc.message, "repeated_field")
        except (Unrecognized, UnreadableBody) as exc:
            return refused(400, "invalid_request", exc.message)
    base = replace(base, actions=found)
    identity = Identity(
        subject=subject,
        issuer="explain",
        email=email,
        groups=groups,
        claims={"sub": subject, "groups": sorted(groups), **(claims or {})},
    )
    policy = policy or Policy.compile(settings.policy)
    info = RequestInfo(
        method,
        path,
        route.name,
        actions=found,
        headers=header_view,
        query=query,
        body=request_body,
        fold_case=route.case_insensitive_paths,
    )
    try:
        explanation = policy.explain(info, identity)
    except AmbiguousField as exc:
        return refused(400, "ambiguous_request", exc.message, "repeated_field")
    except UnreadableBody as exc:
        return refused(400, "invalid_request", exc.message)
    decision = explanation.decision
    rule = None if decision.rule is None else policy.rule(decision.rule)
    refusal: tuple[int, dict[str, Any]] | None = None
    timeout: int | None = None
    if decision.action is Action.DENY:
        refusal = (403, error_body(403, "policy_denied", rule=decision.rule, route=route.name))
    elif decision.action is Action.APPROVE:
        if rule is None:
            refusal = (
                503,
                error_body(
                    503, "approvals_unavailable", route=route.name, message=NO_APPROVERS_MESSAGE
                ),
            )
        else:
            timeout = rule.timeout_seconds or settings.approvals.timeout_seconds
    return replace(
        base,
        explanation=explanation,
        rule=rule,
        timeout_seconds=timeout,
        refusal=refusal,
    )


def explain(
    settings: Settings,
    method: str,
    raw_path: str,
    *,
    subject: str,
    groups: frozenset[str] = frozenset(),
    email: str | None = None,
    claims: Mapping[str, Any] | None = None,
) -> tuple[str, Explanation | None]:
    """A printable report, and the policy's explanation (None when refused before policy)."""
    explained = explain_request(
        settings, method, raw_path, subject=subject, groups=groups, email=email, claims=claims
    )
    return explained.text(), explained.explanation
