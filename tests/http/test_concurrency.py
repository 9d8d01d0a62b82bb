"""In-flight limits (issue 16, item 2): max_concurrent per key (from its plan or its own)
and per account, taken at admission and freed at settlement, on a disconnect, an upstream
error or a cancellation; leased, so a dead process frees its slots within a lease. On Redis
and the cluster, over two gateway instances sharing the store (two replicas)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.middleware import GatewayMiddleware
from gateway.obs.metrics import Metrics
from gateway.store import Ask, KeyRef, Names, Store, connect
from gateway.types import Receive, Scope, Send
from tests.conftest import bearer, client_for, gateway, new_key

PLANS = {"plans": {"gpu": {"rpm": 100_000, "tpm": 100_000_000, "max_concurrent": 8},
                   "open": {"rpm": 100_000, "tpm": 100_000_000}}}


@pytest.fixture(params=["redis", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings() -> Settings:
    return dataclasses.replace(Settings.from_mapping(PLANS), api_plan_keys=True)


class CountingUpstream:
    """Streams (or answers) slowly and counts the requests it is serving at once: the
    referee of what reached the GPUs."""

    def __init__(self, hold: float = 0.05, fail: bool = False) -> None:
        self.inner = MockUpstream(max_words=4, chunk_delay=hold / 4)
        self.hold = hold
        self.fail = fail
        self.now = 0
        self.peak = 0
        self.served = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        self.served += 1
        try:
            if self.fail:
                await asyncio.sleep(self.hold)
                raise RuntimeError("the upstream fell over")
            await self.inner(scope, receive, send)
        finally:
            self.now -= 1


def chat(stream: bool = True) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": stream}


async def slots_held(store: Store, account_id: str, key_id: str) -> tuple[int, int]:
    key = await store.client.call("ZCARD", Names.key_slots(account_id, key_id))
    account = await store.client.call("ZCARD", Names.account_slots(account_id))
    return int(key), int(account)


async def burst(apps: list[GatewayMiddleware], secret: str, count: int,
                stream: bool = True) -> list[Any]:
    clients = [client_for(app) for app in apps]
    try:
        async def one(i: int) -> Any:
            client = clients[i % len(clients)]
            response = await client.post("/v1/chat/completions", json=chat(stream),
                                         headers=bearer(secret))
            return response

        return list(await asyncio.gather(*(one(i) for i in range(count))))
    finally:
        for client in clients:
            await client.aclose()


async def replicas(upstream: Any, store_kind: str, request: pytest.FixtureRequest,
                   settings: Settings, metrics: Metrics) -> list[GatewayMiddleware]:
    """Two gateways, each with its own connection to the store, as two replicas have."""
    url = request.getfixturevalue("redis_url" if store_kind == "redis" else "cluster_url")
    return [gateway(upstream, connect(url, timeout_seconds=5.0), settings, metrics)
            for _ in range(2)]


async def test_200_streams_over_two_replicas_never_exceed_8_in_flight(
        store: Store, store_kind: str, request: pytest.FixtureRequest, settings: Settings,
        metrics: Metrics) -> None:
    secret, key_id, account_id = await new_key(store, settings, plan="gpu")
    upstream = CountingUpstream(hold=0.2)
    apps = await replicas(upstream, store_kind, request, settings, metrics)
    try:
        responses = await burst(apps, secret, 200)
    finally:
        for app in apps:
            await app.aclose()
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert upstream.peak <= 8
    assert len(admitted) == upstream.served >= 8
    for response in refused:
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert response.headers["retry-after"] == "1"
    assert await slots_held(store, account_id, key_id) == (0, 0)


async def test_slots_are_freed_by_settlement_so_sequential_requests_never_wait(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, key_id, account_id = await new_key(store, settings, plan="gpu")
    app = gateway(CountingUpstream(hold=0.0), store, settings, metrics)
    async with client_for(app) as client:
        for stream in (True, False) * 10:
            response = await client.post("/v1/chat/completions", json=chat(stream),
                                         headers=bearer(secret))
            assert response.status_code == 200
    assert await slots_held(store, account_id, key_id) == (0, 0)


async def test_an_upstream_error_frees_the_slot(store: Store, settings: Settings,
                                                metrics: Metrics) -> None:
    secret, key_id, account_id = await new_key(store, settings, plan="gpu", max_concurrent=1)
    app = gateway(CountingUpstream(hold=0.01, fail=True), store, settings, metrics)
    async with client_for(app) as client:
        for _ in range(3):  # each would be refused if the one before had kept its slot
            response = await client.post("/v1/chat/completions", json=chat(False),
                                         headers=bearer(secret))
            assert response.status_code == 500
    assert await slots_held(store, account_id, key_id) == (0, 0)


async def test_a_cancelled_request_frees_its_slot(store: Store, settings: Settings,
                                                  metrics: Metrics) -> None:
    secret, key_id, account_id = await new_key(store, settings, plan="gpu", max_concurrent=2)
    upstream = CountingUpstream(hold=5.0)
    app = gateway(upstream, store, settings, metrics)
    async with client_for(app) as client:
        tasks = [asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(),
                                                   headers=bearer(secret)))
                 for _ in range(2)]
        while upstream.now < 2:
            await asyncio.sleep(0.01)
        assert await slots_held(store, account_id, key_id) == (2, 0)
        # The reservation names its slots, never the client's model name (no model bucket).
        for member in await store.client.call("ZRANGE", Names.key_slots(account_id, key_id),
                                              0, -1):
            reservation = (await store.client.call("GET", member)).decode()
            assert reservation.split(" ")[6] == "1" and not reservation.endswith(" m")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await app.settlements.drain()
    assert await slots_held(store, account_id, key_id) == (0, 0)


async def test_a_keys_own_limit_wins_and_plan_gives_the_plans_back(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    from gateway.http.key_changes import ChangeSpec, update_key

    secret, key_id, _ = await new_key(store, settings, plan="open", max_concurrent=2)
    app = gateway(CountingUpstream(hold=0.2), store, settings, metrics)
    upstream: CountingUpstream = app.app  # type: ignore[assignment]
    await burst([app], secret, 10)
    assert upstream.peak == 2
    await update_key(store, settings, key_id, ChangeSpec(max_concurrent="plan"))
    upstream.peak = 0
    await burst([app], secret, 10)  # the open plan has no limit
    assert upstream.peak == 10
    await app.leases.aclose()


async def test_the_account_limit_is_shared_by_its_keys(
        store: Store, store_kind: str, request: pytest.FixtureRequest, settings: Settings,
        metrics: Metrics) -> None:
    secret_a, key_a, account_id = await new_key(store, settings, plan="open")
    secret_b, key_b, _ = await new_key(store, settings, account=account_id, plan="open")
    await store.set_account_limits(account_id, {"max_concurrent": 3})
    upstream = CountingUpstream(hold=0.2)
    apps = await replicas(upstream, store_kind, request, settings, metrics)
    try:
        results = await asyncio.gather(burst(apps, secret_a, 20), burst(apps, secret_b, 20))
    finally:
        for app in apps:
            await app.aclose()
    assert upstream.peak <= 3
    codes = {r.json()["error"]["code"] for rs in results for r in rs if r.status_code != 200}
    assert codes == {"concurrency_limit_exceeded"}
    assert "account" in next(r.json()["error"]["message"] for rs in results for r in rs
                             if r.status_code != 200)
    assert await slots_held(store, account_id, key_a) == (0, 0)
    assert await slots_held(store, account_id, key_b) == (0, 0)


async def test_a_dead_process_slot_lapses_within_the_lease(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    """An admission whose process died (never settled, never renewed) holds its slot until
    its lease ends, then the slot is free for others."""
    settings = dataclasses.replace(settings, concurrency_lease=1.0)
    secret, key_id, account_id = await new_key(store, settings, plan="gpu", max_concurrent=1)
    from gateway.core.keys import hash_secret

    ref = KeyRef(account_id, key_id)
    ask = Ask(10, 4, 1, 100, 10, 1000, model="m")
    taken = await store.admit(ref, hash_secret(secret), "dead-1", ask,
                              settings.admission.for_model("m"))
    assert (taken.code, taken.slots) == (0, 1)
    refused = await store.admit(ref, hash_secret(secret), "next-1", ask,
                                settings.admission.for_model("m"))
    assert refused.code == 10 and refused.retry_after_us == 1_000_000
    await asyncio.sleep(1.1)
    after = await store.admit(ref, hash_secret(secret), "next-2", ask,
                              settings.admission.for_model("m"))
    assert after.code == 0


async def test_a_stream_longer_than_its_lease_keeps_its_slot(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    settings = dataclasses.replace(settings, concurrency_lease=0.6)
    secret, key_id, account_id = await new_key(store, settings, plan="gpu", max_concurrent=1)
    upstream = CountingUpstream(hold=2.0)
    app = gateway(upstream, store, settings, metrics)
    async with client_for(app) as client:
        long = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(),
                                                 headers=bearer(secret)))
        while upstream.now < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.2)  # two leases: renewed, or it would have lapsed
        response = await client.post("/v1/chat/completions", json=chat(),
                                     headers=bearer(secret))
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert (await long).status_code == 200
    await app.drain()
    await app.leases.aclose()
    assert await slots_held(store, account_id, key_id) == (0, 0)
    assert len(app.leases) == 0
