"""A private Redis Cluster for the benchmark: 3 masters, no replicas, on loopback.

Each node is a `redis-server --cluster-enabled yes` child on a free port whose cluster bus
port (port + 10000) is free too; `redis-cli --cluster create` assigns the 16384 slots, and the
cluster is ready once every node reports `cluster_state:ok`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import redis

from bench.procs import Service, free_port
from bench.redisstats import Monitor


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free too, not in `taken`."""
    for _ in range(200):
        port = free_port()
        if (port + 10000 < 65536 and port not in taken and port + 10000 not in taken
                and _bindable(port + 10000)):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class LocalCluster:
    """3 (or `masters`) redis-server cluster nodes, each a Service, plus redis-py clients."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        binary = shutil.which("redis-server")
        if binary is None or shutil.which("redis-cli") is None:
            raise RuntimeError("the Redis Cluster column needs redis-server and redis-cli "
                               "(apt-get install redis-server), or pass --no-cluster")
        self.directory = directory
        self.nodes: list[Service] = []
        taken: set[int] = set()
        for _ in range(masters):
            port = cluster_port(taken)
            taken |= {port, port + 10000}
            node_dir = directory / f"cluster-{port}"
            node_dir.mkdir()
            self.nodes.append(Service(f"redis-server cluster :{port}", [
                binary, "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--save", "", "--appendonly", "no", "--dir", str(node_dir),
                "--daemonize", "no", "--loglevel", "warning"], port,
                log=node_dir / "redis.log"))
        self.clients = [redis.Redis(port=node.port) for node in self.nodes]

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def ready(self) -> None:
        for node in self.nodes:
            node.ready()
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while not all(self._ok(port) for port in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    @staticmethod
    def _ok(port: int) -> bool:
        done = subprocess.run(["redis-cli", "-p", str(port), "CLUSTER", "INFO"],
                              capture_output=True, timeout=10)
        return done.returncode == 0 and b"cluster_state:ok" in done.stdout

    def monitors(self) -> list[Monitor]:
        """A MONITOR on every node; their counts sum to what the cluster was sent."""
        return [Monitor("127.0.0.1", port) for port in self.ports]

    @staticmethod
    def finish(monitors: list[Monitor], scripts: dict[str, str]) -> Counter[str]:
        counted: Counter[str] = Counter()
        for monitor in monitors:
            counted.update(monitor.finish(scripts))
        return counted

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for node in reversed(self.nodes):
            node.stop()
