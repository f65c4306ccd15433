"""Approvals on Redis: decision → forward latency across two replicas, and 10,000 held requests.

    .venv/bin/python bench/bench_replicas.py [--held 10000] [--samples 200]

Starts its own `redis-server` (the test fixture: a free loopback port, a temp directory, AOF with
fsync on every write), a small aiohttp upstream in its own process that counts what it receives,
and `countersign run` processes in hold mode on that Redis (API keys, the shape of
`tests/e2e/test_replicas_e2e.py`). Everything is on 127.0.0.1.

1. Decision → forward latency (`--samples`, sequential). Replicas A and B share one Redis. Each
   sample: a privileged POST to A (held), poll B's `GET /_countersign/api/approvals?state=pending`
   until it shows, then time from sending the decision to B until A's held response has arrived
   (B's decision → Redis → pub/sub → A wakes → claim → upstream → response). The decision call's
   own latency is reported separately. Goal: p99 ≤ 20 ms.

2. `--held` concurrent held requests on one fresh process. A child process (its own event loop
   and core) opens them all, each to a distinct path with a distinct body, in batches of
   `--batch`, waiting after each batch until the proxy has created that many approvals (ZCARD of
   the deadline index) so the accept backlog copes. With all of them pending: the proxy's RSS
   growth (goal ≤ 256 MiB), its file descriptors, and Redis client connections (INFO clients
   minus the bench's own connections, and the proxy's own sockets to Redis from /proc). Then this
   process approves them all directly in Redis with the project's `RedisStore.decide` (chunks of
   500 under `asyncio.gather`): the time to commit every decision, and the time from the first
   decision to the last held response (goal: all released within 2 s). Every response must be
   200 and the upstream must have received each request exactly once.

Every wait is bounded; child processes are stopped and the Redis directory removed on exit,
error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import redis
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.authn.apikeys import key_digest  # noqa: E402
from proxy.model import DecisionRecord, Verdict  # noqa: E402
from proxy.store.redis import RedisStore  # noqa: E402
from tests.redis_fixture import RedisServer  # noqa: E402

COUNTERSIGN = str(Path(sys.executable).parent / "countersign")
API = "/_countersign/api/approvals"
AGENT_KEY = "cs_bench_agent_00000000000000000000000000"
ALICE_KEY = "cs_bench_alice_00000000000000000000000000"
AGENT = {"Authorization": f"Bearer {AGENT_KEY}"}
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The upstream: answers every request with a small JSON document and counts, per second path
# segment (/exports/<group>/...), how many requests and how many distinct paths it received.
UPSTREAM = r"""
import sys
from aiohttp import web

seen = {}

async def stats(request):
    return web.json_response(
        {group: {"total": total, "distinct": len(paths)} for group, (total, paths) in seen.items()}
    )

async def answer(request):
    body = await request.read()
    parts = request.path.split("/")
    entry = seen.setdefault(parts[2] if len(parts) > 2 else "", [0, set()])
    entry[0] += 1
    entry[1].add(request.path)
    return web.json_response({"ok": True, "path": request.path, "bytes": len(body)})

app = web.Application()
app.router.add_get("/__stats", stats)
app.router.add_route("*", "/{tail:.*}", answer)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            backlog=4096)
"""


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the bench itself dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Redis(RedisServer):
    """The tests' redis-server, started in its own session like the other children, so that
    Ctrl-C reaches only the bench, which then stops everything in order (Redis last)."""

    def start(self) -> None:
        popen: Any = subprocess.Popen

        def detached(*args: Any, **kwargs: Any) -> Any:
            return popen(*args, start_new_session=True, preexec_fn=_die_with_parent, **kwargs)

        with mock.patch("subprocess.Popen", detached):
            super().start()


class Proc:
    """A child process in its own session (Ctrl-C reaches only the bench, which stops it)."""

    def __init__(self, name: str, args: Sequence[str], workdir: Path) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        self.out = workdir / f"{name}.out"
        with self.out.open("wb") as out, self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                list(args),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # the bench runs no threads
                # The proxy runs the source tree this script belongs to (also a checkout
                # elsewhere), not necessarily the one installed in the venv.
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)},
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included) from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sockets_to(pid: int, port: int) -> int:
    """Established TCP connections of process `pid` to 127.0.0.1:`port` (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                f = line.split()
                if int(f[2].rsplit(":", 1)[1], 16) == port and f[3] == "01" and f[9] in inodes:
                    count += 1
    return count


def wait_http(url: str, proc: Proc, timeout: float = 20.0) -> None:
    """Until `url` answers 200 (the proxy's readyz also checks Redis)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
            if resp.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready at {url} within {timeout} s:\n{proc.tail()}")


def countersign_config(
    port: int, upstream: str, redis_url: str, prefix: str, timeout: int, store_timeout: float
) -> str:
    """The replica config of tests/e2e/test_replicas_e2e.py, as JSON (which is YAML)."""
    return json.dumps(
        {
            "server": {"listen": f"127.0.0.1:{port}"},
            "identity": {
                "api_keys": [
                    {
                        "sha256": key_digest(AGENT_KEY),
                        "subject": "agent-7",
                        "groups": ["agents"],
                        "owner": "carol@example.com",
                    },
                    {
                        "sha256": key_digest(ALICE_KEY),
                        "subject": "alice",
                        "groups": ["data-owners"],
                        "email": "alice@example.com",
                    },
                ]
            },
            "store": {"url": redis_url, "key_prefix": prefix, "timeout_seconds": store_timeout},
            "routes": [{"name": "cloud", "prefix": "/cloud/", "upstream": upstream}],
            # One agent holds all 10,000 requests: the per-identity limit is lifted for the
            # bench (its default, 20, is what a real agent gets).
            "approvals": {
                "mode": "hold",
                "timeout_seconds": timeout,
                "max_pending_per_identity": 100_000,
            },
            "policy": {
                "rules": [
                    {"name": "reads", "methods": ["GET"], "action": "allow"},
                    {
                        "name": "exports",
                        "methods": ["POST"],
                        "paths": ["/cloud/exports/**"],
                        "action": "approve",
                        "approvers": {"groups": ["data-owners"]},
                    },
                ]
            },
        },
        indent=1,
    )


class Proxy(Proc):
    def __init__(self, name: str, workdir: Path, config: str, port: int) -> None:
        path = workdir / f"{name}.yaml"
        path.write_text(config)
        super().__init__(name, [COUNTERSIGN, "run", "-c", str(path)], workdir)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        wait_http(self.url + "/_countersign/readyz", self)


# -- statistics and output -------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms_row(name: str, values: Sequence[float]) -> list[str]:
    return [
        name,
        *(f"{pct(values, q) * 1000:.2f}" for q in (50, 90, 99)),
        f"{max(values) * 1000:.2f}",
    ]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: bool = True) -> str:
    """Plain text; columns after the first are right-aligned when `numeric`."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    out = []
    for row in [headers, ["-" * w for w in widths], *rows]:
        cells = [
            str(c).rjust(w) if i and numeric else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def machine_info() -> list[list[str]]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("diff", "HEAD", "--name-only")
    if dirty:
        commit += " + uncommitted changes to " + ", ".join(dirty.split())
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, timeout=10
    ).stdout.split()
    return [
        ["nproc", str(len(os.sched_getaffinity(0)))],
        ["cpu", model],
        ["python", platform.python_version()],
        ["aiohttp / redis-py", f"{aiohttp.__version__} / {redis.__version__}"],
        ["redis-server", next((w[2:] for w in redis_version if w.startswith("v=")), "?")],
        ["commit", commit],
        ["RLIMIT_NOFILE", str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])],
    ]


# -- 1. decision → forward latency across two replicas ---------------------------------------


async def latency(a: Proxy, b: Proxy, samples: int, warmup: int) -> dict[str, Any]:
    forward: list[float] = []
    decision_api: list[float] = []
    visible: list[float] = []
    held_first = 0
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def hold(path: str, body: dict[str, Any]) -> tuple[int, float]:
            async with session.post(a.url + path, json=body, headers=AGENT) as resp:
                await resp.read()
                return resp.status, time.perf_counter()

        async def pending_on_b(path: str) -> str:
            for _ in range(5000):  # ≤ 10 s at 2 ms
                async with session.get(
                    f"{b.url}{API}?state=pending&limit=10", headers=ALICE
                ) as resp:
                    assert resp.status == 200, await resp.text()
                    for approval in (await resp.json())["approvals"]:
                        if approval["path"] == path:
                            return str(approval["approval_id"])
                await asyncio.sleep(0.002)
            raise RuntimeError(f"{path} never became pending on B")

        for i in range(warmup + samples):
            path = f"/cloud/exports/latency/{i}"
            sent = time.perf_counter()
            held = asyncio.create_task(hold(path, {"sample": i, "nonce": secrets.token_hex(4)}))
            approval_id = await pending_on_b(path)
            seen = time.perf_counter()
            started = time.perf_counter()
            async with session.post(
                f"{b.url}{API}/{approval_id}/decision",
                json={"verdict": "approve", "reason": "bench"},
                headers=ALICE,
            ) as resp:
                await resp.read()
                decided = time.perf_counter()
                if resp.status != 200:
                    raise RuntimeError(f"decision on B: {resp.status} {await resp.text()}")
            held_first += held.done()
            status, arrived = await asyncio.wait_for(held, 30)
            if status != 200:
                raise RuntimeError(f"held request on A answered {status}")
            if i >= warmup:
                forward.append(arrived - started)
                decision_api.append(decided - started)
                visible.append(seen - sent)
    return {
        "forward": forward,
        "decision_api": decision_api,
        "visible": visible,
        "held_first": held_first,
    }


# -- 2. many held requests on one process ----------------------------------------------------


async def held_client(spec: dict[str, Any]) -> None:
    """The child process: open `count` held requests in batches, wait for all answers."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = Path(spec["workdir"])
    count, batch, url = spec["count"], spec["batch"], spec["url"]
    statuses: Counter[str] = Counter()
    arrivals: list[float] = []
    store = aioredis.from_url(spec["redis_url"])
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=spec["timeout"])
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i: int) -> None:
            body = json.dumps({"export": i, "nonce": secrets.token_hex(8)}).encode()
            headers = {**AGENT, "Content-Type": "application/json"}
            try:
                async with session.post(
                    f"{url}/cloud/exports/held/{i}", data=body, headers=headers
                ) as resp:
                    await resp.read()
                    statuses[str(resp.status)] += 1
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                statuses[type(exc).__name__] += 1
            arrivals.append(time.monotonic())

        tasks: list[asyncio.Task[None]] = []
        started = time.monotonic()
        error = None
        for first in range(0, count, batch):
            tasks += [asyncio.create_task(one(i)) for i in range(first, min(first + batch, count))]
            deadline = time.monotonic() + 60
            while await store.zcard(spec["deadlines"]) < len(tasks):
                if arrivals:
                    error = f"a held request finished before any decision: {dict(statuses)}"
                elif time.monotonic() > deadline:
                    error = f"the proxy did not create {len(tasks)} approvals within 60 s"
                if error:
                    break
                await asyncio.sleep(0.01)
            if error:
                break
        ramp = time.monotonic() - started
        write_json(workdir / "ramped.json", {"seconds": ramp, "error": error})
        if error:
            for task in tasks:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await store.aclose()
    write_json(workdir / "result.json", {"statuses": statuses, "arrivals": arrivals})


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically (the reader polls for the file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None while it is absent or half written."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


async def wait_file(path: Path, proc: Proc, seconds: float) -> dict[str, Any]:
    """Until the child `proc` has written `path` (bounded; fails early if it died)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = read_json(path)
        if found is not None:
            return found
        if not proc.alive():
            found = read_json(path)
            if found is not None:
                return found
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        await asyncio.sleep(0.02)
    raise RuntimeError(f"no {path.name} from {proc.name} within {seconds} s")


async def many_held(
    bench: Bench, proxy: Proxy, prefix: str, count: int, batch: int, release_timeout: float
) -> dict[str, Any]:
    deadlines = "{" + prefix + "}:deadlines"
    monitor = aioredis.from_url(bench.redis.url, decode_responses=True)
    result: dict[str, Any] = {}
    try:
        # Warm the proxy: one allowed call, one approval through the API (scripts loaded,
        # pub/sub subscribed, upstream pool open), so "before" is a process that has done work.
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.url + "/cloud/buckets", headers=AGENT) as resp:
                assert resp.status == 200, resp.status

            async def warm() -> int:
                url = proxy.url + "/cloud/exports/warm/0"
                async with session.post(url, json={}, headers=AGENT) as resp:
                    await resp.read()
                    return resp.status

            held = asyncio.create_task(warm())
            for _ in range(1000):
                ids = [str(i) for i in await monitor.zrange(deadlines, 0, -1)]
                if ids:
                    break
                await asyncio.sleep(0.01)
            async with session.post(
                f"{proxy.url}{API}/{ids[0]}/decision", json={"verdict": "approve"}, headers=ALICE
            ) as resp:
                assert resp.status == 200, await resp.text()
            status = await asyncio.wait_for(held, 10)
            assert status == 200, status
        await asyncio.sleep(1)
        result["rss_before"] = proc_status_kib(proxy.pid, "VmRSS")
        result["fds_before"] = open_fds(proxy.pid)

        spec = {
            "url": proxy.url,
            "count": count,
            "batch": batch,
            "redis_url": bench.redis.url,
            "deadlines": deadlines,
            "workdir": str(bench.workdir),
            "timeout": release_timeout + 600,
        }
        (bench.workdir / "client.json").write_text(json.dumps(spec))
        ramp_profile = bench.profile("py-spy-ramp", proxy.pid)
        client = bench.track(
            Proc(
                "client",
                [sys.executable, __file__, "--client", str(bench.workdir / "client.json")],
                bench.workdir,
            )
        )
        ramped = await wait_file(bench.workdir / "ramped.json", client, count / batch * 60 + 30)
        if ramped["error"]:
            raise RuntimeError(ramped["error"])
        result["ramp"] = ramped["seconds"]
        bench.end_profile(ramp_profile)
        await asyncio.sleep(1)  # let allocations settle
        pending = await monitor.zcard(deadlines)
        if pending != count:
            raise RuntimeError(f"{pending} approvals pending, expected {count}")
        result["rss_held"] = proc_status_kib(proxy.pid, "VmRSS")
        result["fds_held"] = open_fds(proxy.pid)
        result["client_fds"] = open_fds(client.pid)
        info = await monitor.info("clients")
        own = sockets_to(os.getpid(), bench.redis.port) + sockets_to(client.pid, bench.redis.port)
        result["redis_clients"] = info["connected_clients"]
        result["redis_clients_bench"] = own
        result["proxy_redis_sockets_held"] = sockets_to(proxy.pid, bench.redis.port)
        ids = [str(i) for i in await monitor.zrange(deadlines, 0, -1)]

        # Approve every one of them directly in Redis, as fast as possible.
        store = RedisStore(bench.redis.url, key_prefix=prefix)
        try:
            await asyncio.gather(*(store.get("apr_warm") for _ in range(64)))  # open the pool
            assert bench.redis.proc is not None and bench.upstream is not None
            pids = {
                "proxy": proxy.pid,
                "redis": bench.redis.proc.pid,
                "upstream": bench.upstream.pid,
                "client": client.pid,
                "bench": os.getpid(),
            }
            own = sockets_to(os.getpid(), bench.redis.port)
            own += sockets_to(client.pid, bench.redis.port)
            peak_clients = 0
            cpu_before = {k: cpu_seconds(p) for k, p in pids.items()}
            release_profile = bench.profile("py-spy-release", proxy.pid)
            commands_before = await monitor.info("commandstats")
            first = time.monotonic()
            failures: Counter[str] = Counter()
            for start in range(0, len(ids), 500):
                now = time.time()
                record = DecisionRecord(
                    verdict=Verdict.APPROVE,
                    approver_subject="alice",
                    approver_email="alice@example.com",
                    channel="bench",
                    reason=None,
                    at=now,
                )
                outcomes = await asyncio.gather(
                    *(store.decide(i, record, now) for i in ids[start : start + 500]),
                    return_exceptions=True,
                )
                failures.update(type(o).__name__ for o in outcomes if isinstance(o, BaseException))
            committed = time.monotonic()
            result["commit"] = committed - first
            result["decide_failures"] = dict(failures)
            # Wait for the client to have every answer, sampling Redis' client count.
            path = bench.workdir / "result.json"
            deadline = time.monotonic() + release_timeout
            while read_json(path) is None and time.monotonic() < deadline and client.alive():
                info = await monitor.info("clients")
                peak_clients = max(peak_clients, int(info["connected_clients"]) - own)
                await asyncio.sleep(0.1)
            done = await wait_file(path, client, max(deadline - time.monotonic(), 1))
            cpu_after = {k: cpu_seconds(p) for k, p in pids.items()}
            commands_after = await monitor.info("commandstats")
            bench.end_profile(release_profile)
            # What became of every approval (read back through the store).
            census: Counter[str] = Counter()
            for start in range(0, len(ids), 500):
                for approval in await asyncio.gather(
                    *(store.get(i) for i in ids[start : start + 500])
                ):
                    if approval is None:
                        census["missing"] += 1
                    else:
                        outcome = approval.upstream_status or "no upstream_status"
                        label = approval.state.value
                        census[f"{label} ({outcome})" if label == "executed" else label] += 1
            result["census"] = dict(census)
        finally:
            await store.aclose()
        arrivals = sorted(done["arrivals"])
        result["statuses"] = done["statuses"]
        result["release_last"] = arrivals[-1] - first
        result["release_first"] = arrivals[0] - first
        result["release_after_commit"] = arrivals[-1] - committed
        result["release"] = [t - first for t in arrivals]
        result["cpu"] = {k: cpu_after[k] - cpu_before[k] for k in pids}
        result["commands"] = {
            name.removeprefix("cmdstat_"): stats["calls"]
            - commands_before.get(name, {}).get("calls", 0)
            for name, stats in commands_after.items()
            if name not in ("cmdstat_info",)
        }
        result["proxy_redis_clients_peak"] = peak_clients
        result["proxy_redis_sockets_after"] = sockets_to(proxy.pid, bench.redis.port)
        result["rss_after"] = proc_status_kib(proxy.pid, "VmRSS")
        result["rss_peak"] = proc_status_kib(proxy.pid, "VmHWM")
        result["left_pending"] = await monitor.zcard(deadlines)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{bench.upstream_port}/__stats") as resp,
        ):
            result["upstream"] = (await resp.json()).get("held", {"total": 0, "distinct": 0})
    finally:
        await monitor.aclose()
    return result


# -- the run ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.redis = Redis()  # first: it refuses to start without redis-server
        self.workdir = Path(tempfile.mkdtemp(prefix="countersign-bench-"))
        self.procs: list[Proc] = []
        self.upstream: Proc | None = None
        self.upstream_port = 0

    def track(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def start_shared(self) -> None:
        self.redis.start()
        self.upstream_port = free_port()
        script = self.workdir / "upstream.py"
        script.write_text(UPSTREAM)
        self.upstream = self.track(
            Proc("upstream", [sys.executable, str(script), str(self.upstream_port)], self.workdir)
        )
        wait_http(f"http://127.0.0.1:{self.upstream_port}/__stats", self.upstream)

    def proxy(self, name: str, prefix: str) -> Proxy:
        port = free_port()
        config = countersign_config(
            port,
            f"http://127.0.0.1:{self.upstream_port}/",
            self.redis.url,
            prefix,
            self.args.approval_timeout,
            self.args.store_timeout,
        )
        proxy = Proxy(name, self.workdir, config, port)
        return self.track(proxy)  # type: ignore[return-value]

    def stop(self, proc: Proc, sig: int = signal.SIGTERM) -> None:
        proc.stop(sig)
        if proc in self.procs:
            self.procs.remove(proc)

    def profile(self, name: str, pid: int) -> Proc | None:
        """With --py-spy: sample `pid` into WORKDIR/NAME.txt (collapsed stacks) until stopped."""
        if not self.args.py_spy:
            return None
        out = self.workdir / f"{name}.txt"
        rate = str(self.args.py_spy_rate)
        args = [self.args.py_spy, "record", "-p", str(pid), "-r", rate, "-f", "raw", "-o"]
        return self.track(Proc(name, [*args, str(out), "--nonblocking"], self.workdir))

    def end_profile(self, proc: Proc | None) -> None:
        if proc is not None:
            self.stop(proc, signal.SIGINT)  # py-spy writes its file on SIGINT

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self.procs.clear()
        with contextlib.suppress(Exception):
            self.redis.cleanup()
        if self.args.keep:
            print(f"logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def run(self) -> None:
        args = self.args
        print(table(["machine", ""], machine_info(), numeric=False))
        print()
        self.start_shared()
        if args.samples > 0:
            prefix = "bench-latency-" + secrets.token_hex(4)
            a, b = self.proxy("replica-a", prefix), self.proxy("replica-b", prefix)
            lat = asyncio.run(latency(a, b, args.samples, args.warmup))
            conns = {p.name: sockets_to(p.pid, self.redis.port) for p in (a, b)}
            self.stop(a)
            self.stop(b)
            forward, api = lat["forward"], lat["decision_api"]
            print(f"1. decision on B -> held response on A, {len(forward)} sequential samples (ms)")
            print(
                table(
                    ["", "p50", "p90", "p99", "max"],
                    [
                        ms_row("decision -> response", forward),
                        ms_row("decision API call", api),
                        ms_row("request -> pending on B*", lat["visible"]),
                    ],
                )
            )
            p99 = pct(forward, 99) * 1000
            print(
                f"   * includes B's list polling every 2 ms. Held response arrived before the "
                f"decision call returned: {lat['held_first']}/{len(forward) + args.warmup}."
            )
            print(f"   Redis connections per replica: {conns}")
            print(f"   goal p99 <= 20 ms: {'MET' if p99 <= 20 else 'MISSED'} ({p99:.2f} ms)")
            print()
        if args.held > 0:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if args.held + 500 > soft:
                raise SystemExit(f"--held {args.held} needs more than RLIMIT_NOFILE {soft}")
            prefix = "bench-held-" + secrets.token_hex(4)
            proxy = self.proxy("held", prefix)
            r = asyncio.run(
                many_held(self, proxy, prefix, args.held, args.batch, args.release_timeout)
            )
            self.report_held(r)

    def report_held(self, r: dict[str, Any]) -> None:
        held = self.args.held
        growth = (r["rss_held"] - r["rss_before"]) / 1024
        ok = r["statuses"] == {"200": held}
        up = r["upstream"]
        rows = [
            ["ramp (open all, all pending)", f"{r['ramp']:.2f} s ({held / r['ramp']:.0f}/s)"],
            ["proxy RSS before", f"{r['rss_before'] / 1024:.1f} MiB"],
            [
                "proxy RSS, all held",
                f"{r['rss_held'] / 1024:.1f} MiB (+{growth:.1f} MiB, "
                f"{growth * 1024 / held:.1f} KiB/request)",
            ],
            [
                "proxy RSS after release / peak",
                f"{r['rss_after'] / 1024:.1f} / {r['rss_peak'] / 1024:.1f} MiB",
            ],
            ["proxy open fds before / held", f"{r['fds_before']} / {r['fds_held']}"],
            ["client open fds, held", str(r["client_fds"])],
            [
                "redis connected_clients, held",
                f"{r['redis_clients']} ({r['redis_clients_bench']} of them the bench's)",
            ],
            ["-> proxy's connections, held", str(r["redis_clients"] - r["redis_clients_bench"])],
            [
                "proxy's Redis conns held / release peak / after",
                f"{r['proxy_redis_sockets_held']} / {r['proxy_redis_clients_peak']}"
                f" / {r['proxy_redis_sockets_after']}",
            ],
            ["commit all decisions", f"{r['commit']:.2f} s ({held / r['commit']:.0f}/s)"],
            ["decide() failures", str(r["decide_failures"] or "none")],
            ["first decision -> first response", f"{r['release_first'] * 1000:.0f} ms"],
            ["first decision -> p50 response", f"{pct(r['release'], 50):.2f} s"],
            ["first decision -> p99 response", f"{pct(r['release'], 99):.2f} s"],
            ["first decision -> last response", f"{r['release_last']:.2f} s"],
            ["last decision committed -> last response", f"{r['release_after_commit']:.2f} s"],
            ["responses", json.dumps(r["statuses"])],
            ["upstream received / distinct", f"{up['total']} / {up['distinct']}"],
            ["still pending/approved in Redis", str(r["left_pending"])],
            ["approvals after release", json.dumps(r["census"])],
            [
                "Redis commands during release, per request",
                ", ".join(
                    f"{k} {v / held:.2f}"
                    for k, v in sorted(r["commands"].items(), key=lambda kv: -kv[1])
                    if v
                )
                + " *",
            ],
            ["CPU s during release", ", ".join(f"{k} {v:.2f}" for k, v in r["cpu"].items())],
        ]
        print(f"2. {held} concurrently held requests on one process")
        print(table(["", ""], rows, numeric=False))
        print(
            "   * Redis INFO commandstats, which counts commands run inside Lua scripts too; the"
            " bench's decide() is 1 GET + 1 EVALSHA round trip per request of these."
        )
        rss_ok = growth <= 256
        release_ok = r["release_last"] <= 2.0
        correct = ok and up["total"] == held and up["distinct"] == held
        print(f"   goal RSS growth <= 256 MiB: {'MET' if rss_ok else 'MISSED'} ({growth:.1f} MiB)")
        print(
            f"   goal all released <= 2 s: {'MET' if release_ok else 'MISSED'} "
            f"({r['release_last']:.2f} s)"
        )
        print(
            f"   every response 200 and upstream got each exactly once: "
            f"{'YES' if correct else 'NO'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--held", type=int, default=10_000, help="concurrently held requests")
    parser.add_argument("--samples", type=int, default=200, help="decision latency samples")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured latency samples")
    parser.add_argument("--batch", type=int, default=500, help="held requests opened at once")
    parser.add_argument("--approval-timeout", type=int, default=600)
    parser.add_argument("--store-timeout", type=float, default=2.0, help="store.timeout_seconds")
    parser.add_argument("--release-timeout", type=float, default=120.0)
    parser.add_argument("--keep", action="store_true", help="keep the logs directory")
    parser.add_argument("--py-spy", help="py-spy binary: profile the held proxy (use --keep)")
    parser.add_argument("--py-spy-rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(held_client(json.loads(Path(args.client).read_text())))
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    bench = Bench(args)
    try:
        bench.run()
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception:
        for proc in bench.procs:
            if proc.tail():
                print(f"--- {proc.name} stderr (last lines)\n{proc.tail()}", file=sys.stderr)
        raise
    finally:
        bench.cleanup()


if __name__ == "__main__":
    main()
