"""`methods`: the request method is one of the rule's (empty: any method).

Methods are compared exactly, upper-case (the request's is upper-cased first); HEAD is not
implied by GET: a rule covering both lists both. Compiled to one dict, method → rules accepting
it (the rules without methods included), so a request costs one lookup. Pure code: no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ALL, KeyedCondition, listing

if TYPE_CHECKING:
    from ...config import RuleSettings
    from ...model import Identity, RequestInfo

__all__ = ["MethodsCondition"]


class MethodsCondition(KeyedCondition):
    __slots__ = ()

    name = "methods"
    cheap = True
    static = True

    @classmethod
    def keys_of(cls, rule: RuleSettings) -> tuple[str, ...]:
        return tuple(method.upper() for method in rule.methods)

    def mask(
        self,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
        candidates: int = ALL,
    ) -> int:
        return self.lookup(request.method.upper())

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
