"""`gateway serve` and the mock upstream as real subprocesses on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.conftest import free_port


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra or {})
    return env


class Process:
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, *args, "--port", str(self.port)],
                                        env=_clean_env(env), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)

    def wait_ready(self, path: str = "/healthz", seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"process exited early: {err[-2000:]}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.url} did not become ready")

    def terminate(self, seconds: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=seconds)
        finally:
            if self.process.stderr is not None:
                self.process.stderr.close()


def mock_upstream(chunk_delay: float = 0.0) -> Process:
    upstream = Process(["-m", "gateway.demo.mock_upstream", "--chunk-delay", str(chunk_delay)])
    upstream.wait_ready("/v1/models")
    return upstream


def gateway_serve(upstream: str, redis_url: str, *extra: str, replicas: int = 1,
                  env: dict[str, str] | None = None) -> list[Process]:
    """Starts `replicas` gateway processes side by side and waits until all answer."""
    gateways = [Process(["-m", "gateway", "serve", "--metrics-port", "0", "--upstream",
                         upstream, "--redis", redis_url, "--log-level", "warning", *extra], env)
                for _ in range(replicas)]
    for gateway in gateways:
        gateway.wait_ready()
    return gateways
