"""`when.subjects`: the identity's subject is one of the rule's.

Compiled to subject → rules naming it: one lookup per request. Pure code: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .base import ALL, Condition, listing, rule_bit

if TYPE_CHECKING:
    from typing import Self

    from ...config import RuleSettings
    from ...model import Identity, RequestInfo

__all__ = ["SubjectsCondition"]


def _subjects(rule: RuleSettings) -> tuple[str, ...]:
    return () if rule.when is None else rule.when.subjects


class SubjectsCondition(Condition):
    __slots__ = ("_by_subject", "_free")

    name = "subjects"
    cheap = True

    def __init__(
        self, rules: Sequence[RuleSettings], by_subject: dict[str, int], free: int
    ) -> None:
        everything = (1 << len(rules)) - 1
        super().__init__(rules, everything & ~free)
        self._free = free  # rules without the condition
        self._by_subject = {subject: free | bits for subject, bits in by_subject.items()}

    @classmethod
    def compile(cls, rules: Sequence[RuleSettings]) -> Self | None:
        by_subject: dict[str, int] = {}
        free = 0
        for index, rule in enumerate(rules):
            bit = rule_bit(index, len(rules))
            subjects = _subjects(rule)
            if not subjects:
                free |= bit
            for subject in subjects:
                by_subject[subject] = by_subject.get(subject, 0) | bit
        return cls(rules, by_subject, free) if by_subject else None

    def mask(
        self,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
        candidates: int = ALL,
    ) -> int:
        return self._by_subject.get(identity.subject, self._free)

    def reason(
        self,
        index: int,
        passed: bool,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
    ) -> str:
        if passed:
            return f"subject {identity.subject}"
        return f"subject {identity.subject} not in {listing(_subjects(self.rules[index]))}"
