"""Cold bursts on every topology: 500 concurrent requests on a fresh key, sent to freshly
started gateways (2 replicas, or one `--workers 2`) on standalone Redis, TLS, a 3-master
cluster and a TLS cluster, with the default Redis timeout. Admission is exact (the limit plus
what refills during the burst), nothing answers 5xx, and spend is billed once per 200.

The gateways run with the default Redis timeout (0.25 s): a Redis call slower than that would
be a 503, so "no 5xx" is also "no Redis call slower than the timeout". (The wall time of the
slowest request, printed, is the 2-core machine working through 500 requests at once.)"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.config.settings import Settings
from gateway.store import connect
from tests.burst import CHAT, CHAT_COST, refill_bound
from tests.conftest import RedisServer, bearer, new_key
from tests.processes import Process, gateway_serve, mock_upstream

BURST = 500
TOPOLOGIES = ("standalone", "tls", "cluster", "tls_cluster")


@pytest.fixture(scope="module")
def upstream() -> Iterator[Process]:
    process = mock_upstream()
    yield process
    process.terminate()


@pytest.fixture(params=TOPOLOGIES)
def topology_url(request: pytest.FixtureRequest) -> str:
    if request.param == "standalone":
        server: RedisServer = request.getfixturevalue("redis_server")
        return f"redis://127.0.0.1:{server.port}/0"
    if request.param == "tls":
        return str(request.getfixturevalue("tls_redis").url())
    cluster: Any = request.getfixturevalue(request.param if request.param == "tls_cluster"
                                           else "redis_cluster")
    return str(cluster.url)


async def _timed_burst(urls: list[str], secret: str) -> tuple[Counter[int], float, float]:
    """(statuses, seconds for the whole burst, the slowest request's seconds)."""
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    clients = [httpx.AsyncClient(base_url=url, timeout=30, limits=limits) for url in urls]
    gate = asyncio.Event()
    slowest = 0.0

    async def one(i: int) -> int:
        nonlocal slowest
        await gate.wait()
        started = time.monotonic()
        response = await clients[i % len(clients)].post(
            "/v1/chat/completions", json=CHAT, headers=bearer(secret))
        slowest = max(slowest, time.monotonic() - started)
        return response.status_code

    try:
        tasks = [asyncio.ensure_future(one(i)) for i in range(BURST)]
        await asyncio.sleep(0)
        started = time.monotonic()
        gate.set()
        statuses = Counter(await asyncio.gather(*tasks))
        return statuses, time.monotonic() - started, slowest
    finally:
        for client in clients:
            await client.aclose()


@pytest.mark.parametrize("shape", ["replicas", "workers"])
async def test_a_cold_burst_is_exact_and_calm(topology_url: str, shape: str,
                                             upstream: Process) -> None:
    store = connect(topology_url, timeout_seconds=5.0)
    processes: list[Process] = []
    try:
        secret, key_id, _ = await new_key(store, Settings(), tpm=10_000_000)
        # Fresh processes: no connection to Redis is open before the burst arrives.
        processes = (gateway_serve(upstream.url, topology_url, replicas=2)
                     if shape == "replicas"
                     else gateway_serve(upstream.url, topology_url, "--workers", "2"))
        statuses, seconds, slowest = await _timed_burst([p.url for p in processes], secret)
        assert set(statuses) <= {200, 429}, statuses  # no 5xx at all
        admitted = statuses[200]
        assert 60 <= admitted <= 60 + refill_bound(60, seconds), statuses
        key = await store.get_key(key_id)
        assert key.spent == key.total_spent == admitted * CHAT_COST
        print(f"{topology_url.partition(':')[0]} {shape}: {dict(statuses)} in {seconds:.2f} s,"
              f" slowest {slowest:.2f} s")
    finally:
        for process in processes:
            process.terminate()
        await store.close()
