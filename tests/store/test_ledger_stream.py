"""settle.lua's ledger entries and the exporter's reads, on a real Redis, a Redis Cluster
and the embedded store."""

from __future__ import annotations

import pytest

from gateway.config.settings import Settings
from gateway.core.keys import hash_secret
from gateway.store import Ask, KeyRef, Names, SpendDetail, Store
from gateway.store.ledger import LedgerStreams
from tests.conftest import PLAN_LIMITS, new_key
from tests.redis_inspect import redis_of


@pytest.fixture(params=["redis", "cluster", "embedded"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def admitted(store: Store, secret: str, request_id: str) -> KeyRef:
    ref = await store.lookup(hash_secret(secret))
    assert ref is not None
    decision = await store.admit(ref, hash_secret(secret), request_id, Ask.flat(10, 5),
                                 PLAN_LIMITS)
    assert decision.code == 0
    return ref


async def test_one_entry_per_settlement_with_every_field(store: Store) -> None:
    store.ledger_cap = 100
    secret, key_id, account_id = await new_key(store, Settings())
    ref = await admitted(store, secret, "req-1")
    detail = SpendDetail("/v1/chat/completions", "tiny-llama", 3, 200)
    assert await store.settle(ref, "req-1", 7, 4, 1234, detail=detail) is True
    # A replay (the retry queue after a lost reply) finds no reservation: nothing appended.
    assert await store.settle(ref, "req-1", 7, 4, 1234, detail=detail) is False
    tail = await LedgerStreams(store).tail(account_id)
    assert len(tail) == 1
    entry = tail[0]
    assert (entry.request_id, entry.key_id, entry.account_id, entry.route, entry.model) == (
        "req-1", key_id, account_id, "/v1/chat/completions", "tiny-llama")
    assert (entry.prompt_tokens, entry.cached_tokens, entry.completion_tokens,
            entry.cost_micro, entry.status) == (7, 3, 4, 1234, 200)
    assert entry.admitted_us is not None
    assert entry.admitted_us <= entry.settled_us
    assert abs(entry.settled_us // 1000 - int(entry.stream_id.split("-")[0])) <= 1
    await store.close()


async def test_no_ledger_no_entry_and_releases_append_nothing(store: Store) -> None:
    secret, _, account_id = await new_key(store, Settings())
    ref = await admitted(store, secret, "req-1")
    assert await store.settle(ref, "req-1", 7, 4, 1234) is True  # ledger_cap 0: off
    store.ledger_cap = 100
    ref = await admitted(store, secret, "req-2")
    assert await store.settle(ref, "req-2", 0, 0, 0, count_usage=False) is True
    assert await LedgerStreams(store).tail(account_id) == []


async def test_the_cap_drops_the_oldest_and_counts_them(store: Store) -> None:
    store.ledger_cap = 3
    secret, _, account_id = await new_key(store, Settings(), rpm=1000, tpm=10_000_000)
    for n in range(5):
        ref = await admitted(store, secret, f"req-{n}")
        await store.settle(ref, f"req-{n}", 1, 1, 100 + n)
    streams = LedgerStreams(store)
    assert [e.request_id for e in await streams.tail(account_id)] == ["req-2", "req-3",
                                                                      "req-4"]
    state = await streams.state(account_id)
    assert (state.length, state.dropped, state.dropped_micro) == (3, 2, 100 + 101)
    assert state.account_total == sum(100 + n for n in range(5))
    assert state.account_base == 0  # the ledger was on from the first settlement


async def test_ledger_base_is_the_spend_before_the_ledger(store: Store) -> None:
    secret, key_id, account_id = await new_key(store, Settings())
    ref = await admitted(store, secret, "before")
    await store.settle(ref, "before", 1, 1, 500)
    store.ledger_cap = 10
    for rid in ("after-1", "after-2"):
        ref = await admitted(store, secret, rid)
        await store.settle(ref, rid, 1, 1, 70)
    state = await LedgerStreams(store).state(account_id, [key_id])
    assert (state.account_total, state.account_base) == (640, 500)
    assert state.key_totals == {key_id: (640, 500)}


@pytest.mark.parametrize("store_kind", ["redis", "cluster"])
async def test_read_ack_deletes_and_a_crash_rereads_the_pending(store: Store) -> None:
    store.ledger_cap = 100
    secret, _, account_id = await new_key(store, Settings(), rpm=1000, tpm=10_000_000)
    for n in range(4):
        ref = await admitted(store, secret, f"req-{n}")
        await store.settle(ref, f"req-{n}", 1, 1, 10)
    first = LedgerStreams(store)
    batch = await first.read(account_id, 3)
    assert [e.request_id for e in batch] == ["req-0", "req-1", "req-2"]
    # The exporter died before acknowledging: a new one of the same name gets them again,
    assert [e.request_id for e in await LedgerStreams(store).read(account_id, 10, "0")] == [
        "req-0", "req-1", "req-2"]
    # one of another name claims them once they have waited,
    other = LedgerStreams(store, consumer="other")
    assert await other.read(account_id, 10, "claim", claim_idle_ms=60_000) == []
    claimed = await other.read(account_id, 10, "claim", claim_idle_ms=0)
    assert [e.request_id for e in claimed] == ["req-0", "req-1", "req-2"]
    assert await other.ack(account_id, [e.stream_id for e in claimed]) == 3
    # and only the entry never read is left, in the stream and for the group.
    assert [e.request_id for e in await first.tail(account_id)] == ["req-3"]
    assert [e.request_id for e in await first.read(account_id, 10)] == ["req-3"]
    raw = redis_of(store)
    key = Names.ledger(account_id)
    pending = await raw.xpending(key, Names.LEDGER_GROUP)
    assert pending["pending"] == 1
    await store.close()
