"""The gateway on a real 3-master Redis Cluster: limits, billing, usage and NOSCRIPT.

The limit, billing, usage and streaming tests are imported so their bodies run here once more
with the `store` fixture on the cluster (this module's `store_kind`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.obs.metrics import Metrics
from gateway.serve import cli
from gateway.store import Store, connect
from tests.burst import CHAT, CHAT_COST, burst, refill_bound
from tests.conftest import bearer, client_for, gateway, new_key, prompt_bound_of
from tests.http.test_middleware import (  # noqa: F401
    test_bad_bodies_are_rejected_before_the_upstream,
    test_chat_is_admitted_billed_and_reported,
    test_missing_and_unknown_keys_are_401,
)
from tests.http.test_rejections import (  # noqa: F401
    test_deactivated_key_is_403_at_once_even_when_cached,
    test_request_larger_than_the_tpm_bucket_is_admitted_once_then_waits,
    test_rpm_retry_after_is_the_true_wait,
    test_usage_is_404_when_the_record_is_gone,
)
from tests.http.test_streaming import (  # noqa: F401
    test_stream_is_billed_when_the_client_did_not_ask_for_usage,
    test_stream_keeps_the_usage_chunk_the_client_asked_for,
)
from tests.store.test_admission import (  # noqa: F401  (collected here, on the cluster)
    test_budget_is_never_overshot_by_a_burst,
    test_credits_are_shared_by_the_keys_of_one_account,
    test_rpm_admits_exactly_the_limit_across_two_instances,
    test_spend_equals_reported_usage_times_price,
    test_tpm_is_never_exceeded_by_a_concurrent_burst,
)


@pytest.fixture(params=["cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_accounts_spread_over_the_nodes(store: Store, settings: Settings,
                                              metrics: Metrics, redis_cluster: Any) -> None:
    upstream = MockUpstream()
    secrets = [(await new_key(store, settings, account=(await store.create_account(f"a{i}")).id))
               for i in range(12)]
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        for secret, _, _ in secrets:
            response = await client.post("/v1/chat/completions", json=CHAT,
                                         headers=bearer(secret))
            assert response.status_code == 200
        for secret, key_id, account_id in secrets:
            usage = (await client.get("/v1/usage", headers=bearer(secret))).json()
            assert round(usage["budget"]["spent"] * 1e6) == CHAT_COST
            assert (await store.get_key(key_id)).total_spent == CHAT_COST
            assert (await store.get_account(account_id)).name.startswith("a")
    # 12 accounts on 3 masters: every master holds some of them.
    assert all(count > 0 for count in redis_cluster.keys_per_node())
    assert upstream.requests == 12


async def test_concurrent_admission_is_exact(store: Store, settings: Settings,
                                             metrics: Metrics) -> None:
    secret, key_id, _ = await new_key(store, settings, tpm=1_000_000)
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        statuses, seconds = await burst([client], secret, 150)
    admitted = statuses[200]
    assert statuses[200] + statuses[429] == 150
    assert 60 <= admitted <= 60 + refill_bound(60, seconds)
    assert (await store.get_key(key_id)).spent == admitted * CHAT_COST


async def test_budget_and_credits_hold_under_concurrency(store: Store, settings: Settings,
                                                         metrics: Metrics) -> None:
    account = await store.create_account("payer")
    await store.add_credits(account.id, 300)  # micro-USD: room for a few requests
    credit_secret, credit_id, _ = await new_key(store, settings, account=account.id,
                                                credit=True, rpm=1000, tpm=1_000_000)
    budget_secret, budget_id, _ = await new_key(store, settings, account=account.id,
                                                rpm=1000, tpm=1_000_000, budget_usd="0.0002")
    prompt_cost = settings.default_price.prompt_micro(prompt_bound_of(CHAT))
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        credit_statuses, _ = await burst([client], credit_secret, 40)
        budget_statuses, _ = await burst([client], budget_secret, 40)
        for secret in (credit_secret, budget_secret):  # then use up what is left
            while (await client.post("/v1/chat/completions", json=CHAT,
                                     headers=bearer(secret))).status_code == 200:
                pass
    assert credit_statuses[200] >= 1 and budget_statuses[200] >= 1
    assert set(credit_statuses) | set(budget_statuses) <= {200, 429}
    credit_key = await store.get_key(credit_id)
    balance = (await store.get_account(account.id)).credits
    assert credit_key.total_spent == 300 - balance
    assert 0 <= balance < prompt_cost + 2  # never below zero; the rest pays no request
    budget_key = await store.get_key(budget_id)
    assert budget_key.spent == budget_key.total_spent
    assert 200 - prompt_cost - 2 < budget_key.spent <= 200


async def test_scripts_reload_after_script_flush_on_every_node(
        store: Store, settings: Settings, metrics: Metrics, redis_cluster: Any) -> None:
    secret, key_id, _ = await new_key(store, settings)
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT,
                                  headers=bearer(secret))).status_code == 200
        for port in redis_cluster.ports:
            redis_cluster.cli(port, "SCRIPT", "FLUSH")
        response = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        assert response.status_code == 200
        usage = await client.get("/v1/usage", headers=bearer(secret))
        assert usage.status_code == 200
    assert round(usage.json()["budget"]["spent"] * 1e6) == 2 * CHAT_COST
    assert (await store.get_key(key_id)).spent == 2 * CHAT_COST


def test_cli_manages_keys_on_the_cluster(cluster_url: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keys", "create", "--redis", cluster_url, "--name", "c", "--plan",
                     "pro", "--json"]) == 0
    created = orjson.loads(capsys.readouterr().out)
    assert cli.main(["keys", "show", created["id"], "--redis", cluster_url, "--json"]) == 0
    shown = orjson.loads(capsys.readouterr().out)
    assert shown["rate_limits"] == {"rpm": 200, "tpm": 13333}
    assert shown["account_id"] == created["account_id"]


def test_cluster_urls_are_parsed(cluster_url: str) -> None:
    hosts = cluster_url.removeprefix("redis+cluster://")

    async def round_trip(url: str) -> bool:
        store = connect(url, 2.0)
        try:
            return await store.ping()
        finally:
            await store.close()

    assert asyncio.run(round_trip(f"redis+cluster://{hosts}/0"))
    assert asyncio.run(round_trip(f"redis+cluster://{hosts.split(',')[1]}"))
    from gateway.errors import ConfigError

    for bad in (f"redis+cluster://{hosts}/3", "redis+cluster://nohostport",
                "redis+cluster://h:1,h", f"redis+cluster://{hosts}?socket_timeout=2"):
        with pytest.raises(ConfigError):
            connect(bad)
