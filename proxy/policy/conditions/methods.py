"""`methods`: the request method is one of the rule's (empty: any method).

Methods are compared exactly, upper-case (the request's is upper-cased first); HEAD is not
implied by GET: a rule covering both lists both. Compiled to one dict, method → rules accepting
it (the rules without methods included), so a request costs one lookup. Pure code: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .base import ALL, Condition, listing, rule_bit

if TYPE_CHECKING:
    from typing import Self

    from ...config import RuleSettings
    from ...model import Identity, RequestInfo

__all__ = ["MethodsCondition"]


class MethodsCondition(Condition):
    __slots__ = ("_any", "_by_method")

    name = "methods"
    cheap = True
    static = True

    def __init__(self, rules: Sequence[RuleSettings], by_method: dict[str, int], any_: int) -> None:
        everything = (1 << len(rules)) - 1
        super().__init__(rules, everything & ~any_)
        self._any = any_  # rules without methods
        self._by_method = {method: any_ | bits for method, bits in by_method.items()}

    @classmethod
    def compile(cls, rules: Sequence[RuleSettings]) -> Self | None:
        by_method: dict[str, int] = {}
        any_ = 0
        for index, rule in enumerate(rules):
            bit = rule_bit(index, len(rules))
            if not rule.methods:
                any_ |= bit
            for method in rule.methods:
                method = method.upper()
                by_method[method] = by_method.get(method, 0) | bit
        return cls(rules, by_method, any_) if by_method else None

    def mask(
        self,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
        candidates: int = ALL,
    ) -> int:
        return self._by_method.get(request.method.upper(), self._any)

    def reason(
        self,
        index: int,
        passed: bool,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
    ) -> str:
        method = request.method.upper()
        methods = listing(self.rules[index].methods)
        return f"method {method} in {methods}" if passed else f"method {method} not in {methods}"
