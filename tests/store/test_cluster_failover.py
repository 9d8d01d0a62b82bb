"""A Redis Cluster with replicas losing a master: by hand-over, and by a crash.

Each test starts its own 3-master, 3-replica cluster (the failover changes its shape). The
gateway must answer 503 while the account's slot has no master, never 500, come back by
itself once a replica is promoted, and bill exactly the requests it answered 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest

from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.errors import StoreUnavailable
from gateway.http.middleware import GatewayMiddleware
from gateway.obs.metrics import Metrics
from gateway.store import Names, Store, connect
from tests.burst import CHAT, CHAT_COST
from tests.cluster import RedisCluster
from tests.conftest import bearer, client_for, gateway, new_key

HAND_OVER_TIMEOUT = 2.0  # seconds: the cluster's node timeout is 1 s


@pytest.fixture
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path_factory.mktemp("failover"), replicas=1,
                           node_timeout_ms=1000)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


async def _until_recovered(client: httpx.AsyncClient, secret: str,
                           seconds: float = 30.0) -> list[int]:
    """Chat requests until three in a row succeed; every status on the way."""
    statuses: list[int] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and statuses[-3:] != [200, 200, 200]:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        statuses.append(response.status_code)
        if response.status_code != 200:
            assert response.json()["error"]["code"] == "limiter_unavailable"
            await asyncio.sleep(0.05)
    return statuses


def _promoted(cluster: RedisCluster, key: str, replica: int) -> bool:
    try:
        return cluster.master_of(key) == replica
    except RuntimeError:  # CLUSTER SLOTS read mid-hand-over may name no master for a moment
        return False


@dataclass
class Served:
    app: GatewayMiddleware
    client: httpx.AsyncClient
    store: Store
    secret: str
    key_id: str
    record: str  # the key's record: its slot names the master that matters

    async def billed(self) -> int:
        await self.app.settlements.drain(10.0)  # settlements queued in the outage land now
        deadline = time.monotonic() + 10
        while True:  # every node reports the cluster up a moment apart
            try:
                return int((await self.store.get_key(self.key_id)).spent)
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the cluster never came back"
                await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def serving_a_key(cluster: RedisCluster, settings: Settings, metrics: Metrics,
                        timeout_seconds: float = 0.5) -> AsyncIterator[Served]:
    store = connect(cluster.url, timeout_seconds)
    try:
        secret, key_id, account_id = await new_key(store, settings, rpm=1000, tpm=1_000_000)
        app = gateway(MockUpstream(), store, settings, metrics)
        async with client_for(app) as client:
            yield Served(app, client, store, secret, key_id, Names.key(account_id, key_id))
    finally:
        await store.close()


async def test_a_handed_over_master_is_invisible(
        replicated: RedisCluster, settings: Settings, metrics: Metrics) -> None:
    """CLUSTER FAILOVER while requests keep coming: the old master answers MOVED (the
    command did not run) and the new one has no scripts (NOSCRIPT, loaded there); every
    request is answered 200 and billed once."""
    # The old master holds the writes sent during the hand-over until its replica has taken
    # over (then answers MOVED): a wait of a few hundred milliseconds, longer on a loaded
    # machine. A timeout shorter than that wait is a stall, answered 503 (README "What a
    # failure looks like"); this test gives it room, as an operator of a cluster would.
    async with serving_a_key(replicated, settings, metrics, HAND_OVER_TIMEOUT) as served:
        before = await _until_recovered(served.client, served.secret)
        assert before == [200, 200, 200]
        statuses: list[int] = []
        handed_over = asyncio.Event()

        async def traffic() -> None:
            while not handed_over.is_set():
                response = await served.client.post("/v1/chat/completions", json=CHAT,
                                                    headers=bearer(served.secret))
                statuses.append(response.status_code)
                await asyncio.sleep(0.02)  # within the key's 1000 rpm

        workers = [asyncio.ensure_future(traffic()) for _ in range(4)]
        await asyncio.sleep(0.3)
        master = replicated.master_of(served.record)
        replica = replicated.replica_of(master)
        replicated.cli(replica, "CLUSTER", "FAILOVER")
        deadline = time.monotonic() + 15
        while not _promoted(replicated, served.record, replica):
            assert time.monotonic() < deadline, "the replica was not promoted"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # and on, after the hand-over
        handed_over.set()
        await asyncio.gather(*workers)
        assert len(statuses) > 20 and set(statuses) == {200}, statuses
        assert await served.billed() == (len(before) + len(statuses)) * CHAT_COST


async def test_a_crashed_master_is_503_until_its_replica_takes_over(
        replicated: RedisCluster, settings: Settings, metrics: Metrics) -> None:
    async with serving_a_key(replicated, settings, metrics) as served:
        before = await _until_recovered(served.client, served.secret)
        master = replicated.master_of(served.record)
        # Replication is asynchronous: let the replica have every acknowledged write,
        # so what is measured is the gateway, not Redis's own window of loss (without
        # this, under load, the promoted replica can lack the key: a 401 then).
        replicated.wait_for_replicas(master)
        replicated.kill(master)
        started = time.monotonic()
        during = await _until_recovered(served.client, served.secret)
        recovered_in = time.monotonic() - started
        assert 503 in during, "the outage was never seen"
        assert set(during) <= {200, 503}, during
        assert during[-3:] == [200, 200, 200] and recovered_in < 30
        assert await served.billed() == (before + during).count(200) * CHAT_COST
