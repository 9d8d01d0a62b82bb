"""Thresholds are judged on money settled, never on the estimates of requests still in
flight (QA found a 0.8 event fired by reservations, which then kept the real crossing
silent): 10 requests each reserve ~9% of a key's $0.01 budget but really cost 2 micro-USD
each; no 0.8 event; the real crossing afterwards fires once. Credits likewise."""
from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from gateway.alerts.events import document
from gateway.obs.metrics import Metrics
from gateway.store import Store
from gateway.types import Receive, Scope, Send
from tests.alerts.helpers import alert_settings, chat, of_type, upstream, with_alerts
from tests.conftest import bearer, client_for, gateway, new_key

N = 10


@pytest.fixture(params=["redis", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def gated_upstream(arrived: list[int], all_in: asyncio.Event) -> Any:
    """Answers only once all N requests are admitted (so their reservations coexist), each
    with a tiny usage: 1 prompt and 1 completion token."""
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        arrived[0] += 1
        if arrived[0] >= N:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), 10)
        payload = orjson.dumps({"id": "x", "object": "chat.completion", "model": "m",
                                "choices": [], "usage": {"prompt_tokens": 1,
                                                         "completion_tokens": 1,
                                                         "total_tokens": 2}})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})
    return app


async def test_threshold_not_fired_by_reservations_of_requests_in_flight(
        store: Store, metrics: Metrics) -> None:
    settings = alert_settings()  # thresholds 0.8 and 1.0
    with_alerts(store, settings)
    secret, key_id, account_id = await new_key(store, settings, plan="big",
                                               budget_usd="0.01",
                                               budget_windows=["0.01/1d"])
    arrived, all_in = [0], asyncio.Event()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 560}
    async with client_for(gateway(gated_upstream(arrived, all_in), store, settings,
                                  metrics)) as client:
        replies = await asyncio.gather(*(
            client.post("/v1/chat/completions", json=body, headers=bearer(secret))
            for _ in range(N)))
    assert [r.status_code for r in replies] == [200] * N
    record = await store.get_key(key_id)
    assert record.spent == N * 2  # 20 micro-USD of a 10 000 budget: 0.2%
    events = [document(e) for e in await of_type(store, account_id, "budget.threshold")]
    assert events == [], events
    # The real crossing: 300 micro-USD a request settled, past 8 000 after ~27 more.
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        for _ in range(30):
            reply = await client.post("/v1/chat/completions", json=chat(),
                                      headers=bearer(secret))
            assert reply.status_code == 200
    events = [document(e) for e in await of_type(store, account_id, "budget.threshold")]
    at_80 = sorted(d["window"] for d in events if d["threshold"] == 0.8)
    assert at_80 == ["1d", "primary"], events
    assert all(d["spent_usd"] >= 0.008 for d in events)


async def test_credits_low_not_fired_by_reservations_of_requests_in_flight(
        store: Store, metrics: Metrics) -> None:
    """Balance $0.02, credits_low_usd $0.015: 10 credit requests each reserve ~$0.0009
    while in flight (the balance dips to ~$0.011) but really cost 2 micro-USD each; the
    balance never goes below $0.0199, so no credits.low may fire."""
    settings = alert_settings(credits_low_usd=0.015)
    with_alerts(store, settings)
    secret, _, account_id = await new_key(store, settings, credit=True)
    await store.add_credits(account_id, 20_000, "test")  # $0.02
    arrived, all_in = [0], asyncio.Event()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 560}
    async with client_for(gateway(gated_upstream(arrived, all_in), store, settings,
                                  metrics)) as client:
        replies = await asyncio.gather(*(
            client.post("/v1/chat/completions", json=body, headers=bearer(secret))
            for _ in range(N)))
    assert [r.status_code for r in replies] == [200] * N
    account = await store.get_account(account_id)
    assert account.credits == 20_000 - N * 2  # $0.01998: never below the $0.015 threshold
    events = [document(e) for e in await of_type(store, account_id, "credits.low")]
    assert events == [], events
