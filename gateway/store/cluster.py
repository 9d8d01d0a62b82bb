"""Redis Cluster: one multiplexed connection per primary, commands routed by slot.

The slot map comes from CLUSTER SLOTS, read at the first call and again whenever the cluster
says it changed: a MOVED reply (the command did not run, so it is resent to the node named,
whose slot is updated at once), a node that cannot be reached, or one that stops answering.
ASK (a slot being migrated) sends ASKING and the command to the importing node, once. A
command that may have run (written, then no answer) is never resent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import hiredis

from gateway.store.client import RedisClient, Script
from gateway.store.resp import NodeConnection, Unsent, pack
from gateway.store.slots import key_slot, parse_cluster_slots
from gateway.store.urls import Address, Credentials

log = logging.getLogger("gateway.store")

_MAX_REDIRECTS = 5
_REFRESH_INTERVAL_SECONDS = 0.1  # at most this often while a node keeps failing
_MAX_CACHED_SLOTS = 100_000


class ClusterClient(RedisClient):
    """redis+cluster:// and rediss+cluster://."""

    def __init__(self, startup: tuple[Address, ...], credentials: Credentials,
                 timeout_seconds: float) -> None:
        super().__init__()
        self._startup = startup
        self._credentials = credentials
        self._timeout = timeout_seconds
        self._nodes: dict[Address, NodeConnection] = {}
        self._owners: list[Address | None] = []
        self._slot_of: dict[str, int] = {}
        self._refresh_lock: asyncio.Lock | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0
        self._closed = False

    # -- routing --------------------------------------------------------------------------

    def _node(self, address: Address) -> NodeConnection:
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = NodeConnection(address, self._credentials,
                                                         self._timeout)
        return node

    def _slot(self, key: str) -> int:
        slot = self._slot_of.get(key)
        if slot is None:
            if len(self._slot_of) >= _MAX_CACHED_SLOTS:
                self._slot_of.clear()
            slot = self._slot_of[key] = key_slot(key)
        return slot

    async def _owner(self, slot: int) -> NodeConnection:
        if not self._owners:
            await self._refresh()
        address = self._owners[slot]
        if address is None:
            self._refresh_soon()
            raise Unsent(f"no Redis Cluster node serves slot {slot} (CLUSTERDOWN)")
        return self._node(address)

    async def call(self, *command: Any) -> Any:
        key = command[3] if command[0] == "EVALSHA" else command[1]
        return await self._routed(self._slot(str(key)), command)

    async def evalsha(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        slot = self._slot(keys[0])
        address = self._owners[slot] if self._owners else None
        node = self._nodes.get(address) if address is not None else None
        if node is None:
            return await self._routed(slot, command)
        # The path every admission takes: straight to the slot's node; anything but a reply
        # goes through the routing below.
        try:
            return await node.call(command)
        except hiredis.ReplyError as exc:
            if _redirect(str(exc)) is None and not str(exc).startswith("NOSCRIPT"):
                raise
        except (Unsent, TimeoutError, OSError):
            self._refresh_soon()
            raise
        return await self._routed(slot, command, node)

    async def _routed(self, slot: int, command: tuple[Any, ...],
                      node: NodeConnection | None = None) -> Any:
        if node is None:
            node = await self._owner(slot)
        asking = False
        for _ in range(_MAX_REDIRECTS):
            try:
                return await self._run_on(node, command, asking)
            except hiredis.ReplyError as exc:
                redirect = _redirect(str(exc))
                if redirect is None:
                    raise
                moved, target = redirect
                if not target[0] and node.address is not None:  # "MOVED 12 :6381"
                    target = (node.address[0], target[1])
                if moved:  # the slot lives elsewhere now: remember it, re-read the rest
                    if self._owners:
                        self._owners[slot] = target
                    self._refresh_soon()
                asking = not moved
                node = self._node(target)
            except Unsent:
                self._refresh_soon()  # a node that cannot be reached may have failed over
                raise
            except (TimeoutError, OSError):
                self._refresh_soon()
                raise
        raise Unsent(f"Redis Cluster redirected the command {_MAX_REDIRECTS} times")

    def started(self, script: Script, keys: list[str], args: list[Any]
                ) -> asyncio.Future[Any] | None:
        if not self._owners:
            return None
        slot = self._slot(keys[0])
        address = self._owners[slot]
        node = self._nodes.get(address) if address is not None else None
        protocol = node.connected() if node is not None else None
        if node is None or protocol is None:
            return None
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        first = protocol.request(pack(command))
        return asyncio.ensure_future(self._finish(slot, command, node, first))

    async def _finish(self, slot: int, command: tuple[Any, ...], node: NodeConnection,
                      first: asyncio.Future[Any]) -> Any:
        """A started command's answer; a redirect or NOSCRIPT (it did not run) is followed."""
        try:
            return await first
        except hiredis.ReplyError as exc:
            if _redirect(str(exc)) is None and not str(exc).startswith("NOSCRIPT"):
                raise
        except (TimeoutError, OSError):
            self._refresh_soon()
            raise
        return await self._routed(slot, command, node)

    async def call_any(self, *command: Any) -> Any:
        if not self._owners:
            await self._refresh()
        failure: Exception = Unsent("no Redis Cluster node is reachable")
        for address in self._primaries():
            try:
                return await self._node(address).call(command)
            except Unsent as exc:
                failure = exc
        self._refresh_soon()
        raise failure

    async def on_primaries(self, *command: Any) -> list[Any]:
        if not self._owners:
            await self._refresh()
        try:
            return list(await asyncio.gather(*(self._node(a).call(command)
                                               for a in self._primaries())))
        except (Unsent, TimeoutError, OSError):
            self._refresh_soon()
            raise

    def _primaries(self) -> list[Address]:
        return sorted({a for a in self._owners if a is not None})

    # -- topology -------------------------------------------------------------------------

    def _refresh_soon(self) -> None:
        if self._closed or (self._refresh_task is not None and not self._refresh_task.done()):
            return
        if time.monotonic() - self._refreshed_at < _REFRESH_INTERVAL_SECONDS:
            return
        self._refresh_task = asyncio.ensure_future(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(Unsent):
            await self._refresh()

    async def _refresh(self) -> None:
        """Reads the slot map from the first node that answers: known primaries first, then
        every other known node, then the startup nodes."""
        if self._refresh_lock is None:
            self._refresh_lock = asyncio.Lock()
        asked_at = time.monotonic()
        async with self._refresh_lock:
            if self._owners and self._refreshed_at >= asked_at:
                return  # refreshed while we waited
            self._refreshed_at = time.monotonic()
            candidates = [*self._primaries(), *sorted(self._nodes), *self._startup]
            reasons: list[str] = []
            for address in dict.fromkeys(candidates):
                try:
                    reply = await self._node(address).call(("CLUSTER", "SLOTS"))
                except hiredis.ReplyError as exc:
                    if "cluster support disabled" in str(exc):
                        exc = hiredis.ReplyError(f"{address[0]}:{address[1]} is not a Redis "
                                                 "Cluster (use redis:// for one server)")
                    reasons.append(str(exc))
                    continue
                except (Unsent, TimeoutError, OSError) as exc:
                    reasons.append(str(exc) or type(exc).__name__)
                    continue
                owners, known = parse_cluster_slots(reply, address)
                if not any(owners):
                    reasons.append(f"{address[0]}:{address[1]} serves no slots")
                    continue
                self._adopt(owners, known)
                return
            raise Unsent("cannot read the Redis Cluster's slots: " + "; ".join(reasons[:3]))

    def _adopt(self, owners: list[Address | None], known: set[Address]) -> None:
        if self._owners:
            # A map read while a hand-over is under way can leave a slot unowned for a
            # moment: its owner known before still answers, MOVED to its successor (or not
            # at all, and then the request is a 503 as it would have been).
            owners = [new if new is not None else old
                      for new, old in zip(owners, self._owners, strict=True)]
        if self._owners and owners != self._owners:
            log.info("Redis Cluster topology changed: primaries now %s",
                     ", ".join(f"{h}:{p}" for h, p in sorted({a for a in owners if a})))
        self._owners = owners
        # Nodes the cluster no longer names are closed once their answers are in.
        loop = asyncio.get_running_loop()
        for address in [a for a in self._nodes if a not in known and a not in self._startup]:
            loop.call_later(self._timeout * 4, self._nodes.pop(address).close_now)

    async def close(self) -> None:
        self._closed = True
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        for node in list(self._nodes.values()):
            await node.close()


def _redirect(message: str) -> tuple[bool, Address] | None:
    """(moved, address) from "MOVED 3999 127.0.0.1:6381" or "ASK 3999 127.0.0.1:6381"."""
    moved = message.startswith("MOVED ")
    if not moved and not message.startswith("ASK "):
        return None
    parts = message.split()
    if len(parts) < 3:
        return None
    host, _, port = parts[2].rpartition(":")
    if not port.isdigit():
        return None
    return moved, (host.strip("[]"), int(port))
