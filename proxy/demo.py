"""`countersign demo`: the whole product on embedded defaults, no external service.

It starts a pretend cloud API (the sample upstream) on a free loopback port, the proxy in front
of it with demo API keys and rules, and prints curl commands to try.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shlex
import signal
import sys
from typing import Any

from aiohttp import web

from .authn.apikeys import key_digest
from .config import Settings, load_settings_text
from .logs import configure_logging

# Fixed demo keys, so the printed commands work every time. They only exist inside the demo.
DEMO_AGENT_KEY = "cs_demo_agent_7_not_a_secret_0000000000"
DEMO_APPROVER_KEY = "cs_demo_alice_not_a_secret_00000000000"

DEMO_CONFIG = """
server:
  listen: "127.0.0.1:{port}"
identity:
  api_keys:
    - {{sha256: "{agent}", subject: "agent-7", groups: [agents], owner: "bob@example.com"}}
    - {{sha256: "{alice}", subject: "alice", groups: [data-owners], email: "alice@example.com"}}
routes:
  - name: cloud
    prefix: /cloud/
    upstream: "http://127.0.0.1:{upstream_port}/"
    inject_headers: {{X-Cloud-Token: "demo-upstream-credential"}}
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
approvals:
  mode: hold
  timeout_seconds: 300
"""


def sample_upstream() -> web.Application:
    """A pretend cloud API: buckets to read, exports to start, deletes that must never happen."""
    buckets = {"reports": ["q1.csv", "q2.csv"], "customers": ["all.parquet"]}

    async def list_buckets(_: web.Request) -> web.Response:
        return web.json_response({"buckets": sorted(buckets)})

    async def get_bucket(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in buckets:
            return web.json_response({"error": "no such bucket"}, status=404)
        return web.json_response({"bucket": name, "objects": buckets[name]})

    async def create_export(request: web.Request) -> web.Response:
        body: Any = await request.json() if request.can_read_body else {}
        return web.json_response({"export": "started", "request": body}, status=201)

    async def delete_bucket(request: web.Request) -> web.Response:
        buckets.pop(request.match_info["name"], None)
        return web.json_response({"deleted": request.match_info["name"]})

    app = web.Application()
    app.router.add_get("/buckets", list_buckets)
    app.router.add_get("/buckets/{name}", get_bucket)
    app.router.add_post("/exports/{name:.*}", create_export)
    app.router.add_delete("/buckets/{name}", delete_bucket)
    return app


def demo_settings(port: int, upstream_port: int) -> Settings:
    text = DEMO_CONFIG.format(
        port=port,
        upstream_port=upstream_port,
        agent=key_digest(DEMO_AGENT_KEY),
        alice=key_digest(DEMO_APPROVER_KEY),
    )
    return load_settings_text(text, "<demo>", env={})


def _countersign_command() -> str:
    """How to run this same `countersign` again from the user's shell."""
    invoked = sys.argv[0] if sys.argv and sys.argv[0].endswith("countersign") else ""
    if invoked and os.sep in invoked:
        return shlex.quote(os.path.relpath(invoked) if not invoked.startswith("/") else invoked)
    return "countersign"


def instructions(port: int) -> str:
    base = f"http://127.0.0.1:{port}"
    auth = f'-H "Authorization: Bearer {DEMO_AGENT_KEY}"'
    export = json.dumps({"format": "csv"})
    cs = _countersign_command()
    return f"""
Countersign demo is running on {base} (audit events stream below as JSON lines).
The agent "agent-7" (acting for bob@example.com) calls a pretend cloud API through it.

1. An allowed read (rule "reads"), forwarded to the sample cloud API:
  curl -s {auth} {base}/cloud/buckets

2. A forbidden delete (rule "no-deletes"): 403 policy_denied
  curl -s -X DELETE {auth} {base}/cloud/buckets/reports

3. A privileged export (rule "exports"): the call waits until a human decides.
   In a second terminal:
  curl -s -X POST {auth} -H "Content-Type: application/json" \\
       -H "Countersign-Reason: quarterly report" -d '{export}' {base}/cloud/exports/customers

   In a third terminal, decide as alice@example.com (an approver):
  export COUNTERSIGN_URL={base} COUNTERSIGN_TOKEN={DEMO_APPROVER_KEY}
  {cs} approvals list
  {cs} approvals approve APPROVAL_ID --reason "looks fine"
   or
  {cs} approvals deny APPROVAL_ID --reason "not this quarter"

   The waiting curl then prints the upstream's answer (approved) or a 403 (denied).

4. No token: 401 with WWW-Authenticate
  curl -si {base}/cloud/buckets

5. An ambiguous path: 400 ambiguous_request
  curl -s {auth} --path-as-is {base}/cloud/buckets/..%2f..%2fadmin

Press Ctrl-C to stop.
"""


class DemoListenError(Exception):
    """The demo cannot listen on its port; the message says what to do instead."""


def listen_error(port: int, exc: OSError) -> DemoListenError:
    if exc.errno == errno.EADDRINUSE:
        other = 9000 if port != 9000 else 9001
        return DemoListenError(
            f"port {port} is in use: try `make demo PORT={other}` or "
            f"`countersign demo --port {other}`"
        )
    return DemoListenError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}")


async def run_demo(port: int = 8080) -> None:
    from .server.runner import start

    configure_logging()
    upstream_runner = web.AppRunner(sample_upstream(), access_log=None)
    await upstream_runner.setup()
    await web.TCPSite(upstream_runner, "127.0.0.1", 0).start()
    upstream_port = int(upstream_runner.addresses[0][1])
    settings = demo_settings(port, upstream_port)
    try:
        serving = await start(settings)
    except OSError as exc:
        await upstream_runner.cleanup()
        raise listen_error(port, exc) from None
    print(instructions(port), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await serving.cleanup()
        await upstream_runner.cleanup()
