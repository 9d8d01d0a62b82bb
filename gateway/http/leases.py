"""Leases on the slots of requests in flight (max_concurrent): renewed while the request
lives, so a process that dies frees its requests' slots within one lease, and a request
that lives longer than a lease keeps its slot."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.errors import StoreUnavailable
from gateway.store import KeyRef, Store

log = logging.getLogger("gateway.leases")


class LeaseKeeper:
    """The slots this process holds, by reservation id; one task renews all of them every
    third of a lease (one script per key), and stops when none is held."""

    def __init__(self, store: Store, lease_seconds: float) -> None:
        self.store = store
        self.lease_seconds = lease_seconds
        self._held: dict[str, KeyRef] = {}  # as many as requests in flight: bounded
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, ref: KeyRef, reservation_id: str) -> None:
        self._held[reservation_id] = ref
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def drop(self, reservation_id: str) -> None:
        """The request is over (its settlement frees the slots): stop renewing."""
        self._held.pop(reservation_id, None)

    async def _run(self) -> None:
        lease_us = int(self.lease_seconds * 1_000_000)
        while self._held:
            await asyncio.sleep(self.lease_seconds / 3)
            by_key: dict[KeyRef, list[str]] = {}
            for reservation_id, ref in list(self._held.items()):
                by_key.setdefault(ref, []).append(reservation_id)
            for ref, ids in by_key.items():
                try:
                    await self.store.renew_slots(ref, ids, lease_us)
                except StoreUnavailable as exc:
                    # The slots then lapse at their lease's end: others may take them, which
                    # is the price of not blocking on a store that is away.
                    if not self._failing:
                        log.error("cannot renew slot leases (%s): they lapse unless the "
                                  "store answers again within the lease", exc)
                    self._failing = True
                    continue
                self._failing = False

    async def aclose(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
