"""Rule analysis for `countersign check`: whether one rule matches every request another would.

Sound, not complete: a True from `rule_covers` is a proof, so `check` can say a later rule is
shadowed without guessing; a False may only mean "not shown". Every condition of the earlier
rule must be implied by the later rule's own conditions; a condition this module does not know
how to compare makes the answer False (never a false warning). Pure code: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..config import accepted_texts
from .globs import glob_covers, pattern_covers

if TYPE_CHECKING:
    from ..config import Accepted, RuleSettings, WhenSettings

__all__ = ["actions_cover", "methods_cover", "paths_cover", "rule_covers", "when_covers"]


def _values_cover(
    outer: Mapping[str, Accepted], inner: Mapping[str, Accepted] | None, *, fold: bool = False
) -> bool:
    """Whether every field `outer` constrains, `inner` constrains to a subset of its values.

    `fold`: field names compare case-insensitively (headers)."""
    if not outer:
        return True
    if not inner:
        return False
    wanted = {
        (name.lower() if fold else name): set(accepted_texts(accepted))
        for name, accepted in inner.items()
    }
    for name, accepted in outer.items():
        inner_values = wanted.get(name.lower() if fold else name)
        if inner_values is None or not inner_values <= set(accepted_texts(accepted)):
            return False
    return True


def when_covers(outer: WhenSettings | None, inner: WhenSettings | None) -> bool:
    """Whether every request and identity meeting `inner`'s conditions meets `outer`'s
    (proven)."""
    if outer is None:
        return True
    if outer.groups and not (
        inner is not None and inner.groups and set(inner.groups) <= set(outer.groups)
    ):
        return False
    if outer.subjects and not (
        inner is not None and inner.subjects and set(inner.subjects) <= set(outer.subjects)
    ):
        return False
    return (
        _values_cover(outer.claims, None if inner is None else inner.claims)
        and _values_cover(outer.headers, None if inner is None else inner.headers, fold=True)
        and _values_cover(outer.query, None if inner is None else inner.query)
        and _values_cover(outer.json_fields, None if inner is None else inner.json_fields)
        and _values_cover(outer.form, None if inner is None else inner.form)
    )


def methods_cover(outer: tuple[str, ...], inner: tuple[str, ...]) -> bool:
    """Whether every method `inner` accepts, `outer` accepts (empty: any method)."""
    return not outer or (bool(inner) and set(inner) <= set(outer))


def actions_cover(outer: tuple[str, ...], inner: tuple[str, ...]) -> bool:
    """Whether every action `inner`'s globs match, one of `outer`'s globs matches (empty: any
    action, and also a request naming none)."""
    if not outer:
        return True
    return bool(inner) and all(any(pattern_covers(o, i) for o in outer) for i in inner)


def paths_cover(outer: tuple[str, ...], inner: tuple[str, ...], region: str | None = None) -> bool:
    """Whether every path `inner` matches (within `region`, a glob, when given), `outer` matches.

    Empty globs mean any path. Each glob of `inner` must be covered by one glob of `outer`
    (sound: a union of several `outer` globs covering it is not looked for).
    """
    outer = outer or ("/**",)
    inner = inner or ("/**",)
    return all(
        any(glob_covers(o, i) or (region is not None and glob_covers(o, region)) for o in outer)
        for i in inner
    )


def rule_covers(
    earlier: RuleSettings,
    later: RuleSettings,
    *,
    later_route: str | None = None,
    later_region: str | None = None,
) -> bool:
    """Whether every request `later` matches, `earlier` matches too (proven; False: not shown).

    `later_route` is the route every request `later` matches is routed to, when that is known
    (its own `route`, or the one all its paths lead to); `later_region` that route's prefix
    glob. Both only help to prove more.
    """
    route = later.route if later.route is not None else later_route
    if earlier.route is not None and earlier.route != route:
        return False
    return (
        methods_cover(earlier.methods, later.methods)
        and actions_cover(earlier.actions, later.actions)
        and when_covers(earlier.when, later.when)
        and paths_cover(earlier.paths, later.paths, later_region)
    )
