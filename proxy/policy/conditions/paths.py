"""`paths`: the request's normalized path matches one of the rule's globs (see globs.py for
the glob language).

All globs of all rules live in one segment trie, walked as a lazily built DFA: a request costs
about one dict lookup per path segment, whatever the number of rules. On a route with
`case_insensitive_paths: true` (`request.fold_case`) the case-folded path walks a second trie of
the case-folded globs, built the first time such a request comes. Pure code: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import PolicyError
from ..globs import Trie
from .base import ALL, Condition, MaskFn, listing, rule_bit

if TYPE_CHECKING:
    from typing import Self

    from ...config import RuleSettings
    from ...model import Identity, RequestInfo

__all__ = ["PathsCondition"]


def _build(rules: Sequence[RuleSettings], pathless: int) -> Trie:
    trie = Trie(base=pathless)
    for index, rule in enumerate(rules):
        for glob in rule.paths:
            try:
                trie.insert(glob, index, rule_bit(index, len(rules)))
            except PolicyError as exc:
                raise PolicyError(f"rule {rule.name!r}: {exc}") from None
    trie.finish()
    return trie


class PathsCondition(Condition):
    __slots__ = ("_trie",)

    name = "paths"

    def __init__(self, rules: Sequence[RuleSettings]) -> None:
        pathless = 0
        for index, rule in enumerate(rules):
            if not rule.paths:
                pathless |= rule_bit(index, len(rules))
        everything = (1 << len(rules)) - 1
        super().__init__(rules, everything & ~pathless)
        # Its states' masks include the rules without paths (they meet any path).
        self._trie = _build(rules, pathless)

    @classmethod
    def compile(cls, rules: Sequence[RuleSettings]) -> Self | None:
        return cls(rules) if any(rule.paths for rule in rules) else None

    def path_mask(self, path: str, fold_case: bool = False) -> int:
        """The rules whose path condition `path` meets (the rules without paths included)."""
        if fold_case:
            return self._trie.folded().walk(path.casefold()).mask
        return self._trie.walk(path).mask

    def mask(
        self,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
        candidates: int = ALL,
    ) -> int:
        return self._trie.request_mask(request, identity, action, candidates)

    def step(self) -> MaskFn:
        return self._trie.request_mask  # `mask` without the extra call: the hot path

    def reason(
        self,
        index: int,
        passed: bool,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
    ) -> str:
        globs = self.rules[index].paths
        path = request.path
        if request.fold_case:
            folded = path.casefold()
            matching = self._trie.folded().globs_matching(folded, index)
            if folded != path:
                path = f"{path} (case-folded {folded})"
        else:
            matching = self._trie.globs_matching(path, index)
        if passed and matching:
            return f"path {path} matches {min(matching, key=globs.index)}"
        shown = globs[0] if len(globs) == 1 else f"any of {listing(globs)}"
        return f"path {path} does not match {shown}"
