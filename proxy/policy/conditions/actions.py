"""`actions`: one of the request's actions (named by the route's protocol: `iam:CreateRole`,
`tool:delete_repo`, `mutation:deleteUser`) matches one of the rule's globs.

Globs are fnmatch-like with only `*` special: it matches any run of characters, ':' and '/'
included; everything else is literal and case-sensitive. The engine judges a request once per
action (the strictest outcome wins), so this condition sees one action at a time; a request
naming none (`action` None) never meets a rule with actions.

Compiled to exact globs → rules (a dict lookup) plus the wildcard globs; the mask of each
action string seen is remembered (a bounded dict), so a known action costs one lookup. Pure
code: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .base import ALL, Condition, listing, rule_bit

if TYPE_CHECKING:
    from typing import Self

    from ...config import RuleSettings
    from ...model import Identity, RequestInfo

__all__ = ["ActionsCondition", "action_matcher"]

Matcher = Callable[[str], object]


def action_matcher(glob: str) -> Matcher:
    """A callable answering whether an action matches `glob` (truthy) or not."""
    if "*" not in glob:
        return glob.__eq__
    pattern = ".*".join(re.escape(part) for part in glob.split("*"))
    return re.compile(pattern, re.DOTALL).fullmatch


class ActionsCondition(Condition):
    __slots__ = ("_cache", "_exact", "_free", "_matchers", "_wildcards")

    name = "actions"
    cheap = True
    static = True

    # Bound on remembered actions; past it the cache starts over (correct, only slower).
    max_cached = 4096

    def __init__(self, rules: Sequence[RuleSettings]) -> None:
        free = 0
        exact: dict[str, int] = {}
        wildcards: dict[str, tuple[Matcher, int]] = {}
        matchers: dict[int, tuple[tuple[str, Matcher], ...]] = {}
        for index, rule in enumerate(rules):
            bit = rule_bit(index, len(rules))
            if not rule.actions:
                free |= bit
                continue
            own: list[tuple[str, Matcher]] = []
            for glob in rule.actions:
                if "*" in glob:
                    entry = wildcards.get(glob)
                    matches = action_matcher(glob) if entry is None else entry[0]
                    wildcards[glob] = (matches, (0 if entry is None else entry[1]) | bit)
                else:
                    matches = action_matcher(glob)
                    exact[glob] = exact.get(glob, 0) | bit
                own.append((glob, matches))
            matchers[index] = tuple(own)
        everything = (1 << len(rules)) - 1
        super().__init__(rules, everything & ~free)
        self._free = free  # rules without actions
        self._exact = exact
        self._wildcards = tuple(wildcards.values())
        self._matchers = matchers  # rule index → its (glob, matcher), for reasons
        self._cache: dict[str, int] = {}

    @classmethod
    def compile(cls, rules: Sequence[RuleSettings]) -> Self | None:
        return cls(rules) if any(rule.actions for rule in rules) else None

    def _compute(self, action: str) -> int:
        allowed = self._free | self._exact.get(action, 0)
        for matches, bits in self._wildcards:
            if matches(action):
                allowed |= bits
        if len(self._cache) >= self.max_cached:
            self._cache = {}
        self._cache[action] = allowed
        return allowed

    def mask(
        self,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
        candidates: int = ALL,
    ) -> int:
        if action is None:
            return self._free
        allowed = self._cache.get(action)
        return self._compute(action) if allowed is None else allowed

    def reason(
        self,
        index: int,
        passed: bool,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
    ) -> str:
        globs = self._matchers[index]
        if action is None:
            return f"the request names no action; rule needs one of {listing(g for g, _ in globs)}"
        for glob, matches in globs:
            if matches(action):
                return f"action {action} matches {glob}"
        if len(globs) == 1:
            return f"action {action} does not match {globs[0][0]}"
        return f"action {action} matches none of {listing(g for g, _ in globs)}"
