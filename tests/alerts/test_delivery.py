"""How one webhook's answers and delays touch the others: a huge answer body is not read
(the status is what counts), and a webhook that hangs holds back no other webhook."""

from __future__ import annotations

import asyncio
import logging
import tracemalloc

import pytest

from gateway.alerts.outbox import AlertEvent, Outbox
from gateway.alerts.sender import AlertSender
from gateway.config.settings import Settings
from gateway.http.key_changes import ChangeSpec, update_key
from gateway.store import Store
from tests.alerts.helpers import SECRET, alert_settings, outbox, with_alerts
from tests.alerts.receiver import Receiver, receiving
from tests.alerts.test_sender import FAST, hooks, run_until
from tests.conftest import new_key


@pytest.fixture(params=["redis"])  # the sender's scripts need a real redis-server
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def deactivations(store: Store, settings: Settings, count: int) -> str:
    """`count` key.deactivated events in one account; returns its id."""
    _, key_id, account_id = await new_key(store, settings, plan="big")
    for _ in range(count):
        await update_key(store, settings, key_id, ChangeSpec(active=False))
        await update_key(store, settings, key_id, ChangeSpec(active=True))
    return account_id


async def test_a_huge_answer_body_is_not_read(store: Store) -> None:
    size = 50 * 1024 * 1024
    async with receiving(Receiver(always="big", big_bytes=size)) as rx:
        settings = hooks((rx, None))
        with_alerts(store, settings)
        account_id = await deactivations(store, settings, 1)
        sender = AlertSender(Outbox(store, "s1"), settings.alerts, None, FAST)
        tracemalloc.start()
        try:
            await run_until(sender, condition=lambda: sender.totals.done == 1)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert sender.totals.delivered == 1 and sender.totals.failed == 0
    assert len(rx.calls) == 1
    assert sender.poster.answer_bytes <= 1024 * 1024  # a few KiB, plus what one read brings
    assert peak < 8 * 1024 * 1024  # far below the 50 MB body
    assert rx.big_sent < size  # the sender hung up instead of taking it all
    assert await outbox(store, account_id) == []


async def test_a_hanging_webhook_holds_back_no_other(store: Store) -> None:
    """40 events, one receiver that never answers (the timeout is 2 s) and one that does:
    the healthy one has them all at once; the hanging one's are retried, with the same
    ids, once it answers again, and the healthy one is not posted to twice."""
    async with receiving(Receiver(always="hang", hang_seconds=2.5)) as slow, \
            receiving(Receiver()) as healthy:
        settings = alert_settings(timeout=2, webhooks=[
            {"url": slow.url, "secret": SECRET}, {"url": healthy.url, "secret": SECRET}])
        with_alerts(store, settings)
        account_id = await deactivations(store, settings, 40)
        ids = {e.id for e in await outbox(store, account_id)}
        assert len(ids) == 40
        sender = AlertSender(Outbox(store, "s1"), settings.alerts, None, FAST)
        stop = asyncio.Event()
        started = asyncio.get_running_loop().time()
        task = asyncio.ensure_future(sender.run(stop, interval=0.05))
        try:
            while healthy.accepted_ids() != ids:
                assert asyncio.get_running_loop().time() - started < 1.5, \
                    f"{len(healthy.accepted_ids())} of 40 reached the healthy webhook"
                await asyncio.sleep(0.01)
            assert slow.calls and not slow.accepted()
            assert sender.pending == 40  # none is done before the hanging one has it
            slow.always = "200"  # it recovers: its events are retried
            while not (slow.accepted_ids() == ids and sender.pending == 0):
                assert asyncio.get_running_loop().time() - started < 20, "not retried"
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await task
            await sender.close()
    hung = [c for c in slow.calls if c.outcome == "hang"]
    assert hung and {c.headers["x-gateway-event-id"] for c in hung} <= ids
    for call in hung:  # retried with the same id and the same bytes
        assert any(c.body == call.body for c in slow.accepted()
                   if c.headers["x-gateway-event-id"] == call.headers["x-gateway-event-id"])
    assert len(healthy.calls) == 40  # each once: the other webhook's retries are its own
    assert sender.totals.failed == len(hung) and sender.totals.given_up == 0
    assert await outbox(store, account_id) == []


async def test_a_webhook_that_never_accepts_is_given_up_alone(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    secret_path = "/services/T000/B000/XXXXSECRETXXXX"  # a Slack-style URL's credential
    async with receiving(Receiver(always="500"), secret_path) as bad, \
            receiving(Receiver()) as good:
        settings = hooks((bad, None), (good, None), max_attempts=2)
        with_alerts(store, settings)
        account_id = await deactivations(store, settings, 1)
        sender = AlertSender(Outbox(store, "s1"), settings.alerts, None, FAST)
        with caplog.at_level(logging.INFO, "gateway.alerts"):
            await run_until(sender, condition=lambda: sender.totals.done == 1)
    assert len(bad.calls) == 2 and len(good.calls) == 1
    assert sender.totals.given_up == 1 and sender.totals.delivered == 1
    assert await outbox(store, account_id) == []
    origin = bad.url.removesuffix(secret_path)
    assert f"for webhook 1 ({origin}/***)" in caplog.text
    assert "XXXXSECRETXXXX" not in caplog.text and "T000" not in caplog.text


async def test_retries_do_not_make_the_outboxes_read_more_often(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pass reads every account's outbox; retries due in between (backoff 0.05 to
    0.2 s here) are made without one, so the reads stay at one per interval."""
    async with receiving(Receiver(always="500")) as rx:
        settings = hooks((rx, None), max_attempts=1000)
        with_alerts(store, settings)
        await deactivations(store, settings, 1)
        outbox_ = Outbox(store, "s1")
        reads: list[str] = []
        real_read = outbox_.read

        async def counted(account_id: str, count: int, start: str = ">",
                          claim_idle_ms: int = 0) -> list[AlertEvent]:
            reads.append(start)
            return await real_read(account_id, count, start, claim_idle_ms)

        monkeypatch.setattr(outbox_, "read", counted)
        sender = AlertSender(outbox_, settings.alerts, None, FAST)
        stop = asyncio.Event()
        task = asyncio.ensure_future(sender.run(stop, interval=0.5))
        await asyncio.sleep(1.6)
        stop.set()
        await task
        await sender.close()
    assert len(rx.calls) >= 6  # retried all along
    assert reads.count(">") <= 5  # passes at 0, 0.5, 1.0, 1.5 s (and a little slack)
