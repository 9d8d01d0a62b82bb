"""A private Redis Cluster on loopback for the tests: 3 masters, with or without replicas."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 < 65536 and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisCluster:
    def __init__(self, directory: Path, masters: int = 3, replicas: int = 0,
                 node_timeout_ms: int = 2000) -> None:
        binary = shutil.which("redis-server")
        if binary is None or shutil.which("redis-cli") is None:
            pytest.fail("redis-server and redis-cli are needed (apt-get install redis-server)")
        self.binary = binary
        self.directory = directory
        self.ports: list[int] = []
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def cli(self, port: int, *args: str) -> str:
        done = subprocess.run(["redis-cli", "-p", str(port), *args], check=True,
                              capture_output=True, timeout=10)
        return done.stdout.decode()

    def start(self) -> None:
        for _ in range(self.masters * (1 + self.replicas)):
            port = cluster_port()
            node_dir = self.directory / str(port)
            node_dir.mkdir()
            self.processes.append(subprocess.Popen(
                [self.binary, "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", str(self.node_timeout_ms), "--save", "",
                 "--appendonly", "no",
                 "--dir", str(node_dir), "--daemonize", "no", "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.ports.append(port)
        for port in self.ports:
            self._wait(lambda p=port: self.cli(p, "PING").strip() == "PONG")
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=30)
        for port in self.ports:
            self._wait(lambda p=port: "cluster_state:ok" in self.cli(p, "CLUSTER", "INFO"))
        for port in self.ports:
            self._wait(lambda p=port: "role:master" in self.cli(p, "INFO", "replication")
                       or "master_link_status:up" in self.cli(p, "INFO", "replication"))

    @staticmethod
    def _wait(ready: object, seconds: float = 15) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if ready():  # type: ignore[operator]
                    return
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the Redis Cluster did not come up")

    def flush(self) -> None:
        for port in self.ports:
            self.cli(port, "FLUSHALL")

    def _nodes(self, port: int) -> list[list[str]]:
        """CLUSTER NODES as seen from `port`: id, address, flags, master id, …, slots."""
        return [line.split() for line in self.cli(port, "CLUSTER", "NODES").splitlines()
                if line.strip()]

    def master_of(self, key: str) -> int:
        """The port of the master that serves `key`'s slot now."""
        asking = next(p for p, proc in zip(self.ports, self.processes, strict=True)
                      if proc.poll() is None)
        slot = int(self.cli(asking, "CLUSTER", "KEYSLOT", key).strip())
        for fields in self._nodes(asking):
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return int(fields[1].split("@")[0].rpartition(":")[2])
        raise RuntimeError(f"no master serves slot {slot}")

    def replica_of(self, master_port: int) -> int:
        nodes = self._nodes(master_port)
        master_id = next(f[0] for f in nodes if "myself" in f[2])
        return next(int(f[1].split("@")[0].rpartition(":")[2]) for f in nodes
                    if "slave" in f[2] and f[3] == master_id)

    def wait_for_replicas(self, port: int, seconds: float = 15) -> None:
        """Until every replica of the master at `port` has acknowledged all it has written.
        (WAIT would not do: it waits for the writes of its own connection only.)"""
        info = dict(line.split(":", 1) for line in
                    self.cli(port, "INFO", "replication").split() if ":" in line)
        target = int(info["master_repl_offset"])

        def caught_up() -> bool:
            info = dict(line.split(":", 1) for line in
                        self.cli(port, "INFO", "replication").split() if ":" in line)
            offsets = [int(dict(kv.split("=") for kv in value.split(","))["offset"])
                       for name, value in info.items() if name.startswith("slave")
                       and name[5:].isdigit()]
            return bool(offsets) and min(offsets) >= target

        self._wait(caught_up, seconds)

    def kill(self, port: int) -> None:
        """SIGKILL: a crash, with no chance to hand anything over."""
        process = self.processes[self.ports.index(port)]
        process.kill()
        process.wait(timeout=10)

    def keys_per_node(self) -> list[int]:
        return [int(self.cli(port, "DBSIZE").strip()) for port in self.ports]

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=10)
        self.processes.clear()
