"""How one webhook's answers and delays touch the others: a huge answer body is not read
(the status is what counts), and a webhook that hangs holds back no other webhook."""

from __future__ import annotations

import tracemalloc

import pytest

from gateway.alerts.outbox import Outbox
from gateway.alerts.sender import AlertSender
from gateway.config.settings import Settings
from gateway.http.key_changes import ChangeSpec, update_key
from gateway.store import Store
from tests.alerts.helpers import outbox, with_alerts
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
