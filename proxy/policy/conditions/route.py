"""`route`: the request was routed to the route with that name.

A request that matched no route (`countersign explain` can ask about one) meets no rule with a
route. Compiled to one dict, route → rules for it (the rules without a route included). Pure
code: no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ALL, KeyedCondition

if TYPE_CHECKING:
    from ...config import RuleSettings
    from ...model import Identity, RequestInfo

__all__ = ["RouteCondition"]


class RouteCondition(KeyedCondition):
    __slots__ = ()

    name = "route"
    cheap = True
    static = True

    @classmethod
    def keys_of(cls, rule: RuleSettings) -> tuple[str, ...]:
        return () if rule.route is None else (rule.route,)

    def mask(
        self,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
        candidates: int = ALL,
    ) -> int:
        return self.lookup(request.route)

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
