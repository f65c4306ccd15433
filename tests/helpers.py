"""Test configuration builders: real YAML through the real loader."""

from __future__ import annotations

from proxy.authn.apikeys import key_digest
from proxy.config import Settings, load_settings_text

AGENT_KEY = "cs_test_agent_key_0000000000000000000000"
CI_KEY = "cs_test_ci_key_000000000000000000000000000"

BASE_CONFIG = """
server:
  listen: "127.0.0.1:0"
  trusted_proxies: {trusted}
identity:
  issuers: {issuers}
  api_keys:
    - {{sha256: "{agent}", subject: "agent-key", groups: [agents], owner: "bob@example.com"}}
    - {{sha256: "{ci}", subject: "ci-key", groups: [ci]}}
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
) -> Settings:
    text = BASE_CONFIG.format(
        upstream=upstream.rstrip("/"),
        issuers=issuers,
        trusted=trusted,
        dead=dead,
        agent=key_digest(AGENT_KEY),
        ci=key_digest(CI_KEY),
    )
    return load_settings_text(text, "test.yaml", env={})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
