"""`gateway serve --workers 2` as a real process: one metrics view across workers, request
logs from every worker, and a real Prometheus server scraping it.

The server runs against a private redis-server and the mock upstream
(`python -m gateway.demo.mock_upstream`), all on loopback, started once for this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from gateway.config.settings import Settings
from gateway.obs.metrics import MULTIPROC_ENV
from gateway.store import connect
from tests.conftest import RedisServer, bearer, free_port, new_key
from tests.obs.test_observability import bump_in_subprocess, sample

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 8}
CONFIG = """
[plans.alpha]
rpm = 100000
tpm = 100000000

[plans.beta]
rpm = 100000
tpm = 100000000
"""


@dataclass
class Served:
    base: str
    port: int
    metrics_port: int  # /metrics: its own listener
    redis: RedisServer
    upstream: str
    config: Path
    metrics_dir: Path
    log: Path
    keys: dict[str, tuple[str, str, str]]  # plan -> (secret, key id, account id)

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log.read_text().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                lines.append(orjson.loads(raw))
        return lines


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with status {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    pytest.fail(f"{what} did not listen on port {port} within 30 s")


def start_serve(served_env: dict[str, str], redis: RedisServer, upstream: str, config: Path,
                port: int, log: Path, metrics_port: int = 0) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GATEWAY_") and k != MULTIPROC_ENV}
    env.update(served_env)
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--redis", redis.url, "--config",
             str(config), "--upstream", upstream, "--port", str(port), "--workers", "2",
             "--metrics-port", str(metrics_port)],
            stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT)


def wait_for_workers(process: subprocess.Popen[bytes], log: Path, workers: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"gateway serve exited with {process.returncode}:\n{log.read_text()}")
        if log.read_text().count("Application startup complete") >= workers:
            return
        time.sleep(0.05)
    pytest.fail(f"gateway serve workers did not start within 30 s:\n{log.read_text()}")


def stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("serve")
    redis = RedisServer(root)
    redis.start()
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "gateway.demo.mock_upstream", "--port", str(upstream_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    process: subprocess.Popen[bytes] | None = None
    try:
        wait_for_port(upstream_port, upstream, "the mock upstream")
        config = root / "gateway.toml"
        config.write_text(CONFIG)
        settings = Settings.load(str(config), env={})

        async def create_keys() -> dict[str, tuple[str, str, str]]:
            store = connect(redis.url, 5.0)
            try:
                return {plan: await new_key(store, settings, name=plan, plan=plan)
                        for plan in ("alpha", "beta")}
            finally:
                await store.close()

        keys = asyncio.run(create_keys())
        metrics_dir = root / "metrics"
        metrics_dir.mkdir()
        bump_in_subprocess(metrics_dir, 1000, "alpha")  # a stale file from an earlier run
        port, metrics_port = free_port(), free_port()
        log = root / "serve.log"
        process = start_serve({MULTIPROC_ENV: str(metrics_dir), "GATEWAY_LOG_FORMAT": "json"},
                              redis, f"http://127.0.0.1:{upstream_port}", config, port, log,
                              metrics_port)
        wait_for_workers(process, log, 2)
        yield Served(f"http://127.0.0.1:{port}", port, metrics_port, redis,
                     f"http://127.0.0.1:{upstream_port}", config, metrics_dir, log, keys)
    finally:
        if process is not None:
            stop(process)
        upstream.terminate()
        upstream.wait(timeout=10)
        redis.stop()


async def send(base: str, secret: str, prefix: str, n: int, start: int = 0) -> list[int]:
    # One at a time and without keep-alive: every request is a new connection that any
    # worker may accept (a burst tends to be accepted whole by one worker).
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        return [(await client.post(
            "/v1/chat/completions", json=CHAT,
            headers={**bearer(secret), "X-Request-Id": f"{prefix}-{i}"})).status_code
            for i in range(start, start + n)]


def access_lines(served: Served, prefix: str, expected: int) -> list[dict[str, Any]]:
    """Our requests' log lines, once all `expected` are written (each follows its response)."""
    deadline = time.monotonic() + 10
    while True:
        ours = [line for line in served.log_lines() if line.get("logger") == "gateway.access"
                and str(line.get("request_id", "")).startswith(f"{prefix}-")]
        if len(ours) >= expected or time.monotonic() > deadline:
            return ours
        time.sleep(0.05)


def scrape(base: str) -> str:
    with httpx.Client(base_url=base, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        response = c.get("/metrics")
    assert response.status_code == 200
    return response.text


async def test_metrics_are_one_view_across_workers(served: Served) -> None:
    secret, key_id, account_id = served.keys["alpha"]
    metrics_url = f"http://127.0.0.1:{served.metrics_port}"
    text = scrape(metrics_url)
    before = sample(text, "gateway_admission_duration_seconds_count") or 0
    answered = sample(text, "gateway_upstream_duration_seconds_count", status_class="2xx") or 0
    settled = sample(text, "gateway_settlement_duration_seconds_count") or 0
    # Until both workers have served some of them (bounded), so the counts must be merged.
    n = 0
    for _ in range(20):
        assert await send(served.base, secret, "alpha", 20, start=n) == [200] * 20
        n += 20
        if len({line["pid"] for line in access_lines(served, "alpha", n)}) == 2:
            break

    allowed = {"decision": "allowed", "reason": "ok", "plan": "alpha"}
    for _ in range(8):  # several scrapes: whichever worker answers shows every worker's counts
        text = scrape(metrics_url)
        assert sample(text, "gateway_requests_total", **allowed) == n  # stale 1000 cleared
        tokens = {"plan": "alpha", "model": "other"}  # "m" is not in [pricing.models]
        assert sample(text, "gateway_tokens_total", kind="prompt", **tokens) == n * 10
        assert sample(text, "gateway_tokens_total", kind="completion", **tokens) == n * 8
        assert sample(text, "gateway_admission_duration_seconds_count") == before + n
        assert sample(text, "gateway_upstream_duration_seconds_count",
                      status_class="2xx") == answered + n
        assert sample(text, "gateway_settlement_duration_seconds_count") == settled + n
        assert sample(text, "gateway_settlements_pending") == 0
        for value in (secret, key_id, account_id):
            assert value not in text

    # Each request has exactly one log line, and both workers served some of them.
    ours = access_lines(served, "alpha", n)
    assert sorted(line["request_id"] for line in ours) == sorted(f"alpha-{i}" for i in range(n))
    assert len({line["pid"] for line in ours}) == 2
    assert {(line["status"], line["decision"], line["key_id"], line["account_id"],
             line["upstream_status"], line["model"]) for line in ours} == {
        (200, "allowed", key_id, account_id, 200, "m")}
    assert secret not in served.log.read_text()


async def test_streams_and_in_flight_across_workers(served: Served) -> None:
    secret, _, _ = served.keys["alpha"]
    metrics_url = f"http://127.0.0.1:{served.metrics_port}"
    before = sample(scrape(metrics_url), "gateway_stream_first_token_seconds_count") or 0
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=served.base, limits=limits, timeout=30) as client:
        for i in range(6):
            response = await client.post(
                "/v1/chat/completions", json={**CHAT, "stream": True},
                headers={**bearer(secret), "X-Request-Id": f"stream-{i}"})
            assert response.status_code == 200 and "[DONE]" in response.text
    text = scrape(metrics_url)
    assert sample(text, "gateway_stream_first_token_seconds_count") == before + 6
    assert sample(text, "gateway_stream_first_byte_seconds_count") == before + 6
    deadline = time.monotonic() + 10  # each worker writes its count within 50 ms
    while sample(scrape(metrics_url), "gateway_requests_in_flight") != 0:
        assert time.monotonic() < deadline, "requests still in flight after all answered"
        await asyncio.sleep(0.05)
    lines = access_lines(served, "stream", 6)
    assert len(lines) == 6 and all(line["ttft_ms"] >= 0 for line in lines)


def test_readyz_and_healthz_on_the_served_gateway(served: Served) -> None:
    with httpx.Client(base_url=served.base) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "redis": True, "scripts": True}


def test_serve_removes_its_private_metrics_dir(served: Served, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    process = start_serve({"TMPDIR": str(tmpdir)}, served.redis, served.upstream,
                          served.config, port, log)
    try:
        wait_for_workers(process, log, 2)
        (private,) = tmpdir.glob("gateway-metrics-*")
        assert list(private.glob("*.db"))  # the workers write their metrics there
    finally:
        code = stop(process)
    assert code == 0, log.read_text()
    assert not private.exists()


# --------------------------------------------------------------------------- Prometheus


@contextlib.contextmanager
def prometheus(tmp_path: Path, target_port: int) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is missing (Debian package 'prometheus'; "
                    ".ci/run installs it)")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "gateway",
                            "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
    }))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as err:
        process = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)
    try:
        wait_for_port(port, process, "prometheus")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def query(client: httpx.Client, promql: str) -> float | None:
    response = client.get("/api/v1/query", params={"query": promql})
    if response.status_code != 200:
        return None
    result = response.json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


async def test_prometheus_reads_the_gateways_counts(served: Served, tmp_path: Path) -> None:
    secret, _, _ = served.keys["beta"]
    assert await send(served.base, secret, "beta", 7) == [200] * 7
    assert await send(served.base, "sk_live_" + "n" * 40, "bad", 3) == [401] * 3
    allowed = 'sum(gateway_requests_total{plan="beta",decision="allowed",reason="ok"})'
    rejected = 'sum(gateway_requests_total{decision="rejected",reason="invalid_api_key"})'
    prompt = 'sum(gateway_tokens_total{plan="beta",kind="prompt"})'
    with prometheus(tmp_path, served.metrics_port) as url, httpx.Client(base_url=url) as client:
        deadline = time.monotonic() + 30
        seen: tuple[float | None, ...] = ()
        while time.monotonic() < deadline:
            seen = (query(client, allowed), query(client, rejected), query(client, prompt))
            if seen == (7, 3, 70):
                break
            await asyncio.sleep(0.25)
        assert seen == (7, 3, 70), (seen, (tmp_path / "prometheus.log").read_text()[-2000:])
        (target,) = client.get("/api/v1/targets").json()["data"]["activeTargets"]
        assert target["health"] == "up", target

        # The shipped alert rules load and evaluate against the real series without errors.
        rules: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            groups = client.get("/api/v1/rules").json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            if rules and all(rule["health"] != "unknown" for rule in rules):
                break
            await asyncio.sleep(0.25)
        assert rules and all(rule["health"] == "ok" for rule in rules), rules
