"""Policy: ordered rules, first match wins, compiled once at start (DESIGN §1 step 5).

A rule matches a request when every condition it states holds (one module per condition in
conditions/, registered in `conditions.CONDITIONS`):

- ``methods``: the request method is one of them (empty: any method). Methods are compared
  exactly, upper-case; **HEAD is not implied by GET** — list both to cover both.
- ``route``: the request was routed to the route with that name.
- ``actions``: one of the action globs ("iam:Create*", "tool:delete_*"; only ``*`` is special and
  it matches any run of characters) matches the action judged. A request naming several actions
  is judged once per action and the strictest outcome wins (deny > approve > allow); a rule with
  actions never matches a request naming none.
- ``paths``: the decoded, normalized request path matches one of the globs (empty: any path);
  see globs.py: ``*`` one non-empty segment, ``**`` any number of segments, ``*`` inside a
  segment any run of characters in it; one trailing slash ignored. On a route with
  ``case_insensitive_paths: true`` the case-folded path is matched against case-folded globs.
- ``when``: all of those present must hold: ``groups`` (the identity has at least one),
  ``subjects`` (the identity's subject is listed), ``claims`` (for each dotted claim path, the
  claim is the value or one of the listed values; a list claim matches when any element does),
  ``headers``, ``query``, ``form`` (the field's one value is listed) and ``json`` (for each JSON
  Pointer, the value in the body, or an element of the array there, is listed). A missing field
  never matches; a field read that appears more than once raises `AmbiguousField`; integers and
  booleans compare by their JSON text ("1", "true").

No rule matching: ``policy.default``. How it is fast and how `explain` reuses the evaluation:
engine.py. Pure code: no I/O, no aiohttp, no Redis.
"""

from __future__ import annotations

from .analysis import actions_cover, methods_cover, paths_cover, rule_covers, when_covers
from .engine import Explanation, Policy, RuleTrace
from .errors import PolicyError
from .globs import check_glob, glob_covers, globs_intersect, prefix_glob

__all__ = [
    "Explanation",
    "Policy",
    "PolicyError",
    "RuleTrace",
    "actions_cover",
    "check_glob",
    "glob_covers",
    "globs_intersect",
    "methods_cover",
    "paths_cover",
    "prefix_glob",
    "rule_covers",
    "when_covers",
]
