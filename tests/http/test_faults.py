"""Redis going away and coming back: fail closed/open, timeouts, settlement retries, recovery.

Each test stops and restarts a private redis-server (append-only, same port and socket).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.config.settings import Settings
from gateway.core.keys import hash_secret
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.middleware import GatewayMiddleware
from gateway.http.settlement import Settlement, SettlementQueue
from gateway.obs.metrics import Metrics
from gateway.store import Ask, KeyRef, Names, Store, connect
from tests.burst import CHAT, CHAT_COST
from tests.conftest import PLAN_LIMITS, RedisServer, bearer, client_for, new_key
from tests.redis_inspect import redis_of

TIMEOUT = 0.25


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    redis = RedisServer(tmp_path, appendonly=True)
    redis.start()
    yield redis
    if redis.process is not None and redis.process.poll() is None:
        os.kill(redis.process.pid, signal.SIGCONT)
    redis.stop()


@pytest.fixture
async def fault_store(server: RedisServer) -> AsyncIterator[Store]:
    store = connect(server.url, TIMEOUT)
    yield store
    await store.close()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def make_gateway(upstream: MockUpstream, store: Store, registry: CollectorRegistry,
                 fail_mode: str = "closed") -> GatewayMiddleware:
    settings = Settings(fail_mode=fail_mode, redis_timeout_seconds=TIMEOUT)
    return GatewayMiddleware(upstream, settings=settings, store=store,
                             metrics=Metrics.create(registry))


async def chat(client: httpx.AsyncClient, secret: str) -> httpx.Response:
    return await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))


async def until(condition: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_fail_closed_then_recovers_without_restart(
        server: RedisServer, fault_store: Store, registry: CollectorRegistry) -> None:
    settings = Settings()
    secret, key_id, _ = await new_key(fault_store, settings)
    upstream = MockUpstream()
    async with client_for(make_gateway(upstream, fault_store, registry)) as client:
        assert (await chat(client, secret)).status_code == 200
        server.stop()
        for _ in range(3):
            started = time.monotonic()
            response = await chat(client, secret)
            assert time.monotonic() - started < 1.0
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "limiter_unavailable"
        usage = await client.get("/v1/usage", headers=bearer(secret))
        assert usage.status_code == 502
        assert usage.json()["error"]["code"] == "usage_unavailable"
        assert (await client.get("/readyz")).status_code == 503
        assert upstream.requests == 1
        server.start()
        assert (await chat(client, secret)).status_code == 200
        assert (await client.get("/v1/usage", headers=bearer(secret))).status_code == 200
    assert upstream.requests == 2
    assert (await fault_store.get_key(key_id)).spent == 2 * CHAT_COST
    assert sample(registry, "gateway_store_errors_total", op="admit") == 3
    assert sample(registry, "gateway_fail_open_requests_total") == 0


async def test_a_stalled_redis_times_out_fast_and_a_lost_admission_is_released(
        server: RedisServer, fault_store: Store, registry: CollectorRegistry) -> None:
    secret, key_id, _ = await new_key(fault_store, Settings())
    upstream = MockUpstream()
    gateway = make_gateway(upstream, fault_store, registry)
    assert server.process is not None
    async with client_for(gateway) as client:
        assert (await chat(client, secret)).status_code == 200
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            # A bound of our own: without the store's timeout this would hang the suite.
            async with asyncio.timeout(5):
                response = await chat(client, secret)
            assert time.monotonic() - started < 1.0
            assert response.status_code == 503
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        # The admission written before the stall runs once Redis wakes up; its debit is
        # released by the retry queue, so only the served request is billed.
        await until(lambda: len(gateway.settlements) == 0)
        assert (await chat(client, secret)).status_code == 200
    key = await fault_store.get_key(key_id)
    assert key.spent == 2 * CHAT_COST
    assert key.total_spent == 2 * CHAT_COST
    assert upstream.requests == 2


async def test_fail_open_forwards_counts_and_logs_once_per_outage(
        server: RedisServer, fault_store: Store, registry: CollectorRegistry,
        caplog: pytest.LogCaptureFixture) -> None:
    secret, _, _ = await new_key(fault_store, Settings())
    upstream = MockUpstream()
    caplog.set_level(logging.ERROR, logger="gateway")
    async with client_for(make_gateway(upstream, fault_store, registry, "open")) as client:
        for outage in (1, 2):
            server.stop()
            for _ in range(4):
                assert (await chat(client, secret)).status_code == 200
            assert (await client.get("/v1/usage", headers=bearer(secret))).status_code == 502
            server.start()
            response = await chat(client, secret)
            assert response.status_code == 200
            assert response.headers["x-ratelimit-limit-requests"] == "60"  # enforced again
            outage_logs = [r for r in caplog.records if "store unavailable" in r.getMessage()]
            assert len(outage_logs) == outage
            # It says which Redis and why, so the operator need not guess.
            assert f"Redis at unix:{server.socket}" in outage_logs[-1].getMessage()
    assert sample(registry, "gateway_fail_open_requests_total") == 8
    assert upstream.requests == 10


async def test_a_settlement_lost_to_a_blip_is_retried(
        server: RedisServer, fault_store: Store, registry: CollectorRegistry) -> None:
    secret, key_id, _ = await new_key(fault_store, Settings())
    upstream = MockUpstream(chunk_delay=0.05)
    gateway = make_gateway(upstream, fault_store, registry)
    stream = {**CHAT, "stream": True}
    async with client_for(gateway) as client:
        request = asyncio.ensure_future(client.post(
            "/v1/chat/completions", json=stream, headers=bearer(secret)))
        await until(lambda: upstream.requests == 1)
        server.stop()  # admitted, now streaming: its settlement will fail
        response = await request
        assert response.status_code == 200
        assert '"usage"' not in response.text  # the injected usage chunk is stripped
        assert len(gateway.settlements) == 1
        server.start()
        await until(lambda: len(gateway.settlements) == 0)
    key = await fault_store.get_key(key_id)
    assert key.spent == CHAT_COST  # the actual usage, not the estimate
    assert sample(registry, "gateway_settlements_total", outcome="retried") == 1
    assert sample(registry, "gateway_settlements_total", outcome="failed") == 0


async def test_overflow_and_shutdown_fall_back_to_the_estimate(
        server: RedisServer, fault_store: Store, registry: CollectorRegistry,
        caplog: pytest.LogCaptureFixture) -> None:
    secret, key_id, account_id = await new_key(fault_store, Settings())
    ref = KeyRef(account_id, key_id)
    for i in range(3):
        decision = await fault_store.admit(ref, hash_secret(secret), f"r{i}", Ask.flat(50, 100),
                                           PLAN_LIMITS)
        assert decision.code == 0
    metrics = Metrics.create(registry)
    queue = SettlementQueue(fault_store, metrics, capacity=2, first_delay=0.01)
    server.stop()
    for i in range(3):
        await queue.settle(Settlement(ref, f"r{i}", 10, 8, CHAT_COST, "standard"))
    assert len(queue) == 2
    assert sample(registry, "gateway_settlements_total", outcome="failed") == 1
    await queue.drain(0.2)
    assert sample(registry, "gateway_settlements_total", outcome="failed") == 3
    assert any("fall back" in r.getMessage() for r in caplog.records)
    server.start()
    assert (await fault_store.get_key(key_id)).spent == 300  # never under-billed


async def test_shutdown_drain_writes_queued_settlements(
        server: RedisServer, fault_store: Store, registry: CollectorRegistry) -> None:
    secret, key_id, account_id = await new_key(fault_store, Settings())
    ref = KeyRef(account_id, key_id)
    assert (await fault_store.admit(ref, hash_secret(secret), "r", Ask.flat(50, 100),
                                    PLAN_LIMITS)).code == 0
    queue = SettlementQueue(fault_store, Metrics.create(registry), first_delay=0.01)
    server.stop()
    await queue.settle(Settlement(ref, "r", 10, 8, CHAT_COST, "standard"))
    assert len(queue) == 1
    restart = asyncio.get_running_loop().run_in_executor(None, server.start)
    await queue.drain(5.0)
    await restart
    assert len(queue) == 0
    assert (await fault_store.get_key(key_id)).spent == CHAT_COST
    assert sample(registry, "gateway_settlements_total", outcome="retried") == 1
    assert sample(registry, "gateway_settlements_total", outcome="failed") == 0


async def test_a_settlement_whose_wait_is_cancelled_is_replayed(
        server: RedisServer, fault_store: Store, registry: CollectorRegistry) -> None:
    """A request cancelled (a shutdown deadline) while it waits for its settlement's answer
    hands the settlement to the retry queue: Redis may never have run it."""
    secret, key_id, account_id = await new_key(fault_store, Settings())
    ref = KeyRef(account_id, key_id)
    assert (await fault_store.admit(ref, hash_secret(secret), "r", Ask.flat(50, 100),
                                    PLAN_LIMITS)).code == 0
    queue = SettlementQueue(fault_store, Metrics.create(registry), first_delay=0.01)
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)  # no answer can come
    try:
        answer = queue.begin(Settlement(ref, "r", 10, 8, CHAT_COST, "standard"))
        assert answer is not None
        waiting = asyncio.ensure_future(answer)
        await asyncio.sleep(0)  # one turn: the wait has started
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert len(queue) == 1
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    await queue.drain(5.0)
    assert len(queue) == 0
    assert (await fault_store.get_key(key_id)).spent == CHAT_COST


async def test_shutdown_drain_waits_for_settlements_in_flight(
        fault_store: Store, registry: CollectorRegistry) -> None:
    secret, key_id, account_id = await new_key(fault_store, Settings())
    ref = KeyRef(account_id, key_id)
    assert (await fault_store.admit(ref, hash_secret(secret), "r", Ask.flat(50, 100),
                                    PLAN_LIMITS)).code == 0
    queue = SettlementQueue(fault_store, Metrics.create(registry), first_delay=0.01)
    settling = asyncio.ensure_future(
        queue.settle_shielded(Settlement(ref, "r", 10, 8, CHAT_COST, "standard")))
    await asyncio.sleep(0)  # one turn: the settlement is written, its answer not yet read
    assert sample(registry, "gateway_settlements_total", outcome="settled") == 0
    await queue.drain(5.0)
    # drain() returned: the answer has arrived, so closing the store now loses nothing
    assert sample(registry, "gateway_settlements_total", outcome="settled") == 1
    await settling
    assert (await fault_store.get_key(key_id)).spent == CHAT_COST


async def test_a_settlement_redis_refuses_is_given_up_and_counted_failed(
        fault_store: Store, registry: CollectorRegistry) -> None:
    secret, key_id, account_id = await new_key(fault_store, Settings())
    ref = KeyRef(account_id, key_id)
    assert (await fault_store.admit(ref, hash_secret(secret), "r", Ask.flat(50, 100),
                                    PLAN_LIMITS)).code == 0
    # The key record replaced by a string: settle.lua's HGET fails with WRONGTYPE, which no
    # retry can fix.
    await redis_of(fault_store).set(Names.key(account_id, key_id), "corrupt")
    queue = SettlementQueue(fault_store, Metrics.create(registry), first_delay=0.01)
    await queue.settle(Settlement(ref, "r", 10, 8, CHAT_COST, "standard"))
    assert len(queue) == 0  # not retried: it would block the settlements behind it
    assert sample(registry, "gateway_settlements_total", outcome="failed") == 1
    assert sample(registry, "gateway_store_errors_total", op="settle") == 1
    assert sample(registry, "gateway_settlements_total", outcome="settled") == 0
