"""`when.groups`: the identity has at least one of the rule's groups.

Compiled to group → rules naming it; a request ORs the entries of the identity's groups (one
lookup per group it has) onto the rules without the condition. Pure code: no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ALL, KeyedCondition, listing

if TYPE_CHECKING:
    from ...config import RuleSettings
    from ...model import Identity, RequestInfo

__all__ = ["GroupsCondition"]


def _groups(rule: RuleSettings) -> tuple[str, ...]:
    return () if rule.when is None else rule.when.groups


class GroupsCondition(KeyedCondition):
    __slots__ = ()

    name = "groups"

    @classmethod
    def keys_of(cls, rule: RuleSettings) -> tuple[str, ...]:
        return _groups(rule)

    def mask(
        self,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
        candidates: int = ALL,
    ) -> int:
        # Any of the identity's groups will do: the union of what each of them passes.
        allowed = self._free
        by_group = self._by_key
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
