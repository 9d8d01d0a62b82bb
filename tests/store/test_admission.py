"""Exactness under concurrency: limits, budgets and spend, on real Redis and embedded."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gateway.config.settings import Price, Settings
from gateway.core.keys import hash_secret
from gateway.core.timefmt import iso_from_us
from gateway.demo.mock_upstream import MockUpstream
from gateway.obs.metrics import Metrics
from gateway.store import Ask, KeyRef, Names, Store, connect
from gateway.store.embedded import embedded_store
from tests.conftest import PLAN_LIMITS, bearer, client_for, gateway, new_key, prompt_bound_of
from tests.redis_inspect import redis_of


def chat(max_tokens: int | None = 8, chars: int = 40) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x" * chars}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


async def second_store(store: Store, store_kind: str, redis_url: str | None) -> Store:
    """Another client on the same data, as a second replica would have."""
    if store_kind == "redis" and redis_url:
        return connect(redis_url, timeout_seconds=5.0)
    return store  # the embedded store exists only inside one process


async def burst(clients: list[httpx.AsyncClient], n: int, secret: str,
                body: dict[str, Any]) -> list[httpx.Response]:
    async def one(i: int) -> httpx.Response:
        return await clients[i % len(clients)].post("/v1/chat/completions", json=body,
                                                     headers=bearer(secret))
    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_rpm_admits_exactly_the_limit_across_two_instances(
        store: Store, store_kind: str, settings: Settings, metrics: Metrics,
        request: Any) -> None:
    url = request.getfixturevalue("redis_url") if store_kind == "redis" else None
    other = await second_store(store, store_kind, url)
    secret, _, _ = await new_key(store, settings, tpm=10_000_000)
    upstream = MockUpstream()
    apps = [gateway(upstream, store, settings, metrics),
            gateway(upstream, other, settings, metrics)]
    started = await store.now_us()
    async with client_for(apps[0]) as first, client_for(apps[1]) as second:
        responses = await burst([first, second], 150, secret, chat())
    elapsed = (await store.now_us() - started) / 1e6
    admitted = sum(r.status_code == 200 for r in responses)
    rejected = [r for r in responses if r.status_code != 200]
    refill = int(elapsed * 60 / 60) + 1  # 60 rpm refills one request per second
    assert 60 <= admitted <= 60 + refill
    assert upstream.requests == admitted
    assert all(r.status_code == 429 for r in rejected)
    assert {r.json()["error"]["code"] for r in rejected} == {"rate_limit_exceeded"}
    assert {r.json()["error"]["type"] for r in rejected} == {"requests"}
    assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in rejected)
    if other is not store:
        await other.close()


async def test_tpm_is_never_exceeded_by_a_concurrent_burst(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings, rpm=100_000, tpm=1000)
    upstream = MockUpstream()
    started = await store.now_us()
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        # reserved: the prompt bound + 90 completion tokens; actual usage is 10 + 16
        responses = await burst([client], 60, secret, chat(max_tokens=90))
    elapsed = (await store.now_us() - started) / 1e6
    reserved = prompt_bound_of(chat(max_tokens=90)) + 90
    admitted = [r for r in responses if r.status_code == 200]
    used = sum(r.json()["usage"]["total_tokens"] for r in admitted)
    assert used <= 1000 + elapsed * 1000 / 60 + reserved
    assert len(admitted) >= 1000 // reserved
    tokens = [r for r in responses if r.status_code == 429]
    assert tokens and {r.json()["error"]["type"] for r in tokens} == {"tokens"}


async def test_budget_is_never_overshot_by_a_burst(store: Store, metrics: Metrics) -> None:
    settings = Settings(default_price=Price(10_000_000, 20_000_000))  # $10 / $20 per M
    secret, _, _ = await new_key(store, settings, budget_usd="0.01", rpm=100_000,
                                 tpm=10_000_000)
    per_request = settings.default_price.cost_micro(10, 8)  # 100 + 160 micro-USD
    reserved = settings.default_price.cost_micro(prompt_bound_of(chat(max_tokens=8)), 8)
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        responses = await burst([client], 60, secret, chat(max_tokens=8))
        # then one at a time until the budget is used up
        for _ in range(60):
            response = await client.post("/v1/chat/completions", json=chat(max_tokens=8),
                                         headers=bearer(secret))
            responses.append(response)
            if response.status_code == 429:
                break
        usage = (await client.get("/v1/usage", headers=bearer(secret))).json()
    admitted = [r for r in responses if r.status_code == 200]
    spent = round(usage["budget"]["spent"] * 1_000_000)
    billed = sum(settings.default_price.cost_micro(
        r.json()["usage"]["prompt_tokens"], r.json()["usage"]["completion_tokens"])
        for r in admitted)
    assert spent == billed
    assert 10_000 - reserved < spent <= 10_000  # never above; the rest pays no request
    assert any(r.json()["usage"]["completion_tokens"] < 8 for r in admitted) or \
        len(admitted) * per_request == spent
    budget = [r for r in responses if r.status_code == 429]
    assert budget and {r.json()["error"]["code"] for r in budget} == {"budget_exceeded"}
    assert {r.json()["error"]["type"] for r in budget} == {"insufficient_quota"}
    assert all(int(r.headers["retry-after"]) > 86400 for r in budget)  # resets in 30 days


async def test_spend_equals_reported_usage_times_price(store: Store, metrics: Metrics) -> None:
    settings = Settings(default_price=Price(1_300_000, 2_700_000),
                        model_prices={"small": Price(50_000, 80_000)})
    secret, _, _ = await new_key(store, settings, rpm=100_000, tpm=10_000_000)
    bodies = [chat(max_tokens=100), chat(max_tokens=None), chat(max_tokens=3, chars=7),
              {**chat(max_tokens=None), "model": "small"},
              {"model": "e", "input": ["abcd" * 5, "xyz"]}]
    expected = 0
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        for round_ in range(4):
            for body in bodies:
                path = "/v1/embeddings" if "input" in body else "/v1/chat/completions"
                response = await client.post(path, json=body, headers=bearer(secret))
                assert response.status_code == 200, (round_, response.text)
                reported = response.json()["usage"]
                price = settings.price_for(body["model"])
                expected += price.cost_micro(reported["prompt_tokens"],
                                             reported.get("completion_tokens", 0))
        usage = (await client.get("/v1/usage", headers=bearer(secret))).json()
    assert round(usage["budget"]["spent"] * 1_000_000) == expected


def test_cost_is_rounded_up_to_the_micro_dollar() -> None:
    # The tests above compute the expected spend with cost_micro itself: pin its rounding.
    price = Price(1_300_000, 2_700_000)  # $1.30 in, $2.70 out per million tokens
    assert price.cost_micro(10, 16) == 57  # 13 + 43.2 micro-USD
    assert price.cost_micro(1, 0) == 2  # 1.3
    assert price.cost_micro(0, 1) == 3  # 2.7
    assert price.cost_micro(0, 0) == 0
    assert price.cost_micro(1_000_000, 1_000_000) == 4_000_000  # exact: not rounded


async def test_credits_are_charged_the_actual_usage_not_the_reservation(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, account = await new_key(store, settings, credit=True)
    await store.add_credits(account, 1_000_000)
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        response = await client.post("/v1/chat/completions", json=chat(max_tokens=100),
                                     headers=bearer(secret))
        assert response.json()["usage"] == {"prompt_tokens": 10, "completion_tokens": 16,
                                             "total_tokens": 26}
        usage = (await client.get("/v1/usage", headers=bearer(secret))).json()
    # admission reserved 10 + 100 tokens (155 micro-USD); the upstream used 10 + 16 (29)
    assert round(usage["credits"]["balance"] * 1_000_000) == 1_000_000 - 29


async def test_credits_are_shared_by_the_keys_of_one_account(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    first, _, account = await new_key(store, settings, credit=True, name="a")
    second, _, _ = await new_key(store, settings, account, credit=True, name="b")
    await store.add_credits(account, 1000)  # micro-USD
    price = settings.default_price
    per_request = price.cost_micro(10, 8)  # 17
    prompt_cost = price.prompt_micro(prompt_bound_of(chat()))
    billed = 0
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        statuses = []
        for i in range(80):
            secret = first if i % 2 else second
            response = await client.post("/v1/chat/completions", json=chat(),
                                         headers=bearer(secret))
            statuses.append(response.status_code)
            if response.status_code == 200:
                used = response.json()["usage"]
                billed += price.cost_micro(used["prompt_tokens"], used["completion_tokens"])
            if response.status_code == 429:
                assert response.json()["error"]["code"] == "insufficient_credits"
                assert "retry-after" not in response.headers
        usage = (await client.get("/v1/usage", headers=bearer(first))).json()
    admitted = statuses.count(200)
    # admitted while the balance paid the prompt's bound and one token, by either key; the
    # last one admitted with fewer completion tokens when the balance could not pay all 8
    balance = 1000
    expected = 0
    while balance - prompt_cost >= 2:  # one completion token costs 1.5 micro-USD
        balance -= min(per_request, balance - (prompt_cost - 5))
        expected += 1
    assert admitted == expected
    assert statuses[admitted:] == [429] * (80 - admitted)
    left = round(usage["credits"]["balance"] * 1_000_000)
    assert left == 1000 - billed
    assert 0 <= left < prompt_cost + 2  # never below zero; what is left pays no request
    assert usage["plan"]["slug"] is None
    assert usage["key"]["type"] == "credit"


async def test_budget_rolls_over_after_its_duration(store: Store, metrics: Metrics) -> None:
    settings = Settings(default_price=Price(10_000_000, 20_000_000))
    # two requests fit; the third finds the prompt's bound and half a token left: refused
    prompt_cost = settings.default_price.prompt_micro(prompt_bound_of(chat()))
    budget = 2 * settings.default_price.cost_micro(10, 8) + prompt_cost + 10
    secret, _, _ = await new_key(store, settings, budget_usd=f"{budget / 1e6:.6f}",
                                 budget_duration="3s")
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        before = (await client.get("/v1/usage", headers=bearer(secret))).json()["budget"]
        assert before["duration"] == "3s"
        statuses = [(await client.post("/v1/chat/completions", json=chat(),
                                       headers=bearer(secret))) for _ in range(3)]
        assert [r.status_code for r in statuses] == [200, 200, 429]
        wait = int(statuses[2].headers["retry-after"])
        assert 1 <= wait <= 3
        await asyncio.sleep(wait + 0.2)
        after = (await client.post("/v1/chat/completions", json=chat(),
                                   headers=bearer(secret)))
        assert after.status_code == 200
        now = (await client.get("/v1/usage", headers=bearer(secret))).json()["budget"]
    assert round(now["spent"] * 1_000_000) == settings.default_price.cost_micro(10, 8)
    assert now["resets_at"] > before["resets_at"]


HOUR_US = 3_600_000_000


async def end_the_period(store: Store, account_id: str, key_id: str) -> int:
    """Makes the key's budget period have ended 2.5 periods (of an hour) ago with its budget
    spent; returns when the current period ends: whole periods on from that anchor."""
    anchor = await store.now_us() - 2 * HOUR_US - HOUR_US // 2
    await redis_of(store).hset(Names.key(account_id, key_id),
                            mapping={"spent": 999_999, "resets_at": anchor})
    return anchor + 3 * HOUR_US


async def test_admission_rolls_an_ended_period_over_from_its_anchor(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, key_id, account_id = await new_key(store, settings, budget_usd="1",
                                               budget_duration="1h")
    resets_at = await end_the_period(store, account_id, key_id)
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        response = await client.post("/v1/chat/completions", json=chat(),
                                     headers=bearer(secret))
    assert response.status_code == 200
    key = await store.get_key(key_id)
    assert key.resets_at_us == resets_at  # not an hour from now: periods do not drift
    assert key.spent == settings.default_price.cost_micro(10, 8)


async def test_usage_reports_an_ended_period_rolled_over(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, key_id, account_id = await new_key(store, settings, budget_usd="1",
                                               budget_duration="1h")
    resets_at = await end_the_period(store, account_id, key_id)
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        budget = (await client.get("/v1/usage", headers=bearer(secret))).json()["budget"]
    assert budget["spent"] == 0
    assert budget["resets_at"] == iso_from_us(resets_at)
    assert (await store.get_key(key_id)).resets_at_us == resets_at


async def test_a_settlement_after_a_rollover_leaves_the_new_period_alone(
        store: Store, settings: Settings) -> None:
    secret, key_id, account_id = await new_key(store, settings, budget_usd="1")
    ref = KeyRef(account_id, key_id)
    old = await store.admit(ref, hash_secret(secret), "old", Ask.flat(100, 500), PLAN_LIMITS)
    assert old.code == 0
    # The period ends while "old" is in flight; "new" is admitted in the next period.
    await redis_of(store).hset(Names.key(account_id, key_id), "resets_at",
                            await store.now_us() - 1)
    new = await store.admit(ref, hash_secret(secret), "new", Ask.flat(100, 300), PLAN_LIMITS)
    assert new.code == 0
    assert await store.settle(ref, "old", 10, 10, 40) is True
    key = await store.get_key(key_id)
    assert key.spent == 300  # only the new period's own reservation: no refund of "old"
    assert key.total_spent == 40


async def test_embedded_store_is_independent_per_instance() -> None:
    first, second = embedded_store(), embedded_store()
    account = await first.create_account("solo")
    assert await second.account_by_name("solo") is None
    assert (await first.get_account(account.id)).name == "solo"
