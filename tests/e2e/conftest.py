"""Run the real `countersign` executable as a process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

COUNTERSIGN = str(Path(sys.executable).parent / "countersign")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"countersign exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} within {timeout} s")


class Process:
    """A running `countersign` command whose stdout/stderr go to files."""

    def __init__(self, args: list[str], workdir: Path, port: int) -> None:
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"
        self.port = port
        self.proc = subprocess.Popen(
            [COUNTERSIGN, *args],
            stdout=self.stdout_path.open("wb"),
            stderr=self.stderr_path.open("wb"),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            wait_for_port(port, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"countersign did not start:\n{self.stderr()}") from None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def rss_kib(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def run_countersign(tmp_path: Path) -> Iterator[object]:
    started: list[Process] = []

    def start(config_text: str, port: int) -> Process:
        workdir = tmp_path / f"countersign-{len(started)}"
        workdir.mkdir()
        config = workdir / "countersign.yaml"
        config.write_text(config_text)
        proc = Process(["run", "-c", str(config)], workdir, port)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


class Demo:
    """A running `countersign demo`: its base URL and the demo keys its banner printed."""

    def __init__(self, port: int, banner: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.banner = banner
        self.agent_key = banner.split("Authorization: Bearer ", 1)[1].split('"', 1)[0]
        self.approver_key = banner.split("COUNTERSIGN_TOKEN=", 1)[1].split()[0]


@contextlib.asynccontextmanager
async def running_demo() -> AsyncIterator[Demo]:
    """`countersign demo` on a free port, once its banner is out; stopped afterwards."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        COUNTERSIGN,
        "demo",
        "--port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        banner = b""
        while b"Press Ctrl-C" not in banner:
            line = await asyncio.wait_for(proc.stdout.readline(), 15)
            assert line, "demo exited early"
            banner += line
        yield Demo(port, banner.decode())
    finally:
        proc.terminate()
        await proc.wait()
