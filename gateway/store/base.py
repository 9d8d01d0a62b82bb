"""The Store's foundation: the client, the scripts, and calls mapped to the store's errors."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

from gateway.store.client import RedisClient, Script
from gateway.store.names import HotNames
from gateway.store.records import KeyRef
from gateway.store.replies import FAILURES, store_error
from gateway.store.scripts import lua_source

T = TypeVar("T")


def pairs(flat: Any) -> dict[bytes, bytes]:
    """A hash as HGETALL sends it (field, value, field, value, ...) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class StoreBase:
    """The client and the scripts; every call mapped to the store's errors."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self._names: dict[KeyRef, HotNames] = {}
        self._admit = Script.of(lua_source("admit"))
        self._settle = Script.of(lua_source("settle"))
        self._usage = Script.of(lua_source("usage"))
        self._mgmt_limit = Script.of(lua_source("mgmt_limit"))
        self._account_index = Script.of(lua_source("account_index"))
        self._rotate = Script.of(lua_source("rotate"))
        self._add_key = Script.of(lua_source("add_key"))
        self._update_key = Script.of(lua_source("update_key"))
        self._delete_key = Script.of(lua_source("delete_key"))
        self._credits = Script.of(lua_source("credits"))
        self._renew_slots = Script.of(lua_source("renew_slots"))
        self._account_limits = Script.of(lua_source("account_limits"))
        self._refused = Script.of(lua_source("refused"))
        # The hot path's scripts first: a node that lost them loads all of them at once.
        client.register((self._admit, self._settle, self._usage, self._mgmt_limit,
                         self._account_index, self._rotate, self._add_key, self._update_key,
                         self._delete_key, self._credits, self._renew_slots,
                         self._account_limits, self._refused))

    async def _call(self, awaitable: Awaitable[T]) -> T:
        # Backend failures become the store's errors here, at the storage edge (replies.py).
        try:
            return await awaitable
        except FAILURES as exc:
            raise store_error(exc) from exc

    async def _cmd(self, *command: Any) -> Any:
        """A command with its key at command[1], on the node that serves that key."""
        try:
            return await self.client.call(*command)
        except FAILURES as exc:
            raise store_error(exc) from exc

    async def _hash(self, key: str) -> dict[bytes, bytes]:
        """HGETALL as a dict ({} for a missing hash)."""
        return pairs(await self._cmd("HGETALL", key))

    async def _hset(self, key: str, fields: Mapping[str, Any]) -> None:
        await self._cmd("HSET", key, *(item for pair in fields.items() for item in pair))

    async def _evalsha(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.client.evalsha(script, keys, args)
        except FAILURES as exc:
            raise store_error(exc) from exc

    async def ping(self) -> bool:
        replies = await self._call(self.client.on_primaries("PING"))
        return all(r in (b"PONG", "PONG", True) for r in replies)

    async def ensure_scripts(self) -> None:
        """Makes sure the hot path's scripts are cached on every primary, loading any that
        is not (after SCRIPT FLUSH or a failover). Raises StoreUnavailable when that fails."""
        scripts = (self._admit, self._settle, self._usage)
        present = await self._call(self.client.on_primaries(
            "SCRIPT", "EXISTS", *(s.sha for s in scripts)))
        if all(all(int(flag) for flag in node) for node in present):
            return
        for script in scripts:
            await self._call(self.client.on_primaries("SCRIPT", "LOAD", script.source))

    async def close(self) -> None:
        await self.client.close()

    async def now_us(self) -> int:
        seconds, micros = await self._call(self.client.call_any("TIME"))
        return int(seconds) * 1_000_000 + int(micros)

