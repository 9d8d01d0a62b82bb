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
from typing import cast
from urllib.parse import urlsplit

# Recent httptools releases ship type hints; older ones do not.
import httptools  # type: ignore[import-untyped, unused-ignore]

from gateway.config.limits import Deadlines

# Unread body bytes buffered per connection before the socket stops being read: a slow
# consumer then slows the upstream (TCP flow control) instead of growing our memory.
_HIGH_WATER = 256 * 1024
_HOST = re.compile(r"^[A-Za-z0-9._\-:%]+$")  # a name, IPv4, or IPv6 (brackets removed)
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
# Methods whose requests carry a body by definition: an empty one is sent as Content-Length: 0.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class UpstreamError(Exception):
    """The upstream could not be reached, or broke before/while answering."""

    timed_out = False  # a deadline passed (a 504 rather than a 502, before the head)


class UpstreamTimeout(UpstreamError):
    """A deadline passed: no head in time, too long a silence, or too long in all."""

    timed_out = True


class _Unsent(UpstreamError):
    """The request could not be written at all: safe to send again elsewhere."""


class _StopParsing(Exception):
    """Raised from a parser callback to make httptools stop feeding the rest of the data."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection. It holds the state of the (single) exchange in flight, so a
    request allocates a future and a response object, and nothing else."""

    __slots__ = (
        "_buffered", "_client", "_closed", "_complete", "_content_type", "_error", "_got_data",
        "_head_done", "_head_only", "_head_timer", "_headers", "_idle_since", "_idle_timer",
        "_in_flight", "_interim", "_keep_alive", "_last_data", "_loop", "_lost", "_parser",
        "_paused", "_pieces", "_status", "_timeout", "_total_timer", "_transport", "_waiter",
    )

    def __init__(self, client: UpstreamClient, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._closed = False
        self._in_flight = False
        self._idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._lost: asyncio.Future[None] | None = None  # only for UpstreamClient.close()
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._total_timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0
        self._reset(False)

    def _reset(self, head_only: bool) -> None:
        self._head_only = head_only
        self._got_data = False
        self._head_done = False
        self._interim = False
        self._complete = False
        self._keep_alive = False
        self._error: str | None = None
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._content_type = b""
        self._timeout = False

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._in_flight:
            self._close()  # nothing was asked: whatever this is, the connection is unusable
            return
        self._got_data = True
        self._last_data = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._break("the upstream switched protocols")
        except httptools.HttpParserError as exc:
            cause = exc.__context__ if isinstance(exc.__context__, _StopParsing) else exc
            self._break(f"unparseable response from the upstream: {cause}")

    def eof_received(self) -> bool | None:
        if not self._in_flight:
            self._closed = True
            self._client._forget(self)
        return None  # let the transport close; connection_lost finishes an EOF-ended body

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        if not self._in_flight:
            self._client._forget(self)
            return
        if self._complete:
            return
        if self._head_done and exc is None and self._ends_at_eof():
            self._complete = True  # a body without length or chunking ends at the close
        elif self._error is None:
            detail = f": {exc}" if exc is not None else ""
            where = "while sending the body" if self._head_done else "before answering"
            self._error = f"the upstream closed the connection {where}{detail}"
        self._wake()

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        if self._complete:
            raise _StopParsing("data after the end of the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            return  # a trailer of a chunked body: the head was already handed out
        name = name.lower()
        self._headers.append((name, value))
        if name == b"content-type":
            self._content_type = value.partition(b";")[0].strip().lower()

    def on_headers_complete(self) -> None:
        status: int = self._parser.get_status_code()
        if status < 200:  # 1xx interim response: skip it (101 makes the parser raise anyway)
            self._interim = True
            self._headers = []
            self._content_type = b""
            return
        self._status = status
        self._head_done = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._idle_timer = self._loop.call_later(self._client._deadlines.idle,
                                                 self._check_idle)
        self._wake()
        if self._head_only:
            # llhttp cannot be told that a HEAD response has no body: end the exchange here
            # and stop the parser; the connection is then not reused.
            self._complete = True
            raise _StopParsing("end of a HEAD response")

    def on_body(self, body: bytes) -> None:
        if not body:
            return
        self._pieces.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        if self._waiter is not None:
            self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete = True
        self._cancel_timers()
        # Only meaningful inside this callback: llhttp resets its flags right after it.
        self._keep_alive = self._parser.should_keep_alive()
        if self._waiter is not None:
            self._wake()

    # --- used by UpstreamClient / UpstreamResponse ---

    async def send(self, data: bytes, head_only: bool) -> None:
        """Write one request and wait for the head of its response. Raises _Unsent when
        not a byte of it could be written (the only case it may be sent again)."""
        self._reset(head_only)
        self._in_flight = True
        waiter = self._waiter = self._loop.create_future()
        transport = self._transport
        if transport is None or self._closed or transport.is_closing():
            self._waiter = None
            self._close()
            raise _Unsent("the connection closed before the request was written")
        try:
            transport.write(data)
        except (OSError, RuntimeError) as exc:  # uvloop raises on a closed transport
            self._waiter = None
            self._close()
            raise UpstreamError(f"cannot send to the upstream: {exc}") from exc
        deadlines = self._client._deadlines
        self._head_timer = self._loop.call_later(deadlines.first_byte, self._expire,
                                                 "no response head in time")
        if deadlines.total is not None:
            self._total_timer = self._loop.call_later(deadlines.total, self._expire,
                                                      "no complete answer in time")
        try:
            await waiter
        except asyncio.CancelledError:
            self._close()
            raise
        if not self._head_done:
            if self._timeout:
                raise UpstreamTimeout(self._error or "the upstream timed out")
            raise UpstreamError(self._error or "the upstream closed the connection")

    def abandon(self) -> None:
        """The client left: close the connection (the upstream stops generating) and wake
        whoever waits for it."""
        self._break("the client went away")

    def _expire(self, why: str) -> None:
        if not self._complete and not self._closed:
            self._timeout = True
            self._break(f"upstream timeout: {why}")

    def _check_idle(self) -> None:
        if self._complete or self._closed:
            return
        # One timer for the whole body, moved on when it fires early: cheaper than
        # rescheduling it for every piece that arrives.
        idle = self._client._deadlines.idle
        silent = self._loop.time() - self._last_data
        if silent >= idle:
            self._idle_timer = None
            self._expire("the body stalled")
        else:
            self._idle_timer = self._loop.call_later(idle - silent, self._check_idle)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._idle_timer, self._total_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = self._total_timer = None

    async def wait(self) -> None:
        """Wait until the body makes progress (a piece, its end or a failure)."""
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            self._close()
            raise

    def take(self) -> bytes:
        pieces = self._pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            if not self._closed and self._transport is not None:
                self._transport.resume_reading()
        return data

    def park(self, now: float) -> None:
        """Become idle in the pool: the next bytes from the upstream would be unsolicited."""
        self._in_flight = False
        self._idle_since = now
        if self._pieces or self._paused:
            self.take()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _break(self, message: str) -> None:
        if not self._complete and self._error is None:
            self._error = message
        self._close()
        self._wake()

    def _close(self) -> None:
        self._cancel_timers()
        self._keep_alive = False
        if not self._closed:
            self._closed = True
            if self._transport is not None:
                self._transport.close()

    def _ends_at_eof(self) -> bool:
        """Whether the body is delimited by the connection close (no length, not chunked)."""
        for name, value in self._headers:
            if name == b"content-length":
                return False
            if name == b"transfer-encoding" and value.rstrip().lower().endswith(b"chunked"):
                return False
        return True


class UpstreamResponse:
    """Status and headers of a response whose body is still on (or coming from) the wire."""

    __slots__ = ("_client", "_conn", "_done", "content_type", "headers", "status")

    def __init__(self, client: UpstreamClient, conn: _Connection) -> None:
        self.status: int = conn._status
        self.headers: list[tuple[bytes, bytes]] = conn._headers
        self.content_type: bytes = conn._content_type
        self._client = client
        self._conn: _Connection | None = conn
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
        self._idle: deque[_Connection] = deque()  # most recently used at the right end
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
            except _Unsent:
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

    def _pop_idle(self) -> _Connection | None:
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

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        factory: Callable[[], _Connection] = lambda: _Connection(self, loop)  # noqa: E731
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

    def _release(self, conn: _Connection) -> None:
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

    def _forget(self, conn: _Connection) -> None:
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
