"""The gateway on a Sentinel-managed primary (redis+sentinel://): it finds the primary, follows
a hand-over, and after a crash answers 503 until the replica is promoted, then 200 without a
restart, billing exactly the requests it answered 200."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.errors import ConfigError, StoreUnavailable
from gateway.obs.metrics import Metrics
from gateway.store import Store, connect
from tests.burst import CHAT, CHAT_COST
from tests.conftest import bearer, client_for, gateway, new_key
from tests.sentinel import SentinelSet


@pytest.fixture
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    deployment = SentinelSet(tmp_path_factory.mktemp("sentinel"))
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()


async def _until_recovered(client: httpx.AsyncClient, secret: str,
                           seconds: float = 40.0) -> list[int]:
    statuses: list[int] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and statuses[-3:] != [200, 200, 200]:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        statuses.append(response.status_code)
        if response.status_code != 200:
            assert response.json()["error"]["code"] == "limiter_unavailable"
            await asyncio.sleep(0.05)
    return statuses


async def _spent(store: Store, key_id: str) -> int:
    deadline = time.monotonic() + 10
    while True:
        try:
            return (await store.get_key(key_id)).spent
        except StoreUnavailable:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)


async def test_a_sentinel_hand_over_is_followed(sentinels: SentinelSet, settings: Settings,
                                                metrics: Metrics) -> None:
    store = connect(sentinels.url, 0.5)
    try:
        secret, key_id, _ = await new_key(store, settings, rpm=1000, tpm=1_000_000)
        app = gateway(MockUpstream(), store, settings, metrics)
        async with client_for(app) as client:
            before = await _until_recovered(client, secret)
            old = sentinels.primary_port()
            sentinels.wait_for_replica(old)
            sentinels.failover()
            deadline = time.monotonic() + 20
            during: list[int] = []
            while sentinels.primary_port() == old:
                assert time.monotonic() < deadline, "Sentinel did not hand over"
                during += await _until_recovered(client, secret, 5)
            # The old primary is demoted a moment after the promotion: a write it refuses
            # (READONLY) did not run and goes to the new primary.
            await asyncio.sleep(1.0)
            after = await _until_recovered(client, secret)
            statuses = before + during + after
            assert set(statuses) <= {200, 503} and after[-3:] == [200, 200, 200]
            await app.settlements.drain(10.0)
        assert await _spent(store, key_id) == statuses.count(200) * CHAT_COST
    finally:
        await store.close()


async def test_a_crashed_primary_is_503_until_sentinel_promotes_its_replica(
        sentinels: SentinelSet, settings: Settings, metrics: Metrics) -> None:
    store = connect(sentinels.url, 0.5)
    try:
        secret, key_id, _ = await new_key(store, settings, rpm=1000, tpm=1_000_000)
        app = gateway(MockUpstream(), store, settings, metrics)
        async with client_for(app) as client:
            before = await _until_recovered(client, secret)
            primary = sentinels.primary_port()
            sentinels.wait_for_replica(primary)
            sentinels.kill(primary)
            started = time.monotonic()
            during = await _until_recovered(client, secret)
            assert 503 in during, "the outage was never seen"
            assert set(during) <= {200, 503}, during
            assert during[-3:] == [200, 200, 200] and time.monotonic() - started < 40
            deadline = time.monotonic() + 10  # the Sentinel asked here may learn it last
            while sentinels.primary_port() == primary:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            await app.settlements.drain(10.0)
        assert await _spent(store, key_id) == (before + during).count(200) * CHAT_COST
    finally:
        await store.close()


def test_sentinel_urls_are_checked() -> None:
    for bad, named in (("redis+sentinel://127.0.0.1:26379", "service name"),
                       ("redis+sentinel://127.0.0.1/mymaster", "host:port"),
                       ("redis+cluster://127.0.0.1:7000?sentinel_password=x", "sentinel_"),
                       ("redis+sentinel://127.0.0.1:26379/m?ssl_ca_certs=/x", "rediss")):
        with pytest.raises(ConfigError, match=named):
            connect(bad)


async def test_unknown_service_names_the_service(sentinels: SentinelSet) -> None:
    store = connect(sentinels.url.replace("gw-primary", "nope"), 0.5)
    try:
        with pytest.raises(StoreUnavailable, match="'nope'"):
            await store.ping()
    finally:
        await store.close()
