"""Route selection by path prefix (longest prefix wins) and the path to send upstream.

Prefixes are compared segment by segment against the decoded, normalized path (see
`proxy.paths.normalize_path`): a route with prefix "/cloud/" matches "/cloud", "/cloud/" and
"/cloud/…", never "/cloudy". A prefix without a trailing slash ("/cloud") means the same thing.

Pure code: no I/O, no aiohttp.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .paths import AmbiguousRequest, encode_path, normalize_path

if TYPE_CHECKING:
    from .config import RouteSettings

__all__ = ["RouteTable", "upstream_path"]


def _prefix_key(prefix: str) -> str:
    # "/cloud/" and "/cloud" → "/cloud"; "/" → "" (matches every path).
    return prefix.rstrip("/")


def check_prefix(prefix: str) -> None:
    """A prefix is a decoded path; it must be one that `normalize_path` can produce."""
    if not prefix.startswith("/"):
        raise ValueError(f"route prefix {prefix!r} must start with '/'")
    try:
        reachable = normalize_path(encode_path(prefix)) == prefix
    except AmbiguousRequest as exc:
        raise ValueError(f"route prefix {prefix!r} can never match: {exc.message}") from None
    if not reachable:
        raise ValueError(
            f"route prefix {prefix!r} can never match: request paths are normalized "
            "(no repeated slashes)"
        )


@lru_cache(maxsize=1024)
def _upstream_base(upstream: str) -> str:
    """The upstream URL's own path, decoded ("https://h/api/" → "/api/", "https://h" → "/").

    Raises `AmbiguousRequest` (a ValueError) when that path is itself ambiguous.
    """
    return normalize_path(urlsplit(upstream).path or "/")


def _after_prefix(route: RouteSettings, path: str) -> str:
    """What follows the route prefix in `path` (decoded or raw), counted in segments so that a
    raw path ("/cl%6Fud/x") or a case-folded match ("/Cloud/x") splits where the prefix ends.

    "" when `path` is the prefix itself (without a trailing slash).
    """
    segments = _prefix_key(route.prefix).count("/")
    if segments == 0:
        return path
    cut = 0
    for _ in range(segments):
        cut = path.find("/", cut + 1)
        if cut < 0:
            return ""
    return path[cut:]


def upstream_path(route: RouteSettings, path: str) -> str:
    """The decoded path to request upstream for the decoded, normalized `path` on `route`.

    With ``strip_prefix`` (the default) the route prefix is replaced by the upstream URL's path:
    upstream "https://h/api/", prefix "/cloud/": "/cloud/x/y" → "/api/x/y", "/cloud/" and
    "/cloud" → "/api/". With ``strip_prefix: false`` the whole path is appended to the upstream
    path: upstream "https://h/base/": "/cloud/x" → "/base/cloud/x"; upstream "https://h":
    "/cloud/x" → "/cloud/x".

    `path` must be one that `route` matches. The result is decoded; encode it with
    `proxy.paths.encode_path`.
    """
    base = _upstream_base(route.upstream)
    if not route.strip_prefix:
        return base.rstrip("/") + path
    rest = _after_prefix(route, path)
    if not rest:
        return base
    return base.rstrip("/") + rest


def upstream_target(
    route: RouteSettings, path: str, query: str, raw_path: str | None = None
) -> str:
    """The path and query the upstream is asked for, exactly as sent: what the policy judged,
    what an approval binds, and what `explain` shows.

    A route with `merge_slashes: false` forwards the client's own bytes after the prefix
    (`raw_path`, still percent-encoded: "%2B" stays "%2B", where S3 would read a bare "+" as a
    space); every other route sends the decoded path re-encoded canonically.
    """
    if not route.merge_slashes and raw_path is not None:
        rest = raw_path if route.strip_prefix is False else _after_prefix(route, raw_path)
        base = encode_path(_upstream_base(route.upstream))
        target = (base.rstrip("/") + rest) if rest else base
    else:
        target = encode_path(upstream_path(route, path))
    return f"{target}?{query}" if query else target


class RouteTable:
    """Routes indexed by prefix; `match` costs one dict lookup per path segment."""

    __slots__ = ("_by_key", "_folded", "routes")

    def __init__(self, routes: Sequence[RouteSettings]) -> None:
        self.routes: tuple[RouteSettings, ...] = tuple(routes)
        self._by_key: dict[str, RouteSettings] = {}
        # Routes with `case_insensitive_paths`, by lower-cased prefix: their upstream ignores
        # case, so "/Cloud/x" is theirs too.
        self._folded: dict[str, RouteSettings] = {}
        for route in self.routes:
            check_prefix(route.prefix)
            try:
                _upstream_base(route.upstream)
            except AmbiguousRequest as exc:
                raise ValueError(
                    f"route {route.name!r}: the path of upstream {route.upstream!r} is ambiguous: "
                    f"{exc.message}"
                ) from None
            key = _prefix_key(route.prefix)
            other = self._by_key.get(key)
            if other is not None:
                raise ValueError(
                    f"routes {other.name!r} ({other.prefix}) and {route.name!r} ({route.prefix}) "
                    "have the same prefix"
                )
            self._by_key[key] = route
            if route.case_insensitive_paths:
                self._folded[key.lower()] = route

    def __len__(self) -> int:
        return len(self.routes)

    def match(self, path: str) -> RouteSettings | None:
        """The route with the longest prefix matching the decoded, normalized `path`, or None."""
        by_key = self._by_key
        # Candidates, longest first: the path itself (without one trailing slash), then each
        # parent, down to "" (the "/" prefix).
        folded = self._folded
        candidate = path[:-1] if path.endswith("/") else path
        while True:
            route = by_key.get(candidate)
            if route is not None:
                return route
            if folded:
                route = folded.get(candidate.lower())
                if route is not None:
                    return route
            cut = candidate.rfind("/")
            if cut < 0:
                return None
            candidate = candidate[:cut]

    def match_raw(self, raw_path: str) -> RouteSettings | None:
        """The route whose prefix the undecoded `raw_path` starts with, compared as text: for
        choosing how to word a refusal of a path that cannot be normalized, never for
        forwarding."""
        return self.match(raw_path if raw_path.startswith("/") else "/")

    def upstream_path(self, route: RouteSettings, path: str) -> str:
        """Same as the module-level `upstream_path`."""
        return upstream_path(route, path)
