"""Several budget windows (issue 16, item 4): a plan's `budgets` (or a key's own
`--budget-window`) and an account's, each with an exact lazy rollover, rolling or aligned
to UTC (`reset = "calendar"`); admission refuses on any of them, settlement corrects each
one still in the period it charged; /v1/usage lists them all. On Redis and the cluster."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from typing import Any

import pytest

from gateway.config.settings import Settings
from gateway.config.windows import encode_windows, parse_windows
from gateway.core.keys import hash_secret
from gateway.demo.mock_upstream import MockUpstream
from gateway.errors import ConfigError
from gateway.http.key_changes import ChangeSpec, update_key
from gateway.obs.metrics import Metrics
from gateway.store import Ask, KeyRef, Store
from tests.conftest import bearer, client_for, gateway, new_key

DAY_US = 86_400_000_000
PLANS = {"plans": {
    "metered": {"rpm": 100_000, "tpm": 100_000_000,
                "budgets": [{"usd": "0.001", "duration": "1d"},
                            {"usd": "0.003", "duration": "30d"}]},
    "calendar": {"rpm": 100_000, "tpm": 100_000_000, "reset": "calendar",
                 "budgets": [{"usd": 1, "duration": "1d"}, {"usd": 10, "duration": "30d"}]},
    "open": {"rpm": 100_000, "tpm": 100_000_000},
}}


@pytest.fixture(params=["redis", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings() -> Settings:
    return dataclasses.replace(Settings.from_mapping(PLANS), api_plan_keys=True)


def ask(cost: int) -> Ask:
    return Ask(10, 0, 1, cost, cost, 0, clamp=False, model="m")


class Caller:
    """Admissions and settlements of one key through the store's own code."""

    def __init__(self, store: Store, settings: Settings, secret: str, key_id: str,
                 account_id: str) -> None:
        self.store, self.settings = store, settings
        self.ref, self.hash = KeyRef(account_id, key_id), hash_secret(secret)
        self.n = 0

    async def admit(self, cost: int) -> tuple[int, int, str]:
        self.n += 1
        request_id = f"r{self.n}-{self.ref.key_id[:8]}"
        decision = await self.store.admit(self.ref, self.hash, request_id, ask(cost),
                                          self.settings.admission.for_model("m"))
        return decision.code, decision.retry_after_us, request_id

    async def spend(self, reserve: int, actual: int) -> int:
        code, _, request_id = await self.admit(reserve)
        if code == 0:
            assert await self.store.settle(self.ref, request_id, 10, 0, actual)
        return code

    async def windows(self) -> list[tuple[str, int, int, int | None]]:
        usage = await self.store.key_usage(self.ref, self.hash, self.settings.admission.windows)
        return [(w.scope, w.limit, w.spent, w.resets_at_us) for w in usage.windows]


async def test_every_window_refuses_and_settlement_corrects_each(
        store: Store, settings: Settings) -> None:
    secret, key_id, account_id = await new_key(store, settings, plan="metered")
    caller = Caller(store, settings, secret, key_id, account_id)
    # Reserved 400, used 100: each window is charged the real cost.
    assert [await caller.spend(400, 100) for _ in range(3)] == [0, 0, 0]
    before = await store.now_us()  # a window that rolled would restart from here
    assert [(s, lim, spent) for s, lim, spent, _ in await caller.windows()] == [
        ("key", 1000, 300), ("key", 3000, 300)]
    # The day's window has 700 left: 800 does not fit (the 30 days' would).
    code, retry, _ = await caller.admit(800)
    assert code == 6
    assert DAY_US - 5_000_000 < retry <= DAY_US  # rolling: a day from its first use
    assert await caller.spend(700, 700) == 0  # exactly what is left fits
    assert await caller.spend(1, 1) == 6
    # A key's own windows replace its plan's; spent carries on in a window kept.
    await update_key(store, settings, key_id, ChangeSpec(budget_windows=["0.002/1d"]))
    assert [(lim, spent) for _, lim, spent, _ in await caller.windows()] == [(2000, 1000)]
    assert await caller.spend(1000, 1000) == 0
    assert await caller.spend(1, 1) == 6
    await update_key(store, settings, key_id, ChangeSpec(budget_windows=["none"]))
    assert await caller.windows() == []
    assert await caller.spend(5000, 5000) == 0
    await update_key(store, settings, key_id, ChangeSpec(budget_windows=["plan"]))
    assert [(lim, spent) for _, lim, spent, _ in await caller.windows()] == [
        (1000, 2000), (3000, 1000)]
    assert before > 0


async def test_an_accounts_window_is_shared_by_its_keys(store: Store,
                                                        settings: Settings) -> None:
    secret_a, key_a, account_id = await new_key(store, settings, plan="open")
    secret_b, key_b, _ = await new_key(store, settings, account=account_id, plan="open")
    await store.set_account_limits(account_id, {"windows": encode_windows(
        parse_windows(["0.001/1h"]))})
    a = Caller(store, settings, secret_a, key_a, account_id)
    b = Caller(store, settings, secret_b, key_b, account_id)
    assert await a.spend(600, 600) == 0
    assert await b.spend(600, 600) == 6  # 400 left of the account's 1000
    assert await b.spend(400, 400) == 0
    assert await a.spend(1, 1) == 6
    assert [(s, lim, spent) for s, lim, spent, _ in await b.windows()] == [
        ("account", 1000, 1000)]


async def test_a_short_window_rolls_over_exactly(store: Store, settings: Settings) -> None:
    secret, key_id, account_id = await new_key(store, settings, plan="open",
                                               budget_windows=["0.001/2s"])
    caller = Caller(store, settings, secret, key_id, account_id)
    code, _, straddling = await caller.admit(600)  # settled after the rollover, below
    assert code == 0
    assert await caller.spend(400, 400) == 0
    assert await caller.spend(1, 1) == 6
    [(_, _, _, resets)] = await caller.windows()
    assert resets is not None
    while await store.now_us() < resets:
        await asyncio.sleep(0.1)
    assert await caller.spend(900, 900) == 0  # a new period
    # The request admitted in the old period settles there, not in the new one.
    assert await store.settle(caller.ref, straddling, 10, 0, 100)
    [(_, _, spent, new_resets)] = await caller.windows()
    assert spent == 900 and new_resets == resets + 2_000_000


async def test_calendar_windows_end_at_midnight_and_on_the_first(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, key_id, _ = await new_key(store, settings, plan="calendar")
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        response = await client.post("/v1/chat/completions", headers=bearer(secret), json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert response.status_code == 200
        usage = (await client.get("/v1/usage", headers=bearer(secret))).json()
    now = datetime.datetime.fromtimestamp(await store.now_us() / 1e6, datetime.UTC)
    tomorrow = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0,
                                                          microsecond=0)
    first = datetime.datetime(now.year + now.month // 12, now.month % 12 + 1, 1,
                              tzinfo=datetime.UTC)
    primary, day, month = usage["budgets"]
    assert primary["primary"] and primary["limit"] is None  # the seed's `budget`
    assert usage["budget"]["spent"] == primary["spent"]
    key = await store.get_key(key_id)
    for window, ends in ((day, tomorrow), (month, first)):
        assert window["reset"] == "calendar" and window["scope"] == "key"
        assert window["spent"] == key.total_spent / 1e6 > 0
        assert datetime.datetime.fromisoformat(window["resets_at"]) == ends
    assert (day["limit"], day["duration"], month["limit"], month["duration"]) == (
        1.0, "1d", 10.0, "30d")


async def test_a_window_refuses_over_http_with_its_wait(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings, plan="open",
                                 budget_windows=["0.000001/1d"])
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        response = await client.post("/v1/chat/completions", headers=bearer(secret), json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        usage = (await client.get("/v1/usage", headers=bearer(secret))).json()
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "budget_exceeded"
    assert 86_000 < int(response.headers["retry-after"]) <= 86_400
    [_, window] = usage["budgets"]
    assert window["spent"] == 0 and window["resets_at"] is None  # never charged: not begun


def test_window_settings_are_checked() -> None:
    bad: list[Any] = [
        {"budgets": [{"usd": 5}]}, {"budgets": [{"usd": 0, "duration": "1d"}]},
        {"budgets": [{"usd": 5, "duration": "1d", "cap": 1}]}, {"budgets": {"usd": 5}},
        {"budgets": [{"usd": 5, "duration": "1d"}, {"usd": 6, "duration": "1d"}]},
        {"budgets": [{"usd": 1, "duration": f"{d}d"} for d in range(1, 6)]},
        {"reset": "monthly"}, {"reset": "calendar", "budgets": [{"usd": 1, "duration": "7m"}]},
    ]
    for extra in bad:
        with pytest.raises(ConfigError):
            Settings.from_mapping({"plans": {"p": {"rpm": 1, "tpm": 1, **extra}}})
    for text in ("5", "5/1x", "-1/1d", "5/1d/monthly", "abc/1d", "5/0d"):
        with pytest.raises(ConfigError):
            parse_windows([text])
    assert [w.text() for w in parse_windows(["5/1d", "100.5/30d/calendar"])] == [
        "5/1d", "100.5/30d/calendar"]
