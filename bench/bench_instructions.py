"""Instructions per pass-through request, counted by valgrind: a figure that a noisy machine does
not move, for telling whether a change to the request path made it cheaper.

    .venv/bin/python bench/bench_instructions.py [--requests 2000] [--floor | --bare]

Runs the proxy under `valgrind --tool=callgrind --instr-atstart=no` (Debian's valgrind), with the
configuration of `make bench`'s Countersign row (JWT from the test IdP, 1,000 rules with the
allowing rule last, audit file on, memory store) in front of one nginx upstream; sends 200
requests to warm it up, switches counting on (`callgrind_control -i on`), sends exactly
`--requests` keep-alive GETs over 8 connections, switches it off, dumps, and prints the
user-space instructions per request. `--floor`: the same for the front and upstream client with
nothing between them (bench_floor.py's relay); `--bare`: for bench_floor.py's bare Python relay
(no proxy duties: the least a Python relay costs). Starting the proxy under valgrind takes a minute
or two; the run itself about one more. Repeatable to about ±0.5 % (seen here); req/s moved
±15 % between identical runs on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_floor  # noqa: E402
import run_all  # noqa: E402


def send(port: int, path: str, count: int, connections: int, token: str | None) -> int:
    """`count` GETs over `connections` keep-alive sockets (a thread each); the non-200s."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n{auth}\r\n".encode()
    failures = [0]

    def run(n: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            buffer = bytearray()
            for _ in range(n):
                sock.sendall(request)
                status = run_all._read_response(sock, buffer)
                if status != 200:
                    failures[0] += 1

    threads = [
        threading.Thread(target=run, args=(count // connections,)) for _ in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    relay = parser.add_mutually_exclusive_group()
    relay.add_argument("--floor", action="store_true", help="front + upstream client only")
    relay.add_argument("--bare", action="store_true", help="the bare Python relay")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "nginx"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (Debian packages valgrind, nginx)")
    tmp = Path(tempfile.mkdtemp(prefix="countersign-instr-"))
    out = tmp / "callgrind.out"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    relay_only = args.floor or args.bare
    idp = None if relay_only else run_all.start_idp(run_all.DEFAULT_CLIENTS)
    try:
        with run_all.processes() as procs:
            up, port = run_all.free_port(), run_all.free_port()
            body = run_all.NGINX_UPSTREAM.format(port=up, json=run_all.BODY)
            procs.append(run_all.nginx(tmp, "upstream", body, 1))
            run_all.wait_port(up, procs[-1], "nginx upstream")
            token = None
            if idp is None:
                code = bench_floor.BARE_RELAY if args.bare else bench_floor.FRONT_ONLY
                command = [run_all.PY, "-c", code, str(up), str(port)]
                path = "/x"
            else:
                conf = run_all.countersign_config(tmp, port, up, idp.issuer, 1000, 1, "memory://")
                command = [run_all.COUNTERSIGN, "run", "-c", str(conf)]
                path = run_all.PATH
                token = asyncio.run(idp.token("agent-7"))
            print("starting under valgrind (a minute or two)…", flush=True)
            proc = subprocess.Popen([*valgrind, *command], cwd=ROOT, stderr=subprocess.DEVNULL)
            procs.append(proc)
            run_all.wait_port(port, proc, "the proxy under valgrind", timeout=900)

            def control(*flags: str) -> None:
                subprocess.run(
                    ["callgrind_control", *flags, str(proc.pid)], check=True, capture_output=True
                )

            send(port, path, 200, 8, token)
            control("-i", "on")
            failures = send(port, path, args.requests, 8, token)
            control("-i", "off")
            control("-d")
            dumps = sorted(tmp.glob("callgrind.out.*"))
            if not dumps:
                raise SystemExit("callgrind wrote no dump")
            totals = re.search(r"^totals: (\d+)", dumps[-1].read_text(), re.M)
            if totals is None:
                raise SystemExit(f"no totals in {dumps[-1]}")
            if args.bare:
                what = "bare Python relay"
            else:
                what = "front + upstream client" if args.floor else "countersign run"
            count = args.requests // 8 * 8  # what the 8 connections sent
            print(f"{what}: {int(totals.group(1)) / count:,.0f} instructions per request")
            print(f"({count} requests, non-200: {failures})")
    finally:
        if idp is not None:
            idp.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
