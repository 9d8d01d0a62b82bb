"""A Sentinel-managed primary: found by asking the Sentinels, found again when it fails.

The primary is asked of each Sentinel in turn (SENTINEL get-master-addr-by-name) and checked
with ROLE before use (a Sentinel can be behind). It is looked up again when its connection
fails or when it answers READONLY (it was demoted; the command did not run, so it is resent
once to the new primary).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import hiredis

from gateway.store.client import RedisClient, Script
from gateway.store.resp import NodeConnection, Unsent, pack
from gateway.store.urls import Address, Credentials

log = logging.getLogger("gateway.store")

_LOOKUP_INTERVAL_SECONDS = 0.1


class SentinelClient(RedisClient):
    """redis+sentinel:// and rediss+sentinel://."""

    def __init__(self, sentinels: tuple[Address, ...], service: str,
                 credentials: Credentials, sentinel_credentials: Credentials,
                 timeout_seconds: float) -> None:
        super().__init__()
        self._service = service
        self._credentials = credentials
        self._timeout = timeout_seconds
        self._sentinels = [NodeConnection(a, sentinel_credentials, timeout_seconds)
                           for a in sentinels]
        self._primary: NodeConnection | None = None
        self._lookup_lock: asyncio.Lock | None = None
        self._looked_up_at = 0.0
        self._stale = False

    async def _node(self) -> NodeConnection:
        node = self._primary
        if node is None or self._stale:
            node = await self._lookup()
        return node

    async def _lookup(self) -> NodeConnection:
        if self._lookup_lock is None:
            self._lookup_lock = asyncio.Lock()
        asked_at = time.monotonic()
        async with self._lookup_lock:
            current = self._primary
            if current is not None and (not self._stale or self._looked_up_at >= asked_at
                                        or asked_at - self._looked_up_at
                                        < _LOOKUP_INTERVAL_SECONDS):
                return current
            self._looked_up_at = time.monotonic()
            reasons: list[str] = []
            for sentinel in self._sentinels:
                try:
                    reply = await sentinel.call(("SENTINEL", "get-master-addr-by-name",
                                                 self._service))
                except (Unsent, TimeoutError, OSError, hiredis.ReplyError) as exc:
                    reasons.append(str(exc) or type(exc).__name__)
                    continue
                if not reply:
                    reasons.append(f"Sentinel {sentinel.name} knows no service "
                                   f"{self._service!r}")
                    continue
                address = (reply[0].decode(), int(reply[1]))
                node = await self._checked(address, current, reasons)
                if node is not None:
                    return node
            raise Unsent("no Redis primary from the Sentinels: " + "; ".join(reasons[:3]))

    async def _checked(self, address: Address, current: NodeConnection | None,
                       reasons: list[str]) -> NodeConnection | None:
        node = current if current is not None and current.address == address else \
            NodeConnection(address, self._credentials, self._timeout)
        try:
            role = await node.call(("ROLE",))
        except (Unsent, TimeoutError, OSError, hiredis.ReplyError) as exc:
            reasons.append(str(exc) or type(exc).__name__)
            if node is not current:
                await node.close()
            return None
        if role[0] != b"master":
            reasons.append(f"{node.name} is not a primary (yet)")
            if node is not current:
                await node.close()
            return None
        if node is not current:
            log.info("Redis primary for %r is %s", self._service, node.name)
            if current is not None:  # closed once its answers are in
                asyncio.get_running_loop().call_later(self._timeout * 4, current.close_now)
        self._primary = node
        self._stale = False
        return node

    async def call(self, *command: Any) -> Any:
        node = await self._node()
        try:
            return await self._run_on(node, command)
        except hiredis.ReplyError as exc:
            if not str(exc).startswith("READONLY"):
                raise
            self._stale = True  # demoted: it did not run the command, resend to the new one
        except (Unsent, TimeoutError, OSError):
            self._stale = True
            raise
        return await self._run_on(await self._lookup(), command)

    async def call_any(self, *command: Any) -> Any:
        return await self.call(*command)

    async def on_primaries(self, *command: Any) -> list[Any]:
        return [await self.call(*command)]

    async def evalsha(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)

    def started(self, script: Script, keys: list[str], args: list[Any]
                ) -> asyncio.Future[Any] | None:
        node = self._primary
        protocol = node.connected() if node is not None and not self._stale else None
        if protocol is None:
            return None
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        first = protocol.request(pack(command))
        return asyncio.ensure_future(self._finish(command, first))

    async def _finish(self, command: tuple[Any, ...], first: asyncio.Future[Any]) -> Any:
        try:
            return await first
        except hiredis.ReplyError as exc:
            if not str(exc).startswith(("READONLY", "NOSCRIPT")):
                raise
            self._stale = self._stale or str(exc).startswith("READONLY")
        except (TimeoutError, OSError):
            self._stale = True
            raise
        return await self.call(*command)

    async def close(self) -> None:
        if self._primary is not None:
            await self._primary.close()
        for sentinel in self._sentinels:
            await sentinel.close()
