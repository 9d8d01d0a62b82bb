"""Short queueing instead of a 429 (issue 16, item 6; README "Short queueing").

A request on a plan with `max_queue_wait` that admission refuses for RPM, TPM or a
concurrency slot, when the wait Redis computed is within that, waits here and then asks
admission again; Redis stays the only judge, so queueing never lets more through than the
limits allow, on one replica or many. Within a process a key's waiters take turns in arrival
order, and each newcomer adds to its wait the room the ones ahead of it will take, so one
whose turn would come too late is refused at once rather than after waiting in vain.

Nothing here runs on the hot path: the middleware calls it only for a refusal on a plan that
opted in (one dict lookup on a refusal, none on an admission).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace

from gateway.config.plans import Plan
from gateway.errors import StoreAmbiguous, StoreUnavailable
from gateway.http.settlement import SettlementQueue, release
from gateway.obs.metrics import Metrics
from gateway.store import Ask, Decision, KeyRef, Store
from gateway.store.codes import AdmitCode
from gateway.types import Message, Receive

ADMITTED = int(AdmitCode.ADMITTED)
RPM_EXHAUSTED, TPM_EXHAUSTED = int(AdmitCode.RPM_EXHAUSTED), int(AdmitCode.TPM_EXHAUSTED)
# A slot's refusal carries a retry that is a hint (1 s), not a wait: see _retry_seconds.
CONCURRENCY_LIMIT = int(AdmitCode.CONCURRENCY_LIMIT)
# Budget (6) and credits (7) refusals are never queued: their room comes back with a period
# or a payment, not within seconds.
QUEUED_CODES = frozenset({RPM_EXHAUSTED, TPM_EXHAUSTED, CONCURRENCY_LIMIT})
OUTCOMES = ("admitted", "refused", "cancelled")
MAX_QUEUED = 1000  # requests waiting at once in one process; beyond, refused as today
POLL_SECONDS = 0.05  # how often the head of a key's line asks again for a free slot
# asyncio may wake a sleeper up to its clock's resolution early; asking admission a
# millisecond late beats asking too early and paying a second round trip.
_LATE = 0.001
_WINDOW = 60.0  # the token buckets refill in one minute (lua/admit.lua WINDOW)

AdmitAgain = Callable[[], Awaitable[Decision]]


def readmission(store: Store, settlements: SettlementQueue, ref: KeyRef, secret_hash: str,
                reservation_id: str, ask: Ask, args: tuple[str | int, ...]) -> AdmitAgain:
    """Admission asked again for a waiting request, with the same reservation id (only one
    of its admissions can succeed: the request stops waiting then)."""

    async def again() -> Decision:
        try:
            return await store.admit(ref, secret_hash, reservation_id, ask, args)
        except StoreAmbiguous:
            settlements.submit(release(ref, reservation_id))  # undo a debit whose reply was lost
            raise

    return again


class _Line:
    """One key's waiting requests in this process; gone when the last one leaves."""

    __slots__ = ("backlog", "members", "turn")

    def __init__(self) -> None:
        # FIFO: CPython's asyncio.Lock wakes its waiters in order and lets no newcomer take
        # it while any waits, so a later request never overtakes an earlier one.
        self.turn = asyncio.Lock()
        self.members = 0
        # Seconds of bucket room the members will take once admitted: Redis has not counted
        # them yet, so a newcomer's own retry_after is short by this much.
        self.backlog = 0.0


class _Watch:
    """The client's channel while its request waits. The body has been read, so the next
    message is normally the disconnect; any other is kept for whoever reads next, in order,
    and the read still in flight is handed over rather than cancelled (a cancelled receive()
    could drop a message on some servers)."""

    __slots__ = ("_kept", "_read", "_receive")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._read: asyncio.Future[Message] | None = None
        self._kept: list[Message] = []

    def reading(self) -> asyncio.Future[Message]:
        if self._read is None:
            self._read = asyncio.ensure_future(self._receive())
        return self._read

    def gone(self) -> bool:
        """After the read completed: True for a disconnect (or a broken channel); another
        message is kept and the next read starts on the next call to reading()."""
        read, self._read = self._read, None
        assert read is not None and read.done()
        if read.cancelled() or read.exception() is not None:
            return True
        message = read.result()
        if message["type"] == "http.disconnect":
            self._kept.append(message)  # the exchange sees it too, should it ever read
            return True
        self._kept.append(message)
        return False

    def receive(self) -> Receive:
        """The client's channel for the rest of the request: what was kept, then the read
        in flight, then the client's own receive."""
        if self._read is None and not self._kept:
            return self._receive

        async def handed_over() -> Message:
            if self._kept:
                return self._kept.pop(0)
            if self._read is not None:
                read, self._read = self._read, None
                return await read
            return await self._receive()

        return handed_over


def _retry_seconds(decision: Decision) -> float:
    if decision.code == CONCURRENCY_LIMIT or decision.retry_after_us < 0:
        return POLL_SECONDS  # a slot frees when a request ends: nobody knows when
    return decision.retry_after_us / 1_000_000


def _room(decision: Decision, ask: Ask) -> float:
    """Seconds of its limiting bucket a request takes once admitted (the bucket refills
    limit/60 a second); 0 for a slot, whose return no one can foresee."""
    if decision.code == RPM_EXHAUSTED and decision.rpm_limit > 0:
        return _WINDOW / decision.rpm_limit
    if decision.code == TPM_EXHAUSTED and decision.tpm_limit > 0:
        tokens = ask.prompt_tokens + ask.per_sequence * ask.sequences
        return tokens * _WINDOW / decision.tpm_limit
    return 0.0


class AdmissionQueue:
    """Where refused requests of opted-in plans wait for their room, in one process."""

    def __init__(self, plans: Iterable[Plan], metrics: Metrics, gone: type[Exception],
                 max_queued: int = MAX_QUEUED) -> None:
        # Only the plans that opted in: with none, the middleware's lookup always misses.
        self.waits = {p.slug: p.max_queue_wait for p in plans if p.max_queue_wait > 0}
        self.max_queued = max_queued
        self.queued = 0
        self._gone = gone  # the middleware's client-gone exception: it answers nothing
        self._lines: dict[str, _Line] = {}
        self._seconds = {outcome: metrics.queue_seconds.labels(outcome) for outcome in OUTCOMES}
        self._gauge = metrics.queued
        self._store_errors = metrics.store_errors.labels("admit")

    async def wait(self, first: Decision, key_id: str, receive: Receive, ask: Ask,
                   admit: AdmitAgain) -> tuple[Decision, Receive]:
        """The final decision for a request of a plan in `waits` refused with `first`, and
        the client's channel to read from now on; raises the client-gone exception when the
        client left while waiting (nothing was admitted, so nothing is owed)."""
        if first.code not in QUEUED_CODES:
            return first, receive
        max_wait = self.waits[first.plan]
        started = time.monotonic()
        line = self._lines.get(key_id)
        ahead = line.backlog if line is not None else 0.0
        if _retry_seconds(first) + ahead > max_wait or self.queued >= self.max_queued:
            self._seconds["refused"].observe(0.0)
            if ahead and first.retry_after_us >= 0:  # Retry-After: after those ahead, too
                first = replace(first, retry_after_us=first.retry_after_us + int(ahead * 1e6))
            return first, receive
        if line is None:
            line = self._lines[key_id] = _Line()
        room = _room(first, ask)
        line.members += 1
        line.backlog += room
        self.queued += 1
        self._gauge.inc()
        watch = _Watch(receive)
        outcome = "cancelled"
        try:
            decision = await self._turn(line, first, started + max_wait, admit, watch)
            outcome = "admitted" if decision.code == ADMITTED else "refused"
        finally:
            line.members -= 1
            line.backlog -= room
            if line.members == 0:
                del self._lines[key_id]  # the table holds only keys with a waiter
            self.queued -= 1
            self._gauge.dec()
            self._seconds[outcome].observe(time.monotonic() - started)
        return decision, watch.receive()

    async def _turn(self, line: _Line, decision: Decision, deadline: float, admit: AdmitAgain,
                    watch: _Watch) -> Decision:
        behind = line.turn.locked()
        await self._until(line.turn.acquire(), watch)
        try:
            # An admission in flight is never raced with the client: cancelling it could
            # leave a reservation taken that nobody settles.
            if behind:  # the ones ahead took room since `decision` was made: ask again
                decision = await admit()
            while decision.code in QUEUED_CODES:
                wait = _retry_seconds(decision)
                if time.monotonic() + wait > deadline:
                    return decision  # refused as today: the room comes too late
                await self._until(asyncio.sleep(wait + _LATE), watch)
                decision = await admit()
            return decision
        except StoreUnavailable:
            # Redis went away while the request waited: it keeps the refusal it had (what a
            # plan without queueing answered), not a 503 for a request Redis already judged.
            self._store_errors.inc()
            return replace(decision, retry_after_us=max(decision.retry_after_us, 1_000_000))
        finally:
            line.turn.release()

    async def _until(self, step: Awaitable[object], watch: _Watch) -> None:
        """Awaits `step` (a turn, a sleep) unless the client leaves first."""
        task = asyncio.ensure_future(step)
        try:
            while True:
                read = watch.reading()
                done, _ = await asyncio.wait((task, read), return_when=asyncio.FIRST_COMPLETED)
                if task in done:  # first, so that a turn taken is always released
                    task.result()
                    return
                if watch.gone():
                    raise self._gone
        finally:
            # A cancelled Lock.acquire() never takes the lock, even when granted meanwhile.
            if not task.done():
                task.cancel()
