"""The shape shared by the conditions on named fields: claims, headers, query, json, form.

Each of them maps a field name to an accepted value or a list of them, and a rule passes when,
for every field it names, the request's value is one of those accepted (a field holding a list,
a list claim or a JSON array, passes when any element is). A missing field never passes.

Compiled, each field the rules name becomes one `FieldEntry`: the rules constraining it and,
per accepted value, the rules accepting it. A request's mask is then, field by field, the
unconstrained rules OR the rules accepting the value read, all ANDed: a dict lookup per value,
whatever the number of rules. A field no remaining candidate constrains is not read at all (so
a repeated query parameter only some other route's rule names is not refused).

A subclass says how to read a field (`read`), what to call it (`kind`) and, for headers, how
names compare (`normalize`). Pure code: no I/O.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ...config import accepted_texts
from .base import ALL, Condition, has_rule, listing, quoted, rule_bit

if TYPE_CHECKING:
    from typing import Self

    from ...config import Accepted, RuleSettings
    from ...model import Identity, RequestInfo

__all__ = ["FieldCondition", "FieldEntry"]


class FieldEntry:
    """One field, as every rule that names it constrains it."""

    __slots__ = ("by_value", "constrained", "key", "name", "parsed", "unconstrained")

    def __init__(self, key: str, name: str, parsed: Any) -> None:
        self.key = key  # normalized (header names lower-cased)
        self.name = name  # as first written, for reasons
        self.parsed = parsed  # what `read` needs (a JSON Pointer's tokens)
        self.constrained = 0  # rules naming this field
        self.unconstrained = 0  # all the others
        self.by_value: dict[str, int] = {}  # accepted value → rules accepting it

    def allowed(self, values: Sequence[str] | None) -> int:
        """The rules the field's `values` (None: missing) let through."""
        allowed = self.unconstrained
        if values:
            by_value = self.by_value
            for value in values:
                allowed |= by_value.get(value, 0)
        return allowed


class FieldCondition(Condition):
    """A condition on named fields (see the module docstring)."""

    __slots__ = ("_by_rule", "_entries")

    # How reasons name a field: "header X-Env", "JSON /format".
    kind: str = "field"

    def __init__(
        self,
        rules: Sequence[RuleSettings],
        entries: Sequence[FieldEntry],
        by_rule: Mapping[int, tuple[tuple[FieldEntry, tuple[str, ...]], ...]],
    ) -> None:
        constrained = 0
        for entry in entries:
            constrained |= entry.constrained
        super().__init__(rules, constrained)
        self._entries = tuple(entries)
        self._by_rule = by_rule  # rule index → (entry, accepted values), in the rule's order

    # -- what a subclass says ----------------------------------------------------------------

    @classmethod
    @abstractmethod
    def fields_of(cls, rule: RuleSettings) -> Mapping[str, Accepted]:
        """The rule's field → accepted value(s) mapping for this condition."""

    @classmethod
    def normalize(cls, name: str) -> str:
        """The key under which `name` is looked up (identity; headers lower-case it)."""
        return name

    @classmethod
    def prepare(cls, key: str) -> Any:
        """What `read` needs for a field, computed once (a JSON Pointer's tokens)."""
        return None

    @abstractmethod
    def read(self, request: RequestInfo, identity: Identity, entry: FieldEntry) -> list[str] | None:
        """The field's value(s) as text; None when it is missing (or cannot be read)."""

    def absent(self, request: RequestInfo, identity: Identity, entry: FieldEntry) -> str:
        """Why `read` found nothing, in words."""
        return "is missing"

    def shown(self, values: Sequence[str]) -> str:
        """The value(s) read, as a failing reason shows them."""
        if not values:
            return "no text, number or boolean"
        if len(values) == 1:
            return quoted(values[0])
        return listing(quoted(value) for value in values)

    # -- compiled ----------------------------------------------------------------------------

    @classmethod
    def compile(cls, rules: Sequence[RuleSettings]) -> Self | None:
        entries: dict[str, FieldEntry] = {}
        by_rule: dict[int, tuple[tuple[FieldEntry, tuple[str, ...]], ...]] = {}
        for index, rule in enumerate(rules):
            fields = cls.fields_of(rule)
            if not fields:
                continue
            # Per normalized key, the values accepted by every spelling of it (all must hold).
            wanted: dict[str, tuple[str, list[str]]] = {}
            for name, accepted in fields.items():
                key = cls.normalize(name)
                texts = list(dict.fromkeys(accepted_texts(accepted)))
                if key in wanted:
                    first, earlier = wanted[key]
                    wanted[key] = (first, [text for text in earlier if text in texts])
                else:
                    wanted[key] = (name, texts)
            bit = rule_bit(index, len(rules))
            own: list[tuple[FieldEntry, tuple[str, ...]]] = []
            for key, (name, texts) in wanted.items():
                entry = entries.get(key)
                if entry is None:
                    entry = entries[key] = FieldEntry(key, name, cls.prepare(key))
                entry.constrained |= bit
                for text in texts:
                    entry.by_value[text] = entry.by_value.get(text, 0) | bit
                own.append((entry, tuple(texts)))
            by_rule[index] = tuple(own)
        if not entries:
            return None
        everything = (1 << len(rules)) - 1
        for entry in entries.values():
            entry.unconstrained = everything & ~entry.constrained
        return cls(rules, list(entries.values()), by_rule)

    def mask(
        self,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
        candidates: int = ALL,
    ) -> int:
        # Narrowed from the candidates: right for each of them, as the engine needs.
        m = candidates
        for entry in self._entries:
            if entry.constrained & m:
                m &= entry.allowed(self.read(request, identity, entry))
                if not m:
                    break
        return m

    def reason(
        self,
        index: int,
        passed: bool,
        request: RequestInfo,
        identity: Identity,
        action: str | None,
    ) -> str:
        details: list[str] = []
        for entry, accepted in self._by_rule[index]:
            values = self.read(request, identity, entry)
            label = f"{self.kind} {entry.name}"
            if has_rule(entry.allowed(values), index, len(self.rules)):
                hit = next(value for value in values or () if value in accepted)
                details.append(f"{label} = {hit}")
            elif values is None:
                absent = self.absent(request, identity, entry)
                return f"{label} {absent} (needs {listing(accepted)})"
            else:
                return f"{label} is {self.shown(values)}, not in {listing(accepted)}"
        return ", ".join(details)
