"""Refusals counted per key (admit.lua's 'x<minute>' fields, lua/refused.lua) and the
operator's "top keys by refusals, last hour" (docs/dashboard.md), through the gateway on a
real redis-server, the Redis Cluster and the embedded store: every refused request of a
known key counts once, an unknown secret counts nowhere, and on a plan that queues a
request counts once when it is refused in the end and not at all when it waited and was
served."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from typing import Any

import httpx
import pytest

from gateway.config.settings import Settings
from gateway.http.dashboard.admin_pages import TOP_KEYS
from gateway.obs.metrics import Metrics
from gateway.store import Store
from tests.conftest import bearer, client_for, new_key
from tests.http.test_dashboard import app, cell
from tests.http.test_dashboard_admin import TOKEN, admin_sign_in, table

PLANS = {
    "plans": {
        "tight": {"rpm": 2, "tpm": 10_000_000},
        # rpm = 60: once the minute's 60 are spent, one request a second.
        "queued": {"rpm": 60, "tpm": 10_000_000, "max_queue_wait": "3s"},
        # rpm = 1 with a wait shorter than the next request's turn: refused at once.
        "hurried": {"rpm": 1, "tpm": 10_000_000, "max_queue_wait": "100ms"},
    }}


@pytest.fixture(params=["redis", "cluster", "embedded"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def op_settings() -> Settings:
    return dataclasses.replace(Settings.from_mapping(PLANS), api_plan_keys=True,
                               admin_token=TOKEN)


CHAT = "/v1/chat/completions"


def chat() -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def send(client: httpx.AsyncClient, secret: str, count: int) -> list[int]:
    answers = [await client.post(CHAT, json=chat(), headers=bearer(secret))
               for _ in range(count)]
    return [a.status_code for a in answers]


def ranked(page: str, table_id: str) -> list[str]:
    return re.findall(r'<tr data-key-id="([^"]+)">', table(page, table_id))


async def test_each_refusal_of_a_known_key_counts_once_and_ranks_the_key(
        store: Store, op_settings: Settings, metrics: Metrics) -> None:
    tight, tight_id, account_id = await new_key(store, op_settings, name="tight", plan="tight")
    gone, gone_id, _ = await new_key(store, op_settings, account=account_id, name="gone",
                                     credit=True)
    calm, calm_id, _ = await new_key(store, op_settings, account=account_id, name="calm",
                                     credit=True)
    broke, broke_id, _ = await new_key(store, op_settings, account=account_id, name="broke",
                                       credit=True)
    await store.add_credits(account_id, 1_000_000, "test", "cli")
    async with client_for(app(store, op_settings, metrics)) as client:
        assert await send(client, tight, 6) == [200, 200, 429, 429, 429, 429]
        assert await send(client, calm, 2) == [200, 200]
        await store.update_key(account_id, gone_id, active=False)
        assert await send(client, gone, 2) == [403, 403]
        # A secret nobody holds is refused before any key is known: counted nowhere.
        assert await send(client, "sk_live_" + "x" * 40, 3) == [401, 401, 401]
        # The account's credits run out for every credit key alike: that 429 counts too.
        await store.add_credits(account_id, -(await store.get_account(account_id)).credits,
                                "test", "cli")
        assert await send(client, broke, 1) == [429]

        await admin_sign_in(client)
        page = (await client.get("/dashboard/admin")).text
    assert ranked(page, "top-refused") == [tight_id, gone_id, broke_id]
    assert len(ranked(page, "top-refused")) <= TOP_KEYS
    for key_id, refused in ((tight_id, "4"), (gone_id, "2"), (broke_id, "1"), (calm_id, "0")):
        assert cell(table(page, "all-keys"), f'data-key-id="{key_id}"', "refused-1h") == \
            refused, key_id
    assert cell(table(page, "top-refused"), f'data-key-id="{tight_id}"', "refused-1h") == "4"


async def test_a_queueing_plan_counts_a_request_refused_in_the_end_once_and_a_served_one_never(
        store: Store, op_settings: Settings, metrics: Metrics) -> None:
    waiter, waiter_id, account_id = await new_key(store, op_settings, name="waiter",
                                                  plan="queued")
    hurried, hurried_id, _ = await new_key(store, op_settings, account=account_id,
                                           name="hurried", plan="hurried")
    async with client_for(app(store, op_settings, metrics)) as client:
        answers = await asyncio.gather(*(client.post(CHAT, json=chat(), headers=bearer(waiter))
                                         for _ in range(61)))
        # The 61st was refused by admit.lua first, waited about a second and was served.
        assert [a.status_code for a in answers] == [200] * 61
        # rpm 1: the second request's turn is a minute away, past its 100 ms: refused at once
        # (admit.lua left it uncounted; the gateway counted it once).
        assert await send(client, hurried, 3) == [200, 429, 429]
        await admin_sign_in(client)
        page = (await client.get("/dashboard/admin")).text
    keys = table(page, "all-keys")
    assert cell(keys, f'data-key-id="{waiter_id}"', "refused-1h") == "0"
    assert cell(keys, f'data-key-id="{hurried_id}"', "refused-1h") == "2"
    assert ranked(page, "top-refused") == [hurried_id]
