"""Alert events are made inside the scripts, once per crossing: budget thresholds and low
credits in settle.lua, deactivation in update_key.lua, expiry in alert_expiring.lua; on a
real redis-server and the 3-master cluster, over two gateways sharing one Redis."""

from __future__ import annotations

import asyncio

import pytest

from gateway.alerts.outbox import Outbox
from gateway.config.settings import Settings
from gateway.http.key_changes import ChangeSpec, renew_key, update_key
from gateway.obs.metrics import Metrics
from gateway.store import Store, connect
from gateway.store.names import Names
from gateway.store.records import NO_DETAIL, KeyRef
from tests.alerts.helpers import alert_settings, chat, of_type, outbox, upstream, with_alerts
from tests.conftest import bearer, client_for, gateway, new_key


@pytest.fixture(params=["redis", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(store_kind: str, request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("redis_url" if store_kind == "redis" else "cluster_url"))


async def two_gateways_send(url: str, store: Store, settings: Settings, metrics: Metrics,
                            secret: str, requests: int) -> list[int]:
    """`requests` requests at once, half through each of two gateways (each its own Store
    on the same Redis)."""
    other = with_alerts(connect(url, 5.0), settings)
    try:
        async with client_for(gateway(upstream, store, settings, metrics)) as one, \
                client_for(gateway(upstream, other, settings, metrics)) as two:
            replies = await asyncio.gather(*(
                (one if i % 2 else two).post("/v1/chat/completions", json=chat(),
                                             headers=bearer(secret))
                for i in range(requests)))
    finally:
        await other.close()
    return [r.status_code for r in replies]


async def test_50_concurrent_requests_crossing_80_percent_make_one_event(
        url: str, store: Store, metrics: Metrics) -> None:
    settings = alert_settings()
    with_alerts(store, settings)
    # 301 micro-USD a request: 50 of them cross 80% (12 000) of a 15 000 budget.
    secret, key_id, account_id = await new_key(store, settings, plan="big",
                                               budget_usd="0.015")
    statuses = await two_gateways_send(url, store, settings, metrics, secret, 50)
    assert statuses.count(200) >= 40
    record = await store.get_key(key_id)
    assert record.spent >= 12_000
    events = await of_type(store, account_id, "budget.threshold")
    at_80 = [e for e in events if e.fields["threshold_ppm"] == "800000"]
    assert len(at_80) == 1
    assert len([e for e in events if e.fields["threshold_ppm"] == "1000000"]) <= 1
    event = at_80[0]
    assert (event.account_id, event.fields["key_id"]) == (account_id, key_id)
    assert event.fields["limit_micro"] == "15000"
    assert int(event.fields["spent_micro"]) >= 12_000
    assert event.fields["resets_at"] == str(record.resets_at_us)
    # More spend in the same period makes no second 0.8 event.
    await two_gateways_send(url, store, settings, metrics, secret, 4)
    assert len([e for e in await of_type(store, account_id, "budget.threshold")
                if e.fields["threshold_ppm"] == "800000"]) == 1


async def test_a_new_budget_period_fires_again(store: Store, metrics: Metrics) -> None:
    settings = alert_settings()
    with_alerts(store, settings)
    secret, key_id, account_id = await new_key(store, settings, plan="big",
                                               budget_usd="0.001", budget_duration="3s")
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        async def spend(times: int) -> None:
            for _ in range(times):
                reply = await client.post("/v1/chat/completions", json=chat(),
                                          headers=bearer(secret))
                assert reply.status_code == 200

        await spend(3)  # 903 of 1000: past 80%, not 100%
        first = await of_type(store, account_id, "budget.threshold")
        assert [e.fields["threshold_ppm"] for e in first] == ["800000"]
        resets_at = (await store.get_key(key_id)).resets_at_us
        while await store.now_us() < resets_at:
            await asyncio.sleep(0.1)
        await spend(3)  # the next period: spent starts from 0 and crosses 80% again
    events = await of_type(store, account_id, "budget.threshold")
    assert [e.fields["threshold_ppm"] for e in events] == ["800000", "800000"]
    assert int(events[1].fields["resets_at"]) > int(events[0].fields["resets_at"])


async def test_one_settlement_past_both_thresholds_makes_both(store: Store,
                                                              metrics: Metrics) -> None:
    settings = alert_settings(budget_thresholds=[0.5, 0.8])
    with_alerts(store, settings)
    # One request of 301 micro-USD spends 84% of 360: past both thresholds at once.
    secret, _, account_id = await new_key(store, settings, plan="big", budget_usd="0.00036")
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        reply = await client.post("/v1/chat/completions", json=chat(), headers=bearer(secret))
        assert reply.status_code == 200
        events = await of_type(store, account_id, "budget.threshold")
        assert [e.fields["threshold_ppm"] for e in events] == ["500000", "800000"]
        await client.post("/v1/chat/completions", json=chat(10), headers=bearer(secret))
    assert len(await of_type(store, account_id, "budget.threshold")) == 2


async def test_credits_low_fires_once_and_again_after_credits_are_added(
        url: str, store: Store, metrics: Metrics) -> None:
    settings = alert_settings(credits_low_usd="0.005")
    with_alerts(store, settings)
    secret, key_id, account_id = await new_key(store, settings, credit=True)
    await store.add_credits(account_id, 10_000)
    await two_gateways_send(url, store, settings, metrics, secret, 30)  # 9 030 spent
    [event] = await of_type(store, account_id, "credits.low")
    assert event.fields["threshold_micro"] == "5000"
    assert int(event.fields["balance_micro"]) < 5000
    assert event.fields["key_id"] == key_id
    await store.add_credits(account_id, 2000)  # still below: not armed again
    await two_gateways_send(url, store, settings, metrics, secret, 2)
    assert len(await of_type(store, account_id, "credits.low")) == 1
    await store.add_credits(account_id, 10_000)  # back above 5 000: armed again
    await two_gateways_send(url, store, settings, metrics, secret, 30)
    assert len(await of_type(store, account_id, "credits.low")) == 2


async def test_key_deactivated_once_per_deactivation(store: Store) -> None:
    settings = alert_settings()
    with_alerts(store, settings)
    _, key_id, account_id = await new_key(store, settings, plan="big")
    await asyncio.gather(*(update_key(store, settings, key_id, ChangeSpec(active=False))
                           for _ in range(10)))
    await update_key(store, settings, key_id, ChangeSpec(name="renamed"))
    [event] = await of_type(store, account_id, "key.deactivated")
    assert (event.account_id, event.fields["key_id"]) == (account_id, key_id)
    await update_key(store, settings, key_id, ChangeSpec(active=True))
    await update_key(store, settings, key_id, ChangeSpec(active=False))
    assert len(await of_type(store, account_id, "key.deactivated")) == 2


async def test_key_expiring_once_per_expiry(url: str, store: Store) -> None:
    settings = alert_settings(expiring_within="3d")
    with_alerts(store, settings)
    _, soon, account_id = await new_key(store, settings, plan="big", expires_in="2d")
    await new_key(store, settings, account_id, plan="big", expires_in="10d")
    _, off, _ = await new_key(store, settings, account_id, plan="big", expires_in="1d")
    await update_key(store, settings, off, ChangeSpec(active=False))
    other = connect(url, 5.0)
    try:
        boxes = [Outbox(store, "a"), Outbox(other, "b")]
        written = await asyncio.gather(*(box.scan_expiring(account_id, settings.alerts)
                                         for box in boxes for _ in range(3)))
    finally:
        await other.close()
    assert sum(written) == 1
    [event] = await of_type(store, account_id, "key.expiring")
    record = await store.get_key(soon)
    assert event.fields["key_id"] == soon
    assert event.fields["expires_at"] == str(record.expires_at_us)
    await renew_key(store, soon, "1h")  # a new expiry, still within 3 days: once more
    assert await Outbox(store, "a").scan_expiring(account_id, settings.alerts) == 1
    assert await Outbox(store, "a").scan_expiring(account_id, settings.alerts) == 0
    assert len(await of_type(store, account_id, "key.expiring")) == 2


async def test_without_webhooks_no_event_and_settle_arguments_unchanged(
        store: Store, metrics: Metrics) -> None:
    settings = alert_settings(webhooks=[], credits_low_usd="100")
    with_alerts(store, settings)
    secret, key_id, account_id = await new_key(store, settings, plan="big",
                                               budget_usd="0.0003")
    ref = KeyRef(account_id, key_id)
    assert store._settle_args(ref, "r", 1, 2, 3, True, NO_DETAIL) == [1, 2, 3, 1]
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        await client.post("/v1/chat/completions", json=chat(), headers=bearer(secret))
    await update_key(store, settings, key_id, ChangeSpec(active=False))
    assert await store._cmd("EXISTS", Names.alerts(account_id)) == 0
    # With webhooks, the ledger's "off" values pad ARGV[5..12] and the alerts follow.
    with_alerts(store, alert_settings())
    args = store._settle_args(ref, "r", 1, 2, 3, True, NO_DETAIL)
    assert args[4:12] == [0, "", "", "", "", "", "", ""]
    assert args[12:] == [10_000, account_id, key_id, -1, 800_000, 1_000_000]


async def test_the_outbox_is_capped_and_drops_are_counted(store: Store) -> None:
    settings = alert_settings(max_outbox_events=3)
    with_alerts(store, settings)
    _, key_id, account_id = await new_key(store, settings, plan="big")
    for _ in range(5):
        await update_key(store, settings, key_id, ChangeSpec(active=False))
        await update_key(store, settings, key_id, ChangeSpec(active=True))
    assert len(await outbox(store, account_id)) == 3
    dropped = await store._cmd("HGET", Names.account(account_id), "alerts_dropped")
    assert int(dropped) == 2
    state = await Outbox(store, "x").state(account_id)
    assert (state.length, state.dropped) == (3, 2)
