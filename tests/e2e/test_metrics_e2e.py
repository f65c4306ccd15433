"""Metrics on the real `countersign run` with `workers: 2` on a real Redis: one view of all."""

from __future__ import annotations

import asyncio
import secrets

import aiohttp
from aiohttp.test_utils import TestServer

from tests.e2e.conftest import Process, free_port
from tests.e2e.test_replicas_e2e import AGENT as E2E_AGENT
from tests.e2e.test_replicas_e2e import StartFn, config
from tests.redis_fixture import RedisServer
from tests.test_metrics import parse, samples


async def test_one_scrape_counts_every_worker(
    run_countersign: StartFn, upstream: TestServer, fresh_redis: RedisServer
) -> None:
    """`countersign run` with `workers: 2` on Redis: requests spread over both workers (new
    connections, SO_REUSEPORT), and any one scrape, whichever worker answers it, counts all."""
    port, admin_port = free_port(), free_port()
    text = config(port, str(upstream.make_url("/")), fresh_redis.url, "m-" + secrets.token_hex(6))
    text = text.replace(
        "server: {", f'server: {{workers: 2, admin_listen: "127.0.0.1:{admin_port}", '
    )
    proc: Process = run_countersign(text, port)
    admin = f"http://127.0.0.1:{admin_port}/_countersign/metrics"
    sent = 40
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _ in range(50):  # both workers' admin listeners up
            try:
                async with session.get(admin) as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
        for _ in range(sent):
            async with session.get(f"{proc.url}/cloud/buckets", headers=E2E_AGENT) as resp:
                assert resp.status == 200
        totals = []
        for _ in range(8):  # new connections: the kernel spreads them over both workers
            async with session.get(admin) as resp:
                counted = samples(parse(await resp.text()), "countersign_requests_total")
            totals.append(counted[(("decision", "allow"), ("route", "cloud"), ("status", "200"))])
    assert totals == [float(sent)] * 8
    assert proc.stop() == 0, proc.stderr()[-4000:]
    started = [line for line in proc.stderr().splitlines() if '"server.started"' in line]
    assert len(started) == 2
