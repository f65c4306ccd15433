"""`countersign explain`: which route and rule a request would meet, and why — without serving.

It runs the same normalization, routing and policy code as the server, so what it prints is
what the proxy would do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .config import Settings
from .model import Identity, RequestInfo
from .paths import AmbiguousRequest, normalize_path
from .policy import Explanation, Policy
from .routing import RouteTable
from .server.responses import error_body


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
    lines = [f"request:  {method} {raw_path}"]
    raw_path, _, _query = raw_path.partition("?")
    try:
        path = normalize_path(raw_path)
    except AmbiguousRequest as exc:
        lines.append(f"refused:  400 ambiguous_request ({exc.reason}): {exc.message}")
        return "\n".join(lines), None
    if path != raw_path:
        lines.append(f"normalized path: {path}")
    identity = Identity(
        subject=subject,
        issuer="explain",
        email=email,
        groups=groups,
        claims={"sub": subject, "groups": sorted(groups), **(claims or {})},
    )
    lines.append(
        f"identity: subject={subject} groups=[{', '.join(sorted(groups))}]"
        + (f" email={email}" if email else "")
    )
    route = RouteTable(settings.routes).match(path)
    if route is None:
        prefixes = ", ".join(r.prefix for r in settings.routes) or "(none)"
        lines.append(f"route:    none matches (prefixes: {prefixes})")
        lines.append("outcome:  404 no_route")
        return "\n".join(lines), None
    lines.append(f"route:    {route.name} (prefix {route.prefix} → {route.upstream})")
    explanation = Policy.compile(settings.policy).explain(
        RequestInfo(method=method, path=path, route=route.name), identity
    )
    lines.append("rules:")
    for step in explanation.trace:
        if not step.evaluated:
            continue  # first match wins: later rules are never looked at
        mark = "✔" if step.matched else "✘"
        lines.append(f"  {mark} {step.rule}: {step.reason}")
    decision = explanation.decision
    lines.append(
        f"decision: {decision.action.value}"
        + (f" by rule {decision.rule}" if decision.rule else " (default)")
        + f" — {decision.reason}"
    )
    lines.append(f"outcome:  {_outcome(decision.action.value, decision.rule, route.name)}")
    return "\n".join(lines), explanation


def _outcome(action: str, rule: str | None, route: str) -> str:
    if action == "allow":
        return "forwarded to the upstream"
    if action == "deny":
        return f"403 {json.dumps(error_body(403, 'policy_denied', rule=rule, route=route))}"
    return "held for approval by a human"
