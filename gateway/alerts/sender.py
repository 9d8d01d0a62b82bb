"""The alert sender: every account's outbox delivered to the webhooks that want each event,
at least once, with retries and exponential backoff, then deleted.

An event is read through the consumer group, posted to each webhook whose `events` name its
type, and acknowledged (deleted) once every one of them answered 2xx or was given up for it.
Attempts and backoff are counted per event and webhook: after `max_attempts` failed posts,
or once the event is `give_up_after` old, that webhook is given up for it (logged with the
event's id and type and the webhook's number and origin, never its path or secret), and an
event given up for any webhook is counted once, so nothing is retried forever.

Each webhook has its own lane: the posts due to it wait in its queue and at most
POSTS_PER_WEBHOOK of them run at once, in tasks that outlive the pass that queued them. A
pass queues what is due and returns, so a webhook that hangs (every post waiting out the
timeout) slows its own lane only; the others' posts go out at once.

Progress per webhook lives in this process: a sender that restarts (reading its own
unacknowledged events first) or takes over another's (claimed after `claim_idle_seconds`)
posts them to every webhook again; receivers deduplicate by X-Gateway-Event-Id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from gateway.alerts.delivery import POSTS_PER_WEBHOOK, DeliveryFailed, Poster
from gateway.alerts.events import body
from gateway.alerts.metrics import AlertMetrics
from gateway.alerts.outbox import AlertEvent, Outbox
from gateway.config.alerts import AlertSettings
from gateway.errors import StoreUnavailable

log = logging.getLogger("gateway.alerts")

READ_COUNT = 100  # most events read from one outbox at a time
MAX_PENDING = 2000  # events held in memory at once; reading waits beyond


@dataclass
class SendTotals:
    delivered: int = 0  # webhook calls answered 2xx
    failed: int = 0  # webhook calls that failed
    given_up: int = 0  # events given up (for at least one webhook)
    done: int = 0  # events finished (delivered to all, or given up) and deleted
    expiring: int = 0  # key.expiring events written by the periodic pass


@dataclass
class _Hook:
    """One event's delivery to one webhook that has not had it yet."""

    attempts: int = 0
    next_at: float = 0.0  # when it is due (again)
    busy: bool = False  # in its lane's queue or being posted
    failed: bool = False  # the last post failed: the next pass retries or gives it up
    last_error: str = ""


@dataclass
class _Pending:
    event: AlertEvent
    body: bytes
    hooks: dict[int, _Hook]  # by webhook index: the webhooks still missing it
    given_up: bool = False


@dataclass
class _Lane:
    """One webhook's queue of due posts and the number of tasks working it."""

    queue: deque[_Pending] = field(default_factory=deque)
    workers: int = 0


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
        self._next_touch = 0.0
        self._lanes = [_Lane() for _ in settings.webhooks]
        self._tasks: set[asyncio.Task[None]] = set()
        self._finished: dict[tuple[str, str], _Pending] = {}  # done, not yet acknowledged
        self._acker: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # a post failed: run() schedules its retry

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- one pass ---------------------------------------------------------------------

    async def run_pass(self) -> None:
        """Writes key.expiring when due, reads new (and resumed or claimed) events, settles
        the posts that ended since the last pass (acknowledging the events done), queues
        every post that is due, and measures the lag when due. It does not wait for posts."""
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
        await self._settle()
        await self._dispatch()
        if self.clock() >= self._next_lag:
            await self.observe_lag(accounts)

    async def run_once(self) -> None:
        """One pass whose posts are waited for and settled (`gateway alerts send --once`);
        an event that failed stays pending, to retry."""
        await self.run_pass()
        await self.drain()
        await self._settle()

    async def run(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        """Passes every `interval` until `stop` is set; a Redis outage is logged and waited
        out. A retry due in between is made without a pass: a pass reads every account's
        outbox, and retries (each with its own jittered backoff) would otherwise multiply
        those reads."""
        failures = 0
        next_read = self.clock()
        while not stop.is_set():
            self._wake.clear()
            try:
                if self.clock() >= next_read:
                    next_read = self.clock() + interval
                    await self.run_pass()
                else:
                    await self._settle()
                    await self._dispatch()
                failures = 0
            except StoreUnavailable as exc:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("alert sender: Redis unavailable (%s); retrying", exc)
            wait = next_read - self.clock()
            waiting = [hook.next_at for item in self._pending.values()
                       for hook in item.hooks.values() if not hook.busy]
            if waiting:
                wait = min(wait, min(waiting) - self.clock())
            await self._sleep(stop, max(wait, 0.01))
        await self._wind_down()

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        """Until `stop`, a failed post (its retry is then scheduled), or `seconds`."""
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waits:
            waiter.cancel()

    async def _wind_down(self) -> None:
        """At a stop: no post starts any more; the running ones end (each within the
        timeout) and the events they finished are acknowledged, so that a restart does not
        post them again. The rest stay in Redis, for this consumer or another to read."""
        for index, lane in enumerate(self._lanes):
            for item in lane.queue:
                item.hooks[index].busy = False
            lane.queue.clear()
        await self.drain()
        with contextlib.suppress(StoreUnavailable):
            await self._settle()

    async def drain(self) -> None:
        """Waits until every queued post has ended."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stops the posts still running (their events stay unacknowledged in Redis, to be
        read again: at least once) and closes the connections."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.poster.close()

    # -- delivery ---------------------------------------------------------------------

    def _add(self, events: list[AlertEvent]) -> None:
        for event in events:
            key = (event.account_id, event.stream_id)
            if key in self._pending:
                continue
            wanted = {i: _Hook() for i, hook in enumerate(self.settings.webhooks)
                      if hook.wants(event.type)}
            item = self._pending[key] = _Pending(event, body(event), wanted)
            if not wanted:
                self._finished[key] = item

    async def _settle(self) -> None:
        """Gives up the failed posts past the limits, then acknowledges the events done."""
        failed = [(item, index, hook) for item in self._pending.values()
                  for index, hook in item.hooks.items() if hook.failed]
        if failed:
            now_us = await self.outbox.store.now_us()  # the event's age is Redis time
            for item, index, hook in failed:
                hook.failed = False
                age = (now_us - item.event.created_at_us) / 1_000_000
                if (hook.attempts < self.settings.max_attempts
                        and age < self.settings.give_up_after):
                    continue  # its next_at was set when it failed
                del item.hooks[index]
                item.given_up = True
                log.warning("alert %s (%s) given up after %d attempts (%.0f s old) for "
                            "webhook %d (%s): %s", item.event.id, item.event.type,
                            hook.attempts, age, index + 1,
                            self.settings.webhooks[index].shown, hook.last_error)
                if not item.hooks:
                    self._finished[(item.event.account_id, item.event.stream_id)] = item
        await self._ack()

    async def _ack(self) -> None:
        """Acknowledges (deletes) the events every webhook had or was given up for. The
        ones a failure left are acknowledged at the next try (the next pass)."""
        while self._finished:
            batch, self._finished = self._finished, {}
            by_account: dict[str, list[str]] = {}
            for account_id, stream_id in batch:
                by_account.setdefault(account_id, []).append(stream_id)
            try:
                for account_id, ids in by_account.items():
                    await self.outbox.ack(account_id, ids)
                    for stream_id in ids:
                        if batch.pop((account_id, stream_id)).given_up:
                            self.totals.given_up += 1
                            self.metrics.given_up.inc()
                        del self._pending[(account_id, stream_id)]
                    self.totals.done += len(ids)
            finally:
                self._finished.update(batch)  # what is left was not acknowledged

    def _ack_soon(self) -> None:
        """Acknowledges at once, in a task of its own, what a post just finished: a pass
        does not wait for posts, and a stop may close the store before the next pass. The
        events finished meanwhile join the batch."""
        if self._acker is None or self._acker.done():
            self._acker = self._spawn(self._ack_quietly())

    async def _ack_quietly(self) -> None:
        with contextlib.suppress(StoreUnavailable):  # the next pass tries again
            await self._ack()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)  # drain() and close() wait for or stop it
        task.add_done_callback(self._tasks.discard)
        return task

    async def _dispatch(self) -> None:
        """Queues every due post in its webhook's lane. The events to retry are claimed
        first (XCLAIM), and all pending ones every claim_idle_seconds / 4: an event that
        waits its turn in a slow lane is not idle, and no other sender takes it."""
        now = self.clock()
        due = [(item, index, hook) for item in self._pending.values()
               for index, hook in item.hooks.items()
               if not (hook.busy or hook.failed) and hook.next_at <= now]
        if now >= self._next_touch:
            self._next_touch = now + self.options.claim_idle_seconds / 4
            claimed = list(self._pending.values())
        else:
            claimed = [item for item, _, hook in due if hook.attempts]
        touched: dict[str, set[str]] = {}
        for item in claimed:
            touched.setdefault(item.event.account_id, set()).add(item.event.stream_id)
        for account_id, ids in touched.items():
            await self.outbox.touch(account_id, sorted(ids))
        for item, index, hook in due:
            hook.busy = True
            self._lanes[index].queue.append(item)
        for index, lane in enumerate(self._lanes):
            while lane.workers < min(POSTS_PER_WEBHOOK, len(lane.queue)):
                lane.workers += 1
                self._spawn(self._work(index, lane))

    async def _work(self, index: int, lane: _Lane) -> None:
        try:
            while lane.queue:
                await self._post(lane.queue.popleft(), index)
        finally:
            lane.workers -= 1

    async def _post(self, item: _Pending, index: int) -> None:
        hook = item.hooks[index]
        hook.attempts += 1
        try:
            await self.poster.post(index, item.event.id, item.event.type, item.body)
        except Exception as exc:  # any failure is retried: a bug must not end the lane
            message = str(exc) if isinstance(exc, DeliveryFailed) else (
                f"webhook {index + 1}: {type(exc).__name__}")
            if not isinstance(exc, DeliveryFailed):  # a bug: said loudly, but its message
                # (which might quote the request target) is not
                log.error("alert %s: posting to webhook %d failed unexpectedly: %s",
                          item.event.id, index + 1, type(exc).__name__)
            hook.last_error = message
            hook.failed = True
            hook.next_at = self.clock() + self.options.backoff.delay(hook.attempts)
            self._wake.set()
            self.totals.failed += 1
            self.metrics.failed.inc()
            log.info("alert %s (%s): %s (attempt %d)", item.event.id, item.event.type,
                     message, hook.attempts)
        else:
            del item.hooks[index]
            self.totals.delivered += 1
            self.metrics.delivered.labels(item.event.type).inc()
            if not item.hooks:
                self._finished[(item.event.account_id, item.event.stream_id)] = item
                self._ack_soon()
        finally:
            hook.busy = False

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
