"""A multiplexed RESP connection to one Redis server: every request of a process on one
pipelined socket."""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import time
from typing import Any

import hiredis

from gateway.store.urls import Address, Credentials


class Unsent(Exception):
    """The command was never written: Redis certainly did not run it."""


class _RespProtocol(asyncio.Protocol):
    """RESP over one connection: commands are written in order and answered in order.

    Each command gets a deadline; one timer watches the oldest (replies come in order, so
    the oldest is always the first overdue) instead of a timer per command.
    """

    def __init__(self, timeout: float, name: str = "Redis") -> None:
        self.name = name  # "Redis at host:port", for the errors
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.deadlines: collections.deque[float] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._outbox: list[bytes] = []
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed: asyncio.Future[None] = self.loop.create_future()

    def request(self, command: bytes) -> asyncio.Future[Any]:
        """Queues `command`, to be written as soon as the running callback yields to the
        loop, with every other command queued meanwhile; its reply (or error) completes
        the returned future."""
        if self.transport is None or self.lost:
            raise Unsent("not connected")
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
        self._fail_all(TimeoutError(f"{self.name} did not answer in time"))
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
        self._fail_all(ConnectionResetError(f"connection to {self.name} lost"))
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if not self.closed.done():
            self.closed.set_result(None)


class NodeConnection:
    """One pipelined connection to one Redis server, shared by every request of a process.

    Every call is written at once and answered in order, so all concurrent requests share one
    socket: no connection pool and no per-command client machinery, and Redis reads many
    commands per system call. After a failure the next call reconnects (one attempt at a time:
    the calls that waited for a failed attempt fail with it); attempts that time out back off
    (up to a second), failing at once meanwhile, so a partitioned server costs no connect
    timeout per request.
    """

    def __init__(self, address: Address | None, credentials: Credentials,
                 timeout_seconds: float, path: str | None = None) -> None:
        self.address = address
        self._path = path
        self._credentials = credentials
        self._timeout = timeout_seconds
        self._protocol: _RespProtocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._failed_at = 0.0
        self._failures = 0
        self._retry_at = 0.0
        self._closed = False

    def __repr__(self) -> str:
        return f"NodeConnection({self.name})"

    @property
    def name(self) -> str:
        if self.address is None:
            return f"unix:{self._path}"
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _new_protocol(self) -> _RespProtocol:
        return _RespProtocol(self._timeout, f"Redis at {self.name}")

    async def connect(self) -> _RespProtocol:
        """The connected protocol, connecting (once, for every waiter) when there is none."""
        current = self._protocol
        if current is not None and not current.lost:
            return current
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        asked = time.monotonic()
        async with self._connecting:
            current = self._protocol
            if current is not None and not current.lost:
                return current
            if self._failed_at >= asked:  # an attempt made while we waited just failed
                raise Unsent(f"cannot connect to Redis at {self.name}")
            if self._closed:  # a late retry must not open a connection nobody will close
                raise Unsent("the store is closed")
            if asked < self._retry_at:
                raise Unsent(f"cannot connect to Redis at {self.name} (retrying shortly)")
            try:
                async with asyncio.timeout(self._timeout):
                    protocol = await self._open()
            except (OSError, TimeoutError, hiredis.ReplyError) as exc:
                self._failed_at = time.monotonic()
                # A refused connection costs nothing and a restarted server must be used at
                # once; an attempt that timed out (a partition) or was refused by Redis
                # (AUTH) backs off, failing fast meanwhile instead of each request waiting.
                if isinstance(exc, TimeoutError | hiredis.ReplyError):
                    self._failures += 1
                    self._retry_at = self._failed_at + min(0.025 * 2 ** self._failures, 1.0)
                self._drop()
                # Redis's own refusal says why (WRONGPASS, NOAUTH); it never echoes a password.
                why = (str(exc)[:100] if isinstance(exc, hiredis.ReplyError)
                       else f"{type(exc).__name__}{tls_reason(exc)}")
                raise Unsent(f"cannot connect to Redis at {self.name}: {why}") from exc
            self._failures = 0
            return protocol

    async def _open(self) -> _RespProtocol:
        loop = asyncio.get_running_loop()
        if self.address is None:
            _, protocol = await loop.create_unix_connection(self._new_protocol, self._path)
        else:
            host, port = self.address
            tls = self._credentials.tls
            transport, protocol = await loop.create_connection(
                self._new_protocol, host, port, ssl=tls,
                server_hostname=host if tls is not None else None)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._protocol = protocol
        credentials = self._credentials
        if credentials.password:
            auth = ((credentials.username, credentials.password) if credentials.username
                    else (credentials.password,))
            await protocol.request(pack(("AUTH", *auth)))
        if credentials.db:
            await protocol.request(pack(("SELECT", credentials.db)))
        return protocol

    def connected(self) -> _RespProtocol | None:
        protocol = self._protocol
        return None if protocol is None or protocol.lost else protocol

    async def call(self, command: tuple[Any, ...]) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.lost:
            protocol = await self.connect()
        return await protocol.request(pack(command))

    def _drop(self) -> None:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
        self._protocol = None

    def close_now(self) -> None:
        self._closed = True
        self._drop()

    async def close(self) -> None:
        """Closes after what is written has left, and waits (briefly) until the socket is
        closed: a TLS connection says goodbye before its socket closes."""
        protocol = self._protocol
        self.close_now()
        if protocol is not None and protocol.transport is not None:
            try:
                async with asyncio.timeout(1.0):
                    await asyncio.shield(protocol.closed)
            except TimeoutError:
                protocol.transport.abort()


def pack(command: tuple[Any, ...]) -> bytes:
    packed: bytes = hiredis.pack_command(command)
    return packed


def tls_reason(exc: BaseException) -> str:
    """Why a TLS handshake failed (e.g. ", TLS certificate verify failed: ..."); no secrets."""
    cause: BaseException | None = exc
    for _ in range(8):  # a bounded walk: exception chains can be cyclic
        if cause is None:
            break
        if isinstance(cause, ssl.SSLError):
            if isinstance(cause, ssl.SSLCertVerificationError):
                return f", TLS certificate verify failed: {cause.verify_message}"
            return f", TLS error: {cause.reason or 'handshake failed'}"
        cause = cause.__cause__ or cause.__context__
    return ""
