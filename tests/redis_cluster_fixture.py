"""Real Redis topologies on loopback for the tests: a 3-master Redis Cluster, and a master with
one replica watched by 3 sentinels (`redis-server --sentinel`). Each process has its own port
and directory under one temporary directory; `cleanup` stops them all and removes it.

The cluster is formed with CLUSTER ADDSLOTSRANGE and CLUSTER MEET sent by this module (no
redis-cli needed).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.redis_fixture import _free_port

_STARTUP_SECONDS = 10


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian package redis-server)")
    return binary


def _command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """One command in RESP to 127.0.0.1:port; the raw first reply (enough for +OK, :n, $n)."""
    payload = b"*%d\r\n" % len(args) + b"".join(
        b"$%d\r\n%b\r\n" % (len(a.encode()), a.encode()) for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(payload)
        data = b""
        while not _complete(data):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _complete(data: bytes) -> bool:
    """Whether `data` holds a whole reply: a line, a bulk string, or an array of bulk strings."""
    if not data.endswith(b"\r\n"):
        return False
    if data.startswith(b"$"):
        header, _, rest = data.partition(b"\r\n")
        return int(header[1:]) < 0 or len(rest) >= int(header[1:]) + 2
    if data.startswith(b"*"):
        header, _, rest = data.partition(b"\r\n")
        return rest.count(b"\r\n") >= 2 * max(int(header[1:]), 0)  # short values only
    return True


def _bulk(reply: bytes) -> str:
    """The text of a bulk-string reply."""
    if not reply.startswith(b"$"):
        raise RuntimeError(f"unexpected reply {reply[:200]!r}")
    _, _, rest = reply.partition(b"\r\n")
    return rest.rsplit(b"\r\n", 1)[0].decode()


class _Process:
    def __init__(self, directory: Path, port: int, args: list[str]) -> None:
        self.dir = directory
        self.port = port
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.args, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + _STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on {self.port} exited: {log}")
            try:
                if _command(self.port, "PING", timeout=0.3).startswith(b"+PONG"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.port} did not answer PING")

    def kill(self) -> None:
        """SIGKILL: the process dies as on a crash (nothing flushed, no goodbye)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _server_args(directory: Path, port: int, *extra: str) -> list[str]:
    return [
        _binary(),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(directory),
        "--save",
        "",
        "--appendonly",
        "no",
        "--logfile",
        str(directory / "redis.log"),
        "--protected-mode",
        "no",
        *extra,
    ]


class RedisClusterServers:
    """Three masters, the 16384 slots split between them in thirds."""

    def __init__(self, masters: int = 3) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="countersign-cluster-"))
        self.nodes: list[_Process] = []
        self.bus_ports: list[int] = []
        for i in range(masters):
            port = _free_port()
            self.bus_ports.append(_free_port())
            directory = self.root / f"node{i}"
            args = _server_args(
                directory,
                port,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(directory / "nodes.conf"),
                "--cluster-port",  # not port + 10000: a free port may be above 55535
                str(self.bus_ports[-1]),
                "--cluster-node-timeout",
                "2000",
            )
            self.nodes.append(_Process(directory, port, args))

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def url(self, index: int = 0) -> str:
        return f"redis://127.0.0.1:{self.nodes[index].port}"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        per_node = 16384 // len(self.nodes)
        for i, node in enumerate(self.nodes):
            first = i * per_node
            last = 16383 if i == len(self.nodes) - 1 else first + per_node - 1
            reply = _command(node.port, "CLUSTER", "ADDSLOTSRANGE", str(first), str(last))
            if not reply.startswith(b"+OK"):
                raise RuntimeError(f"CLUSTER ADDSLOTSRANGE: {reply!r}")
        for node in self.nodes[1:]:
            first = self.nodes[0].port
            reply = _command(
                node.port, "CLUSTER", "MEET", "127.0.0.1", str(first), str(self.bus_ports[0])
            )
            if not reply.startswith(b"+OK"):
                raise RuntimeError(f"CLUSTER MEET: {reply!r}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            infos = [_bulk(_command(port, "CLUSTER", "INFO")) for port in self.ports]
            known = f"cluster_known_nodes:{len(self.nodes)}"
            if all("cluster_state:ok" in info and known in info for info in infos):
                return
            time.sleep(0.1)
        raise RuntimeError("the cluster did not reach cluster_state:ok within 20 s")

    def owner(self, slot: int) -> int:
        """The index of the node that serves `slot`."""
        return min(slot // (16384 // len(self.nodes)), len(self.nodes) - 1)

    def cleanup(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class RedisSentinelGroup:
    """A master, one replica of it, and three sentinels that watch it as `master_name` (quorum
    2, a master is down after 1 s without answering)."""

    master_name = "countersign-test"

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="countersign-sentinel-"))
        master_port, replica_port = _free_port(), _free_port()
        self.master = _Process(
            self.root / "master", master_port, _server_args(self.root / "master", master_port)
        )
        self.replica = _Process(
            self.root / "replica",
            replica_port,
            _server_args(
                self.root / "replica", replica_port, "--replicaof", "127.0.0.1", str(master_port)
            ),
        )
        self.sentinels: list[_Process] = []
        for i in range(3):
            port = _free_port()
            directory = self.root / f"sentinel{i}"
            directory.mkdir(parents=True)
            conf = directory / "sentinel.conf"
            conf.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                "protected-mode no\n"
                f"dir {directory}\n"
                f"logfile {directory / 'redis.log'}\n"
                f"sentinel monitor {self.master_name} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {self.master_name} 1000\n"
                f"sentinel failover-timeout {self.master_name} 10000\n"
                f"sentinel parallel-syncs {self.master_name} 1\n"
            )
            self.sentinels.append(_Process(directory, port, [_binary(), str(conf), "--sentinel"]))

    @property
    def nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", s.port) for s in self.sentinels]

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        deadline = time.monotonic() + _STARTUP_SECONDS
        while "master_link_status:up" not in _bulk(
            _command(self.replica.port, "INFO", "replication")
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync with the master")
            time.sleep(0.05)
        for sentinel in self.sentinels:
            sentinel.start()
        # Every sentinel knows the replica and the other sentinels before a test kills anything.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ready = True
            for sentinel in self.sentinels:
                info = _bulk(_command(sentinel.port, "INFO", "sentinel"))
                if f"slaves=1,sentinels={len(self.sentinels)}" not in info:
                    ready = False
            if ready:
                return
            time.sleep(0.1)
        raise RuntimeError("the sentinels did not discover each other within 20 s")

    def master_port(self) -> int:
        """The port of the master the sentinels name now."""
        reply = _command(
            self.sentinels[0].port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
        )
        # *2\r\n$9\r\n127.0.0.1\r\n$5\r\n12345\r\n
        parts = reply.split(b"\r\n")
        return int(parts[4])

    def cleanup(self) -> None:
        for process in [*self.sentinels, self.replica, self.master]:
            process.stop()
        shutil.rmtree(self.root, ignore_errors=True)
