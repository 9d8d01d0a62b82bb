"""The embedded store: fakeredis with Lua in this process, running the same scripts.

Single process and not durable; for `gateway demo` and fast tests. fakeredis is imported
only when an embedded store is made: a gateway on Redis never loads it (nor numpy, which
fakeredis imports when it is installed, with OpenBLAS threads of its own).
"""

from __future__ import annotations

from typing import Any

import hiredis

from gateway.store.client import RedisClient
from gateway.store.store import Store

# redis-py's parser turns these replies into classes and drops the prefix from the message;
# the store reads replies as Redis sends them (replies.py), so the prefix is put back.
_PREFIXES = {"NoScriptError": "NOSCRIPT", "ReadOnlyError": "READONLY",
             "BusyLoadingError": "LOADING", "ExecAbortError": "EXECABORT",
             "NoPermissionError": "NOPERM", "AuthenticationError": "WRONGPASS"}


class EmbeddedClient(RedisClient):
    """The store's client over an in-process fakeredis server, replies as Redis sends them."""

    def __init__(self) -> None:
        import fakeredis

        super().__init__()
        self.server = fakeredis.FakeServer()
        self._fake = fakeredis.FakeAsyncRedis(server=self.server, max_connections=2**20)
        self._fake.response_callbacks.clear()  # raw replies, as hiredis gives them

    async def call(self, *command: Any) -> Any:
        try:
            return await self._raw(command)
        except hiredis.ReplyError as exc:
            if command[0] != "EVALSHA" or not str(exc).startswith("NOSCRIPT"):
                raise
        for script in self._scripts.values():
            await self._raw(("SCRIPT", "LOAD", script.source))
        return await self._raw(command)

    async def _raw(self, command: tuple[Any, ...]) -> Any:
        from redis.exceptions import ResponseError

        try:
            reply = await self._fake.execute_command(*command)  # type: ignore[no-untyped-call]
        except ResponseError as exc:
            prefix = _PREFIXES.get(type(exc).__name__)
            raise hiredis.ReplyError(f"{prefix} {exc}" if prefix else str(exc)) from None
        if isinstance(reply, dict):  # fakeredis answers HGETALL as a map; RESP2 is a list
            return [item for pair in reply.items() for item in pair]
        return reply

    async def call_any(self, *command: Any) -> Any:
        return await self.call(*command)

    async def on_primaries(self, *command: Any) -> list[Any]:
        return [await self.call(*command)]

    async def close(self) -> None:
        await self._fake.aclose()


def embedded_store() -> Store:
    return Store(EmbeddedClient())
