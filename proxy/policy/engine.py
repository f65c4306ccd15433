"""The policy engine: ordered rules, first match wins, compiled once; per action, strictest wins.

Every condition kind (conditions/) compiles the rules into bitmasks over rule indices (rule i
of n is bit n-1-i, so the first rule is the highest bit: `int.bit_length()` finds it in O(1)).
Evaluating a request starts from all rules and ANDs, condition by condition in the registry's
order, the mask of the rules that pass; the highest set bit left is the first rule matching. It
stops as soon as the answer is known: when no rule is left, or when the first rule left is
constrained by none of the conditions still to come (nothing can remove it any more; see
`_Plan`). A request costs about one dict lookup per path segment and a handful of integer
operations, whatever the number of rules (bench/bench_policy.py).

A request naming several actions (a JSON-RPC batch, a GraphQL document with several root fields)
is judged once per action; the strictest outcome wins (deny > approve > allow), the earliest
rule among equally strict ones, and an action no rule matches contributes the default.

`explain` runs the very same loop and keeps the masks it computed: a rule matched iff its bit
survived them all; for a rule that did not, the first mask without its bit names the condition
that ruled it out, and the condition module only supplies the words.

`needs_body` answers, before the body is read, whether the decision could depend on it: it runs
the loop with the body-free conditions only and looks at the first rule left.

Pure code: no I/O, no aiohttp, no Redis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..model import Action, Decision, Identity, RequestInfo
from .conditions import CONDITIONS, Condition, PathsCondition
from .conditions.base import MaskFn, first_rule, has_rule

if TYPE_CHECKING:
    from ..config import PolicySettings, RuleSettings

__all__ = ["Explanation", "Policy", "RuleTrace"]

# Outcomes of several actions: the strictest wins.
_STRICTNESS = {Action.DENY: 0, Action.APPROVE: 1, Action.ALLOW: 2}

# One step of an evaluation: its condition's mask, and its stop table (None: no stop test).
Step = tuple[MaskFn, "bytes | None"]

_BYTES_01 = bytes.maketrans(b"01", b"\x00\x01")


@dataclass(frozen=True, slots=True)
class RuleTrace:
    """One rule's outcome in `Policy.explain`.

    `evaluated` is False for the rules after the first match (first match wins, they are not
    looked at).
    """

    rule: str
    matched: bool
    reason: str
    evaluated: bool = True


@dataclass(frozen=True, slots=True)
class Explanation:
    """The decision and, rule by rule up to the first match, why.

    For a request naming actions, the trace is the one of `action`, the action that decided.
    """

    decision: Decision
    trace: list[RuleTrace]
    action: str | None = None

    def render(self) -> str:
        """A readable multi-line report (what `countersign explain` prints)."""
        evaluated = [t for t in self.trace if t.evaluated]
        width = max((len(t.rule) for t in evaluated), default=0)
        lines = []
        if self.action is not None:
            lines.append(f"      (judging action {self.action})")
        for number, item in enumerate(evaluated, 1):
            verdict = "MATCH" if item.matched else "no   "
            lines.append(f"{number:>4}. {item.rule:<{width}}  {verdict}  {item.reason}")
        skipped = len(self.trace) - len(evaluated)
        if skipped:
            lines.append(f"      ({skipped} later rule(s) not evaluated: first match wins)")
        rule = f"rule {self.decision.rule}" if self.decision.rule else "no rule"
        lines.append(f"decision: {self.decision.action.value} ({rule}): {self.decision.reason}")
        return "\n".join(lines)


class _Plan:
    """The conditions of one evaluation, compiled into the loop the engine runs.

    Before a step the loop may stop: when the first rule left (the highest bit of the mask so
    far) is constrained by neither this condition nor a later one, it is the answer. The test is
    one lookup in the step's stop table, indexed by the mask's `bit_length()`: byte b is 1 when
    rule `count - b` is free of the remaining conditions. A cheap condition (a dict lookup)
    costs less than the test and gets none.

    The leading static conditions (methods, route, actions: they read only the method, the route
    and the action judged) and the stop test after them depend on nothing else, so their outcome
    is computed once per (method, route, action) and remembered in `head` (a bounded dict): the
    rules left (> 0) when the rest must run, `tail` without its first stop test; or ~index
    (<= 0) of the rule already decided (~-1 = 0: no rule matches).
    """

    __slots__ = (
        "conditions",
        "count",
        "everything",
        "first_stop",
        "head",
        "static",
        "steps",
        "tail",
    )

    # Bound on remembered heads; past it the dict starts over (correct, only slower).
    max_heads = 4096

    def __init__(self, conditions: Sequence[Condition], count: int) -> None:
        self.conditions = tuple(conditions)
        self.count = count
        self.everything = everything = (1 << count) - 1
        steps: list[Step] = []
        pending = 0
        for position in range(len(conditions) - 1, -1, -1):
            condition = conditions[position]
            pending |= condition.constrained
            stop: bytes | None = None
            if position == 0 or not condition.cheap:
                # Byte b is bit b-1 of `free`: a 0 (for an empty mask), then the bits, lowest
                # first.
                free = everything & ~pending
                bits = format(free, f"0{count}b")[::-1] if count else ""
                stop = b"\x00" + bits.encode("ascii").translate(_BYTES_01)
            steps.append((condition.step(), stop))
        steps.reverse()
        self.steps = tuple(steps)  # every step, for `trace`
        static = 0
        while static < len(conditions) and conditions[static].static:
            static += 1
        if count and not pending >> (count - 1) & 1:
            static, steps = 0, []  # the first rule states no condition: it matches everything
        self.static = tuple(mask for mask, _ in steps[:static])
        tail = steps[static:]
        self.first_stop = tail[0][1] if tail else None  # tested in `start`
        self.tail = tuple((mask, stop if i else None) for i, (mask, stop) in enumerate(tail))
        self.head: dict[tuple[str, str | None, str | None], int] = {}

    def start(self, request: RequestInfo, identity: Identity, action: str | None) -> int:
        """What `head` remembers for this request's method, route and action (see above)."""
        m = self.everything
        for mask in self.static:
            m &= mask(request, identity, action, m)
        if not m:
            known = 0  # no rule
        elif not self.tail or (self.first_stop is not None and self.first_stop[m.bit_length()]):
            known = ~(self.count - m.bit_length())  # the first rule left is the answer
        else:
            known = m
        if len(self.head) >= self.max_heads:
            self.head.clear()
        self.head[(request.method, request.route, action)] = known
        return known

    def first(self, request: RequestInfo, identity: Identity, action: str | None) -> int:
        """The index of the first rule all the conditions let through; -1 for none."""
        m = self.head.get((request.method, request.route, action))
        if m is None:
            m = self.start(request, identity, action)
        if m <= 0:
            return ~m
        for mask, stop in self.tail:
            if stop is not None and stop[m.bit_length()]:
                break  # nothing still to come can remove the first rule left
            m &= mask(request, identity, action, m)
            if not m:
                return -1
        return self.count - m.bit_length()

    def trace(
        self, request: RequestInfo, identity: Identity, action: str | None
    ) -> tuple[int, list[tuple[Condition, int]]]:
        """`first`, step by step without the remembered head, keeping each mask computed."""
        m = self.everything
        computed: list[tuple[Condition, int]] = []
        for condition, (mask, stop) in zip(self.conditions, self.steps, strict=True):
            if stop is not None and stop[m.bit_length()]:
                break
            passed = mask(request, identity, action, m)
            computed.append((condition, passed))
            m &= passed
            if not m:
                break
        return first_rule(m, self.count), computed


class Policy:
    """Compiled rules; `evaluate` is the hot path, `explain` the readable one."""

    def __init__(self, settings: PolicySettings) -> None:
        # Use `Policy.compile(settings)`.
        rules: tuple[RuleSettings, ...] = tuple(settings.rules)
        self.rules = rules
        self.default: Action = settings.default
        self._by_name = {rule.name: rule for rule in rules}
        self._default_decision = Decision(
            action=settings.default,
            rule=None,
            reason=f"no rule matched; default {settings.default.value}",
        )
        # Indexed by rule; [-1] (no rule matched) is the default.
        self._decisions = [
            *(
                Decision(action=rule.action, rule=rule.name, reason=f"rule {rule.name} matched")
                for rule in rules
            ),
            self._default_decision,
        ]
        self._count = len(rules)
        self._everything = (1 << len(rules)) - 1

        conditions = [
            compiled for kind in CONDITIONS if (compiled := kind.compile(rules)) is not None
        ]
        self._plan = plan = _Plan(conditions, len(rules))
        self._head = plan.head.get  # the hot path's share of the plan
        self._start = plan.start
        self._tail = plan.tail
        body_rules = 0
        for condition in conditions:
            if condition.reads_body:
                body_rules |= condition.constrained
        self._body_rules = body_rules  # rules with a condition on the body
        self._body_free_plan = (
            _Plan([c for c in conditions if not c.reads_body], len(rules)) if body_rules else plan
        )
        self._paths = next((c for c in conditions if isinstance(c, PathsCondition)), None)

    @classmethod
    def compile(cls, settings: PolicySettings) -> Policy:
        """Compile the rules once; raises `PolicyError` for a malformed glob."""
        return cls(settings)

    def rule(self, name: str) -> RuleSettings:
        """The settings of the rule a `Decision` names (approvers, quorum, timeout)."""
        return self._by_name[name]

    # -- hot path ------------------------------------------------------------------------

    def evaluate(self, request: RequestInfo, identity: Identity) -> Decision:
        """The first rule matching `request` and `identity`, else the default action; for a
        request naming actions, the strictest of the decisions on each.

        Raises `AmbiguousField` when a field a condition reads appears more than once.
        """
        actions = request.actions
        if not actions:
            # `_Plan.first`, inlined: this is the hot path.
            m = self._head((request.method, request.route, None))
            if m is None:
                m = self._start(request, identity, None)
            if m <= 0:
                return self._decisions[~m]  # decided by the method and route alone
            for mask, stop in self._tail:
                if stop is not None and stop[m.bit_length()]:
                    break
                m &= mask(request, identity, None, m)
                if not m:
                    return self._default_decision
            return self._decisions[self._count - m.bit_length()]
        first = self._plan.first
        outcomes = [(action, first(request, identity, action)) for action in dict.fromkeys(actions)]
        action, index = self._strictest(outcomes)
        decision = self._decisions[index]
        return Decision(decision.action, decision.rule, f"{decision.reason} (action {action})")

    def _strictest(self, outcomes: Sequence[tuple[str, int]]) -> tuple[str, int]:
        """The (action, rule index) that decides: the strictest, then the earliest rule (the
        default, -1, after every rule)."""
        decisions = self._decisions
        last = len(decisions)
        return min(
            outcomes,
            key=lambda outcome: (
                _STRICTNESS[decisions[outcome[1]].action],
                last if outcome[1] < 0 else outcome[1],
            ),
        )

    def needs_body(self, request: RequestInfo, identity: Identity) -> bool:
        """Whether the decision on `request` (its body not read yet) could depend on its body.

        True exactly when, for some action, the first rule left by the conditions that do not
        read the body has a condition on the body (`when.json`, `when.form`): a body-free rule
        before it would decide whatever the body says, first match wins.
        """
        body_rules = self._body_rules
        if not body_rules:
            return False
        first = self._body_free_plan.first
        for action in request.actions or (None,):
            index = first(request, identity, action)
            if index >= 0 and has_rule(body_rules, index, self._count):
                return True
        return False

    # -- tooling ---------------------------------------------------------------------------

    def path_candidates(self, path: str, *, fold_case: bool = False) -> list[str]:
        """Names of the rules whose path condition matches `path` (rules without paths
        included), in rule order."""
        paths = self._paths
        mask = self._everything if paths is None else paths.path_mask(path, fold_case)
        count = self._count
        return [rule.name for index, rule in enumerate(self.rules) if has_rule(mask, index, count)]

    def explain(self, request: RequestInfo, identity: Identity) -> Explanation:
        """`evaluate`, with a readable reason for every rule up to the first match."""
        actions = tuple(dict.fromkeys(request.actions))
        trace_of = self._plan.trace
        traces = {action: trace_of(request, identity, action) for action in actions}
        if actions:
            action, winner = self._strictest([(a, traces[a][0]) for a in actions])
            decision = self._decisions[winner]
            decision = Decision(
                decision.action, decision.rule, f"{decision.reason} (action {action})"
            )
            computed = traces[action][1]
            judged: str | None = action
        else:
            winner, computed = trace_of(request, identity, None)
            decision = self._decisions[winner]
            judged = None
        trace: list[RuleTrace] = []
        count = self._count
        for index, rule in enumerate(self.rules):
            if 0 <= winner < index:
                trace.append(
                    RuleTrace(rule.name, False, "not evaluated (an earlier rule matched)", False)
                )
            elif index == winner:
                details = [
                    condition.reason(index, True, request, identity, judged)
                    for condition, _ in computed
                    if has_rule(condition.constrained, index, count)
                ]
                reason = "matches: " + ", ".join(details) if details else "matches (no conditions)"
                trace.append(RuleTrace(rule.name, True, reason))
            else:
                # The first mask without the rule's bit: the condition that ruled it out.
                failed = next(c for c, passed in computed if not has_rule(passed, index, count))
                reason = failed.reason(index, False, request, identity, judged)
                trace.append(RuleTrace(rule.name, False, reason))
        return Explanation(decision=decision, trace=trace, action=judged)
