"""Listing approvals page by page: the service's visibility filter over store pages, the API's
`?cursor=`/`?limit=` and `next_cursor`, and the CLI following the cursors."""

from __future__ import annotations

import argparse
import time
from typing import Any

import pytest

from proxy import cli_approvals
from proxy.approvals.service import ApprovalService
from proxy.audit import AuditLog
from proxy.config import ApprovalsSettings
from proxy.model import Approval, ApprovalState, Identity, Requester
from proxy.store.base import InvalidCursor
from proxy.store.memory import MemoryStore
from tests.conftest import Factory
from tests.helpers import AGENT_KEY, ALICE_KEY, MALLORY_KEY, ListSink, bearer
from tests.store_conformance import REQUESTER, make_approval, newest_first

API = "/_countersign/api/approvals"
EXPORT = "/cloud/exports/customers"
AGENT = Identity(subject=REQUESTER.subject, issuer=REQUESTER.issuer)
STRANGER = Requester(subject="someone-else", issuer="https://idp")


class CountingStore(MemoryStore):
    """Counts the store pages read."""

    pages = 0

    async def list(
        self, state: ApprovalState | None = None, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[Approval], str | None]:
        self.pages += 1
        return await super().list(state, limit, cursor)


async def filled(every: int, total: int) -> tuple[ApprovalService, CountingStore, list[Approval]]:
    """A service whose store holds `total` approvals, one in `every` of them the agent's own
    (others' approvals, for approvers the agent is not one of, it may not see)."""
    store = CountingStore()
    service = ApprovalService(store, ApprovalsSettings(), AuditLog([ListSink()]))
    now = time.time()
    own: list[Approval] = []
    for i in range(total):
        requester = REQUESTER if i % every == 0 else STRANGER
        approval, _ = await store.create_or_join(
            make_approval(requester=requester, created_at=now - total + i // 2)
        )
        if requester is REQUESTER:
            own.append(approval)
    return service, store, own


async def all_pages(
    service: ApprovalService, limit: int, state: ApprovalState | None = None
) -> list[list[Approval]]:
    pages: list[list[Approval]] = []
    cursor: str | None = None
    while True:
        page, cursor = await service.list_for(AGENT, state, limit, cursor)
        pages.append(page)
        if cursor is None:
            return pages
        assert len(pages) < 1000


@pytest.mark.parametrize(("every", "limit"), [(1, 7), (3, 10), (10, 4)])
async def test_pages_of_what_the_caller_may_see_hold_each_once(every: int, limit: int) -> None:
    service, _, own = await filled(every, 240)
    pages = await all_pages(service, limit)
    assert [a.id for page in pages for a in page] == newest_first(own)
    assert all(len(page) == limit for page in pages[:-1])


async def test_a_page_reads_a_bounded_number_of_store_pages() -> None:
    """Seeing one approval in a thousand, a call still reads at most five store pages; it
    answers short, with a cursor to go on."""
    service, store, own = await filled(1000, 2000)
    page, cursor = await service.list_for(AGENT, None, 10)
    assert store.pages <= 5
    assert len(page) < 10 and cursor is not None
    pages = await all_pages(service, 10)
    assert [a.id for page in pages for a in page] == newest_first(own)


async def test_a_state_filter_pages_too() -> None:
    service, store, own = await filled(2, 60)
    for approval in own[::2]:
        await store.expire(approval.id, approval.expires_at + 1)
    pages = await all_pages(service, 4, ApprovalState.EXPIRED)
    assert [a.id for page in pages for a in page] == newest_first(own[::2])


async def test_a_bad_cursor_is_invalid_cursor() -> None:
    service, _, _ = await filled(1, 3)
    with pytest.raises(InvalidCursor):
        await service.list_for(AGENT, None, 10, "garbage")


async def test_the_api_pages_with_cursor_and_limit(make_proxy: Factory) -> None:
    client, _ = await make_proxy(mode="async")
    agent, alice = bearer(AGENT_KEY), bearer(ALICE_KEY)
    for i in range(5):
        resp = await client.post(EXPORT, json={"n": i}, headers=agent)
        assert resp.status == 202
    seen: list[str] = []
    cursor: str | None = None
    sizes = []
    while True:
        params = {"limit": "2", "state": "pending"}
        if cursor is not None:
            params["cursor"] = cursor
        resp = await client.get(API, params=params, headers=alice)
        assert resp.status == 200
        body = await resp.json()
        assert set(body) == {"approvals", "next_cursor"}
        sizes.append(len(body["approvals"]))
        seen.extend(a["approval_id"] for a in body["approvals"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sizes == [2, 2, 1]
    assert len(set(seen)) == 5
    everything = await (await client.get(API, headers=alice)).json()
    assert [a["approval_id"] for a in everything["approvals"]] == seen
    assert everything["next_cursor"] is None
    nothing = await (await client.get(API, headers=bearer(MALLORY_KEY))).json()
    assert nothing == {"approvals": [], "next_cursor": None}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "-5"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "x" * 2000}, "cursor"),
    ],
)
async def test_the_api_refuses_a_bad_limit_or_cursor(
    make_proxy: Factory, params: dict[str, str], field: str
) -> None:
    client, _ = await make_proxy(mode="async")
    resp = await client.get(API, params=params, headers=bearer(ALICE_KEY))
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["code"], error["field"]) == ("invalid_request", field)
    assert error["message"]


async def test_the_cli_follows_next_cursor_up_to_its_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The API may answer short pages; the CLI goes on until it has `--limit` or the end."""
    served = [f"apr_{i}" for i in range(12)]
    asked: list[str] = []

    async def fake_call(method: str, url: str, bearer: str, payload: Any = None) -> Any:
        asked.append(url)
        query = dict(part.split("=", 1) for part in url.split("?", 1)[1].split("&"))
        start = int(query.get("cursor", "0"))
        end = min(start + min(int(query["limit"]), 3), len(served))  # at most 3 a page
        page = [{"approval_id": i} for i in served[start:end]]
        return {"approvals": page, "next_cursor": str(end) if end < len(served) else None}

    monkeypatch.setattr(cli_approvals, "_call", fake_call)
    body = await cli_approvals.list_approvals("http://proxy", "token", "pending", 7)
    assert [a["approval_id"] for a in body["approvals"]] == served[:7]
    assert body["next_cursor"] == "7"
    assert all("state=pending" in url for url in asked)
    assert "limit=7" in asked[0] and "limit=1" in asked[-1]
    asked.clear()
    body = await cli_approvals.list_approvals("http://proxy", "token", "all", 100)
    assert [a["approval_id"] for a in body["approvals"]] == served
    assert body["next_cursor"] is None
    assert not any("state=" in url for url in asked)


def test_the_cli_limit_must_be_positive() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli_approvals.add_parser(sub, lambda p: p)
    args = parser.parse_args(["approvals", "list", "--limit", "250"])
    assert args.limit == 250
    assert parser.parse_args(["approvals", "list"]).limit == 100
    with pytest.raises(SystemExit):
        parser.parse_args(["approvals", "list", "--limit", "0"])
