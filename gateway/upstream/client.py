"""A small HTTP/1.1 client for the one upstream origin of `gateway serve`.

Why not aiohttp: its ClientSession costs about 0.3 ms of CPU per proxied request on our
hardware (URL objects, multidict headers, timers, a StreamReader and tracing hooks per
request), which is most of the gateway's whole per-request budget. A reverse proxy talking to
one origin needs much less: an `asyncio.Protocol` per connection, httptools (llhttp) to parse
the response, a LIFO keep-alive pool, one `transport.write` per request and one future per
wait. No task is created per request and nothing is parsed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from urllib.parse import urlsplit

from gateway.config.limits import Deadlines
from gateway.upstream.connection import (
    Connection,
    Unsent,
    UpstreamError,
    UpstreamTimeout,
)

__all__ = ["UpstreamClient", "UpstreamError", "UpstreamResponse", "UpstreamTimeout"]

_HOST = re.compile(r"^[A-Za-z0-9._\-:%]+$")  # a name, IPv4, or IPv6 (brackets removed)
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
# Methods whose requests carry a body by definition: an empty one is sent as Content-Length: 0.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})



class UpstreamResponse:
    """Status and headers of a response whose body is still on (or coming from) the wire."""

    __slots__ = ("_client", "_conn", "_done", "content_type", "headers", "status")

    def __init__(self, client: UpstreamClient, conn: Connection) -> None:
        self.status: int = conn._status
        self.headers: list[tuple[bytes, bytes]] = conn._headers
        self.content_type: bytes = conn._content_type
        self._client = client
        self._conn: Connection | None = conn
        self._done = False

    def ready(self) -> bytes | None:
        """The whole body when it came with the head (the usual small answer), else None;
        the connection goes back to the pool when it is returned."""
        conn = self._conn
        if conn is None or not conn._complete:
            return None
        data = conn.take()
        self._done = True
        self.release()
        return data

    async def read(self) -> bytes:
        """The whole body; the connection goes back to the pool once it has arrived."""
        conn = self._conn
        if conn is None:
            return self._after_release()
        if conn._complete:  # the usual small response: it came with the head
            data = conn.take()
        else:
            parts: list[bytes] = []
            while True:
                if conn._pieces:
                    parts.append(conn.take())
                if conn._complete:
                    break
                if conn._error is not None:
                    self.release()
                    raise UpstreamError(conn._error)
                await conn.wait()
            data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._done = True
        self.release()
        return data

    def chunks(self) -> AsyncIterator[bytes]:
        """Body pieces as they arrive, for streams (server-sent events)."""
        return _Chunks(self)

    def release(self) -> None:
        """Pool the connection if the response ended cleanly; otherwise close it, so that an
        upstream still generating a stream notices that nobody listens any more."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._client._release(conn)

    def _after_release(self) -> bytes:
        if self._done:
            return b""
        raise UpstreamError("the response was released before its body was read")

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


class _Chunks:
    """Async iterator over the body pieces (a class, not an async generator: nothing to
    finalize when the consumer stops early, and cheaper per piece)."""

    __slots__ = ("_response",)

    def __init__(self, response: UpstreamResponse) -> None:
        self._response = response

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        response = self._response
        conn = response._conn
        if conn is None:
            response._after_release()  # raises unless the body was consumed
            raise StopAsyncIteration
        while True:
            if conn._pieces:
                return conn.take()
            if conn._complete:
                response._done = True
                response.release()
                raise StopAsyncIteration
            if conn._error is not None:
                response.release()
                raise UpstreamError(conn._error)
            await conn.wait()


class UpstreamClient:
    """HTTP/1.1 to one origin, with a LIFO pool of idle keep-alive connections."""

    def __init__(self, base_url: str, *, deadlines: Deadlines | None = None,
                 connect_timeout: float | None = None, max_idle: int = 256,
                 idle_timeout: float = 30.0, ssl_context: ssl.SSLContext | None = None) -> None:
        """`idle_timeout`: how long a pooled connection may wait for its next request;
        `deadlines` bound each exchange (`connect_timeout` overrides its connect)."""
        parts = urlsplit(base_url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"upstream URL must be http:// or https://, not {base_url!r}")
        host = parts.hostname
        if not host:
            raise ValueError(f"upstream URL has no host: {base_url!r}")
        if not _HOST.match(host) or not base_url.isprintable() or " " in base_url:
            raise ValueError(f"upstream URL has an invalid host or characters: {base_url!r}")
        if parts.username is not None or parts.query or parts.fragment:
            raise ValueError(f"upstream URL must not have credentials, a query or a fragment: "
                             f"{base_url!r}")
        default_port = 443 if scheme == "https" else 80
        port = parts.port  # ValueError if not a number in range
        self._host = host
        self._port = port if port is not None else default_port
        authority = f"[{host}]" if ":" in host else host
        if port is not None and port != default_port:
            authority = f"{authority}:{port}"
        self._origin = f"{scheme}://{authority}"
        self._prefix = parts.path.rstrip("/").encode("ascii")
        self._head_tail = b" HTTP/1.1\r\nhost: " + authority.encode("ascii") + b"\r\n"
        self._ssl: ssl.SSLContext | None = None
        if scheme == "https":
            self._ssl = ssl_context if ssl_context is not None else ssl.create_default_context()
        deadlines = deadlines or Deadlines()
        if connect_timeout is not None:
            deadlines = Deadlines(connect_timeout, deadlines.first_byte, deadlines.idle,
                                  deadlines.total)
        self._deadlines = deadlines
        self._connect_timeout = deadlines.connect
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._idle: deque[Connection] = deque()  # most recently used at the right end
        self._sweeper: asyncio.TimerHandle | None = None

    async def request(self, method: str, target: str, headers: list[tuple[bytes, bytes]],
                      body: bytes,
                      attach: Callable[[Callable[[], None]], None] | None = None,
                      ) -> UpstreamResponse:
        """Send a request; return once the response head has arrived. `headers` must be free
        of hop-by-hop headers, host and content-length: this adds host and content-length.
        The client's deadlines apply (UpstreamTimeout); `attach`, when given, receives the
        callable that abandons this exchange (closing its connection), for a client that
        leaves. A cancellation closes the connection too."""
        data = self._encode(method, target, headers, body)
        head_only = method == "HEAD"
        conn = self._pop_idle()
        if conn is not None:
            if attach is not None:
                attach(conn.abandon)
            try:
                await conn.send(data, head_only)
                return UpstreamResponse(self, conn)
            except Unsent:
                pass  # not a byte left: safe to send once more, on a new connection
            except UpstreamError:
                # Closed before any answer, just as we sent: the upstream may have read the
                # request and be running it. Only an idempotent one is sent again: an
                # inference (a POST) is never run twice.
                if conn._got_data or method not in _IDEMPOTENT or conn._timeout:
                    raise
        conn = await self._connect()
        if attach is not None:
            attach(conn.abandon)
        await conn.send(data, head_only)
        return UpstreamResponse(self, conn)

    async def close(self) -> None:
        """Close the idle connections (the ones in use close when their responses end)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle = list(self._idle)
        self._idle.clear()
        waiting: list[asyncio.Future[None]] = []
        for conn in idle:
            if not conn._closed:
                conn._lost = conn._loop.create_future()
                waiting.append(conn._lost)
                conn._close()
        if waiting:
            await asyncio.wait(waiting, timeout=1.0)

    def _encode(self, method: str, target: str, headers: list[tuple[bytes, bytes]],
                body: bytes) -> bytes:
        if " " in target or not target.isprintable():  # no CR/LF injection into the head
            raise ValueError(f"request target must be quoted: {target!r}")
        parts = [method.encode("ascii"), b" ", self._prefix, target.encode("ascii"),
                 self._head_tail]
        for header in headers:
            parts.append(b"%s: %s\r\n" % header)
        if body or method in _BODY_METHODS:
            parts.append(b"content-length: %d\r\n\r\n" % len(body))
            parts.append(body)
        else:
            parts.append(b"\r\n")
        return b"".join(parts)

    def _pop_idle(self) -> Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn._closed:
                continue
            if conn._loop.time() - conn._idle_since > self._idle_timeout:
                # The most recently used one is too old, so are all the others.
                conn._close()
                while idle:
                    idle.pop()._close()
                return None
            return conn
        return None

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        factory: Callable[[], Connection] = lambda: Connection(self, loop)  # noqa: E731
        try:
            async with asyncio.timeout(self._connect_timeout):
                transport, conn = await loop.create_connection(
                    factory, self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None)
        except TimeoutError as exc:
            raise UpstreamError(f"connecting to {self._origin} timed out after "
                                f"{self._connect_timeout:g} s") from exc
        except OSError as exc:  # refused, unreachable, name not resolved, TLS failures
            raise UpstreamError(f"cannot connect to {self._origin}: {exc}") from exc
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # asyncio and uvloop set it too; make sure
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _release(self, conn: Connection) -> None:
        if not (conn._complete and conn._keep_alive and conn._error is None
                and not conn._closed):
            conn._close()
            return
        conn.park(conn._loop.time())
        idle = self._idle
        idle.append(conn)
        if len(idle) > self._max_idle:
            idle.popleft()._close()  # the least recently used: the least likely to be needed
        if self._sweeper is None and idle:
            self._schedule_sweep()

    def _forget(self, conn: Connection) -> None:
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    def _schedule_sweep(self) -> None:
        oldest = self._idle[0]
        self._sweeper = oldest._loop.call_at(oldest._idle_since + self._idle_timeout,
                                             self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for too long even when no request comes to notice."""
        self._sweeper = None
        idle = self._idle
        while idle and idle[0]._loop.time() - idle[0]._idle_since >= self._idle_timeout:
            idle.popleft()._close()
        if idle:
            self._schedule_sweep()
