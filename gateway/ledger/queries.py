"""What is read back from the ledger: spend by key, model or day; invoice lines; the sums
reconcile compares with Redis. Money stays integer micro-USD here (USD at the edges)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import psycopg

Connection = psycopg.AsyncConnection[tuple[object, ...]]
GROUPS = ("key", "model", "day")

# The grouping column per group_by value: fixed strings, never client text.
_GROUP_SQL = {
    "key": "key_id",
    "model": "model",
    "day": "to_char(settled_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
}


@dataclass(frozen=True, slots=True)
class SpendLine:
    group: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micro: int


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    key_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micro: int


def _int(value: object) -> int:
    # count() is a bigint, sum() of bigints a numeric (Decimal): both are exact.
    assert isinstance(value, int | Decimal), value
    return int(value)


async def spend(conn: Connection, account_id: str, start: datetime, end: datetime,
                group_by: str) -> list[SpendLine]:
    """The account's spend settled in [start, end), one line per group, in group order."""
    column = _GROUP_SQL[group_by]
    query = (f"SELECT {column} AS g, count(*), coalesce(sum(prompt_tokens), 0), "
             "coalesce(sum(completion_tokens), 0), coalesce(sum(cost_micro), 0) "
             "FROM ledger_entries WHERE account_id = %s AND settled_at >= %s "
             "AND settled_at < %s GROUP BY g ORDER BY g")
    cur = await conn.execute(query.encode(), (account_id, start, end))
    return [SpendLine(str(g), _int(n), _int(p), _int(c), _int(cost))
            for g, n, p, c, cost in await cur.fetchall()]


async def invoice_lines(conn: Connection, account_id: str, start: datetime,
                        end: datetime) -> list[InvoiceLine]:
    """Line items per key and model for requests settled in [start, end)."""
    cur = await conn.execute(
        "SELECT key_id, model, count(*), sum(prompt_tokens), sum(completion_tokens), "
        "sum(cost_micro) FROM ledger_entries WHERE account_id = %s AND settled_at >= %s "
        "AND settled_at < %s GROUP BY key_id, model ORDER BY key_id, model",
        (account_id, start, end))
    return [InvoiceLine(str(k), str(m), _int(n), _int(p), _int(c), _int(cost))
            for k, m, n, p, c, cost in await cur.fetchall()]


async def key_sums(conn: Connection, account_id: str,
                   upto: tuple[int, int] | None) -> dict[str, tuple[int, int]]:
    """key id -> (rows, Σ cost) of the account's entries appended up to the stream id
    `upto` (ms, seq) inclusive; None: all of them."""
    if upto is None:
        cur = await conn.execute(
            "SELECT key_id, count(*), sum(cost_micro) FROM ledger_entries "
            "WHERE account_id = %s GROUP BY key_id", (account_id,))
    else:
        cur = await conn.execute(
            "SELECT key_id, count(*), sum(cost_micro) FROM ledger_entries "
            "WHERE account_id = %s AND (stream_ms, stream_seq) <= (%s, %s) GROUP BY key_id",
            (account_id, *upto))
    return {str(k): (_int(n), _int(cost)) for k, n, cost in await cur.fetchall()}


async def stored(conn: Connection, request_ids: Sequence[str]) -> set[str]:
    """Those of `request_ids` the ledger holds."""
    if not request_ids:
        return set()
    cur = await conn.execute(
        "SELECT request_id FROM ledger_entries WHERE request_id = ANY(%s)",
        (list(request_ids),))
    return {str(r[0]) for r in await cur.fetchall()}


async def accounts_in_ledger(conn: Connection) -> list[str]:
    cur = await conn.execute("SELECT DISTINCT account_id FROM ledger_entries ORDER BY 1")
    return [str(r[0]) for r in await cur.fetchall()]


async def row_count(conn: Connection, account_id: str | None = None) -> int:
    if account_id is None:
        cur = await conn.execute("SELECT count(*) FROM ledger_entries")
    else:
        cur = await conn.execute("SELECT count(*) FROM ledger_entries WHERE account_id = %s",
                                 (account_id,))
    row = await cur.fetchone()
    return _int(row[0]) if row else 0
