"""The approvers' web inbox in a real browser (headless Chromium through selenium) against the
real `countersign run` process and the real test IdP: log in, see, approve, deny, CSRF refusal,
the agent's owner refused in words, a grant given and used and revoked, logout at the IdP, every
page usable 375 px wide.

`make test` installs Chromium (`make browser`); without it these tests are skipped, saying so.
With `COUNTERSIGN_SCREENSHOTS=1` the run also saves docs/images/inbox-pending.png,
docs/images/inbox-approval.png and docs/images/inbox-grants.png (the README's pictures).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.authn.apikeys import key_digest
from tests.e2e.conftest import Process, free_port
from tests.helpers import AGENT_KEY, ALICE_KEY
from tests.idp_fixture import TestIdP

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Chromium and its driver: `make browser` (apt-get install chromium "
    "chromium-driver)",
)

UI = "/_countersign/ui/"
API = "/_countersign/api/approvals"
IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
SCREENSHOTS = os.environ.get("COUNTERSIGN_SCREENSHOTS") == "1"
WAIT = 15


class _Upstream(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.dumps({"ok": True, "path": self.path, "bytes": length}).encode()
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return


def config(port: int, upstream: str, idp: TestIdP) -> str:
    return f"""
server:
  listen: "127.0.0.1:{port}"
  public_url: "http://127.0.0.1:{port}"
identity:
  issuers: [{{issuer: "{idp.issuer}", audiences: [countersign]}}]
  api_keys:
    - {{sha256: "{key_digest(AGENT_KEY)}", subject: "report-agent", groups: [agents],
       owner: "bob@example.com"}}
    - {{sha256: "{key_digest(ALICE_KEY)}", subject: "alice-cli", email: "alice@example.com",
       groups: [data-owners]}}
  web_login:
    issuer: "{idp.issuer}"
    client_id: people
    scopes: [openid, email, profile]
    session_secret: "test-session-secret-0123456789abcdef"
routes:
  - {{name: cloud, prefix: /cloud/, upstream: "{upstream}",
      inject_headers: {{Authorization: "Bearer upstream-secret-token"}}}}
approvals:
  timeout_seconds: 120
policy:
  rules:
    - name: exports
      route: cloud
      methods: [POST]
      paths: ["/cloud/exports/**"]
      action: approve
      approvers: {{groups: [data-owners]}}
    - name: reports
      route: cloud
      methods: [POST]
      paths: ["/cloud/reports/**"]
      action: approve
      approvers: {{groups: [data-owners]}}
      grant: {{max_uses: 5, max_seconds: 3600}}
      risk: high
      note: "Reports go to the board's mailbox: check the quarter and the recipients."
"""


class Inbox:
    def __init__(self, proc: Process, pool: ThreadPoolExecutor) -> None:
        self.proc = proc
        self.base = proc.url
        self._pool = pool

    def agent(self, path: str, body: dict[str, Any], reason: str) -> Future[httpx.Response]:
        """A held agent request, answered once decided."""

        def call() -> httpx.Response:
            return httpx.post(
                self.base + path,
                json=body,
                headers={"Authorization": f"Bearer {AGENT_KEY}", "Countersign-Reason": reason},
                timeout=60,
            )

        return self._pool.submit(call)

    def api(self, path: str, prefix: str = API) -> Any:
        resp = httpx.get(
            self.base + prefix + path, headers={"Authorization": f"Bearer {ALICE_KEY}"}, timeout=10
        )
        return resp.json()

    def pending(self, count: int) -> list[str]:
        import time

        for _ in range(200):
            found = self.api("?state=pending")["approvals"]
            if len(found) >= count:
                return [a["approval_id"] for a in found]
            time.sleep(0.05)
        raise AssertionError(f"{count} pending approvals did not appear")

    def pending_on(self, path: str) -> str:
        """The newest pending approval of a request on `path` (without its query)."""
        import time

        for _ in range(200):
            found = self.api("?state=pending")["approvals"]
            mine = [a["approval_id"] for a in found if a["path"] == path]
            if mine:
                return str(mine[0])
            time.sleep(0.05)
        raise AssertionError(f"no pending approval on {path} appeared")


@pytest.fixture(scope="module")
def inbox(idp: TestIdP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inbox]:
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    workdir = tmp_path_factory.mktemp("inbox")
    (workdir / "countersign.yaml").write_text(
        config(port, f"http://127.0.0.1:{upstream.server_port}/", idp)
    )
    proc = Process(["run", "-c", str(workdir / "countersign.yaml")], workdir, port)
    pool = ThreadPoolExecutor(8)
    try:
        yield Inbox(proc, pool)
    finally:
        proc.stop()
        pool.shutdown(wait=False, cancel_futures=True)
        upstream.shutdown()


@pytest.fixture(scope="module")
def chrome() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in containers
        "--disable-dev-shm-usage",
        "--window-size=900,1200",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT).until(condition, message=what)


def log_in(driver: Any, inbox: Inbox, person: str) -> None:
    """As a person does: open the inbox, land on the IdP's form, type, press Log in."""
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(inbox.base + UI)
    field = wait_for(driver, lambda d: d.find_element(By.ID, "login"), "the IdP's login form")
    assert driver.current_url.startswith(inbox.base) is False, "the login happens at the IdP"
    field.send_keys(person)
    driver.find_element(By.ID, "submit").click()
    wait_for(driver, lambda d: d.current_url.startswith(inbox.base + UI), "back in the inbox")
    me = wait_for(driver, lambda d: d.find_element(By.ID, "me"), "logged in")
    assert me.text == person


def open_approval(driver: Any, inbox: Inbox, approval_id: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{inbox.base}{UI}approvals/{approval_id}")
    wait_for(driver, lambda d: d.find_element(By.ID, "quorum"), "the approval page")


def test_log_in_see_approve_and_deny_in_a_real_browser(inbox: Inbox, chrome: Any) -> None:
    from selenium.webdriver.common.by import By

    first = inbox.agent(
        "/cloud/exports/customers?month=2026-11", {"format": "csv"}, "monthly report"
    )
    inbox.pending(1)
    second = inbox.agent(
        "/cloud/exports/payroll",
        {"format": "parquet", "columns": ["name", "salary"]},
        "payroll sync",
    )
    ids = inbox.pending(2)
    payroll, customers = ids[0], ids[1]  # newest first

    log_in(chrome, inbox, "alice@example.com")
    wait_for(
        chrome,
        lambda d: "Waiting for you (2)" in d.page_source or d.refresh(),
        "both approvals waiting for alice",
    )
    cards = chrome.find_elements(By.CSS_SELECTOR, "a.card")
    assert {c.get_attribute("data-approval") for c in cards} == {payroll, customers}
    assert "report-agent" in chrome.page_source and "bob@example.com" in chrome.page_source
    if SCREENSHOTS:
        IMAGES.mkdir(parents=True, exist_ok=True)
        chrome.set_window_size(900, 500)
        chrome.save_screenshot(str(IMAGES / "inbox-pending.png"))
        chrome.set_window_size(900, 1200)

    # Approve the customers export: the agent's held call completes.
    chrome.find_element(By.CSS_SELECTOR, f'a.card[data-approval="{customers}"]').click()
    wait_for(chrome, lambda d: d.find_element(By.ID, "quorum"), "the approval page")
    page = chrome.page_source
    for shown in ("monthly report", "/cloud/exports/customers?month=2026-11", "bob@example.com"):
        assert shown in page, shown
    assert "upstream-secret-token" not in page
    assert chrome.find_element(By.ID, "countdown").text.endswith("left")
    chrome.find_element(By.ID, "reason").send_keys("checked the month")
    chrome.find_element(By.XPATH, "//button[text()='Approve']").click()
    notice = wait_for(chrome, lambda d: d.find_element(By.ID, "notice"), "the approval recorded")
    assert notice.text == "Your approval was recorded."
    answer = first.result(timeout=WAIT)
    assert answer.status_code == 200 and answer.json()["ok"] is True
    shown = inbox.api(f"/{customers}")
    assert [(d["channel"], d["approver"]["person"]) for d in shown["decisions"]] == [
        ("web", "alice@example.com")
    ]

    # Deny the payroll export with a reason: the agent reads it.
    open_approval(chrome, inbox, payroll)
    chrome.find_element(By.ID, "reason").send_keys("payroll stays in-house")
    chrome.find_element(By.XPATH, "//button[text()='Deny']").click()
    wait_for(chrome, lambda d: d.find_element(By.ID, "notice"), "the denial recorded")
    answer = second.result(timeout=WAIT)
    error = answer.json()["error"]
    assert answer.status_code == 403 and error["code"] == "approval_denied"
    assert error["reason"] == "payroll stays in-house"
    assert "alice@example.com" in error["message"]


def test_a_tampered_csrf_token_is_refused_and_the_owner_is_told_why(
    inbox: Inbox, chrome: Any
) -> None:
    from selenium.webdriver.common.by import By

    held = inbox.agent("/cloud/exports/ledger", {"format": "csv"}, "ledger")
    approval_id = inbox.pending(1)[0]

    log_in(chrome, inbox, "alice@example.com")
    open_approval(chrome, inbox, approval_id)
    chrome.execute_script(
        "document.querySelector('form.decide input[name=csrf]').value = 'tampered'"
    )
    chrome.find_element(By.XPATH, "//button[text()='Approve']").click()
    message = wait_for(chrome, lambda d: d.find_element(By.ID, "message"), "the refusal page")
    assert "CSRF token is missing or wrong" in message.text
    assert "nothing was done" in message.text
    assert chrome.current_url == f"{inbox.base}{UI}approvals/{approval_id}/decision"
    assert inbox.api(f"/{approval_id}")["state"] == "pending"

    # bob is the agent's owner: he sees the request but may not decide it, and is told why.
    log_in(chrome, inbox, "bob@example.com")
    assert "Nothing is waiting for you" in chrome.page_source
    open_approval(chrome, inbox, approval_id)
    why = chrome.find_element(By.ID, "why-not").text
    assert why == "you cannot decide a request made on your behalf"
    assert not chrome.find_elements(By.XPATH, "//button[text()='Approve']")
    assert inbox.api(f"/{approval_id}")["state"] == "pending"
    assert not held.done()


def fits_375(driver: Any, what: str) -> None:
    """The page as a 375 px wide phone shows it: nothing wider than the screen (no sideways
    scrolling), and every button inside it."""
    from selenium.webdriver.common.by import By

    assert driver.execute_script("return window.innerWidth") == 375, what
    width = driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= 375, f"{what} is {width} px wide at 375 px"
    for button in driver.find_elements(By.CSS_SELECTOR, "button"):
        if button.is_displayed():
            right = driver.execute_script(
                "return arguments[0].getBoundingClientRect().right", button
            )
            assert right <= 375, f"{what}: button {button.text!r} ends at {right} px"


def test_grant_in_the_inbox_then_revoke_it_and_every_page_fits_a_phone(
    inbox: Inbox, chrome: Any
) -> None:
    from selenium.webdriver.common.by import By

    first = inbox.agent("/cloud/reports/q4", {"quarter": "2026-Q4", "to": "board"}, "Q4 report")
    approval_id = inbox.pending_on("/cloud/reports/q4")
    log_in(chrome, inbox, "alice@example.com")
    open_approval(chrome, inbox, approval_id)
    assert chrome.find_element(By.CSS_SELECTOR, "h1 .badge.risk-high").text == "risk: high"
    assert "board's mailbox" in chrome.find_element(By.ID, "rule-note").text
    assert "data-owners" in chrome.find_element(By.ID, "approvers").text
    uses = chrome.find_element(By.ID, "grant-uses")
    minutes = chrome.find_element(By.ID, "grant-time")
    assert (uses.get_attribute("value"), uses.get_attribute("max")) == ("5", "5")
    assert (minutes.get_attribute("value"), minutes.get_attribute("max")) == ("60", "60")
    covers = chrome.find_element(By.ID, "grant-covers").text
    assert "POST /cloud/reports/q4" in covers and "same agent" in covers
    button = chrome.find_element(By.ID, "approve-grant")
    assert button.text == "Approve this and the next 5 like it for 60 minutes"
    if SCREENSHOTS:
        chrome.set_window_size(900, 1900)
        chrome.save_screenshot(str(IMAGES / "inbox-approval.png"))
        chrome.set_window_size(900, 1200)
    uses.clear()
    uses.send_keys("2")
    minutes.clear()
    minutes.send_keys("10")
    assert button.text == "Approve this and the next 2 like it for 10 minutes"
    chrome.find_element(By.ID, "reason").send_keys("Q4 is due")
    button.click()
    wait_for(chrome, lambda d: d.find_element(By.ID, "notice"), "the approval recorded")
    assert first.result(timeout=WAIT).status_code == 200
    made = chrome.find_element(By.ID, "grant-made")
    grant_id = made.get_attribute("data-grant")
    assert "Uses left: 2 of 2" in made.text and "active" in made.text

    # The next report like it (another body) goes through the real process without a human.
    second = inbox.agent("/cloud/reports/q4", {"quarter": "2026-Q4", "to": "audit"}, "again")
    answer = second.result(timeout=WAIT)
    assert answer.status_code == 200 and answer.headers["Countersign-Grant-Id"] == grant_id
    chrome.refresh()
    made = wait_for(chrome, lambda d: d.find_element(By.ID, "grant-made"), "the grant")
    assert "Uses left: 1 of 2" in made.text

    # The grants page lists it; alice revokes it.
    chrome.find_element(By.LINK_TEXT, "Grants").click()
    card = wait_for(
        chrome,
        lambda d: d.find_element(By.CSS_SELECTOR, f'.card[data-grant="{grant_id}"]'),
        "the grant on the grants page",
    )
    for shown in ("reports", "POST /cloud/reports/q4", "report-agent", "1 of 2"):
        assert shown in card.text, shown
    if SCREENSHOTS:
        chrome.set_window_size(900, 700)
        chrome.save_screenshot(str(IMAGES / "inbox-grants.png"))
        chrome.set_window_size(900, 1200)

    # Every page at 375 px: pending, an approval, history, grants.
    chrome.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 375, "height": 812, "deviceScaleFactor": 1, "mobile": True},
    )
    try:
        for path, marker in (
            ("", "h1"),
            (f"approvals/{approval_id}", "#quorum"),
            ("history", "form.filters"),
            ("grants", f'.card[data-grant="{grant_id}"]'),
        ):
            chrome.get(inbox.base + UI + path)
            wait_for(chrome, lambda d, m=marker: d.find_element(By.CSS_SELECTOR, m), path)
            fits_375(chrome, path or "pending")
        third = inbox.agent("/cloud/reports/q1", {"quarter": "2027-Q1"}, "a pending one")
        pending = inbox.pending_on("/cloud/reports/q1")
        open_approval(chrome, inbox, pending)
        fits_375(chrome, "an approval with its decision form and grant offer")
    finally:
        chrome.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    chrome.get(inbox.base + UI + "grants")
    revoke = wait_for(
        chrome,
        lambda d: d.find_element(
            By.CSS_SELECTOR, f'.card[data-grant="{grant_id}"] form.revoke button'
        ),
        "the revoke button",
    )
    revoke.click()
    notice = wait_for(chrome, lambda d: d.find_element(By.ID, "notice"), "the revocation")
    assert grant_id in notice.text and "revoked" in notice.text
    assert inbox.api(f"/{grant_id}", "/_countersign/api/grants")["state"] == "revoked"
    # Decide the pending one so nothing is left waiting.
    open_approval(chrome, inbox, pending)
    chrome.find_element(By.ID, "reason").send_keys("not yet")
    chrome.find_element(By.XPATH, "//button[text()='Deny']").click()
    wait_for(chrome, lambda d: d.find_element(By.ID, "notice"), "the denial recorded")
    assert third.result(timeout=WAIT).status_code == 403


def test_logout_ends_the_session_at_the_idp_too(inbox: Inbox, chrome: Any) -> None:
    from selenium.webdriver.common.by import By

    log_in(chrome, inbox, "alice@example.com")
    chrome.find_element(By.XPATH, "//button[text()='Log out']").click()
    # The IdP (oidc-provider) asks before ending its session; then sends the browser back.
    wait_for(chrome, lambda d: d.find_element(By.NAME, "logout"), "the IdP's logout question")
    assert not chrome.current_url.startswith(inbox.base)
    chrome.find_element(By.NAME, "logout").click()
    message = wait_for(chrome, lambda d: d.find_element(By.ID, "message"), "back in the inbox")
    assert chrome.current_url.startswith(f"{inbox.base}{UI}logged-out")
    assert "logged out of the inbox and of your identity provider" in message.text
    # Opening the inbox again asks who you are (the IdP no longer remembers alice).
    chrome.get(inbox.base + UI)
    wait_for(chrome, lambda d: d.find_element(By.ID, "login"), "the IdP's login form again")
