"""Settlements that survive a Redis blip: a bounded in-process retry queue with backoff.

settle.lua deletes the request's reservation, so replaying a settlement whose first attempt
timed out after it had applied is a no-op. When the queue overflows, or its drain deadline
passes at shutdown, or the process dies, the admission-time debit of the estimate stands:
the operator is never under-billed. Those fallbacks are counted as
gateway_settlements_total{outcome="failed"} and logged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.errors import StoreCommandError, StoreUnavailable
from gateway.obs.metrics import OTHER_MODEL, Metrics
from gateway.store import KeyRef, SpendDetail, Store
from gateway.store.records import NO_DETAIL

log = logging.getLogger("gateway.settlement")

CAPACITY = 10_000
FIRST_DELAY_SECONDS = 0.05
MAX_DELAY_SECONDS = 2.0
DRAIN_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Settlement:
    ref: KeyRef
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    cost: int
    plan: str  # metric label only
    count_usage: bool = True
    model: str = ""  # metric label only: a model [pricing.models] names, or "other"
    detail: SpendDetail = NO_DETAIL  # what the ledger entry records besides the numbers


def release(ref: KeyRef, request_id: str) -> Settlement:
    """Settles at zero an admission that may have applied although its reply was lost."""
    return Settlement(ref, request_id, 0, 0, 0, "", count_usage=False)


class SettlementQueue:
    def __init__(self, store: Store, metrics: Metrics, capacity: int = CAPACITY,
                 first_delay: float = FIRST_DELAY_SECONDS,
                 max_delay: float = MAX_DELAY_SECONDS) -> None:
        self.store = store
        self.metrics = metrics
        self.capacity = capacity
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._pending: collections.deque[Settlement] = collections.deque()
        self._queued_at: collections.deque[float] = collections.deque()  # one per _pending
        self._worker: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._draining = False
        self._overflowing = False
        self._inflight: set[asyncio.Future[Any]] = set()

    def __len__(self) -> int:
        return len(self._pending)

    def begin(self, item: Settlement) -> Awaitable[None] | None:
        """Queues the settlement on the hot connection, when there is one, before this
        returns: it is written when the caller next yields to the loop (so anything the
        caller writes after that reaches Redis after it), and cancelling the caller cannot
        stop it. Returns the wait for Redis's answer (or the hand-over to the retry queue),
        which must be awaited and raises nothing but CancelledError; if that wait is
        cancelled the settlement is replayed (a no-op if it had applied). None when there
        is no hot connection: use settle_shielded()."""
        if not item.count_usage:
            return None
        reply = self.store.settle_started(item.ref, item.request_id, item.prompt_tokens,
                                          item.completion_tokens, item.cost, item.detail)
        if reply is None:
            return None
        self._track(reply)
        return self._answer(item, reply, time.perf_counter())

    async def settle_before(self, item: Settlement,
                            last: Callable[[], Awaitable[None]]) -> None:
        """Settles, and calls `last` (the send that lets the client see the end of the
        answer) once the settlement is on its way: read-your-writes without waiting a round
        trip. One turn of the loop writes the settlement (with the others queued in this
        turn: one system call for all) before the client can see the end, so its next
        question to any replica reaches Redis after the spend; Redis's answer is awaited
        after. Without a hot connection the spend lands first."""
        answer = self.begin(item)
        if answer is None:
            await self.settle_detached(item)
            await last()
            return
        try:
            await asyncio.sleep(0)
            await last()
        finally:
            await answer

    async def settle_shielded(self, item: Settlement) -> None:
        """Settles now, such that cancelling the caller (a client disconnect, a shutdown
        deadline) cannot stop the settlement half-way; returns once Redis has answered or
        the settlement is queued for retry."""
        answer = self.begin(item)
        if answer is not None:
            await answer
        else:
            await self.settle_detached(item)

    async def settle_detached(self, item: Settlement) -> None:
        """settle() in a task of its own, which cancelling the caller does not cancel: for
        when begin() cannot be used (no hot connection)."""
        task = asyncio.ensure_future(self.settle(item))
        self._track(task)
        await asyncio.shield(task)

    def _track(self, pending: asyncio.Future[Any]) -> None:
        self._inflight.add(pending)
        pending.add_done_callback(self._inflight.discard)

    async def _answer(self, item: Settlement, reply: asyncio.Future[Any],
                      started: float) -> None:
        try:
            with contextlib.suppress(Exception):  # read below, as the store's errors
                await reply
            try:
                applied = Store.settled(reply)
                self.metrics.settlement_seconds.observe(time.perf_counter() - started)
            except StoreUnavailable as exc:
                if "NOSCRIPT" not in str(exc):
                    raise
                await self.settle(item)  # loads the script (after a flush or a failover)
                return
        except StoreUnavailable as exc:
            self._failed(item, exc)
            return
        except asyncio.CancelledError:
            self.submit(item)  # Redis may have run it: a replay is then a no-op
            raise
        self._record(item, "settled", applied)

    async def settle(self, item: Settlement) -> None:
        """Settles now; on a store failure the settlement is queued for retry."""
        try:
            applied = await self._write(item)
        except StoreUnavailable as exc:
            self._failed(item, exc)
            return
        self._record(item, "settled", applied)

    def _failed(self, item: Settlement, exc: StoreUnavailable) -> None:
        if isinstance(exc, StoreCommandError):
            self._give_up(item, exc)
            return
        self.metrics.child(self.metrics.store_errors, "settle").inc()
        self.submit(item)

    async def _write(self, item: Settlement) -> bool:
        started = time.perf_counter()
        applied = await self.store.settle(item.ref, item.request_id, item.prompt_tokens,
                                          item.completion_tokens, item.cost, item.count_usage,
                                          item.detail)
        self.metrics.settlement_seconds.observe(time.perf_counter() - started)
        return applied

    def _give_up(self, item: Settlement, exc: StoreCommandError) -> None:
        # Redis refused the command itself: retrying cannot help, and must not block the
        # settlements queued behind it. The admission-time estimate stands.
        self.metrics.child(self.metrics.store_errors, "settle").inc()
        self.metrics.child(self.metrics.settlements, "failed").inc()
        log.error("settlement refused by Redis (%s); the admission-time estimate stands", exc)

    def submit(self, item: Settlement) -> None:
        if len(self._pending) >= self.capacity:
            self.metrics.child(self.metrics.settlements, "failed").inc()
            if not self._overflowing:  # once per overflow, not once per request
                self._overflowing = True
                log.error("the settlement retry queue is full (%d): further settlements fall "
                          "back to the admission-time estimate until it drains", self.capacity)
            return
        self._overflowing = False
        self._pending.append(item)
        self._queued_at.append(time.perf_counter())
        self.metrics.settlements_pending.set(len(self._pending))
        if self._wake is not None:
            self._wake.set()  # a new item may mean Redis is back: retry without waiting
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        self._wake = asyncio.Event()
        delay = self.first_delay
        while self._pending:
            item = self._pending[0]
            self._show_lag()
            try:
                applied = await self._write(item)
            except StoreCommandError as exc:
                self._pop()
                self._give_up(item, exc)
                continue
            except StoreUnavailable:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                delay = self.first_delay if self._draining else min(delay * 2, self.max_delay)
                continue
            self._pop()
            self._record(item, "retried", applied)
            delay = self.first_delay
        self._show_lag()

    def _pop(self) -> None:
        self._pending.popleft()
        self._queued_at.popleft()
        self.metrics.settlements_pending.set(len(self._pending))

    def _show_lag(self) -> None:
        """The settlement lag gauge: how long the oldest queued settlement has waited (0 with
        none), set at each attempt of the retry loop (about every max_delay at most)."""
        oldest = self._queued_at[0] if self._queued_at else None
        self.metrics.settlement_lag.set(0 if oldest is None else time.perf_counter() - oldest)

    def _record(self, item: Settlement, outcome: str, applied: bool) -> None:
        metrics = self.metrics
        metrics.child(metrics.settlements, outcome).inc()
        if not applied:
            return  # settled before (a retry after a lost reply) or expired: nothing new
        plan = item.plan or "credits"
        model = item.model or OTHER_MODEL
        if item.prompt_tokens:
            metrics.child(metrics.tokens, "prompt", plan, model).inc(item.prompt_tokens)
        if item.completion_tokens:
            metrics.child(metrics.tokens, "completion", plan, model).inc(
                item.completion_tokens)
        if item.cost:
            metrics.child(metrics.spend, plan, model).inc(item.cost / 1_000_000)

    async def drain(self, deadline_seconds: float = DRAIN_SECONDS) -> None:
        """Waits for settlements in flight, then flushes the queue at shutdown; what is
        left at the deadline falls back."""
        self._draining = True
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=deadline_seconds)
        worker = self._worker
        if worker is not None and not worker.done():
            if self._wake is not None:
                self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker), deadline_seconds)
            if not worker.done():
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker
        if self._pending:
            self.metrics.child(self.metrics.settlements, "failed").inc(len(self._pending))
            log.error("shutdown: %d settlement(s) could not be written in %.1f s and fall back "
                      "to the admission-time estimate", len(self._pending), deadline_seconds)
            self._pending.clear()
            self._queued_at.clear()
            self.metrics.settlements_pending.set(0)
            self.metrics.settlement_lag.set(0)
