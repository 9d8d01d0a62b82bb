"""The ledger's PostgreSQL side against a real server: migrations, the idempotent insert."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import LedgerUnavailable
from gateway.ledger import db, queries
from gateway.ledger.schema import MIGRATIONS
from gateway.store.ledger import LedgerEntry
from tests.conftest import free_port


def entry(n: int, key: str = "k1", cost: int = 100, account: str = "a1") -> LedgerEntry:
    return LedgerEntry(f"1700000000{n:03d}-0", f"req-{n}", account, key, "/v1/chat/completions",
                       "tiny\x00model", 10, 2, 5, cost, 200, 1_700_000_000_000_000 + n,
                       1_700_000_000_500_000 + n)


async def test_migrate_applies_each_version_once(postgres_url: str) -> None:
    async with db.connection(postgres_url) as conn:
        assert await db.schema_version(conn) == 0
        assert await db.migrate(conn) == [m.version for m in MIGRATIONS]
        assert await db.migrate(conn) == []
        assert await db.schema_version(conn) == MIGRATIONS[-1].version


async def test_concurrent_migrations_apply_once(postgres_url: str) -> None:
    async def one() -> list[int]:
        async with db.connection(postgres_url) as conn:
            return await db.migrate(conn)

    results = await asyncio.gather(*(one() for _ in range(4)))
    assert sorted(v for r in results for v in r) == [m.version for m in MIGRATIONS]


async def test_insert_is_idempotent_per_request(postgres_url: str) -> None:
    async with db.connection(postgres_url) as conn:
        await db.migrate(conn)
        assert await db.insert(conn, [entry(1), entry(2)]) == 2
        # A batch replayed after a crash between commit and acknowledgement: nothing twice.
        assert await db.insert(conn, [entry(1), entry(2), entry(3)]) == 1
        assert await queries.row_count(conn) == 3
        sums = await queries.key_sums(conn, "a1", None)
        assert sums == {"k1": (3, 300)}
        assert await queries.key_sums(conn, "a1", (1700000000002, 0)) == {"k1": (2, 200)}
        cur = await conn.execute("SELECT model, settled_at, admitted_at FROM ledger_entries "
                                 "WHERE request_id = 'req-1'")
        model, settled, admitted = (await cur.fetchall())[0]
        assert model == "tiny\ufffdmodel"  # NUL is not text to PostgreSQL
        assert settled.timestamp() == pytest.approx(1_700_000_000.500001)
        assert (settled - admitted).total_seconds() == 0.5
        assert await queries.stored(conn, ["req-1", "req-9"]) == {"req-1"}


async def test_an_unreachable_server_is_ledger_unavailable_without_the_password() -> None:
    url = f"postgresql://gw:s3cret-pass@127.0.0.1:{free_port()}/ledger"
    with pytest.raises(LedgerUnavailable) as caught:
        async with db.connection(url):
            pass
    assert "s3cret-pass" not in str(caught.value)
    assert str(caught.value).startswith("PostgreSQL:")
