"""Policy evaluation benchmark: µs per `Policy.evaluate` with 1,000 and 10,000 rules.

Run from the repository root:  python bench/bench_policy.py

The rule sets look like a large real deployment: a few dozen routes, per-tenant and per-project
rules with literal and glob paths ('*', '**', '*.json'), method lists, and `when` conditions on
groups, subjects and claims. Three request kinds are timed:

- early: matches one of the first rules;
- late: matches only one of the last rules (the path also matches many earlier rules whose
  method, route or identity conditions fail);
- none: matches no rule (the default applies) although its path walks deep into the trie.

Each figure is the best of several rounds (less noise from the machine), single thread.
"""

from __future__ import annotations

import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.config import (
    ApproversSettings,
    PolicySettings,
    RuleSettings,
    WhenSettings,
)
from proxy.model import Action, Identity, RequestInfo
from proxy.policy import Policy

ROUTES = [
    "cloud",
    "db",
    "github",
    "k8s",
    "billing",
    "crm",
    "search",
    "storage",
    "mail",
    "analytics",
    "iam",
    "vault",
    "ci",
    "wiki",
    "tickets",
    "payments",
    "hr",
    "ml",
    "cdn",
    "dns",
]
RESOURCES = ["projects", "users", "buckets", "tables", "repos", "clusters", "invoices", "models"]
METHOD_SETS = [("GET", "HEAD"), ("POST",), ("PUT", "PATCH"), ("DELETE",), ("POST", "PUT"), ()]
GROUPS = ["agents", "ci", "data-owners", "sre", "finance", "support", "ml-team", "admins"]
APPROVERS = ApproversSettings(groups=("data-owners",))


def build_rules(n: int) -> list[RuleSettings]:
    rules: list[RuleSettings] = [
        RuleSettings(
            name="reads", methods=("GET", "HEAD"), paths=("/cloud/public/**",), action=Action.ALLOW
        ),
        RuleSettings(name="health", paths=("/*/healthz",), action=Action.ALLOW),
    ]
    i = 0
    while len(rules) < n - 2:
        route = ROUTES[i % len(ROUTES)]
        resource = RESOURCES[(i // len(ROUTES)) % len(RESOURCES)]
        tenant = f"t{i // (len(ROUTES) * len(RESOURCES))}"
        methods = METHOD_SETS[i % len(METHOD_SETS)]
        kind = i % 8
        if kind == 0:
            paths: tuple[str, ...] = (f"/{route}/{tenant}/{resource}/*/exports/**",)
        elif kind == 1:
            paths = (f"/{route}/{tenant}/{resource}/*",)
        elif kind == 2:
            paths = (f"/{route}/{tenant}/{resource}/*/config/*.json",)
        elif kind == 3:
            paths = (f"/{route}/{tenant}/{resource}/{i}", f"/{route}/{tenant}/{resource}/{i}/**")
        elif kind == 4:
            paths = (f"/{route}/**/{resource}/admin",)
        elif kind == 5:
            paths = (f"/{route}/{tenant}/**",)
        elif kind == 6:
            paths = (f"/{route}/v1/{resource}/{tenant}-*",)
        elif i % 5 == 0:
            paths = ()  # any path, e.g. a team's blanket rule
        else:
            paths = (f"/{route}/**",)
        when = None
        if kind == 7:
            when = WhenSettings(groups=(f"team-{i}",))  # broad path, narrow identity
        elif i % 3 == 0:
            when = WhenSettings(groups=(GROUPS[i % len(GROUPS)], GROUPS[(i + 3) % len(GROUPS)]))
        elif i % 11 == 0:
            when = WhenSettings(subjects=(f"agent-{i}", f"agent-{i + 1}"))
        elif i % 13 == 0:
            when = WhenSettings(claims={"tier": ("gold", "platinum"), "act.sub": f"user{i}"})
        action = (Action.ALLOW, Action.DENY, Action.APPROVE)[i % 3]
        rules.append(
            RuleSettings(
                name=f"r{i}",
                route=route if i % 2 == 0 else None,
                methods=methods,
                paths=paths,
                when=when,
                action=action,
                approvers=APPROVERS if action is Action.APPROVE else None,
            )
        )
        i += 1
    # The late target: only these match the "late" request.
    rules.append(
        RuleSettings(
            name="late-target",
            route="cloud",
            methods=("POST",),
            paths=("/cloud/zz/projects/*/exports/**",),
            when=WhenSettings(groups=("late-group",)),
            action=Action.APPROVE,
            approvers=APPROVERS,
        )
    )
    rules.append(RuleSettings(name="catch-deletes", methods=("DELETE",), action=Action.DENY))
    return rules


def bench(policy: Policy, request: RequestInfo, identity: Identity, rounds: int = 7) -> float:
    evaluate = policy.evaluate
    loops = 20_000
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(loops):
            evaluate(request, identity)
        best = min(best, (time.perf_counter() - start) / loops)
    return best * 1e6


def mixed_requests(count: int, seed: int = 7) -> list[RequestInfo]:
    """Realistic traffic: every route, many tenants and ids, all methods (mostly cache-warm)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        route = rng.choice(ROUTES)
        parts = [route, f"t{rng.randrange(80)}", rng.choice(RESOURCES), f"id{rng.randrange(10**6)}"]
        parts += rng.choice([[], ["exports", f"e{rng.randrange(1000)}"], ["config", "a.json"]])
        if rng.random() < 0.2:
            parts = [route, "v1", rng.choice(RESOURCES), f"t{rng.randrange(80)}-{rng.random()}"]
        method = rng.choice(["GET", "GET", "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
        out.append(RequestInfo(method, "/" + "/".join(parts), route))
    return out


def bench_mixed(policy: Policy, requests: list[RequestInfo], identity: Identity) -> float:
    evaluate = policy.evaluate
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for request in requests:
            evaluate(request, identity)
        best = min(best, (time.perf_counter() - start) / len(requests))
    return best * 1e6


def bench_cold(rules: list[RuleSettings], request: RequestInfo, identity: Identity) -> float:
    """The first evaluation after compiling (nothing memoized yet)."""
    best = float("inf")
    for _ in range(3):
        policy = Policy.compile(PolicySettings(default=Action.DENY, rules=tuple(rules)))
        start = time.perf_counter()
        policy.evaluate(request, identity)
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def main() -> None:
    print(f"Python {platform.python_version()} on {platform.machine()}, {platform.processor()}")
    identity = Identity(
        subject="agent-7",
        issuer="https://idp.example.com",
        groups=frozenset({"agents", "ci", "late-group", "g1", "g2", "g3"}),
        claims={"tier": "silver", "act": {"sub": "alice"}},
    )
    requests = {
        "early": RequestInfo("GET", "/cloud/public/docs/readme.md", "cloud"),
        "late": RequestInfo("POST", "/cloud/zz/projects/p1/exports/e2/data", "cloud"),
        "none": RequestInfo("PATCH", "/cloud/zz/projects/p1/exports/e2/data", "cloud"),
    }
    for n in (1_000, 10_000):
        rules = build_rules(n)
        start = time.perf_counter()
        policy = Policy.compile(PolicySettings(default=Action.DENY, rules=tuple(rules)))
        compile_ms = (time.perf_counter() - start) * 1e3
        print(f"\n{n:,} rules (compiled in {compile_ms:.0f} ms)")
        for label, request in requests.items():
            decision = policy.evaluate(request, identity)
            candidates = len(policy.path_candidates(request.path))
            us = bench(policy, request, identity)
            print(
                f"  {label:<6} {us:6.2f} µs/eval  -> {decision.action.value:<7} "
                f"rule={decision.rule}  ({candidates} rules match the path alone)"
            )
        mixed = mixed_requests(20_000)
        us = bench_mixed(policy, mixed, identity)
        print(f"  mixed  {us:6.2f} µs/eval  ({len(mixed):,} distinct requests, all routes)")
        us = bench_cold(rules, requests["late"], identity)
        print(f"  cold   {us:6.2f} µs for the first evaluation after compiling (late request)")


if __name__ == "__main__":
    main()
