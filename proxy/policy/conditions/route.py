"""`route`: the request was routed to the route with that name.

A request that matched no route (`countersign explain` can ask about one) meets no rule with a
route. Compiled to one dict, route → rules for it (the rules without a route included). Pure
code: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .base import ALL, Condition, rule_bit

if TYPE_CHECKING:
    from typing import Self

    from ...config import RuleSettings
    from ...model import Identity, RequestInfo

__all__ = ["RouteCondition"]


class RouteCondition(Condition):
    __slots__ = ("_any", "_by_route")

    name = "route"
    cheap = True
    static = True

    def __init__(self, rules: Sequence[RuleSettings], by_route: dict[str, int], any_: int) -> None:
        everything = (1 << len(rules)) - 1
        super().__init__(rules, everything & ~any_)
        self._any = any_  # rules without a route
        self._by_route = {route: any_ | bits for route, bits in by_route.items()}

    @classmethod
    def compile(cls, rules: Sequence[RuleSettings]) -> Self | None:
        by_route: dict[str, int] = {}
        any_ = 0
        for index, rule in enumerate(rules):
            bit = rule_bit(index, len(rules))
            if rule.route is None:
                any_ |= bit
            else:
                by_route[rule.route] = by_route.get(rule.route, 0) | bit
        return cls(rules, by_route, any_) if by_route else None

    def mask(
        self,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
        candidates: int = ALL,
    ) -> int:
        route = request.route
        return self._any if route is None else self._by_route.get(route, self._any)

    def reason(
        self,
        index: int,
        passed: bool,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
    ) -> str:
        wanted = self.rules[index].route
        if passed:
            return f"route {wanted}"
        if request.route is None:
            return f"request matched no route; rule is for route {wanted}"
        return f"route {request.route} is not {wanted}"
