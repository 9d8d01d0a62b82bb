"""Child processes of the benchmark and their CPU time, read from /proc."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, utime+stime seconds) of one process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after its closing one.
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS


def cpu_seconds(pid: int) -> float:
    """CPU time of `pid` and all its live descendants (uvicorn's workers are children)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = _stat(int(entry))
            if found is not None:
                parents[int(entry)], times[int(entry)] = found
    total = 0.0
    for child, cpu in times.items():
        node: int | None = child
        while node:
            if node == pid:
                total += cpu
                break
            node = parents.get(node)
    return total


def pinning(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str,
                  timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


class Service:
    """One long-running child listening on a loopback port; stopped with SIGTERM."""

    def __init__(self, name: str, args: Sequence[str], port: int,
                 env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self.name = name
        self.port = port
        self.log = log
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(list(args), env=env, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        if log:
            out.close()  # type: ignore[union-attr]

    @property
    def pid(self) -> int:
        return self.process.pid

    def ready(self) -> None:
        try:
            wait_for_port(self.port, self.process, self.name)
        except RuntimeError as exc:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log else ""
            raise RuntimeError(f"{exc}\n{tail}") from None

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def redis_server(port: int, directory: Path) -> Service:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    return Service("redis-server", [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(directory), "--daemonize", "no", "--loglevel", "warning",
    ], port, log=directory / "redis.log")
