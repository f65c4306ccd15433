"""How fast can a Python relay be on this machine at all: the floor under the throughput targets.

    .venv/bin/python bench/bench_floor.py [--seconds 6] [--connections 32] [--rounds 2]

Against one nginx upstream answering `{"ok":true}` (as `make bench`), wrk measures, in turns:
- nginx `proxy_pass` (one worker): the reference of the targets;
- a bare relay: a few dozen lines of asyncio protocols on uvloop and httptools (parse the request,
  write it to a kept-alive upstream connection, parse the answer, write it back), with none of a
  proxy's duties: the least any Python relay on this machine costs; then two processes of it on
  one port (SO_REUSEPORT, as `workers: 2`): the most two Python processes get here, where wrk and
  the nginx upstream share the same two cores;
- Countersign's front (`proxy/front`) and upstream client (`proxy/forward`, `proxy/h1`) with
  nothing between them: no authentication, policy, audit or metrics (a handler that forwards);
- the whole `countersign run` is `make bench`'s row (JWT, 1,000 rules, audit file on).

Prints requests/s, the ratio to nginx, and CPU per request of the relay process (user + system,
system apart): what a target of "N % of nginx" leaves per request on this machine. Loopback only;
every child is stopped on exit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import run_all  # noqa: E402

BARE_RELAY = r"""
import asyncio, sys, httptools, uvloop
UP = int(sys.argv[1])

class Upstream(asyncio.Protocol):
    def __init__(self, front):
        self.front, self.headers, self.body = front, [], []
        self.parser = httptools.HttpResponseParser(self)
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        self.parser.feed_data(data)
    def on_header(self, name, value):
        self.headers.append((name, value))
    def on_body(self, body):
        self.body.append(body)
    def on_message_complete(self):
        head = b"HTTP/1.1 %d OK\r\n" % self.parser.get_status_code() + b"".join(
            n + b": " + v + b"\r\n" for n, v in self.headers
            if n.lower() not in (b"connection", b"keep-alive")) + b"\r\n"
        if not self.front.transport.is_closing():
            self.front.transport.write(head + b"".join(self.body))
        self.headers, self.body = [], []

class Front(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.headers, self.upstream, self.queued = transport, [], None, []
        self.parser = httptools.HttpRequestParser(self)
        asyncio.ensure_future(self.connect())
    async def connect(self):
        loop = asyncio.get_running_loop()
        _, self.upstream = await loop.create_connection(lambda: Upstream(self), "127.0.0.1", UP)
        for request in self.queued:
            self.upstream.transport.write(request)
    def connection_lost(self, exc):
        if self.upstream is not None:
            self.upstream.transport.close()
    def data_received(self, data):
        self.parser.feed_data(data)
    def on_url(self, url):
        self.url = url
    def on_header(self, name, value):
        self.headers.append((name, value))
    def on_message_complete(self):
        request = b"%s /buckets HTTP/1.1\r\n" % self.parser.get_method() + b"".join(
            n + b": " + v + b"\r\n" for n, v in self.headers) + b"\r\n"
        self.headers = []
        if self.upstream is None:
            self.queued.append(request)
        else:
            self.upstream.transport.write(request)

async def main():
    server = await asyncio.get_running_loop().create_server(
        Front, "127.0.0.1", int(sys.argv[2]), reuse_port=True)
    await server.serve_forever()

uvloop.run(main())
"""

FRONT_ONLY = r"""
import asyncio, sys, uvloop
from proxy.forward import Forwarder
from proxy.front.message import Answer
from proxy.front.server import FrontLimits, FrontServer

async def main():
    forwarder = Forwarder()
    url = f"http://127.0.0.1:{sys.argv[1]}/buckets"
    async def handler(request):
        response = await forwarder.send(request.method, url, [("Accept", "*/*")], None)
        body = response.read_all() if response.body_complete else await response.read()
        response.release()
        await request.respond(Answer(response.status, body, response.headers))
    front = FrontServer(handler, limits=FrontLimits())
    await front.start("127.0.0.1", int(sys.argv[2]))
    await asyncio.Event().wait()

uvloop.run(main())
"""


def system_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


def relay_row(
    name: str,
    code: str,
    up: int,
    args: argparse.Namespace,
    procs: list[Any],
    processes: int = 1,
) -> dict[str, Any]:
    """wrk against `processes` copies of the relay `code` on one port (SO_REUSEPORT spreads the
    connections, as `workers:` does for Countersign); CPU per request summed over them."""
    port = run_all.free_port()
    started = []
    for _ in range(processes):
        proc = subprocess.Popen(
            [run_all.PY, "-c", code, str(up), str(port)], cwd=ROOT, stderr=subprocess.DEVNULL
        )
        procs.append(proc)
        started.append(proc)
        run_all.wait_port(port, proc, name)
    before = [(run_all.cpu_seconds(p.pid), system_seconds(p.pid)) for p in started]
    row = run_all.measure(name, port, "/x", None, args)
    requests = max(1, row["requests"])
    after = [(run_all.cpu_seconds(p.pid), system_seconds(p.pid)) for p in started]
    row["cpu_us"] = sum(a[0] - b[0] for a, b in zip(after, before, strict=True)) / requests * 1e6
    row["sys_us"] = sum(a[1] - b[1] for a, b in zip(after, before, strict=True)) / requests * 1e6
    for proc in started:
        run_all.stop(proc)
        procs.remove(proc)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="each relay measured this often")
    args = parser.parse_args()
    args.rate_seconds = 0  # (run_all.measure's fixed-rate check: not here)
    tmp = Path(tempfile.mkdtemp(prefix="countersign-floor-"))
    rows: list[tuple[str, dict[str, Any]]] = []
    with run_all.processes() as procs:
        up, px = run_all.free_port(), run_all.free_port()
        body = run_all.NGINX_UPSTREAM.format(port=up, json=run_all.BODY)
        procs.append(run_all.nginx(tmp, "upstream", body, 1))
        run_all.wait_port(up, procs[-1], "nginx upstream")
        procs.append(run_all.nginx(tmp, "proxy", run_all.NGINX_PROXY.format(port=px, up=up), 1))
        run_all.wait_port(px, procs[-1], "nginx proxy")
        for _ in range(args.rounds):
            nginx = run_all.measure("nginx proxy_pass", px, run_all.PATH, None, args)
            rows.append(("nginx proxy_pass", nginx))
            for name, code, processes in (
                ("bare Python relay", BARE_RELAY, 1),
                ("bare Python relay, 2 processes", BARE_RELAY, 2),
                ("front + h1", FRONT_ONLY, 1),
            ):
                rows.append((name, relay_row(name, code, up, args, procs, processes)))
                time.sleep(0.5)
    print()
    print("| relay | req/s | vs nginx (same round) | CPU/request | of it system |")
    print("|---|---|---|---|---|")
    reference = 1.0
    for name, row in rows:
        if name == "nginx proxy_pass":
            reference = row["rps"]
            print(f"| {name} | {row['rps']:,.0f} | 100 % | — | — |")
            continue
        print(
            f"| {name} | {row['rps']:,.0f} | {100 * row['rps'] / reference:.1f} % "
            f"| {row['cpu_us']:.0f} µs | {row['sys_us']:.0f} µs |"
        )


if __name__ == "__main__":
    main()
