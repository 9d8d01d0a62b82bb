"""Account limits (issue 16, item 3), per-model limits (item 1) and shadow mode (item 7):
all in admit.lua's one script, on Redis and the cluster."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.errors import ConfigError
from gateway.obs.metrics import Metrics
from gateway.store import Names, Store
from tests.conftest import bearer, client_for, gateway, new_key

BIG = 100_000_000
PLANS = {"plans": {
    "open": {"rpm": 100_000, "tpm": BIG},
    "pro": {"rpm": 100_000, "tpm": BIG,
            "model_limits": {"big": {"rpm": 2, "tpm": BIG}, "wide": {"rpm": 100, "tpm": 400}}},
    "trial": {"rpm": 2, "tpm": BIG, "models": ["a*"], "max_concurrent": 1,
              "enforce": False},
}}


@pytest.fixture(params=["redis", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings() -> Settings:
    return dataclasses.replace(Settings.from_mapping(PLANS), api_plan_keys=True)


def chat(model: str = "m", max_tokens: int = 4) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens}


async def post_all(app: Any, secret: str, bodies: list[dict[str, Any]]) -> list[Any]:
    async with client_for(app) as client:
        return [await client.post("/v1/chat/completions", json=body, headers=bearer(secret))
                for body in bodies]


def codes(responses: list[Any]) -> list[int]:
    return [r.status_code for r in responses]


async def test_an_accounts_rpm_is_shared_by_its_keys_and_reported_when_tighter(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret_a, _, account_id = await new_key(store, settings, plan="open")
    secret_b, _, _ = await new_key(store, settings, account=account_id, plan="open")
    await store.set_account_limits(account_id, {"rpm": 3})
    app = gateway(MockUpstream(), store, settings, metrics)
    first = await post_all(app, secret_a, [chat(), chat()])
    second = await post_all(app, secret_b, [chat(), chat()])
    assert codes(first + second) == [200, 200, 200, 429]
    # The account's bucket is the tighter one: the headers show it, not the key's 100 000.
    assert first[0].headers["x-ratelimit-limit-requests"] == "3"
    assert first[1].headers["x-ratelimit-remaining-requests"] == "1"
    refused = second[1]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "for the account" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    # Removing the account's limit gives the keys their own again.
    await store.set_account_limits(account_id, {"rpm": None})
    assert codes(await post_all(app, secret_b, [chat()])) == [200]


async def test_an_accounts_tpm_is_corrected_by_the_real_usage(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    """Each request reserves ~190 tokens of the account's 400 per minute and uses ~20: the
    settlement gives the difference back, so the next ones fit."""
    secret, _, account_id = await new_key(store, settings, plan="open")
    await store.set_account_limits(account_id, {"tpm": 400})
    app = gateway(MockUpstream(max_words=16), store, settings, metrics)
    assert codes(await post_all(app, secret, [chat(max_tokens=100)] * 5)) == [200] * 5
    big = await post_all(app, secret, [chat(max_tokens=400)])
    assert codes(big) == [429] and "for the account" in big[0].json()["error"]["message"]


async def test_per_model_limits_of_a_plan(store: Store, settings: Settings,
                                         metrics: Metrics) -> None:
    secret, key_id, account_id = await new_key(store, settings, plan="pro")
    app = gateway(MockUpstream(), store, settings, metrics)
    responses = await post_all(app, secret, [chat("big"), chat("small"), chat("big"),
                                             chat("big"), chat("small")])
    assert codes(responses) == [200, 200, 200, 429, 200]
    assert responses[0].headers["x-ratelimit-limit-requests"] == "2"  # the model's, tighter
    assert responses[1].headers["x-ratelimit-limit-requests"] == "100000"
    assert "for this model" in responses[3].json()["error"]["message"]
    # The model's token bucket is corrected at settlement like the key's.
    wide = await post_all(app, secret, [chat("wide", max_tokens=100)] * 4)
    assert codes(wide) == [200] * 4
    record = await store.client.call("HGET", Names.key(account_id, key_id), "m:wide:tpm_tat")
    assert record is not None


async def test_shadow_mode_counts_and_refuses_nothing(store: Store, settings: Settings,
                                                      metrics: Metrics) -> None:
    secret, key_id, account_id = await new_key(store, settings, plan="trial")
    app = gateway(MockUpstream(), store, settings, metrics)
    responses = await post_all(app, secret, [chat("a1"), chat("a2"), chat("a3"), chat("b"),
                                             chat("a4")])
    assert codes(responses) == [200] * 5
    # The headers tell the truth: the plan's 2 requests per minute are used up.
    assert responses[1].headers["x-ratelimit-remaining-requests"] == "0"
    assert responses[4].headers["x-ratelimit-remaining-requests"] == "0"
    registry = metrics.registry
    assert registry.get_sample_value("gateway_would_reject_total", {
        "reason": "rate_limit_exceeded_rpm", "plan": "trial"}) == 2
    assert registry.get_sample_value("gateway_would_reject_total", {
        "reason": "model_not_allowed", "plan": "trial"}) == 1
    # A would-be refusal takes nothing: the bucket holds the two admitted, not five.
    tat = float(await store.client.call("HGET", Names.key(account_id, key_id), "rpm_tat"))
    now = await store.now_us()
    assert 55_000_000 < tat - now <= 60_000_000
    # Money is never shadowed: a budget still refuses.
    await store.set_account_limits(account_id, {"rpm": 1})  # the account's limits neither
    assert codes(await post_all(app, secret, [chat("a1"), chat("a1")])) == [200, 429]


def test_plan_limit_settings_are_checked() -> None:
    bad: list[dict[str, Any]] = [
        {"max_concurrent": 0}, {"max_concurrent": "8"}, {"enforce": "no"},
        {"max_queue_wait": "2"}, {"max_queue_wait": "61s"}, {"max_queue_wait": 2},
        {"model_limits": {"m": {"rpm": 1}}}, {"model_limits": {"m*": {"rpm": 1, "tpm": 1}}},
        {"model_limits": {"m": {"rpm": 1, "tpm": 1, "burst": 2}}}, {"model_limits": []},
    ]
    bad.append({"models": [f"m{i}" for i in range(257)]})
    for extra in bad:
        with pytest.raises(ConfigError):
            Settings.from_mapping({"plans": {"p": {"rpm": 1, "tpm": 1, **extra}}})
    # A lease renewed every third of it: not so short that renewing is a busy loop, not so
    # long that a dead replica's slots never come back.
    for lease in (0.001, 0.5, 3601, 1e300, "x", True):
        with pytest.raises(ConfigError):
            Settings.from_mapping({"concurrency_lease": lease})
    assert Settings.from_mapping({"concurrency_lease": 1}).concurrency_lease == 1
    ok = Settings.from_mapping({"plans": {"p": {
        "rpm": 1, "tpm": 1, "max_concurrent": 8, "enforce": False, "max_queue_wait": "500ms",
        "model_limits": {"llama-3.1-8b": {"rpm": 5, "tpm": 50}}}}})
    plan = ok.plans["p"]
    assert (plan.max_concurrent, plan.enforce, plan.max_queue_wait) == (8, False, 0.5)
    assert plan.model_limits == (("llama-3.1-8b", 5, 50),)
    assert ok.admission.for_model("llama-3.1-8b") != ok.admission.for_model("other")
    assert ok.admission.for_model("other") is ok.plan_limits
