"""Issue 14 part 6: N held requests released by ONE bulk decision.

    .venv/bin/python bench/bench_release.py [--count 10000] [--clients 1] [--redis]
                                            [--py-spy .venv/bin/py-spy] [--gc-probe]

Starts a small aiohttp upstream in its own process, `countersign run` (memory store, or with
`--redis` a throwaway redis-server as tests/redis_fixture.py starts it) whose `exports` rule
approves `POST /cloud/exports/**`, `approvals.max_pending_per_identity` 20,000, a long approval
timeout, `server.max_connections` 19,000 (above the 10,000 held), audit to a file in a temp
directory (stdout off). The soft RLIMIT_NOFILE is raised to the hard limit first (the proxy and
the clients inherit it). `--gc-probe` runs the proxy under a wrapper that times its garbage
collections and prints those made during the release.

`--clients` child processes (raw asyncio streams on uvloop, so the client costs little) open
`--count` concurrent `POST /cloud/exports/bulk` requests, each with a distinct JSON body (each
opens its own approval), `Connection: close`. This process waits until the approvals API lists
all of them pending (paged with `?cursor`), records the proxy's RSS, then sends ONE
`POST /_countersign/api/decisions {"verdict": "approve", "filter": {"rule": "exports"}}` and
measures the time to the last 200 the clients received (CLOCK_MONOTONIC is shared across
processes). Prints N, time to hold all, the bulk call's own time, the release time, RSS
before / held / after, CPU of every process during the release, and every non-200 answer.
Targets: release ≤ 2 s, RSS growth ≤ 256 MiB. Every child is stopped on exit or error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.authn.apikeys import key_digest  # noqa: E402

COUNTERSIGN = str(Path(sys.executable).parent / "countersign")
AGENT_KEY = "cs_bench_agent_00000000000000000000000000"
ALICE_KEY = "cs_bench_alice_00000000000000000000000000"
API = "/_countersign/api/"
CLK_TCK = os.sysconf("SC_CLK_TCK")

UPSTREAM = r"""
import sys
from aiohttp import web
async def answer(request):
    body = await request.read()
    return web.json_response({"ok": True, "bytes": len(body)})
app = web.Application()
app.router.add_route("*", "/{tail:.*}", answer)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            backlog=4096)
"""


# `--gc-probe`: the proxy runs under this wrapper, which keeps, per GC generation, the number of
# collections and the seconds they took in a JSON file (rewritten after each gen 1/2 collection
# and every 200th of gen 0), so the bench can tell how much of the release is the collector.
GC_PROBE = r"""
import gc, json, os, sys, time
path = os.environ["CS_GC_PROBE"]
stats = {"count": [0, 0, 0], "seconds": [0.0, 0.0, 0.0]}
started = [0.0]
def probe(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
        return
    generation = info["generation"]
    stats["count"][generation] += 1
    stats["seconds"][generation] += time.perf_counter() - started[0]
    if generation or stats["count"][0] % 200 == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(stats, f)
        os.replace(path + ".tmp", path)
gc.callbacks.append(probe)
sys.argv[0] = "countersign"
from proxy.cli import main
sys.exit(main())
"""


def gc_stats(path: Path) -> dict[str, list[float]]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {"count": [0, 0, 0], "seconds": [0.0, 0.0, 0.0]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the bench dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
    with log.open("wb") as err:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def http(method: str, url: str, key: str, body: Any = None, timeout: float = 120) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{method} {url}: {exc.code} {exc.read()[:500]!r}") from None


def wait_ready(url: str, proc: subprocess.Popen[Any], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
            if resp.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready in {timeout} s")


def config(port: int, upstream: int, store: str, audit: Path, store_timeout: float) -> str:
    return json.dumps(
        {
            # 10,000 held connections plus the bench's own API calls: above the default cap.
            "server": {"listen": f"127.0.0.1:{port}", "max_connections": 19_000},
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
            "store": {"url": store, "key_prefix": "release", "timeout_seconds": store_timeout},
            "routes": [
                {"name": "cloud", "prefix": "/cloud/", "upstream": f"http://127.0.0.1:{upstream}/"}
            ],
            "approvals": {
                "mode": "hold",
                "timeout_seconds": 3600,
                "max_pending_per_identity": 20_000,
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
            "audit": {"stdout": False, "file": str(audit)},
        },
        indent=1,
    )


# -- the client process ----------------------------------------------------------------------


async def client(spec: dict[str, Any]) -> None:
    """Open `count` held POSTs (ids first..first+count), wait for every answer."""
    port, first, count = spec["port"], spec["first"], spec["count"]
    statuses: Counter[str] = Counter()
    arrivals: list[float] = []
    gate = asyncio.Semaphore(spec["connect_concurrency"])
    sent = 0
    all_sent = asyncio.Event()

    async def one(i: int) -> None:
        nonlocal sent
        body = json.dumps({"export": i, "nonce": secrets.token_hex(8)}).encode()
        head = (
            f"POST /cloud/exports/bulk HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {AGENT_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        writer = None
        try:
            async with gate:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head + body)
                await writer.drain()
            sent += 1
            if sent == count:
                all_sent.set()
            status_line = await reader.readuntil(b"\r\n")
            rest = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in rest.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            status = status_line.split(b" ", 2)[1].decode()
        except (OSError, asyncio.IncompleteReadError) as exc:
            status = type(exc).__name__
        finally:
            if writer is not None:
                writer.close()
        arrivals.append(time.monotonic())
        statuses[status] += 1

    started = time.monotonic()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    tasks = [asyncio.create_task(one(i)) for i in range(first, first + count)]
    await asyncio.wait(
        [asyncio.create_task(all_sent.wait()), *tasks],
        timeout=600,
        return_when=asyncio.FIRST_COMPLETED,
    )
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    write_json(
        spec["sent_file"],
        {
            "seconds": time.monotonic() - started,
            "cpu": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
        },
    )
    await asyncio.wait(tasks, timeout=spec["timeout"])
    for task in tasks:
        task.cancel()
    cpu2 = resource.getrusage(resource.RUSAGE_SELF)
    write_json(
        spec["result_file"],
        {
            "statuses": statuses,
            "arrivals": arrivals,
            "unfinished": sum(not t.done() or t.cancelled() for t in tasks),
            "cpu_total": cpu2.ru_utime + cpu2.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
        },
    )


def write_json(path: str, data: dict[str, Any]) -> None:
    """Atomically (the parent polls for the file)."""
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def run_client(path: str) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(client(json.loads(Path(path).read_text())))


# -- the bench -------------------------------------------------------------------------------


def pending_count(base: str) -> int:
    """Pending approvals the approver sees, paging through the API with ?cursor."""
    total, cursor = 0, None
    while True:
        url = f"{base}{API}approvals?state=pending&limit=1000"
        if cursor:
            url += f"&cursor={urllib.request.quote(cursor)}"
        page = http("GET", url, ALICE_KEY)
        total += len(page["approvals"])
        cursor = page.get("next_cursor")
        if not cursor:
            return total


def metric_pending(base: str) -> float:
    with urllib.request.urlopen(base + "/_countersign/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("countersign_approvals_pending "):
                return float(line.split()[1])
    return -1


FRAME = re.compile(r"^(.*?) \((.*?)(?::\d+)?\)$")


def profile_summary(raw: Path) -> list[str]:
    """Top functions (inclusive and leaf) of a py-spy raw (collapsed) profile."""
    total = 0
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        frames = [
            f"{m[1]} ({m[2].rpartition('/')[2]})" if (m := FRAME.match(f)) else f
            for f in stack.split(";")
        ]
        for f in set(frames):
            inclusive[f] += int(n)
        leaf[frames[-1]] += int(n)
    out = [f"{total} samples; inclusive:"]
    out += [f"  {c * 100 / total:5.1f} %  {f}" for f, c in inclusive.most_common(30)]
    out.append("leaf:")
    out += [f"  {c * 100 / total:5.1f} %  {f}" for f, c in leaf.most_common(15)]
    return out


def bench(
    args: argparse.Namespace,
    tmp: Path,
    procs: list[subprocess.Popen[Any]],
    cleanups: list[Callable[[], None]],
) -> None:
    store = "memory://"
    if args.redis:
        from tests.redis_fixture import RedisServer

        redis_server = RedisServer()
        cleanups.append(redis_server.cleanup)  # stops it and removes its directory
        redis_server.start()
        store = redis_server.url
        print(f"redis-server on port {redis_server.port}")
    up, port = free_port(), free_port()
    (tmp / "upstream.py").write_text(UPSTREAM)
    upstream = spawn([sys.executable, str(tmp / "upstream.py"), str(up)], tmp / "up.log")
    procs.append(upstream)
    (tmp / "c.yaml").write_text(config(port, up, store, tmp / "audit.jsonl", args.store_timeout))
    log = tmp / "countersign.log"
    env = {"PYTHONUNBUFFERED": "1"}
    command = [COUNTERSIGN]
    if args.gc_probe:
        command = [sys.executable, "-c", GC_PROBE]
        env = {**(env or {}), "CS_GC_PROBE": str(tmp / "gc.json")}
    proxy = spawn([*command, "run", "-c", str(tmp / "c.yaml")], log, env)
    procs.append(proxy)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + "/_countersign/readyz", proxy, log)
    # Warm-up: one allowed call, one held request approved by a bulk decision.
    http("GET", base + "/cloud/buckets", AGENT_KEY)
    warm = subprocess.Popen(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-H",
            f"Authorization: Bearer {AGENT_KEY}",
            "--data",
            "{}",
            base + "/cloud/exports/warm",
        ],
        stdout=subprocess.PIPE,
    )
    procs.append(warm)
    while pending_count(base) < 1:
        time.sleep(0.05)
    http(
        "POST",
        base + API + "decisions",
        ALICE_KEY,
        {"verdict": "approve", "reason": "warm", "filter": {"rule": "exports"}},
    )
    out, _ = warm.communicate(timeout=30)
    assert out == b"200", out
    time.sleep(1)
    rss_before = rss_mib(proxy.pid)
    fds_before = open_fds(proxy.pid)

    shares = [
        args.count // args.clients + (k < args.count % args.clients) for k in range(args.clients)
    ]
    clients = []
    first = 0
    for k, n in enumerate(shares):
        spec = {
            "port": port,
            "first": first,
            "count": n,
            "connect_concurrency": args.connect_concurrency,
            "sent_file": str(tmp / f"sent{k}.json"),
            "result_file": str(tmp / f"result{k}.json"),
            "timeout": args.release_timeout + 3600,
        }
        first += n
        (tmp / f"client{k}.json").write_text(json.dumps(spec))
        clients.append(
            spawn(
                [sys.executable, __file__, "--client", str(tmp / f"client{k}.json")],
                tmp / f"client{k}.log",
            )
        )
        procs.append(clients[-1])
    started = time.monotonic()
    deadline = started + args.hold_timeout
    while metric_pending(base) < args.count + 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {metric_pending(base)} pending after {args.hold_timeout} s")
        for c in clients:
            if c.poll() is not None:
                raise RuntimeError(f"a client exited: {(tmp / 'client0.log').read_text()[-2000:]}")
        time.sleep(0.2)
    listed = pending_count(base)
    hold_seconds = time.monotonic() - started
    if listed != args.count:
        raise RuntimeError(f"the API lists {listed} pending, expected {args.count}")
    sent = [json.loads((tmp / f"sent{k}.json").read_text()) for k in range(args.clients)]
    time.sleep(1)
    rss_held = rss_mib(proxy.pid)
    fds_held = open_fds(proxy.pid)
    pids = {"proxy": proxy.pid, "upstream": upstream.pid}
    pids.update({f"client{k}": c.pid for k, c in enumerate(clients)})
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    gc0 = gc_stats(tmp / "gc.json")
    spy = None
    if args.py_spy:
        spy = subprocess.Popen(
            [
                args.py_spy,
                "record",
                "-p",
                str(proxy.pid),
                "-r",
                "200",
                "-f",
                "raw",
                "-o",
                str(tmp / "release.txt"),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(spy)
        time.sleep(1.0)
    t0 = time.monotonic()
    answer = http(
        "POST",
        base + API + "decisions",
        ALICE_KEY,
        {"verdict": "approve", "reason": "bench", "filter": {"rule": "exports"}},
        timeout=args.release_timeout,
    )
    t1 = time.monotonic()
    results = []
    for k in range(args.clients):
        path = tmp / f"result{k}.json"
        end = time.monotonic() + args.release_timeout
        while not path.exists() and time.monotonic() < end:
            time.sleep(0.02)
        if not path.exists():
            raise RuntimeError(f"client {k} has no result after {args.release_timeout} s")
        results.append(json.loads(path.read_text()))
    cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
    gc1 = gc_stats(tmp / "gc.json")
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
    time.sleep(1)
    rss_after = rss_mib(proxy.pid)
    statuses: Counter[str] = Counter()
    for r in results:
        statuses.update(r["statuses"])
    arrivals = sorted(a for r in results for a in r["arrivals"])
    last = arrivals[-1]
    load = os.getloadavg()
    print(f"N                                  {args.count} ({args.clients} client process(es))")
    print(f"store                              {store}")
    print(f"time to hold all (API lists N)     {hold_seconds:.2f} s")
    print(
        "client send time / CPU             "
        + ", ".join(f"{s['seconds']:.2f} s / {s['cpu']:.2f} s" for s in sent)
    )
    print(
        f"bulk call (HTTP round trip)        {t1 - t0:.3f} s (count {answer['count']}, "
        f"skipped {len(answer['skipped'])})"
    )
    print(f"release (bulk sent -> last 200)    {last - t0:.3f} s")
    after = [a - t0 for a in arrivals if a >= t0]
    if after:
        print(
            "bulk sent -> first / p50 / p99 200 "
            f"{after[0]:.3f} / {after[len(after) // 2]:.3f} / "
            f"{after[min(len(after) - 1, len(after) * 99 // 100)]:.3f} s"
        )
    print(
        f"RSS before / held / after          {rss_before:.1f} / {rss_held:.1f} / "
        f"{rss_after:.1f} MiB (growth held {rss_held - rss_before:+.1f} MiB, "
        f"{(rss_held - rss_before) * 1024 / args.count:.1f} KiB/request)"
    )
    print(f"proxy fds before / held            {fds_before} / {fds_held}")
    print(
        "CPU s during release               "
        + ", ".join(f"{k} {cpu1[k] - cpu0[k]:.2f}" for k in pids)
    )
    if args.gc_probe:
        print(
            "proxy GC during release (gen 0/1/2) "
            + " / ".join(
                f"{gc1['count'][g] - gc0['count'][g]:.0f}x "
                f"{gc1['seconds'][g] - gc0['seconds'][g]:.3f} s"
                for g in range(3)
            )
            + " (gen 0 counted every 200th)"
        )
    print(f"responses                          {json.dumps(dict(statuses))}")
    early = sum(a < t0 for a in arrivals)
    unfinished = sum(r["unfinished"] for r in results)
    non200 = args.count - statuses.get("200", 0)
    print(f"non-200 / answered before the bulk / unfinished   {non200} / {early} / {unfinished}")
    print(f"load average (1/5/15 min)          {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    rel_ok = last - t0 <= 2.0
    rss_ok = rss_held - rss_before <= 256
    print(f"   goal release <= 2 s: {'MET' if rel_ok else 'MISSED'} ({last - t0:.2f} s)")
    print(
        f"   goal RSS growth <= 256 MiB: {'MET' if rss_ok else 'MISSED'} "
        f"({rss_held - rss_before:.1f} MiB)"
    )
    if spy is not None and (tmp / "release.txt").exists():
        print("py-spy of the proxy during the release (all threads, 200 Hz):")
        print("\n".join(profile_summary(tmp / "release.txt")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=1, help="client processes")
    parser.add_argument("--connect-concurrency", type=int, default=512)
    parser.add_argument("--redis", action="store_true", help="a throwaway redis-server store")
    parser.add_argument("--store-timeout", type=float, default=2.0, help="store.timeout_seconds")
    parser.add_argument("--hold-timeout", type=float, default=300)
    parser.add_argument("--release-timeout", type=float, default=120)
    parser.add_argument("--py-spy", help="py-spy binary: profile the proxy during the release")
    parser.add_argument(
        "--gc-probe", action="store_true", help="time the proxy's garbage collections"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        run_client(args.client)
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every child
    if hard < args.count + 1000:  # the proxy holds one socket per held request
        print(f"warning: RLIMIT_NOFILE hard limit {hard} < {args.count} + 1000", file=sys.stderr)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    tmp = Path(tempfile.mkdtemp(prefix="countersign-release-"))
    procs: list[subprocess.Popen[Any]] = []
    cleanups: list[Callable[[], None]] = []
    try:
        bench(args, tmp, procs, cleanups)
    except Exception:
        log = tmp / "countersign.log"
        if log.exists():
            print(f"--- countersign log:\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        for proc in reversed(procs):
            stop(proc)
        for cleanup in cleanups:
            cleanup()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
