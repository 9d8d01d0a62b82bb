"""The Store's foundation: the client, the hot connection, scripts, and calls mapped to
the store's errors.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

import hiredis

from gateway.store.names import HotNames
from gateway.store.records import KeyRef
from gateway.store.replies import _CLIENT_FAILURES, _hot_error, client_error
from gateway.store.resp import Multiplexed, _Unsent
from gateway.store.scripts import lua_source

T = TypeVar("T")


class StoreBase:
    """The client, the hot connection and the scripts; every call mapped to the store's
    errors."""

    def __init__(self, client: Any, hot: Multiplexed | None = None) -> None:
        self.client = client
        self._hot = hot
        self._names: dict[KeyRef, HotNames] = {}
        self._admit = client.register_script(lua_source("admit"))
        self._settle = client.register_script(lua_source("settle"))
        self._usage = client.register_script(lua_source("usage"))
        self._mgmt_limit = client.register_script(lua_source("mgmt_limit"))
        self._account_index = client.register_script(lua_source("account_index"))
        self._rotate = client.register_script(lua_source("rotate"))
        self._add_key = client.register_script(lua_source("add_key"))

    async def _call(self, awaitable: Awaitable[T]) -> T:
        # Backend errors become the store's errors here, at the storage edge (replies.py).
        try:
            return await awaitable
        except _CLIENT_FAILURES as exc:
            raise client_error(exc) from exc

    async def ping(self) -> bool:
        if self._hot is not None:  # the connection the hot path really uses
            await self._hot_call("PING")
        return bool(await self._call(self.client.ping()))

    async def ensure_scripts(self) -> None:
        """Makes sure every registered script is cached in Redis, loading any that is not
        (after SCRIPT FLUSH or a failover). Raises StoreUnavailable when that fails."""
        scripts = (self._admit, self._settle, self._usage)
        present = await self._call(self.client.script_exists(*(s.sha for s in scripts)))
        for script, loaded in zip(scripts, present, strict=True):
            if not loaded:
                await self._call(self.client.script_load(script.script))

    async def close(self) -> None:
        if self._hot is not None:
            await self._hot.close()
        await self.client.aclose()

    async def _hot_call(self, *command: Any) -> Any:
        """A hot-path command: on the multiplexed connection when there is one."""
        if self._hot is None:
            return await self._call(self.client.execute_command(*command))
        try:
            return await self._hot.call(*command)
        except (_Unsent, TimeoutError, OSError, hiredis.ReplyError) as exc:
            raise _hot_error(exc) from exc

    async def _evalsha(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        hot = self._hot
        if hot is None:
            return await self._call(script(keys=keys, args=args))
        # One frame between the caller and the socket: every admission runs this.
        try:
            try:
                return await hot.call("EVALSHA", script.sha, len(keys), *keys, *args)
            except hiredis.ReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
            # After SCRIPT FLUSH or a failover (the script was not run): load every script
            # of the hot path, so the settlement queued after this admission finds its own
            # and lands before the client sees the response, then run.
            for loading in {script, self._admit, self._settle}:
                await hot.call("SCRIPT", "LOAD", loading.script)
            return await hot.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except (_Unsent, TimeoutError, OSError, hiredis.ReplyError) as exc:
            raise _hot_error(exc) from exc

    async def now_us(self) -> int:
        seconds, micros = await self._call(self.client.time())
        return int(seconds) * 1_000_000 + int(micros)
