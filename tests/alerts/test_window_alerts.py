"""Budget thresholds of every window (issue 16, item 5 with item 4): a key's budget windows
(its own or its plan's) and its account's each fire once per threshold and period, however
many requests settle at once over two gateways."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.alerts.events import document
from gateway.config.windows import encode_windows, parse_windows
from gateway.obs.metrics import Metrics
from gateway.store import Store
from tests.alerts.helpers import alert_settings, of_type, with_alerts
from tests.alerts.test_outbox import two_gateways_send
from tests.conftest import new_key


@pytest.fixture(params=["redis", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(store_kind: str, request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("redis_url" if store_kind == "redis" else "cluster_url"))


async def test_each_window_crosses_each_threshold_once(url: str, store: Store,
                                                       metrics: Metrics) -> None:
    settings = alert_settings()
    with_alerts(store, settings)
    # 301 micro-USD a request settled (~345 reserved): of 50 requests at once at least 43
    # are admitted before the key's 0.015/1d window refuses, so at least ~12 900 settles:
    # past 80% of it and of the account's 0.0155/30d/calendar, not of the key's 0.1/7d.
    # (Judged on what settled, not on what is reserved: tests/alerts/test_alert_settled.py.)
    secret, _, account_id = await new_key(
        store, settings, plan="big", budget_windows=["0.015/1d", "0.1/7d"])
    await store.set_account_limits(account_id, {"windows": encode_windows(parse_windows(
        ["0.0155/30d/calendar"]))})
    statuses = await two_gateways_send(url, store, settings, metrics, secret, 50)
    assert statuses.count(200) >= 40
    events = await of_type(store, account_id, "budget.threshold")
    docs = [document(e) for e in events]
    seen = Counter((d["scope"], d["window"], d["threshold"]) for d in docs)
    assert seen[("key", "1d", 0.8)] == 1
    assert seen[("account", "30d/calendar", 0.8)] == 1
    assert not any(w == "7d" for _, w, _ in seen)
    assert all(count == 1 for count in seen.values()), seen
    day = next(d for d in docs if d["window"] == "1d" and d["threshold"] == 0.8)
    assert day["limit_usd"] == 0.015 and day["spent_usd"] >= 0.012
    # More spend in the same periods fires nothing new at 0.8.
    await two_gateways_send(url, store, settings, metrics, secret, 4)
    again = Counter((d["scope"], d["window"], d["threshold"]) for d in
                    (document(e) for e in await of_type(store, account_id,
                                                         "budget.threshold")))
    assert again[("key", "1d", 0.8)] == 1 and again[("account", "30d/calendar", 0.8)] == 1
