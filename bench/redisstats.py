"""What Redis itself saw: its CPU and command statistics (INFO), and the commands clients
sent during a batch (MONITOR), script-internal calls excluded."""

from __future__ import annotations

import re
import socket
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import redis

# A MONITOR line: +<time> [<db> <client>] "<COMMAND>" ...; script calls show client "lua".
_MONITOR_LINE = re.compile(rb'^\+\d+\.\d+ \[\d+ ([^\]]+)\] "([^"]*)"(?: "([^"]*)")?')


@dataclass(frozen=True)
class RedisSnapshot:
    cpu_s: float
    commands: dict[str, tuple[int, int]]  # command -> (calls, usec)


def snapshot(*clients: redis.Redis) -> RedisSnapshot:
    """CPU and command statistics of one server, or summed over several (a cluster's nodes)."""
    cpu_s = 0.0
    commands: dict[str, tuple[int, int]] = {}
    for client in clients:
        cpu = client.info("cpu")
        cpu_s += float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])
        for name, v in client.info("commandstats").items():
            calls, usec = commands.get(name.removeprefix("cmdstat_"), (0, 0))
            commands[name.removeprefix("cmdstat_")] = (calls + int(v["calls"]),
                                                       usec + int(v["usec"]))
    return RedisSnapshot(cpu_s, commands)


def delta(before: RedisSnapshot, after: RedisSnapshot, requests: int) -> dict[str, Any]:
    """Redis's own cost per request between two snapshots."""
    per_command: dict[str, dict[str, float]] = {}
    for name, (calls, usec) in after.commands.items():
        calls0, usec0 = before.commands.get(name, (0, 0))
        if calls > calls0 and name not in ("info", "monitor", "echo"):
            per_command[name] = {"calls_per_request": (calls - calls0) / requests,
                                 "usec_per_request": (usec - usec0) / requests}
    return {"cpu_ms_per_request": (after.cpu_s - before.cpu_s) * 1000 / requests,
            "commandstats": per_command}


class Monitor:
    """Counts the commands clients send between two ECHO markers of our own."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.token = uuid.uuid4().hex
        self.lines: list[bytes] = []
        self._sock = socket.create_connection((host, port))
        self._sock.sendall(b"MONITOR\r\n")
        self._buffer = b""
        while b"\r\n" not in self._buffer:
            self._buffer += self._sock.recv(65536)
        first, _, self._buffer = self._buffer.partition(b"\r\n")
        if first != b"+OK":
            raise RuntimeError(f"MONITOR refused: {first!r}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._mark("start")

    def _mark(self, which: str) -> None:
        with socket.create_connection((self.host, self.port)) as conn:
            payload = f"bench-{self.token}-{which}".encode()
            conn.sendall(b"*2\r\n$4\r\nECHO\r\n$%d\r\n%s\r\n" % (len(payload), payload))
            conn.recv(1024)

    def _read(self) -> None:
        end = f"bench-{self.token}-end".encode()
        while True:
            while b"\r\n" in self._buffer:
                line, _, self._buffer = self._buffer.partition(b"\r\n")
                self.lines.append(line)
                if end in line:
                    return
            data = self._sock.recv(1 << 20)
            if not data:
                return
            self._buffer += data

    def finish(self, scripts: dict[str, str]) -> Counter[str]:
        """Client commands (by name) seen between the markers; lua-internal ones excluded.
        EVALSHA calls are labelled with the script's name from `scripts` (sha -> name)."""
        self._mark("end")
        self._reader.join(timeout=30)
        self._sock.close()
        start = f"bench-{self.token}-start".encode()
        counted: Counter[str] = Counter()
        inside = False
        for line in self.lines:
            if start in line:
                inside = True
                continue
            match = _MONITOR_LINE.match(line)
            if not inside or match is None or match.group(1) == b"lua":
                continue
            if match.group(2).upper() == b"ECHO":
                continue
            name = match.group(2).decode().upper()
            if name == "EVALSHA" and match.group(3):
                name += " " + scripts.get(match.group(3).decode(), "unknown")
            counted[name] += 1
        return counted
