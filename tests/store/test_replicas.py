"""Limits are global across `gateway serve` replicas and `--workers N`, sharing one Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from gateway.config.settings import Settings
from gateway.store import Store
from tests.burst import CHAT, CHAT_COST, burst, refill_bound
from tests.conftest import RedisServer, bearer, new_key
from tests.processes import Process, gateway_serve, mock_upstream

# A 150-request burst on a cold connection pool on a busy 2-core runner can take longer than
# the 0.25 s default to connect; these tests are about exactness, not timeouts (test_faults).
ENV = {"GATEWAY_REDIS_TIMEOUT": "2"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[Process]:
    process = mock_upstream(chunk_delay=0.05)
    yield process
    process.terminate()


@pytest.fixture(scope="module")
def two_replicas(upstream: Process, redis_server: RedisServer) -> Iterator[list[Process]]:
    replicas = gateway_serve(upstream.url, redis_server.url, replicas=2, env=ENV)
    yield replicas
    for replica in replicas:
        replica.terminate()


@pytest.fixture(scope="module")
def two_workers(upstream: Process, redis_server: RedisServer) -> Iterator[Process]:
    [process] = gateway_serve(upstream.url, redis_server.url, "--workers", "2", env=ENV)
    yield process
    process.terminate()


async def _exact_burst(urls: list[str], store: Store) -> None:
    secret, key_id, _ = await new_key(store, Settings(), tpm=1_000_000)
    clients = [httpx.AsyncClient(base_url=url, timeout=30) for url in urls]
    try:
        statuses, seconds = await burst(clients, secret, 150)
        usage = (await clients[-1].get("/v1/usage", headers=bearer(secret))).json()
    finally:
        for client in clients:
            await client.aclose()
    admitted = statuses[200]
    assert statuses[200] + statuses[429] == 150, statuses
    assert 60 <= admitted <= 60 + refill_bound(60, seconds)
    key = await store.get_key(key_id)
    assert key.spent == key.total_spent == admitted * CHAT_COST
    assert round(usage["budget"]["spent"] * 1e6) == admitted * CHAT_COST


@pytest.mark.parametrize("store_kind", ["redis"])
async def test_two_replicas_share_the_limits(two_replicas: list[Process], store: Store) -> None:
    await _exact_burst([r.url for r in two_replicas], store)


@pytest.mark.parametrize("store_kind", ["redis"])
async def test_two_workers_share_the_limits(two_workers: Process, store: Store) -> None:
    await _exact_burst([two_workers.url], store)


@pytest.mark.parametrize("store_kind", ["redis"])
async def test_sigterm_finishes_in_flight_streams_and_settles_them(
        upstream: Process, redis_server: RedisServer, store: Store) -> None:
    secret, key_id, _ = await new_key(store, Settings())
    [process] = gateway_serve(upstream.url, redis_server.url)
    async with httpx.AsyncClient(base_url=process.url, timeout=30) as client:
        # 8 chunks, 50 ms apart upstream: the stream is still running when SIGTERM lands.
        streaming = asyncio.ensure_future(client.post(
            "/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer(secret)))
        await asyncio.sleep(0.15)
        loop = asyncio.get_running_loop()
        exit_code = loop.run_in_executor(None, process.terminate)
        response = await streaming
        # uvicorn re-raises the SIGTERM it caught once its graceful shutdown is done.
        assert await exit_code in (0, -15)
    assert response.status_code == 200
    assert response.text.rstrip().endswith("data: [DONE]")
    assert (await store.get_key(key_id)).spent == CHAT_COST


@pytest.mark.parametrize("store_kind", ["redis"])
async def test_a_key_change_acts_at_once_on_every_replica(
        two_replicas: list[Process], redis_server: RedisServer, store: Store,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`gateway keys update/delete` on one machine; both replicas enforce it on the next
    request (nothing cached but the secret's key id, and admission re-reads the record)."""
    from gateway.serve.cli import main

    secret, key_id, _ = await new_key(store, Settings(), rpm=1)
    clients = [httpx.AsyncClient(base_url=r.url, timeout=30) for r in two_replicas]
    try:
        async def statuses() -> list[int]:
            return [(await c.post("/v1/chat/completions", json=CHAT,
                                  headers=bearer(secret))).status_code for c in clients]

        async def cli(*argv: str) -> int:  # its own event loop, as from a shell
            return await asyncio.get_running_loop().run_in_executor(
                None, main, [*argv, "--redis", redis_server.url])

        assert await statuses() == [200, 429]  # rpm 1 across both
        assert await cli("keys", "update", key_id, "--rpm", "3") == 0
        assert await statuses() == [200, 200]  # 3 a minute, at once, on both
        assert await cli("keys", "deactivate", key_id) == 0
        assert await statuses() == [403, 403]
        assert await cli("keys", "delete", key_id) == 0
        assert await statuses() == [401, 401]
    finally:
        for client in clients:
            await client.aclose()
    capsys.readouterr()
