"""Store latency and settlement lag: the settlement round trip, the retry queue's length and
the age of its oldest settlement, against a real redis-server stopped and started again;
and the gauges' merge across worker processes (multiprocess mode)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.settlement import Settlement, SettlementQueue
from gateway.obs.metrics import MULTIPROC_ENV, InFlight, Metrics, exposition
from gateway.store import KeyRef, Store, connect
from tests.conftest import RedisServer, bearer, client_for, gateway, new_key
from tests.obs.test_observability import CHAT, sample


def scraped(metrics: Metrics) -> str:
    return exposition(metrics.registry)[0].decode()


async def test_each_settlement_round_trip_is_timed(store: Store, settings: Settings,
                                                   metrics: Metrics) -> None:
    # Redis settles on the hot connection, the embedded store through settle(): both timed.
    secret, _, _ = await new_key(store, settings)
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        for _ in range(4):
            assert (await client.post("/v1/chat/completions", json=CHAT,
                                      headers=bearer(secret))).status_code == 200
    text = scraped(metrics)
    assert sample(text, "gateway_settlement_duration_seconds_count") == 4
    assert sample(text, "gateway_settlements_total", outcome="settled") == 4
    total = sample(text, "gateway_settlement_duration_seconds_sum")
    assert total is not None and 0 < total < 4


async def until(condition_met: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition_met():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_the_retry_queue_shows_its_length_and_lag(tmp_path: Path,
                                                        metrics: Metrics) -> None:
    server = RedisServer(tmp_path)
    server.start()
    store = connect(server.url, 0.5)
    queue = SettlementQueue(store, metrics, first_delay=0.02, max_delay=0.05)
    try:
        ref = KeyRef("account", "key")
        await store.ping()
        server.stop()
        for n in range(2):  # Redis is down: both wait in the queue
            await queue.settle(Settlement(ref, f"r{n}", 1, 1, 1, "standard"))
        assert sample(scraped(metrics), "gateway_settlements_pending") == 2
        await asyncio.sleep(0.4)  # the retry loop keeps failing, the oldest ages
        lag = sample(scraped(metrics), "gateway_settlement_lag_seconds")
        assert lag is not None and 0.25 <= lag < 5
        server.start()
        await until(lambda: sample(scraped(metrics), "gateway_settlements_total",
                                   outcome="retried") == 2)
        text = scraped(metrics)
        assert sample(text, "gateway_settlements_pending") == 0
        assert sample(text, "gateway_settlement_lag_seconds") == 0
    finally:
        await queue.drain(1.0)
        await store.close()
        server.stop()


async def test_settlements_given_up_at_shutdown_leave_no_lag(tmp_path: Path,
                                                             metrics: Metrics) -> None:
    dead = connect(f"unix://{tmp_path}/nothing.sock", 0.2)
    queue = SettlementQueue(dead, metrics, first_delay=0.02, max_delay=0.05)
    try:
        await queue.settle(Settlement(KeyRef("a", "k"), "r", 1, 1, 1, "standard"))
        await asyncio.sleep(0.1)
        assert sample(scraped(metrics), "gateway_settlements_pending") == 1
        await queue.drain(0.2)  # the deadline passes: the estimate stands
    finally:
        await dead.close()
    text = scraped(metrics)
    assert sample(text, "gateway_settlements_total", outcome="failed") == 1
    assert sample(text, "gateway_settlements_pending") == 0
    assert sample(text, "gateway_settlement_lag_seconds") == 0


def test_in_flight_is_published_at_once_without_a_loop() -> None:
    metrics = Metrics.create(CollectorRegistry())
    counter = InFlight(metrics.in_flight.gauge)
    counter.enter()
    counter.enter()
    assert sample(scraped(metrics), "gateway_requests_in_flight") == 2
    counter.leave()
    assert sample(scraped(metrics), "gateway_requests_in_flight") == 1


async def test_in_flight_writes_its_gauge_once_per_interval(
        monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Metrics.create(CollectorRegistry())
    writes: list[float] = []
    gauge = metrics.in_flight.gauge
    counter = InFlight(gauge, delay=0.05)
    original = gauge.set

    def recording(value: float) -> None:
        writes.append(value)
        original(value)

    monkeypatch.setattr(gauge, "set", recording)
    for _ in range(100):
        counter.enter()
    for _ in range(60):
        counter.leave()
    assert writes == []  # nothing written per request
    await asyncio.sleep(0.15)
    assert writes == [40]


_GAUGES = textwrap.dedent("""
    import sys
    from prometheus_client import CollectorRegistry
    from gateway.obs.metrics import InFlight, Metrics
    m = Metrics.create(CollectorRegistry())
    n = int(sys.argv[1])
    counter = InFlight(m.in_flight.gauge)
    for _ in range(n):
        counter.enter()  # no event loop: written at once
    m.settlements_pending.set(n)
    m.settlement_lag.set(n * 1.5)
    print("ready", flush=True)
    sys.stdin.read()  # a live worker until the test closes its stdin
""")


def _workers(tmp_path: Path, *counts: int) -> list[subprocess.Popen[str]]:
    env = {**os.environ, MULTIPROC_ENV: str(tmp_path)}
    workers = []
    for n in counts:
        worker = subprocess.Popen([sys.executable, "-c", _GAUGES, str(n)], env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert worker.stdout is not None and worker.stdout.readline() == "ready\n"
        workers.append(worker)
    return workers


def test_gauges_merge_across_worker_processes(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    workers = _workers(tmp_path, 2, 3)
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    try:
        text = exposition(CollectorRegistry())[0].decode()
    finally:
        for worker in workers:
            worker.communicate("")
    assert sample(text, "gateway_requests_in_flight") == 5  # summed
    assert sample(text, "gateway_settlements_pending") == 5  # summed
    assert sample(text, "gateway_settlement_lag_seconds") == 4.5  # the oldest: the maximum


def test_a_dead_workers_live_gauges_are_forgotten(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed with requests in flight (OOM, a crash) leaves its gauge file; uvicorn
    starts another. Its 3 requests must not stay in flight forever."""
    survivor, crashed = _workers(tmp_path, 2, 3)
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    crashed.kill()
    crashed.wait()
    try:
        text = exposition(CollectorRegistry())[0].decode()
    finally:
        survivor.communicate("")
        crashed.communicate()
    assert sample(text, "gateway_requests_in_flight") == 2
    assert sample(text, "gateway_settlements_pending") == 2
    assert sample(text, "gateway_settlement_lag_seconds") == 3.0


def test_in_flight_outlives_an_event_loop() -> None:
    # A loop that closes with the write still scheduled (a test's, a worker's) must not stop
    # the gauge from being written in the next one.
    metrics = Metrics.create(CollectorRegistry())
    counter = InFlight(metrics.in_flight.gauge, delay=0.05)

    async def enter(wait: float) -> None:
        counter.enter()
        await asyncio.sleep(wait)

    asyncio.run(enter(0))
    asyncio.run(enter(0.15))
    assert sample(scraped(metrics), "gateway_requests_in_flight") == 2
