"""A key after creation, seen by clients: plan-following limits, update, renew, rotate and
delete acting at once, on a real redis-server and on the embedded store."""

from __future__ import annotations

from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry

from gateway.config.settings import Plan, Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.errors import ConfigError, NotFound
from gateway.http.key_changes import ChangeSpec, renew_key, rotate_key, update_key
from gateway.obs.metrics import Metrics
from gateway.store import Names, Store
from tests.conftest import bearer, client_for, gateway, new_key
from tests.redis_inspect import redis_of

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
DAY_US = 86_400 * 1_000_000


def with_plan(settings: Settings, rpm: int) -> Settings:
    """`settings` as the config file would load them with plan 'standard' at `rpm`."""
    plans = dict(settings.plans)
    plans["standard"] = replace(plans["standard"], rpm=rpm)
    return replace(settings, plans=plans)


async def statuses(store: Store, settings: Settings, secret: str, count: int) -> list[int]:
    async with client_for(gateway(MockUpstream(), store, settings,
                                  Metrics.create(CollectorRegistry()))) as client:
        return [(await client.post("/v1/chat/completions", json=CHAT,
                                   headers=bearer(secret))).status_code for _ in range(count)]


async def test_a_plan_edited_in_the_config_reaches_every_key_on_it(
        store: Store, settings: Settings) -> None:
    secret, key_id, _ = await new_key(store, with_plan(settings, 2))
    # the record holds no copy of the plan's limits
    assert (await store.get_key(key_id)).rpm is None
    assert await statuses(store, with_plan(settings, 2), secret, 3) == [200, 200, 429]
    # The config is edited (rpm 2 -> 5) and loaded again: the same key, 3 more requests.
    assert await statuses(store, with_plan(settings, 5), secret, 4) == [200, 200, 200, 429]


async def test_a_keys_own_limit_stands_apart_from_its_plans(
        store: Store, settings: Settings) -> None:
    secret, key_id, _ = await new_key(store, with_plan(settings, 50), rpm=2)
    assert await statuses(store, with_plan(settings, 50), secret, 3) == [200, 200, 429]
    # Back to the plan's: `keys update --rpm plan`.
    record = await update_key(store, settings, key_id, ChangeSpec(rpm="plan"))
    assert record.rpm is None
    assert await statuses(store, with_plan(settings, 50), secret, 2) == [200, 200]


async def test_a_key_whose_plan_left_the_config_is_refused_with_a_reason(
        store: Store, settings: Settings) -> None:
    secret, _, _ = await new_key(store, settings, plan="pro")
    only_standard = replace(settings, plans={"standard": settings.plans["standard"]})
    async with client_for(gateway(MockUpstream(), store, only_standard,
                                  Metrics.create(CollectorRegistry()))) as client:
        refused = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "plan_unavailable"


async def test_update_changes_limits_budget_and_plan_at_once(
        store: Store, settings: Settings) -> None:
    secret, key_id, _ = await new_key(store, settings)
    record = await update_key(store, settings, key_id, ChangeSpec(
        rpm="1", budget="2.5", budget_duration="1d", plan="pro", name="renamed"))
    assert (record.rpm, record.tpm, record.plan, record.name) == (1, None, "pro", "renamed")
    assert record.budget_limit == 2_500_000 and record.budget_duration == 86_400
    now = await store.now_us()
    assert now < record.resets_at_us <= now + DAY_US  # the new period starts now
    assert await statuses(store, settings, secret, 2) == [200, 429]  # rpm 1, at once
    record = await update_key(store, settings, key_id, ChangeSpec(budget="none"))
    assert record.budget_limit is None


@pytest.mark.parametrize("spec, message", [
    (ChangeSpec(), "nothing to change"),
    (ChangeSpec(plan="gold"), "unknown plan 'gold'"),
    (ChangeSpec(rpm="0"), "rpm must be"),
    (ChangeSpec(rpm="many"), "rpm must be a whole number or 'plan'"),
    (ChangeSpec(budget="-1"), "invalid amount"),
    (ChangeSpec(budget_duration="3w"), "invalid duration"),
    (ChangeSpec(expires_at="2020-01-01T00:00:00Z"), "in the past"),
    (ChangeSpec(expires_at="yesterday"), "ISO 8601"),
    (ChangeSpec(name="  "), "name must not be empty"),
    (ChangeSpec(name="tab\there"), "name must be printable"),
])
async def test_bad_updates_are_refused_naming_what_is_wrong(
        store: Store, settings: Settings, spec: ChangeSpec, message: str) -> None:
    _, key_id, _ = await new_key(store, settings)
    before = await store.get_key(key_id)
    with pytest.raises(ConfigError, match=message):
        await update_key(store, settings, key_id, spec)
    assert await store.get_key(key_id) == before


async def test_credit_keys_have_no_plan_and_no_expiry(store: Store, settings: Settings) -> None:
    _, key_id, _ = await new_key(store, settings, credit=True)
    for spec in (ChangeSpec(plan="pro"), ChangeSpec(expires_in="1d")):
        with pytest.raises(ConfigError):
            await update_key(store, settings, key_id, spec)
    with pytest.raises(ConfigError, match="credit key needs no renewal"):
        await renew_key(store, key_id, "30d")


async def test_renew_extends_from_the_later_of_expiry_and_now(
        store: Store, settings: Settings) -> None:
    secret, key_id, account_id = await new_key(store, settings, expires_in="2d")
    expires = (await store.get_key(key_id)).expires_at_us
    assert expires is not None
    renewed = await renew_key(store, key_id, "10d")
    assert renewed.expires_at_us == expires + 10 * DAY_US  # from the current expiry
    # A lapsed subscription renews from now: it must not come back already spent.
    await redis_of(store).hset(Names.key(account_id, key_id), "expires_at",
                               await store.now_us() - 5 * DAY_US)
    assert await statuses(store, settings, secret, 1) == [403]
    before = await store.now_us()
    renewed = await renew_key(store, key_id, None)  # default 30d
    assert renewed.expires_at_us is not None
    assert before + 30 * DAY_US <= renewed.expires_at_us <= before + 30 * DAY_US + 5_000_000
    assert await statuses(store, settings, secret, 1) == [200]


async def test_rotate_and_delete_stop_the_old_secret_at_once(
        store: Store, settings: Settings) -> None:
    secret, key_id, account_id = await new_key(store, settings)
    assert await statuses(store, settings, secret, 1) == [200]
    _, new_secret = await rotate_key(store, key_id)
    assert await statuses(store, settings, secret, 1) == [401]
    assert await statuses(store, settings, new_secret, 1) == [200]

    deleted = await store.delete_key(key_id)
    assert deleted.deleted_at_us is not None and not deleted.active
    assert await statuses(store, settings, new_secret, 1) == [401]
    # its history stays: the record with its spend, and the account's usage listing
    assert deleted.total_spent > 0
    snapshot = await store.usage_snapshot(account_id)
    assert [k.record.id for k in snapshot.keys] == [key_id]
    # a deleted key cannot change, nor come back
    for change in (ChangeSpec(active=True), ChangeSpec(name="again")):
        with pytest.raises(ConfigError, match="deleted"):
            await update_key(store, settings, key_id, change)
    with pytest.raises(ConfigError, match="deleted"):
        await rotate_key(store, key_id)
    assert (await store.delete_key(key_id)).deleted_at_us == deleted.deleted_at_us
    with pytest.raises(NotFound):
        await store.delete_key("00000000-0000-0000-0000-000000000000")


async def test_deleted_keys_free_their_place_under_the_cap(
        store: Store, settings: Settings) -> None:
    capped = replace(settings, max_keys_per_account=1)
    _, key_id, account_id = await new_key(store, capped)
    with pytest.raises(Exception, match="maximum of 1 keys"):
        await new_key(store, capped, account=account_id)
    await store.delete_key(key_id)
    await new_key(store, capped, account=account_id)


def test_plans_in_the_config_replace_the_built_in_ones() -> None:
    settings = Settings.from_mapping({"plans": {"gold": {"rpm": 5, "tpm": 500}}})
    assert list(settings.plans) == ["gold"]
    assert settings.plans["gold"] == Plan("gold", "Gold", "0", 5, 500)
    assert Settings.from_mapping({}).plans.keys() == {"standard", "pro"}
    with pytest.raises(ConfigError, match="plan slug"):
        Settings.from_mapping({"plans": {"Gold Plan": {"rpm": 5, "tpm": 500}}})


async def test_renewals_stop_at_the_last_date_an_expiry_can_show(
        store: Store, settings: Settings) -> None:
    _, key_id, account_id = await new_key(store, settings)
    await update_key(store, settings, key_id, ChangeSpec(expires_at="9999-12-30T00:00:00Z"))
    with pytest.raises(ConfigError, match="after 9999-12-31"):
        await renew_key(store, key_id, "2d")
    # a record beyond it (written by hand, or by an older version) is still shown
    await redis_of(store).hset(Names.key(account_id, key_id), "expires_at",
                               400_000_000_000 * 1_000_000)
    from gateway.http.admin import key_json

    shown = key_json(await store.get_key(key_id), settings)
    assert shown["expires_at"] == "9999-12-31T23:59:59.999Z"
