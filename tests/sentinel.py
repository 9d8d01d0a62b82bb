"""A private Sentinel deployment on loopback for the tests: a primary, a replica and three
Sentinels (quorum 2), each a redis-server process of our own."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

SERVICE = "gw-primary"


class SentinelSet:
    def __init__(self, directory: Path, down_after_ms: int = 1000) -> None:
        binary = shutil.which("redis-server")
        if binary is None or shutil.which("redis-cli") is None:
            pytest.fail("redis-server and redis-cli are needed (apt-get install redis-server)")
        self.binary = binary
        self.directory = directory
        self.down_after_ms = down_after_ms
        self.data_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def cli(self, port: int, *args: str) -> str:
        done = subprocess.run(["redis-cli", "-p", str(port), *args], check=True,
                              capture_output=True, timeout=10)
        return done.stdout.decode()

    def _start(self, port: int, *args: str) -> None:
        node_dir = self.directory / str(port)
        node_dir.mkdir(exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [self.binary, *args, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(node_dir), "--daemonize", "no",
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait(lambda: self.cli(port, "PING").strip() == "PONG")

    def start(self) -> None:
        primary, replica = self.data_ports
        self._start(primary)
        self._start(replica, "--replicaof", "127.0.0.1", str(primary))
        for port in self.sentinel_ports:
            config = self.directory / f"sentinel-{port}.conf"
            config.write_text(
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n")
            self._start(port, str(config), "--sentinel")
        self._wait(lambda: "master_link_status:up" in self.cli(replica, "INFO", "replication"))
        # Every Sentinel knows the replica and its peers before a test may fail anything.
        for port in self.sentinel_ports:
            self._wait(lambda p=port: "num-slaves\n1" in self._master_info(p)
                       and "num-other-sentinels\n2" in self._master_info(p))

    def _master_info(self, port: int) -> str:
        return self.cli(port, "SENTINEL", "MASTER", SERVICE)

    def primary_port(self) -> int:
        reply = self.cli(self.sentinel_ports[0], "SENTINEL", "get-master-addr-by-name",
                         SERVICE).split()
        return int(reply[1])

    def failover(self) -> None:
        """SENTINEL FAILOVER: a hand-over ordered by the operator."""
        self.cli(self.sentinel_ports[0], "SENTINEL", "FAILOVER", SERVICE)

    def kill(self, port: int) -> None:
        process = self.processes[port]
        process.kill()
        process.wait(timeout=10)

    def wait_for_replica(self, primary: int) -> None:
        info = self.cli(primary, "INFO", "replication")
        target = int(next(line.split(":")[1] for line in info.split()
                          if line.startswith("master_repl_offset:")))

        def caught_up() -> bool:
            lines = self.cli(primary, "INFO", "replication").split()
            offsets = [int(dict(kv.split("=") for kv in line.split(":", 1)[1].split(","))
                           ["offset"]) for line in lines
                       if line.startswith("slave") and line[5:6].isdigit()]
            return bool(offsets) and min(offsets) >= target

        self._wait(caught_up)

    @staticmethod
    def _wait(ready: object, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if ready():  # type: ignore[operator]
                    return
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the Sentinel set did not come up")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            process.wait(timeout=10)
        self.processes.clear()
