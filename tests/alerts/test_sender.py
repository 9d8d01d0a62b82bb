"""The sender delivers every event at least once to a real HTTP receiver that fails its
first calls (a 500, a reset connection, a call that times out), signed, with one id across
retries; then deletes it. Events no webhook can take are given up, counted and deleted."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from prometheus_client import CollectorRegistry

from gateway.alerts.metrics import AlertMetrics
from gateway.alerts.outbox import Outbox
from gateway.alerts.sender import AlertSender, SenderOptions
from gateway.alerts.signing import verify
from gateway.config.settings import Settings
from gateway.http.key_changes import ChangeSpec, update_key
from gateway.obs.metrics import Metrics
from gateway.store import Store, connect
from tests.alerts.helpers import SECRET, alert_settings, chat, outbox, upstream, with_alerts
from tests.alerts.receiver import Receiver, expected_signature, receiving
from tests.conftest import bearer, client_for, gateway, new_key

FAST = SenderOptions.with_backoff(0.05, 0.2)


@pytest.fixture(params=["redis", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def hooks(*receivers: tuple[Receiver, list[str] | None], **alerts: object) -> Settings:
    webhooks = []
    for receiver, events in receivers:
        hook: dict[str, object] = {"url": receiver.url, "secret": SECRET}
        if events is not None:
            hook["events"] = events
        webhooks.append(hook)
    return alert_settings(webhooks=webhooks, timeout=0.5, **alerts)


async def make_events(store: Store, settings: Settings, metrics: Metrics) -> str:
    """A budget.threshold (0.8 of a tiny budget), a credits.low and two
    key.deactivated events in one account; returns its id."""
    secret, key_id, account_id = await new_key(store, settings, plan="big",
                                               budget_usd="0.00036")
    credit_secret, _, _ = await new_key(store, settings, account_id, credit=True)
    await store.add_credits(account_id, 1000)
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        for key in (secret, credit_secret):
            reply = await client.post("/v1/chat/completions", json=chat(),
                                      headers=bearer(key))
            assert reply.status_code == 200
    for active in (False, True, False):
        await update_key(store, settings, key_id, ChangeSpec(active=active))
    return account_id


async def run_until(sender: AlertSender, done: asyncio.Future[None] | None = None,
                    condition: object = None, seconds: float = 20.0) -> None:
    stop = asyncio.Event()
    task = asyncio.ensure_future(sender.run(stop, interval=0.05))
    try:
        deadline = asyncio.get_running_loop().time() + seconds
        while not condition():  # type: ignore[operator]
            assert asyncio.get_running_loop().time() < deadline, "not delivered in time"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
        await sender.close()


async def test_every_event_arrives_signed_with_one_id_across_retries(
        store: Store, metrics: Metrics) -> None:
    async with receiving(Receiver(script=["500", "reset", "hang"], hang_seconds=2)) as rx:
        settings = hooks((rx, None), credits_low_usd="0.0009")
        with_alerts(store, settings)
        account_id = await make_events(store, settings, metrics)
        made = await outbox(store, account_id)
        assert sorted(e.type for e in made) == [
            "budget.threshold", "credits.low", "key.deactivated", "key.deactivated"]
        alert_metrics = AlertMetrics(CollectorRegistry())
        sender = AlertSender(Outbox(store, "s1"), settings.alerts, alert_metrics, FAST)
        ids = {e.id for e in made}
        await run_until(sender, condition=lambda: rx.accepted_ids() >= ids
                        and sender.pending == 0)
    assert rx.accepted_ids() == ids
    assert rx.verifies(SECRET)
    assert not rx.verifies("another-secret-0123456789")
    # The first three calls failed; each failed event was sent again with the same id and
    # the same bytes.
    assert [c.outcome for c in rx.calls[:3]] == ["500", "reset", "hang"]
    for call in rx.calls[:3]:
        again = [c for c in rx.accepted()
                 if c.headers["x-gateway-event-id"] == call.headers["x-gateway-event-id"]]
        assert [c.body for c in again] == [call.body]
    for call in rx.calls:
        doc = orjson.loads(call.body)
        assert doc["id"] == call.headers["x-gateway-event-id"]
        assert doc["type"] == call.headers["x-gateway-event-type"]
        assert call.headers["x-gateway-signature"] == expected_signature(SECRET, call.body)
        assert verify(SECRET, call.body, call.headers["x-gateway-signature"])
        assert doc["account_id"] == account_id and doc["created_at"].endswith("Z")
        assert call.path == "/hook"
    [budget] = [orjson.loads(c.body) for c in rx.accepted()
                if orjson.loads(c.body)["type"] == "budget.threshold"]
    assert budget["threshold"] == 0.8 and budget["limit_usd"] == 0.00036
    assert budget["spent_usd"] >= 0.000288 and budget["resets_at"].endswith("Z")
    [low] = [orjson.loads(c.body) for c in rx.accepted()
             if orjson.loads(c.body)["type"] == "credits.low"]
    assert low["threshold_usd"] == 0.0009 and low["balance_usd"] < 0.0009
    assert await outbox(store, account_id) == []  # delivered: deleted
    assert sender.totals.failed == 3 and sender.totals.given_up == 0
    assert alert_metrics.failed._value.get() == 3
    assert alert_metrics.delivered.labels("key.deactivated")._value.get() == 2
    assert alert_metrics.delivered.labels("budget.threshold")._value.get() == 1


async def test_each_webhook_gets_only_the_events_it_wants(store: Store,
                                                          metrics: Metrics) -> None:
    async with receiving(Receiver()) as everything, \
            receiving(Receiver(script=["500"])) as keys_only:
        settings = hooks((everything, None), (keys_only, ["key.deactivated"]))
        with_alerts(store, settings)
        account_id = await make_events(store, settings, metrics)
        made = await outbox(store, account_id)
        sender = AlertSender(Outbox(store, "s1"), settings.alerts, None, FAST)
        wanted = {e.id for e in made if e.type == "key.deactivated"}
        await run_until(sender, condition=lambda: sender.pending == 0
                        and everything.accepted_ids() == {e.id for e in made}
                        and keys_only.accepted_ids() == wanted)
    assert {orjson.loads(c.body)["type"] for c in keys_only.calls} == {"key.deactivated"}
    assert await outbox(store, account_id) == []


async def test_two_senders_on_one_redis_deliver_everything(
        store: Store, metrics: Metrics, store_kind: str,
        request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("redis_url" if store_kind == "redis" else "cluster_url")
    async with receiving(Receiver(script=["500", "500"])) as rx:
        settings = hooks((rx, None))
        with_alerts(store, settings)
        accounts = [await make_events(store, settings, metrics) for _ in range(3)]
        ids = {e.id for a in accounts for e in await outbox(store, a)}
        other = connect(url, 5.0)
        try:
            senders = [AlertSender(Outbox(store, "a"), settings.alerts, None, FAST),
                       AlertSender(Outbox(other, "b"), settings.alerts, None, FAST)]
            await asyncio.gather(*(run_until(s, condition=lambda: rx.accepted_ids() >= ids
                                             and all(x.pending == 0 for x in senders))
                                   for s in senders))
        finally:
            await other.close()
    assert rx.accepted_ids() == ids
    assert len(rx.accepted()) == len(ids)  # each read by one sender only
    for account_id in accounts:
        assert await outbox(store, account_id) == []


async def test_an_event_never_accepted_is_given_up_counted_and_deleted(
        store: Store, metrics: Metrics, caplog: pytest.LogCaptureFixture) -> None:
    async with receiving(Receiver(always="500")) as rx:
        settings = hooks((rx, None), max_attempts=3)
        with_alerts(store, settings)
        _, key_id, account_id = await new_key(store, settings, plan="big")
        await update_key(store, settings, key_id, ChangeSpec(active=False))
        alert_metrics = AlertMetrics(CollectorRegistry())
        sender = AlertSender(Outbox(store, "s1"), settings.alerts, alert_metrics, FAST)
        with caplog.at_level(logging.INFO, "gateway.alerts"):
            await run_until(sender, condition=lambda: sender.totals.given_up == 1)
    assert len(rx.calls) == 3
    assert alert_metrics.given_up._value.get() == 1
    assert await outbox(store, account_id) == []
    assert "given up after 3 attempts" in caplog.text
    assert SECRET not in caplog.text and str(rx.url) not in caplog.text
