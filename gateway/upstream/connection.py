"""One keep-alive HTTP/1.1 connection to the upstream: an `asyncio.Protocol` fed to httptools
(llhttp), holding the state of the single exchange in flight, with its deadlines and back
pressure. The pool and the request logic live in `gateway.upstream.client`."""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

# Recent httptools releases ship type hints; older ones do not.
import httptools  # type: ignore[import-untyped, unused-ignore]

from gateway.config.limits import Deadlines


class Pool(Protocol):
    """What a connection needs from the client that owns it."""

    _deadlines: Deadlines

    def _forget(self, conn: Connection) -> None: ...


# Unread body bytes buffered per connection before the socket stops being read: a slow
# consumer then slows the upstream (TCP flow control) instead of growing our memory.
_HIGH_WATER = 256 * 1024


class UpstreamError(Exception):
    """The upstream could not be reached, or broke before/while answering."""

    timed_out = False  # a deadline passed (a 504 rather than a 502, before the head)


class UpstreamTimeout(UpstreamError):
    """A deadline passed: no head in time, too long a silence, or too long in all."""

    timed_out = True


class Unsent(UpstreamError):
    """The request could not be written at all: safe to send again elsewhere."""


class StopParsing(Exception):
    """Raised from a parser callback to make httptools stop feeding the rest of the data."""


class Connection(asyncio.Protocol):
    """One keep-alive connection. It holds the state of the (single) exchange in flight, so a
    request allocates a future and a response object, and nothing else."""

    __slots__ = (
        "_buffered", "_client", "_closed", "_complete", "_content_type", "_error", "_got_data",
        "_head_done", "_head_only", "_head_timer", "_headers", "_idle_since", "_idle_timer",
        "_in_flight", "_interim", "_keep_alive", "_last_data", "_loop", "_lost", "_parser",
        "_paused", "_pieces", "_status", "_timeout", "_total_timer", "_transport", "_waiter",
    )

    def __init__(self, client: Pool, loop: asyncio.AbstractEventLoop) -> None:
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
            cause = exc.__context__ if isinstance(exc.__context__, StopParsing) else exc
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
            raise StopParsing("data after the end of the response")

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
            raise StopParsing("end of a HEAD response")

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
        """Write one request and wait for the head of its response. Raises Unsent when
        not a byte of it could be written (the only case it may be sent again)."""
        self._reset(head_only)
        self._in_flight = True
        waiter = self._waiter = self._loop.create_future()
        transport = self._transport
        if transport is None or self._closed or transport.is_closing():
            self._waiter = None
            self._close()
            raise Unsent("the connection closed before the request was written")
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
