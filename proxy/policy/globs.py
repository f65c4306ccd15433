"""Path globs: the segment trie the `paths` condition walks, and the glob analysis `countersign
check` uses.

Globs are written decoded and compared segment by segment, case-sensitively:

- ``*`` as a whole segment matches exactly one non-empty segment;
- ``**`` as a whole segment matches any number of segments, including none (and empty ones);
- ``*`` inside a segment ("/v1/*.json") matches any run of characters within that one segment;
- everything else is literal (there are no ``?`` or ``[...]`` wildcards).

The leading slash and one trailing slash of a path are ignored ("/a/b/" is judged like "/a/b").
A path keeps empty segments ("/b/logs//2024") only on a route with ``merge_slashes: false``;
there an empty segment is a real segment that only ``**`` absorbs (no glob spells one, and
``*`` or a mid-segment pattern needs at least one character).

Why a trie: every glob of every rule is inserted once, its end node carrying the rule's bit
(as the caller numbers them). Walking the request's segments gives the mask of the rules whose
paths match, and the walk is memoized as a lazily built DFA, so a step is usually one dict
lookup, whatever the number of rules.

The analysis half (`glob_covers`, `globs_intersect`) is sound, not complete: a True is a proof,
a False may only mean "not shown". Pure code: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING

from .errors import PolicyError

if TYPE_CHECKING:
    from ..model import Identity, RequestInfo

__all__ = [
    "Trie",
    "check_glob",
    "glob_covers",
    "globs_intersect",
    "pattern_covers",
    "prefix_glob",
    "segment_matcher",
]


class _Node:
    """A trie node: where a glob prefix leads.

    While building, `literal`, `star`, `patterns` and `globstar` point to child nodes. `finish`
    then precomputes what the walk needs, as tuples of nodes: `closure` is the node plus the '**'
    nodes reachable from it without consuming a segment ('**' matching zero segments);
    `step_literal` maps a segment to the closure of the literal child; `step_any` is what any
    segment leads to ('*' child, and the node itself when it is a '**' node);
    `step_patterns` pairs each mid-segment wildcard matcher with its child's closure.
    """

    __slots__ = (
        "closure",
        "globs",
        "globstar",
        "literal",
        "loops",
        "mask",
        "patterns",
        "star",
        "step_any",
        "step_literal",
        "step_patterns",
    )

    def __init__(self, loops: bool = False) -> None:
        self.literal: dict[str, _Node] = {}
        self.star: _Node | None = None
        self.patterns: dict[str, tuple[Callable[[str], object], _Node]] = {}
        self.globstar: _Node | None = None
        self.loops = loops  # a '**' node: consumes any segment and stays
        self.mask = 0  # rules with a glob ending here
        self.globs: list[tuple[int, str]] = []  # (rule index, glob) ending here, for explain
        self.closure: tuple[_Node, ...] = (self,)
        self.step_literal: dict[str, tuple[_Node, ...]] = {}
        self.step_any: tuple[_Node, ...] = ()
        self.step_patterns: tuple[tuple[Callable[[str], object], tuple[_Node, ...]], ...] = ()

    def finish(self) -> None:
        """Precompute the walk tables, bottom-up (once, after all globs are inserted)."""
        children = list(self.literal.values())
        children.extend(child for _, child in self.patterns.values())
        if self.star is not None:
            children.append(self.star)
        if self.globstar is not None:
            children.append(self.globstar)
        for child in children:
            child.finish()
        if self.globstar is not None:
            self.closure = (self, *self.globstar.closure)
        self.step_literal = {segment: child.closure for segment, child in self.literal.items()}
        self.step_patterns = tuple(
            (matches, child.closure) for matches, child in self.patterns.values()
        )
        step_any: tuple[_Node, ...] = () if self.star is None else self.star.closure
        if self.loops:
            step_any += self.closure
        self.step_any = step_any


def check_glob(glob: str) -> None:
    """Raise `PolicyError` when `glob` is malformed or can never match a normalized path."""
    _glob_segments(glob)


def _glob_segments(glob: str) -> list[str]:
    if not glob.startswith("/"):
        raise PolicyError(f"path glob {glob!r} must start with '/'")
    if "//" in glob:
        raise PolicyError(f"path glob {glob!r} has an empty segment ('//'); it can never match")
    segments = [segment for segment in glob.split("/") if segment]
    for segment in segments:
        if segment in (".", ".."):
            raise PolicyError(
                f"path glob {glob!r} has a {segment!r} segment; request paths never do"
            )
        if "**" in segment and segment != "**":
            raise PolicyError(f"path glob {glob!r}: '**' must be a whole path segment")
    return segments


def segment_matcher(segment: str) -> Callable[[str], object]:
    pattern = ".*".join(re.escape(part) for part in segment.split("*"))
    return re.compile(pattern, re.DOTALL).fullmatch


class _State:
    """A set of trie nodes the walk can be in: one state of a DFA built lazily over the trie.

    Its transitions are remembered as they are first taken: by segment for the segments that are
    literal children of one of its nodes, by the set of matching mid-segment patterns otherwise
    (`any` when it has no patterns). How many there can be depends on the rules, not on the
    variety of paths seen (ids in paths all share the `any` transition), and `Trie.max_states`
    bounds it anyway.
    """

    __slots__ = (
        "any",
        "by_patterns",
        "empty",
        "literal",
        "literal_keys",
        "mask",
        "nodes",
        "patterns",
    )

    def __init__(self, nodes: frozenset[_Node], base: int) -> None:
        self.nodes = nodes
        mask = base
        keys: set[str] = set()
        patterns: list[tuple[Callable[[str], object], tuple[_Node, ...]]] = []
        for node in nodes:
            mask |= node.mask
            keys.update(node.step_literal)
            patterns.extend(node.step_patterns)
        self.mask = mask  # rules with a glob ending in one of the nodes, and the trie's `base`
        self.literal_keys = frozenset(keys)
        self.patterns = tuple(patterns)
        self.literal: dict[str, _State] = {}
        self.by_patterns: dict[tuple[int, ...], _State] = {}
        self.any: _State | None = None
        self.empty: _State | None = None  # after an empty segment (merge_slashes: false)

    def matching_patterns(self, segment: str) -> tuple[int, ...]:
        return tuple(i for i, (matches, _) in enumerate(self.patterns) if matches(segment))


class Trie:
    """Path globs in a segment trie, walked as a lazily built DFA (see `_State`)."""

    # Bound on remembered states; past it the cache starts over (correct, only slower).
    max_states = 20_000

    def __init__(self, base: int = 0) -> None:
        # `base`: rules every path meets (those without paths), ORed into every state's mask.
        self.base = base
        self.root = _Node()
        self._inserted: list[tuple[str, int, int]] = []  # (glob, rule index, bit), for `folded`
        self._folded: Trie | None = None
        self._states: dict[frozenset[_Node], _State] = {}
        self._start = _State(frozenset(), base)

    def insert(self, glob: str, rule_index: int, bit: int, shown: str | None = None) -> None:
        """Add `glob` for rule `rule_index`, whose bit in the masks is `bit`; `shown` is the glob
        as written, when `glob` is a transformed copy (the case-folded trie), for
        `globs_matching`."""
        segments = _glob_segments(glob)
        self._inserted.append((glob, rule_index, bit))
        node = self.root
        for segment in segments:
            if segment == "**":
                if node.globstar is None:
                    node.globstar = _Node(loops=True)
                node = node.globstar
            elif segment == "*":
                if node.star is None:
                    node.star = _Node()
                node = node.star
            elif "*" in segment:
                entry = node.patterns.get(segment)
                if entry is None:
                    entry = node.patterns[segment] = (segment_matcher(segment), _Node())
                node = entry[1]
            else:
                child = node.literal.get(segment)
                if child is None:
                    child = node.literal[segment] = _Node()
                node = child
        node.mask |= bit
        node.globs.append((rule_index, glob if shown is None else shown))

    def finish(self) -> None:
        """Call once after the last `insert`."""
        self.root.finish()
        self._states = {}
        self._start = self._state(frozenset(self.root.closure))

    def _state(self, nodes: frozenset[_Node]) -> _State:
        state = self._states.get(nodes)
        if state is None:
            if len(self._states) >= self.max_states:
                # Start over from a fresh start state, so the old states become garbage.
                start = frozenset(self.root.closure)
                self._states = {}
                self._start = self._states[start] = _State(start, self.base)
                if nodes == start:
                    return self._start
            state = self._states[nodes] = _State(nodes, self.base)
        return state

    def _step(self, state: _State, segment: str) -> _State:
        """Compute the transition (the NFA step over the trie) and remember it."""
        following: set[_Node] = set()
        for node in state.nodes:
            closure = node.step_literal.get(segment)
            if closure is not None:
                following.update(closure)
            following.update(node.step_any)
            for matches, closure in node.step_patterns:
                if matches(segment):
                    following.update(closure)
        result = self._state(frozenset(following))
        if segment in state.literal_keys:
            state.literal[segment] = result
        elif state.patterns:
            state.by_patterns[state.matching_patterns(segment)] = result
        else:
            state.any = result
        return result

    def _step_empty(self, state: _State) -> _State:
        """The transition on an empty segment: only '**' nodes absorb it."""
        following: set[_Node] = set()
        for node in state.nodes:
            if node.loops:
                following.update(node.closure)
        result = state.empty = self._state(frozenset(following))
        return result

    def _advance(self, state: _State, segment: str) -> _State:
        """One step of the walk on a non-empty segment (what `walk` inlines)."""
        following = state.literal.get(segment)
        if following is None:
            if segment in state.literal_keys:
                following = self._step(state, segment)
            elif state.patterns:
                following = state.by_patterns.get(state.matching_patterns(segment))
                if following is None:
                    following = self._step(state, segment)
            else:
                following = state.any
                if following is None:
                    following = self._step(state, segment)
        return following

    def globs_matching(self, path: str, rule_index: int) -> list[str]:
        """The globs of rule `rule_index` that match `path` (as written, in no set order)."""
        return [
            glob
            for node in self.walk(path).nodes
            for index, glob in node.globs
            if index == rule_index
        ]

    def walk(self, path: str) -> _State:
        """The state the path's segments lead to; globs ending in its nodes match the path.

        The leading slash and one trailing slash are ignored; any other empty segment ('//',
        kept on a route with merge_slashes: false) is a segment only '**' absorbs.
        """
        judged = path[:-1] if path.endswith("/") else path
        segments = judged.split("/")
        if segments[0] == "":
            del segments[0]
        state = self._start
        for segment in segments:
            if segment:
                state = self._advance(state, segment)
            else:
                following = state.empty
                state = self._step_empty(state) if following is None else following
            if not state.nodes:
                break
        return state

    def folded(self) -> Trie:
        """The twin of this trie for case-insensitive routes: the same globs case-folded (shown
        as written), built on first use."""
        twin = self._folded
        if twin is None:
            twin = Trie(self.base)
            for glob, rule_index, bit in self._inserted:
                twin.insert(glob.casefold(), rule_index, bit, shown=glob)
            twin.finish()
            self._folded = twin
        return twin

    def request_mask(
        self, request: RequestInfo, identity: Identity, action: str | None, candidates: int
    ) -> int:
        """The rules whose paths `request.path` meets (and `base`): the `paths` condition's
        step, called by the engine for every request, so `walk` is inlined here for the
        common path (no '//') and the case-folded twin walked for a case-insensitive route."""
        path = request.path  # normalized: it starts with '/'
        if request.fold_case:
            return self.folded().walk(path.casefold()).mask
        state = self._start
        leading = True
        for segment in path.split("/"):
            if not segment:
                if leading:  # the leading slash
                    leading = False
                    continue
                if "//" in path:  # an empty segment, not only a trailing slash
                    return self.walk(path).mask
                continue
            following = state.literal.get(segment)
            if following is None:
                if segment in state.literal_keys:
                    following = self._step(state, segment)
                elif state.patterns:
                    following = state.by_patterns.get(state.matching_patterns(segment))
                    if following is None:
                        following = self._step(state, segment)
                else:
                    following = state.any
                    if following is None:
                        following = self._step(state, segment)
            state = following
            if not state.nodes:
                break
        return state.mask


# --------------------------------------------------------------------------------------------
# Analysis (`countersign check`): which globs cover or meet others. Sound, not complete: a True
# from `glob_covers` is a proof; a False may only mean "not shown". (Rules: analysis.py.)


def pattern_covers(outer: str, inner: str) -> bool:
    """Whether every string mid-segment pattern `inner` matches, `outer` matches.

    `inner`'s '*' are symbols only a '*' of `outer` can absorb (whatever a '*' of `inner`
    stands for, the '*' of `outer` absorbing it absorbs that too): a sound check.
    """
    rows, cols = len(outer), len(inner)
    # reach[j]: outer[:i] can absorb inner[:j]
    reach = [True] + [False] * cols
    for i in range(rows):
        char = outer[i]
        following = [False] * (cols + 1)
        if char == "*":
            seen = False
            for j in range(cols + 1):
                seen = seen or reach[j]
                following[j] = seen
        else:
            for j in range(1, cols + 1):
                following[j] = reach[j - 1] and inner[j - 1] == char
        reach = following
    return reach[cols]


def _segment_covers(outer: str, inner: str) -> bool:
    """Whether every segment `inner` matches, `outer` matches (single-segment tokens)."""
    if outer == "*":
        return True
    if "*" not in outer:
        return outer == inner
    if inner == "*":
        return False  # a pattern like "x*" has a literal part "*" need not have
    return pattern_covers(outer, inner)


def _segment_intersects(a: str, b: str) -> bool:
    """Whether some (non-empty) segment matches both single-segment tokens."""
    if a == "*" or b == "*":
        return True
    if "*" not in a and "*" not in b:
        return a == b
    if "*" not in a:
        return bool(segment_matcher(b)(a))
    if "*" not in b:
        return bool(segment_matcher(a)(b))
    # Two patterns, each with a '*': a common string exists exactly when their literal
    # prefixes agree (one is a prefix of the other) and so do their literal suffixes; the
    # middle literals of both can then be laid out one after the other between them.
    a_head, a_tail = a.split("*", 1)[0], a.rsplit("*", 1)[1]
    b_head, b_tail = b.split("*", 1)[0], b.rsplit("*", 1)[1]
    return (a_head.startswith(b_head) or b_head.startswith(a_head)) and (
        a_tail.endswith(b_tail) or b_tail.endswith(a_tail)
    )


@lru_cache(maxsize=4096)
def _glob_tokens(glob: str) -> tuple[str, ...]:
    return tuple(_glob_segments(glob))


@lru_cache(maxsize=65536)
def glob_covers(outer: str, inner: str) -> bool:
    """Whether every path `inner` matches, `outer` matches too (proven; False: not shown)."""
    a = _glob_tokens(outer)
    b = _glob_tokens(inner)
    memo: dict[tuple[int, int], bool] = {}

    def covers(i: int, j: int) -> bool:
        key = (i, j)
        known = memo.get(key)
        if known is not None:
            return known
        if i == len(a):
            result = j == len(b)
        elif a[i] == "**":
            # outer's '**' stops here, or absorbs what inner's next token matches (even a '**')
            result = covers(i + 1, j) or (j < len(b) and covers(i, j + 1))
        elif j == len(b):
            result = False
        elif b[j] == "**":
            # inner's '**' matches no segment, or one (any) segment and then still '**'
            result = covers(i, j + 1) and _segment_covers(a[i], "*") and covers(i + 1, j)
        else:
            result = _segment_covers(a[i], b[j]) and covers(i + 1, j + 1)
        memo[key] = result
        return result

    return covers(0, 0)


@lru_cache(maxsize=65536)
def globs_intersect(first: str, second: str) -> bool:
    """Whether some path matches both globs (exact for `*`, `**` and mid-segment `*`)."""
    a = _glob_tokens(first)
    b = _glob_tokens(second)
    memo: dict[tuple[int, int], bool] = {}

    def meet(i: int, j: int) -> bool:
        key = (i, j)
        known = memo.get(key)
        if known is not None:
            return known
        if i == len(a):
            result = all(token == "**" for token in b[j:])
        elif j == len(b):
            result = all(token == "**" for token in a[i:])
        elif a[i] == "**" or b[j] == "**":
            # a '**' stops here, or absorbs the segment the other side's token matches
            result = (a[i] == "**" and (meet(i + 1, j) or meet(i, j + 1))) or (
                b[j] == "**" and (meet(i, j + 1) or meet(i + 1, j))
            )
        else:
            result = _segment_intersects(a[i], b[j]) and meet(i + 1, j + 1)
        memo[key] = result
        return result

    return meet(0, 0)


def prefix_glob(prefix: str) -> str:
    """The glob matching the paths a route prefix matches: "/cloud/" → "/cloud/**"."""
    return prefix.rstrip("/") + "/**"
