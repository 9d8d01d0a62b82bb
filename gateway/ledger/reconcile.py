"""`gateway ledger reconcile`: the ledger against Redis's lifetime counters, per key and per
account. A difference is never explained away: each is printed and the command fails.

For each account, one script reads the lifetime counters (`total_spent` minus
`ledger_base`, the spend from before the ledger) with the stream's last id, at one instant.
The ledger's side is PostgreSQL's rows up to that id plus the entries still in the stream
(those not yet stored). An entry both stored and still in the stream (committed, not yet
acknowledged) counts once; an entry appended after the snapshot is in neither side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

from gateway.ledger import queries
from gateway.store.ledger import LedgerEntry, LedgerState, LedgerStreams, stream_order

TAIL_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Side:
    """One key's or account's figures (micro-USD)."""

    scope: str  # "account" or "key"
    account_id: str
    key_id: str | None
    redis_micro: int  # lifetime spend since the ledger began, per Redis
    ledger_micro: int  # Σ stored rows + Σ entries waiting in the stream
    stored_rows: int
    waiting_rows: int
    note: str = ""

    @property
    def differs(self) -> bool:
        return self.redis_micro != self.ledger_micro


@dataclass(frozen=True, slots=True)
class AccountReport:
    account_id: str
    sides: list[Side]

    @property
    def differences(self) -> list[Side]:
        return [s for s in self.sides if s.differs]


async def _waiting(streams: LedgerStreams, account_id: str, last_id: str) -> list[LedgerEntry]:
    """The stream's entries up to `last_id`: those the exporter has not stored yet."""
    if not last_id:
        return []
    found: list[LedgerEntry] = []
    after = "-"
    while True:
        page = await streams.tail(account_id, after, last_id, TAIL_PAGE)
        found.extend(page)
        if len(page) < TAIL_PAGE:
            return found
        after = "(" + page[-1].stream_id


def _since_ledger(total: int, base: int | None) -> int:
    # No base: no entry was ever appended, so all of the total predates the ledger.
    return total - (total if base is None else base)


async def reconcile_account(streams: LedgerStreams, conn: queries.Connection,
                            account_id: str) -> AccountReport:
    key_ids = await streams.key_ids(account_id)
    state: LedgerState = await streams.state(account_id, key_ids)
    waiting = await _waiting(streams, account_id, state.last_id)
    # No stream at all (never, or Redis lost it): every stored row counts, so a loss shows.
    upto = stream_order(state.last_id) if state.last_id else None
    # Both reads from one snapshot (REPEATABLE READ, see reconcile()): an entry the exporter
    # commits between them would otherwise count as waiting and as stored.
    async with conn.transaction():
        already = await queries.stored(conn, [e.request_id for e in waiting])
        stored = await queries.key_sums(conn, account_id, upto)
    waiting = [e for e in waiting if e.request_id not in already]

    waiting_by_key: dict[str, tuple[int, int]] = {}
    for entry in waiting:
        rows, cost = waiting_by_key.get(entry.key_id, (0, 0))
        waiting_by_key[entry.key_id] = rows + 1, cost + entry.cost_micro

    sides: list[Side] = []
    for key_id in sorted(set(key_ids) | set(stored) | set(waiting_by_key)):
        total, base = state.key_totals.get(key_id, (0, 0))
        rows, cost = stored.get(key_id, (0, 0))
        w_rows, w_cost = waiting_by_key.get(key_id, (0, 0))
        note = "" if key_id in state.key_totals else "no such key in Redis"
        sides.append(Side("key", account_id, key_id, _since_ledger(total, base), cost + w_cost,
                          rows, w_rows, note))
    note = ""
    if state.dropped:
        note = (f"{state.dropped} entries worth {state.dropped_micro} micro-USD were dropped "
                f"at the stream cap while the exporter was away")
    sides.insert(0, Side(
        "account", account_id, None, _since_ledger(state.account_total, state.account_base),
        sum(s.ledger_micro for s in sides), sum(s.stored_rows for s in sides),
        sum(s.waiting_rows for s in sides), note))
    return AccountReport(account_id, sides)


async def reconcile(streams: LedgerStreams, conn: queries.Connection,
                    account_ids: Sequence[str] | None = None) -> list[AccountReport]:
    """Every account Redis knows (and any only the ledger knows), or the ones named."""
    # Each account's PostgreSQL reads are one transaction of their own, begun after its
    # Redis snapshot: none may sit in an implicit transaction begun earlier.
    await conn.commit()
    await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
    if account_ids is None:
        async with conn.transaction():
            in_ledger = await queries.accounts_in_ledger(conn)
        account_ids = sorted(set(await streams.accounts()) | set(in_ledger))
    return [await reconcile_account(streams, conn, a) for a in account_ids]
