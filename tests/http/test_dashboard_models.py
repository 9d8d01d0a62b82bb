"""The key page's `#spend-by-model` without a ledger (docs/dashboard.md): from the usage
counters, settle.lua's 'm:<model>' / 'n:<model>' fields of the per-day hashes, on a real
redis-server, the Redis Cluster and the embedded store. The rows are the key's own, by the
model served, add up to the daily chart's spend; a key's names are bounded per day; spend
settled before the fields existed is a row of its own."""

from __future__ import annotations

import html
import time
from typing import Any

import httpx
import pytest

from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.dashboard.charts import UNRECORDED, usd
from gateway.obs.metrics import Metrics
from gateway.store import Names, Store
from tests.conftest import bearer, client_for, gateway, new_key
from tests.http.test_dashboard import account_with_mk, sign_in, svg_attrs
from tests.http.test_dashboard_admin import table
from tests.http.test_dashboard_ledger import Aliasing, model_rows
from tests.redis_inspect import redis_of

CHAT = "/v1/chat/completions"
MODELS_PER_DAY = 32  # settle.lua's MODELS


@pytest.fixture(params=["redis", "cluster", "embedded"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def send(client: httpx.AsyncClient, secret: str, models: list[str]) -> None:
    for model in models:
        response = await client.post(CHAT, json=chat(model), headers=bearer(secret))
        assert response.status_code == 200, response.text


async def key_page(client: httpx.AsyncClient, key_id: str) -> str:
    page = await client.get(f"/dashboard/keys/{key_id}")
    assert page.status_code == 200
    return page.text


def micro(text: str) -> int:
    whole, _, part = html.unescape(text).lstrip("$").partition(".")
    return int(whole) * 1_000_000 + int(part.ljust(6, "0"))


async def test_rows_are_the_keys_own_by_model_served_and_add_up_to_its_spend(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, key_id, account_id, mk = await account_with_mk(store, settings)
    other, other_id, _ = await new_key(store, settings, account=account_id, credit=True,
                                       name="other")
    app = gateway(Aliasing(), store, settings, metrics)
    async with client_for(app) as client:
        await send(client, secret, ["model-a", "model-a", "model-b", "alias-of-b",
                                    "<b>x</b>"])
        await send(client, other, ["model-z"])
        # No model named and none served (a keyed GET), and a model named like that row.
        assert (await client.get("/v1/models", headers=bearer(secret))).status_code == 200
        await send(client, secret, ["(none)", "ctl\x01\u202eevil"])
        await sign_in(client, mk)
        page = await key_page(client, key_id)
        empty = await key_page(client, (await new_key(store, settings, account=account_id,
                                                      credit=True, name="idle"))[1])
    rows = {html.unescape(name): (int(requests), micro(spend))
            for name, requests, spend in model_rows(page)}
    # The served name, not the alias; one row of each name shown.
    assert sorted(rows) == ["(none)", "<b>x</b>", "ctl\\x01\\u202eevil", "model-a", "model-b"]
    assert len(model_rows(page)) == 5 and rows["(none)"][0] == 2
    assert "\x01" not in page and "\u202e" not in page  # shown as \xNN, never obeyed
    assert rows["model-a"][0] == 2 and rows["model-b"][0] == 2 and rows["<b>x</b>"][0] == 1
    record = await store.account_key(account_id, key_id)
    assert record is not None
    assert sum(spend for _, spend in rows.values()) == record.total_spent > 0
    assert micro(svg_attrs(page, "chart-daily")["data-spend"]) == record.total_spent
    assert sum(n for n, _ in rows.values()) == int(svg_attrs(page, "chart-daily")["data-requests"])
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "model-z" not in page and model_rows(empty) == []
    assert other_id not in page


async def test_a_keys_model_names_are_bounded_per_day_the_rest_shown_together(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, key_id, account_id, mk = await account_with_mk(store, settings)
    names = [f"m{i:02}" for i in range(MODELS_PER_DAY + 8)]
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        await send(client, secret, [*names, names[-1], names[0]])
        await sign_in(client, mk)
        page = await key_page(client, key_id)
    rows = {name: (int(requests), micro(spend)) for name, requests, spend in model_rows(page)}
    assert len(rows) == MODELS_PER_DAY + 1
    assert rows["(other)"][0] == 9  # the 8 names past the bound, one of them twice
    assert rows["m00"][0] == 2
    record = await store.account_key(account_id, key_id)
    assert record is not None and sum(s for _, s in rows.values()) == record.total_spent
    day = int(time.time()) // 86400
    kept = [name for d in (day - 1, day)  # the requests may have crossed midnight UTC
            for name in await redis_of(store).hkeys(Names.usage_hours(account_id, key_id, d))
            if name.startswith((b"m:", b"n:"))]
    assert len(kept) == 2 * (MODELS_PER_DAY + 1)  # the bound's names and '(other)'


async def test_spend_settled_before_the_model_fields_is_a_row_of_its_own(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, key_id, account_id, mk = await account_with_mk(store, settings)
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        await send(client, secret, ["model-a"])
        # What an older gateway wrote: the hour's requests and spend, no model fields.
        hour = int(time.time()) // 3600
        name = Names.usage_hours(account_id, key_id, hour // 24)
        await redis_of(store).hincrby(name, f"r{hour % 24}", 3)
        await redis_of(store).hincrby(name, f"s{hour % 24}", 1_234)
        await sign_in(client, mk)
        page = await key_page(client, key_id)
    rows = {name: (int(requests), micro(spend)) for name, requests, spend in model_rows(page)}
    assert set(rows) == {"model-a", UNRECORDED}
    assert rows[UNRECORDED] == (3, 1_234)
    assert rows["model-a"][0] + 3 == int(svg_attrs(page, "chart-daily")["data-requests"])
    assert rows["model-a"][1] + 1_234 == micro(svg_attrs(page, "chart-daily")["data-spend"])
    assert usd(1_234) in table(page, "spend-by-model")
