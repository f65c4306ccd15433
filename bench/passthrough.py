"""First pass-through figure: wrk against the upstream directly, then through `countersign run`.

    python bench/passthrough.py [--seconds 10] [--connections 32]

Needs `wrk` (Debian package). The upstream is a small aiohttp JSON server in its own process;
the proxy authenticates with an API key and judges against the example policy, audit on stdout
(sent to /dev/null). Prints requests/s and latency percentiles for each. Loopback only.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.authn.apikeys import key_digest  # noqa: E402

KEY = "cs_bench_key_000000000000000000000000000"

UPSTREAM = """
from aiohttp import web
async def ok(_): return web.json_response({"ok": True, "items": [1, 2, 3]})
app = web.Application(); app.router.add_get("/{tail:.*}", ok)
web.run_app(app, host="127.0.0.1", port=int(__import__("sys").argv[1]), access_log=None, print=None)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def wrk(url: str, seconds: int, connections: int, header: str | None) -> dict[str, str]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if header:
        cmd[1:1] = ["-H", header]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    result = {"rps": rps.group(1) if rps else "?"}
    for pct in ("50%", "99%"):
        m = re.search(rf"^\s+{re.escape(pct)}\s+(\S+)", out, re.M)
        result[pct] = m.group(1) if m else "?"
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = non2xx.group(1) if non2xx else "0"
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    up_port, proxy_port = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp())
    (tmp / "upstream.py").write_text(UPSTREAM)
    (tmp / "c.yaml").write_text(
        (ROOT / "config" / "countersign.example.yaml")
        .read_text()
        .replace("127.0.0.1:8080", f"127.0.0.1:{proxy_port}")
        .replace("https://cloud.example.com/", f"http://127.0.0.1:{up_port}/")
        .replace("https://idp.example.com", "http://127.0.0.1:9")  # loopback only
        .replace(
            "api_keys:",
            f'api_keys:\n    - {{sha256: "{key_digest(KEY)}", subject: "bench", groups: [agents]}}',
        )
    )
    env = {**os.environ, "CLOUD_TOKEN": "bench", "GITHUB_TOKEN": "bench"}
    countersign = str(Path(sys.executable).parent / "countersign")
    procs = [
        subprocess.Popen([sys.executable, str(tmp / "upstream.py"), str(up_port)]),
        subprocess.Popen(
            [countersign, "run", "-c", str(tmp / "c.yaml")],
            env=env,
            stdout=subprocess.DEVNULL,
        ),
    ]
    try:
        wait(up_port)
        wait(proxy_port)
        direct = wrk(f"http://127.0.0.1:{up_port}/buckets", args.seconds, args.connections, None)
        proxied = wrk(
            f"http://127.0.0.1:{proxy_port}/cloud/buckets",
            args.seconds,
            args.connections,
            f"Authorization: Bearer {KEY}",
        )
    finally:
        for p in procs:
            p.terminate()
            p.wait()
    print(f"{'target':<22}{'req/s':>10}{'p50':>10}{'p99':>10}{'non-2xx':>10}")
    for name, r in (("upstream direct", direct), ("through countersign", proxied)):
        print(f"{name:<22}{r['rps']:>10}{r['50%']:>10}{r['99%']:>10}{r['errors']:>10}")


if __name__ == "__main__":
    main()
