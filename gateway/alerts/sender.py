"""The alert sender: every account's outbox delivered to the webhooks that want each event,
at least once, with retries and exponential backoff, then deleted.

An event is read through the consumer group, posted to each webhook whose `events` name its
type (concurrently), and acknowledged (deleted) once every one of them answered 2xx; one
that still fails after `max_attempts` or `give_up_after` is given up: counted, logged (its
id and type, never a URL or secret) and deleted, so nothing is retried forever. Progress per
webhook lives in this process: a sender that restarts (reading its own unacknowledged
events first) or takes over another's (claimed after `claim_idle_seconds`) posts them to
every webhook again; receivers deduplicate by X-Gateway-Event-Id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.alerts.delivery import DeliveryFailed, Poster
from gateway.alerts.events import body
from gateway.alerts.metrics import AlertMetrics
from gateway.alerts.outbox import AlertEvent, Outbox
from gateway.config.alerts import AlertSettings
from gateway.errors import StoreUnavailable

log = logging.getLogger("gateway.alerts")

READ_COUNT = 100  # most events read from one outbox at a time
MAX_PENDING = 2000  # events held in memory at once; reading waits beyond
CONCURRENT_POSTS = 16


@dataclass
class SendTotals:
    delivered: int = 0  # webhook calls answered 2xx
    failed: int = 0  # webhook calls that failed
    given_up: int = 0  # events given up
    done: int = 0  # events finished (delivered to all, or given up) and deleted
    expiring: int = 0  # key.expiring events written by the periodic pass


@dataclass
class _Pending:
    event: AlertEvent
    body: bytes
    remaining: set[int]
    attempts: int = 0
    next_at: float = 0.0
    last_error: str = ""


@dataclass
class _Backoff:
    base: float = 1.0
    cap: float = 60.0

    def delay(self, attempts: int) -> float:
        raw: float = min(self.cap, self.base * 2.0 ** max(attempts - 1, 0))
        return raw * (0.5 + random.random() / 2)  # jitter: replicas do not retry in step


@dataclass
class SenderOptions:
    claim_idle_seconds: float = 120.0  # another sender's events waiting this long are taken
    expiring_interval: float = 60.0  # seconds between key.expiring passes
    lag_interval: float = 5.0
    backoff: _Backoff = field(default_factory=_Backoff)

    @classmethod
    def with_backoff(cls, base: float, cap: float, **kwargs: float) -> SenderOptions:
        return cls(backoff=_Backoff(base, cap), **kwargs)


class AlertSender:
    def __init__(self, outbox: Outbox, settings: AlertSettings,
                 metrics: AlertMetrics | None = None, options: SenderOptions | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.outbox = outbox
        self.settings = settings
        self.metrics = metrics or AlertMetrics()
        self.options = options or SenderOptions()
        self.clock = clock
        self.poster = Poster(settings.webhooks, settings.timeout)
        self.totals = SendTotals()
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._resumed: set[str] = set()
        self._next_expiring = 0.0
        self._next_claim = 0.0  # the first pass claims what a dead sender left
        self._next_lag = 0.0
        self._posts = asyncio.Semaphore(CONCURRENT_POSTS)

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- one pass ---------------------------------------------------------------------

    async def run_pass(self) -> None:
        """Writes key.expiring when due, reads new (and resumed or claimed) events, makes
        every attempt that is due once, and measures the lag when due."""
        now = self.clock()
        accounts = await self.outbox.accounts()
        if now >= self._next_expiring:
            for account_id in accounts:
                self.totals.expiring += await self.outbox.scan_expiring(account_id,
                                                                        self.settings)
            self._next_expiring = now + self.options.expiring_interval
        claim = now >= self._next_claim
        if claim:
            self._next_claim = now + self.options.claim_idle_seconds / 2
        for account_id in accounts:
            if account_id not in self._resumed:
                self._add(await self.outbox.read(account_id, READ_COUNT, "0"))
                self._resumed.add(account_id)
            if claim:
                self._add(await self.outbox.read(
                    account_id, READ_COUNT, "claim",
                    int(self.options.claim_idle_seconds * 1000)))
            if len(self._pending) < MAX_PENDING:
                self._add(await self.outbox.read(account_id, READ_COUNT, ">"))
        await self._attempt_due()
        if self.clock() >= self._next_lag:
            await self.observe_lag(accounts)

    async def run(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        """Passes until `stop` is set; a Redis outage is logged and waited out."""
        failures = 0
        while not stop.is_set():
            try:
                await self.run_pass()
                failures = 0
            except StoreUnavailable as exc:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("alert sender: Redis unavailable (%s); retrying", exc)
            wait = interval
            if self._pending:
                soonest = min(p.next_at for p in self._pending.values()) - self.clock()
                wait = min(interval, max(soonest, 0.01))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    async def close(self) -> None:
        await self.poster.close()

    # -- delivery ---------------------------------------------------------------------

    def _add(self, events: list[AlertEvent]) -> None:
        for event in events:
            key = (event.account_id, event.stream_id)
            if key in self._pending:
                continue
            wanted = {i for i, hook in enumerate(self.settings.webhooks)
                      if hook.wants(event.type)}
            self._pending[key] = _Pending(event, body(event), wanted)

    async def _attempt_due(self) -> None:
        now = self.clock()
        due = [p for p in self._pending.values() if p.next_at <= now]
        if not due:
            return
        retried: dict[str, list[str]] = {}
        for item in due:
            if item.attempts:
                retried.setdefault(item.event.account_id, []).append(item.event.stream_id)
        for account_id, ids in retried.items():
            await self.outbox.touch(account_id, ids)
        await asyncio.gather(*(self._attempt(item) for item in due))
        now_us = await self.outbox.store.now_us()
        finished: dict[str, list[str]] = {}
        for item in due:
            event = item.event
            if item.remaining:
                age = (now_us - event.created_at_us) / 1_000_000
                if (item.attempts < self.settings.max_attempts
                        and age < self.settings.give_up_after):
                    item.next_at = self.clock() + self.options.backoff.delay(item.attempts)
                    continue
                self.totals.given_up += 1
                self.metrics.given_up.inc()
                log.warning("alert %s (%s) given up after %d attempts (%.0f s old): %s",
                            event.id, event.type, item.attempts, age, item.last_error)
            finished.setdefault(event.account_id, []).append(event.stream_id)
        for account_id, ids in finished.items():
            await self.outbox.ack(account_id, ids)
            for stream_id in ids:
                del self._pending[(account_id, stream_id)]
            self.totals.done += len(ids)

    async def _attempt(self, item: _Pending) -> None:
        item.attempts += 1
        results = await asyncio.gather(*(self._post(item, i) for i in sorted(item.remaining)))
        for index, ok in zip(sorted(item.remaining), results, strict=True):
            if ok:
                item.remaining.discard(index)

    async def _post(self, item: _Pending, index: int) -> bool:
        async with self._posts:
            try:
                await self.poster.post(index, item.event.id, item.event.type, item.body)
            except DeliveryFailed as exc:
                item.last_error = str(exc)
                self.totals.failed += 1
                self.metrics.failed.inc()
                log.info("alert %s (%s): %s (attempt %d)", item.event.id, item.event.type,
                         exc, item.attempts)
                return False
        self.totals.delivered += 1
        self.metrics.delivered.labels(item.event.type).inc()
        return True

    # -- lag --------------------------------------------------------------------------

    async def observe_lag(self, accounts: list[str] | None = None) -> int:
        """Sets the lag gauges; returns the events waiting over all outboxes."""
        if accounts is None:
            accounts = await self.outbox.accounts()
        waiting = dropped = 0
        oldest_age = 0.0
        for account_id in accounts:
            state = await self.outbox.state(account_id)
            waiting += state.length
            dropped += state.dropped
            if state.oldest_ms is not None:
                oldest_age = max(oldest_age, (state.now_ms - state.oldest_ms) / 1000)
        self.metrics.outbox_events.set(waiting)
        self.metrics.oldest_seconds.set(oldest_age)
        self.metrics.dropped.set(dropped)
        self._next_lag = self.clock() + self.options.lag_interval
        return waiting
