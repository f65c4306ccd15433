"""Route selection (longest prefix, segment boundaries) and the path sent upstream."""

from __future__ import annotations

import time

import pytest

from proxy.config import RouteSettings
from proxy.paths import encode_path
from proxy.routing import RouteTable, upstream_path


def route(
    name: str, prefix: str, upstream: str = "https://up.example/", strip_prefix: bool = True
) -> RouteSettings:
    return RouteSettings(name=name, prefix=prefix, upstream=upstream, strip_prefix=strip_prefix)


TABLE = RouteTable(
    [
        route("root", "/"),
        route("cloud", "/cloud/"),
        route("cloud-admin", "/cloud/admin/"),
        route("cloudy", "/cloudy/"),
        route("db", "/db"),  # no trailing slash: same meaning
        route("deep", "/a/b/c/"),
    ]
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/cloud/x", "cloud"),
        ("/cloud/x/y/z", "cloud"),
        ("/cloud", "cloud"),
        ("/cloud/", "cloud"),
        ("/cloudy", "cloudy"),
        ("/cloudy/", "cloudy"),
        ("/cloudy/x", "cloudy"),
        ("/cloud/admin", "cloud-admin"),
        ("/cloud/admin/", "cloud-admin"),
        ("/cloud/admin/users/1", "cloud-admin"),
        ("/cloud/administrator", "cloud"),
        ("/cloud/x/admin", "cloud"),
        ("/db", "db"),
        ("/db/", "db"),
        ("/db/tables/t1", "db"),
        ("/dbx", "root"),
        ("/clou", "root"),
        ("/Cloud/x", "root"),  # case-sensitive
        ("/a/b/c", "deep"),
        ("/a/b/c/d", "deep"),
        ("/a/b", "root"),
        ("/a/b/cd", "root"),
        ("/", "root"),
        ("/other/thing", "root"),
    ],
)
def test_longest_prefix_wins(path: str, expected: str) -> None:
    matched = TABLE.match(path)
    assert matched is not None
    assert matched.name == expected


@pytest.mark.parametrize("path", ["/", "/clou", "/cloudx", "/other", "/cloudy", "/Cloud/"])
def test_no_route(path: str) -> None:
    table = RouteTable([route("cloud", "/cloud/")])
    assert table.match(path) is None


def test_cloudy_prefix_is_not_matched_by_cloud_paths() -> None:
    table = RouteTable([route("cloudy", "/cloudy/")])
    assert table.match("/cloud/x") is None
    assert table.match("/cloud") is None
    table = RouteTable([route("cloud", "/cloud/")])
    assert table.match("/cloudy") is None
    assert table.match("/cloudy/x") is None


def test_empty_table() -> None:
    table = RouteTable([])
    assert len(table) == 0
    assert table.match("/") is None
    assert table.match("/x") is None


def test_routes_and_len() -> None:
    assert len(TABLE) == 6
    assert [r.name for r in TABLE.routes] == [
        "root",
        "cloud",
        "cloud-admin",
        "cloudy",
        "db",
        "deep",
    ]


def test_same_prefix_with_and_without_slash_is_refused() -> None:
    with pytest.raises(ValueError, match="same prefix"):
        RouteTable([route("a", "/cloud/"), route("b", "/cloud")])


@pytest.mark.parametrize("prefix", ["/a//b/", "/a/../b/", "/a/./", "/a\\b/", "/a\x00/"])
def test_unreachable_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="can never match"):
        RouteTable([route("a", prefix)])


def test_decoded_prefix_with_special_characters() -> None:
    table = RouteTable([route("space", "/my api/"), route("semi", "/a;b/")])
    matched = table.match("/my api/x")
    assert matched is not None and matched.name == "space"
    matched = table.match("/a;b")  # reachable through an encoded %3B
    assert matched is not None and matched.name == "semi"


def test_ambiguous_upstream_path_is_refused() -> None:
    with pytest.raises(ValueError, match="upstream"):
        RouteTable([route("a", "/a/", upstream="https://up.example/x%2Fy/")])


def test_lookup_cost_does_not_grow_with_the_number_of_routes() -> None:
    routes = [route(f"r{i}", f"/tenant{i}/api/") for i in range(10_000)]
    table = RouteTable(routes)
    matched = table.match("/tenant9876/api/items/1")
    assert matched is not None and matched.name == "r9876"
    assert table.match("/tenant10000/api/x") is None
    start = time.perf_counter()
    for _ in range(10_000):
        table.match("/tenant9876/api/items/1/children/2")
    per_call = (time.perf_counter() - start) / 10_000
    assert per_call < 100e-6  # a scan of 10,000 prefixes would be far slower


# --------------------------------------------------------------------------------------------
# upstream_path


@pytest.mark.parametrize(
    ("upstream", "prefix", "strip", "path", "expected"),
    [
        # strip_prefix (default): the prefix is replaced by the upstream URL's path
        ("https://h/api/", "/cloud/", True, "/cloud/x/y", "/api/x/y"),
        ("https://h/api/", "/cloud/", True, "/cloud", "/api/"),
        ("https://h/api/", "/cloud/", True, "/cloud/", "/api/"),
        ("https://h/api/", "/cloud/", True, "/cloud/x/", "/api/x/"),
        ("https://h/api", "/cloud/", True, "/cloud/x", "/api/x"),
        ("https://h/api", "/cloud/", True, "/cloud", "/api"),
        ("https://h/api/v2/", "/cloud", True, "/cloud/x", "/api/v2/x"),
        ("https://h", "/cloud/", True, "/cloud/x", "/x"),
        ("https://h", "/cloud/", True, "/cloud", "/"),
        ("https://h/", "/cloud/", True, "/cloud/", "/"),
        ("https://h:8443/", "/", True, "/x/y", "/x/y"),
        ("https://h/api/", "/", True, "/", "/api/"),
        ("https://h/api/", "/", True, "/x", "/api/x"),
        ("https://h/api/", "/a/b/", True, "/a/b/c d/é", "/api/c d/é"),
        ("https://h/my%20api/", "/c/", True, "/c/x", "/my api/x"),
        # strip_prefix false: the whole path is appended to the upstream path
        ("https://h/base/", "/cloud/", False, "/cloud/x", "/base/cloud/x"),
        ("https://h/base", "/cloud/", False, "/cloud/x", "/base/cloud/x"),
        ("https://h/base/", "/cloud/", False, "/cloud", "/base/cloud"),
        ("https://h", "/cloud/", False, "/cloud/x", "/cloud/x"),
        ("https://h/", "/cloud/", False, "/cloud/", "/cloud/"),
        ("https://h/", "/", False, "/", "/"),
    ],
)
def test_upstream_path(upstream: str, prefix: str, strip: bool, path: str, expected: str) -> None:
    r = route("r", prefix, upstream=upstream, strip_prefix=strip)
    table = RouteTable([r])
    assert table.match(path) is r
    assert upstream_path(r, path) == expected
    assert table.upstream_path(r, path) == expected


def test_strip_prefix_defaults_to_true() -> None:
    r = RouteSettings(name="r", prefix="/cloud/", upstream="https://h/api/")
    assert upstream_path(r, "/cloud/x") == "/api/x"


def test_upstream_path_is_decoded_and_encodes_canonically() -> None:
    r = route("r", "/files/", upstream="https://h/store%20v2/")
    path = upstream_path(r, "/files/caf é;1")
    assert path == "/store v2/caf é;1"
    assert encode_path(path) == "/store%20v2/caf%20%C3%A9%3B1"
