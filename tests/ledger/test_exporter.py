"""The ledger end to end: requests through the gateway, `export` into a real PostgreSQL,
`reconcile` against Redis; the faults of issue 14 (an exporter killed between commit and
acknowledgement, PostgreSQL down under traffic, a corrupted side)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from gateway.config.ledger import LedgerSettings
from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.errors import LedgerUnavailable, StoreUnavailable
from gateway.ledger import db, queries
from gateway.ledger.exporter import Exporter
from gateway.ledger.reconcile import reconcile
from gateway.obs.metrics import Metrics
from gateway.store import Names, Store
from gateway.store.ledger import LedgerStreams
from tests.conftest import bearer, client_for, gateway, new_key
from tests.redis_inspect import redis_of

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


@pytest.fixture(params=["redis", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def ledger_url(postgres_url: str) -> str:
    async with db.connection(postgres_url) as conn:
        await db.migrate(conn)
    return postgres_url



def with_ledger(settings: Settings, url: str) -> Settings:
    return dataclasses.replace(settings, ledger=LedgerSettings(url))


async def traffic(store: Store, settings: Settings, metrics: Metrics, secrets: list[str],
                  requests: int) -> None:
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        for n in range(requests):
            response = await client.post("/v1/chat/completions", json=CHAT,
                                         headers=bearer(secrets[n % len(secrets)]))
            assert response.status_code == 200, response.text


async def reconciled(store: Store, url: str) -> list[Any]:
    async with db.connection(url) as conn:
        reports = await reconcile(LedgerStreams(store), conn)
    return [s for r in reports for s in r.differences]


async def rows(url: str) -> int:
    async with db.connection(url) as conn:
        return await queries.row_count(conn)


async def test_every_settled_request_is_one_row_and_reconciles(
        store: Store, settings: Settings, metrics: Metrics, ledger_url: str,
        exporters: list[Exporter]) -> None:
    settings = with_ledger(settings, ledger_url)
    a_secret, a_key, account = await new_key(store, settings, rpm=1000, tpm=10_000_000)
    b_secret, _, _ = await new_key(store, settings, account=account, rpm=1000, tpm=10_000_000)
    other = (await store.create_account("other-co")).id
    other_secret, _, _ = await new_key(store, settings, account=other, rpm=1000,
                                       tpm=10_000_000)
    await traffic(store, settings, metrics, [a_secret, b_secret, other_secret], 30)
    streams = LedgerStreams(store)
    exporter = Exporter(streams, ledger_url, stream_cap=1000)
    exporters.append(exporter)
    assert await exporter.export_pending() == 30
    assert await exporter.observe_lag() == 0  # acknowledged entries leave Redis
    assert await rows(ledger_url) == 30
    assert await exporter.export_pending() == 0
    assert await reconciled(store, ledger_url) == []
    async with db.connection(ledger_url) as conn:
        cur = await conn.execute(
            "SELECT route, model, prompt_tokens, completion_tokens, status, cost_micro "
            "FROM ledger_entries WHERE key_id = %s LIMIT 1", (a_key,))
        route, model, prompt, completion, status, cost = (await cur.fetchall())[0]
    assert (route, status, completion) == ("/v1/chat/completions", 200, 8)
    # the mock's usage at the default price, 0.50 in / 1.50 out per million tokens
    assert model and prompt > 0 and cost == -(-(prompt * 500_000 + 8 * 1_500_000) // 10**6)
    key = await store.get_key(a_key)
    async with db.connection(ledger_url) as conn:
        sums = await queries.key_sums(conn, account, None)
    assert sums[a_key] == (10, key.total_spent)
    assert other != account


async def test_a_crash_between_commit_and_acknowledgement_stores_nothing_twice(
        store: Store, settings: Settings, metrics: Metrics, ledger_url: str,
        exporters: list[Exporter]) -> None:
    settings = with_ledger(settings, ledger_url)
    secret, _, _ = await new_key(store, settings, rpm=1000, tpm=10_000_000)
    await traffic(store, settings, metrics, [secret], 12)
    streams = LedgerStreams(store)

    async def lost(account_id: str, ids: Any) -> int:
        raise StoreUnavailable("the exporter died before acknowledging")

    dying = Exporter(streams, ledger_url)
    exporters.append(dying)
    streams.ack = lost  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        await dying.export_pending()
    assert await rows(ledger_url) == 12  # committed, never acknowledged
    await traffic(store, settings, metrics, [secret], 3)
    restarted = Exporter(LedgerStreams(store), ledger_url)  # the same consumer name
    exporters.append(restarted)
    assert await restarted.export_pending() == 3
    assert restarted.totals.duplicates == 12
    assert await rows(ledger_url) == 15
    assert await restarted.observe_lag() == 0
    assert await reconciled(store, ledger_url) == []


async def test_postgres_down_under_traffic_loses_nothing(
        store: Store, settings: Settings, metrics: Metrics, ledger_url: str,
        postgres_server: Any, exporters: list[Exporter]) -> None:
    settings = with_ledger(settings, ledger_url)
    secret, _, _ = await new_key(store, settings, rpm=1000, tpm=10_000_000)
    exporter = Exporter(LedgerStreams(store), ledger_url)
    exporters.append(exporter)
    await traffic(store, settings, metrics, [secret], 5)
    assert await exporter.export_pending() == 5
    postgres_server.kill()
    try:
        await traffic(store, settings, metrics, [secret], 7)  # the gateway never notices
        with pytest.raises(LedgerUnavailable):
            await exporter.export_pending()
        with pytest.raises(LedgerUnavailable):
            await exporter.export_pending()  # the batch is kept, retried
        assert await exporter.observe_lag() == 7
    finally:
        postgres_server.ensure_running()
    await traffic(store, settings, metrics, [secret], 2)
    assert await exporter.export_pending() == 9
    assert await rows(ledger_url) == 14
    assert await reconciled(store, ledger_url) == []


async def test_reconcile_fails_on_either_side_corrupted(
        store: Store, settings: Settings, metrics: Metrics, ledger_url: str,
        exporters: list[Exporter]) -> None:
    settings = with_ledger(settings, ledger_url)
    secret, key_id, account = await new_key(store, settings, rpm=1000, tpm=10_000_000)
    await traffic(store, settings, metrics, [secret], 4)
    # Two entries stored, two still waiting in the stream: both count.
    exporter = Exporter(LedgerStreams(store), ledger_url)
    exporters.append(exporter)
    async with db.connection(ledger_url) as conn:
        waiting = await LedgerStreams(store).tail(account)
        await db.insert(conn, waiting[:2])
    assert await reconciled(store, ledger_url) == []
    async with db.connection(ledger_url) as conn:
        await conn.execute("UPDATE ledger_entries SET cost_micro = cost_micro + 1 "
                           "WHERE request_id = %s", (waiting[0].request_id,))
        await conn.commit()
    differences = await reconciled(store, ledger_url)
    assert {(d.scope, d.key_id, d.ledger_micro - d.redis_micro) for d in differences} == {
        ("account", None, 1), ("key", key_id, 1)}
    async with db.connection(ledger_url) as conn:
        await conn.execute("UPDATE ledger_entries SET cost_micro = cost_micro - 1 "
                           "WHERE request_id = %s", (waiting[0].request_id,))
        await conn.commit()
    assert await reconciled(store, ledger_url) == []
    await redis_of(store).hincrby(Names.key(account, key_id), "total_spent", 5)
    differences = await reconciled(store, ledger_url)
    assert {(d.scope, d.ledger_micro - d.redis_micro) for d in differences} == {("key", -5)}
    await redis_of(store).hincrby(Names.key(account, key_id), "total_spent", -5)
    assert await exporter.export_pending() == 2
    assert await reconciled(store, ledger_url) == []
    async with db.connection(ledger_url) as conn:  # a row Redis never settled
        await conn.execute("DELETE FROM ledger_entries WHERE request_id = %s",
                           (waiting[3].request_id,))
        await conn.commit()
    assert [(d.scope, d.ledger_micro - d.redis_micro) for d in
            await reconciled(store, ledger_url)] == [("account", -waiting[3].cost_micro),
                                                ("key", -waiting[3].cost_micro)]


async def test_a_frozen_postgres_is_given_up_on_and_the_batch_retried(
        store: Store, settings: Settings, metrics: Metrics, ledger_url: str,
        postgres_server: Any, exporters: list[Exporter],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal

    from gateway.ledger import exporter as exporter_module
    from tests.postgres import _children

    settings = with_ledger(settings, ledger_url)
    secret, _, _ = await new_key(store, settings, rpm=1000, tpm=10_000_000)
    exporter = Exporter(LedgerStreams(store), ledger_url)
    exporters.append(exporter)
    await traffic(store, settings, metrics, [secret], 2)
    assert await exporter.export_pending() == 2  # its connection is open now
    await traffic(store, settings, metrics, [secret], 3)
    monkeypatch.setattr(exporter_module, "INSERT_TIMEOUT_SECONDS", 1.0)
    frozen = [postgres_server.process.pid, *_children(postgres_server.process.pid)]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(LedgerUnavailable, match="no answer within 1 s"):
            await asyncio.wait_for(exporter.export_pending(), 10)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert await exporter.export_pending() == 3  # the kept batch, on a new connection
    assert await reconciled(store, ledger_url) == []


async def test_postgres_errors_never_show_the_password(postgres_server: Any) -> None:
    from gateway.ledger import db

    port = postgres_server.url.rsplit(":", 1)[1].split("/")[0]
    for url in (f"postgresql://u:Sup3r%ZZSecret@127.0.0.1:{port}/qa",  # libpq quotes it
                "postgresql://u:Sup3rSecret@[::1:5/qa",  # the whole URL, quoted
                f"postgresql://u@127.0.0.1:{port}/qa?password=Sup3rSecret&sslmode=bogus"):
        with pytest.raises(LedgerUnavailable) as caught:
            async with db.connection(url):
                pass
        assert "Sup3r" not in str(caught.value), str(caught.value)


async def test_reconcile_under_a_commit_between_its_reads_sees_no_false_difference(
        store: Store, settings: Settings, metrics: Metrics, ledger_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The exporter commits the waiting entries just after reconcile asked which of them
    are stored (QA's race): they must not count both as waiting and as stored."""
    settings = with_ledger(settings, ledger_url)
    secret, _, account = await new_key(store, settings, rpm=1000, tpm=10_000_000)
    await traffic(store, settings, metrics, [secret], 3)
    waiting = await LedgerStreams(store).tail(account)
    real_stored = queries.stored

    async def stored_then_exporter_commits(conn: Any, request_ids: Any) -> set[str]:
        found = await real_stored(conn, request_ids)
        async with db.connection(ledger_url) as other:
            await db.insert(other, waiting)
        return found

    monkeypatch.setattr(queries, "stored", stored_then_exporter_commits)
    assert await reconciled(store, ledger_url) == []
    monkeypatch.setattr(queries, "stored", real_stored)
    assert await rows(ledger_url) == 3
    assert await reconciled(store, ledger_url) == []
