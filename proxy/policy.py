"""Policy: ordered rules, first match wins, compiled once at start.

A rule matches a request when every condition it states holds:

- ``methods``: the request method is one of them (empty: any method). Methods are compared
  exactly, upper-case; **HEAD is not implied by GET** — list both to cover both.
- ``paths``: the decoded, normalized request path matches one of the globs (empty: any path).
  Globs are written decoded and compared segment by segment, case-sensitively:

  - ``*`` as a whole segment matches exactly one non-empty segment;
  - ``**`` as a whole segment matches any number of segments, including none, so
    "/cloud/exports/**" matches "/cloud/exports", "/cloud/exports/", "/cloud/exports/x" and
    "/cloud/exports/x/y";
  - ``*`` inside a segment ("/v1/*.json") matches any run of characters within that one segment;
  - everything else is literal (there are no ``?`` or ``[...]`` wildcards).

  One trailing slash on the request path is ignored: "/a/b/" is judged like "/a/b", so a trailing
  slash cannot slip past a "/a/*" rule. A trailing slash on a glob is ignored the same way.
- ``route``: the request was routed to the route with that name.
- ``when``: identity conditions, all of those present must hold: ``groups`` (the identity has at
  least one), ``subjects`` (the identity's subject is listed), ``claims`` (for each dotted claim
  path, the claim equals the value or one of the listed values; a list claim matches when any
  element does; a missing claim never matches; integer and boolean claims compare by their JSON
  text, e.g. ``1`` → "1", ``true`` → "true").

No rule matching: ``policy.default``.

How it is fast: every condition is turned into bitmasks over rule indices (bit i = rule i). The
path globs live in a segment trie whose nodes carry the mask of the globs ending there; walking
it with the request's segments gives the rules whose paths match (the walk is memoized as a
lazily built DFA, so a step is usually one dict lookup). ANDing that with the masks for the
method, the route and the identity's groups, subject and claims leaves the rules that match, and
the lowest set bit is the first of them. An evaluation costs about one dict lookup per path
segment and a handful of integer operations, whatever the number of rules (see
bench/bench_policy.py).

Pure code: no I/O, no aiohttp, no Redis.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from .model import Action, Decision, Identity, RequestInfo

if TYPE_CHECKING:
    from .config import PolicySettings, RuleSettings, WhenSettings

__all__ = [
    "Explanation",
    "Policy",
    "PolicyError",
    "RuleTrace",
    "glob_covers",
    "globs_intersect",
    "rule_covers",
]


class PolicyError(ValueError):
    """A rule that cannot be compiled (for example a malformed path glob)."""


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
    """The decision and, rule by rule up to the first match, why."""

    decision: Decision
    trace: list[RuleTrace]

    def render(self) -> str:
        """A readable multi-line report (what `countersign explain` prints)."""
        evaluated = [t for t in self.trace if t.evaluated]
        width = max((len(t.rule) for t in evaluated), default=0)
        lines = []
        for number, item in enumerate(evaluated, 1):
            verdict = "MATCH" if item.matched else "no   "
            lines.append(f"{number:>4}. {item.rule:<{width}}  {verdict}  {item.reason}")
        skipped = len(self.trace) - len(evaluated)
        if skipped:
            lines.append(f"      ({skipped} later rule(s) not evaluated: first match wins)")
        rule = f"rule {self.decision.rule}" if self.decision.rule else "no rule"
        lines.append(f"decision: {self.decision.action.value} ({rule}): {self.decision.reason}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Path globs → segment trie


class _Node:
    """A trie node: where a glob prefix leads.

    While building, `literal`, `star`, `patterns` and `globstar` point to child nodes. `finish`
    then precomputes what the walk needs, as tuples of nodes: `closure` is the node plus the '**'
    nodes reachable from it without consuming a segment ('**' matching zero segments);
    `step_literal` maps a segment to the closure of the literal child; `step_any` is what any
    segment leads to ('*' child, and the node itself when it is a '**' node);
    `step_patterns` pairs each mid-segment wildcard matcher with its child's closure.
    """

    __slots__ = (
        "closure",
        "globs",
        "globstar",
        "literal",
        "loops",
        "mask",
        "patterns",
        "star",
        "step_any",
        "step_literal",
        "step_patterns",
    )

    def __init__(self, loops: bool = False) -> None:
        self.literal: dict[str, _Node] = {}
        self.star: _Node | None = None
        self.patterns: dict[str, tuple[Callable[[str], object], _Node]] = {}
        self.globstar: _Node | None = None
        self.loops = loops  # a '**' node: consumes any segment and stays
        self.mask = 0  # rules with a glob ending here
        self.globs: list[tuple[int, str]] = []  # (rule index, glob) ending here, for explain
        self.closure: tuple[_Node, ...] = (self,)
        self.step_literal: dict[str, tuple[_Node, ...]] = {}
        self.step_any: tuple[_Node, ...] = ()
        self.step_patterns: tuple[tuple[Callable[[str], object], tuple[_Node, ...]], ...] = ()

    def finish(self) -> None:
        """Precompute the walk tables, bottom-up (once, after all globs are inserted)."""
        children = list(self.literal.values())
        children.extend(child for _, child in self.patterns.values())
        if self.star is not None:
            children.append(self.star)
        if self.globstar is not None:
            children.append(self.globstar)
        for child in children:
            child.finish()
        if self.globstar is not None:
            self.closure = (self, *self.globstar.closure)
        self.step_literal = {segment: child.closure for segment, child in self.literal.items()}
        self.step_patterns = tuple(
            (matches, child.closure) for matches, child in self.patterns.values()
        )
        step_any: tuple[_Node, ...] = () if self.star is None else self.star.closure
        if self.loops:
            step_any += self.closure
        self.step_any = step_any


def _segments(path: str) -> list[str]:
    """Non-empty segments of a path: the leading and a trailing slash are ignored ("/" → [])."""
    return [segment for segment in path.split("/") if segment]


def check_glob(glob: str) -> None:
    """Raise `PolicyError` when `glob` is malformed or can never match a normalized path."""
    _glob_segments(glob)


def _glob_segments(glob: str) -> list[str]:
    if not glob.startswith("/"):
        raise PolicyError(f"path glob {glob!r} must start with '/'")
    if "//" in glob:
        raise PolicyError(f"path glob {glob!r} has an empty segment ('//'); it can never match")
    segments = _segments(glob)
    for segment in segments:
        if segment in (".", ".."):
            raise PolicyError(
                f"path glob {glob!r} has a {segment!r} segment; request paths never do"
            )
        if "**" in segment and segment != "**":
            raise PolicyError(f"path glob {glob!r}: '**' must be a whole path segment")
    return segments


def _segment_matcher(segment: str) -> Callable[[str], object]:
    pattern = ".*".join(re.escape(part) for part in segment.split("*"))
    return re.compile(pattern, re.DOTALL).fullmatch


class _State:
    """A set of trie nodes the walk can be in: one state of a DFA built lazily over the trie.

    Its transitions are remembered as they are first taken: by segment for the segments that are
    literal children of one of its nodes, by the set of matching mid-segment patterns otherwise
    (`any` when it has no patterns). How many there can be depends on the rules, not on the
    variety of paths seen (ids in paths all share the `any` transition), and `_Trie.max_states`
    bounds it anyway.
    """

    __slots__ = ("any", "by_patterns", "literal", "literal_keys", "mask", "nodes", "patterns")

    def __init__(self, nodes: frozenset[_Node]) -> None:
        self.nodes = nodes
        mask = 0
        keys: set[str] = set()
        patterns: list[tuple[Callable[[str], object], tuple[_Node, ...]]] = []
        for node in nodes:
            mask |= node.mask
            keys.update(node.step_literal)
            patterns.extend(node.step_patterns)
        self.mask = mask  # rules with a glob ending in one of the nodes
        self.literal_keys = frozenset(keys)
        self.patterns = tuple(patterns)
        self.literal: dict[str, _State] = {}
        self.by_patterns: dict[tuple[int, ...], _State] = {}
        self.any: _State | None = None

    def matching_patterns(self, segment: str) -> tuple[int, ...]:
        return tuple(i for i, (matches, _) in enumerate(self.patterns) if matches(segment))


class _Trie:
    """Path globs in a segment trie, walked as a lazily built DFA (see `_State`)."""

    # Bound on remembered states; past it the cache starts over (correct, only slower).
    max_states = 20_000

    def __init__(self) -> None:
        self.root = _Node()
        self._states: dict[frozenset[_Node], _State] = {}
        self._start = _State(frozenset())

    def insert(self, glob: str, rule_index: int) -> None:
        node = self.root
        for segment in _glob_segments(glob):
            if segment == "**":
                if node.globstar is None:
                    node.globstar = _Node(loops=True)
                node = node.globstar
            elif segment == "*":
                if node.star is None:
                    node.star = _Node()
                node = node.star
            elif "*" in segment:
                entry = node.patterns.get(segment)
                if entry is None:
                    entry = node.patterns[segment] = (_segment_matcher(segment), _Node())
                node = entry[1]
            else:
                child = node.literal.get(segment)
                if child is None:
                    child = node.literal[segment] = _Node()
                node = child
        node.mask |= 1 << rule_index
        node.globs.append((rule_index, glob))

    def finish(self) -> None:
        """Call once after the last `insert`."""
        self.root.finish()
        self._states = {}
        self._start = self._state(frozenset(self.root.closure))

    def _state(self, nodes: frozenset[_Node]) -> _State:
        state = self._states.get(nodes)
        if state is None:
            if len(self._states) >= self.max_states:
                # Start over from a fresh start state, so the old states become garbage.
                start = frozenset(self.root.closure)
                self._states = {}
                self._start = self._states[start] = _State(start)
                if nodes == start:
                    return self._start
            state = self._states[nodes] = _State(nodes)
        return state

    def _step(self, state: _State, segment: str) -> _State:
        """Compute the transition (the NFA step over the trie) and remember it."""
        following: set[_Node] = set()
        for node in state.nodes:
            closure = node.step_literal.get(segment)
            if closure is not None:
                following.update(closure)
            following.update(node.step_any)
            for matches, closure in node.step_patterns:
                if matches(segment):
                    following.update(closure)
        result = self._state(frozenset(following))
        if segment in state.literal_keys:
            state.literal[segment] = result
        elif state.patterns:
            state.by_patterns[state.matching_patterns(segment)] = result
        else:
            state.any = result
        return result

    def walk(self, path: str) -> _State:
        """The state the path's segments lead to; globs ending in its nodes match the path."""
        state = self._start
        for segment in path.split("/"):
            if not segment:  # leading, trailing or (unnormalized) repeated slash
                continue
            following = state.literal.get(segment)
            if following is None:
                if segment in state.literal_keys:
                    following = self._step(state, segment)
                elif state.patterns:
                    following = state.by_patterns.get(state.matching_patterns(segment))
                    if following is None:
                        following = self._step(state, segment)
                else:
                    following = state.any
                    if following is None:
                        following = self._step(state, segment)
            state = following
            if not state.nodes:
                break
        return state


# --------------------------------------------------------------------------------------------
# Identity conditions


def _claim_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return None


_MISSING = object()


def _claim_values(claims: Mapping[str, Any], path: str, parts: tuple[str, ...]) -> list[str] | None:
    """The claim's value(s) as text; None when the claim is missing.

    `parts` is `path` split on dots. A top-level key spelled exactly like the dotted path (e.g. an
    URL-like claim name) wins over the nested lookup.
    """
    value = claims.get(path, _MISSING)
    if value is _MISSING:
        if len(parts) == 1:
            return None
        value = claims
        for part in parts:
            if not isinstance(value, Mapping):
                return None
            value = value.get(part, _MISSING)
            if value is _MISSING:
                return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple | set | frozenset):
        return [text for item in value if (text := _claim_text(item)) is not None]
    text = _claim_text(value)
    return [] if text is None else [text]


def _as_tuple(value: str | tuple[str, ...]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _listing(items: Any) -> str:
    return "[" + ", ".join(str(item) for item in items) + "]"


class _ClaimIndex:
    __slots__ = ("by_value", "constrained", "unconstrained")

    def __init__(self) -> None:
        self.constrained = 0  # rules with a condition on this claim
        self.unconstrained = 0  # all the others (filled in after compiling)
        self.by_value: dict[str, int] = {}  # accepted value → rules accepting it


# --------------------------------------------------------------------------------------------
# Policy


class Policy:
    """Compiled rules; `evaluate` is the hot path, `explain` the readable one.

    Methods are matched exactly (upper-case, the request method is upper-cased first); HEAD is
    NOT implicitly matched by a rule listing GET.
    """

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
        self._decisions = [
            Decision(action=rule.action, rule=rule.name, reason=f"rule {rule.name} matched")
            for rule in rules
        ]
        everything = (1 << len(rules)) - 1

        self._trie = _Trie()
        self._pathless = 0
        any_method = 0
        method_bits: dict[str, int] = {}
        any_route = 0
        route_bits: dict[str, int] = {}
        self._no_group = 0
        self._group_bits: dict[str, int] = {}
        self._no_subject = 0
        self._subject_bits: dict[str, int] = {}
        claim_index: dict[str, _ClaimIndex] = {}

        for index, rule in enumerate(rules):
            bit = 1 << index
            if rule.methods:
                for method in rule.methods:
                    method = method.upper()
                    method_bits[method] = method_bits.get(method, 0) | bit
            else:
                any_method |= bit
            if rule.paths:
                for glob in rule.paths:
                    try:
                        self._trie.insert(glob, index)
                    except PolicyError as exc:
                        raise PolicyError(f"rule {rule.name!r}: {exc}") from None
            else:
                self._pathless |= bit
            if rule.route is None:
                any_route |= bit
            else:
                route_bits[rule.route] = route_bits.get(rule.route, 0) | bit
            when = rule.when
            if when is not None and when.groups:
                for group in when.groups:
                    self._group_bits[group] = self._group_bits.get(group, 0) | bit
            else:
                self._no_group |= bit
            if when is not None and when.subjects:
                for subject in when.subjects:
                    self._subject_bits[subject] = self._subject_bits.get(subject, 0) | bit
            else:
                self._no_subject |= bit
            if when is not None:
                for claim, accepted in when.claims.items():
                    entry = claim_index.setdefault(claim, _ClaimIndex())
                    entry.constrained |= bit
                    for value in _as_tuple(accepted):
                        entry.by_value[value] = entry.by_value.get(value, 0) | bit
        self._trie.finish()

        self._any_method = any_method
        self._method_masks = {m: any_method | bits for m, bits in method_bits.items()}
        self._any_route = any_route
        self._route_masks = {r: any_route | bits for r, bits in route_bits.items()}
        identity_free = everything & self._no_group & self._no_subject
        for entry in claim_index.values():
            entry.unconstrained = everything & ~entry.constrained
            identity_free &= entry.unconstrained
        self._identity_free = identity_free  # rules without any identity condition
        self._claims = [
            (claim, tuple(claim.split(".")), entry) for claim, entry in claim_index.items()
        ]

    @classmethod
    def compile(cls, settings: PolicySettings) -> Policy:
        """Compile the rules once; raises `PolicyError` for a malformed glob."""
        return cls(settings)

    def rule(self, name: str) -> RuleSettings:
        """The settings of the rule a `Decision` names (approvers, quorum, timeout)."""
        return self._by_name[name]

    # -- hot path ------------------------------------------------------------------------

    def _path_mask(self, path: str) -> int:
        return self._pathless | self._trie.walk(path).mask

    def evaluate(self, request: RequestInfo, identity: Identity) -> Decision:
        """The first rule matching `request` and `identity`, else the default action."""
        m = self._pathless | self._trie.walk(request.path).mask
        if m:
            m &= self._method_masks.get(request.method.upper(), self._any_method)
        if m:
            route = request.route
            m &= self._any_route if route is None else self._route_masks.get(route, self._any_route)
        if not m:
            return self._default_decision
        first = m & -m
        if first & self._identity_free:
            # The first candidate has no identity condition: nothing below can change the answer.
            return self._decisions[first.bit_length() - 1]
        if self._group_bits:
            allowed = self._no_group
            group_bits = self._group_bits
            for group in identity.groups:
                bits = group_bits.get(group)
                if bits:
                    allowed |= bits
            m &= allowed
        if m and self._subject_bits:
            m &= self._no_subject | self._subject_bits.get(identity.subject, 0)
        if m and self._claims:
            claims = identity.claims
            for claim, parts, entry in self._claims:
                allowed = entry.unconstrained
                values = _claim_values(claims, claim, parts)
                if values:
                    by_value = entry.by_value
                    for value in values:
                        allowed |= by_value.get(value, 0)
                m &= allowed
                if not m:
                    break
        if not m:
            return self._default_decision
        return self._decisions[(m & -m).bit_length() - 1]

    # -- tooling ---------------------------------------------------------------------------

    def path_candidates(self, path: str) -> list[str]:
        """Names of the rules whose path condition matches `path` (rules without paths included),
        in rule order."""
        mask = self._path_mask(path)
        return [rule.name for index, rule in enumerate(self.rules) if mask >> index & 1]

    def explain(self, request: RequestInfo, identity: Identity) -> Explanation:
        """`evaluate`, with a readable reason for every rule up to the first match."""
        matched_globs: dict[int, list[str]] = {}
        for node in self._trie.walk(request.path).nodes:
            for index, glob in node.globs:
                matched_globs.setdefault(index, []).append(glob)
        for index, globs in matched_globs.items():
            globs.sort(key=self.rules[index].paths.index)
        trace: list[RuleTrace] = []
        decision = self._default_decision
        found = False
        for index, rule in enumerate(self.rules):
            if found:
                trace.append(
                    RuleTrace(rule.name, False, "not evaluated (an earlier rule matched)", False)
                )
                continue
            failure, details = _check_rule(rule, request, identity, matched_globs.get(index, []))
            if failure is not None:
                trace.append(RuleTrace(rule.name, False, failure))
                continue
            reason = "matches: " + ", ".join(details) if details else "matches (no conditions)"
            trace.append(RuleTrace(rule.name, True, reason))
            decision = self._decisions[index]
            found = True
        return Explanation(decision=decision, trace=trace)


def _check_rule(
    rule: RuleSettings, request: RequestInfo, identity: Identity, matched_globs: list[str]
) -> tuple[str | None, list[str]]:
    """(why the rule does not match, or None; what matched). Mirrors `Policy.evaluate`."""
    details: list[str] = []
    method = request.method.upper()
    if rule.methods:
        if method not in rule.methods:
            return f"method {method} not in {_listing(rule.methods)}", details
        details.append(f"method {method} in {_listing(rule.methods)}")
    if rule.route is not None:
        if request.route is None:
            return f"request matched no route; rule is for route {rule.route}", details
        if request.route != rule.route:
            return f"route {request.route} is not {rule.route}", details
        details.append(f"route {rule.route}")
    if rule.paths:
        if not matched_globs:
            globs = rule.paths[0] if len(rule.paths) == 1 else f"any of {_listing(rule.paths)}"
            return f"path {request.path} does not match {globs}", details
        details.append(f"path {request.path} matches {matched_globs[0]}")
    when = rule.when
    if when is None:
        return None, details
    if when.groups:
        common = sorted(identity.groups.intersection(when.groups))
        if not common:
            has = _listing(sorted(identity.groups)) if identity.groups else "no groups"
            return f"identity not in groups {_listing(when.groups)} (has {has})", details
        details.append(f"identity in group {common[0]}")
    if when.subjects:
        if identity.subject not in when.subjects:
            return f"subject {identity.subject} not in {_listing(when.subjects)}", details
        details.append(f"subject {identity.subject}")
    for claim, accepted in when.claims.items():
        wanted = _as_tuple(accepted)
        values = _claim_values(identity.claims, claim, tuple(claim.split(".")))
        if values is None:
            return f"claim {claim} is missing (needs {_listing(wanted)})", details
        hit = next((value for value in values if value in wanted), None)
        if hit is None:
            return f"claim {claim} is {_listing(values)}, not in {_listing(wanted)}", details
        details.append(f"claim {claim} = {hit}")
    return None, details


# --------------------------------------------------------------------------------------------
# Analysis (`countersign check`): which globs and rules cover others. Sound, not complete: a
# True from `glob_covers` or `rule_covers` is a proof; a False may only mean "not shown".


def _pattern_covers(outer: str, inner: str) -> bool:
    """Whether every string mid-segment pattern `inner` matches, `outer` matches.

    `inner`'s '*' are symbols only a '*' of `outer` can absorb (whatever a '*' of `inner`
    stands for, the '*' of `outer` absorbing it absorbs that too): a sound check.
    """
    rows, cols = len(outer), len(inner)
    # reach[j]: outer[:i] can absorb inner[:j]
    reach = [True] + [False] * cols
    for i in range(rows):
        char = outer[i]
        following = [False] * (cols + 1)
        if char == "*":
            seen = False
            for j in range(cols + 1):
                seen = seen or reach[j]
                following[j] = seen
        else:
            for j in range(1, cols + 1):
                following[j] = reach[j - 1] and inner[j - 1] == char
        reach = following
    return reach[cols]


def _segment_covers(outer: str, inner: str) -> bool:
    """Whether every segment `inner` matches, `outer` matches (single-segment tokens)."""
    if outer == "*":
        return True
    if "*" not in outer:
        return outer == inner
    if inner == "*":
        return False  # a pattern like "x*" has a literal part "*" need not have
    return _pattern_covers(outer, inner)


def _segment_intersects(a: str, b: str) -> bool:
    """Whether some (non-empty) segment matches both single-segment tokens."""
    if a == "*" or b == "*":
        return True
    if "*" not in a and "*" not in b:
        return a == b
    if "*" not in a:
        return bool(_segment_matcher(b)(a))
    if "*" not in b:
        return bool(_segment_matcher(a)(b))
    # Two patterns, each with a '*': a common string exists exactly when their literal
    # prefixes agree (one is a prefix of the other) and so do their literal suffixes; the
    # middle literals of both can then be laid out one after the other between them.
    a_head, a_tail = a.split("*", 1)[0], a.rsplit("*", 1)[1]
    b_head, b_tail = b.split("*", 1)[0], b.rsplit("*", 1)[1]
    return (a_head.startswith(b_head) or b_head.startswith(a_head)) and (
        a_tail.endswith(b_tail) or b_tail.endswith(a_tail)
    )


@lru_cache(maxsize=4096)
def _glob_tokens(glob: str) -> tuple[str, ...]:
    return tuple(_glob_segments(glob))


@lru_cache(maxsize=65536)
def glob_covers(outer: str, inner: str) -> bool:
    """Whether every path `inner` matches, `outer` matches too (proven; False: not shown)."""
    a = _glob_tokens(outer)
    b = _glob_tokens(inner)
    memo: dict[tuple[int, int], bool] = {}

    def covers(i: int, j: int) -> bool:
        key = (i, j)
        known = memo.get(key)
        if known is not None:
            return known
        if i == len(a):
            result = j == len(b)
        elif a[i] == "**":
            # outer's '**' stops here, or absorbs what inner's next token matches (even a '**')
            result = covers(i + 1, j) or (j < len(b) and covers(i, j + 1))
        elif j == len(b):
            result = False
        elif b[j] == "**":
            # inner's '**' matches no segment, or one (any) segment and then still '**'
            result = covers(i, j + 1) and _segment_covers(a[i], "*") and covers(i + 1, j)
        else:
            result = _segment_covers(a[i], b[j]) and covers(i + 1, j + 1)
        memo[key] = result
        return result

    return covers(0, 0)


@lru_cache(maxsize=65536)
def globs_intersect(first: str, second: str) -> bool:
    """Whether some path matches both globs (exact for `*`, `**` and mid-segment `*`)."""
    a = _glob_tokens(first)
    b = _glob_tokens(second)
    memo: dict[tuple[int, int], bool] = {}

    def meet(i: int, j: int) -> bool:
        key = (i, j)
        known = memo.get(key)
        if known is not None:
            return known
        if i == len(a):
            result = all(token == "**" for token in b[j:])
        elif j == len(b):
            result = all(token == "**" for token in a[i:])
        elif a[i] == "**" or b[j] == "**":
            # a '**' stops here, or absorbs the segment the other side's token matches
            result = (a[i] == "**" and (meet(i + 1, j) or meet(i, j + 1))) or (
                b[j] == "**" and (meet(i, j + 1) or meet(i + 1, j))
            )
        else:
            result = _segment_intersects(a[i], b[j]) and meet(i + 1, j + 1)
        memo[key] = result
        return result

    return meet(0, 0)


def prefix_glob(prefix: str) -> str:
    """The glob matching the paths a route prefix matches: "/cloud/" → "/cloud/**"."""
    return prefix.rstrip("/") + "/**"


def when_covers(outer: WhenSettings | None, inner: WhenSettings | None) -> bool:
    """Whether every identity meeting `inner`'s conditions meets `outer`'s (proven)."""
    if outer is None:
        return True
    if outer.groups and not (
        inner is not None and inner.groups and set(inner.groups) <= set(outer.groups)
    ):
        return False
    if outer.subjects and not (
        inner is not None and inner.subjects and set(inner.subjects) <= set(outer.subjects)
    ):
        return False
    for claim, accepted in outer.claims.items():
        wanted = inner.claims.get(claim) if inner is not None else None
        if wanted is None or not set(_as_tuple(wanted)) <= set(_as_tuple(accepted)):
            return False
    return True


def methods_cover(outer: tuple[str, ...], inner: tuple[str, ...]) -> bool:
    """Whether every method `inner` accepts, `outer` accepts (empty: any method)."""
    return not outer or (bool(inner) and set(inner) <= set(outer))


def paths_cover(outer: tuple[str, ...], inner: tuple[str, ...], region: str | None = None) -> bool:
    """Whether every path `inner` matches (within `region`, a glob, when given), `outer` matches.

    Empty globs mean any path. Each glob of `inner` must be covered by one glob of `outer`
    (sound: a union of several `outer` globs covering it is not looked for).
    """
    outer = outer or ("/**",)
    inner = inner or ("/**",)
    return all(
        any(glob_covers(o, i) or (region is not None and glob_covers(o, region)) for o in outer)
        for i in inner
    )


def rule_covers(
    earlier: RuleSettings,
    later: RuleSettings,
    *,
    later_route: str | None = None,
    later_region: str | None = None,
) -> bool:
    """Whether every request `later` matches, `earlier` matches too (proven; False: not shown).

    `later_route` is the route every request `later` matches is routed to, when that is known
    (its own `route`, or the one all its paths lead to); `later_region` that route's prefix
    glob. Both only help to prove more.
    """
    route = later.route if later.route is not None else later_route
    if earlier.route is not None and earlier.route != route:
        return False
    return (
        methods_cover(earlier.methods, later.methods)
        and when_covers(earlier.when, later.when)
        and paths_cover(earlier.paths, later.paths, later_region)
    )
