"""Test configuration builders: real YAML through the real loader."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from proxy.audit import Sink, render
from proxy.authn.apikeys import key_digest
from proxy.config import Settings, load_settings_text

AGENT_KEY = "cs_test_agent_key_0000000000000000000000"  # agent-key, acts for bob
CI_KEY = "cs_test_ci_key_000000000000000000000000000"
ALICE_KEY = "cs_test_alice_key_000000000000000000000000"  # data-owners by token group
BOB_KEY = "cs_test_bob_key_00000000000000000000000000"  # data-owners, but owns agent-key
CAROL_KEY = "cs_test_carol_key_000000000000000000000000"  # data-owners via the directory
DAVE_KEY = "cs_test_dave_key_0000000000000000000000000"  # data-owners by token group
MALLORY_KEY = "cs_test_mallory_key_00000000000000000000000"  # no rights at all

BASE_CONFIG = """
server:
  listen: "127.0.0.1:0"
  trusted_proxies: {trusted}
  max_body_bytes: {max_body}
identity:
  issuers: {issuers}
  api_keys:
    - {{sha256: "{agent}", subject: "agent-key", groups: [agents], owner: "bob@example.com"}}
    - {{sha256: "{ci}", subject: "ci-key", groups: [ci]}}
    - {{sha256: "{alice}", subject: "alice", groups: [data-owners], email: "alice@example.com"}}
    - {{sha256: "{bob}", subject: "bob", groups: [data-owners], email: "bob@example.com"}}
    - {{sha256: "{carol}", subject: "carol", email: "carol@example.com"}}
    - {{sha256: "{dave}", subject: "dave", groups: [data-owners], email: "dave@example.com"}}
    - {{sha256: "{mallory}", subject: "mallory", email: "mallory@example.com"}}
routes:
  - name: cloud
    prefix: /cloud/
    upstream: "{upstream}/api/"
    inject_headers: {{X-Cloud-Token: "upstream-secret-123"}}
  - name: raw
    prefix: /raw/
    upstream: "{upstream}"
    strip_prefix: false
    timeout_seconds: 0.5
  - name: dead
    prefix: /dead/
    upstream: "{dead}"
approvals:
  mode: {mode}
  timeout_seconds: {timeout}
  claim_seconds: {claim}
  groups: {{data-owners: ["carol@example.com"]}}
policy:
  default: deny
  rules:
    - {{name: reads, methods: [GET, HEAD], action: allow}}
    - name: exports
      route: cloud
      methods: [POST]
      paths: ["/cloud/exports/**"]
      when: {{groups: [agents]}}
      action: approve
      approvers: {{groups: [data-owners]}}
    - name: iam
      route: cloud
      methods: [POST]
      paths: ["/cloud/iam/**"]
      action: approve
      approvers: {{groups: [data-owners]}}
      quorum: 2
    - {{name: no-deletes, methods: [DELETE], action: deny}}
    - name: uploads
      methods: [PUT, POST]
      paths: ["/cloud/uploads/**", "/raw/**"]
      action: allow
"""


def settings_for(
    upstream: str,
    *,
    issuers: str = "[]",
    trusted: str = "[]",
    dead: str = "http://127.0.0.1:9",
    mode: str = "hold",
    timeout: int = 60,
    claim: int = 600,
    max_body: int = 1_000_000,
) -> Settings:
    text = BASE_CONFIG.format(
        upstream=upstream.rstrip("/"),
        issuers=issuers,
        trusted=trusted,
        dead=dead,
        mode=mode,
        timeout=timeout,
        claim=claim,
        max_body=max_body,
        agent=key_digest(AGENT_KEY),
        ci=key_digest(CI_KEY),
        alice=key_digest(ALICE_KEY),
        bob=key_digest(BOB_KEY),
        carol=key_digest(CAROL_KEY),
        dave=key_digest(DAVE_KEY),
        mallory=key_digest(MALLORY_KEY),
    )
    return load_settings_text(text, "test.yaml", env={})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class ListSink(Sink):
    """An audit sink that keeps the events, for assertions."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def write(self, event: Mapping[str, Any]) -> None:
        # Round-trip through JSON, as every real sink does.
        self.events.append(json.loads(render(event)))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]
