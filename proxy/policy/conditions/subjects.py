"""`when.subjects`: the identity's subject is one of the rule's.

Compiled to subject → rules naming it: one lookup per request. Pure code: no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ALL, KeyedCondition, listing

if TYPE_CHECKING:
    from ...config import RuleSettings
    from ...model import Identity, RequestInfo

__all__ = ["SubjectsCondition"]


def _subjects(rule: RuleSettings) -> tuple[str, ...]:
    return () if rule.when is None else rule.when.subjects


class SubjectsCondition(KeyedCondition):
    __slots__ = ()

    name = "subjects"
    cheap = True

    @classmethod
    def keys_of(cls, rule: RuleSettings) -> tuple[str, ...]:
        return _subjects(rule)

    def mask(
        self,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
        candidates: int = ALL,
    ) -> int:
        return self.lookup(identity.subject)

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
