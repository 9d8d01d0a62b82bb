"""A multiplexed RESP connection: every request of a process on one pipelined socket."""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from typing import Any

import hiredis


class _Unsent(Exception):
    """The command was never written: Redis certainly did not run it."""


class _RespProtocol(asyncio.Protocol):
    """RESP over one connection: commands are written in order and answered in order.

    Each command gets a deadline; one timer watches the oldest (replies come in order, so
    the oldest is always the first overdue) instead of a timer per command.
    """

    def __init__(self, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.deadlines: collections.deque[float] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._outbox: list[bytes] = []
        self._watchdog: asyncio.TimerHandle | None = None

    def request(self, command: bytes) -> asyncio.Future[Any]:
        """Queues `command`, to be written as soon as the running callback yields to the
        loop, with every other command queued meanwhile; its reply (or error) completes
        the returned future."""
        if self.transport is None or self.lost:
            raise _Unsent("not connected")
        loop = self.loop
        waiter = loop.create_future()
        self.waiters.append(waiter)
        deadline = loop.time() + self.timeout
        self.deadlines.append(deadline)
        # Commands issued in one loop iteration leave in one write (one system call).
        if not self._outbox:
            loop.call_soon(self._flush)
        self._outbox.append(command)
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadline, self._check_deadline)
        return waiter

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        transport = self.transport
        # A closing transport refuses writes (uvloop raises); its waiters fail on connection_lost.
        if outbox and transport is not None and not self.lost and not transport.is_closing():
            transport.write(b"".join(outbox))

    def _check_deadline(self) -> None:
        self._watchdog = None
        if not self.deadlines:
            return
        if self.deadlines[0] > self.loop.time():
            self._watchdog = self.loop.call_at(self.deadlines[0], self._check_deadline)
            return
        # No reply in time: presume the connection dead (a silent partition never resets
        # it), fail everything that waits on it, and let the next call reconnect.
        self._fail_all(TimeoutError("Redis did not answer in time"))
        if self.transport is not None:
            self.transport.abort()

    def _fail_all(self, error: Exception) -> None:
        self.lost = True
        self.deadlines.clear()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter = self.waiters.popleft()
            self.deadlines.popleft()
            if waiter.done():
                continue  # its caller was cancelled; the order of replies is kept all the same
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(ConnectionResetError("connection to Redis lost"))
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


class Multiplexed:
    """One pipelined connection for the hot path (admit, settle, key lookup).

    Every call is written at once and answered in order, so all concurrent requests of a
    process share one socket: no connection pool and no per-command client machinery on the
    hot path, and Redis reads many commands per system call. After a failure the next call
    reconnects. Used for redis:// and unix:// URLs; TLS and Cluster go through redis-py.
    """

    def __init__(self, url: str, timeout_seconds: float) -> None:
        from redis.asyncio.connection import parse_url

        options = parse_url(url)
        self._path: str | None = options.get("path")
        self._host = str(options.get("host", "localhost"))
        self._port = int(options.get("port", 6379))
        self._username: str | None = options.get("username")
        self._password: str | None = options.get("password")
        self._db = int(options.get("db", 0))
        self._timeout = timeout_seconds
        self._protocol: _RespProtocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._failed_at = 0.0
        self._closed = False

    def _new_protocol(self) -> _RespProtocol:
        return _RespProtocol(self._timeout)

    async def _connect(self) -> _RespProtocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        asked = time.monotonic()
        async with self._connecting:
            current = self._protocol
            if current is not None and not current.lost:
                return current
            if self._failed_at >= asked:  # an attempt made while we waited just failed
                raise _Unsent("cannot connect to Redis")
            if self._closed:  # a late retry must not open a connection nobody will close
                raise _Unsent("the store is closed")
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._timeout):
                    if self._path:
                        _, protocol = await loop.create_unix_connection(self._new_protocol,
                                                                        self._path)
                    else:
                        transport, protocol = await loop.create_connection(
                            self._new_protocol, self._host, self._port)
                        sock = transport.get_extra_info("socket")
                        if sock is not None:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                    self._protocol = protocol
                    if self._password:
                        auth = ((self._username, self._password) if self._username
                                else (self._password,))
                        await protocol.request(_pack(("AUTH", *auth)))
                    if self._db:
                        await protocol.request(_pack(("SELECT", self._db)))
            except (OSError, TimeoutError, hiredis.ReplyError) as exc:
                self._failed_at = time.monotonic()
                self._drop()
                raise _Unsent(f"cannot connect to Redis: {type(exc).__name__}") from exc
            return protocol

    def connected(self) -> _RespProtocol | None:
        protocol = self._protocol
        return None if protocol is None or protocol.lost else protocol

    async def call(self, *command: Any) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.lost:
            protocol = await self._connect()
        return await protocol.request(_pack(command))

    def _drop(self) -> None:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
        self._protocol = None

    async def close(self) -> None:
        self._closed = True
        self._drop()


def _pack(command: tuple[Any, ...]) -> bytes:
    packed: bytes = hiredis.pack_command(command)
    return packed
