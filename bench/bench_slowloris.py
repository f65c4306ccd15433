"""Issue 14 part 6: legitimate latency under K slowloris connections.

    .venv/bin/python bench/bench_slowloris.py [--slow 2000] [--rate 200] [--seconds 20]
                                              [--interval 5] [--proxy-nofile N]

Starts a small aiohttp upstream in its own process and `countersign run` (memory store, API
keys, `GET` allowed, audit to a file in a temp directory, stdout off). The soft RLIMIT_NOFILE is
raised to the hard limit (the proxy inherits it; `--proxy-nofile` sets the proxy's own soft
limit instead, e.g. 1024, a common default).

1. Baseline: `--rate` allowed `GET /cloud/buckets` per second for `--baseline-seconds`, each on
   a new connection (`Connection: close`: what a fresh client meets at the accept queue), from
   a pool of threads with blocking sockets; latency is measured from each request's scheduled
   time (open loop, no coordinated omission).
2. A child process (asyncio on uvloop) opens `--slow` connections that send the start of a
   request head and then one header byte every `--interval` seconds (staggered), never ending
   the head, and watches each for being closed by the server.
3. With all of them connected, the same legitimate load for `--seconds`.

Prints p50 / p99 / max latency and errors of both phases, how many slow connections the server
closed (and when), and the proxy's open file descriptors. Target: legitimate p99 ≤ 50 ms under
2,000 slow connections. Every child is stopped on exit or error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.authn.apikeys import key_digest  # noqa: E402

COUNTERSIGN = str(Path(sys.executable).parent / "countersign")
KEY = "cs_bench_agent_00000000000000000000000000"
CLK_TCK = os.sysconf("SC_CLK_TCK")

UPSTREAM = r"""
import sys
from aiohttp import web
async def ok(_): return web.json_response({"ok": True})
app = web.Application(); app.router.add_route("*", "/{tail:.*}", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            backlog=4096)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(args: list[str], log: Path, nofile: int | None = None) -> subprocess.Popen[Any]:
    def setup() -> None:
        _die_with_parent()
        if nofile:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))

    with log.open("wb") as err:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
            preexec_fn=setup,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
        )


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def config(port: int, upstream: int, audit: Path) -> str:
    return json.dumps(
        {
            "server": {"listen": f"127.0.0.1:{port}"},
            "identity": {
                "api_keys": [{"sha256": key_digest(KEY), "subject": "agent", "groups": ["agents"]}]
            },
            "routes": [
                {"name": "cloud", "prefix": "/cloud/", "upstream": f"http://127.0.0.1:{upstream}/"}
            ],
            "policy": {"rules": [{"name": "reads", "methods": ["GET"], "action": "allow"}]},
            "audit": {"stdout": False, "file": str(audit)},
        },
        indent=1,
    )


# -- the slow client (child process) ---------------------------------------------------------


async def slow_client(spec: dict[str, Any]) -> None:
    port, count, interval = spec["port"], spec["count"], spec["interval"]
    state: Counter[str] = Counter()
    closed_after: list[float] = []
    gate = asyncio.Semaphore(200)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)

    async def one(i: int) -> None:
        try:
            async with gate:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            state["connect_failed_" + type(exc).__name__] += 1
            return
        opened = time.monotonic()
        state["connected"] += 1
        writer.write(f"GET /cloud/buckets HTTP/1.1\r\nHost: x\r\nX-Slow-{i}: ".encode())

        async def trickle() -> None:
            await asyncio.sleep(random.uniform(0, interval))
            while True:
                writer.write(b"a")
                await writer.drain()
                state["bytes"] += 1
                await asyncio.sleep(interval)

        trickler = asyncio.create_task(trickle())
        reading = asyncio.create_task(reader.read(65536))
        await asyncio.wait([trickler, reading], return_when=asyncio.FIRST_COMPLETED)
        if reading.done() or trickler.done():
            answer = b""
            if reading.done() and not reading.cancelled() and reading.exception() is None:
                answer = reading.result()
            state["closed_by_server"] += 1
            if answer:
                state["answered_" + answer.split(b" ", 2)[1].decode(errors="replace")] += 1
            closed_after.append(time.monotonic() - opened)
        trickler.cancel()
        reading.cancel()
        writer.close()

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    status = Path(spec["status_file"])
    while not stopping.is_set():
        write_json(status, {"state": state, "closed_after": closed_after})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), 0.5)
    write_json(status, {"state": state, "closed_after": closed_after})
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def run_slow_client(path: str) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(slow_client(json.loads(Path(path).read_text())))


# -- the legitimate load ----------------------------------------------------------------------


def legit_load(port: int, rate: int, seconds: float, threads: int = 32) -> dict[str, Any]:
    """`rate` GETs/s for `seconds`, a new connection each; latency from the scheduled time."""
    raw = (
        f"GET /cloud/buckets HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
    ).encode()
    total = int(rate * seconds)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    start = time.perf_counter() + 0.2

    def worker(k: int) -> None:
        for i in range(k, total, threads):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(raw)
                    data = b""
                    while chunk := sock.recv(65536):
                        data += chunk
                status = data.split(b" ", 2)[1].decode() if data else "empty"
            except OSError as exc:
                errors[type(exc).__name__] += 1
                continue
            if status == "200":
                latencies.append(time.perf_counter() - due)
            else:
                errors[status] += 1

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(seconds + 60)
    latencies.sort()

    def pct(q: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(len(latencies) * q / 100))] * 1e3

    return {
        "sent": total,
        "ok": len(latencies),
        "rate": len(latencies) / seconds,
        "p50": pct(50),
        "p99": pct(99),
        "max": latencies[-1] * 1e3 if latencies else float("nan"),
        "errors": dict(errors),
    }


def line(name: str, r: dict[str, Any]) -> str:
    return (
        f"{name:<28} {r['ok']}/{r['sent']} ok, p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, "
        f"max {r['max']:.2f} ms, errors {json.dumps(r['errors']) if r['errors'] else 'none'}"
    )


def bench(args: argparse.Namespace, tmp: Path, procs: list[subprocess.Popen[Any]]) -> None:
    up, port = free_port(), free_port()
    (tmp / "upstream.py").write_text(UPSTREAM)
    procs.append(spawn([sys.executable, str(tmp / "upstream.py"), str(up)], tmp / "up.log"))
    (tmp / "c.yaml").write_text(config(port, up, tmp / "audit.jsonl"))
    log = tmp / "countersign.log"
    proxy = spawn([COUNTERSIGN, "run", "-c", str(tmp / "c.yaml")], log, args.proxy_nofile)
    procs.append(proxy)
    deadline = time.monotonic() + 30
    while True:
        if proxy.poll() is not None:
            raise RuntimeError(f"countersign exited: {log.read_text()[-2000:]}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_countersign/readyz") as resp,
        ):
            if resp.status == 200:
                break
        if time.monotonic() > deadline:
            raise RuntimeError("countersign not ready in 30 s")
        time.sleep(0.05)
    limit = Path(f"/proc/{proxy.pid}/limits").read_text()
    nofile = next(x for x in limit.splitlines() if x.startswith("Max open files")).split()[3]
    legit_load(port, args.rate, 1)  # warm-up
    fds0 = open_fds(proxy.pid)
    cpu0 = cpu_seconds(proxy.pid)
    base = legit_load(port, args.rate, args.baseline_seconds)
    cpu_base = (cpu_seconds(proxy.pid) - cpu0) / max(1, base["sent"]) * 1e6
    print(f"proxy RLIMIT_NOFILE soft {nofile}; proxy fds idle {fds0}")
    print(line(f"baseline ({args.rate}/s, {args.baseline_seconds:g} s)", base))

    spec = {
        "port": port,
        "count": args.slow,
        "interval": args.interval,
        "status_file": str(tmp / "slow.json"),
    }
    (tmp / "slow_spec.json").write_text(json.dumps(spec))
    slow = spawn(
        [sys.executable, __file__, "--slow-client", str(tmp / "slow_spec.json")], tmp / "slow.log"
    )
    procs.append(slow)
    began = time.monotonic()
    status: dict[str, Any] = {}
    while time.monotonic() - began < 60:
        with contextlib.suppress(OSError, ValueError):
            status = json.loads((tmp / "slow.json").read_text())
        st = status.get("state", {})
        done = st.get("connected", 0) + sum(v for k, v in st.items() if k.startswith("connect_f"))
        if done >= args.slow:
            break
        if slow.poll() is not None:
            raise RuntimeError(f"slow client exited: {(tmp / 'slow.log').read_text()[-2000:]}")
        time.sleep(0.2)
    ramp = time.monotonic() - began
    time.sleep(1)
    fds_slow = open_fds(proxy.pid)
    cpu1 = cpu_seconds(proxy.pid)
    under = legit_load(port, args.rate, args.seconds)
    cpu_under = (cpu_seconds(proxy.pid) - cpu1) / max(1, under["sent"]) * 1e6
    fds_end = open_fds(proxy.pid) if proxy.poll() is None else -1
    slow.send_signal(signal.SIGTERM)
    slow.wait(timeout=30)
    status = json.loads((tmp / "slow.json").read_text())
    st = status["state"]
    held_for = time.monotonic() - began
    print(
        f"slow connections opened      {st.get('connected', 0)} of {args.slow} in {ramp:.1f} s"
        f" ({json.dumps({k: v for k, v in st.items() if k.startswith('connect_f')})} failed)"
    )
    print(f"proxy fds with them / at end {fds_slow} / {fds_end}")
    print(line(f"under {args.slow} slow ({args.seconds:g} s)", under))
    print(
        f"proxy CPU per request        baseline {cpu_base:.0f} µs, under slowloris "
        f"{cpu_under:.0f} µs"
    )
    closed = st.get("closed_by_server", 0)
    answered = {k: v for k, v in st.items() if k.startswith("answered_")}
    print(
        f"slow conns closed by server  {closed} of {st.get('connected', 0)} over {held_for:.0f} s"
        f" ({st.get('bytes', 0)} header bytes trickled; answers {json.dumps(answered)})"
        + (
            f"; closed after {min(status['closed_after']):.1f}-{max(status['closed_after']):.1f} s"
            if status["closed_after"]
            else ""
        )
    )
    load = os.getloadavg()
    print(f"load average (1/5/15 min)    {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    ok = under["p99"] <= 50 and not under["errors"]
    print(
        f"   goal legitimate p99 <= 50 ms under {args.slow} slow connections: "
        f"{'MET' if ok else 'MISSED'} ({under['p99']:.2f} ms, errors "
        f"{sum(under['errors'].values())})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", type=int, default=2000, help="slowloris connections")
    parser.add_argument("--interval", type=float, default=5, help="seconds between bytes")
    parser.add_argument("--rate", type=int, default=200, help="legitimate requests/s")
    parser.add_argument("--seconds", type=float, default=20, help="load under slowloris")
    parser.add_argument("--baseline-seconds", type=float, default=10)
    parser.add_argument("--proxy-nofile", type=int, help="the proxy's soft RLIMIT_NOFILE")
    parser.add_argument("--slow-client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.slow_client:
        run_slow_client(args.slow_client)
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    tmp = Path(tempfile.mkdtemp(prefix="countersign-slowloris-"))
    procs: list[subprocess.Popen[Any]] = []
    try:
        bench(args, tmp, procs)
    except Exception:
        log = tmp / "countersign.log"
        if log.exists():
            print(f"--- countersign log:\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
