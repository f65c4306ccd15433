"""What a condition is: the one interface the engine compiles, evaluates and explains through.

A condition module reads its part of every `RuleSettings` and compiles it, against the whole
rule list, into one object:

- `constrained`: the rules that state this condition, as a mask: rule i of n is bit n-1-i
  (`rule_bit`), so the first rule left in a mask is its highest bit, found in O(1) with
  `int.bit_length()` (a lowest-bit `m & -m` costs a pass over the whole integer);
- `mask(request, identity, action, candidates)`: the rules that pass it, the unconstrained ones
  included. `candidates` are the rules still in the running: the answer must be right for each
  of them, and may leave out the others, so a condition can skip work (and field reads) that
  only concerns rules already ruled out. Called with all rules, it answers for all of them;
- `reason(index, passed, request, identity, action)`: the words for one rule, "method GET in
  [GET, HEAD]" or "header X-Env is 'dev', not in [prod]". The engine decides pass or fail from
  the masks; the reason only says why, so `explain` never holds a second copy of the meaning.

`compile` returns None when no rule uses the condition: the engine then never calls it, so an
unused condition costs nothing. Pure code: no I/O.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from typing import Self

    from ...config import RuleSettings
    from ...model import Identity, RequestInfo

__all__ = [
    "ALL",
    "Condition",
    "KeyedCondition",
    "MaskFn",
    "first_rule",
    "has_rule",
    "listing",
    "quoted",
    "rule_bit",
]

# What the engine calls for a condition: (request, identity, action, candidates) → mask.
MaskFn = Callable[["RequestInfo", "Identity", "str | None", int], int]

ALL = -1  # every rule: as a mask, -1 has all bits set


def rule_bit(index: int, count: int) -> int:
    """The bit of rule `index` of `count`: the first rule is the highest bit."""
    return 1 << (count - 1 - index)


def has_rule(mask: int, index: int, count: int) -> bool:
    """Whether rule `index` of `count` is in `mask`."""
    return bool(mask >> (count - 1 - index) & 1)


def first_rule(mask: int, count: int) -> int:
    """The index of the first rule in `mask` (of `count` rules); -1 when it is empty."""
    return count - mask.bit_length() if mask > 0 else -1


class Condition(ABC):
    """One kind of rule condition, compiled over all the rules (see the module docstring)."""

    __slots__ = ("constrained", "rules")

    # The settings key it reads ("methods", "json"), as the registry lists it.
    name: ClassVar[str]
    # True for conditions on the body (json, form): `Policy.needs_body` asks about them.
    reads_body: ClassVar[bool] = False
    # True when `mask` costs about one dict lookup: no dearer than the engine's test for
    # stopping early, which it then skips before this condition.
    cheap: ClassVar[bool] = False
    # True when `mask` reads nothing but the request's method and route and the action judged:
    # the engine then remembers, per (method, route, action), the AND of the leading static
    # conditions. A static condition must be cheap and must never raise.
    static: ClassVar[bool] = False

    def __init__(self, rules: Sequence[RuleSettings], constrained: int) -> None:
        self.rules = rules
        self.constrained = constrained

    @classmethod
    @abstractmethod
    def compile(cls, rules: Sequence[RuleSettings]) -> Self | None:
        """The compiled condition, or None when no rule states it."""

    @abstractmethod
    def mask(
        self,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
        candidates: int = ALL,
    ) -> int:
        """The rules that pass this condition (the unconstrained ones included)."""

    def step(self) -> MaskFn:
        """The function the engine calls for `mask` (the same answers; a condition may hand out
        a faster one)."""
        return self.mask

    @abstractmethod
    def reason(
        self,
        index: int,
        passed: bool,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
    ) -> str:
        """Why rule `index` passed (or failed) this condition, in words."""


class KeyedCondition(Condition):
    """A condition that names keys (methods, a route, subjects, groups) and passes a rule when
    the request has one of them: compiled to one dict, key → rules accepting it (the rules
    that name no key included), so a request costs one lookup per key it has."""

    __slots__ = ("_by_key", "_free")

    def __init__(self, rules: Sequence[RuleSettings], by_key: dict[str, int], free: int) -> None:
        everything = (1 << len(rules)) - 1
        super().__init__(rules, everything & ~free)
        self._free = free  # rules that name no key: they pass whatever the request has
        self._by_key = {key: free | bits for key, bits in by_key.items()}

    @classmethod
    @abstractmethod
    def keys_of(cls, rule: RuleSettings) -> tuple[str, ...]:
        """The keys `rule` accepts (empty: the rule does not state this condition)."""

    @classmethod
    def compile(cls, rules: Sequence[RuleSettings]) -> Self | None:
        by_key: dict[str, int] = {}
        free = 0
        for index, rule in enumerate(rules):
            bit = rule_bit(index, len(rules))
            keys = cls.keys_of(rule)
            if not keys:
                free |= bit
            for key in keys:
                by_key[key] = by_key.get(key, 0) | bit
        return cls(rules, by_key, free) if by_key else None

    def lookup(self, key: str | None) -> int:
        """The rules a request with this one key passes."""
        return self._free if key is None else self._by_key.get(key, self._free)


def listing(items: Iterable[Any]) -> str:
    """`[a, b]`: how reasons show a list of accepted values."""
    return "[" + ", ".join(str(item) for item in items) + "]"


def quoted(value: str) -> str:
    """A request value as reasons show it: quoted, so spaces and empty strings are visible."""
    return repr(value)
