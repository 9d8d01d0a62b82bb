"""The client every store operation goes through: one multiplexed connection per Redis node
(resp.py), routed by topology for a Cluster (cluster.py) or a Sentinel (sentinel.py).

What the store sees is the same for every topology:
  call(*command)          a command with its key at command[1], on the node serving that key
  evalsha(script, keys, args)   a script, loaded on the node that answers NOSCRIPT
  started(...)            a script queued on the socket before this returns (settlements)
  call_any(*command)      a keyless command (TIME) on any node
  on_primaries(*command)  a keyless command on every primary (PING, SCRIPT EXISTS)

Failures are raised as: Unsent (never written: Redis did not run it), hiredis.ReplyError
(Redis answered an error), TimeoutError or OSError (written, then no answer: it may have run).
replies.py maps them to the store's errors. No command is ever resent after it may have run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from hashlib import sha1
from typing import Any

import hiredis

from gateway.store.resp import NodeConnection, pack


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script, run by its SHA1."""

    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> Script:
        return cls(source, sha1(source.encode()).hexdigest())


class RedisClient:
    """The operations every topology offers; see the module's docstring."""

    def __init__(self) -> None:
        self._scripts: dict[str, Script] = {}

    def register(self, scripts: Iterable[Script]) -> None:
        """Scripts loaded together on a node that answers NOSCRIPT (after SCRIPT FLUSH or a
        failover), so that a settlement queued after an admission finds its own."""
        for script in scripts:
            self._scripts[script.sha] = script

    async def call(self, *command: Any) -> Any:
        raise NotImplementedError

    async def call_any(self, *command: Any) -> Any:
        raise NotImplementedError

    async def on_primaries(self, *command: Any) -> list[Any]:
        raise NotImplementedError

    async def evalsha(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)

    def started(self, script: Script, keys: list[str], args: list[Any]
                ) -> asyncio.Future[Any] | None:
        """The script, queued on its node's connection before this returns (written when the
        caller next yields to the loop, before anything it writes after); None when that
        connection is not up (then use evalsha)."""
        return None

    async def close(self) -> None:
        raise NotImplementedError

    async def _run_on(self, node: NodeConnection, command: tuple[Any, ...],
                      asking: bool = False) -> Any:
        """`command` on `node`; a script answered NOSCRIPT (it did not run) is loaded there,
        with every registered script, and run again."""
        try:
            return await _send(node, command, asking)
        except hiredis.ReplyError as exc:
            if command[0] != "EVALSHA" or not str(exc).startswith("NOSCRIPT"):
                raise
        await self._load_scripts(node, self._scripts_for(command[1]))
        return await _send(node, command, asking)

    def _scripts_for(self, sha: Any) -> list[Script]:
        scripts = list(self._scripts.values())
        if sha not in self._scripts:
            raise hiredis.ReplyError(f"NOSCRIPT the script {sha} is not registered")
        return scripts

    @staticmethod
    async def _load_scripts(node: NodeConnection, scripts: list[Script]) -> None:
        await asyncio.gather(*(node.call(("SCRIPT", "LOAD", s.source)) for s in scripts))


async def _send(node: NodeConnection, command: tuple[Any, ...], asking: bool) -> Any:
    if not asking:
        return await node.call(command)
    protocol = await node.connect()
    # ASKING and the command leave in one write, in order, on one connection.
    protocol.request(pack(("ASKING",)))
    return await protocol.request(pack(command))


class NodeClient(RedisClient):
    """One server: redis://, rediss:// and unix://."""

    def __init__(self, node: NodeConnection) -> None:
        super().__init__()
        self.node = node

    async def call(self, *command: Any) -> Any:
        if command[0] == "EVALSHA":
            return await self._run_on(self.node, command)
        return await self.node.call(command)

    async def call_any(self, *command: Any) -> Any:
        return await self.node.call(command)

    async def on_primaries(self, *command: Any) -> list[Any]:
        return [await self.node.call(command)]

    async def evalsha(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        # One frame less on the path every admission takes.
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self.node.call(command)
        except hiredis.ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self._load_scripts(self.node, self._scripts_for(script.sha))
        return await self.node.call(command)

    def started(self, script: Script, keys: list[str], args: list[Any]
                ) -> asyncio.Future[Any] | None:
        protocol = self.node.connected()
        if protocol is None:
            return None
        return protocol.request(pack(("EVALSHA", script.sha, len(keys), *keys, *args)))

    async def close(self) -> None:
        await self.node.close()
