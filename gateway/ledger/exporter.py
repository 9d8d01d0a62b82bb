"""`gateway ledger export`: every account's stream into PostgreSQL, each entry exactly once.

Delivery is at least once and the insert idempotent: entries are read through the consumer
group, inserted in one transaction (ON CONFLICT (request_id) DO NOTHING), and acknowledged
(which deletes them from Redis) only after the commit. A crash between commit and
acknowledgement delivers the batch again and inserts nothing twice; a failed insert keeps
the batch in memory and retries it with backoff, reading nothing more meanwhile, so memory
stays one batch. A restarted exporter first reads what it had been given and not
acknowledged; entries an exporter of another name left pending are claimed after
`claim_idle_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psycopg

from gateway.errors import LedgerUnavailable, StoreUnavailable
from gateway.ledger import db
from gateway.ledger.metrics import ExporterMetrics
from gateway.store.ledger import LedgerEntry, LedgerStreams, stream_order

log = logging.getLogger("gateway.ledger")

BATCH_ROWS = 1000  # most rows one transaction inserts
READ_COUNT = 500  # most entries read from one stream at a time
CONCURRENT_READS = 64  # streams read at once (one multiplexed connection)
INSERT_TIMEOUT_SECONDS = 60.0  # one batch's connect, insert and commit
MAX_BATCHES_PER_PASS = 50  # then the lag is measured, even under unending traffic


@dataclass
class ExportTotals:
    exported: int = 0  # rows new to PostgreSQL
    duplicates: int = 0  # delivered again, already stored
    batches: int = 0


@dataclass
class _Batch:
    entries: list[LedgerEntry] = field(default_factory=list)
    by_account: dict[str, list[str]] = field(default_factory=dict)

    def add(self, account_id: str, entries: Sequence[LedgerEntry]) -> None:
        self.entries.extend(entries)
        self.by_account.setdefault(account_id, []).extend(e.stream_id for e in entries)


class Exporter:
    def __init__(self, streams: LedgerStreams, postgres_url: str,
                 metrics: ExporterMetrics | None = None, stream_cap: int = 0,
                 claim_idle_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.streams = streams
        self.url = postgres_url
        self.metrics = metrics or ExporterMetrics()
        self.stream_cap = stream_cap
        self.claim_idle_ms = int(claim_idle_seconds * 1000)
        self.clock = clock
        self.totals = ExportTotals()
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._resumed: set[str] = set()  # accounts whose own pending entries were re-read
        self._unsaved: _Batch | None = None  # read, not yet committed
        self._unacked: _Batch | None = None  # committed, not yet acknowledged
        self._last_claim = clock()

    # -- one pass ---------------------------------------------------------------------

    async def export_pending(self) -> int:
        """Exports until the streams hold nothing more to read; returns the rows new to
        PostgreSQL. Raises LedgerUnavailable / StoreUnavailable (the batch is kept)."""
        before = self.totals.exported
        await self._finish()
        accounts = await self.streams.accounts()
        self.metrics.accounts.set(len(accounts))
        # Now and then, each stream is also asked for entries another consumer left.
        to_claim = set(accounts) if self.clock() - self._last_claim >= self.claim_idle_ms / 1000 \
            else set()
        if to_claim:
            self._last_claim = self.clock()
        queue = accounts
        for _ in range(MAX_BATCHES_PER_PASS):
            if not queue:
                break
            batch, rest = await self._read(queue, to_claim)
            if batch.entries:
                self._unsaved = batch
                await self._finish()
            # A stream that gave entries may hold more: it is read again, after the streams
            # not read yet (a full batch stopped), so none waits behind a busy one.
            queue = rest + list(batch.by_account)
        return self.totals.exported - before

    async def _read(self, accounts: Sequence[str], to_claim: set[str]
                    ) -> tuple[_Batch, list[str]]:
        """Reads streams until a batch is full; returns it and the accounts not read."""
        batch = _Batch()
        for start in range(0, len(accounts), CONCURRENT_READS):
            chunk = accounts[start:start + CONCURRENT_READS]
            results = await asyncio.gather(*(self._read_one(a, a in to_claim) for a in chunk))
            to_claim.difference_update(chunk)
            for account_id, entries in zip(chunk, results, strict=True):
                if entries:
                    batch.add(account_id, entries)
            if len(batch.entries) >= BATCH_ROWS:
                return batch, list(accounts[start + CONCURRENT_READS:])
        return batch, []

    async def _read_one(self, account_id: str, claim: bool) -> list[LedgerEntry]:
        try:
            if account_id not in self._resumed:
                mine = await self.streams.read(account_id, READ_COUNT, "0")
                self._resumed.add(account_id)
                if mine:
                    return mine
            if claim:
                claimed = await self.streams.read(account_id, READ_COUNT, "claim",
                                                  self.claim_idle_ms)
                if claimed:
                    return claimed
            return await self.streams.read(account_id, READ_COUNT, ">")
        except StoreUnavailable:
            self.metrics.errors.labels("redis").inc()
            raise

    async def _finish(self) -> None:
        """Commits the batch read, then acknowledges it; either step is retried from where
        it failed by the next call."""
        if self._unsaved is not None:
            batch = self._unsaved
            started = time.perf_counter()
            new = await self._insert(batch.entries)
            self._unsaved, self._unacked = None, batch
            self.totals.exported += new
            self.totals.duplicates += len(batch.entries) - new
            self.totals.batches += 1
            self.metrics.exported.inc(new)
            self.metrics.duplicates.inc(len(batch.entries) - new)
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
        if self._unacked is not None:
            batch = self._unacked
            try:
                await asyncio.gather(*(self.streams.ack(a, ids)
                                       for a, ids in batch.by_account.items()))
            except StoreUnavailable:
                self.metrics.errors.labels("redis").inc()
                raise
            self._unacked = None

    async def _insert(self, entries: Sequence[LedgerEntry]) -> int:
        # A server that stops answering (frozen, a dead peer behind a NAT) would hold the
        # batch for ever, and the lag gauges with it: past the deadline its socket is closed
        # under it (cancelling alone would wait for a rollback that never comes) and the
        # batch is retried on a new connection.
        task = asyncio.ensure_future(self._insert_now(entries))
        done, _ = await asyncio.wait({task}, timeout=INSERT_TIMEOUT_SECONDS)
        if not done:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.pgconn.finish()
            task.cancel()
            await asyncio.wait({task}, timeout=5)
            self.metrics.errors.labels("postgres").inc()
            raise LedgerUnavailable(f"PostgreSQL: no answer within {INSERT_TIMEOUT_SECONDS:g} s "
                                    "to the batch insert")
        try:
            return task.result()
        except psycopg.Error as exc:
            self.metrics.errors.labels("postgres").inc()
            await self._drop_connection()
            raise db.unavailable(exc, self.url) from None

    async def _insert_now(self, entries: Sequence[LedgerEntry]) -> int:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.url, connect_timeout=db.CONNECT_TIMEOUT_SECONDS)
        return await db.insert(self._conn, entries)

    async def close(self) -> None:
        await self._drop_connection()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
                await asyncio.wait_for(conn.close(), 5)

    # -- lag ----------------------------------------------------------------------------

    async def observe_lag(self) -> int:
        """The lag gauges, from every account's stream (one script each); returns the
        entries not yet stored."""
        accounts = await self.streams.accounts()
        length = dropped = 0
        oldest_ms = fullest = 0.0
        for start in range(0, len(accounts), CONCURRENT_READS):
            chunk = accounts[start:start + CONCURRENT_READS]
            for state in await asyncio.gather(*(self.streams.state(a) for a in chunk)):
                length += state.length
                dropped += state.dropped
                if state.oldest_id:
                    oldest_ms = max(oldest_ms, state.now_ms - stream_order(state.oldest_id)[0])
                if self.stream_cap:
                    fullest = max(fullest, state.length / self.stream_cap)
        self.metrics.lag_entries.set(length)
        self.metrics.oldest_unexported.set(max(oldest_ms, 0) / 1000)
        self.metrics.fill_ratio.set(fullest)
        self.metrics.dropped.set(dropped)
        self.metrics.accounts.set(len(accounts))
        return length

    # -- the long-running process -------------------------------------------------------

    async def run(self, stop: asyncio.Event, interval: float = 0.5,
                  lag_interval: float = 5.0, max_backoff: float = 30.0) -> None:
        """Exports until `stop` is set; a failing side is retried with backoff (logged once
        per outage), never given up on."""
        backoff = interval
        failing: str | None = None
        next_export = next_lag = self.clock()
        while not stop.is_set():
            if self.clock() >= next_export:
                try:
                    await self.export_pending()
                    if failing is not None:
                        log.warning("ledger export resumed after %s failed", failing)
                    failing, backoff = None, interval
                except (LedgerUnavailable, StoreUnavailable) as exc:
                    side = "PostgreSQL" if isinstance(exc, LedgerUnavailable) else "Redis"
                    if failing != side:
                        log.error("ledger export paused: %s failed (%s); retrying (entries "
                                  "wait in Redis, up to the stream cap)", side, exc)
                    failing, backoff = side, min(backoff * 2, max_backoff)
                next_export = self.clock() + backoff
            # The lag is measured on its own clock, backing off or not: while PostgreSQL is
            # away is when it grows, and when its alert must see it.
            if self.clock() >= next_lag:
                with contextlib.suppress(StoreUnavailable):
                    await self.observe_lag()
                next_lag = self.clock() + lag_interval
            await _wait(stop, max(0.0, min(next_export, next_lag) - self.clock()))
        await self._drop_connection()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)

