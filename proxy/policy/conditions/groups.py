"""`when.groups`: the identity has at least one of the rule's groups.

Compiled to group → rules naming it; a request ORs the entries of the identity's groups (one
lookup per group it has) onto the rules without the condition. Pure code: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .base import ALL, Condition, listing, rule_bit

if TYPE_CHECKING:
    from typing import Self

    from ...config import RuleSettings
    from ...model import Identity, RequestInfo

__all__ = ["GroupsCondition"]


def _groups(rule: RuleSettings) -> tuple[str, ...]:
    return () if rule.when is None else rule.when.groups


class GroupsCondition(Condition):
    __slots__ = ("_by_group", "_free")

    name = "groups"

    def __init__(self, rules: Sequence[RuleSettings], by_group: dict[str, int], free: int) -> None:
        everything = (1 << len(rules)) - 1
        super().__init__(rules, everything & ~free)
        self._free = free  # rules without the condition
        self._by_group = by_group

    @classmethod
    def compile(cls, rules: Sequence[RuleSettings]) -> Self | None:
        by_group: dict[str, int] = {}
        free = 0
        for index, rule in enumerate(rules):
            bit = rule_bit(index, len(rules))
            groups = _groups(rule)
            if not groups:
                free |= bit
            for group in groups:
                by_group[group] = by_group.get(group, 0) | bit
        return cls(rules, by_group, free) if by_group else None

    def mask(
        self,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
        candidates: int = ALL,
    ) -> int:
        allowed = self._free
        by_group = self._by_group
        for group in identity.groups:
            bits = by_group.get(group)
            if bits:
                allowed |= bits
        return allowed

    def reason(
        self,
        index: int,
        passed: bool,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
    ) -> str:
        wanted = _groups(self.rules[index])
        common = sorted(identity.groups.intersection(wanted))
        if passed and common:
            return f"identity in group {common[0]}"
        has = listing(sorted(identity.groups)) if identity.groups else "no groups"
        return f"identity not in groups {listing(wanted)} (has {has})"
