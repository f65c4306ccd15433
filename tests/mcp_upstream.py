"""A real MCP server for the tests: the official SDK's `MCPServer` over Streamable HTTP.

Countersign sits in front of MCP servers, so its MCP tests need one that behaves exactly as the
official SDK does (sessions, SSE answers, protocol-version negotiation, progress), not an
imitation. This module is that server. Run as a script it serves, with uvicorn, in its own
process (its own event loop: a test's loop cannot stall it, nor it the test's):

    python tests/mcp_upstream.py PORT CALLS_FILE [--json-response] [--stateless]

on http://127.0.0.1:PORT/mcp (`--json-response`: every answer one JSON body, so no progress
reaches the client; `--stateless`: no `Mcp-Session-Id` for legacy clients), with three tools:

- `list_repos()` → `["alpha", "beta"]`
- `delete_repo(name)` → `"deleted NAME"`
- `slow(seconds)` → `"slept SECONDS"`, after reporting progress (`notifications/progress`,
  when the call carried a progress token) about every 0.1 s, message `"step I of N"`.

Every tool call the server executes is appended to CALLS_FILE as one JSON line,
`{"tool": NAME, "arguments": {...}}`, when the tool starts: a test reads them (`calls()`) to
assert what actually ran upstream, whatever the proxy told the agent.

DNS-rebinding protection: for host 127.0.0.1 the SDK turns it on by default, allowing only
`Host: 127.0.0.1:*`, `localhost:*`, `[::1]:*` (421 "Invalid Host header" otherwise) and the
matching `Origin`s (403). A proxy may forward its own Host, so it is switched off here:
`TransportSecuritySettings(enable_dns_rebinding_protection=False)`. (The POST Content-Type
check, `application/json` or 400, stays: the SDK always applies it.)

`mcp_upstream(tmp_path)` starts the process on a free port, waits until it listens (well under
a second; 10 s at most) and stops it on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings

PATH = "/mcp"
REPOS = ["alpha", "beta"]
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def build_server(calls_file: Path) -> MCPServer:
    """The MCPServer with the three tools, recording every call to `calls_file`."""
    server = MCPServer("countersign-test-upstream", version="1.0.0")

    def record(tool: str, arguments: dict[str, Any]) -> None:
        line = json.dumps({"tool": tool, "arguments": arguments}) + "\n"
        with calls_file.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    @server.tool()
    def list_repos() -> list[str]:
        """List the repositories."""
        record("list_repos", {})
        return list(REPOS)

    @server.tool()
    def delete_repo(name: str) -> str:
        """Delete a repository (irreversible: the kind of call Countersign holds)."""
        record("delete_repo", {"name": name})
        return f"deleted {name}"

    @server.tool()
    async def slow(seconds: float, ctx: Context) -> str:
        """Take `seconds`, reporting progress about every 0.1 s."""
        record("slow", {"seconds": seconds})
        steps = max(1, round(seconds / 0.1))
        for i in range(1, steps + 1):
            await anyio.sleep(seconds / steps)
            await ctx.report_progress(i, steps, f"step {i} of {steps}")
        return f"slept {seconds:g}"

    return server


def serve(port: int, calls_file: Path, *, json_response: bool, stateless: bool) -> None:
    app = build_server(calls_file).streamable_http_app(
        streamable_http_path=PATH,
        json_response=json_response,
        stateless_http=stateless,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        # Open GET streams would otherwise hold a graceful shutdown forever.
        timeout_graceful_shutdown=1,
    )
    uvicorn.Server(config).run()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class McpUpstream:
    url: str
    """The MCP endpoint, `http://127.0.0.1:PORT/mcp`."""
    calls_file: Path
    log_file: Path
    proc: subprocess.Popen[bytes]

    @property
    def base(self) -> str:
        """`http://127.0.0.1:PORT`, for a proxy route's upstream."""
        return self.url.removesuffix(PATH)

    def calls(self) -> list[dict[str, Any]]:
        """The tool calls the server executed so far, oldest first."""
        if not self.calls_file.exists():
            return []
        lines = self.calls_file.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s). Idempotent."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_mcp_upstream(
    directory: Path, *, json_response: bool = False, stateless: bool = False
) -> McpUpstream:
    """Start the server process; its call record and log go to `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    calls_file = directory / "mcp_calls.jsonl"
    log_file = directory / "mcp_upstream.log"
    calls_file.write_text("", encoding="utf-8")
    port = _free_port()
    command = [sys.executable, str(Path(__file__).resolve()), str(port), str(calls_file)]
    if json_response:
        command.append("--json-response")
    if stateless:
        command.append("--stateless")
    with log_file.open("wb") as log:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    upstream = McpUpstream(f"http://127.0.0.1:{port}{PATH}", calls_file, log_file, proc)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the MCP upstream exited with {proc.returncode}:\n{log_file.read_text()}"
                )
            try:
                # uvicorn listens only once the app's lifespan (the SDK's session manager) has
                # started, so a connection means it is ready.
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return upstream
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the MCP upstream did not listen within {START_TIMEOUT:g} s:\n"
                        f"{log_file.read_text()}"
                    ) from None
                time.sleep(0.05)
    except BaseException:
        upstream.stop()
        raise


@contextlib.contextmanager
def mcp_upstream(
    tmp_path: Path, *, json_response: bool = False, stateless: bool = False
) -> Iterator[McpUpstream]:
    """A running MCP upstream for the `with` block (see the module docstring)."""
    upstream = start_mcp_upstream(tmp_path, json_response=json_response, stateless=stateless)
    try:
        yield upstream
    finally:
        upstream.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The tests' MCP upstream (official SDK).")
    parser.add_argument("port", type=int)
    parser.add_argument("calls_file", type=Path)
    parser.add_argument("--json-response", action="store_true", help="answer JSON, not SSE")
    parser.add_argument("--stateless", action="store_true", help="no Mcp-Session-Id")
    args = parser.parse_args(argv)
    serve(args.port, args.calls_file, json_response=args.json_response, stateless=args.stateless)


if __name__ == "__main__":
    main()
